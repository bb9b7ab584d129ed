//! Hostile programs in both sandbox modes. Each test runs its program under bubblewrap (when
//! `bwrap` is usable here; otherwise it prints a NOTICE and tests only the seatbelt) and under
//! the seatbelt, and asserts what that mode promises, including what the seatbelt does NOT
//! stop: docs/eval.md's table of what each mode blocks is written from these tests.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nanochat_eval::sandbox::{ExecutionResult, Isolation, ProcessLimit, Sandbox, SandboxConfig};

/// Generous: under CPU contention Python's start-up alone can take a second.
const TIMEOUT_S: f64 = 20.0;

fn config() -> SandboxConfig {
    SandboxConfig {
        timeout_s: TIMEOUT_S,
        ..Default::default()
    }
}

/// The sandboxes to test with `cfg`: bubblewrap (required, so no silent fallback) when usable,
/// and the seatbelt. Empty when there is no Python.
fn modes(cfg: SandboxConfig) -> Vec<Sandbox> {
    let mut out = Vec::new();
    match Sandbox::new(SandboxConfig {
        require_isolation: true,
        ..cfg.clone()
    }) {
        Ok(sb) => {
            assert_eq!(sb.isolation(), Isolation::Bubblewrap);
            out.push(sb);
        }
        Err(e) => eprintln!("NOTICE: bubblewrap is not usable here, its mode is not tested: {e}"),
    }
    match Sandbox::new(SandboxConfig {
        bwrap: String::new(),
        ..cfg
    }) {
        Ok(sb) => {
            assert_eq!(sb.isolation(), Isolation::Seatbelt);
            out.push(sb);
        }
        Err(e) => eprintln!("NOTICE: no python3 for the sandbox ({e}); skipping"),
    }
    out
}

fn run(sb: &Sandbox, program: &str) -> ExecutionResult {
    let out = sb.execute(program).unwrap();
    assert_eq!(out.isolation, sb.isolation(), "{out:?}");
    assert_eq!(out.network_isolated, sb.network_isolated(), "{out:?}");
    assert_eq!(out.process_limit, sb.process_limit(), "{out:?}");
    eprintln!(
        "{} (processes: {}): {:?}",
        sb.isolation().as_str(),
        sb.process_limit().as_str(),
        out.error
    );
    out
}

/// A name no other process has: hostile programs give it to the processes they leave behind
/// (`prctl(PR_SET_NAME)`, visible in `/proc/<pid>/comm` on the host) so survivors can be found.
fn unique_name() -> String {
    use std::sync::atomic::{AtomicU32, Ordering};
    static N: AtomicU32 = AtomicU32::new(0);
    format!(
        "sbx{:x}{:x}",
        std::process::id() % 0xffff,
        N.fetch_add(1, Ordering::Relaxed)
    )
}

/// Python that forks with `fork` (an expression), and in the child runs `then`, renames
/// itself to `name`, tells the parent and sleeps a minute; the parent returns once told.
fn fork_and_leave(fork: &str, then: &str, name: &str) -> String {
    format!(
        "import ctypes, os, posix, time\nr, w = os.pipe()\nif {fork} == 0:\n    {then}\n    \
         ctypes.CDLL(None).prctl(15, {name:?}.encode(), 0, 0, 0)\n    posix.write(w, b'.')\n    \
         time.sleep(60)\n    posix._exit(0)\nposix.read(r, 1)\n"
    )
}

/// Host pids of the processes named `name`.
fn processes_named(name: &str) -> Vec<u32> {
    let mut pids = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        if let Ok(comm) = std::fs::read_to_string(e.path().join("comm")) {
            if comm.trim_end() == name {
                pids.push(pid);
            }
        }
    }
    pids
}

/// Whether processes named `name` still exist 3 s after the run; kills them if so.
fn survivors(name: &str) -> bool {
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        let pids = processes_named(name);
        if pids.is_empty() {
            return false;
        }
        if Instant::now() >= deadline {
            for pid in pids {
                // SAFETY: plain syscall on a process this test's program created.
                unsafe {
                    libc::kill(pid as libc::pid_t, libc::SIGKILL);
                }
            }
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The user's home, or, where it is not writable by this test, a directory of the build tree
/// (also outside the sandbox's view) standing in for it.
fn home() -> PathBuf {
    let home = std::env::var_os("HOME").map(PathBuf::from);
    if let Some(h) = home.filter(|h| tempfile::tempfile_in(h).is_ok()) {
        return h;
    }
    eprintln!("NOTICE: $HOME is not writable; a directory of the build tree stands in for it");
    PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
}

/// A file in the user's home with secret contents, removed when dropped.
fn home_secret() -> (tempfile::NamedTempFile, String) {
    let secret = format!("secret-{}", unique_name());
    let mut f = tempfile::Builder::new()
        .prefix(".nanochat-sandbox-test-")
        .tempfile_in(home())
        .unwrap();
    std::io::Write::write_all(&mut f, secret.as_bytes()).unwrap();
    (f, secret)
}

#[test]
fn reading_system_and_home_files() {
    let (file, secret) = home_secret();
    let read_home = format!("print(open({:?}).read())\n", file.path());
    let read_passwd = "print(open('/etc/passwd').read().split(':')[0])\n";
    // through the shell too, once the guard is undone
    let cat_home = format!(
        "import ctypes\nctypes.CDLL(None).system(b'cat {}')\n",
        file.path().display()
    );
    for sb in modes(config()) {
        let home_out = run(&sb, &read_home);
        let passwd_out = run(&sb, read_passwd);
        let cat_out = run(&sb, &cat_home);
        match sb.isolation() {
            Isolation::Bubblewrap => {
                for out in [&home_out, &passwd_out] {
                    assert!(!out.success, "{out:?}");
                    assert!(
                        out.error.as_deref().unwrap().contains("FileNotFoundError"),
                        "{out:?}"
                    );
                }
                assert!(!home_out.stdout.contains(&secret), "{home_out:?}");
                assert!(!cat_out.stdout.contains(&secret), "{cat_out:?}");
                assert!(cat_out.stderr.contains("No such file"), "{cat_out:?}");
            }
            Isolation::Seatbelt => {
                // not blocked: the seatbelt has no filesystem isolation
                assert!(
                    home_out.success && home_out.stdout.contains(&secret),
                    "{home_out:?}"
                );
                assert!(passwd_out.success && passwd_out.stdout.contains("root"));
                assert!(cat_out.stdout.contains(&secret), "{cat_out:?}");
            }
        }
    }
}

#[test]
fn writing_outside_the_working_directory() {
    let host_dir = tempfile::tempdir().unwrap();
    let host_target = host_dir.path().join("written");
    let home_target = home().join(format!(".nanochat-sandbox-test-{}", unique_name()));
    let tmp_name = format!("nanochat-sandbox-test-{}", unique_name());
    let host_tmp_target = Path::new("/tmp").join(&tmp_name);
    for sb in modes(config()) {
        for target in [&host_target, &home_target] {
            let prog = format!("open({target:?}, 'w').write('x')\n");
            let out = run(&sb, &prog);
            match sb.isolation() {
                Isolation::Bubblewrap => {
                    assert!(!out.success, "{out:?}");
                    assert!(!target.exists(), "{} was written", target.display());
                }
                Isolation::Seatbelt => {
                    // not blocked
                    assert!(out.success, "{out:?}");
                    assert_eq!(std::fs::read_to_string(target).unwrap(), "x");
                    std::fs::remove_file(target).unwrap();
                }
            }
        }
        if sb.isolation() == Isolation::Bubblewrap {
            // The system is read-only; /tmp is the sandbox's own, gone after the run.
            let out = run(&sb, "open('/usr/nanochat-sandbox-test', 'w')\n");
            assert!(
                out.error
                    .as_deref()
                    .unwrap()
                    .contains("Read-only file system"),
                "{out:?}"
            );
            let prog = format!(
                "open('/tmp/{tmp_name}', 'w').write('x')\nopen('local.txt', 'w').write('y')\n\
                 print(open('/tmp/{tmp_name}').read() + open('local.txt').read())\n"
            );
            let out = run(&sb, &prog);
            assert!(out.success && out.stdout.trim() == "xy", "{out:?}");
            assert!(!host_tmp_target.exists());
            // the private /tmp is bounded (tmpfs_bytes, 64 MiB): filling it fails
            let prog = "for i in range(100):\n    open(f'f{i}', 'wb').write(b'x' * (4 << 20))\n";
            let out = run(&sb, prog);
            assert!(!out.success, "{out:?}");
            assert!(
                out.error.as_deref().unwrap().contains("No space left"),
                "{out:?}"
            );
        }
    }
}

#[test]
fn ctypes_system_and_fork_undo_the_python_guard() {
    let host_dir = tempfile::tempdir().unwrap();
    for sb in modes(config()) {
        // os.system is None, but libc's system() is a ctypes call away
        let target = host_dir
            .path()
            .join(format!("via-system-{}", sb.isolation().as_str()));
        let prog = format!(
            "import ctypes\nrc = ctypes.CDLL(None).system(b'echo pwned > {}')\nprint(rc)\n",
            target.display()
        );
        let out = run(&sb, &prog);
        assert!(out.success, "{out:?}");
        match sb.isolation() {
            Isolation::Bubblewrap => assert!(!target.exists(), "{out:?}"),
            Isolation::Seatbelt => {
                assert_eq!(std::fs::read_to_string(&target).unwrap(), "pwned\n");
            }
        }

        // os.fork is None, libc's fork() is not: the child outlives the program
        let name = unique_name();
        let prog = fork_and_leave("ctypes.CDLL(None).fork()", "pass", &name);
        let t0 = Instant::now();
        let out = run(&sb, &prog);
        assert!(out.success, "{out:?}");
        assert!(t0.elapsed().as_secs_f64() < TIMEOUT_S, "{out:?}");
        // contained in both modes: the process group is killed at the end of the run
        assert!(
            !survivors(&name),
            "{}: the forked child survived",
            sb.isolation().as_str()
        );
    }
}

#[test]
fn the_time_limit_kills_the_program_and_its_children() {
    let cfg = SandboxConfig {
        timeout_s: 3.0,
        ..Default::default()
    };
    for sb in modes(cfg) {
        let name = unique_name();
        // the program names itself, so its children (and itself) can be looked for afterwards
        let prog = format!(
            "import ctypes, posix, time\nctypes.CDLL(None).prctl(15, {name:?}.encode(), 0, 0, 0)\n\
             for _ in range(3):\n    if posix.fork() == 0:\n        time.sleep(60)\n\
             while True:\n    pass\n"
        );
        let t0 = Instant::now();
        let out = run(&sb, &prog);
        assert!(!out.success && out.timeout, "{out:?}");
        assert!(t0.elapsed().as_secs_f64() < 15.0);
        assert!(
            !survivors(&name),
            "{}: children survived",
            sb.isolation().as_str()
        );
    }
}

#[test]
fn setsid_then_sleep() {
    for sb in modes(config()) {
        let name = unique_name();
        // os.setsid is not in nanochat's guard; posix.fork is the unguarded os.fork
        let prog = fork_and_leave("posix.fork()", "os.setsid()", &name);
        let out = run(&sb, &prog);
        assert!(out.success, "{out:?}");
        let survived = survivors(&name);
        match (sb.isolation(), sb.process_limit()) {
            // the PID namespace dies with the run
            (Isolation::Bubblewrap, _) => assert!(!survived),
            // the run's cgroup is killed at the end, wherever its processes went
            (Isolation::Seatbelt, ProcessLimit::Cgroup) => assert!(!survived),
            // not blocked: it left the process group that is killed
            (Isolation::Seatbelt, _) => assert!(survived, "expected the seatbelt to leak it"),
        }
    }
}

#[test]
fn fork_bomb() {
    const MAX: u64 = 16;
    let cfg = SandboxConfig {
        max_processes: MAX,
        timeout_s: 5.0,
        ..Default::default()
    };
    for sb in modes(cfg) {
        // Count how many sleeping children can be forked (at most 40).
        let name = unique_name();
        let prog = format!(
            "import ctypes, posix, time\nn = 0\ntry:\n    for _ in range(40):\n        if posix.fork() == 0:\n            \
             ctypes.CDLL(None).prctl(15, {name:?}.encode(), 0, 0, 0)\n            time.sleep(60)\n        \
             n += 1\nexcept OSError as e:\n    print(e)\nprint(n)\n"
        );
        let out = run(&sb, &prog);
        assert!(out.success, "{out:?}");
        let forked: u64 = out.stdout.trim().lines().last().unwrap().parse().unwrap();
        assert!(
            !survivors(&name),
            "{}: forked children survived",
            sb.isolation().as_str()
        );
        if sb.process_limit() == ProcessLimit::None {
            // not blocked (root without a writable pids cgroup): only the time limit and the
            // final kill stop a fork bomb, so the exponential one is not run here
            eprintln!(
                "NOTICE: {}: no process-count limit here; fork bomb not run",
                sb.isolation().as_str()
            );
            assert_eq!(forked, 40, "{out:?}");
            continue;
        }
        assert!(
            forked < MAX,
            "forked {forked} children with max_processes = {MAX}"
        );
        assert!(
            out.stdout.contains("Resource temporarily unavailable"),
            "{out:?}"
        );

        // The real thing: every process forks forever.
        let name = unique_name();
        let prog = format!(
            "import ctypes, posix\nctypes.CDLL(None).prctl(15, {name:?}.encode(), 0, 0, 0)\n\
             while True:\n    try:\n        posix.fork()\n    except OSError:\n        pass\n"
        );
        let t0 = Instant::now();
        let out = run(&sb, &prog);
        assert!(!out.success && out.timeout, "{out:?}");
        assert!(t0.elapsed().as_secs_f64() < 30.0);
        assert!(
            !survivors(&name),
            "{}: the fork bomb survived",
            sb.isolation().as_str()
        );
    }
}

#[test]
fn socket_to_an_outside_address() {
    let prog = "import socket\ns = socket.socket()\ns.settimeout(5)\ns.connect(('1.1.1.1', 80))\n";
    let udp = "import socket\ns = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n\
               s.sendto(b'x', ('8.8.8.8', 53))\n";
    for sb in modes(config()) {
        if !sb.network_isolated() {
            eprintln!(
                "NOTICE: {}: no network namespace here; network isolation not tested",
                sb.isolation().as_str()
            );
            continue;
        }
        for p in [prog, udp] {
            let out = run(&sb, p);
            assert!(!out.success, "{out:?}");
            assert!(
                out.error
                    .as_deref()
                    .unwrap()
                    .contains("Network is unreachable"),
                "{out:?}"
            );
        }
    }
}

#[test]
fn allocating_10_gb() {
    for sb in modes(config()) {
        let out = run(&sb, "x = bytearray(10 * 1024 ** 3)\n");
        assert!(!out.success && out.memory_exceeded, "{out:?}");
        let out = run(&sb, "xs = []\nwhile True:\n    xs.append(' ' * 10**6)\n");
        assert!(!out.success && out.memory_exceeded, "{out:?}");
    }
}

#[test]
fn printing_100_mb() {
    let prog = "import sys\nline = 'x' * 10**6\nfor _ in range(100):\n    sys.stdout.write(line)\n";
    for sb in modes(config()) {
        let t0 = Instant::now();
        let out = run(&sb, prog);
        // stdout is a file limited to max_file_bytes (16 MiB) by RLIMIT_FSIZE; 64 KiB are read
        assert!(!out.success, "{out:?}");
        assert!(
            out.error.as_deref().unwrap().contains("File too large"),
            "{out:?}"
        );
        assert!(out.stdout.len() <= 64 << 10);
        assert!(out.stdout.starts_with("xxxx"));
        assert!(t0.elapsed().as_secs_f64() < TIMEOUT_S);
    }
}

/// The top-level directories the interpreter's install needs (e.g. `root` for pyenv).
fn python_tops() -> Vec<String> {
    let out = std::process::Command::new("python3")
        .args([
            "-I",
            "-c",
            "import sys; print('\\n'.join([sys.prefix, sys.base_prefix]))",
        ])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| Path::new(l).components().nth(1))
        .map(|c| c.as_os_str().to_string_lossy().into_owned())
        .collect()
}

#[test]
fn the_sandbox_sees_only_its_own_processes_and_no_user_files() {
    for sb in modes(config()) {
        if sb.isolation() != Isolation::Bubblewrap {
            continue;
        }
        let prog = "import os, json\nprint(sorted(int(p) for p in os.listdir('/proc') if p.isdigit()))\n\
                    print(os.environ.get('HOME'))\nprint(json.dumps(sorted(os.listdir('/'))))\n\
                    print(json.dumps(sorted(os.listdir('/etc')) if os.path.isdir('/etc') else []))\n";
        let out = run(&sb, prog);
        assert!(out.success, "{out:?}");
        let mut lines = out.stdout.lines();
        // the namespace's init (bwrap) and the interpreter
        assert_eq!(lines.next(), Some("[1, 2]"), "{out:?}");
        assert_eq!(lines.next(), Some("/tmp/sandbox"), "{out:?}");
        let root: Vec<String> = serde_json::from_str(lines.next().unwrap()).unwrap();
        let system = [
            "bin", "dev", "etc", "lib", "lib32", "lib64", "libx32", "proc", "sbin",
        ];
        let tops = python_tops();
        for entry in &root {
            assert!(
                system.contains(&entry.as_str())
                    || ["tmp", "usr"].contains(&entry.as_str())
                    || tops.contains(entry),
                "/{entry} is visible in the sandbox: {root:?}"
            );
        }
        let etc: Vec<String> = serde_json::from_str(lines.next().unwrap()).unwrap();
        for entry in &etc {
            assert!(
                entry.starts_with("ld.so") || entry.starts_with("python"),
                "/etc/{entry} is visible in the sandbox: {etc:?}"
            );
        }
    }
}

/// A program the sandbox could not start (here: an interpreter that cannot load in 4 MiB) is
/// an error, not a wrong answer that would silently lower a score.
#[test]
fn a_program_that_never_started_is_an_error() {
    let cfg = SandboxConfig {
        memory_bytes: 4 << 20,
        ..config()
    };
    for bwrap in ["bwrap", ""] {
        let Ok(sb) = Sandbox::new(SandboxConfig {
            bwrap: bwrap.into(),
            ..cfg.clone()
        }) else {
            eprintln!("NOTICE: no python3; skipping");
            return;
        };
        let err = sb.execute("pass\n").unwrap_err().to_string();
        assert!(err.contains("did not start the program"), "{err}");
    }
}

/// `require_isolation = true` refuses the seatbelt.
#[test]
fn require_isolation_makes_the_fallback_an_error() {
    let cfg = SandboxConfig {
        bwrap: "/nonexistent/bwrap".into(),
        require_isolation: true,
        ..Default::default()
    };
    match Sandbox::new(cfg.clone()) {
        Ok(sb) => panic!("fell back to {:?}", sb.isolation()),
        Err(e) => {
            let msg = e.to_string();
            if msg.contains("cannot run python3") {
                eprintln!("NOTICE: no python3; skipping");
                return;
            }
            assert!(msg.contains("require_isolation"), "{msg}");
            assert!(msg.contains("not installed"), "{msg}");
            assert!(msg.contains("apt-get install bubblewrap"), "{msg}");
        }
    }
    let sb = Sandbox::new(SandboxConfig {
        require_isolation: false,
        ..cfg
    })
    .unwrap();
    assert_eq!(sb.isolation(), Isolation::Seatbelt);
    assert_eq!(sb.execute("pass\n").unwrap().isolation, Isolation::Seatbelt);
}

/// HumanEval scores do not depend on the mode: the 164 canonical solutions, the 164 prompts
/// with `pass` as body, and 164 wrong-but-running completions (each problem given the next
/// problem's canonical body) get the same outcome, item by item, under bubblewrap and the
/// seatbelt.
#[test]
#[ignore = "runs 984 Python processes (~45 s on 2 cores); scripts/slow-tests.sh"]
fn shared_humaneval_outcomes_are_the_same_in_both_modes() {
    use nanochat_eval::chat::{grade_completions, load_chat_task, ChatKind, GenerativeOptions};
    let Some(shared) = nanochat_eval::testing::shared_dir() else {
        return;
    };
    let sandboxes = modes(SandboxConfig::default());
    if sandboxes.len() < 2 {
        eprintln!("NOTICE: one sandbox mode only; nothing to compare");
        return;
    }
    let file = shared.join("data/eval/humaneval.jsonl.gz");
    let task = load_chat_task("HumanEval", &file, None, None).unwrap();
    assert_eq!(task.items.len(), 164);
    let rows = nanochat_eval::jsonl::read_jsonl(&file).unwrap();
    let body: std::collections::HashMap<String, String> = rows
        .iter()
        .map(|l| {
            let v = l.value.as_ref().unwrap();
            let id = v["task_id"].as_str().unwrap().to_string();
            (id, v["canonical_solution"].as_str().unwrap().to_string())
        })
        .collect();
    let ids: Vec<&String> = task
        .items
        .iter()
        .map(|i| match &i.kind {
            ChatKind::HumanEval { task_id, .. } => task_id,
            _ => unreachable!(),
        })
        .collect();
    let n = ids.len();
    let families: [(&str, Vec<Result<String, String>>); 3] = [
        (
            "canonical",
            (0..n)
                .map(|i| Ok(format!("{}{}", task.items[i].user, body[ids[i]])))
                .collect(),
        ),
        (
            "pass",
            (0..n)
                .map(|i| Ok(format!("{}    pass\n", task.items[i].user)))
                .collect(),
        ),
        (
            "shifted",
            (0..n)
                .map(|i| Ok(format!("{}{}", task.items[i].user, body[ids[(i + 1) % n]])))
                .collect(),
        ),
    ];
    let opts = GenerativeOptions {
        exec_workers: 2,
        ..Default::default()
    };
    for (family, completions) in &families {
        let mut per_mode = Vec::new();
        for sb in &sandboxes {
            let t0 = Instant::now();
            let results = grade_completions(&task, completions, &opts, Some(sb)).unwrap();
            let passed = results.iter().filter(|r| r.correct).count();
            eprintln!(
                "{family}: {} passed {passed}/{n} in {:.1} s",
                sb.isolation().as_str(),
                t0.elapsed().as_secs_f64()
            );
            per_mode.push(results);
        }
        let (a, b) = (&per_mode[0], &per_mode[1]);
        for (ra, rb) in a.iter().zip(b) {
            assert_eq!(
                (ra.correct, &ra.error),
                (rb.correct, &rb.error),
                "{family} {}: bubblewrap and seatbelt disagree",
                ra.expected
            );
        }
        let passed = a.iter().filter(|r| r.correct).count();
        match *family {
            "canonical" => assert_eq!(passed, n),
            "pass" => assert_eq!(passed, 0),
            _ => {}
        }
    }
}
