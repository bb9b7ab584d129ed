//! Pre-tokenization: cutting text into the pieces that BPE merges never cross.
//!
//! The split patterns of GPT-4 (`cl100k_base`), GPT-2 (`r50k_base`) and nanochat are regular
//! expressions with look-ahead and possessive quantifiers, so they need a backtracking engine
//! (`fancy-regex`), which is the slowest part of encoding and of training. For those known
//! patterns this module runs a hand-written scanner that makes the same cuts in one forward pass
//! (property-tested against `fancy-regex` in `tests/pretokenize_equivalence.rs`). Any other
//! pattern falls back to `fancy-regex`.
//!
//! Character classes (`\p{L}`, `\p{N}`, `\s`) come from `regex-syntax`, the very tables the regex
//! engine uses, so the scanner and the regex agree on every code point of the Unicode version
//! they were built with.

use std::sync::LazyLock;

use crate::Error;

/// nanochat's split pattern: GPT-4's with `\p{N}{1,2}` instead of `\p{N}{1,3}`.
pub const NANOCHAT_PATTERN: &str = r"'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,2}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+";

/// GPT-4's split pattern as it appears in nanochat's rustbpe (default when no pattern is given).
pub const GPT4_PATTERN: &str = r"'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+";

/// The split pattern tiktoken uses for `cl100k_base`.
pub const CL100K_PATTERN: &str = r"'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+| ?[^\s\p{L}\p{N}]++[\r\n]*+|\s++$|\s*[\r\n]|\s+(?!\S)|\s";

/// The split pattern tiktoken uses for `r50k_base` (GPT-2).
pub const R50K_PATTERN: &str =
    r"'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s";

/// The split pattern tiktoken uses for `o200k_base`.
pub const O200K_PATTERN: &str = concat!(
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?",
    "|",
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?",
    "|",
    r"\p{N}{1,3}",
    "|",
    r" ?[^\s\p{L}\p{N}]+[\r\n/]*",
    "|",
    r"\s*[\r\n]+",
    "|",
    r"\s+(?!\S)",
    "|",
    r"\s+",
);

// ---------------------------------------------------------------------------------------------
// Character classes

const LETTER: u8 = 1;
const NUMBER: u8 = 2;
const SPACE: u8 = 4;

/// Class bits for every code point: a flat table for the BMP (64 KiB, one load per character on
/// the hot path) and sorted ranges for the rest (rare in practice).
struct CharClasses {
    bmp: Vec<u8>,
    astral: Vec<(u32, u32, u8)>,
}

static CLASSES: LazyLock<CharClasses> = LazyLock::new(CharClasses::build);

fn unicode_ranges(class: &str) -> Vec<(u32, u32)> {
    use regex_syntax::hir::{Class, HirKind};
    // The class expressions are constants: failing to parse them is a programming error.
    let hir = regex_syntax::parse(class).expect("constant character class parses");
    match hir.kind() {
        HirKind::Class(Class::Unicode(c)) => c
            .ranges()
            .iter()
            .map(|r| (r.start() as u32, r.end() as u32))
            .collect(),
        other => panic!("{class} is not a Unicode class: {other:?}"),
    }
}

impl CharClasses {
    fn build() -> Self {
        let mut bmp = vec![0u8; 0x1_0000];
        let mut astral: Vec<(u32, u32, u8)> = Vec::new();
        for (class, bit) in [(r"\p{L}", LETTER), (r"\p{N}", NUMBER), (r"\s", SPACE)] {
            for (lo, hi) in unicode_ranges(class) {
                for cp in lo..=hi.min(0xFFFF) {
                    bmp[cp as usize] |= bit;
                }
                if hi > 0xFFFF {
                    astral.push((lo.max(0x1_0000), hi, bit));
                }
            }
        }
        // The three classes are disjoint, so the ranges never overlap and a sort is enough.
        astral.sort_unstable();
        CharClasses { bmp, astral }
    }

    #[inline]
    fn of(&self, c: char) -> u8 {
        let cp = c as u32;
        if cp < 0x1_0000 {
            self.bmp[cp as usize]
        } else {
            match self.astral.binary_search_by(|&(lo, hi, _)| {
                if hi < cp {
                    std::cmp::Ordering::Less
                } else if lo > cp {
                    std::cmp::Ordering::Greater
                } else {
                    std::cmp::Ordering::Equal
                }
            }) {
                Ok(i) => self.astral[i].2,
                Err(_) => 0,
            }
        }
    }
}

/// A decoded character with its class bits and UTF-8 length.
#[derive(Clone, Copy)]
struct Ch {
    c: char,
    class: u8,
    len: usize,
}

impl Ch {
    #[inline]
    fn is_letter(self) -> bool {
        self.class & LETTER != 0
    }
    #[inline]
    fn is_number(self) -> bool {
        self.class & NUMBER != 0
    }
    #[inline]
    fn is_space(self) -> bool {
        self.class & SPACE != 0
    }
    /// `[^\s\p{L}\p{N}]`
    #[inline]
    fn is_other(self) -> bool {
        self.class == 0
    }
    #[inline]
    fn is_newline(self) -> bool {
        self.c == '\r' || self.c == '\n'
    }
}

/// Classes of printable ASCII and controls, so the common case never touches the big table.
static ASCII: [u8; 128] = {
    let mut t = [0u8; 128];
    let mut i = 0;
    while i < 128 {
        let b = i as u8;
        t[i] = if b.is_ascii_alphabetic() {
            LETTER
        } else if b.is_ascii_digit() {
            NUMBER
        } else if matches!(b, b' ' | b'\t' | b'\n' | 0x0B | 0x0C | b'\r') {
            SPACE
        } else {
            0
        };
        i += 1;
    }
    t
};

#[inline]
fn char_at(text: &str, pos: usize) -> Option<Ch> {
    let bytes = text.as_bytes();
    let b = *bytes.get(pos)?;
    if b < 0x80 {
        return Some(Ch {
            c: b as char,
            class: ASCII[b as usize],
            len: 1,
        });
    }
    // `pos` is always on a char boundary: the scanner only advances by whole characters.
    let c = text[pos..].chars().next()?;
    Some(Ch {
        c,
        class: CLASSES.of(c),
        len: c.len_utf8(),
    })
}

// ---------------------------------------------------------------------------------------------
// Scanners

/// Which known pattern a scanner reproduces.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Known {
    /// GPT-4 family: contractions (case-insensitive), optional non-letter prefix + letters,
    /// `max_digits` numbers, punctuation runs with trailing newlines, whitespace rules.
    /// `trailing_space_run` is tiktoken's extra `\s++$` alternative in cl100k.
    Gpt4 {
        max_digits: usize,
        trailing_space_run: bool,
    },
    /// GPT-2 family (`r50k_base`).
    Gpt2,
}

/// Cuts text into pre-tokens. Cheap to clone (the regex fallback is reference counted inside).
#[derive(Clone, Debug)]
pub struct Splitter {
    pattern: String,
    engine: Engine,
}

#[derive(Clone, Debug)]
enum Engine {
    Known(Known),
    Regex(fancy_regex::Regex),
}

impl Splitter {
    /// Builds a splitter for `pattern`: the hand-written scanner when the pattern is one of the
    /// known ones, `fancy-regex` otherwise.
    pub fn new(pattern: &str) -> Result<Self, Error> {
        let engine = match known(pattern) {
            Some(k) => Engine::Known(k),
            None => Engine::Regex(Self::compile(pattern)?),
        };
        Ok(Splitter {
            pattern: pattern.to_string(),
            engine,
        })
    }

    /// Always uses `fancy-regex` (the reference the scanners are tested against).
    pub fn new_regex(pattern: &str) -> Result<Self, Error> {
        Ok(Splitter {
            pattern: pattern.to_string(),
            engine: Engine::Regex(Self::compile(pattern)?),
        })
    }

    fn compile(pattern: &str) -> Result<fancy_regex::Regex, Error> {
        fancy_regex::Regex::new(pattern).map_err(|e| Error::Pattern {
            pattern: pattern.to_string(),
            reason: e.to_string(),
        })
    }

    /// The pattern this splitter implements.
    pub fn pattern(&self) -> &str {
        &self.pattern
    }

    /// Whether the fast hand-written scanner is in use.
    pub fn is_native(&self) -> bool {
        matches!(self.engine, Engine::Known(_))
    }

    /// Calls `f` with every piece of `text`, in order. The pieces concatenate to `text`.
    #[inline]
    pub fn for_each_piece<'t>(&self, text: &'t str, mut f: impl FnMut(&'t str)) {
        match &self.engine {
            Engine::Known(k) => {
                let mut pos = 0;
                while pos < text.len() {
                    let end = match *k {
                        Known::Gpt4 {
                            max_digits,
                            trailing_space_run,
                        } => gpt4_next(text, pos, max_digits, trailing_space_run),
                        Known::Gpt2 => gpt2_next(text, pos),
                    };
                    f(&text[pos..end]);
                    pos = end;
                }
            }
            Engine::Regex(re) => {
                let mut last = 0;
                for m in re.find_iter(text) {
                    match m {
                        Ok(m) => {
                            // The known patterns match everywhere; a custom one may skip text,
                            // which is then its own piece so that nothing is ever dropped.
                            if m.start() > last {
                                f(&text[last..m.start()]);
                            }
                            f(m.as_str());
                            last = m.end();
                        }
                        Err(e) => {
                            tracing::warn!(
                                "split pattern failed at byte {last} ({e}); \
                                 treating the rest of the text as one piece"
                            );
                            break;
                        }
                    }
                }
                if last < text.len() {
                    f(&text[last..]);
                }
            }
        }
    }

    /// Collects the pieces of `text` (convenience for tests and tools).
    pub fn pieces<'t>(&self, text: &'t str) -> Vec<&'t str> {
        let mut out = Vec::new();
        self.for_each_piece(text, |p| out.push(p));
        out
    }
}

fn known(pattern: &str) -> Option<Known> {
    match pattern {
        NANOCHAT_PATTERN => Some(Known::Gpt4 {
            max_digits: 2,
            trailing_space_run: false,
        }),
        GPT4_PATTERN => Some(Known::Gpt4 {
            max_digits: 3,
            trailing_space_run: false,
        }),
        CL100K_PATTERN => Some(Known::Gpt4 {
            max_digits: 3,
            trailing_space_run: true,
        }),
        R50K_PATTERN => Some(Known::Gpt2),
        _ => None,
    }
}

/// `(?i:[sdmt])`: case folding also maps U+017F (long s) to `s`.
#[inline]
fn is_contraction_letter_ci(c: char) -> bool {
    matches!(c, 's' | 'S' | 'd' | 'D' | 'm' | 'M' | 't' | 'T' | '\u{17F}')
}

/// Length of a contraction (`'s`, `'ll`, ...) at `pos`, if there is one.
#[inline]
fn contraction(text: &str, pos: usize, case_insensitive: bool) -> Option<usize> {
    let b = text.as_bytes();
    debug_assert_eq!(b[pos], b'\'');
    let c1 = char_at(text, pos + 1)?;
    if case_insensitive {
        if is_contraction_letter_ci(c1.c) {
            return Some(1 + c1.len);
        }
    } else if matches!(c1.c, 's' | 'd' | 'm' | 't') {
        return Some(2);
    }
    let (x, y) = (*b.get(pos + 1)?, *b.get(pos + 2)?);
    let (x, y) = if case_insensitive {
        (x.to_ascii_lowercase(), y.to_ascii_lowercase())
    } else {
        (x, y)
    };
    matches!((x, y), (b'l', b'l') | (b'v', b'e') | (b'r', b'e')).then_some(3)
}

/// End of the maximal run of characters satisfying `pred`, starting at `pos`.
#[inline]
fn run_end(text: &str, mut pos: usize, pred: impl Fn(Ch) -> bool) -> usize {
    while let Some(ch) = char_at(text, pos) {
        if !pred(ch) {
            break;
        }
        pos += ch.len;
    }
    pos
}

/// Whitespace alternatives shared by both families, for a run starting at `pos`:
/// `\s+(?!\S)` then `\s` / `\s+` (the last alternatives are equivalent: they are only reached for
/// a single space before a non-space).
#[inline]
fn space_tail(text: &str, pos: usize, run_end: usize, last_len: usize, first_len: usize) -> usize {
    if run_end == text.len() {
        run_end
    } else if run_end - last_len > pos {
        // Greedy run, backed off by one character so that the look-ahead sees whitespace.
        run_end - last_len
    } else {
        pos + first_len
    }
}

/// One step of the GPT-4 family scanner: the end of the piece starting at `pos`.
fn gpt4_next(text: &str, pos: usize, max_digits: usize, trailing_space_run: bool) -> usize {
    // The caller guarantees pos < len.
    let Some(c) = char_at(text, pos) else {
        return text.len();
    };

    // '(?i:[sdmt]|ll|ve|re)
    if c.c == '\'' {
        if let Some(n) = contraction(text, pos, true) {
            return pos + n;
        }
    }

    // [^\r\n\p{L}\p{N}]?+\p{L}+
    if c.is_letter() {
        return run_end(text, pos + c.len, Ch::is_letter);
    }
    if !c.is_number() && !c.is_newline() {
        if let Some(next) = char_at(text, pos + c.len) {
            if next.is_letter() {
                return run_end(text, pos + c.len + next.len, Ch::is_letter);
            }
        }
    }

    // \p{N}{1,k}
    if c.is_number() {
        let mut end = pos + c.len;
        let mut n = 1;
        while n < max_digits {
            match char_at(text, end) {
                Some(d) if d.is_number() => {
                    end += d.len;
                    n += 1;
                }
                _ => break,
            }
        }
        return end;
    }

    // ' ?[^\s\p{L}\p{N}]++[\r\n]*'
    let punct_start = if c.is_other() {
        Some(pos)
    } else if c.c == ' ' {
        match char_at(text, pos + 1) {
            Some(next) if next.is_other() => Some(pos + 1),
            _ => None,
        }
    } else {
        None
    };
    if let Some(start) = punct_start {
        let end = run_end(text, start, Ch::is_other);
        return run_end(text, end, Ch::is_newline);
    }

    // Only whitespace is left.
    debug_assert!(c.is_space());
    let mut end = pos;
    let mut last_newline_end = None;
    let mut last_len = 0;
    while let Some(s) = char_at(text, end) {
        if !s.is_space() {
            break;
        }
        end += s.len;
        last_len = s.len;
        if s.is_newline() {
            last_newline_end = Some(end);
        }
    }
    // \s++$ (cl100k only)
    if trailing_space_run && end == text.len() {
        return end;
    }
    // \s*[\r\n]: greedy whitespace backed off to the last newline of the run.
    if let Some(nl_end) = last_newline_end {
        return nl_end;
    }
    space_tail(text, pos, end, last_len, c.len)
}

/// One step of the GPT-2 (`r50k_base`) scanner.
fn gpt2_next(text: &str, pos: usize) -> usize {
    let Some(c) = char_at(text, pos) else {
        return text.len();
    };
    if c.c == '\'' {
        if let Some(n) = contraction(text, pos, false) {
            return pos + n;
        }
    }
    // ' ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++'
    let (start, first) = if c.c == ' ' {
        match char_at(text, pos + 1) {
            Some(next) if !next.is_space() => (pos + 1, next),
            _ => (pos, c),
        }
    } else {
        (pos, c)
    };
    if first.is_letter() {
        return run_end(text, start + first.len, Ch::is_letter);
    }
    if first.is_number() {
        return run_end(text, start + first.len, Ch::is_number);
    }
    if first.is_other() {
        return run_end(text, start + first.len, Ch::is_other);
    }
    // Whitespace: \s++$ | \s+(?!\S) | \s
    let mut end = pos;
    let mut last_len = 0;
    while let Some(s) = char_at(text, end) {
        if !s.is_space() {
            break;
        }
        end += s.len;
        last_len = s.len;
    }
    space_tail(text, pos, end, last_len, c.len)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn both(pattern: &str, text: &str) {
        let fast = Splitter::new(pattern).unwrap();
        assert!(fast.is_native());
        let slow = Splitter::new_regex(pattern).unwrap();
        assert_eq!(fast.pieces(text), slow.pieces(text), "text {text:?}");
    }

    #[test]
    fn known_patterns_use_the_scanner() {
        for p in [NANOCHAT_PATTERN, GPT4_PATTERN, CL100K_PATTERN, R50K_PATTERN] {
            assert!(Splitter::new(p).unwrap().is_native());
        }
        assert!(!Splitter::new(O200K_PATTERN).unwrap().is_native());
    }

    #[test]
    fn scanner_matches_regex_on_tricky_cases() {
        let cases = [
            "Hello world! It's 12345 o'clock, DON'T we'LL  \n\n  go?\r\n",
            "  leading and trailing  ",
            " \n",
            "a \n  ",
            "x\t\ty  z",
            "((foo)) ...bar\n\n\nbaz",
            "'s's'S'\u{17F} 'sure 'LL 've",
            "数字١٢٣٤ and ½ ⅓ 𝟙𝟚𝟛",
            "emoji 🌍🌍 x🌍y \u{85}\u{2028} \u{a0}a",
            "",
            "'",
            " ",
            "\n",
            "1 2  3   4",
        ];
        for p in [NANOCHAT_PATTERN, GPT4_PATTERN, CL100K_PATTERN, R50K_PATTERN] {
            for t in cases {
                both(p, t);
            }
        }
    }
}
