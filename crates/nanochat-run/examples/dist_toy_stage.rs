//! A minimal multi-rank stage: every rank joins the job described by its environment
//! (`RANK`/`WORLD_SIZE`/`MASTER_ADDR`/`MASTER_PORT` from `nanochat-run`'s local launcher, or
//! Slurm's variables under `srun`), all-reduces a vector per step, and rank 0 writes the result.
//! The orchestrator's integration tests run it to check multi-rank launching.
//!
//! Config (TOML, unknown keys rejected):
//! ```toml
//! steps = 3               # all-reduces
//! sleep_ms = 0            # pause per step
//! fail_rank = 1           # this rank exits 1 after joining, at step `fail_step`
//! fail_step = 0
//! fail_before_join = 2    # this rank exits 1 before reaching the rendezvous
//! ```
//! Output (rank 0): `result.txt` = `world W sum S steps N`, where S is the all-reduced sum of
//! `rank + 1` over ranks (W·(W+1)/2). Every rank also writes `rank<R>.txt` into its own `--out`,
//! so tests can see that only rank 0's directory is published.

use std::fs;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use nanochat_artifacts::stage::{self, StageContext};
use nanochat_dist::{DistEnv, ReduceOp};

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Config {
    #[serde(default)]
    steps: u32,
    #[serde(default)]
    sleep_ms: u64,
    #[serde(default)]
    fail_rank: Option<usize>,
    #[serde(default)]
    fail_step: u32,
    #[serde(default)]
    fail_before_join: Option<usize>,
}

fn main() -> Result<()> {
    stage::install_signal_handlers()?;
    let ctx = StageContext::from_env()?;
    let cfg: Config = ctx.config()?;
    let env = DistEnv::from_env().context("reading the launcher's environment")?;
    eprintln!(
        "dist_toy_stage: rank {} of {} (local {} of {}), rendezvous {}:{}",
        env.rank,
        env.world_size,
        env.local_rank,
        env.local_world_size,
        env.master_addr,
        env.master_port
    );
    if cfg.fail_before_join == Some(env.rank) {
        bail!("failing before the rendezvous on purpose (fail_before_join)");
    }
    let mut comm = nanochat_dist::connect(&env)?;
    fs::write(ctx.work_dir().join(format!("joined-{}", env.rank)), "")?;
    fs::write(
        ctx.out_dir().join(format!("rank{}.txt", env.rank)),
        format!("{}\n", env.rank),
    )?;
    let mut sum = 0.0f64;
    for step in 0..cfg.steps {
        if stage::interrupted() {
            eprintln!("dist_toy_stage: interrupted at step {step}");
            std::process::exit(stage::interrupt_exit_code().unwrap_or(130));
        }
        if cfg.fail_rank == Some(env.rank) && step == cfg.fail_step {
            comm.abort("failing on purpose (fail_rank)");
            bail!("failing on purpose at step {step} (fail_rank)");
        }
        std::thread::sleep(Duration::from_millis(cfg.sleep_ms));
        let mut v = vec![(env.rank + 1) as f32; 1000];
        comm.all_reduce(&mut v, ReduceOp::Sum)?;
        sum = f64::from(v[0]);
        eprintln!("dist_toy_stage: step {}/{} sum {sum}", step + 1, cfg.steps);
    }
    comm.barrier()?;
    if env.rank == 0 {
        stage::write_atomic(
            &ctx.out_dir().join("result.txt"),
            format!("world {} sum {sum} steps {}\n", env.world_size, cfg.steps).as_bytes(),
        )?;
    }
    Ok(())
}
