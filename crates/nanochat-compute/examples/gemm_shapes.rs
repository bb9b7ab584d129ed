//! GFLOP/s of the f32 and bf16 GEMMs on the shapes of one d8 training micro-batch (2048 tokens,
//! vocab 32768): `cargo run --release -p nanochat-model --example gemm_shapes`.

use std::time::Instant;

use nanochat_compute::cpu::bf16::{gemm_bf16, Op};
use nanochat_compute::cpu::kernels::{gemm_acc, gemm_tn_acc};

fn main() {
    // (label, op_a, m, n, k)
    let shapes: &[(&str, Op, usize, usize, usize)] = &[
        ("qkvo fwd / dX", Op::N, 2048, 512, 512),
        ("fc fwd", Op::N, 2048, 2048, 512),
        ("proj fwd / fc dX", Op::N, 2048, 512, 2048),
        ("lm_head fwd chunk", Op::N, 256, 32768, 512),
        ("lm_head dX chunk", Op::N, 256, 512, 32768),
        ("lm_head dW chunk", Op::T, 32768, 512, 256),
        ("qkvo dW", Op::T, 512, 512, 2048),
        ("fc dW", Op::T, 2048, 512, 2048),
        ("muon gram", Op::N, 512, 512, 2048),
    ];
    for &(label, op_a, m, n, k) in shapes {
        let a: Vec<f32> = (0..m * k).map(|i| ((i % 13) as f32 - 6.0) * 0.1).collect();
        let b: Vec<f32> = (0..k * n).map(|i| ((i % 7) as f32 - 3.0) * 0.1).collect();
        let mut c = vec![0f32; m * n];
        let mut scratch = vec![0f32; m * k];
        let flops = 2.0 * (m * n * k) as f64;
        let time = |f: &mut dyn FnMut()| {
            f();
            let reps = ((4e9 / flops) as usize).clamp(1, 50);
            let t = Instant::now();
            for _ in 0..reps {
                f();
            }
            flops * reps as f64 / t.elapsed().as_secs_f64() / 1e9
        };
        let f32_rate = time(&mut || match op_a {
            Op::N => gemm_acc(m, n, k, &a, &b, &mut c).unwrap(),
            Op::T => gemm_tn_acc(m, n, k, &a, &b, &mut c, &mut scratch).unwrap(),
        });
        let bf16_rate = time(&mut || gemm_bf16(op_a, Op::N, m, n, k, &a, &b, &mut c).unwrap());
        println!("{label:20} {op_a:?} {m:6}x{n:6}x{k:6}  f32 {f32_rate:7.1}  bf16 {bf16_rate:7.1} GFLOP/s");
    }
}
