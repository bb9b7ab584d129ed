//! Finite-difference checks of the hand-written backward pass on random tiny configs.

mod common;

use common::{random_model, tiny, tokens};
use nanochat_model::{Gpt, GptConfig, Reduction};

/// For every parameter tensor: the directional derivative along a random direction, by central
/// differences in f64-accumulated f32 losses, against `grad · direction`.
fn check(cfg: GptConfig, b: usize, t: usize, seed: u64) {
    let v = cfg.vocab_size;
    let mut m = random_model(cfg, seed);
    let idx = tokens(b * t, v, seed);
    let mut targets: Vec<i32> = tokens(b * t, v, seed + 1)
        .iter()
        .map(|&x| x as i32)
        .collect();
    targets[1] = -1; // ignored positions must not contribute
    targets[b * t - 2] = -1;
    m.zero_grad().unwrap();
    m.forward_backward(&idx, &targets, b, t, Reduction::Sum)
        .unwrap();
    let names: Vec<String> = m.params().map(|p| p.name.to_string()).collect();
    for (pi, name) in names.iter().enumerate() {
        let (dir, analytic) = {
            let p = m.param(name).unwrap();
            let dir: Vec<f32> = (0..p.data.len())
                .map(|i| (((i as u64 * 7919 + pi as u64 * 31 + seed) % 1000) as f32 / 500.0) - 1.0)
                .collect();
            let a: f64 = dir
                .iter()
                .zip(p.grad)
                .map(|(d, g)| *d as f64 * *g as f64)
                .sum();
            (dir, a)
        };
        let shift = |step: f32, m: &mut Gpt| {
            let mut pm = m.params_mut();
            let p = pm.get_mut(name).unwrap();
            for (x, d) in p.data.iter_mut().zip(&dir) {
                *x += step * d;
            }
        };
        // Central differences at eps and eps/2, Richardson-extrapolated (error O(eps^4)), so
        // eps can stay large enough for f32 round-off in the loss not to matter.
        let central = |eps: f32, m: &mut Gpt| {
            shift(eps, m);
            let lp = m.loss(&idx, &targets, b, t, Reduction::Sum).unwrap() as f64;
            shift(-2.0 * eps, m);
            let lm = m.loss(&idx, &targets, b, t, Reduction::Sum).unwrap() as f64;
            shift(eps, m);
            (lp - lm) / (2.0 * eps as f64)
        };
        let eps = 1e-2f32;
        let numeric = (4.0 * central(eps / 2.0, &mut m) - central(eps, &mut m)) / 3.0;
        let err = (numeric - analytic).abs() / analytic.abs().max(1e-2);
        assert!(
            err < 2e-2,
            "{name}: numeric {numeric} vs analytic {analytic} (rel {err})"
        );
    }
}

#[test]
fn gqa_odd_vocab() {
    check(tiny(2, 4, 2, 32, 37), 2, 7, 1);
}

#[test]
fn mha_odd_head_count_no_softcap() {
    let mut cfg = tiny(1, 3, 3, 18, 50);
    cfg.softcap = None;
    check(cfg, 3, 5, 2);
}

#[test]
fn multi_query_single_row() {
    check(tiny(2, 4, 1, 16, 70), 1, 9, 3);
}

#[test]
fn gradients_accumulate_and_scale() {
    let cfg = tiny(1, 2, 1, 16, 40);
    let mut m = random_model(cfg, 5);
    let idx = tokens(12, 40, 5);
    let tg: Vec<i32> = tokens(12, 40, 6).iter().map(|&x| x as i32).collect();
    m.zero_grad().unwrap();
    let l1 = m
        .forward_backward(&idx, &tg, 2, 6, Reduction::Mean)
        .unwrap();
    let once: Vec<f32> = m.param("lm_head.weight").unwrap().grad.to_vec();
    let l2 = m
        .forward_backward_scaled(&idx, &tg, 2, 6, Reduction::Mean, 0.5)
        .unwrap();
    assert_eq!(l1, l2);
    let twice = m.param("lm_head.weight").unwrap().grad;
    for (a, b) in once.iter().zip(twice) {
        assert!((a * 1.5 - b).abs() <= 1e-6 * a.abs().max(1e-3));
    }
    let ls = m.loss(&idx, &tg, 2, 6, Reduction::Sum).unwrap();
    assert!((ls / 12.0 - l1).abs() < 1e-5 * l1);
}

#[test]
fn bad_inputs_are_errors() {
    let cfg = tiny(1, 2, 1, 16, 40);
    let mut m = Gpt::new(cfg, 0).unwrap();
    let idx = tokens(6, 40, 0);
    assert!(m
        .forward_backward(&idx, &[0; 5], 2, 3, Reduction::Mean)
        .is_err());
    assert!(m
        .forward_backward(&idx, &[-1; 6], 2, 3, Reduction::Mean)
        .is_err());
    assert!(m
        .forward_backward(&idx, &[40; 6], 2, 3, Reduction::Mean)
        .is_err());
    assert!(m
        .forward_backward(&[99; 6], &[0; 6], 2, 3, Reduction::Mean)
        .is_err());
    assert!(m.logits(&idx, 3, 3).is_err());
    m.params_mut()
        .get_mut("transformer.wte.weight")
        .unwrap()
        .data[idx[0] as usize * 16] = f32::NAN;
    let err = m
        .forward_backward(&idx, &[1; 6], 2, 3, Reduction::Mean)
        .unwrap_err()
        .to_string();
    assert!(err.contains("non-finite"), "{err}");
}

#[test]
fn init_is_seeded_and_follows_reference_statistics() {
    let cfg = GptConfig::from_depth(2, 300, 32).unwrap();
    let a = Gpt::new(cfg.clone(), 42).unwrap();
    let b = Gpt::new(cfg.clone(), 42).unwrap();
    let c = Gpt::new(cfg.clone(), 43).unwrap();
    for ((pa, pb), pc) in a.params().zip(b.params()).zip(c.params()) {
        assert_eq!(pa.data, pb.data, "{}", pa.name);
        let n = pa.data.len() as f64;
        let std = (pa.data.iter().map(|&x| (x as f64).powi(2)).sum::<f64>() / n).sqrt();
        let want = if pa.name.contains("wte") {
            1.0
        } else if pa.name.contains("lm_head") {
            0.001
        } else if pa.name.ends_with("c_proj.weight") {
            0.0
        } else {
            1.0 / (cfg.n_embd as f64).sqrt()
        };
        assert!(
            (std - want).abs() <= 0.05 * want,
            "{}: std {std} want {want}",
            pa.name
        );
        if want > 0.0 {
            assert_ne!(pa.data, pc.data);
        }
        if pa.name.contains("attn.c_q") {
            let bound = 3f32.sqrt() / (cfg.n_embd as f32).sqrt();
            assert!(pa.data.iter().all(|x| x.abs() <= bound));
        }
    }
}

#[test]
fn loss_agrees_across_logit_chunkings() {
    // vocab 40000: forward-only buffers chunk the logits by 209 rows, training buffers by 838,
    // so over 2 × 512 rows the same loss is summed over different chunks, through buffers made
    // for training (loss after forward_backward reuses them) and for inference (fresh model).
    let mut cfg = tiny(1, 2, 2, 16, 40_000);
    cfg.sequence_len = 512;
    let (b, t) = (2, 512);
    let idx = tokens(b * t, 40_000, 5);
    let tg: Vec<i32> = tokens(b * t, 40_000, 6).iter().map(|&x| x as i32).collect();
    let mut fresh = random_model(cfg.clone(), 3);
    let forward_only = fresh.loss(&idx, &tg, b, t, Reduction::Sum).unwrap();
    let mut trained = random_model(cfg, 3);
    trained.zero_grad().unwrap();
    let with_grad = trained
        .forward_backward(&idx, &tg, b, t, Reduction::Sum)
        .unwrap();
    let reused = trained.loss(&idx, &tg, b, t, Reduction::Sum).unwrap();
    for l in [with_grad, reused] {
        assert!(
            ((l - forward_only) / forward_only).abs() < 1e-6,
            "{l} vs {forward_only}"
        );
    }
    let logits = fresh.logits(&idx[..t], 1, t).unwrap();
    assert_eq!(logits.len(), t * 40_000);
}

#[test]
fn logits_at_selected_positions_match_full_logits() {
    let cfg = tiny(2, 2, 1, 32, 90);
    let (b, t) = (3, 11);
    let idx = tokens(b * t, 90, 8);
    let m = random_model(cfg, 4);
    let full = m.logits(&idx, b, t).unwrap();
    let positions = [0usize, 4, 10, 11, 20, 32];
    let sel = m.logits_at(&idx, b, t, &positions).unwrap();
    assert_eq!(sel.len(), positions.len() * 90);
    for (i, &p) in positions.iter().enumerate() {
        for (x, y) in sel[i * 90..(i + 1) * 90]
            .iter()
            .zip(&full[p * 90..(p + 1) * 90])
        {
            assert!(
                (x - y).abs() <= 1e-5 * y.abs().max(1.0),
                "position {p}: {x} vs {y}"
            );
        }
    }
    assert!(m.logits_at(&idx, b, t, &[]).unwrap().is_empty());
    for bad in [&[3usize, 3][..], &[5, 2], &[33]] {
        let err = m.logits_at(&idx, b, t, bad).unwrap_err().to_string();
        assert!(err.contains("logits_at"), "{err}");
    }
}
