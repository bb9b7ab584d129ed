//! The GPT on the CUDA backend: reference parity in f32, CPU agreement in bf16, checkpoints
//! that move between the GPU and the CPU. Skips with a notice where no GPU can be opened;
//! run on a GPU machine by scripts/gpu-tests.sh.
#![cfg(feature = "cuda")]

mod common;

use std::path::PathBuf;

use nanochat_model::compute::cuda::Cuda;
use nanochat_model::{
    load_checkpoint, load_checkpoint_on, CheckpointMeta, Gpt, MatmulPrecision, Reduction,
};

fn gpu() -> Option<Cuda> {
    match Cuda::open(0) {
        Ok(g) => Some(g),
        Err(e) => {
            eprintln!("notice: CUDA model tests skipped: {e}");
            None
        }
    }
}

fn fixture() -> Option<PathBuf> {
    // $NANOCHAT_SHARED_DIR (a GPU machine holding a copy), else ../shared above the repository.
    let manifest = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let from_env = std::env::var_os("NANOCHAT_SHARED_DIR")
        .map(|d| PathBuf::from(d).join("fixtures/gpt_tiny_a"));
    let found = from_env
        .into_iter()
        .chain(
            manifest
                .ancestors()
                .skip(3)
                .map(|a| a.join("shared/fixtures/gpt_tiny_a")),
        )
        .find(|p| p.join("meta.json").exists());
    if found.is_none() {
        eprintln!("notice: shared/fixtures/gpt_tiny_a not found; CUDA parity skipped");
    }
    found
}

fn rel(a: &[f32], b: &[f32]) -> f64 {
    let d = a
        .iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs() as f64)
        .fold(0.0, f64::max);
    let m = b.iter().map(|y| y.abs() as f64).fold(1e-30, f64::max);
    d / m
}

#[test]
fn gpt_tiny_a_matches_the_reference_on_the_gpu() {
    let (Some(g), Some(dir)) = (gpu(), fixture()) else {
        return;
    };
    let r = nanochat_model::parity::run_parity_on(g, &dir).unwrap();
    eprintln!("{r:#?}");
    assert!(r.logits < 1e-4, "logits rel err {}", r.logits);
    assert!(r.loss_mean < 1e-5, "loss rel err {}", r.loss_mean);
    for (name, e) in &r.grads {
        assert!(*e < 1e-4, "grad {name}: rel err {e}");
    }
    assert!(
        r.cached_vs_full < 1e-4,
        "cached vs full {}",
        r.cached_vs_full
    );
    assert_eq!(r.greedy_got, r.greedy_expected);
}

#[test]
fn bf16_training_pass_agrees_with_the_cpu_and_checkpoints_cross_devices() {
    let Some(g) = gpu() else { return };
    let cfg = common::tiny(3, 4, 2, 64, 300);
    let mut cpu = common::random_model(cfg.clone(), 5);
    let mut gm: Gpt<Cuda> = cpu.to_backend(g.clone()).unwrap();
    let (b, t) = (3, 16);
    let idx: Vec<u32> = (0..b * t).map(|i| (i * 37 % 300) as u32).collect();
    let mut targets: Vec<i32> = (0..b * t).map(|i| ((i * 11 + 3) % 300) as i32).collect();
    targets[5] = -1;
    for p in [MatmulPrecision::F32, MatmulPrecision::Bf16] {
        cpu.set_matmul_precision(p);
        gm.set_matmul_precision(p);
        cpu.zero_grad().unwrap();
        gm.zero_grad().unwrap();
        let lc = cpu
            .forward_backward(&idx, &targets, b, t, Reduction::Mean)
            .unwrap();
        let lg = gm
            .forward_backward(&idx, &targets, b, t, Reduction::Mean)
            .unwrap();
        let tol = if p == MatmulPrecision::F32 {
            1e-5
        } else {
            2e-2
        };
        eprintln!("{p}: loss cpu {lc} gpu {lg}");
        assert!(
            ((lc - lg) / lc).abs() < tol as f32,
            "{p}: loss {lg} vs {lc}"
        );
        for i in 0..cpu.param_specs().len() {
            let e = rel(
                &gm.download_grad(i).unwrap(),
                &cpu.download_grad(i).unwrap(),
            );
            let name = &cpu.param_specs()[i].name;
            eprintln!("{p}: grad {name} rel err {e:.2e}");
            assert!(e < tol * 5.0, "{p}: grad {name} rel err {e}");
        }
        let gn =
            (gm.grad_norm().unwrap() - cpu.grad_norm().unwrap()).abs() / cpu.grad_norm().unwrap();
        assert!(gn < tol, "{p}: grad norm rel err {gn}");
    }

    // GPU → disk → CPU and back: the same weights, the same logits.
    let dir = tempfile::tempdir().unwrap();
    let ck = dir.path().join("ck");
    gm.save_checkpoint(&ck, &CheckpointMeta::new(0)).unwrap();
    let (on_cpu, _) = load_checkpoint(&ck).unwrap();
    let (back_on_gpu, _) = load_checkpoint_on(g, &ck).unwrap();
    for i in 0..cpu.param_specs().len() {
        assert_eq!(
            on_cpu.download_param(i).unwrap(),
            gm.download_param(i).unwrap()
        );
        assert_eq!(
            back_on_gpu.download_param(i).unwrap(),
            gm.download_param(i).unwrap()
        );
    }
    let lc = on_cpu.logits(&idx, b, t).unwrap();
    let lg = back_on_gpu.logits(&idx, b, t).unwrap();
    assert!(
        rel(&lg, &lc) < 1e-4,
        "logits after the round trip: {}",
        rel(&lg, &lc)
    );
}
