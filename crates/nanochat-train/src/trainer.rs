//! The training loop shared by the pretrain, midtrain and SFT stages.
//!
//! Gradient accumulation to a total batch, the reference LR schedule and Muon momentum warmup,
//! optional gradient clipping, validation bits-per-byte and greedy samples every N steps,
//! metrics as JSONL plus tracing and an indicatif bar, and checkpoints (weights, optimizer
//! state, data position, step) written atomically into the stage's work dir every N steps and
//! on interruption. A run resumes from the newest checkpoint that loads, skipping broken ones
//! with a warning; with the same thread count the result is bit-identical to an uninterrupted
//! run, because every piece of state that influences the weights is saved exactly.
//!
//! Data parallelism goes through the job's [`Collective`]: each rank accumulates its share of
//! the micro-batches; then either the optimizer is sharded ([`crate::shard`]: reduce-scatter,
//! each rank steps what it owns, all-gather; the default with several ranks) or one all-reduce
//! averages the flat gradient buffer (bit-identical on every rank) and every rank clips and
//! steps the same replica. Loss and bits-per-byte are
//! reduced over the ranks; rank 0 alone writes checkpoints (holding every rank's data
//! position), metrics and the output. A world of one makes no collective call at all, so that
//! path is exactly the single-process loop.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use nanochat_data::chat_batches::{PaddedBatches, StreamBatches};
use nanochat_data::{Batch, DataError, PackerState, PretrainLoader};
use nanochat_dist::{Collective, DeviceCollective, NcclComm, ReduceOp};
use nanochat_model::compute::DeviceKind;
use nanochat_model::{
    load_checkpoint_on, save_checkpoint, Backend, CheckpointMeta, Device, Gpt, MatmulPrecision,
    Reduction,
};
use nanochat_tokenizer::Tokenizer;
use safetensors::tensor::TensorView;
use safetensors::{Dtype, SafeTensors};
use serde::{Deserialize, Serialize};

use crate::grad_sync::all_reduce_gradients;
use crate::optim::{
    muon_momentum_at, NanochatOptimizer, OptimizerMeta, OptimizerSettings, StateTensor,
};
use crate::schedule::LrSchedule;
use crate::shard::ShardedOptimizer;
use crate::TrainError;
use nanochat_artifacts::write_atomic;

/// The run's optimizer: replicated on every rank, or sharded over them.
enum TrainOptimizer<B: Backend> {
    Replicated(NanochatOptimizer<B>),
    Sharded(ShardedOptimizer<B>),
}

impl<B: Backend> TrainOptimizer<B> {
    fn set_muon_momentum(&mut self, m: f32) {
        match self {
            Self::Replicated(o) => o.set_muon_momentum(m),
            Self::Sharded(o) => o.set_muon_momentum(m),
        }
    }

    fn restore(
        &mut self,
        meta: &OptimizerMeta,
        lookup: impl FnMut(&str) -> Option<Vec<f32>>,
    ) -> Result<(), TrainError> {
        match self {
            Self::Replicated(o) => o.restore(meta, lookup),
            Self::Sharded(o) => o.restore(meta, lookup),
        }
    }

    /// Whole state tensors and scalars for a checkpoint: a collective call when sharded
    /// (every rank makes it); `Some` where `lead` (rank 0).
    fn checkpoint_state(
        &mut self,
        coll: &mut dyn Collective,
        lead: bool,
    ) -> Result<Option<(Vec<StateTensor>, OptimizerMeta)>, TrainError> {
        match self {
            Self::Replicated(o) if lead => Ok(Some((o.state_tensors()?, o.meta()))),
            Self::Replicated(_) => Ok(None),
            Self::Sharded(o) => o.gather_state(coll),
        }
    }
}

/// Anything that yields training batches.
pub trait BatchSource: Send {
    /// The next batch.
    fn next_batch(&mut self) -> Result<Batch, DataError>;
}

impl BatchSource for PretrainLoader {
    fn next_batch(&mut self) -> Result<Batch, DataError> {
        PretrainLoader::next_batch(self)
    }
}
impl BatchSource for StreamBatches {
    fn next_batch(&mut self) -> Result<Batch, DataError> {
        StreamBatches::next_batch(self)
    }
}
impl BatchSource for PaddedBatches {
    fn next_batch(&mut self) -> Result<Batch, DataError> {
        PaddedBatches::next_batch(self)
    }
}

fn d_0() -> f64 {
    0.0
}
fn d_02() -> f64 {
    0.2
}
fn d_1() -> f64 {
    1.0
}
fn d_emb() -> f32 {
    0.2
}
fn d_unemb() -> f32 {
    0.004
}
fn d_matrix() -> f32 {
    0.02
}
fn d_true() -> bool {
    true
}
fn d_eval_batches() -> usize {
    4
}
fn d_sample_tokens() -> usize {
    16
}
fn d_log_every() -> u64 {
    1
}

/// Settings of the training loop (the `[train]` table of every training stage's config).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoopConfig {
    /// Rows per micro-batch (sequences for pretrain/midtrain, conversations for SFT).
    pub device_batch_size: usize,
    /// Units per optimizer step: tokens (pretrain, midtrain) or conversations (SFT); must be a
    /// multiple of one micro-batch. Gradient accumulation makes up the difference.
    pub total_batch_size: usize,
    /// Optimizer steps to run. 0 (or absent): derived by [`LoopConfig::resolve_horizon`] from
    /// `target_flops` or `target_param_data_ratio` (pretraining only; other stages must set it).
    #[serde(default)]
    pub num_iterations: u64,
    /// Pretraining horizon as a total FLOPs budget (0: unset); used when `num_iterations` is 0.
    #[serde(default)]
    pub target_flops: f64,
    /// Pretraining horizon as training tokens per model parameter (nanochat's speedrun: 20;
    /// 0: unset); used when `num_iterations` and `target_flops` are 0.
    #[serde(default)]
    pub target_param_data_ratio: f64,
    /// AdamW lr of the token embedding, before the 1/√(d_model/768) scaling.
    #[serde(default = "d_emb")]
    pub embedding_lr: f32,
    /// AdamW lr of the lm_head, before the scaling.
    #[serde(default = "d_unemb")]
    pub unembedding_lr: f32,
    /// Muon lr of the block matrices.
    #[serde(default = "d_matrix")]
    pub matrix_lr: f32,
    /// AdamW weight decay.
    #[serde(default)]
    pub weight_decay: f32,
    /// Run Muon's Newton–Schulz in bf16 like the reference (true: bf16 operands, f32
    /// accumulation, on the bf16 GEMM) or in f32.
    #[serde(default = "d_true")]
    pub muon_bf16: bool,
    /// Arithmetic of the model's matmuls: `"f32"` (default) or `"bf16"` (bf16 operands, f32
    /// accumulation; the reference's bf16 autocast: tensor cores on a GPU, ~2× the matmul rate
    /// on CPUs with AVX-512 BF16). Weights, gradients and optimizer state stay f32 either way.
    #[serde(default)]
    pub matmul_precision: MatmulPrecision,
    /// Where to train: `"cpu"` (default), `"cuda"` (the GPU `LOCAL_RANK` names, else 0) or
    /// `"cuda:N"`.
    #[serde(default)]
    pub device: Device,
    /// Multiplies every initial lr (nanochat's mid/SFT stages start from a fraction).
    #[serde(default = "d_1")]
    pub init_lr_frac: f64,
    /// Clip the global gradient norm to this (0 disables clipping).
    #[serde(default)]
    pub grad_clip: f32,
    /// Fraction of steps of linear LR warmup.
    #[serde(default = "d_0")]
    pub warmup_ratio: f64,
    /// Fraction of steps (at the end) of linear LR warmdown.
    #[serde(default = "d_02")]
    pub warmdown_ratio: f64,
    /// LR multiplier at the last step.
    #[serde(default = "d_0")]
    pub final_lr_frac: f64,
    /// Evaluate validation bits-per-byte every this many steps (0: only at the end).
    #[serde(default)]
    pub eval_every: u64,
    /// Validation micro-batches per evaluation, in all (each of N data-parallel ranks runs
    /// ⌈eval_batches / N⌉ of its own slice).
    #[serde(default = "d_eval_batches")]
    pub eval_batches: usize,
    /// Print greedy samples every this many steps (0: only at the end).
    #[serde(default)]
    pub sample_every: u64,
    /// Prompts for the samples (none: no samples).
    #[serde(default)]
    pub sample_prompts: Vec<String>,
    /// Tokens generated per sample.
    #[serde(default = "d_sample_tokens")]
    pub sample_tokens: usize,
    /// Checkpoint into the work dir every this many steps (0: only when interrupted).
    #[serde(default)]
    pub save_every: u64,
    /// Write a metrics line every this many steps.
    #[serde(default = "d_log_every")]
    pub log_every: u64,
    /// Peak FLOP/s of the machine, for MFU (0: MFU not reported).
    #[serde(default)]
    pub peak_flops: f64,
    /// Shard the optimizer over the data-parallel ranks (nanochat's DistAdamW/DistMuon,
    /// ZeRO-1: reduce-scatter of the gradients, each rank updating the parameters it owns with
    /// ≈ 1/world of the optimizer state, all-gather of the parameters; see
    /// [`crate::shard`]). Absent: on with several ranks, off with one (`true` with one rank
    /// runs the sharded code path in a world of one). It changes results only by floating-point
    /// reduction order, so it is not part of the stage key; checkpoints are the same format
    /// either way.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shard_optimizer: Option<bool>,
}

impl LoopConfig {
    /// Checks the fields that do not depend on the model; returns the micro-batches per step.
    pub fn validate(&self, units_per_micro: usize) -> Result<usize, TrainError> {
        self.validate_ranks(units_per_micro, 1)
    }

    /// [`LoopConfig::validate`] for `world` data-parallel ranks: returns the micro-batches each
    /// rank runs per step, `total_batch_size / (units_per_micro · world)` (nanochat's
    /// `grad_accum_steps`), which must divide exactly.
    pub fn validate_ranks(
        &self,
        units_per_micro: usize,
        world: usize,
    ) -> Result<usize, TrainError> {
        let bad = |m: String| Err(TrainError::Config(m));
        if self.device_batch_size == 0 || units_per_micro == 0 {
            return bad("device_batch_size must be ≥ 1".into());
        }
        if world == 0 {
            return bad("a world of 0 ranks".into());
        }
        let per_step = units_per_micro * world;
        if self.total_batch_size == 0 || !self.total_batch_size.is_multiple_of(per_step) {
            return bad(if world == 1 {
                format!(
                    "total_batch_size {} must be a positive multiple of one micro-batch ({units_per_micro})",
                    self.total_batch_size
                )
            } else {
                format!(
                    "total_batch_size {} must be a positive multiple of one micro-batch ({units_per_micro}) \
                     times the {world} ranks = {per_step}: each rank runs total_batch_size / \
                     (micro-batch · ranks) micro-batches per step",
                    self.total_batch_size
                )
            });
        }
        if self.num_iterations == 0 {
            return bad(
                "num_iterations must be ≥ 1 (pretraining may instead set target_param_data_ratio or target_flops)"
                    .into(),
            );
        }
        for (name, v) in [
            ("warmup_ratio", self.warmup_ratio),
            ("warmdown_ratio", self.warmdown_ratio),
            ("final_lr_frac", self.final_lr_frac),
        ] {
            if !(0.0..=1.0).contains(&v) {
                return bad(format!("{name} must be in [0, 1], got {v}"));
            }
        }
        if self.warmup_ratio + self.warmdown_ratio > 1.0 {
            return bad("warmup_ratio + warmdown_ratio must be ≤ 1".into());
        }
        Ok(self.total_batch_size / per_step)
    }

    /// Fills in `num_iterations` from the FLOPs budget or the data:param ratio when it is 0, as
    /// nanochat's `base_train.py` does (`total_batch_size` counts tokens), and logs the result.
    pub fn resolve_horizon(
        &mut self,
        model: &nanochat_model::GptConfig,
    ) -> Result<u64, TrainError> {
        let params = model.num_params();
        let (steps, source) = crate::schedule::training_horizon(
            self.num_iterations,
            self.target_flops,
            self.target_param_data_ratio,
            params,
            model.flops_per_token(),
            self.total_batch_size,
        )
        .ok_or_else(|| {
            TrainError::Config(
                "no training horizon: set num_iterations, target_flops or target_param_data_ratio (one step's budget at least)"
                    .into(),
            )
        })?;
        let tokens = steps as f64 * self.total_batch_size as f64;
        tracing::info!(
            num_iterations = steps,
            from = ?source,
            params,
            tokens,
            tokens_per_param = tokens / params as f64,
            "training horizon"
        );
        self.num_iterations = steps;
        Ok(steps)
    }

    /// Whether a run of `world` ranks shards its optimizer (see [`LoopConfig::shard_optimizer`]).
    pub fn shards_optimizer(&self, world: usize) -> bool {
        self.shard_optimizer.unwrap_or(world > 1)
    }

    fn optimizer_settings(&self) -> OptimizerSettings {
        let f = self.init_lr_frac as f32;
        OptimizerSettings {
            embedding_lr: self.embedding_lr * f,
            unembedding_lr: self.unembedding_lr * f,
            matrix_lr: self.matrix_lr * f,
            weight_decay: self.weight_decay,
            muon_bf16: self.muon_bf16,
        }
    }
}

/// Loop state saved with every checkpoint.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct TrainState {
    /// Optimizer steps completed.
    pub step: u64,
    /// Data position after the last consumed batch.
    pub data: Option<PackerState>,
    /// Optimizer scalars.
    pub optimizer: Option<OptimizerMeta>,
    /// EMA of the training loss (debiased when reported).
    pub smooth_loss: f64,
    /// Seconds spent in training steps.
    pub train_seconds: f64,
    /// Best validation bits-per-byte seen.
    pub min_val_bpb: Option<f64>,
    /// Every rank's data position, in rank order, in a checkpoint of a run of several ranks
    /// (rank 0 gathers them when it saves); empty for one rank, whose position is `data`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub rank_data: Vec<Option<PackerState>>,
}

/// How a run ended.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// All steps ran; the final model is in the out dir.
    Finished {
        /// Last validation bits-per-byte.
        val_bpb: Option<f64>,
        /// Last smoothed training loss.
        train_loss: f64,
    },
    /// Stopped by a signal after saving a checkpoint at this step.
    Interrupted {
        /// Step of the saved checkpoint.
        step: u64,
    },
}

/// One metrics line (`metrics.jsonl`, in the stage output): results only, so a deterministic
/// rerun writes the same bytes. Timings go to [`TimingLine`]s in the run directory.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MetricsLine {
    /// Optimizer step just completed.
    pub step: u64,
    /// Mean training loss of the step's micro-batches.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub loss: Option<f64>,
    /// LR multiplier used.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lr_mult: Option<f64>,
    /// Global gradient norm (before clipping).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub grad_norm: Option<f64>,
    /// Validation bits per byte.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub val_bpb: Option<f64>,
}

/// One training step's timing (`timing.jsonl`, in the run directory: it differs every run).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TimingLine {
    /// Optimizer step just completed.
    pub step: u64,
    /// Wall-clock seconds of the step.
    pub seconds: f64,
    /// Training throughput.
    pub tok_per_s: f64,
    /// Model FLOPs utilisation (when `peak_flops` is set).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mfu: Option<f64>,
    /// Seconds of the step spent in the gradient all-reduce (runs of several ranks only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allreduce_seconds: Option<f64>,
}

/// Where a run keeps its files.
#[derive(Debug, Clone)]
pub struct RunDirs {
    /// Persistent per-stage dir for checkpoints and metrics in progress.
    pub work: PathBuf,
    /// Output dir: `model/` (checkpoint), `tokenizer/` (the tokenizer it was trained with),
    /// `metrics.jsonl`, `summary.json` — results only.
    pub out: PathBuf,
    /// Run dir for telemetry (`timing.jsonl`, `telemetry.json`), when there is one
    /// ([`nanochat_artifacts::stage::StageContext::run_dir`]).
    pub run: Option<PathBuf>,
}

const CKPT_PREFIX: &str = "ckpt-";
const STATE_FILE: &str = "train_state.json";
const OPTIM_FILE: &str = "optim.safetensors";
const METRICS_FILE: &str = "metrics.jsonl";
const TIMING_FILE: &str = "timing.jsonl";
/// Sub-directory of a stage output holding the tokenizer the model was trained with.
pub const TOKENIZER_DIR: &str = "tokenizer";

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> TrainError + '_ {
    move |source| TrainError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// The lines of a JSONL log a resumed run keeps: those the checkpoint at `step` covers. A
/// training step's line is written before the checkpoint of that step, a validation line of
/// step N after it (at the top of the next iteration), so the validation line of `step`
/// itself is redone by the resumed run and dropped here.
fn lines_covered_by_checkpoint(text: &str, step: u64) -> String {
    let mut kept = String::new();
    for line in text.lines() {
        let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        let Some(s) = v.get("step").and_then(serde_json::Value::as_u64) else {
            continue;
        };
        let validation = v.get("val_bpb").is_some();
        if s < step || (s == step && !validation) {
            kept.push_str(line);
            kept.push('\n');
        }
    }
    kept
}

/// Rewrites a JSONL log to the lines the checkpoint at `step` covers and opens it to append.
fn reopen_log_at(path: &Path, step: u64) -> Result<std::fs::File, TrainError> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    write_atomic(path, lines_covered_by_checkpoint(&text, step).as_bytes())?;
    std::fs::OpenOptions::new()
        .append(true)
        .open(path)
        .map_err(io(path))
}

/// The run directory's files: per-step timings and a summary of them (what the report shows
/// as "for how long, how fast, on how many threads").
fn write_telemetry(
    run: &Path,
    timing_path: &Path,
    state: &TrainState,
    cfg: &LoopConfig,
    device: &str,
    ranks: usize,
) -> Result<(), TrainError> {
    let timings = std::fs::read(timing_path).map_err(io(timing_path))?;
    write_atomic(&run.join(TIMING_FILE), &timings)?;
    let rates: Vec<f64> = std::str::from_utf8(&timings)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str::<TimingLine>(l).ok())
        .map(|t| t.tok_per_s)
        .collect();
    let telemetry = serde_json::json!({
        "train_seconds": state.train_seconds,
        "steps": state.step,
        "mean_tok_per_s": (!rates.is_empty()).then(|| rates.iter().sum::<f64>() / rates.len() as f64),
        "threads": rayon::current_num_threads(),
        "matmul_precision": cfg.matmul_precision,
        "device": device,
        "ranks": ranks,
    });
    write_atomic(
        &run.join("telemetry.json"),
        serde_json::to_string_pretty(&telemetry)
            .map_err(|e| TrainError::Config(e.to_string()))?
            .as_bytes(),
    )?;
    Ok(())
}

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    let mut out = Vec::with_capacity(v.len() * 4);
    for x in v {
        out.extend_from_slice(&x.to_le_bytes());
    }
    out
}

fn save_training_checkpoint<B: Backend>(
    work: &Path,
    model: &Gpt<B>,
    (tensors, opt_meta): (Vec<StateTensor>, OptimizerMeta),
    state: &TrainState,
    meta: &CheckpointMeta,
) -> Result<PathBuf, TrainError> {
    let final_dir = work.join(format!("{CKPT_PREFIX}{:08}", state.step));
    let tmp = work.join(format!(".tmp-{CKPT_PREFIX}{:08}", state.step));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(io(&tmp))?;
    }
    std::fs::create_dir_all(&tmp).map_err(io(&tmp))?;
    let mut m = meta.clone();
    m.step = state.step;
    save_checkpoint(model, &tmp.join("model"), &m)?;
    let bytes: Vec<(String, Vec<usize>, Vec<u8>)> = tensors
        .iter()
        .map(|(n, s, d)| (n.clone(), s.clone(), f32_bytes(d)))
        .collect();
    let views = bytes
        .iter()
        .map(|(n, s, b)| {
            TensorView::new(Dtype::F32, s.clone(), b)
                .map(|v| (n.clone(), v))
                .map_err(|e| TrainError::Config(format!("optimizer tensor {n}: {e}")))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let st = safetensors::serialize(views, &None)
        .map_err(|e| TrainError::Config(format!("serializing optimizer state: {e}")))?;
    write_atomic(&tmp.join(OPTIM_FILE), &st)?;
    let mut s = state.clone();
    s.optimizer = Some(opt_meta);
    let json = serde_json::to_vec_pretty(&s).map_err(|e| TrainError::Config(e.to_string()))?;
    // Written last: a checkpoint dir without it is incomplete.
    write_atomic(&tmp.join(STATE_FILE), &json)?;
    if final_dir.exists() {
        std::fs::remove_dir_all(&final_dir).map_err(io(&final_dir))?;
    }
    std::fs::rename(&tmp, &final_dir).map_err(io(&final_dir))?;
    if let Ok(d) = std::fs::File::open(work) {
        let _ = d.sync_all();
    }
    // Keep the two newest: one good fallback if the newest is damaged later.
    let mut all = list_checkpoints(work);
    all.sort();
    let n = all.len();
    for old in all.into_iter().take(n.saturating_sub(2)) {
        let _ = std::fs::remove_dir_all(old);
    }
    Ok(final_dir)
}

fn list_checkpoints(work: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    if let Ok(rd) = std::fs::read_dir(work) {
        for e in rd.flatten() {
            let name = e.file_name();
            if name.to_string_lossy().starts_with(CKPT_PREFIX) && e.path().is_dir() {
                out.push(e.path());
            }
        }
    }
    out
}

struct Loaded<B: Backend> {
    model: Gpt<B>,
    state: TrainState,
    optim: Vec<u8>,
}

fn load_training_checkpoint<B: Backend>(backend: B, dir: &Path) -> Result<Loaded<B>, TrainError> {
    let state_path = dir.join(STATE_FILE);
    let text = std::fs::read(&state_path).map_err(io(&state_path))?;
    let state: TrainState = serde_json::from_slice(&text).map_err(|e| TrainError::Checkpoint {
        path: state_path.clone(),
        reason: e.to_string(),
    })?;
    let (model, _) = load_checkpoint_on(backend, &dir.join("model"))?;
    let optim_path = dir.join(OPTIM_FILE);
    let optim = std::fs::read(&optim_path).map_err(io(&optim_path))?;
    SafeTensors::deserialize(&optim).map_err(|e| TrainError::Checkpoint {
        path: optim_path.clone(),
        reason: e.to_string(),
    })?;
    Ok(Loaded {
        model,
        state,
        optim,
    })
}

fn restore_optimizer<B: Backend>(
    opt: &mut TrainOptimizer<B>,
    meta: &OptimizerMeta,
    bytes: &[u8],
    origin: &Path,
) -> Result<(), TrainError> {
    let st = SafeTensors::deserialize(bytes).map_err(|e| TrainError::Checkpoint {
        path: origin.to_path_buf(),
        reason: e.to_string(),
    })?;
    opt.restore(meta, |name| {
        st.tensor(name)
            .ok()
            .filter(|t| t.dtype() == Dtype::F32)
            .map(|t| {
                t.data()
                    .chunks_exact(4)
                    .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                    .collect()
            })
    })
}

/// Validation bits per byte over `batches` batches: summed nats of the targets that are real
/// text (special tokens, whose byte length is 0, are left out) over their UTF-8 bytes.
pub fn evaluate_bpb<B: Backend>(
    model: &mut Gpt<B>,
    val: &mut dyn BatchSource,
    batches: usize,
    token_bytes: &[u32],
) -> Result<f64, TrainError> {
    bits_per_byte(evaluate_nats_bytes(model, val, batches, token_bytes)?)
}

/// `[nats, bytes]` of [`evaluate_bpb`] before the division (ranks add theirs up first).
fn bits_per_byte([nats, bytes]: [f64; 2]) -> Result<f64, TrainError> {
    if bytes == 0.0 {
        return Err(TrainError::Config(
            "validation batches contain no text bytes".into(),
        ));
    }
    Ok(nats / (std::f64::consts::LN_2 * bytes))
}

/// Summed nats of the real-text targets of `batches` validation batches, and their bytes.
pub fn evaluate_nats_bytes<B: Backend>(
    model: &mut Gpt<B>,
    val: &mut dyn BatchSource,
    batches: usize,
    token_bytes: &[u32],
) -> Result<[f64; 2], TrainError> {
    let mut nats = 0.0f64;
    let mut bytes = 0u64;
    for _ in 0..batches {
        let b = val.next_batch()?;
        let mut targets = b.targets.clone();
        for t in targets.iter_mut() {
            if *t >= 0 {
                let nb = token_bytes.get(*t as usize).copied().unwrap_or(0);
                if nb == 0 {
                    *t = -1;
                } else {
                    bytes += u64::from(nb);
                }
            }
        }
        if targets.iter().all(|&t| t < 0) {
            continue;
        }
        nats += f64::from(model.loss(&b.inputs, &targets, b.b, b.t, Reduction::Sum)?);
    }
    Ok([nats, bytes as f64])
}

/// Greedy continuation of `prompt` (no KV cache: fine for short samples during training).
pub fn greedy_sample<B: Backend>(
    model: &Gpt<B>,
    prompt: &[u32],
    max_new: usize,
) -> Result<Vec<u32>, TrainError> {
    let vocab = model.config().vocab_size;
    let max_len = model.config().sequence_len;
    let mut ids = prompt.to_vec();
    for _ in 0..max_new {
        let start = ids.len().saturating_sub(max_len);
        let window = &ids[start..];
        let logits = model.logits(window, 1, window.len())?;
        let last = &logits[(window.len() - 1) * vocab..window.len() * vocab];
        let mut best = 0usize;
        for (i, &v) in last.iter().enumerate() {
            if v > last[best] {
                best = i;
            }
        }
        ids.push(best as u32);
    }
    Ok(ids[prompt.len()..].to_vec())
}

/// Everything a stage hands the loop.
pub struct TrainJob<'a> {
    /// Loop settings.
    pub cfg: &'a LoopConfig,
    /// Tokens (pretrain/midtrain) or conversations (SFT) in one micro-batch.
    pub units_per_micro: usize,
    /// Tokenizer (samples, bits-per-byte).
    pub tokenizer: &'a Tokenizer,
    /// Work and output dirs.
    pub dirs: RunDirs,
    /// Metadata written into every checkpoint (tokenizer id, parent artifact).
    pub meta: CheckpointMeta,
    /// True once the stage should save and stop (SIGINT/SIGTERM).
    pub interrupted: &'a (dyn Fn() -> bool + Sync),
    /// The ranks this run trains with ([`nanochat_dist::LocalCollective`] for one): gradients
    /// are averaged over them every step, and only rank 0 writes checkpoints and the output.
    pub collective: &'a mut dyn Collective,
    /// Reduce gradients with NCCL on the device when the model is on a CUDA GPU (the unique id
    /// travels over `collective`). Stages set it for CUDA ranks started by a launcher, a world
    /// of one included, so that one GPU runs the code path of many.
    pub nccl: bool,
}

/// Moves `model` (built on the host, so its initialisation is the same on every device) to
/// `cfg.device` and [`train`]s it there. Errors when the device cannot be opened, saying why.
pub fn train_on_device(
    job: TrainJob<'_>,
    model: Gpt,
    make_train: &mut dyn FnMut(Option<PackerState>) -> Result<Box<dyn BatchSource>, TrainError>,
    make_val: &mut dyn FnMut() -> Result<Box<dyn BatchSource>, TrainError>,
) -> Result<Outcome, TrainError> {
    struct Task<'j, 'f> {
        job: TrainJob<'j>,
        model: Gpt,
        make_train:
            &'f mut dyn FnMut(Option<PackerState>) -> Result<Box<dyn BatchSource>, TrainError>,
        make_val: &'f mut dyn FnMut() -> Result<Box<dyn BatchSource>, TrainError>,
    }
    impl nanochat_model::compute::BackendTask for Task<'_, '_> {
        type Output = Result<Outcome, TrainError>;
        fn run<B: Backend>(self, backend: B) -> Self::Output {
            let model = self.model.to_backend(backend)?;
            train(self.job, model, self.make_train, self.make_val)
        }
    }
    let device = job.cfg.device;
    nanochat_model::compute::with_backend(
        device,
        Task {
            job,
            model,
            make_train,
            make_val,
        },
    )
    .map_err(nanochat_model::ModelError::from)?
}

/// Runs (or resumes) training of `model`. `make_train(state)` builds the training batch source
/// at a saved data position (`None`: the start); `make_val()` builds a fresh validation source.
pub fn train<B: Backend>(
    job: TrainJob<'_>,
    model: Gpt<B>,
    make_train: &mut dyn FnMut(Option<PackerState>) -> Result<Box<dyn BatchSource>, TrainError>,
    make_val: &mut dyn FnMut() -> Result<Box<dyn BatchSource>, TrainError>,
) -> Result<Outcome, TrainError> {
    let TrainJob {
        cfg,
        units_per_micro,
        tokenizer,
        dirs,
        meta,
        interrupted,
        collective,
        nccl,
    } = job;
    let run = Run {
        cfg,
        units_per_micro,
        tokenizer,
        dirs,
        meta,
        interrupted,
    };
    // The communicator binds to the current GPU: made here, where the backend's context is.
    let mut comm = if nccl && model.backend().kind() == DeviceKind::Cuda {
        Some(NcclComm::connect(collective)?)
    } else {
        None
    };
    let device = comm.as_mut().map(|c| c as &mut dyn DeviceCollective);
    let result = run.train(collective, device, model, make_train, make_val);
    if let Err(e) = &result {
        // The other ranks would otherwise wait in their next collective until a timeout:
        // tell them now, with this rank's reason (a no-op for a world of one).
        if let Some(c) = comm.as_mut() {
            c.abort();
        }
        collective.abort(&e.to_string());
    }
    result
}

/// [`TrainJob`] without the collective, which [`train`] keeps for the abort on error.
struct Run<'a> {
    cfg: &'a LoopConfig,
    units_per_micro: usize,
    tokenizer: &'a Tokenizer,
    dirs: RunDirs,
    meta: CheckpointMeta,
    interrupted: &'a (dyn Fn() -> bool + Sync),
}

impl Run<'_> {
    fn train<B: Backend>(
        self,
        coll: &mut dyn Collective,
        mut device: Option<&mut dyn DeviceCollective>,
        model: Gpt<B>,
        make_train: &mut dyn FnMut(Option<PackerState>) -> Result<Box<dyn BatchSource>, TrainError>,
        make_val: &mut dyn FnMut() -> Result<Box<dyn BatchSource>, TrainError>,
    ) -> Result<Outcome, TrainError> {
        let job = self;
        let cfg = job.cfg;
        let (rank, world) = (coll.rank(), coll.world_size());
        // Rank 0 alone writes into the shared work dir and the stage output; the others only
        // read the checkpoint it chose.
        let lead = rank == 0;
        let accum = cfg.validate_ranks(job.units_per_micro, world)?;
        if world > 1 {
            tracing::info!(
                rank,
                world,
                collective = coll.backend(),
                micro_batches_per_rank = accum,
                "data-parallel training"
            );
        }
        if lead {
            std::fs::create_dir_all(&job.dirs.work).map_err(io(&job.dirs.work))?;
            std::fs::create_dir_all(&job.dirs.out).map_err(io(&job.dirs.out))?;
        }

        // Resume from the newest checkpoint that loads (rank 0 chooses; every rank loads it).
        let mut model = model;
        let mut state = TrainState::default();
        let mut saved_optim: Option<(Vec<u8>, PathBuf)> = None;
        let mut chosen: Option<PathBuf> = None;
        if lead {
            let mut ckpts = list_checkpoints(&job.dirs.work);
            ckpts.sort();
            for dir in ckpts.iter().rev() {
                match load_training_checkpoint(model.backend().clone(), dir) {
                    Ok(l) => {
                        if l.model.config() != model.config() {
                            return Err(TrainError::Checkpoint {
                                path: dir.clone(),
                                reason: "model config differs from this run's config".into(),
                            });
                        }
                        tracing::info!(step = l.state.step, dir = %dir.display(), "resuming from checkpoint");
                        model = l.model;
                        state = l.state;
                        saved_optim = Some((l.optim, dir.join(OPTIM_FILE)));
                        chosen = Some(dir.clone());
                        break;
                    }
                    Err(e) => {
                        tracing::warn!(dir = %dir.display(), error = %e, "skipping unreadable checkpoint")
                    }
                }
            }
        }
        if world > 1 {
            // The checkpoint's directory name (empty: a fresh start) travels from rank 0.
            let mut name = chosen
                .as_ref()
                .and_then(|d| d.file_name())
                .map(|n| n.to_string_lossy().into_owned().into_bytes())
                .unwrap_or_default();
            coll.broadcast_bytes(&mut name, 0)?;
            if !lead && !name.is_empty() {
                let dir = job.dirs.work.join(String::from_utf8_lossy(&name).as_ref());
                let l = load_training_checkpoint(model.backend().clone(), &dir).map_err(|e| {
                    TrainError::Checkpoint {
                        path: dir.clone(),
                        reason: format!(
                            "rank {rank} cannot load the checkpoint rank 0 resumes from (every rank \
                             needs the same work dir, on a shared filesystem across machines): {e}"
                        ),
                    }
                })?;
                tracing::info!(step = l.state.step, dir = %dir.display(), "resuming from checkpoint");
                model = l.model;
                state = l.state;
                saved_optim = Some((l.optim, dir.join(OPTIM_FILE)));
                chosen = Some(dir);
            }
        }
        if let Some(dir) = &chosen {
            state.data = rank_position(&state, rank, world, dir)?;
        }
        // Same step, config and weights on every rank, or nothing good can come of it.
        check_ranks_agree(coll, &model, &state, cfg)?;

        // A run-time choice, not part of the checkpoint: a resumed run uses this run's setting.
        // The backend may run a bf16 request in f32 where its bf16 matmuls are slower (it says
        // so).
        let precision = agreed_precision(
            coll,
            model.backend().matmul_precision_for(cfg.matmul_precision),
        )?;
        model.set_matmul_precision(precision);
        // The whole bill (gradients, optimizer state, bf16 packs, activations of the largest
        // micro-batch), checked before any of it is allocated.
        let need = nanochat_model::memory::check_training_on(
            model.backend(),
            model.config(),
            cfg.device_batch_size,
            model.config().sequence_len,
            precision,
        )?;
        tracing::info!(
            total_mib = need.total() >> 20,
            activations_mib = need.activations >> 20,
            "memory estimate"
        );
        tracing::info!(device = %model.backend().describe(), "training device");
        let mut opt = if cfg.shards_optimizer(world) {
            let o = ShardedOptimizer::for_model(&model, cfg.optimizer_settings(), rank, world)?;
            let full: usize = model
                .param_specs()
                .iter()
                .map(|s| 3 * s.shape[0] * s.shape[1])
                .sum();
            tracing::info!(
                rank,
                world,
                state_mib = (o.state_elements() * 4) >> 20,
                packed_elements = o.plan().packed_len(),
                "sharded optimizer (of at most {} MiB unsharded)",
                (full * 4) >> 20
            );
            TrainOptimizer::Sharded(o)
        } else {
            TrainOptimizer::Replicated(NanochatOptimizer::for_model(
                &model,
                cfg.optimizer_settings(),
            )?)
        };
        if let Some((bytes, origin)) = &saved_optim {
            let meta = state
                .optimizer
                .clone()
                .ok_or_else(|| TrainError::Checkpoint {
                    path: origin.clone(),
                    reason: "train state lacks optimizer metadata".into(),
                })?;
            restore_optimizer(&mut opt, &meta, bytes, origin)?;
        }

        // Metrics and timings (rank 0's): keep only what the checkpoint covers, so a resumed
        // run's files match an uninterrupted run's.
        let metrics_path = job.dirs.work.join(METRICS_FILE);
        let timing_path = job.dirs.work.join(TIMING_FILE);
        let (mut metrics, mut timings) = if lead {
            (
                Some(reopen_log_at(&metrics_path, state.step)?),
                Some(reopen_log_at(&timing_path, state.step)?),
            )
        } else {
            (None, None)
        };
        let mut log = |m: &MetricsLine| -> Result<(), TrainError> {
            let Some(f) = metrics.as_mut() else {
                return Ok(());
            };
            let line = serde_json::to_string(m).map_err(|e| TrainError::Config(e.to_string()))?;
            writeln!(f, "{line}").map_err(io(&metrics_path))
        };
        let mut log_timing = |t: &TimingLine| -> Result<(), TrainError> {
            let Some(f) = timings.as_mut() else {
                return Ok(());
            };
            let line = serde_json::to_string(t).map_err(|e| TrainError::Config(e.to_string()))?;
            writeln!(f, "{line}").map_err(io(&timing_path))
        };

        let schedule = LrSchedule {
            num_iterations: cfg.num_iterations,
            warmup_ratio: cfg.warmup_ratio,
            warmdown_ratio: cfg.warmdown_ratio,
            final_lr_frac: cfg.final_lr_frac,
        };
        let token_bytes = job.tokenizer.token_bytes().to_vec();
        let flops_per_token = model.config().flops_per_token();
        let mut train_src = make_train(state.data.clone())?;
        let bar = if lead {
            indicatif::ProgressBar::new(cfg.num_iterations)
        } else {
            indicatif::ProgressBar::hidden()
        };
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "{spinner} [{elapsed_precise}] {bar:30} {pos}/{len} steps (eta {eta}) {msg}",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        bar.set_position(state.step);
        let mut last_val: Option<f64> = None;
        let mut grad_host: Vec<f32> = Vec::new();
        // `eval_batches` is the whole evaluation, split over the ranks (nanochat divides its
        // eval tokens by the world size the same way), so N ranks measure what one does.
        let eval_per_rank = cfg.eval_batches.div_ceil(world);

        let mut do_eval = |model: &mut Gpt<B>,
                           coll: &mut dyn Collective,
                           step: u64,
                           state: &mut TrainState|
         -> Result<f64, TrainError> {
            let mut val = make_val()?;
            let mut sums = evaluate_nats_bytes(model, val.as_mut(), eval_per_rank, &token_bytes)?;
            if world > 1 {
                // Every rank evaluated its own slice: the bits and bytes of all of them.
                coll.all_reduce_f64(&mut sums, ReduceOp::Sum)?;
            }
            let bpb = bits_per_byte(sums)?;
            state.min_val_bpb = Some(state.min_val_bpb.map_or(bpb, |m| m.min(bpb)));
            if lead {
                tracing::info!(step, val_bpb = bpb, "validation");
            }
            Ok(bpb)
        };
        let sample = |model: &Gpt<B>, step: u64| -> Result<(), TrainError> {
            // Samples are for the log; the other ranks' would be the same text.
            if !lead {
                return Ok(());
            }
            for p in &cfg.sample_prompts {
                let mut ids = vec![job.tokenizer.bos_id()];
                ids.extend(job.tokenizer.encode(p));
                let out = greedy_sample(model, &ids, cfg.sample_tokens)?;
                tracing::info!(step, "sample: {p}{}", job.tokenizer.decode(&out));
            }
            Ok(())
        };

        while state.step < cfg.num_iterations {
            let mut stop = (job.interrupted)();
            if world > 1 {
                // A signal reaches the ranks at slightly different moments: they stop at the
                // same step when any of them has seen it.
                let mut flag = [f64::from(u8::from(stop))];
                coll.all_reduce_f64(&mut flag, ReduceOp::Sum)?;
                stop = flag[0] > 0.0;
            }
            if stop {
                let dir = save_checkpoint_of_ranks(coll, &job, &model, &mut opt, &state)?;
                if let Some(dir) = dir {
                    tracing::warn!(step = state.step, dir = %dir.display(), "interrupted: checkpoint saved");
                }
                bar.abandon();
                return Ok(Outcome::Interrupted { step: state.step });
            }
            let step = state.step;
            if cfg.eval_every > 0 && step % cfg.eval_every == 0 {
                let bpb = do_eval(&mut model, coll, step, &mut state)?;
                last_val = Some(bpb);
                log(&MetricsLine {
                    step,
                    loss: None,
                    lr_mult: None,
                    grad_norm: None,
                    val_bpb: Some(bpb),
                })?;
            }
            if cfg.sample_every > 0 && step > 0 && step % cfg.sample_every == 0 {
                sample(&model, step)?;
            }

            let t0 = Instant::now();
            model.zero_grad()?;
            let mut loss_sum = 0.0f64;
            let mut tokens = 0usize;
            let mut last_data = None;
            for _ in 0..accum {
                // A batch whose targets are all masked (e.g. SFT rows cut before any assistant
                // token) has no loss; skip it rather than fail the run.
                let mut batch = train_src.next_batch()?;
                let mut skipped = 0;
                while batch.num_targets() == 0 {
                    skipped += 1;
                    if skipped > 1000 {
                        return Err(TrainError::Config(
                            "1000 consecutive batches without a trainable target: check max_tokens and the task data".into(),
                        ));
                    }
                    tracing::warn!(step, "skipping a batch without trainable targets");
                    batch = train_src.next_batch()?;
                }
                let loss = model.forward_backward_scaled(
                    &batch.inputs,
                    &batch.targets,
                    batch.b,
                    batch.t,
                    Reduction::Mean,
                    1.0 / accum as f32,
                )?;
                loss_sum += f64::from(loss);
                tokens += batch.b * batch.t;
                last_data = Some(batch.state);
            }
            // Each rank holds the mean gradient of its micro-batches; their average is the
            // gradient of the whole step's batch (bit-identical on every rank).
            let lrm = schedule.multiplier(step);
            opt.set_muon_momentum(muon_momentum_at(step));
            let (norm, allreduce_seconds) = match &mut opt {
                TrainOptimizer::Replicated(opt) => {
                    let t_comm = Instant::now();
                    all_reduce_gradients(&mut model, coll, device.as_deref_mut(), &mut grad_host)?;
                    let comm = (world > 1).then(|| t_comm.elapsed().as_secs_f64());
                    // Clipping reads the global norm back once; the optimizer step reads
                    // nothing.
                    let norm = if cfg.grad_clip > 0.0 {
                        model.clip_grad_norm(f64::from(cfg.grad_clip))?
                    } else {
                        model.grad_norm()?
                    };
                    opt.step_model(&mut model, lrm as f32)?;
                    (norm, comm)
                }
                TrainOptimizer::Sharded(opt) => {
                    // Reduce-scatter, global norm and clipping, the owned update, all-gather.
                    let s = opt.step(
                        &mut model,
                        coll,
                        device.as_deref_mut(),
                        lrm as f32,
                        cfg.grad_clip,
                    )?;
                    (s.norm, (world > 1).then_some(s.comm_seconds))
                }
            };
            let mut loss = loss_sum / accum as f64;
            if world > 1 {
                let mut sums = [loss, tokens as f64];
                coll.all_reduce_f64(&mut sums, ReduceOp::Sum)?;
                loss = sums[0] / world as f64;
                tokens = sums[1] as usize;
            }
            let dt = t0.elapsed().as_secs_f64();
            state.step += 1;
            state.data = last_data;
            state.train_seconds += dt;
            state.smooth_loss = 0.9 * state.smooth_loss + 0.1 * loss;
            let debiased = state.smooth_loss / (1.0 - 0.9f64.powi(state.step.min(10_000) as i32));
            let tok_per_s = tokens as f64 / dt.max(1e-9);
            let mfu = (cfg.peak_flops > 0.0).then(|| flops_per_token * tok_per_s / cfg.peak_flops);
            bar.set_position(state.step);
            bar.set_message(format!("loss {debiased:.4} | {tok_per_s:.0} tok/s"));
            if cfg.log_every > 0
                && (state.step % cfg.log_every == 0 || state.step == cfg.num_iterations)
            {
                if lead {
                    tracing::debug!(
                        step = state.step,
                        loss,
                        lr_mult = lrm,
                        grad_norm = norm,
                        tok_per_s,
                        "step"
                    );
                }
                log(&MetricsLine {
                    step: state.step,
                    loss: Some(loss),
                    lr_mult: Some(lrm),
                    grad_norm: Some(norm),
                    val_bpb: None,
                })?;
                log_timing(&TimingLine {
                    step: state.step,
                    seconds: dt,
                    tok_per_s,
                    mfu,
                    allreduce_seconds,
                })?;
            }
            if cfg.save_every > 0
                && state.step % cfg.save_every == 0
                && state.step < cfg.num_iterations
            {
                save_checkpoint_of_ranks(coll, &job, &model, &mut opt, &state)?;
            }
            // Fault injection for the crash-resume tests: die without any cleanup after this
            // step (on every rank, or on `NANOCHAT_TEST_ABORT_RANK` only).
            if std::env::var("NANOCHAT_TEST_ABORT_AT_STEP")
                .ok()
                .and_then(|v| v.parse::<u64>().ok())
                == Some(state.step)
                && std::env::var("NANOCHAT_TEST_ABORT_RANK")
                    .ok()
                    .and_then(|v| v.parse::<usize>().ok())
                    .is_none_or(|r| r == rank)
            {
                std::process::abort();
            }
        }
        bar.finish();

        let bpb = do_eval(&mut model, coll, state.step, &mut state)?;
        last_val = Some(bpb).or(last_val);
        log(&MetricsLine {
            step: state.step,
            loss: None,
            lr_mult: None,
            grad_norm: None,
            val_bpb: Some(bpb),
        })?;
        sample(&model, state.step)?;

        let mut meta = job.meta.clone();
        meta.step = state.step;
        meta.loss = Some(state.smooth_loss / (1.0 - 0.9f64.powi(state.step.min(10_000) as i32)));
        let outcome = Outcome::Finished {
            val_bpb: last_val,
            train_loss: meta.loss.unwrap_or(f64::NAN),
        };
        // The replicas must still be one model: a rank that drifted would mean the published
        // weights are not what the others trained.
        check_ranks_agree(coll, &model, &state, cfg)?;
        if !lead {
            // Rank 0 publishes; the stage ends when it has (its failure fails this rank too).
            coll.barrier()?;
            return Ok(outcome);
        }

        // Publish: model checkpoint, metrics, summary.
        save_checkpoint(&model, &job.dirs.out.join("model"), &meta)?;
        // The tokenizer travels with the model so that one artifact is enough to chat with or
        // serve (`nanochat chat --model latest/sft`, `nanochat-run serve --ref latest/sft`).
        job.tokenizer.save(&job.dirs.out.join(TOKENIZER_DIR))?;
        std::fs::copy(&metrics_path, job.dirs.out.join(METRICS_FILE)).map_err(io(&metrics_path))?;
        let summary = serde_json::json!({
            "step": state.step,
            "train_loss": meta.loss,
            "val_bpb": last_val,
            "min_val_bpb": state.min_val_bpb,
            "config": cfg,
        });
        write_atomic(
            &job.dirs.out.join("summary.json"),
            serde_json::to_string_pretty(&summary)
                .map_err(|e| TrainError::Config(e.to_string()))?
                .as_bytes(),
        )?;
        if let Some(run) = &job.dirs.run {
            write_telemetry(
                run,
                &timing_path,
                &state,
                cfg,
                &model.backend().describe(),
                world,
            )?;
        }
        if world > 1 {
            coll.barrier()?;
        }
        Ok(outcome)
    }
}

/// This rank's data position in a checkpoint: `data` for a world of one, else the entry of
/// `rank_data` (a checkpoint of another world size cannot resume: the ranks' slices differ).
fn rank_position(
    state: &TrainState,
    rank: usize,
    world: usize,
    dir: &Path,
) -> Result<Option<PackerState>, TrainError> {
    let saved_world = state.rank_data.len().max(1);
    if saved_world != world {
        return Err(TrainError::Checkpoint {
            path: dir.to_path_buf(),
            reason: format!(
                "written by a run of {saved_world} rank(s), resumed with {world}: each rank's data \
                 slice depends on the world size; resume with {saved_world} or start a fresh work dir"
            ),
        });
    }
    Ok(if world == 1 {
        state.data.clone()
    } else {
        state.rank_data[rank].clone()
    })
}

/// The matmul precision every rank uses: each rank's backend chose from its own calibration,
/// which may land on either side of the threshold on ranks of one machine; replicas must do
/// the same arithmetic, so unless every rank chose bf16, all use f32.
fn agreed_precision(
    coll: &mut dyn Collective,
    mine: MatmulPrecision,
) -> Result<MatmulPrecision, TrainError> {
    if coll.world_size() == 1 {
        return Ok(mine);
    }
    let mut bf16 = [f64::from(u8::from(mine == MatmulPrecision::Bf16))];
    coll.all_reduce_f64(&mut bf16, ReduceOp::Sum)?;
    if bf16[0] as usize == coll.world_size() {
        return Ok(mine);
    }
    if mine == MatmulPrecision::Bf16 {
        tracing::warn!(
            "some ranks calibrated bf16 matmuls as slower than f32: every rank trains in f32"
        );
    }
    Ok(MatmulPrecision::F32)
}

/// A 64-bit fingerprint of the weights, the step and the loop config: what every rank must
/// share. FNV-1a over the f32 bit patterns (one multiply per weight: cheap next to a step).
fn replica_fingerprint<B: Backend>(
    model: &Gpt<B>,
    state: &TrainState,
    cfg: &LoopConfig,
) -> Result<[u64; 3], TrainError> {
    const PRIME: u64 = 0x0000_0100_0000_01b3;
    let mut weights: u64 = 0xcbf2_9ce4_8422_2325;
    for i in 0..model.param_specs().len() {
        for x in model.download_param(i)? {
            weights = (weights ^ u64::from(x.to_bits())).wrapping_mul(PRIME);
        }
    }
    let mut config: u64 = 0xcbf2_9ce4_8422_2325;
    let text = serde_json::to_vec(cfg).map_err(|e| TrainError::Config(e.to_string()))?;
    for b in text {
        config = (config ^ u64::from(b)).wrapping_mul(PRIME);
    }
    Ok([state.step, config, weights])
}

/// Fails on every rank whose step, config or weights differ from rank 0's (nothing to check
/// for a world of one).
fn check_ranks_agree<B: Backend>(
    coll: &mut dyn Collective,
    model: &Gpt<B>,
    state: &TrainState,
    cfg: &LoopConfig,
) -> Result<(), TrainError> {
    if coll.world_size() == 1 {
        return Ok(());
    }
    let mine = replica_fingerprint(model, state, cfg)?;
    let mut bytes: Vec<u8> = mine.iter().flat_map(|v| v.to_le_bytes()).collect();
    coll.broadcast_bytes(&mut bytes, 0)?;
    let theirs: Vec<u64> = bytes
        .chunks_exact(8)
        .map(|c| u64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]))
        .collect();
    let mut bad = Vec::new();
    for (i, what) in ["step", "[train] config", "weights"].iter().enumerate() {
        if theirs.get(i) != Some(&mine[i]) {
            bad.push(*what);
        }
    }
    // Every rank learns whether any rank differs, so they all stop together.
    let mut flag = [if bad.is_empty() { 0.0 } else { 1.0 }];
    coll.all_reduce_f64(&mut flag, ReduceOp::Sum)?;
    if !bad.is_empty() {
        return Err(TrainError::RankMismatch(format!(
            "rank {} has a different {} than rank 0 at step {} (start every rank with the same \
             config and inputs)",
            coll.rank(),
            bad.join(", "),
            state.step
        )));
    }
    if flag[0] > 0.0 {
        return Err(TrainError::RankMismatch(format!(
            "{} rank(s) differ from rank 0 at step {} (their logs say in what)",
            flag[0], state.step
        )));
    }
    Ok(())
}

/// Checkpoints a run of any world size: every rank's data position goes to rank 0, which
/// alone writes (returns the directory there; `None` on the other ranks). The ranks leave
/// together, so none exits while rank 0 is still writing.
fn save_checkpoint_of_ranks<B: Backend>(
    coll: &mut dyn Collective,
    job: &Run<'_>,
    model: &Gpt<B>,
    opt: &mut TrainOptimizer<B>,
    state: &TrainState,
) -> Result<Option<PathBuf>, TrainError> {
    let (rank, world) = (coll.rank(), coll.world_size());
    // With a sharded optimizer every owner's state goes to rank 0 first (a collective).
    let opt_state = opt.checkpoint_state(coll, rank == 0)?;
    let missing = || TrainError::Optimizer("rank 0 has no optimizer state to save".into());
    if world == 1 {
        let opt_state = opt_state.ok_or_else(missing)?;
        return save_training_checkpoint(&job.dirs.work, model, opt_state, state, &job.meta)
            .map(Some);
    }
    let mut positions = Vec::with_capacity(world);
    for r in 0..world {
        let mut bytes = if r == rank {
            serde_json::to_vec(&state.data).map_err(|e| TrainError::Config(e.to_string()))?
        } else {
            Vec::new()
        };
        coll.broadcast_bytes(&mut bytes, r)?;
        let p: Option<PackerState> =
            serde_json::from_slice(&bytes).map_err(|e| TrainError::Config(e.to_string()))?;
        positions.push(p);
    }
    // A cheap guard against replicas drifting apart between checkpoints.
    check_ranks_agree(coll, model, state, job.cfg)?;
    let dir = if rank == 0 {
        let mut s = state.clone();
        s.rank_data = positions;
        Some(save_training_checkpoint(
            &job.dirs.work,
            model,
            opt_state.ok_or_else(missing)?,
            &s,
            &job.meta,
        )?)
    } else {
        None
    };
    coll.barrier()?;
    Ok(dir)
}

#[cfg(test)]
mod tests {
    use super::lines_covered_by_checkpoint;

    #[test]
    fn a_resumed_log_keeps_what_the_checkpoint_covers_and_redoes_its_validation() {
        let log = "{\"step\":0,\"val_bpb\":4.0}\n\
                   {\"step\":1,\"loss\":7.5}\n\
                   {\"step\":2,\"loss\":7.0}\n\
                   {\"step\":2,\"val_bpb\":3.9}\n\
                   {\"step\":3,\"loss\":6.5}\n\
                   torn line\n";
        // Checkpoint at step 2: its training line stays, its validation (logged after the
        // checkpoint) and everything later go.
        assert_eq!(
            lines_covered_by_checkpoint(log, 2),
            "{\"step\":0,\"val_bpb\":4.0}\n{\"step\":1,\"loss\":7.5}\n{\"step\":2,\"loss\":7.0}\n"
        );
        assert_eq!(lines_covered_by_checkpoint(log, 0), "");
    }
}

#[cfg(test)]
mod precision_tests {
    use super::{agreed_precision, MatmulPrecision};
    use nanochat_dist::{Collective, DistError, LocalCollective, ReduceOp};

    /// Rank 0 of two, whose peer chose `peer_bf16`: sums add the peer's vote.
    struct TwoRanks {
        peer_bf16: bool,
    }

    impl Collective for TwoRanks {
        fn rank(&self) -> usize {
            0
        }
        fn world_size(&self) -> usize {
            2
        }
        fn backend(&self) -> &'static str {
            "fake"
        }
        fn all_reduce(&mut self, _: &mut [f32], _: ReduceOp) -> Result<(), DistError> {
            unreachable!("only the precision vote is reduced")
        }
        fn all_reduce_f64(&mut self, buf: &mut [f64], op: ReduceOp) -> Result<(), DistError> {
            assert_eq!(op, ReduceOp::Sum);
            buf[0] += f64::from(u8::from(self.peer_bf16));
            Ok(())
        }
        fn reduce_scatter(
            &mut self,
            _: &mut [f32],
            _: ReduceOp,
        ) -> Result<std::ops::Range<usize>, DistError> {
            unreachable!()
        }
        fn all_gather(&mut self, _: &mut [f32]) -> Result<(), DistError> {
            unreachable!()
        }
        fn broadcast(&mut self, _: &mut [f32], _: usize) -> Result<(), DistError> {
            unreachable!()
        }
        fn broadcast_bytes(&mut self, _: &mut Vec<u8>, _: usize) -> Result<(), DistError> {
            unreachable!()
        }
        fn barrier(&mut self) -> Result<(), DistError> {
            Ok(())
        }
    }

    #[test]
    fn ranks_train_in_bf16_only_when_every_rank_chose_it() {
        let (bf16, f32) = (MatmulPrecision::Bf16, MatmulPrecision::F32);
        let agreed = |mine, peer_bf16| {
            agreed_precision(&mut TwoRanks { peer_bf16 }, mine).expect("fake collective")
        };
        assert_eq!(agreed(bf16, true), bf16);
        assert_eq!(agreed(bf16, false), f32);
        assert_eq!(agreed(f32, true), f32);
        assert_eq!(agreed(f32, false), f32);
        // A world of one keeps its own choice without any collective call.
        assert_eq!(agreed_precision(&mut LocalCollective, bf16).unwrap(), bf16);
    }
}
