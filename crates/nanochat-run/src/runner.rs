//! Execution: the scheduler, stage child processes, signal forwarding, summaries, status.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fs::File;
use std::io::{Read, Write};
use std::path::PathBuf;
use std::process::{Command, ExitCode, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{bail, Context, Result};
use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
use nanochat_artifacts::stage::{StageArgs, RUN_DIR_ENV};
use nanochat_artifacts::{
    write_atomic, ArtifactStore, MachineInfo, ObjectId, ProducerRecord, RunRecord, StageRecord,
    VerifyMode,
};

use crate::pipeline::{Launch, Pipeline, Stage};
use crate::plan::{decide, Binaries, Decision};

/// Options of a pipeline run.
#[derive(Debug, Clone)]
pub struct RunOptions {
    pub jobs: usize,
    pub force: Vec<String>,
    pub only: Vec<String>,
    pub from: Option<String>,
    pub dry_run: bool,
    pub keep_going: bool,
    pub verify: VerifyMode,
}

#[derive(Debug, Clone, PartialEq)]
enum State {
    Pending,
    Running,
    Done(ObjectId),
    Failed,
    Excluded,
}

/// What a stage worker reports back.
struct WorkerResult {
    status: &'static str,
    object: Option<ObjectId>,
    log: Option<ObjectId>,
    exit_code: Option<i32>,
    duration: Duration,
    detail: Option<String>,
}

/// Shared between the scheduler, workers and the signal thread.
struct Shared {
    /// Stage index -> the pids of its running processes (one per local rank).
    children: Mutex<HashMap<usize, Vec<u32>>>,
    /// Pids of `srun` processes. A single SIGINT only makes srun print its tasks' states, and
    /// SIGTERM makes it kill the step at once; two SIGINTs within a second make it send SIGINT
    /// to every task, then SIGTERM and, after Slurm's KillWait, SIGKILL. So they get two.
    srun_pids: Mutex<BTreeSet<u32>>,
    interrupted: AtomicBool,
    signals: AtomicUsize,
}

fn check_stage_names(pipeline: &Pipeline, names: &[String], flag: &str) -> Result<()> {
    for n in names {
        if pipeline.stage(n).is_none() {
            let all: Vec<&str> = pipeline.stages.iter().map(|s| s.name.as_str()).collect();
            bail!(
                "{flag} {n}: no such stage in {} (stages: {})",
                pipeline.file.display(),
                all.join(", ")
            );
        }
    }
    Ok(())
}

/// Stages rerun even when cached, each with the flag that asked for it (the reason shown).
type Forced = BTreeMap<String, String>;

/// (selected, forced) stage names for the options.
fn selection(pipeline: &Pipeline, opts: &RunOptions) -> Result<(BTreeSet<String>, Forced)> {
    check_stage_names(pipeline, &opts.force, "--force")?;
    check_stage_names(pipeline, &opts.only, "--only")?;
    if let Some(f) = &opts.from {
        check_stage_names(pipeline, std::slice::from_ref(f), "--from")?;
    }
    let mut forced: Forced = opts
        .force
        .iter()
        .map(|s| (s.clone(), format!("--force {s}")))
        .collect();
    let selected: BTreeSet<String> = if !opts.only.is_empty() {
        for s in &opts.only {
            forced
                .entry(s.clone())
                .or_insert_with(|| format!("--only {s}: rerun on its cached inputs"));
        }
        opts.only.iter().cloned().collect()
    } else if let Some(from) = &opts.from {
        forced
            .entry(from.clone())
            .or_insert_with(|| format!("--from {from}: rerun, then what depends on it"));
        pipeline.descendants(from).into_iter().collect()
    } else {
        pipeline.stages.iter().map(|s| s.name.clone()).collect()
    };
    Ok((selected, forced))
}

/// One row of a dry run or status report.
struct PlanRow {
    stage: String,
    action: String,
    output: String,
    why: String,
}

/// Simulates a run without executing anything.
fn simulate(
    store: &ArtifactStore,
    pipeline: &Pipeline,
    binaries: &Binaries,
    selected: &BTreeSet<String>,
    forced: &Forced,
    mode: VerifyMode,
) -> Vec<PlanRow> {
    let mut known: HashMap<String, ObjectId> = HashMap::new();
    let mut rows = Vec::new();
    for stage in &pipeline.stages {
        let pending: Vec<&String> = stage
            .inputs
            .values()
            .filter(|src| !known.contains_key(*src))
            .collect();
        let sel = selected.contains(&stage.name);
        if !pending.is_empty() {
            let names: Vec<&str> = pending.iter().map(|s| s.as_str()).collect();
            rows.push(PlanRow {
                stage: stage.name.clone(),
                action: if sel { "run" } else { "blocked" }.into(),
                output: "-".into(),
                why: format!("input from {} will be rebuilt first", names.join(", ")),
            });
            continue;
        }
        let inputs: BTreeMap<String, ObjectId> = stage
            .inputs
            .iter()
            .map(|(name, src)| (name.clone(), known[src].clone()))
            .collect();
        match decide(
            store,
            pipeline,
            stage,
            binaries,
            &inputs,
            forced.get(&stage.name).map(String::as_str),
            mode,
        ) {
            Ok(Decision::Cached { entry, .. }) => {
                rows.push(PlanRow {
                    stage: stage.name.clone(),
                    action: "cached".into(),
                    output: entry.object.short().to_string(),
                    why: String::new(),
                });
                known.insert(stage.name.clone(), entry.object);
            }
            Ok(Decision::Run { reasons, .. }) => rows.push(PlanRow {
                stage: stage.name.clone(),
                action: if sel { "run" } else { "stale" }.into(),
                output: "-".into(),
                why: reasons.join("; "),
            }),
            Err(e) => rows.push(PlanRow {
                stage: stage.name.clone(),
                action: "error".into(),
                output: "-".into(),
                why: format!("{e:#}"),
            }),
        }
    }
    rows
}

fn print_table(header: [&str; 4], rows: &[[String; 4]]) {
    let mut w = [0usize; 3];
    for r in rows.iter().map(|r| &r[..3]).chain(std::iter::once(
        &[
            header[0].to_string(),
            header[1].to_string(),
            header[2].to_string(),
        ][..],
    )) {
        for (i, c) in r.iter().enumerate() {
            w[i] = w[i].max(c.chars().count());
        }
    }
    let mut out = std::io::stdout().lock();
    let _ = writeln!(
        out,
        "{:<w0$}  {:<w1$}  {:<w2$}  {}",
        header[0],
        header[1],
        header[2],
        header[3],
        w0 = w[0],
        w1 = w[1],
        w2 = w[2]
    );
    for r in rows {
        let _ = writeln!(
            out,
            "{:<w0$}  {:<w1$}  {:<w2$}  {}",
            r[0],
            r[1],
            r[2],
            r[3],
            w0 = w[0],
            w1 = w[1],
            w2 = w[2]
        );
    }
}

/// What each stage does and which outside data it reads (present or missing, and the command
/// that fetches it), then how to serve the result: the part of `--dry-run` and `status` that
/// explains the pipeline on a machine that has none of its data yet.
fn explain(pipeline: &Pipeline, shown: &BTreeSet<String>) {
    let stages: Vec<&Stage> = pipeline
        .stages
        .iter()
        .filter(|s| shown.contains(&s.name))
        .collect();
    if stages
        .iter()
        .all(|s| s.about.is_none() && s.needs.is_empty())
        && pipeline.serve.is_none()
    {
        return;
    }
    let width = stages.iter().map(|s| s.name.len()).max().unwrap_or(0);
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "\nstages:");
    let mut fetch: Vec<&str> = Vec::new();
    for s in &stages {
        let _ = writeln!(
            out,
            "  {:<width$}  {}",
            s.name,
            s.about.as_deref().unwrap_or("(no description)")
        );
        for need in &s.needs {
            let present = std::path::Path::new(&need.path).exists();
            let _ = writeln!(
                out,
                "  {:<width$}    reads {}: {}",
                "",
                need.path,
                if present {
                    "present".to_string()
                } else {
                    format!("MISSING, fetch with `{}`", need.fetch)
                }
            );
            if !present && !fetch.contains(&need.fetch.as_str()) {
                fetch.push(&need.fetch);
            }
        }
    }
    if !fetch.is_empty() {
        let _ = writeln!(out, "\nmissing data: fetch it first with");
        for f in fetch {
            let _ = writeln!(out, "  {f}");
        }
    }
    if let Some(sv) = &pipeline.serve {
        let _ = writeln!(
            out,
            "\nserve: `nanochat-run serve --pipeline {}` starts the chat server on the {} output (runs/{}/{}){}",
            pipeline.file.display(),
            sv.stage,
            pipeline.name,
            sv.stage,
            sv.config
                .as_ref()
                .map(|c| format!(", server config {}", c.display()))
                .unwrap_or_default()
        );
    }
}

/// `nanochat-run status PIPELINE`.
pub fn status(store: &ArtifactStore, pipeline: &Pipeline, mode: VerifyMode) -> Result<ExitCode> {
    let binaries = Binaries::default();
    let all: BTreeSet<String> = pipeline.stages.iter().map(|s| s.name.clone()).collect();
    let rows = simulate(store, pipeline, &binaries, &all, &Forced::new(), mode);
    println!("pipeline {} ({})", pipeline.name, pipeline.file.display());
    let table: Vec<[String; 4]> = rows
        .into_iter()
        .map(|r| {
            let state = match r.action.as_str() {
                "run" => "stale".to_string(),
                other => other.to_string(),
            };
            [r.stage, state, r.output, r.why]
        })
        .collect();
    print_table(["STAGE", "STATE", "OUTPUT", "WHY"], &table);
    explain(pipeline, &all);
    Ok(ExitCode::SUCCESS)
}

/// `git rev-parse HEAD` of the working directory, asked once per process.
fn git_rev() -> Option<String> {
    static REV: std::sync::OnceLock<Option<String>> = std::sync::OnceLock::new();
    REV.get_or_init(|| {
        let out = Command::new("git")
            .args(["rev-parse", "HEAD"])
            .stderr(Stdio::null())
            .output()
            .ok()?;
        out.status
            .success()
            .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
    })
    .clone()
}

/// Runs (or dry-runs) a pipeline.
pub fn run(
    store: &ArtifactStore,
    pipeline: &Pipeline,
    opts: &RunOptions,
    progress: MultiProgress,
) -> Result<ExitCode> {
    let (selected, forced) = selection(pipeline, opts)?;
    let binaries = Binaries::default();

    // Every selected stage and its ancestors need their binary (to compute keys); fail fast.
    let mut needed: BTreeSet<String> = selected.clone();
    for stage in pipeline.stages.iter().rev() {
        if needed.contains(&stage.name) {
            needed.extend(stage.inputs.values().cloned());
        }
    }
    let excluded: Vec<bool> = pipeline
        .stages
        .iter()
        .map(|s| !needed.contains(&s.name))
        .collect();
    if !opts.dry_run {
        let missing: Vec<String> = pipeline
            .stages
            .iter()
            .filter(|s| needed.contains(&s.name))
            .filter_map(|s| {
                binaries
                    .get(&s.run)
                    .err()
                    .map(|e| format!("stage {}: {e:#}", s.name))
            })
            .collect();
        if !missing.is_empty() {
            bail!("{}", missing.join("\n"));
        }
    }

    if opts.dry_run {
        let rows = simulate(store, pipeline, &binaries, &selected, &forced, opts.verify);
        println!(
            "dry run of pipeline {} ({}): nothing is executed",
            pipeline.name,
            pipeline.file.display()
        );
        let table: Vec<[String; 4]> = rows
            .into_iter()
            .filter(|r| needed.contains(&r.stage))
            .map(|r| {
                let action = match r.action.as_str() {
                    "run" => "would run".to_string(),
                    "stale" | "blocked" => "would fail (not selected, not cached)".to_string(),
                    other => other.to_string(),
                };
                [r.stage, action, r.output, r.why]
            })
            .collect();
        print_table(["STAGE", "ACTION", "OUTPUT", "WHY"], &table);
        explain(pipeline, &needed);
        return Ok(ExitCode::SUCCESS);
    }

    let started_at = SystemTime::now();
    let t0 = Instant::now();
    let shared = Arc::new(Shared {
        children: Mutex::new(HashMap::new()),
        srun_pids: Mutex::new(BTreeSet::new()),
        interrupted: AtomicBool::new(false),
        signals: AtomicUsize::new(0),
    });
    let mut signals = signal_hook::iterator::Signals::new([
        signal_hook::consts::SIGINT,
        signal_hook::consts::SIGTERM,
    ])
    .context("installing signal handlers")?;
    let sig_handle = signals.handle();
    let sig_thread = {
        let shared = Arc::clone(&shared);
        let progress = progress.clone();
        std::thread::spawn(move || {
            for sig in signals.forever() {
                shared.interrupted.store(true, Ordering::SeqCst);
                let n = shared.signals.fetch_add(1, Ordering::SeqCst) + 1;
                let forward = if n == 1 { sig } else { libc::SIGKILL };
                progress.suspend(|| {
                    eprintln!(
                        "{}",
                        if n == 1 {
                            "interrupted: asking running stages to save and stop (again to kill them)"
                        } else {
                            "interrupted again: killing running stages"
                        }
                    )
                });
                if let Ok(children) = shared.children.lock() {
                    let srun = shared
                        .srun_pids
                        .lock()
                        .map(|s| s.clone())
                        .unwrap_or_default();
                    for &pid in children.values().flatten() {
                        // SAFETY: plain syscall; the pid is a child we spawned and have not reaped.
                        unsafe { libc::kill(pid as libc::pid_t, forward) };
                    }
                    if forward != libc::SIGKILL && !srun.is_empty() {
                        interrupt_srun_again(Arc::clone(&shared), srun, forward);
                    }
                }
            }
        })
    };

    let n = pipeline.stages.len();
    let overall = progress.add(ProgressBar::new(
        excluded.iter().filter(|e| !**e).count() as u64
    ));
    overall.set_style(
        ProgressStyle::with_template("{prefix} [{bar:30}] {pos}/{len} stages  {elapsed}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    overall.set_prefix(pipeline.name.clone());

    // Stages outside the selection and its ancestors are not part of this run.
    let mut state: Vec<State> = excluded
        .iter()
        .map(|&e| if e { State::Excluded } else { State::Pending })
        .collect();
    let mut records: Vec<Option<StageRecord>> = vec![None; n];
    let mut stop = false;
    let mut failed_any = false;
    let (tx, rx) = mpsc::channel::<(usize, Result<WorkerResult>)>();

    std::thread::scope(|scope| -> Result<()> {
        let mut running = 0usize;
        loop {
            if shared.interrupted.load(Ordering::SeqCst) {
                stop = true;
            }
            let mut progressed = true;
            while progressed {
                progressed = false;
                for i in 0..n {
                    if state[i] != State::Pending {
                        continue;
                    }
                    let stage = &pipeline.stages[i];
                    let idx_of = |name: &str| pipeline.stages.iter().position(|s| s.name == name);
                    let failed_inputs: Vec<&str> = stage
                        .inputs
                        .values()
                        .filter(|src| idx_of(src).is_some_and(|j| state[j] == State::Failed))
                        .map(String::as_str)
                        .collect();
                    if !failed_inputs.is_empty() {
                        state[i] = State::Failed;
                        records[i] = Some(record(
                            stage,
                            "skipped",
                            vec![format!(
                                "input from {} did not complete",
                                failed_inputs.join(", ")
                            )],
                        ));
                        overall.inc(1);
                        progressed = true;
                        continue;
                    }
                    let mut inputs = BTreeMap::new();
                    for (name, src) in &stage.inputs {
                        if let Some(State::Done(id)) = idx_of(src).map(|j| &state[j]) {
                            inputs.insert(name.clone(), id.clone());
                        }
                    }
                    if inputs.len() != stage.inputs.len() || stop {
                        continue;
                    }
                    let forced_by = forced.get(&stage.name).map(String::as_str);
                    let decision = match decide(
                        store,
                        pipeline,
                        stage,
                        &binaries,
                        &inputs,
                        forced_by,
                        opts.verify,
                    ) {
                        Ok(d) => d,
                        Err(e) => {
                            tracing::error!(stage = %stage.name, "{e:#}");
                            state[i] = State::Failed;
                            records[i] = Some(record(stage, "failed", vec![format!("{e:#}")]));
                            failed_any = true;
                            stop |= !opts.keep_going;
                            overall.inc(1);
                            progressed = true;
                            continue;
                        }
                    };
                    match decision {
                        Decision::Cached { key, entry } => {
                            tracing::info!(stage = %stage.name, object = %entry.object.short(), "cached");
                            let mut r = record(stage, "cached", vec![]);
                            r.key = Some(key);
                            r.object = Some(entry.object.clone());
                            r.log = entry.log.clone();
                            records[i] = Some(r);
                            // Keep the human refs pointing at what this pipeline now uses.
                            set_refs(store, pipeline, stage, &entry.object)?;
                            state[i] = State::Done(entry.object);
                            overall.inc(1);
                            progressed = true;
                        }
                        Decision::Run { key, reasons, .. } if !selected.contains(&stage.name) => {
                            let why = format!(
                                "not up to date ({}) and not selected; run it first (e.g. without --only/--from)",
                                reasons.join("; ")
                            );
                            tracing::error!(stage = %stage.name, "{why}");
                            let mut r = record(stage, "stale", vec![why]);
                            r.key = Some(key);
                            records[i] = Some(r);
                            state[i] = State::Failed;
                            failed_any = true;
                            stop |= !opts.keep_going;
                            overall.inc(1);
                            progressed = true;
                        }
                        Decision::Run {
                            key,
                            fingerprint,
                            config,
                            reasons,
                        } => {
                            if running >= opts.jobs {
                                continue;
                            }
                            tracing::info!(stage = %stage.name, key = %key.short(), why = %reasons.join("; "), "running");
                            let mut r = record(stage, "running", reasons);
                            r.key = Some(key.clone());
                            records[i] = Some(r);
                            state[i] = State::Running;
                            running += 1;
                            progressed = true;
                            let job = Job {
                                stage: stage.clone(),
                                key,
                                fingerprint: fingerprint.to_value(),
                                config,
                                inputs,
                                forced: forced_by.is_some(),
                            };
                            let tx = tx.clone();
                            let shared = Arc::clone(&shared);
                            let progress = progress.clone();
                            let binaries = &binaries;
                            scope.spawn(move || {
                                let res = run_stage(
                                    store,
                                    pipeline,
                                    binaries,
                                    &job,
                                    i,
                                    &shared,
                                    &progress,
                                    opts.verify,
                                );
                                let _ = tx.send((i, res));
                            });
                        }
                    }
                }
            }
            if running == 0 {
                break;
            }
            let Ok((i, res)) = rx.recv() else { break };
            running -= 1;
            overall.inc(1);
            let stage = &pipeline.stages[i];
            let r = records[i].get_or_insert_with(|| record(stage, "failed", vec![]));
            match res {
                Ok(w) => {
                    r.status = w.status.to_string();
                    r.exit_code = w.exit_code;
                    r.duration_s = w.duration.as_secs_f64();
                    r.log = w.log;
                    if let Some(d) = w.detail {
                        r.reasons.push(d);
                    }
                    match w.object {
                        Some(obj) if w.status == "ran" || w.status == "cached" => {
                            r.object = Some(obj.clone());
                            state[i] = State::Done(obj);
                        }
                        _ => {
                            state[i] = State::Failed;
                            failed_any = true;
                            stop |= !opts.keep_going;
                        }
                    }
                }
                Err(e) => {
                    tracing::error!(stage = %stage.name, "{e:#}");
                    r.status = "failed".into();
                    r.reasons.push(format!("{e:#}"));
                    state[i] = State::Failed;
                    failed_any = true;
                    stop |= !opts.keep_going;
                }
            }
        }
        Ok(())
    })?;
    overall.finish_and_clear();
    sig_handle.close();
    let _ = sig_thread.join();

    let interrupted = shared.interrupted.load(Ordering::SeqCst);
    for (i, s) in state.iter().enumerate() {
        if *s == State::Pending {
            let stage = &pipeline.stages[i];
            let why = if interrupted {
                "interrupted before it started"
            } else {
                "not started (an earlier stage failed; --keep-going runs independent stages)"
            };
            records[i] = Some(record(stage, "not-run", vec![why.into()]));
        }
    }
    let stage_records: Vec<StageRecord> = records.into_iter().flatten().collect();
    let run_record = RunRecord {
        pipeline: pipeline.name.clone(),
        started: nanochat_artifacts::rfc3339_utc(started_at),
        duration_s: t0.elapsed().as_secs_f64(),
        host: MachineInfo::current().host,
        git_rev: git_rev(),
        argv: std::env::args().collect(),
        stages: stage_records.clone(),
    };
    let record_path = store.write_run_record(&run_record)?;

    let table: Vec<[String; 4]> = stage_records
        .iter()
        .map(|r| {
            [
                r.stage.clone(),
                r.status.clone(),
                if r.status == "cached" || r.duration_s == 0.0 {
                    "-".into()
                } else {
                    format!("{:.1}s", r.duration_s)
                },
                format!(
                    "{}{}",
                    r.object
                        .as_ref()
                        .map_or("-".to_string(), |o| o.short().to_string()),
                    if r.reasons.is_empty() {
                        String::new()
                    } else {
                        format!("  {}", r.reasons.join("; "))
                    }
                ),
            ]
        })
        .collect();
    let count = |s: &str| stage_records.iter().filter(|r| r.status == s).count();
    println!(
        "pipeline {}: {} ran, {} cached, {} failed in {:.1}s (record: {})",
        pipeline.name,
        count("ran"),
        count("cached"),
        stage_records.len() - count("ran") - count("cached"),
        t0.elapsed().as_secs_f64(),
        record_path.display()
    );
    print_table(["STAGE", "STATUS", "TIME", "OUTPUT / WHY"], &table);
    Ok(if interrupted {
        ExitCode::from(130)
    } else if failed_any {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}

fn record(stage: &Stage, status: &str, reasons: Vec<String>) -> StageRecord {
    StageRecord {
        stage: stage.name.clone(),
        key: None,
        status: status.into(),
        exit_code: None,
        duration_s: 0.0,
        object: None,
        log: None,
        reasons,
    }
}

fn set_refs(
    store: &ArtifactStore,
    pipeline: &Pipeline,
    stage: &Stage,
    object: &ObjectId,
) -> Result<()> {
    store.set_ref(&format!("runs/{}/{}", pipeline.name, stage.name), object)?;
    store.set_ref(&format!("latest/{}", stage.name), object)?;
    Ok(())
}

struct Job {
    stage: Stage,
    key: nanochat_artifacts::StageKey,
    fingerprint: serde_json::Value,
    config: toml::Table,
    inputs: BTreeMap<String, ObjectId>,
    forced: bool,
}

/// Copies a child's output stream into the shared log and shows its latest line. With a
/// `label` (the rank of a multi-rank stage) every line is prefixed with it, written whole.
fn pump(mut src: impl Read, log: Arc<Mutex<File>>, bar: ProgressBar, label: Option<String>) {
    let mut buf = [0u8; 8192];
    let mut pending = String::new();
    let mut partial: Vec<u8> = Vec::new();
    loop {
        let n = match src.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        match &label {
            None => {
                if let Ok(mut f) = log.lock() {
                    let _ = f.write_all(&buf[..n]);
                }
            }
            Some(l) => {
                partial.extend_from_slice(&buf[..n]);
                if let Some(cut) = partial.iter().rposition(|&b| b == b'\n') {
                    let mut out = Vec::with_capacity(cut + 64);
                    for line in partial[..=cut].split_inclusive(|&b| b == b'\n') {
                        out.extend_from_slice(l.as_bytes());
                        out.extend_from_slice(line);
                    }
                    partial.drain(..=cut);
                    if let Ok(mut f) = log.lock() {
                        let _ = f.write_all(&out);
                    }
                }
            }
        }
        pending.push_str(&String::from_utf8_lossy(&buf[..n]));
        if let Some(last) = pending.split(['\n', '\r']).rfind(|l| !l.trim().is_empty()) {
            bar.set_message(last.trim().to_string());
        }
        if let Some(cut) = pending.rfind(['\n', '\r']) {
            pending.drain(..=cut);
        }
    }
    if let (Some(l), false) = (&label, partial.is_empty()) {
        if let Ok(mut f) = log.lock() {
            let _ = f.write_all(l.as_bytes());
            let _ = f.write_all(&partial);
            let _ = f.write_all(b"\n");
        }
    }
}

/// How long the other ranks of a stage get to exit after one rank failed (their collectives
/// fail within seconds on their own; this bounds a rank stuck elsewhere, e.g. waiting for a
/// rendezvous that the failed rank never reached) before they are killed.
const RANK_GRACE: Duration = Duration::from_secs(5);

/// A port on 127.0.0.1 that nobody listens on now (what torchrun's standalone mode does).
fn free_local_port() -> Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0")
        .context("finding a free port on 127.0.0.1 for the ranks' rendezvous")?;
    Ok(l.local_addr()?.port())
}

/// One process of a stage: a local rank, the single process, or `srun`.
struct Proc {
    /// `rank N` for local ranks.
    label: Option<String>,
    cmd: Command,
}

/// The `srun` command line of a Slurm stage (before the stage binary and its arguments).
pub fn srun_args(nodes: u32, ranks_per_node: u32, extra: &[String]) -> Vec<String> {
    let mut a = vec![
        format!("--nodes={nodes}"),
        format!("--ntasks={}", nodes * ranks_per_node),
        format!("--ntasks-per-node={ranks_per_node}"),
        // One failing task ends the step, and every line says which task wrote it.
        "--kill-on-bad-exit=1".to_string(),
        "--label".to_string(),
    ];
    a.extend(extra.iter().cloned());
    a
}

#[allow(clippy::too_many_arguments)]
fn run_stage(
    store: &ArtifactStore,
    pipeline: &Pipeline,
    binaries: &Binaries,
    job: &Job,
    idx: usize,
    shared: &Arc<Shared>,
    progress: &MultiProgress,
    mode: VerifyMode,
) -> Result<WorkerResult> {
    let stage = &job.stage;
    let (bin, _) = binaries.get(&stage.run)?;
    // Only one process runs a given stage key at a time; a second `nanochat-run` waits here
    // and then finds the result in the cache.
    let lock = store.lock_work(&job.key)?;
    if !job.forced {
        if let Some(entry) = store.cache_get(&job.key)? {
            if store.verify(&entry.object, mode).is_ok() {
                set_refs(store, pipeline, stage, &entry.object)?;
                return Ok(WorkerResult {
                    status: "cached",
                    object: Some(entry.object),
                    log: entry.log,
                    exit_code: None,
                    duration: Duration::ZERO,
                    detail: Some("produced meanwhile by another run".into()),
                });
            }
        }
    } else if lock.dir().exists() {
        std::fs::remove_dir_all(lock.dir())
            .with_context(|| format!("clearing work dir {}", lock.dir().display()))?;
        std::fs::create_dir_all(lock.dir())?;
    }
    let resumed = std::fs::read_dir(lock.dir()).is_ok_and(|mut d| d.next().is_some());
    let config_path = store.root().join("work").join(format!("{}.toml", job.key));
    // A config file is handed over verbatim, so a stage's "file:line:column" error points at
    // the same line the user sees in their file; inline tables are serialized.
    let config_text = match &stage.config {
        crate::pipeline::ConfigSource::File(p) => {
            std::fs::read_to_string(p).with_context(|| format!("reading config {}", p.display()))?
        }
        _ => toml::to_string(&job.config).context("serializing the resolved config")?,
    };
    write_atomic(&config_path, config_text.as_bytes())?;

    let out = store.staging()?;
    let log_staging = store.staging()?;
    let log_path = log_staging.dir().join(format!("{}.log", stage.name));
    let log = Arc::new(Mutex::new(
        File::create(&log_path).with_context(|| format!("creating {}", log_path.display()))?,
    ));
    let args = StageArgs {
        config: config_path.clone(),
        inputs: job
            .inputs
            .iter()
            .map(|(name, id)| (name.clone(), store.object_data(id)))
            .collect(),
        out: out.dir().to_path_buf(),
        work: lock.dir().to_path_buf(),
    };
    let base = |program: &std::path::Path, run_dir: &std::path::Path| {
        let mut cmd = Command::new(program);
        cmd.envs(&stage.env)
            .env("NANOCHAT_STAGE", &stage.name)
            .env("NANOCHAT_STAGE_KEY", job.key.as_str())
            .env(RUN_DIR_ENV, run_dir)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        {
            use std::os::unix::process::CommandExt;
            // Own process group: a terminal Ctrl-C reaches only nanochat-run, which forwards it
            // exactly once (and escalates on a second Ctrl-C).
            cmd.process_group(0);
            #[cfg(target_os = "linux")]
            // SAFETY: prctl is async-signal-safe; it makes the kernel send SIGTERM to the stage
            // if nanochat-run dies, so an orphan never keeps writing into the work dir.
            unsafe {
                cmd.pre_exec(|| {
                    libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM);
                    Ok(())
                });
            }
        }
        cmd
    };
    let threads = |cmd: &mut Command, per_rank_default: Option<usize>| {
        if stage.env.contains_key("RAYON_NUM_THREADS") {
            return;
        }
        if let Some(t) = stage.resources.threads {
            cmd.env("RAYON_NUM_THREADS", t.to_string());
        } else if let Some(t) = per_rank_default {
            cmd.env("RAYON_NUM_THREADS", t.to_string());
        }
    };
    // Only rank 0's --out is published; the other local ranks write into scratch dirs that
    // are dropped with this function.
    let mut scratch_outs = Vec::new();
    let mut procs: Vec<Proc> = Vec::new();
    let launch_note: String;
    match &stage.launch {
        Launch::Single => {
            let mut cmd = base(&bin, out.run_dir());
            cmd.args(args.to_argv());
            threads(&mut cmd, None);
            procs.push(Proc { label: None, cmd });
            launch_note = String::new();
        }
        Launch::Local { ranks } => {
            let world = *ranks as usize;
            let port = free_local_port()?;
            let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
            let per_rank = (cores / world).max(1);
            for rank in 0..world {
                let mut rank_args = args.clone();
                let mut run_dir = out.run_dir().to_path_buf();
                if rank > 0 {
                    let scratch = store.staging()?;
                    rank_args.out = scratch.dir().to_path_buf();
                    run_dir = scratch.run_dir().to_path_buf();
                    scratch_outs.push(scratch);
                }
                let env = nanochat_dist::DistEnv {
                    rank,
                    world_size: world,
                    local_rank: rank,
                    local_world_size: world,
                    master_addr: "127.0.0.1".into(),
                    master_port: port,
                    launcher: nanochat_dist::Launcher::Torchrun,
                    job_tag: format!("{}-{}", job.key.short(), std::process::id()),
                };
                let mut cmd = base(&bin, &run_dir);
                cmd.args(rank_args.to_argv()).envs(env.to_vars());
                threads(&mut cmd, Some(per_rank));
                procs.push(Proc {
                    label: Some(format!("[rank {rank}] ")),
                    cmd,
                });
            }
            launch_note = format!(
                "\n# launch: {world} local ranks, rendezvous at 127.0.0.1:{port}, {} threads each; only rank 0's --out is published",
                stage.resources.threads.map_or(per_rank, |t| t as usize)
            );
        }
        Launch::Slurm {
            nodes,
            ranks_per_node,
            srun_args: extra,
        } => {
            let srun = std::env::var_os("NANOCHAT_SRUN").unwrap_or_else(|| "srun".into());
            let mut cmd = base(std::path::Path::new(&srun), out.run_dir());
            let sargs = srun_args(*nodes, *ranks_per_node, extra);
            cmd.args(&sargs).arg(&bin).args(args.to_argv());
            threads(&mut cmd, None);
            launch_note = format!(
                "\n# launch: {} {} (the store must be on a filesystem every node mounts at {})",
                srun.to_string_lossy(),
                sargs.join(" "),
                store.root().display()
            );
            procs.push(Proc { label: None, cmd });
        }
    }
    if let Ok(mut f) = log.lock() {
        let _ = writeln!(
            f,
            "# nanochat-run: pipeline {} stage {} key {}{}\n# config: {}\n# {} {}{launch_note}",
            pipeline.name,
            stage.name,
            job.key,
            if resumed {
                " (resuming from work dir)"
            } else {
                ""
            },
            match &stage.config {
                crate::pipeline::ConfigSource::File(p) =>
                    format!("{} (copied verbatim)", p.display()),
                crate::pipeline::ConfigSource::Inline(_) =>
                    format!("inline table in {}", pipeline.file.display()),
                crate::pipeline::ConfigSource::Empty => "none (empty table)".to_string(),
            },
            bin.display(),
            args.to_argv()
                .iter()
                .map(|a| a.to_string_lossy().into_owned())
                .collect::<Vec<_>>()
                .join(" ")
        );
    }
    let bar = progress.add(ProgressBar::new_spinner());
    bar.set_style(
        ProgressStyle::with_template("{spinner} {prefix:.bold} {elapsed} {wide_msg}")
            .unwrap_or_else(|_| ProgressStyle::default_spinner()),
    );
    bar.set_prefix(stage.name.clone());
    bar.enable_steady_tick(Duration::from_millis(200));

    let started = SystemTime::now();
    let t0 = Instant::now();
    let mut children = Vec::with_capacity(procs.len());
    let mut pumps = Vec::new();
    for Proc { label, mut cmd } in procs {
        let spawned = cmd
            .spawn()
            .with_context(|| format!("starting {}", bin.display()));
        let mut child = match spawned {
            Ok(c) => c,
            Err(e) => {
                // Ranks already started would wait for the missing one: stop them.
                for c in &mut children {
                    let _ = std::process::Child::kill(c);
                    let _ = c.wait();
                }
                if let Ok(mut c) = shared.children.lock() {
                    c.remove(&idx);
                }
                return Err(e);
            }
        };
        if let Ok(mut c) = shared.children.lock() {
            c.entry(idx).or_default().push(child.id());
            if matches!(stage.launch, Launch::Slurm { .. }) {
                if let Ok(mut s) = shared.srun_pids.lock() {
                    s.insert(child.id());
                }
            }
        }
        for stream in [
            child
                .stdout
                .take()
                .map(|s| Box::new(s) as Box<dyn Read + Send>),
            child
                .stderr
                .take()
                .map(|s| Box::new(s) as Box<dyn Read + Send>),
        ]
        .into_iter()
        .flatten()
        {
            let log = Arc::clone(&log);
            let bar = bar.clone();
            let label = label.clone();
            pumps.push(std::thread::spawn(move || pump(stream, log, bar, label)));
        }
        children.push(child);
    }
    // A signal may have arrived between the scheduler's check and the spawn.
    if shared.interrupted.load(Ordering::SeqCst) {
        for c in &children {
            // SAFETY: plain syscall on our own unreaped child.
            unsafe { libc::kill(c.id() as libc::pid_t, libc::SIGINT) };
        }
        if matches!(stage.launch, Launch::Slurm { .. }) {
            let pids = children.iter().map(|c| c.id()).collect();
            interrupt_srun_again(Arc::clone(shared), pids, libc::SIGINT);
        }
    }
    let status = wait_ranks(&mut children, idx, shared);
    if let Ok(mut c) = shared.children.lock() {
        c.remove(&idx);
    }
    for p in pumps {
        let _ = p.join();
    }
    drop(scratch_outs);
    let (status, failed_rank) = status.context("waiting for the stage process")?;
    let duration = t0.elapsed();
    bar.finish_and_clear();
    progress.remove(&bar);

    let exit_code = status.code().or_else(|| {
        use std::os::unix::process::ExitStatusExt;
        status.signal().map(|s| 128 + s)
    });
    if let Ok(mut f) = log.lock() {
        let _ = writeln!(
            f,
            "# nanochat-run: {status} after {:.1}s",
            duration.as_secs_f64()
        );
        let _ = f.sync_all();
    }
    // Every execution's telemetry stays readable in its log object, also when the output
    // object already existed (and so keeps its first producer's run dir) or was not published.
    copy_files(
        out.run_dir(),
        &log_staging.dir().join(nanochat_artifacts::RUN_DIR),
    )?;
    let log_id = store.publish(log_staging)?;
    store.set_ref(&format!("logs/{}/{}", pipeline.name, stage.name), &log_id)?;

    if !status.success() {
        let interrupted = shared.interrupted.load(Ordering::SeqCst);
        let tail = log_tail(
            &store
                .object_data(&log_id)
                .join(format!("{}.log", stage.name)),
            15,
        );
        let msg = format!(
            "stage {} {} ({status}); work dir kept for resume: {}\n--- last lines of its log ({}) ---\n{tail}",
            stage.name,
            if interrupted { "interrupted" } else { "failed" },
            lock.dir().display(),
            store.object_data(&log_id).join(format!("{}.log", stage.name)).display(),
        );
        progress.suspend(|| eprintln!("{msg}"));
        return Ok(WorkerResult {
            status: if interrupted { "interrupted" } else { "failed" },
            object: None,
            log: Some(log_id),
            exit_code,
            duration,
            detail: Some(match failed_rank {
                Some(r) => format!(
                    "rank {r} was the first seen to fail ({status}); every rank's output is in the log"
                ),
                None => status.to_string(),
            }),
        });
    }
    ProducerRecord {
        pipeline: pipeline.name.clone(),
        stage: stage.name.clone(),
        key: job.key.clone(),
        started: nanochat_artifacts::rfc3339_utc(started),
        duration_s: duration.as_secs_f64(),
        resumed,
        inputs: job.inputs.clone(),
        log: Some(log_id.clone()),
        machine: MachineInfo::current(),
        git_rev: git_rev(),
    }
    .write(out.run_dir())?;
    let object = store
        .publish(out)
        .with_context(|| format!("publishing the output of stage {}", stage.name))?;
    store.cache_put(&ArtifactStore::new_cache_entry(
        job.key.clone(),
        &stage.name,
        object.clone(),
        Some(log_id.clone()),
        job.fingerprint.clone(),
    ))?;
    set_refs(store, pipeline, stage, &object)?;
    store.set_last_key(&pipeline.name, &stage.name, &job.key)?;
    store.remove_work(lock)?;
    let _ = std::fs::remove_file(&config_path);
    tracing::info!(stage = %stage.name, object = %object.short(), seconds = duration.as_secs_f64(), "published");
    Ok(WorkerResult {
        status: "ran",
        object: Some(object),
        log: Some(log_id),
        exit_code,
        duration,
        detail: resumed.then(|| "resumed from work dir".to_string()),
    })
}

/// Copies the regular files of `src` (recursively) into `dst`.
fn copy_files(src: &std::path::Path, dst: &std::path::Path) -> Result<()> {
    for entry in std::fs::read_dir(src).with_context(|| format!("listing {}", src.display()))? {
        let entry = entry.with_context(|| format!("listing {}", src.display()))?;
        let (from, to) = (entry.path(), dst.join(entry.file_name()));
        if from.is_dir() {
            copy_files(&from, &to)?;
        } else if from.is_file() {
            std::fs::create_dir_all(dst).with_context(|| format!("creating {}", dst.display()))?;
            std::fs::copy(&from, &to).with_context(|| format!("copying {}", from.display()))?;
        }
    }
    Ok(())
}

fn log_tail(path: &PathBuf, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// Waits for every process of a stage. The first to fail makes the others stop: SIGTERM at
/// once, SIGKILL after [`RANK_GRACE`]. Returns the status that decides the stage (the first
/// failure, else rank 0's) and, for a multi-rank stage, the rank that failed first.
fn wait_ranks(
    children: &mut [std::process::Child],
    idx: usize,
    shared: &Shared,
) -> std::io::Result<(std::process::ExitStatus, Option<usize>)> {
    let n = children.len();
    let mut done: Vec<Option<std::process::ExitStatus>> = vec![None; n];
    let mut first_failure: Option<usize> = None;
    let mut kill_at: Option<Instant> = None;
    let mut killed = false;
    let pids: Vec<u32> = children.iter().map(|c| c.id()).collect();
    loop {
        for (r, c) in children.iter_mut().enumerate() {
            if done[r].is_some() {
                continue;
            }
            let Some(st) = c.try_wait()? else { continue };
            done[r] = Some(st);
            // Reaped: its pid may be reused, so it must not be signalled any more.
            if let Ok(mut m) = shared.children.lock() {
                if let Some(running) = m.get_mut(&idx) {
                    running.retain(|&p| p != c.id());
                }
                if let Ok(mut s) = shared.srun_pids.lock() {
                    s.remove(&c.id());
                }
            }
            if !st.success() && first_failure.is_none() {
                first_failure = Some(r);
                if n > 1 {
                    tracing::error!(rank = r, "{st}: stopping the other ranks of the stage");
                    for (o, &pid) in pids.iter().enumerate() {
                        if done[o].is_none() {
                            // SAFETY: plain syscall on our own unreaped child.
                            unsafe { libc::kill(pid as libc::pid_t, libc::SIGTERM) };
                        }
                    }
                    kill_at = Some(Instant::now() + RANK_GRACE);
                }
            }
        }
        if done.iter().all(Option::is_some) {
            break;
        }
        if !killed && kill_at.is_some_and(|t| Instant::now() >= t) {
            for (o, other) in children.iter_mut().enumerate() {
                if done[o].is_none() {
                    let _ = other.kill();
                }
            }
            killed = true;
        }
        std::thread::sleep(Duration::from_millis(if n > 1 { 20 } else { 5 }));
    }
    let decisive = first_failure.unwrap_or(0);
    let status = done[decisive].unwrap_or_else(|| {
        use std::os::unix::process::ExitStatusExt;
        std::process::ExitStatus::from_raw(1 << 8)
    });
    Ok((status, first_failure.filter(|_| n > 1)))
}

/// The second signal an `srun` needs (see [`Shared::srun_pids`]), 300 ms after the first, to
/// those of `pids` that are still running.
fn interrupt_srun_again(shared: Arc<Shared>, pids: BTreeSet<u32>, sig: libc::c_int) {
    std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(300));
        let Ok(children) = shared.children.lock() else {
            return;
        };
        for &pid in children.values().flatten() {
            if pids.contains(&pid) {
                // SAFETY: plain syscall; the pid is still in the map, so not yet reaped.
                unsafe { libc::kill(pid as libc::pid_t, sig) };
            }
        }
    });
}
