//! All-reduce throughput of the TCP ring between ranks on this machine (threads of one process,
//! real loopback sockets): what a data-parallel step pays to average its gradients.
//!
//! `cargo run --release -p nanochat-dist --example allreduce_bench -- [WORLD] [MIB] [REPS]`
//! (defaults 2 ranks, 128 MiB of f32, 5 reps). Prints the time per all-reduce and the bus
//! bandwidth as NCCL's tests define it: `2·(W−1)/W · bytes / time`.

use std::net::TcpListener;
use std::time::{Duration, Instant};

use nanochat_dist::{Collective, DistEnv, Launcher, ReduceOp, TcpCollective, TcpOptions};

fn main() {
    let arg = |i: usize, default: usize| {
        std::env::args()
            .nth(i)
            .map_or(default, |a| a.parse().expect("arguments are integers"))
    };
    let (world, mib, reps) = (arg(1, 2), arg(2, 128), arg(3, 5));
    assert!(world >= 2, "WORLD must be at least 2");
    let len = mib * (1 << 20) / 4;
    let listener = TcpListener::bind("127.0.0.1:0").expect("binding 127.0.0.1:0");
    let port = listener.local_addr().expect("local address").port();
    let mut listener = Some(listener);
    let opts = TcpOptions {
        op_timeout: Duration::from_secs(600),
        ..TcpOptions::default()
    };
    let times: Vec<Duration> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..world)
            .map(|rank| {
                let l = if rank == 0 { listener.take() } else { None };
                s.spawn(move || {
                    let env = DistEnv {
                        rank,
                        world_size: world,
                        local_rank: rank,
                        local_world_size: world,
                        master_addr: "127.0.0.1".into(),
                        master_port: port,
                        launcher: Launcher::Torchrun,
                        job_tag: "bench".into(),
                    };
                    let mut c = match l {
                        Some(l) => TcpCollective::lead(&env, l, opts),
                        None => TcpCollective::connect(&env, opts),
                    }
                    .expect("joining the job");
                    let mut v = vec![rank as f32 * 0.5 + 1.0; len];
                    c.all_reduce(&mut v, ReduceOp::Avg).expect("warm-up");
                    let mut best = Duration::MAX;
                    for _ in 0..reps {
                        c.barrier().expect("barrier");
                        let t0 = Instant::now();
                        c.all_reduce(&mut v, ReduceOp::Avg).expect("all_reduce");
                        best = best.min(t0.elapsed());
                    }
                    best
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("rank thread"))
            .collect()
    });
    let t = times
        .iter()
        .max()
        .copied()
        .unwrap_or_default()
        .as_secs_f64();
    let bytes = (len * 4) as f64;
    let busbw = 2.0 * (world - 1) as f64 / world as f64 * bytes / t;
    println!(
        "all_reduce of {mib} MiB f32 over {world} ranks (TCP ring, loopback): best of {reps} {:.1} ms, algbw {:.2} GB/s, busbw {:.2} GB/s",
        t * 1e3,
        bytes / t / 1e9,
        busbw / 1e9
    );
}
