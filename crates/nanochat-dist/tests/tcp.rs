//! TcpCollective between real sockets on 127.0.0.1: ranks as threads for the arithmetic, ranks
//! as processes (this test binary re-executed) for crashes, stops and unreachable rendezvous.

use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use nanochat_dist::{Collective, DistEnv, Launcher, ReduceOp, TcpCollective, TcpOptions};

fn env(rank: usize, world: usize, port: u16) -> DistEnv {
    DistEnv {
        rank,
        world_size: world,
        local_rank: rank,
        local_world_size: world,
        master_addr: "127.0.0.1".into(),
        master_port: port,
        launcher: Launcher::Torchrun,
        job_tag: "test".into(),
    }
}

fn quick() -> TcpOptions {
    TcpOptions {
        connect_timeout: Duration::from_secs(20),
        heartbeat_interval: Duration::from_millis(200),
        heartbeat_timeout: Duration::from_secs(3),
        op_timeout: Duration::from_secs(20),
    }
}

/// Runs `body(rank, collective)` on `world` threads joined into one job; returns each rank's
/// result in rank order.
fn with_world<R: Send>(
    world: usize,
    body: impl Fn(usize, &mut TcpCollective) -> R + Sync,
) -> Vec<R> {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let mut listener = Some(listener);
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..world)
            .map(|r| {
                let l = if r == 0 { listener.take() } else { None };
                let body = &body;
                s.spawn(move || {
                    let e = env(r, world, port);
                    let mut c = match l {
                        Some(l) => TcpCollective::lead(&e, l, quick()).unwrap(),
                        None => TcpCollective::connect(&e, quick()).unwrap(),
                    };
                    body(r, &mut c)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

/// Deterministic, rank-dependent values with mixed magnitudes (so summation order matters).
fn values(rank: usize, len: usize) -> Vec<f32> {
    (0..len)
        .map(|i| {
            let x = ((i * 7919 + rank * 104_729) % 10_007) as f32 / 10_007.0 - 0.5;
            x * 10f32.powi(((i + rank) % 7) as i32 - 3)
        })
        .collect()
}

#[test]
fn all_reduce_is_bit_identical_on_every_rank_and_close_to_the_exact_sum() {
    for world in [2, 3, 4] {
        for len in [0, 1, 3, 1000, 100_003] {
            for op in [ReduceOp::Sum, ReduceOp::Avg] {
                let out = with_world(world, |r, c| {
                    let mut v = values(r, len);
                    c.all_reduce(&mut v, op).unwrap();
                    v
                });
                for (r, o) in out.iter().enumerate() {
                    let same = o
                        .iter()
                        .zip(&out[0])
                        .all(|(a, b)| a.to_bits() == b.to_bits());
                    assert!(
                        same,
                        "world {world} len {len}: rank {r} differs from rank 0"
                    );
                }
                let inputs: Vec<Vec<f32>> = (0..world).map(|r| values(r, len)).collect();
                for i in 0..len {
                    let exact: f64 = inputs.iter().map(|v| f64::from(v[i])).sum();
                    let exact = if op == ReduceOp::Avg {
                        exact / world as f64
                    } else {
                        exact
                    };
                    let scale: f64 = inputs.iter().map(|v| f64::from(v[i]).abs()).sum();
                    let err = (f64::from(out[0][i]) - exact).abs();
                    assert!(
                        err <= 1e-6 * scale.max(1e-30),
                        "world {world} len {len} [{i}]: {} vs {exact}",
                        out[0][i]
                    );
                }
            }
        }
    }
}

#[test]
fn reduce_scatter_then_all_gather_is_the_all_reduce() {
    let world = 4;
    let len = 4 * 1234;
    let out = with_world(world, |r, c| {
        let mut full = values(r, len);
        c.all_reduce(&mut full, ReduceOp::Avg).unwrap();
        let mut sharded = values(r, len);
        let mine = c.reduce_scatter(&mut sharded, ReduceOp::Avg).unwrap();
        assert_eq!(mine, r * 1234..(r + 1) * 1234);
        let shard_bits: Vec<u32> = sharded[mine.clone()].iter().map(|x| x.to_bits()).collect();
        let full_bits: Vec<u32> = full[mine].iter().map(|x| x.to_bits()).collect();
        assert_eq!(
            shard_bits, full_bits,
            "rank {r}: reduced shard differs from the all-reduce"
        );
        c.all_gather(&mut sharded).unwrap();
        let gathered: Vec<u32> = sharded.iter().map(|x| x.to_bits()).collect();
        let all: Vec<u32> = full.iter().map(|x| x.to_bits()).collect();
        assert_eq!(gathered, all);
        // Shards must be equal: the error says how to fix it, on every rank alike.
        let mut odd = vec![0.0f32; 10];
        assert!(c
            .reduce_scatter(&mut odd, ReduceOp::Sum)
            .unwrap_err()
            .to_string()
            .contains("pad"));
    });
    assert_eq!(out.len(), world);
}

#[test]
fn broadcasts_from_every_root_barrier_and_f64_metrics() {
    let world = 3;
    with_world(world, |r, c| {
        for root in 0..world {
            let mut v = if r == root {
                values(root, 70_001)
            } else {
                vec![0.0; 70_001]
            };
            c.broadcast(&mut v, root).unwrap();
            assert_eq!(v, values(root, 70_001), "rank {r}, root {root}");
            let mut b = if r == root {
                format!("unique id of {root}").into_bytes()
            } else {
                b"stale and longer than the payload".to_vec()
            };
            c.broadcast_bytes(&mut b, root).unwrap();
            assert_eq!(b, format!("unique id of {root}").into_bytes());
            let mut empty = if r == root { Vec::new() } else { vec![1, 2, 3] };
            c.broadcast_bytes(&mut empty, root).unwrap();
            assert!(empty.is_empty());
        }
        c.barrier().unwrap();
        let mut m = [r as f64, 1.0, 0.1 * r as f64];
        c.all_reduce_f64(&mut m, ReduceOp::Sum).unwrap();
        assert_eq!(m[..2], [3.0, 3.0]);
        assert!((m[2] - 0.3).abs() < 1e-12);
        assert!(c.broadcast(&mut [0.0], 5).is_err());
    });
}

#[test]
fn ranks_making_different_calls_fail_instead_of_exchanging_garbage() {
    let errors = with_world(2, |r, c| {
        let mut v = vec![1.0f32; 8];
        let res = if r == 0 {
            c.all_reduce(&mut v, ReduceOp::Sum)
        } else {
            c.broadcast(&mut v, 0)
        };
        let e = res.unwrap_err().to_string();
        // The job stays failed.
        assert!(c.barrier().is_err());
        e
    });
    for e in &errors {
        assert!(
            e.contains("mismatch") && e.contains("all_reduce") && e.contains("broadcast"),
            "{e}"
        );
    }
}

#[test]
fn an_aborting_rank_stops_the_others_with_its_reason_and_a_leaving_rank_is_named() {
    let t0 = Instant::now();
    let errors = with_world(3, |r, c| {
        if r == 2 {
            c.abort("data shard a.jsonl: bad json");
            return String::new();
        }
        let mut v = vec![0.0f32; 1000];
        let mut err = String::new();
        for _ in 0..1000 {
            if let Err(e) = c.all_reduce(&mut v, ReduceOp::Sum) {
                err = e.to_string();
                break;
            }
        }
        err
    });
    assert!(t0.elapsed() < Duration::from_secs(10), "{:?}", t0.elapsed());
    for e in &errors[..2] {
        assert!(
            e.contains("rank 2 failed: data shard a.jsonl: bad json"),
            "{e}"
        );
    }

    let errors = with_world(2, |r, c| {
        if r == 1 {
            return String::new(); // drops its collective: a clean goodbye
        }
        std::thread::sleep(Duration::from_millis(300));
        c.barrier().unwrap_err().to_string()
    });
    assert!(
        errors[0].contains("rank 1 has already left the job"),
        "{}",
        errors[0]
    );
}

#[test]
fn ranks_finishing_at_different_times_is_a_clean_exit() {
    // A rank that is done closes its connections while its neighbours may still be finishing
    // the last collective: that must not read as a crash to them.
    for round in 0..10 {
        let results = with_world(3, |r, c| {
            let mut v = values(r, 50_000);
            let res = c.all_reduce(&mut v, ReduceOp::Sum).and_then(|()| {
                if r == 2 {
                    std::thread::sleep(Duration::from_millis(30));
                }
                c.all_reduce(&mut v, ReduceOp::Avg)
            });
            if r != 0 {
                std::thread::sleep(Duration::from_millis(10 * r as u64));
            }
            res.map_err(|e| e.to_string())
        });
        for (r, res) in results.iter().enumerate() {
            assert!(res.is_ok(), "round {round}, rank {r}: {res:?}");
        }
    }
}

#[test]
fn rendezvous_failures_name_the_address_port_and_wait() {
    // Nobody listens on this port once the probe listener is gone.
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let opts = TcpOptions {
        connect_timeout: Duration::from_secs(1),
        ..quick()
    };
    let t0 = Instant::now();
    let e = TcpCollective::connect(&env(1, 2, port), opts)
        .err()
        .unwrap()
        .to_string();
    assert!(t0.elapsed() < Duration::from_secs(5));
    assert!(
        e.contains(&format!("127.0.0.1:{port}")) && e.contains("for 1"),
        "{e}"
    );
    assert!(e.contains("MASTER_ADDR"), "{e}");

    // Rank 0 alone: says who is missing. A rank of another world size is turned away, and
    // told why.
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let (lead, stray) = std::thread::scope(|s| {
        let lead = s.spawn(|| {
            TcpCollective::lead(&env(0, 3, port), listener, opts)
                .err()
                .unwrap()
                .to_string()
        });
        let stray = s.spawn(|| {
            TcpCollective::connect(&env(1, 4, port), opts)
                .err()
                .unwrap()
                .to_string()
        });
        (lead.join().unwrap(), stray.join().unwrap())
    });
    assert!(
        lead.contains("rank(s) 1, 2 of a world of 3 have not joined"),
        "{lead}"
    );
    assert!(lead.contains("says the world has 4 ranks"), "{lead}");
    assert!(
        stray.contains("turned this rank away") && stray.contains("world has 4"),
        "{stray}"
    );
}

// ---- ranks as processes -------------------------------------------------------------------

const CHILD: &str = "NANOCHAT_DIST_TEST_CHILD";

/// Child mode: join the job from the environment and all-reduce until something fails.
fn child_main() {
    let e = DistEnv::from_env().unwrap();
    let mut c = nanochat_dist::connect(&e).unwrap();
    eprintln!("rank {} ready", e.rank);
    let mut v = vec![1.0f32; 1 << 16];
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline {
        if let Err(err) = c.all_reduce(&mut v, ReduceOp::Avg) {
            eprintln!("rank {} error: {err}", e.rank);
            std::process::exit(3);
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    std::process::exit(0);
}

fn spawn_world(test: &str, world: usize) -> Vec<Child> {
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    (0..world)
        .map(|r| {
            Command::new(std::env::current_exe().unwrap())
                .args([test, "--exact", "--nocapture", "--test-threads=1"])
                .env(CHILD, "1")
                .env("RANK", r.to_string())
                .env("WORLD_SIZE", world.to_string())
                .env("MASTER_ADDR", "127.0.0.1")
                .env("MASTER_PORT", port.to_string())
                .env("NANOCHAT_DIST_HEARTBEAT_TIMEOUT", "2")
                .env("NANOCHAT_DIST_CONNECT_TIMEOUT", "30")
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect()
}

/// Waits for every child but `skip`; returns (exit code, stderr) and the time it took.
fn wait_others(children: Vec<Child>, skip: usize) -> (Vec<(i32, String)>, Duration) {
    let t0 = Instant::now();
    let mut out = Vec::new();
    for (r, ch) in children.into_iter().enumerate() {
        let o = ch.wait_with_output().unwrap();
        if r != skip {
            out.push((
                o.status.code().unwrap_or(-1),
                String::from_utf8_lossy(&o.stderr).into_owned(),
            ));
        }
    }
    (out, t0.elapsed())
}

fn wait_ready(children: &mut [Child]) {
    // The children print "ready" on stderr; give them time to join (debug builds start slowly).
    std::thread::sleep(Duration::from_millis(1500));
    for c in children.iter_mut() {
        assert!(
            c.try_wait().unwrap().is_none(),
            "a rank exited before the fault was injected"
        );
    }
}

#[test]
fn a_killed_rank_fails_every_other_rank_within_seconds() {
    if std::env::var_os(CHILD).is_some() {
        child_main();
    }
    let mut children = spawn_world("a_killed_rank_fails_every_other_rank_within_seconds", 3);
    wait_ready(&mut children);
    children[1].kill().unwrap(); // SIGKILL
    let (others, took) = wait_others(children, 1);
    assert!(took < Duration::from_secs(10), "took {took:?}");
    for (code, err) in others {
        assert_eq!(code, 3, "{err}");
        assert!(err.contains("rank 1"), "{err}");
    }
}

#[test]
fn a_stopped_rank_is_declared_lost_after_the_heartbeat_timeout() {
    if std::env::var_os(CHILD).is_some() {
        child_main();
    }
    let mut children = spawn_world(
        "a_stopped_rank_is_declared_lost_after_the_heartbeat_timeout",
        3,
    );
    wait_ready(&mut children);
    let pid = children[2].id() as libc::pid_t;
    // SAFETY: plain syscall on a child this test spawned and has not reaped.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGSTOP) }, 0);
    let t0 = Instant::now();
    let mut others = Vec::new();
    for ch in children.drain(..2) {
        let o = ch.wait_with_output().unwrap();
        others.push((
            o.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&o.stderr).into_owned(),
        ));
    }
    let took = t0.elapsed();
    // SAFETY: as above; the stopped child is killed and reaped.
    unsafe { libc::kill(pid, libc::SIGKILL) };
    let _ = children[0].wait();
    assert!(took < Duration::from_secs(10), "took {took:?}");
    for (code, err) in others {
        assert_eq!(code, 3, "{err}");
        assert!(err.contains("no heartbeat from rank 2"), "{err}");
    }
}
