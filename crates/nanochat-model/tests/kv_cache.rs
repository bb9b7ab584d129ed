//! KV-cached inference gives the full forward's logits.

mod common;

use common::{random_model, tiny, tokens};
use nanochat_model::{KvCache, ModelError};

fn max_rel(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    let scale = b.iter().fold(0f32, |m, x| m.max(x.abs()));
    a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs())) / scale
}

#[test]
fn rows_with_their_own_lengths_match_full_forward() {
    let cfg = tiny(2, 4, 2, 32, 61);
    let v = cfg.vocab_size;
    let m = random_model(cfg.clone(), 9);
    let seqs = [tokens(11, v, 1), tokens(7, v, 2), tokens(14, v, 3)];
    let full: Vec<Vec<f32>> = seqs
        .iter()
        .map(|s| m.logits(s, 1, s.len()).unwrap())
        .collect();
    let mut cache = KvCache::new(&cfg, 3, 16).unwrap();
    let mut got: Vec<Vec<f32>> = vec![Vec::new(); 3];
    // Prefill different lengths for rows 0 and 2 together (row 1 waits), then decode.
    let pre = [4usize, 0, 10];
    let batch: Vec<(usize, &[u32])> = vec![(0, &seqs[0][..pre[0]]), (2, &seqs[2][..pre[2]])];
    let out = m.forward_cached(&mut cache, &batch).unwrap();
    got[0].extend_from_slice(&out[..pre[0] * v]);
    got[2].extend_from_slice(&out[pre[0] * v..]);
    let mut pos = pre;
    loop {
        let batch: Vec<(usize, &[u32])> = (0..3)
            .filter(|&r| pos[r] < seqs[r].len())
            .map(|r| (r, &seqs[r][pos[r]..pos[r] + 1]))
            .collect();
        if batch.is_empty() {
            break;
        }
        let out = m.forward_cached(&mut cache, &batch).unwrap();
        for (i, (r, _)) in batch.iter().enumerate() {
            got[*r].extend_from_slice(&out[i * v..(i + 1) * v]);
            pos[*r] += 1;
        }
    }
    for r in 0..3 {
        assert_eq!(cache.len(r), seqs[r].len());
        let e = max_rel(&got[r], &full[r]);
        assert!(e < 1e-5, "row {r}: {e}");
    }
    // Full forward of a batch equals per-row forwards.
    let both: Vec<u32> = seqs[0][..7].iter().chain(&seqs[1][..7]).copied().collect();
    let lb = m.logits(&both, 2, 7).unwrap();
    assert!(max_rel(&lb[7 * v..], &full[1]) < 1e-5);
}

#[test]
fn prefill_through_gemm_path_matches_and_rows_copy_and_reset() {
    let cfg = tiny(1, 2, 2, 16, 40);
    let v = cfg.vocab_size;
    let m = random_model(cfg.clone(), 4);
    let s = tokens(15, v, 8);
    let full = m.logits(&s, 1, 15).unwrap();
    let mut cache = KvCache::new(&cfg, 2, 15).unwrap();
    // 12 tokens: more than the few-rows threshold, so the GEMM path runs.
    let a = m.forward_cached(&mut cache, &[(0, &s[..12])]).unwrap();
    assert!(max_rel(&a, &full[..12 * v]) < 1e-5);
    cache.copy_row(0, 1).unwrap();
    let b = m.forward_cached(&mut cache, &[(1, &s[12..])]).unwrap();
    assert!(max_rel(&b, &full[12 * v..]) < 1e-5);
    assert_eq!(cache.len(0), 12);
    let err = m.forward_cached(&mut cache, &[(1, &s[..1])]).unwrap_err();
    assert!(matches!(err, ModelError::CacheFull { row: 1, .. }), "{err}");
    cache.reset(1).unwrap();
    let c = m.forward_cached(&mut cache, &[(1, &s[..3])]).unwrap();
    assert!(max_rel(&c, &full[..3 * v]) < 1e-5);
    assert!(m
        .forward_cached(&mut cache, &[(0, &s[..1]), (0, &s[..1])])
        .is_err());
    assert!(m.forward_cached(&mut cache, &[(5, &s[..1])]).is_err());
    assert!(m.forward_cached(&mut cache, &[(0, &[999])]).is_err());
}

#[test]
fn last_only_logits_equal_last_rows_of_full_logits() {
    // GQA (4 query heads over 2 KV heads); rows of different lengths, 27 tokens in all so the
    // trunk runs as GEMMs, and a row that already has cached tokens.
    let cfg = tiny(2, 4, 2, 32, 67);
    let v = cfg.vocab_size;
    let m = random_model(cfg.clone(), 21);
    let seqs = [
        tokens(3, v, 5),
        tokens(12, v, 6),
        tokens(1, v, 7),
        tokens(11, v, 8),
    ];
    let mut full_cache = KvCache::new(&cfg, 4, 32).unwrap();
    let mut last_cache = KvCache::new(&cfg, 4, 32).unwrap();
    // Row 3 starts with two cached tokens in both caches.
    m.forward_cached(&mut full_cache, &[(3, &seqs[3][..2])])
        .unwrap();
    m.forward_cached_last(&mut last_cache, &[(3, &seqs[3][..2])])
        .unwrap();
    let batch: Vec<(usize, &[u32])> = vec![
        (1, &seqs[1][..]),
        (0, &seqs[0][..]),
        (3, &seqs[3][2..]),
        (2, &seqs[2][..]),
    ];
    let full = m.forward_cached(&mut full_cache, &batch).unwrap();
    let last = m.forward_cached_last(&mut last_cache, &batch).unwrap();
    assert_eq!(last.len(), batch.len() * v);
    let mut end = 0;
    for (i, (row, ts)) in batch.iter().enumerate() {
        end += ts.len();
        let e = max_rel(&last[i * v..(i + 1) * v], &full[(end - 1) * v..end * v]);
        assert!(e < 1e-5, "row {row}: {e}");
        assert_eq!(last_cache.len(*row), full_cache.len(*row));
    }
    // The caches hold the same keys/values: one more decode step agrees too.
    let step: Vec<(usize, &[u32])> = (0..4).map(|r| (r, &seqs[r][..1])).collect();
    let a = m.forward_cached(&mut full_cache, &step).unwrap();
    let b = m.forward_cached_last(&mut last_cache, &step).unwrap();
    assert!(max_rel(&b, &a) < 1e-5);
    // A row without new tokens has no last position.
    let err = m
        .forward_cached_last(&mut last_cache, &[(0, &seqs[0][..1]), (1, &[])])
        .unwrap_err();
    assert!(matches!(err, ModelError::InvalidInput(_)), "{err}");
}

#[test]
fn bf16_decoding_streams_bf16_weights_and_tracks_the_bf16_forward() {
    // Width 64 and 24 positions: prefill goes through the bf16 GEMM (more rows than the decode
    // path takes), then single tokens through the bf16 GEMV.
    let cfg = tiny(2, 2, 2, 64, 300);
    let v = cfg.vocab_size;
    let mut m = random_model(cfg.clone(), 5);
    let seq = tokens(24, v, 4);
    let f32_full = m.logits(&seq, 1, seq.len()).unwrap();
    m.set_matmul_precision(nanochat_model::MatmulPrecision::Bf16);
    let bf16_full = m.logits(&seq, 1, seq.len()).unwrap();
    let mut cache = KvCache::new(&cfg, 1, 32).unwrap();
    let mut got = m.forward_cached(&mut cache, &[(0, &seq[..20])]).unwrap();
    for t in 20..seq.len() {
        got.extend(
            m.forward_cached(&mut cache, &[(0, &seq[t..t + 1])])
                .unwrap(),
        );
    }
    // The decoded steps are bf16 arithmetic (not f32 in disguise) and agree with the bf16
    // full forward within bf16 rounding (the order of the f32 additions differs, and a value
    // that lands on the other side of a bf16 rounding boundary moves by up to 2^-8 relative
    // at the next layer's input).
    let steps = 20 * v..;
    let vs_f32 = max_rel(&got[steps.clone()], &f32_full[steps.clone()]);
    let vs_bf16 = max_rel(&got[steps.clone()], &bf16_full[steps.clone()]);
    assert!(vs_f32 > 1e-4, "decode ran in f32: {vs_f32}");
    assert!(vs_bf16 < 1e-2, "bf16 decode vs bf16 forward: {vs_bf16}");
    assert!(vs_f32 < 3e-2, "bf16 decode vs f32 forward: {vs_f32}");
}
