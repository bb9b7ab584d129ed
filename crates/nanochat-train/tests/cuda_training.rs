//! Training on an NVIDIA GPU against the CPU: a 200-step loss curve (model, loss, backward,
//! AdamW and Muon on the device) whose first steps agree within 0.1% and whose 20-step means
//! stay within 1% of the CPU's, and a resume from a checkpoint that
//! continues bit for bit as the uninterrupted run does. Skips with a notice where no GPU can
//! be opened; scripts/gpu-tests.sh runs it on one.
#![cfg(feature = "cuda")]

use std::ops::Range;
use std::path::Path;

use nanochat_model::compute::cuda::Cuda;
use nanochat_model::compute::{Backend, Cpu};
use nanochat_model::{
    load_checkpoint_on, CheckpointMeta, Gpt, GptConfig, MatmulPrecision, Reduction,
};
use nanochat_train::optim::{muon_momentum_at, NanochatOptimizer, OptimizerSettings};

fn gpu() -> Option<Cuda> {
    match Cuda::open(0) {
        Ok(g) => Some(g),
        Err(e) => {
            eprintln!("NOTICE: no GPU, skipping the CUDA training test: {e}");
            None
        }
    }
}

const VOCAB: usize = 256;
const B: usize = 4;
const T: usize = 32;

/// Step `step`'s batch: a noisy walk (each token is the last plus a stride plus 0..3 of noise
/// from a fixed generator), so the loss falls towards the noise's entropy (ln 4) and stays there
/// instead of collapsing to zero, where relative differences would mean nothing.
fn batch(step: usize) -> (Vec<u32>, Vec<i32>) {
    let mut state = (step as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    let mut noise = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        (state % 4) as usize
    };
    let mut idx = Vec::with_capacity(B * T);
    let mut tg = Vec::with_capacity(B * T);
    for r in 0..B {
        let mut row = vec![(r * 37 + step * 11) % VOCAB];
        for _ in 0..T {
            let last = row[row.len() - 1];
            row.push((last + 1 + 2 * (r % 3) + noise()) % VOCAB);
        }
        idx.extend(row[..T].iter().map(|&x| x as u32));
        tg.extend(row[1..].iter().map(|&x| x as i32));
    }
    (idx, tg)
}

fn new_model() -> Gpt {
    Gpt::new(GptConfig::from_depth(2, VOCAB, T).unwrap(), 3).unwrap()
}

/// Runs optimizer steps `steps`, returning their losses.
fn train<B: Backend>(
    model: &mut Gpt<B>,
    opt: &mut NanochatOptimizer<B>,
    steps: Range<usize>,
) -> Vec<f32> {
    steps
        .map(|step| {
            let (idx, tg) = batch(step);
            model.zero_grad().unwrap();
            let loss = model
                .forward_backward(&idx, &tg, B, T, Reduction::Mean)
                .unwrap();
            model.clip_grad_norm(1.0).unwrap();
            opt.set_muon_momentum(muon_momentum_at(step as u64));
            opt.step_model(model, 1.0).unwrap();
            loss
        })
        .collect()
}

fn curve<B: Backend>(backend: B, precision: MatmulPrecision, steps: usize) -> Vec<f32> {
    let mut model = new_model().to_backend(backend).unwrap();
    model.set_matmul_precision(precision);
    let mut opt = NanochatOptimizer::for_model(&model, OptimizerSettings::default()).unwrap();
    train(&mut model, &mut opt, 0..steps)
}

/// Means of consecutive 20-step windows of a loss curve.
fn window_means(curve: &[f32]) -> Vec<f32> {
    curve
        .chunks(20)
        .map(|w| w.iter().sum::<f32>() / w.len() as f32)
        .collect()
}

fn max_rel(a: &[f32], b: &[f32]) -> (usize, f32) {
    a.iter()
        .zip(b)
        .map(|(x, y)| ((x - y) / y).abs())
        .enumerate()
        .fold((0, 0.0), |m, (i, r)| if r > m.1 { (i, r) } else { m })
}

#[test]
fn a_200_step_loss_curve_on_the_gpu_matches_the_cpus_within_one_percent() {
    let Some(g) = gpu() else { return };
    let steps = 200;
    let cpu = curve(Cpu, MatmulPrecision::F32, steps);
    let gpu32 = curve(g.clone(), MatmulPrecision::F32, steps);
    let gpu16 = curve(g, MatmulPrecision::Bf16, steps);
    eprintln!("cpu f32  {:?}", &cpu[..8]);
    eprintln!("gpu f32  {:?}", &gpu32[..8]);
    eprintln!("gpu bf16 {:?}", &gpu16[..8]);
    eprintln!(
        "final: cpu {} gpu f32 {} gpu bf16 {}",
        cpu[steps - 1],
        gpu32[steps - 1],
        gpu16[steps - 1]
    );
    assert!(
        cpu[steps - 1] < 0.5 * cpu[0] && cpu[steps - 1] > 1.0,
        "the loss must fall, to a floor, for the comparison to mean anything: {cpu:?}"
    );
    // Two runs of training in different reduction orders drift apart step by step (chaos,
    // not error), so single late steps are not comparable: the first steps must agree closely,
    // and the curve's 20-step means within the stated bound all the way.
    let (at, worst) = max_rel(&gpu32[..20], &cpu[..20]);
    eprintln!(
        "f32: first 20 steps, worst step {at}, {:.4}%",
        100.0 * worst
    );
    assert!(
        worst < 1e-3,
        "f32 step {at}: gpu {} cpu {}",
        gpu32[at],
        cpu[at]
    );
    let (at, worst) = max_rel(&window_means(&gpu32), &window_means(&cpu));
    eprintln!("f32: worst 20-step mean {at}, {:.3}%", 100.0 * worst);
    assert!(
        worst < 0.01,
        "f32 window {at} differs by {:.3}%",
        100.0 * worst
    );
    // bf16 operands change the arithmetic; the curve stays close (the reference's autocast).
    assert_ne!(gpu16, gpu32);
    let (at, worst) = max_rel(&window_means(&gpu16), &window_means(&cpu));
    eprintln!("bf16: worst 20-step mean {at}, {:.3}%", 100.0 * worst);
    assert!(
        worst < 0.05,
        "bf16 window {at} differs by {:.3}%",
        100.0 * worst
    );
}

/// Saves model and optimizer state as the trainer's checkpoints hold them.
fn save(model: &Gpt<Cuda>, opt: &NanochatOptimizer<Cuda>, dir: &Path) -> Vec<(String, Vec<f32>)> {
    model
        .save_checkpoint(&dir.join("model"), &CheckpointMeta::new(10))
        .unwrap();
    opt.state_tensors()
        .unwrap()
        .into_iter()
        .map(|(n, _, d)| (n, d))
        .collect()
}

#[test]
fn a_gpu_checkpoint_resumes_bit_identically_on_the_gpu() {
    let Some(g) = gpu() else { return };
    let run = |model: &mut Gpt<Cuda>, opt: &mut NanochatOptimizer<Cuda>, r| train(model, opt, r);
    let start = || {
        let mut m = new_model().to_backend(g.clone()).unwrap();
        m.set_matmul_precision(MatmulPrecision::Bf16);
        let o = NanochatOptimizer::for_model(&m, OptimizerSettings::default()).unwrap();
        (m, o)
    };
    // Uninterrupted: 20 steps.
    let (mut m, mut o) = start();
    let whole = run(&mut m, &mut o, 0..20);
    let end: Vec<Vec<f32>> = (0..m.param_specs().len())
        .map(|i| m.download_param(i).unwrap())
        .collect();

    // 10 steps, checkpoint, everything dropped, loaded back, 10 more.
    let dir = tempfile::tempdir().unwrap();
    let (mut m, mut o) = start();
    let first = run(&mut m, &mut o, 0..10);
    let state = save(&m, &o, dir.path());
    let meta = o.meta();
    drop((m, o));
    let (mut m, _) = load_checkpoint_on(g.clone(), &dir.path().join("model")).unwrap();
    m.set_matmul_precision(MatmulPrecision::Bf16);
    let mut o = NanochatOptimizer::for_model(&m, OptimizerSettings::default()).unwrap();
    o.restore(&meta, |name| {
        state
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, d)| d.clone())
    })
    .unwrap();
    let second = run(&mut m, &mut o, 10..20);
    let resumed: Vec<f32> = first.into_iter().chain(second).collect();
    assert_eq!(resumed, whole, "losses after the resume");
    for (i, want) in end.iter().enumerate() {
        let got = m.download_param(i).unwrap();
        let same = got
            .iter()
            .zip(want)
            .all(|(a, b)| a.to_bits() == b.to_bits());
        assert!(
            same,
            "parameter {} differs after the resume",
            m.param_specs()[i].name
        );
    }
    // And the GPU checkpoint loads on the CPU with the same weights.
    let (on_cpu, _) = nanochat_model::load_checkpoint(&dir.path().join("model")).unwrap();
    let (on_gpu, _) = load_checkpoint_on(g, &dir.path().join("model")).unwrap();
    for i in 0..on_cpu.param_specs().len() {
        assert_eq!(
            on_cpu.download_param(i).unwrap(),
            on_gpu.download_param(i).unwrap()
        );
    }
}
