//! Byte-pair merging of one pre-token over a rank table, with tiktoken's semantics: repeatedly
//! merge the adjacent pair whose concatenation has the lowest rank (leftmost on ties) until no
//! adjacent concatenation is in the table.

use std::cmp::Reverse;
use std::collections::BinaryHeap;

use rustc_hash::FxHashMap;

/// Token bytes → rank (= id) for the mergeable (non-special) tokens.
///
/// Lookups dominate encoding time, and almost all of them are for short byte strings (the pairs
/// tried while merging, and most whole words). Those are packed with their length into a `u128`
/// key: hashing is two multiplies and equality one compare, with no pointer chasing or memcmp.
/// Tokens of 16 bytes or more live in a second map keyed by their bytes.
#[derive(Clone, Default)]
pub(crate) struct RankMap {
    short: FxHashMap<u128, u32>,
    long: FxHashMap<Box<[u8]>, u32>,
    bytes: Vec<u32>,
}

const SHORT_MAX: usize = 15;

#[inline]
fn short_key(bytes: &[u8]) -> u128 {
    let mut buf = [0u8; 16];
    buf[..bytes.len()].copy_from_slice(bytes);
    buf[15] = bytes.len() as u8;
    u128::from_le_bytes(buf)
}

impl RankMap {
    /// Inserts a token; returns the previous id of the same bytes, if any.
    pub(crate) fn insert(&mut self, bytes: &[u8], id: u32) -> Option<u32> {
        if let [b] = bytes {
            self.bytes.resize(256, NONE);
            self.bytes[*b as usize] = id;
        }
        if bytes.len() <= SHORT_MAX {
            self.short.insert(short_key(bytes), id)
        } else {
            self.long.insert(bytes.into(), id)
        }
    }

    /// The id of `bytes`, if it is a token.
    #[inline]
    pub(crate) fn get(&self, bytes: &[u8]) -> Option<u32> {
        if bytes.len() <= SHORT_MAX {
            self.short.get(&short_key(bytes)).copied()
        } else {
            self.long.get(bytes).copied()
        }
    }

    /// The id of a single byte (callers ensure all 256 are present).
    #[inline]
    pub(crate) fn byte_id(&self, b: u8) -> u32 {
        self.bytes.get(b as usize).copied().unwrap_or(NONE)
    }

    /// Number of tokens.
    pub(crate) fn len(&self) -> usize {
        self.short.len() + self.long.len()
    }

    pub(crate) fn reserve(&mut self, n: usize) {
        self.short.reserve(n);
    }
}

const NONE: u32 = u32::MAX;

/// Pieces up to this many bytes use the quadratic scan (cache friendly, no allocation beyond
/// one small vector); longer ones use a heap so that pathological inputs stay O(n log n).
const SCAN_LIMIT: usize = 128;

#[inline]
fn rank_of(ranks: &RankMap, bytes: &[u8]) -> u32 {
    ranks.get(bytes).unwrap_or(NONE)
}

/// Appends the ids of `piece` to `out`.
#[inline]
pub(crate) fn encode_piece(ranks: &RankMap, piece: &[u8], out: &mut Vec<u32>) {
    // Most pieces are whole tokens: one lookup and done.
    if let Some(id) = ranks.get(piece) {
        out.push(id);
        return;
    }
    if piece.len() <= SCAN_LIMIT {
        merge_scan(ranks, piece, out)
    } else {
        merge_heap(ranks, piece, out)
    }
}

/// Quadratic merge on the stack. Part i spans `bounds[i]..bounds[i + 1]` and has id
/// `part_id[i]`; `pair_rank[i]` is the rank of parts i and i+1 joined (NONE if not a token).
/// Joined parts are tokens whose id is that rank, so ids never need a second lookup.
fn merge_scan(ranks: &RankMap, piece: &[u8], out: &mut Vec<u32>) {
    let n = piece.len();
    debug_assert!(n <= SCAN_LIMIT);
    let mut bounds = [0u8; SCAN_LIMIT + 1];
    let mut part_id = [0u32; SCAN_LIMIT];
    let mut pair_rank = [NONE; SCAN_LIMIT];
    for i in 0..n {
        bounds[i] = i as u8;
        part_id[i] = ranks.byte_id(piece[i]);
    }
    bounds[n] = n as u8;
    for i in 0..n.saturating_sub(1) {
        pair_rank[i] = rank_of(ranks, &piece[i..i + 2]);
    }
    let mut parts = n;
    loop {
        let mut best = NONE;
        let mut at = 0;
        for (i, &r) in pair_rank[..parts - 1].iter().enumerate() {
            if r < best {
                best = r;
                at = i;
            }
        }
        if best == NONE {
            break;
        }
        // Parts `at` and `at + 1` become one: drop the boundary between them.
        part_id[at] = best;
        bounds.copy_within(at + 2..=parts, at + 1);
        part_id.copy_within(at + 2..parts, at + 1);
        pair_rank.copy_within(at + 1..parts - 1, at);
        parts -= 1;
        let b = |i: usize| bounds[i] as usize;
        pair_rank[at] = if at + 1 < parts {
            rank_of(ranks, &piece[b(at)..b(at + 2)])
        } else {
            NONE
        };
        if at > 0 {
            pair_rank[at - 1] = rank_of(ranks, &piece[b(at - 1)..b(at + 1)]);
        }
    }
    out.extend_from_slice(&part_id[..parts]);
}

#[inline]
fn token_of(ranks: &RankMap, bytes: &[u8]) -> u32 {
    // Every part is a single byte or the result of a merge that was found in the table, and
    // constructors require all 256 single bytes, so the lookup cannot miss.
    ranks.get(bytes).unwrap_or(NONE)
}

/// Heap merge over a doubly linked list of parts. Ordering by (rank, start) reproduces the
/// leftmost-lowest choice of the scan, because part starts keep their relative order.
fn merge_heap(ranks: &RankMap, piece: &[u8], out: &mut Vec<u32>) {
    let n = piece.len();
    // Part i spans start[i]..start[next[i]]; a removed part has alive[i] == false.
    let mut next: Vec<usize> = (1..=n).collect();
    let mut prev: Vec<usize> = (0..n).map(|i| i.wrapping_sub(1)).collect();
    let mut alive = vec![true; n];
    // Rank of (part i joined with its successor) as last computed, to spot stale heap entries.
    let mut cur_rank: Vec<u32> = vec![NONE; n];
    let mut heap: BinaryHeap<Reverse<(u32, usize)>> = BinaryHeap::new();
    for i in 0..n.saturating_sub(1) {
        let r = rank_of(ranks, &piece[i..i + 2]);
        cur_rank[i] = r;
        if r != NONE {
            heap.push(Reverse((r, i)));
        }
    }
    let end_of = |next: &Vec<usize>, i: usize| next[i];
    while let Some(Reverse((r, i))) = heap.pop() {
        if !alive[i] || cur_rank[i] != r {
            continue;
        }
        // Merge part i with its successor j.
        let j = next[i];
        alive[j] = false;
        next[i] = next[j];
        if next[i] < n {
            prev[next[i]] = i;
        }
        // New pair (i, next).
        let after = next[i];
        cur_rank[i] = if after < n {
            rank_of(ranks, &piece[i..end_of(&next, after)])
        } else {
            NONE
        };
        if cur_rank[i] != NONE {
            heap.push(Reverse((cur_rank[i], i)));
        }
        // New pair (prev, i).
        let p = prev[i];
        if p != usize::MAX {
            cur_rank[p] = rank_of(ranks, &piece[p..next[i]]);
            if cur_rank[p] != NONE {
                heap.push(Reverse((cur_rank[p], p)));
            }
        }
    }
    let mut i = 0;
    while i < n {
        out.push(token_of(ranks, &piece[i..next[i]]));
        i = next[i];
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXTRA: [&[u8]; 8] = [b"ab", b"bc", b"abc", b"cd", b"abcd", b"aa", b"aaaa", b"da"];

    fn table(tokens: &[&[u8]]) -> RankMap {
        let mut m = RankMap::default();
        for b in 0..=255u8 {
            m.insert(&[b], b as u32);
        }
        for (i, t) in tokens.iter().enumerate() {
            m.insert(t, 256 + i as u32);
        }
        m
    }

    fn bytes_of(id: u32) -> Vec<u8> {
        if id < 256 {
            vec![id as u8]
        } else {
            EXTRA[id as usize - 256].to_vec()
        }
    }

    #[test]
    fn scan_and_heap_agree() {
        let ranks = table(&EXTRA);
        let inputs: Vec<Vec<u8>> = vec![
            b"abcdabcdaaaaaab".to_vec(),
            b"aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa".to_vec(),
            b"bcbcbcabcdd".repeat(11),
            b"x".to_vec(),
            b"xy".to_vec(),
        ];
        for input in inputs {
            let (mut a, mut b) = (Vec::new(), Vec::new());
            merge_scan(&ranks, &input, &mut a);
            merge_heap(&ranks, &input, &mut b);
            assert_eq!(a, b, "{:?}", String::from_utf8_lossy(&input));
            let joined: Vec<u8> = a.iter().flat_map(|&id| bytes_of(id)).collect();
            assert_eq!(joined, input);
        }
    }

    #[test]
    fn lowest_rank_wins_leftmost_on_ties() {
        // "ab" (256) beats "bc" (257): "abc" -> [ab, c] -> abc (258).
        let ranks = table(&EXTRA);
        let mut out = Vec::new();
        encode_piece(&ranks, b"abcbc", &mut out);
        assert_eq!(out, vec![258, 257]);
        // Long inputs take the heap path and still agree with the scan.
        let long = b"abcbc".repeat(40);
        let mut heap_out = Vec::new();
        encode_piece(&ranks, &long, &mut heap_out);
        assert_eq!(heap_out, [258, 257].repeat(40));
    }
}
