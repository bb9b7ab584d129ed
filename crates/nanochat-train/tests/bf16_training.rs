//! Training with bf16 matmuls follows the f32 loss curve within a few percent.

use nanochat_model::{Gpt, GptConfig, MatmulPrecision, ParamMut, Reduction};
use nanochat_train::optim::{muon_momentum_at, NanochatOptimizer, OptimizerSettings};

/// Losses of `steps` optimizer steps on a fixed stream of structured batches.
fn losses(precision: MatmulPrecision, steps: usize) -> Vec<f32> {
    let (vocab, b, t) = (256usize, 4usize, 32usize);
    let cfg = GptConfig::from_depth(2, vocab, t).unwrap();
    let mut model = Gpt::new(cfg.clone(), 3).unwrap();
    model.set_matmul_precision(precision);
    let specs: Vec<(String, Vec<usize>)> = model
        .param_specs()
        .iter()
        .map(|s| (s.name.clone(), s.shape.to_vec()))
        .collect();
    let mut opt = NanochatOptimizer::new(
        specs.iter().map(|(n, s)| (n.as_str(), s.as_slice())),
        cfg.n_embd,
        OptimizerSettings::default(),
    )
    .unwrap();
    let mut out = Vec::new();
    for step in 0..steps {
        // A learnable sequence: each row counts up by a row-specific stride.
        let rows: Vec<u32> = (0..b * (t + 1))
            .map(|i| {
                let (r, p) = (i / (t + 1), i % (t + 1));
                ((r * 7 + step % 3 + p * (1 + r % 3)) % vocab) as u32
            })
            .collect();
        let mut idx = Vec::new();
        let mut tg = Vec::new();
        for r in 0..b {
            let row = &rows[r * (t + 1)..(r + 1) * (t + 1)];
            idx.extend_from_slice(&row[..t]);
            tg.extend(row[1..].iter().map(|&x| x as i32));
        }
        model.zero_grad().unwrap();
        let loss = model
            .forward_backward(&idx, &tg, b, t, Reduction::Mean)
            .unwrap();
        out.push(loss);
        opt.set_muon_momentum(muon_momentum_at(step as u64));
        let mut pm = model.params_mut();
        let ps: Vec<ParamMut<'_>> = pm.iter_mut().collect();
        opt.step(
            1.0,
            ps.into_iter().map(|p| {
                let g: &[f32] = p.grad;
                (p.name, p.data, g)
            }),
        )
        .unwrap();
    }
    out
}

#[test]
fn bf16_matmul_training_tracks_f32_loss() {
    let steps = 12;
    let f32_curve = losses(MatmulPrecision::F32, steps);
    let bf16_curve = losses(MatmulPrecision::Bf16, steps);
    eprintln!("f32  {f32_curve:?}\nbf16 {bf16_curve:?}");
    assert!(
        f32_curve[steps - 1] < 0.7 * f32_curve[0],
        "the loss must fall for the comparison to mean anything: {f32_curve:?}"
    );
    assert_ne!(f32_curve, bf16_curve, "bf16 must change the arithmetic");
    for (s, (a, b)) in f32_curve.iter().zip(&bf16_curve).enumerate() {
        let rel = ((a - b) / a).abs();
        assert!(rel < 0.03, "step {s}: f32 {a} bf16 {b} ({rel:.3})");
    }
}
