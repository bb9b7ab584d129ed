//! Milliseconds of Muon's Newton–Schulz GEMMs at d8's shapes (512 × 512 and 512 × 2048
//! matrices), the full bf16 GEMM against the symmetric one that multiplies one triangle:
//! `cargo run --release -p nanochat-compute --example ns_gemms`.

use std::time::Instant;

use nanochat_compute::cpu::bf16::{gemm_bf16_symmetric, gemm_bf16_with, GemmOpts, Op};

fn main() {
    let opts = GemmOpts {
        accumulate: false,
        parallel: true,
    };
    let time = |f: &mut dyn FnMut()| {
        f();
        let reps = 20;
        let t = Instant::now();
        for _ in 0..reps {
            f();
        }
        t.elapsed().as_secs_f64() * 1e3 / reps as f64
    };
    println!(
        "{:28} {:>10} {:>10} {:>8}",
        "product", "full ms", "sym ms", "ratio"
    );
    // (label, op_a, op_b, n, k): X·Xᵀ of an n × k X, and A·A of an n × n A.
    for &(label, op_a, op_b, n, k) in &[
        ("X·Xᵀ, X 512x512", Op::N, Op::T, 512usize, 512usize),
        ("X·Xᵀ, X 512x2048", Op::N, Op::T, 512, 2048),
        ("A·A, A 512x512", Op::N, Op::N, 512, 512),
    ] {
        let a: Vec<f32> = (0..n * k).map(|i| ((i % 13) as f32 - 6.0) * 0.1).collect();
        let mut c = vec![0f32; n * n];
        let full = time(&mut || gemm_bf16_with(op_a, op_b, n, n, k, &a, &a, &mut c, opts).unwrap());
        let sym =
            time(&mut || gemm_bf16_symmetric(op_a, op_b, n, k, &a, &a, &mut c, opts).unwrap());
        println!("{label:28} {full:>10.3} {sym:>10.3} {:>8.3}", sym / full);
    }
}
