//! A complete, minimal stage binary: what every nanochat stage looks like, and the stage the
//! orchestrator's integration tests run as a real process.
//!
//! Config (TOML, unknown keys rejected):
//! ```toml
//! text = "hello"    # appended to the output
//! steps = 5         # number of checkpointed steps
//! sleep_ms = 0      # pause per step (lets tests interrupt mid-run)
//! fail = false      # exit 1 instead of producing output
//! ```
//! Output: `result.txt` = each input's `result.txt` (inputs sorted by name), then `text`, then
//! one line per step; telemetry (its pid, which differs on every run) goes to the run dir. Progress is checkpointed in `--work`, so an interrupted or killed run
//! resumes where it stopped and produces the same bytes.

use std::fs;
use std::time::Duration;

use anyhow::{Context, Result};
use nanochat_artifacts::stage::{self, StageContext};

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Config {
    #[serde(default)]
    text: String,
    #[serde(default)]
    steps: u32,
    #[serde(default)]
    sleep_ms: u64,
    #[serde(default)]
    fail: bool,
}

fn main() -> Result<()> {
    stage::install_signal_handlers()?;
    let ctx = StageContext::from_env()?;
    let cfg: Config = ctx.config()?;
    if cfg.fail {
        eprintln!("toy_stage: failing on purpose (fail = true)");
        std::process::exit(1);
    }
    let ckpt = ctx.work_dir().join("progress.txt");
    // The checkpoint holds the steps completed so far, one line each.
    let mut done = fs::read_to_string(&ckpt).unwrap_or_default();
    let start = done.lines().count() as u32;
    if start > 0 {
        eprintln!("toy_stage: resuming from step {start}");
    }
    fs::write(ctx.work_dir().join("pid"), std::process::id().to_string())?;
    for step in start..cfg.steps {
        if stage::interrupted() {
            eprintln!("toy_stage: interrupted at step {step}; progress saved");
            std::process::exit(stage::interrupt_exit_code().unwrap_or(130));
        }
        std::thread::sleep(Duration::from_millis(cfg.sleep_ms));
        done.push_str(&format!("step {step}\n"));
        stage::write_atomic(&ckpt, done.as_bytes())?;
        eprintln!("toy_stage: step {}/{}", step + 1, cfg.steps);
    }
    let mut result = String::new();
    for (name, dir) in ctx.inputs() {
        let text = fs::read_to_string(dir.join("result.txt"))
            .with_context(|| format!("reading input {name}"))?;
        result.push_str(&text);
    }
    result.push_str(&cfg.text);
    result.push('\n');
    result.push_str(&done);
    stage::write_atomic(&ctx.out_dir().join("result.txt"), result.as_bytes())?;
    // What differs between two runs of the same key goes to the run dir, not --out.
    ctx.write_run_file(
        "telemetry.json",
        format!("{{\"pid\": {}}}\n", std::process::id()).as_bytes(),
    )?;
    println!("toy_stage: wrote {} bytes", result.len());
    Ok(())
}
