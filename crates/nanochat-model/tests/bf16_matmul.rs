//! bf16 matmuls: same loss and gradients as f32 within bf16 accuracy, and the option does not
//! leak into f32 results.

mod common;

use common::{random_model, tiny, tokens};
use nanochat_model::{MatmulPrecision, Reduction};

fn cosine(a: &[f32], b: &[f32]) -> f64 {
    let dot: f64 = a
        .iter()
        .zip(b)
        .map(|(x, y)| f64::from(*x) * f64::from(*y))
        .sum();
    let na: f64 = a.iter().map(|x| f64::from(*x).powi(2)).sum::<f64>().sqrt();
    let nb: f64 = b.iter().map(|x| f64::from(*x).powi(2)).sum::<f64>().sqrt();
    dot / (na * nb)
}

#[test]
fn bf16_loss_and_gradients_track_f32() {
    // Wide enough (64) that the bf16 kernel's multi-tile and parallel paths both run.
    let cfg = tiny(2, 2, 1, 64, 300);
    let (b, t) = (4, 16);
    let idx = tokens(b * t, 300, 1);
    let tg: Vec<i32> = tokens(b * t, 300, 2).iter().map(|&x| x as i32).collect();
    let mut m = random_model(cfg, 7);
    assert_eq!(m.matmul_precision(), MatmulPrecision::F32);
    m.zero_grad().unwrap();
    let l32 = m
        .forward_backward(&idx, &tg, b, t, Reduction::Mean)
        .unwrap();
    let g32: Vec<Vec<f32>> = m.params().map(|p| p.grad.to_vec()).collect();

    m.set_matmul_precision(MatmulPrecision::Bf16);
    m.zero_grad().unwrap();
    let l16 = m
        .forward_backward(&idx, &tg, b, t, Reduction::Mean)
        .unwrap();
    let g16: Vec<Vec<f32>> = m.params().map(|p| p.grad.to_vec()).collect();
    assert_ne!(l16, l32, "bf16 must actually round the operands");
    assert!(
        ((l16 - l32) / l32).abs() < 1e-2,
        "loss f32 {l32} bf16 {l16}"
    );
    for ((p, a), b) in m.params().zip(&g32).zip(&g16) {
        let cos = cosine(a, b);
        assert!(cos > 0.995, "{}: gradient cosine {cos}", p.name);
    }
    let lg16 = m.logits(&idx, b, t).unwrap();

    // Back to f32: bit-identical to the first f32 run.
    m.set_matmul_precision(MatmulPrecision::F32);
    m.zero_grad().unwrap();
    let again = m
        .forward_backward(&idx, &tg, b, t, Reduction::Mean)
        .unwrap();
    assert_eq!(again.to_bits(), l32.to_bits());
    let lg32 = m.logits(&idx, b, t).unwrap();
    let max_diff = lg16
        .iter()
        .zip(&lg32)
        .map(|(x, y)| (x - y).abs())
        .fold(0f32, f32::max);
    assert!(
        max_diff > 0.0 && max_diff < 0.1,
        "logit max diff {max_diff}"
    );
}

#[test]
fn bf16_causal_attention_blocks_track_f32() {
    // seq 100: the bf16 attention runs 4 causal blocks (32, 32, 32 and a ragged 4 rows), with
    // GQA (4 query heads on 2 kv heads). A wrong key range or log-sum-exp offset in any block
    // would wreck the gradients of q/k/v, not just perturb them.
    let mut cfg = tiny(1, 4, 2, 64, 300);
    cfg.sequence_len = 100;
    let (b, t) = (2, 100);
    let idx = tokens(b * t, 300, 3);
    let tg: Vec<i32> = tokens(b * t, 300, 4).iter().map(|&x| x as i32).collect();
    let mut m = random_model(cfg, 11);
    let mut run = |precision| {
        m.set_matmul_precision(precision);
        m.zero_grad().unwrap();
        let loss = m
            .forward_backward(&idx, &tg, b, t, Reduction::Mean)
            .unwrap();
        let grads: Vec<(String, Vec<f32>)> = m
            .params()
            .map(|p| (p.name.to_string(), p.grad.to_vec()))
            .collect();
        (loss, grads)
    };
    let (l32, g32) = run(MatmulPrecision::F32);
    let (l16, g16) = run(MatmulPrecision::Bf16);
    assert!(
        ((l16 - l32) / l32).abs() < 1e-2,
        "loss f32 {l32} bf16 {l16}"
    );
    for ((name, a), (_, b)) in g32.iter().zip(&g16) {
        let cos = cosine(a, b);
        assert!(cos > 0.995, "{name}: gradient cosine {cos}");
    }
}

#[test]
fn precision_parses_from_config_strings() {
    assert_eq!(
        "bf16".parse::<MatmulPrecision>().unwrap(),
        MatmulPrecision::Bf16
    );
    assert_eq!(
        "f32".parse::<MatmulPrecision>().unwrap(),
        MatmulPrecision::F32
    );
    let err = "fp16".parse::<MatmulPrecision>().unwrap_err().to_string();
    assert!(err.contains("bf16"), "{err}");
}

#[test]
fn bf16_weight_packs_follow_weight_updates() {
    let cfg = tiny(2, 2, 2, 64, 200);
    let (b, t) = (2, 16);
    let idx = tokens(b * t, 200, 3);
    let tg: Vec<i32> = tokens(b * t, 200, 4).iter().map(|&x| x as i32).collect();
    let mut m = random_model(cfg.clone(), 11);
    m.set_matmul_precision(MatmulPrecision::Bf16);
    let before = m.loss(&idx, &tg, b, t, Reduction::Mean).unwrap();
    {
        let mut pm = m.params_mut();
        for p in pm.iter_mut() {
            p.data.iter_mut().for_each(|x| *x *= 1.1);
        }
    }
    let after = m.loss(&idx, &tg, b, t, Reduction::Mean).unwrap();
    assert_ne!(before, after, "stale packed weights");
    // A fresh model holding the same (scaled) weights agrees bit for bit.
    let mut fresh = random_model(cfg, 11);
    {
        let mut pm = fresh.params_mut();
        for p in pm.iter_mut() {
            p.data.iter_mut().for_each(|x| *x *= 1.1);
        }
    }
    fresh.set_matmul_precision(MatmulPrecision::Bf16);
    let want = fresh.loss(&idx, &tg, b, t, Reduction::Mean).unwrap();
    assert_eq!(after.to_bits(), want.to_bits());
}
