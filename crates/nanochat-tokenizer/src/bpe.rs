//! Byte-pair merging of one pre-token over a rank table, with tiktoken's semantics: repeatedly
//! merge the adjacent pair whose concatenation has the lowest rank (leftmost on ties) until no
//! adjacent concatenation is in the table.

use std::cmp::Reverse;
use std::collections::BinaryHeap;

use rustc_hash::FxHashMap;

/// Token bytes → rank (= id) for the mergeable (non-special) tokens.
pub(crate) type RankMap = FxHashMap<Box<[u8]>, u32>;

const NONE: u32 = u32::MAX;

/// Pieces up to this many bytes use the quadratic scan (cache friendly, no allocation beyond
/// one small vector); longer ones use a heap so that pathological inputs stay O(n log n).
const SCAN_LIMIT: usize = 128;

#[inline]
fn rank_of(ranks: &RankMap, bytes: &[u8]) -> u32 {
    ranks.get(bytes).copied().unwrap_or(NONE)
}

/// Appends the ids of `piece` to `out`.
#[inline]
pub(crate) fn encode_piece(ranks: &RankMap, piece: &[u8], out: &mut Vec<u32>) {
    // Most pieces are whole tokens: one lookup and done.
    if let Some(&id) = ranks.get(piece) {
        out.push(id);
        return;
    }
    if piece.len() <= SCAN_LIMIT {
        merge_scan(ranks, piece, out)
    } else {
        merge_heap(ranks, piece, out)
    }
}

/// Quadratic merge: `bounds[i]` is the start of part i; `pair_rank[i]` is the rank of parts
/// i and i+1 joined.
fn merge_scan(ranks: &RankMap, piece: &[u8], out: &mut Vec<u32>) {
    let n = piece.len();
    let mut bounds: Vec<usize> = (0..=n).collect();
    let mut pair_rank: Vec<u32> = (0..n.saturating_sub(1))
        .map(|i| rank_of(ranks, &piece[i..i + 2]))
        .collect();
    loop {
        let mut best = NONE;
        let mut at = 0;
        for (i, &r) in pair_rank.iter().enumerate() {
            if r < best {
                best = r;
                at = i;
            }
        }
        if best == NONE {
            break;
        }
        // Parts `at` and `at + 1` become one: drop the boundary between them.
        bounds.remove(at + 1);
        pair_rank.remove(at);
        let parts = bounds.len() - 1;
        if at + 1 < parts {
            pair_rank[at] = rank_of(ranks, &piece[bounds[at]..bounds[at + 2]]);
        }
        if at > 0 {
            pair_rank[at - 1] = rank_of(ranks, &piece[bounds[at - 1]..bounds[at + 1]]);
        }
    }
    for w in bounds.windows(2) {
        out.push(token_of(ranks, &piece[w[0]..w[1]]));
    }
}

#[inline]
fn token_of(ranks: &RankMap, bytes: &[u8]) -> u32 {
    // Every part is a single byte or the result of a merge that was found in the table, and
    // constructors require all 256 single bytes, so the lookup cannot miss.
    ranks.get(bytes).copied().unwrap_or(NONE)
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

    fn table(tokens: &[&[u8]]) -> RankMap {
        let mut m: RankMap = (0..=255u8)
            .map(|b| (vec![b].into_boxed_slice(), b as u32))
            .collect();
        for (i, t) in tokens.iter().enumerate() {
            m.insert(t.to_vec().into_boxed_slice(), 256 + i as u32);
        }
        m
    }

    #[test]
    fn scan_and_heap_agree() {
        let ranks = table(&[b"ab", b"bc", b"abc", b"cd", b"abcd", b"aa", b"aaaa", b"da"]);
        let inputs: Vec<Vec<u8>> = vec![
            b"abcdabcdaaaaaab".to_vec(),
            b"aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa".to_vec(),
            b"bcbcbcabcdddaaab".repeat(20),
            b"x".to_vec(),
            b"xy".to_vec(),
        ];
        for input in inputs {
            let (mut a, mut b) = (Vec::new(), Vec::new());
            merge_scan(&ranks, &input, &mut a);
            merge_heap(&ranks, &input, &mut b);
            assert_eq!(a, b, "{:?}", String::from_utf8_lossy(&input));
            let joined: Vec<u8> = a
                .iter()
                .flat_map(|&id| {
                    ranks
                        .iter()
                        .find(|(_, &v)| v == id)
                        .map(|(k, _)| k.to_vec())
                        .unwrap()
                })
                .collect();
            assert_eq!(joined, input);
        }
    }

    #[test]
    fn lowest_rank_wins_leftmost_on_ties() {
        // "ab" (256) beats "bc" (257): "abc" -> [ab, c] -> abc (258).
        let ranks = table(&[b"ab", b"bc", b"abc"]);
        let mut out = Vec::new();
        encode_piece(&ranks, b"abcbc", &mut out);
        assert_eq!(out, vec![258, 257]);
    }
}
