//! Helpers shared by the nanochat-run integration tests.
#![allow(dead_code)]

use std::process::{Command, Output};

/// Runs a prepared `nanochat-run` command (`args` label it) and echoes its output, which the
/// test harness shows when the test fails.
pub fn run(mut cmd: Command, args: &[&str]) -> Output {
    let out = cmd.output().unwrap();
    eprintln!(
        "$ nanochat-run {}\n{}{}",
        args.join(" "),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// [`run`], asserting success; returns stdout.
pub fn run_ok(cmd: Command, args: &[&str]) -> String {
    let out = run(cmd, args);
    assert!(out.status.success(), "nanochat-run {args:?} failed");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The rows of the summary table nanochat-run prints: (stage, status).
pub fn statuses(stdout: &str) -> Vec<(String, String)> {
    stdout
        .lines()
        .skip_while(|l| !l.starts_with("STAGE"))
        .skip(1)
        .filter_map(|l| {
            let mut it = l.split_whitespace();
            Some((it.next()?.to_string(), it.next()?.to_string()))
        })
        .collect()
}
