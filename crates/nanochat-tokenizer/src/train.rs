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
    counts: FxHashMap<Box<str>, i64>,
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
            counts: FxHashMap::default(),
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

        // One contiguous slice of documents per worker; each counts into a map that borrows the
        // pieces, so only pieces new to the global map are ever copied.
        let workers = rayon::current_num_threads().max(1);
        let per = docs.len().div_ceil(workers * 4).max(1);
        let splitter = &self.splitter;
        let locals: Vec<FxHashMap<&str, i64>> = docs
            .par_chunks(per)
            .map(|chunk| {
                let mut m: FxHashMap<&str, i64> = FxHashMap::default();
                for d in chunk {
                    splitter.for_each_piece(d, |p| *m.entry(p).or_insert(0) += 1);
                }
                m
            })
            .collect();
        for local in locals {
            for (piece, n) in local {
                match self.counts.get_mut(piece) {
                    Some(c) => *c += n,
                    None => {
                        self.counts.insert(piece.into(), n);
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
            unique_pieces: self.counts.len(),
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
    start: Vec<u32>,
    len: Vec<u32>,
    count: Vec<i64>,
}

/// Greedy BPE on counted pieces; returns the merged pairs in order (merge i creates id 256 + i).
fn learn_merges(counts: FxHashMap<Box<str>, i64>, num_merges: usize) -> Vec<(u32, u32)> {
    // Materialise the words. Their order does not affect the result (counts are summed), but a
    // sorted order keeps memory access patterns and runs reproducible.
    let mut pieces: Vec<(Box<str>, i64)> = counts.into_iter().collect();
    pieces.par_sort_unstable_by(|a, b| a.0.cmp(&b.0));
    let total: usize = pieces.iter().map(|p| p.0.len()).sum();
    let mut words = Words {
        ids: Vec::with_capacity(total),
        start: Vec::with_capacity(pieces.len()),
        len: Vec::with_capacity(pieces.len()),
        count: Vec::with_capacity(pieces.len()),
    };
    for (p, c) in &pieces {
        words.start.push(words.ids.len() as u32);
        words.len.push(p.len() as u32);
        words.count.push(*c);
        words.ids.extend(p.bytes().map(u32::from));
    }
    drop(pieces);

    // Initial pair counts and, per pair, the words containing it (in parallel over word ranges).
    let n_words = words.start.len();
    let workers = rayon::current_num_threads().max(1);
    let per = n_words.div_ceil(workers).max(1);
    type Local = (FxHashMap<u64, i64>, FxHashMap<u64, Vec<u32>>);
    let locals: Vec<Local> = (0..n_words)
        .step_by(per)
        .collect::<Vec<_>>()
        .into_par_iter()
        .map(|lo| {
            let hi = (lo + per).min(n_words);
            let mut pc: FxHashMap<u64, i64> = FxHashMap::default();
            let mut wh: FxHashMap<u64, Vec<u32>> = FxHashMap::default();
            for w in lo..hi {
                let s = words.start[w] as usize;
                let ids = &words.ids[s..s + words.len[w] as usize];
                let c = words.count[w];
                for pair in ids.windows(2) {
                    let key = pack(pair[0], pair[1]);
                    *pc.entry(key).or_insert(0) += c;
                    let v = wh.entry(key).or_default();
                    if v.last() != Some(&(w as u32)) {
                        v.push(w as u32);
                    }
                }
            }
            (pc, wh)
        })
        .collect();
    let mut pair_counts: FxHashMap<u64, i64> = FxHashMap::default();
    let mut where_: FxHashMap<u64, Vec<u32>> = FxHashMap::default();
    for (pc, wh) in locals {
        for (k, c) in pc {
            *pair_counts.entry(k).or_insert(0) += c;
        }
        for (k, v) in wh {
            where_.entry(k).or_default().extend(v);
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
    let mut fresh: FxHashMap<u64, Vec<u32>> = FxHashMap::default();
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
        for (p, ws) in fresh.drain() {
            let c = pair_counts.get(&p).copied().unwrap_or(0);
            if c > 0 {
                heap.push((c, Reverse(p)));
                where_.insert(p, ws);
            }
        }
        if merges.len() % 4096 == 0 {
            tracing::debug!(merges = merges.len(), count, "merging");
        }
    }
    merges
}

/// Replaces every non-overlapping (left to right) occurrence of `(a, b)` in word `w` by
/// `new_id`, updating pair counts and recording the words where new pairs appeared.
#[inline]
fn merge_word(
    words: &mut Words,
    w: u32,
    a: u32,
    b: u32,
    new_id: u32,
    pair_counts: &mut FxHashMap<u64, i64>,
    fresh: &mut FxHashMap<u64, Vec<u32>>,
) {
    let s = words.start[w as usize] as usize;
    let n = words.len[w as usize] as usize;
    let c = words.count[w as usize];
    let ids = &mut words.ids[s..s + n];
    let mut bump = |p: u64, d: i64| *pair_counts.entry(p).or_insert(0) += d;
    let mut note = |p: u64| {
        let v = fresh.entry(p).or_default();
        if v.last() != Some(&w) {
            v.push(w);
        }
    };
    let mut read = 0;
    let mut write = 0;
    while read < n {
        if read + 1 < n && ids[read] == a && ids[read + 1] == b {
            if write > 0 {
                let left = ids[write - 1];
                bump(pack(left, a), -c);
                bump(pack(left, new_id), c);
                note(pack(left, new_id));
            }
            bump(pack(a, b), -c);
            if read + 2 < n {
                let right = ids[read + 2];
                bump(pack(b, right), -c);
                bump(pack(new_id, right), c);
                note(pack(new_id, right));
            }
            ids[write] = new_id;
            read += 2;
        } else {
            ids[write] = ids[read];
            read += 1;
        }
        write += 1;
    }
    words.len[w as usize] = write as u32;
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
