//! BPE training, merge for merge identical to nanochat's rustbpe.
//!
//! Two phases:
//! 1. Counting: documents are buffered in batches, cut into pre-tokens in parallel and the
//!    pre-token counts merged into one map. Only the map stays in memory, so the corpus streams.
//! 2. Merging: every unique pre-token becomes a "word" of byte ids. Each step merges the pair
//!    with the highest total count, ties going to the smallest `(left, right)` pair — the order
//!    rustbpe's max-heap defines. Counts are kept incrementally: a merge only visits the words
//!    that contain the pair, and a lazily refreshed heap finds the next best pair.
//!
//! The result depends only on the multiset of pre-tokens, so it is the same for any thread
//! count or batch size.

use std::cmp::Reverse;
use std::collections::BinaryHeap;

use rayon::prelude::*;
use rustc_hash::FxHashMap;

use crate::pretokenize::Splitter;
use crate::Error;

/// Documents are counted in batches of about this many bytes (bounded memory, enough work to
/// keep every thread busy).
const BATCH_BYTES: usize = 8 << 20;

/// Accumulates pre-token counts from streamed documents, then learns the merges.
pub struct BpeTrainer {
    splitter: Splitter,
    counts: PieceCounts<Box<str>>,
    pending: Vec<String>,
    pending_bytes: usize,
    documents: u64,
    bytes: u64,
}

/// What training saw, for logs and reports.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct TrainStats {
    /// Documents counted.
    pub documents: u64,
    /// UTF-8 bytes counted.
    pub bytes: u64,
    /// Distinct pre-tokens.
    pub unique_pieces: usize,
    /// Merges learned (may be fewer than asked when the corpus runs out of pairs).
    pub merges: usize,
}

impl BpeTrainer {
    /// A trainer splitting text with `pattern`.
    pub fn new(pattern: &str) -> Result<Self, Error> {
        Ok(BpeTrainer {
            splitter: Splitter::new(pattern)?,
            counts: PieceCounts::default(),
            pending: Vec::new(),
            pending_bytes: 0,
            documents: 0,
            bytes: 0,
        })
    }

    /// Adds one document (counted when the current batch fills up, or at [`BpeTrainer::finish`]).
    pub fn add_document(&mut self, text: String) {
        self.pending_bytes += text.len();
        self.pending.push(text);
        if self.pending_bytes >= BATCH_BYTES {
            self.flush();
        }
    }

    /// Adds every document of an iterator.
    pub fn add_documents<I: IntoIterator<Item = String>>(&mut self, docs: I) {
        for d in docs {
            self.add_document(d);
        }
    }

    /// Counts the buffered documents.
    fn flush(&mut self) {
        if self.pending.is_empty() {
            return;
        }
        let docs = std::mem::take(&mut self.pending);
        self.documents += docs.len() as u64;
        self.bytes += self.pending_bytes as u64;
        self.pending_bytes = 0;

        // A few contiguous slices of documents per worker; each counts into a map that borrows
        // the pieces, so only pieces new to the global map are ever copied.
        let workers = rayon::current_num_threads().max(1);
        let per = docs.len().div_ceil(workers * 2).max(1);
        let splitter = &self.splitter;
        let locals: Vec<PieceCounts<&str>> = docs
            .par_chunks(per)
            .map(|chunk| {
                let mut m = PieceCounts::default();
                for d in chunk {
                    splitter.for_each_piece(d, |p| m.add(p, 1));
                }
                m
            })
            .collect();
        for local in locals {
            for (k, n) in local.short {
                *self.counts.short.entry(k).or_insert(0) += n;
            }
            for (piece, n) in local.long {
                match self.counts.long.get_mut(piece) {
                    Some(c) => *c += n,
                    None => {
                        self.counts.long.insert(piece.into(), n);
                    }
                }
            }
        }
    }

    /// Learns merges until there are `vocab_size` mergeable tokens (256 bytes + merges).
    /// Returns the token bytes in id order and what training saw.
    pub fn finish(mut self, vocab_size: u32) -> Result<(Vec<Vec<u8>>, TrainStats), Error> {
        if vocab_size < 256 {
            return Err(Error::Train(format!(
                "vocab_size (without specials) must be at least 256, got {vocab_size}"
            )));
        }
        self.flush();
        let mut stats = TrainStats {
            documents: self.documents,
            bytes: self.bytes,
            unique_pieces: self.counts.short.len() + self.counts.long.len(),
            merges: 0,
        };
        tracing::info!(
            documents = stats.documents,
            bytes = stats.bytes,
            unique_pieces = stats.unique_pieces,
            "counted pre-tokens; learning {} merges",
            vocab_size - 256
        );
        let merges = learn_merges(self.counts, (vocab_size - 256) as usize);
        stats.merges = merges.len();
        let mut tokens: Vec<Vec<u8>> = (0..=255u8).map(|b| vec![b]).collect();
        for (a, b) in merges {
            let mut t = tokens[a as usize].clone();
            t.extend_from_slice(&tokens[b as usize]);
            tokens.push(t);
        }
        Ok((tokens, stats))
    }
}

/// Pre-token counts. Pieces of up to 15 bytes (nearly all) are packed with their length into a
/// `u128` key, which hashes and compares without touching the text; longer ones are keyed by
/// the text itself.
struct PieceCounts<K> {
    short: FxHashMap<u128, i64>,
    long: FxHashMap<K, i64>,
}

impl<K> Default for PieceCounts<K> {
    fn default() -> Self {
        PieceCounts {
            short: FxHashMap::default(),
            long: FxHashMap::default(),
        }
    }
}

const SHORT_PIECE: usize = 15;

#[inline]
fn pack_piece(bytes: &[u8]) -> u128 {
    let mut buf = [0u8; 16];
    buf[..bytes.len()].copy_from_slice(bytes);
    buf[15] = bytes.len() as u8;
    u128::from_le_bytes(buf)
}

#[inline]
fn unpack_piece(key: &u128) -> ([u8; 16], usize) {
    let buf = key.to_le_bytes();
    (buf, buf[15] as usize)
}

impl<'a> PieceCounts<&'a str> {
    #[inline]
    fn add(&mut self, piece: &'a str, n: i64) {
        if piece.len() <= SHORT_PIECE {
            *self.short.entry(pack_piece(piece.as_bytes())).or_insert(0) += n;
        } else {
            *self.long.entry(piece).or_insert(0) += n;
        }
    }
}

#[inline]
fn pack(a: u32, b: u32) -> u64 {
    ((a as u64) << 32) | b as u64
}

#[inline]
fn unpack(p: u64) -> (u32, u32) {
    ((p >> 32) as u32, p as u32)
}

/// The words (unique pre-tokens as id sequences) in one arena. A word only ever shrinks, so it
/// is rewritten in place and `len` tracks its current length.
struct Words {
    ids: Vec<u32>,
    meta: Vec<WordMeta>,
}

/// Where a word lives in the arena, and how often it occurs; one cache line fetch per word.
#[derive(Clone, Copy)]
struct WordMeta {
    start: u32,
    len: u32,
    count: i64,
}

/// Greedy BPE on counted pieces; returns the merged pairs in order (merge i creates id 256 + i).
fn learn_merges(counts: PieceCounts<Box<str>>, num_merges: usize) -> Vec<(u32, u32)> {
    // Materialise the words. Their order does not affect the result (counts are summed).
    let n = counts.short.len() + counts.long.len();
    let mut words = Words {
        ids: Vec::with_capacity(n * 8),
        meta: Vec::with_capacity(n),
    };
    let mut push = |p: &[u8], count: i64| {
        // Single-byte words hold no pair: they can never take part in a merge.
        if p.len() >= 2 {
            words.meta.push(WordMeta {
                start: words.ids.len() as u32,
                len: p.len() as u32,
                count,
            });
            words.ids.extend(p.iter().map(|&b| u32::from(b)));
        }
    };
    // Sorted words put similar words (shared prefixes, hence shared pairs) next to each other,
    // so the word lists of a pair are clustered in memory: measurably fewer cache misses in the
    // merge loop than hash-map order.
    let mut sorted: Vec<(&[u8], i64)> = Vec::with_capacity(n);
    let short_keys: Vec<([u8; 16], i64)> = counts
        .short
        .iter()
        .map(|(k, c)| (unpack_piece(k).0, *c))
        .collect();
    sorted.extend(short_keys.iter().map(|(b, c)| (&b[..b[15] as usize], *c)));
    sorted.extend(counts.long.iter().map(|(p, c)| (p.as_bytes(), *c)));
    sorted.par_sort_unstable();
    for (p, c) in sorted {
        push(p, c);
    }
    drop(counts);

    // Initial pair counts and, per pair, the words containing it (in parallel over word ranges).
    let n_words = words.meta.len();
    let workers = rayon::current_num_threads().max(1);
    let per = n_words.div_ceil(workers).max(1);
    let locals: Vec<FxHashMap<u64, Fresh>> = (0..n_words)
        .step_by(per)
        .collect::<Vec<_>>()
        .into_par_iter()
        .map(|lo| {
            let hi = (lo + per).min(n_words);
            let mut local: FxHashMap<u64, Fresh> = FxHashMap::default();
            for w in lo..hi {
                let m = words.meta[w];
                let ids = &words.ids[m.start as usize..(m.start + m.len) as usize];
                let c = m.count;
                for pair in ids.windows(2) {
                    local
                        .entry(pack(pair[0], pair[1]))
                        .or_default()
                        .add(w as u32, c);
                }
            }
            local
        })
        .collect();
    let mut pair_counts: FxHashMap<u64, i64> = FxHashMap::default();
    let mut where_: FxHashMap<u64, Vec<u32>> = FxHashMap::default();
    for local in locals {
        for (k, f) in local {
            *pair_counts.entry(k).or_insert(0) += f.count;
            where_.entry(k).or_default().extend(f.words);
        }
    }

    // Max-heap on (count, smallest pair first). Entries go stale when counts drop; they are
    // refreshed when they surface (counts never grow after a pair is created).
    let mut heap: BinaryHeap<(i64, Reverse<u64>)> = pair_counts
        .iter()
        .filter(|(_, &c)| c > 0)
        .map(|(&k, &c)| (c, Reverse(k)))
        .collect();

    let mut merges = Vec::with_capacity(num_merges);
    let mut fresh: FxHashMap<u64, Fresh> = FxHashMap::default();
    while merges.len() < num_merges {
        let Some((count, Reverse(pair))) = heap.pop() else {
            break;
        };
        let current = pair_counts.get(&pair).copied().unwrap_or(0);
        if current != count {
            if current > 0 {
                heap.push((current, Reverse(pair)));
            }
            continue;
        }
        let (a, b) = unpack(pair);
        let new_id = 256 + merges.len() as u32;
        merges.push((a, b));

        let positions = where_.remove(&pair).unwrap_or_default();
        for &w in &positions {
            merge_word(&mut words, w, a, b, new_id, &mut pair_counts, &mut fresh);
        }
        // Every occurrence of the pair was merged away.
        pair_counts.remove(&pair);
        for (p, f) in fresh.drain() {
            if f.count > 0 {
                pair_counts.insert(p, f.count);
                heap.push((f.count, Reverse(p)));
                where_.insert(p, f.words);
            }
        }
    }
    merges
}

/// Count and containing words of a pair, gathered while scanning.
#[derive(Default)]
struct Fresh {
    count: i64,
    words: Vec<u32>,
}

impl Fresh {
    #[inline]
    fn add(&mut self, w: u32, c: i64) {
        self.count += c;
        // A word's pairs are visited together, so checking the last entry removes duplicates.
        if self.words.last() != Some(&w) {
            self.words.push(w);
        }
    }
}

/// Replaces every non-overlapping (left to right) occurrence of `(a, b)` in word `w` by
/// `new_id`. Counts of existing pairs are updated in `pair_counts`; pairs with `new_id` (which
/// exist nowhere else yet) are gathered in `fresh`.
#[inline]
fn merge_word(
    words: &mut Words,
    w: u32,
    a: u32,
    b: u32,
    new_id: u32,
    pair_counts: &mut FxHashMap<u64, i64>,
    fresh: &mut FxHashMap<u64, Fresh>,
) {
    let m = words.meta[w as usize];
    let n = m.len as usize;
    let c = m.count;
    let ids = &mut words.ids[m.start as usize..m.start as usize + n];
    let ab = pack(a, b);
    let mut drop_pair = |p: u64| {
        // The merged pair itself is removed wholesale afterwards.
        if p != ab {
            if let Some(x) = pair_counts.get_mut(&p) {
                *x -= c;
            }
        }
    };
    let mut read = 0;
    let mut write = 0;
    while read < n {
        if read + 1 < n && ids[read] == a && ids[read + 1] == b {
            if write > 0 {
                let left = ids[write - 1];
                if left == new_id {
                    // (new, a) was counted as fresh by the previous merge in this word.
                    fresh.entry(pack(new_id, a)).or_default().count -= c;
                } else {
                    drop_pair(pack(left, a));
                }
                fresh.entry(pack(left, new_id)).or_default().add(w, c);
            }
            if read + 2 < n {
                let right = ids[read + 2];
                drop_pair(pack(b, right));
                fresh.entry(pack(new_id, right)).or_default().add(w, c);
            }
            ids[write] = new_id;
            read += 2;
        } else {
            ids[write] = ids[read];
            read += 1;
        }
        write += 1;
    }
    words.meta[w as usize].len = write as u32;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn train(docs: &[&str], vocab: u32) -> Vec<Vec<u8>> {
        let mut t = BpeTrainer::new(crate::NANOCHAT_PATTERN).unwrap();
        t.add_documents(docs.iter().map(|s| s.to_string()));
        t.finish(vocab).unwrap().0
    }

    #[test]
    fn most_frequent_pair_first_smallest_on_ties() {
        // "aaab" x3: pairs (a,a)=2*3, (a,b)=1*3 -> (a,a) first.
        let toks = train(&["aaab aaab aaab"], 257);
        assert_eq!(toks[256], b"aa");
        // Tie between (c,d) and (a,b): (a,b) is the smaller pair.
        let toks = train(&["cd", "ab"], 257);
        assert_eq!(toks[256], b"ab");
    }

    #[test]
    fn overlapping_runs_merge_left_to_right() {
        let toks = train(&["aaaa"], 258);
        assert_eq!(toks[256], b"aa");
        assert_eq!(toks[257], b"aaaa");
    }

    #[test]
    fn stops_when_pairs_run_out() {
        let mut t = BpeTrainer::new(crate::NANOCHAT_PATTERN).unwrap();
        t.add_document("ab".into());
        let (toks, stats) = t.finish(1000).unwrap();
        assert_eq!(toks.len(), 257);
        assert_eq!(stats.merges, 1);
        assert!(BpeTrainer::new(crate::NANOCHAT_PATTERN)
            .unwrap()
            .finish(100)
            .is_err());
    }
}

/// Settings of a nanochat tokenizer training run (nanochat's `tok_train.py` arguments).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TrainOptions {
    /// Total vocabulary, nanochat's 9 special tokens included.
    pub vocab_size: u32,
    /// Stop after the document that takes the character count past this.
    pub max_chars: u64,
    /// Cut every document to this many characters.
    pub doc_cap: usize,
    /// Split pattern.
    pub pattern: String,
}

impl Default for TrainOptions {
    fn default() -> Self {
        TrainOptions {
            vocab_size: 65536,
            max_chars: 10_000_000_000,
            doc_cap: 10_000,
            pattern: crate::NANOCHAT_PATTERN.to_string(),
        }
    }
}

/// Trains a nanochat tokenizer (ranks + its 9 specials appended) on streamed documents, with
/// `doc_cap` and `max_chars` applied as nanochat's `tok_train.py` does.
pub fn train_nanochat<I>(
    docs: I,
    opts: &TrainOptions,
) -> Result<(crate::Tokenizer, TrainStats), Error>
where
    I: IntoIterator<Item = Result<String, Error>>,
{
    let specials = crate::NANOCHAT_SPECIALS.len() as u32;
    let ranks = opts
        .vocab_size
        .checked_sub(specials)
        .filter(|&r| r >= 256)
        .ok_or_else(|| {
            Error::Train(format!(
                "vocab_size must be at least {} (256 bytes + {specials} specials), got {}",
                256 + specials,
                opts.vocab_size
            ))
        })?;
    let mut trainer = BpeTrainer::new(&opts.pattern)?;
    let mut chars = 0u64;
    for doc in docs {
        let mut doc = doc?;
        crate::corpus::cap_chars(&mut doc, opts.doc_cap);
        chars += doc.chars().count() as u64;
        trainer.add_document(doc);
        if chars > opts.max_chars {
            break;
        }
    }
    let (tokens, stats) = trainer.finish(ranks)?;
    let specials: Vec<&str> = crate::NANOCHAT_SPECIALS.to_vec();
    let tok =
        crate::Tokenizer::with_appended_specials("nanochat", tokens, &opts.pattern, &specials)?;
    Ok((tok, stats))
}
