# Sourced by scripts/compare-loss-torch.sh and scripts/bench-train-step.sh (not run directly):
# release-builds the tokenizer and pretrain stages, makes a work dir ($KEEP, or a temporary one
# removed on exit) and trains the tiny pipeline's tokenizer (configs/tiny/tokenizer.toml) on the
# embedded sample corpus into $WORK/tok unless it is already there.
# Sets: BIN (release binaries), WORK, CORPUS.
TARGET=${CARGO_TARGET_DIR:-target}
cargo build --release -q -p nanochat-tokenizer-stage -p nanochat-pretrain
BIN=$TARGET/release
WORK=${KEEP:-$(mktemp -d)}
mkdir -p "$WORK"
[ -n "${KEEP:-}" ] || trap 'rm -rf "$WORK"' EXIT
CORPUS=data/sample/corpus
if [ ! -f "$WORK/tok/tokenizer.tiktoken" ]; then
  rm -rf "$WORK/tok" && mkdir -p "$WORK/tok"
  "$BIN/nanochat-tokenizer" --config configs/tiny/tokenizer.toml --input "corpus=$CORPUS" \
    --out "$WORK/tok" --work "$WORK/tok-work" 2>"$WORK/tokenizer.log"
fi
