//! Running model-written Python in a constrained subprocess (HumanEval).
//!
//! Two modes, chosen once per [`Sandbox`] and recorded in every result ([`Isolation`]):
//!
//! - **bubblewrap** (when `bwrap` is installed and the kernel lets it make namespaces): the
//!   program runs in new user, PID, IPC, UTS and network namespaces (what bwrap is allowed to
//!   make is probed once, strongest first) with all capabilities dropped, in a new session,
//!   killed with its parent. It sees a read-only system (`/usr`, the interpreter's install)
//!   and nothing of the user's: no home directory, no `/etc/passwd`, no host `/tmp`; its working
//!   directory is in a private, size-limited tmpfs. When the run ends, the PID namespace goes,
//!   and every process in it with it, `setsid` or not. See `bubblewrap.rs`.
//! - **seatbelt** (fallback, or `bwrap = ""`): nanochat's protection, improved: the program is
//!   a process-group leader, the group is SIGKILLed at the end, the network is cut with
//!   `unshare(CLONE_NEWNET)` when the kernel allows, and otherwise it sees everything the user
//!   sees. `require_isolation = true` makes falling back an error.
//!
//! In both modes: a wall-clock limit enforced by the parent (`RLIMIT_CPU` as a backstop), memory
//! caps (`RLIMIT_AS`/`RLIMIT_DATA`/`RLIMIT_STACK`: a large allocation raises `MemoryError`),
//! `RLIMIT_FSIZE` on written files (stdout and stderr included), `RLIMIT_CORE = 0`, an empty
//! environment, stdin closed, a fresh working directory deleted afterwards, nanochat's Python
//! guard (destructive `os`/`shutil`/`subprocess` functions set to `None`), and a process-count
//! limit ([`ProcessLimit`]) where one can be had: a pids cgroup per run (holds for root too, and
//! lets the end of the run kill every process of it, in either mode), else — in bubblewrap mode,
//! not as root — `RLIMIT_NPROC` inside the sandbox's user namespace, which counts only the
//! sandbox's processes.
//!
//! The seatbelt is not a security boundary; bubblewrap is a real one, with the kernel as its
//! attack surface. docs/eval.md has the table of what each mode blocks, from the tests.

mod bubblewrap;
mod cgroup;

use std::ffi::CString;
use std::io::Read;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use self::bubblewrap::{Bubblewrap, PROFILES, WORK_DIR};
use self::cgroup::PidsHierarchy;
use crate::{EvalError, Result};

/// Limits for one execution.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SandboxConfig {
    /// Python interpreter (resolved to an absolute path once, via `sys.executable`).
    pub python: String,
    /// Wall-clock limit in seconds (nanochat: 5 s).
    pub timeout_s: f64,
    /// Address-space limit in bytes (nanochat: 256 MiB).
    pub memory_bytes: u64,
    /// Largest file the program may write, in bytes.
    pub max_file_bytes: u64,
    /// Most processes and threads a program may have at once, itself included (0: no limit).
    /// Enforced only where a mechanism exists; see [`ProcessLimit`].
    pub max_processes: u64,
    /// The bubblewrap program (a name looked up in `PATH`, or a path); `""` never uses it.
    pub bwrap: String,
    /// Size of the private `/tmp` that holds the working directory (bubblewrap mode).
    pub tmpfs_bytes: u64,
    /// Fail instead of falling back to the seatbelt when bubblewrap is missing or refused.
    pub require_isolation: bool,
    /// Fail instead of running without network isolation when the kernel refuses it.
    pub require_network_isolation: bool,
}

impl Default for SandboxConfig {
    fn default() -> Self {
        SandboxConfig {
            python: "python3".into(),
            timeout_s: 5.0,
            memory_bytes: 256 << 20,
            max_file_bytes: 16 << 20,
            max_processes: 64,
            bwrap: "bwrap".into(),
            tmpfs_bytes: 64 << 20,
            require_isolation: false,
            require_network_isolation: false,
        }
    }
}

/// Which sandbox ran a program.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Isolation {
    /// bubblewrap: namespaces, a read-only system view, a private tmpfs (module docs).
    Bubblewrap,
    /// The process-group seatbelt: no filesystem isolation.
    #[default]
    Seatbelt,
}

impl Isolation {
    /// The name used in configs, results and notes.
    pub fn as_str(self) -> &'static str {
        match self {
            Isolation::Bubblewrap => "bubblewrap",
            Isolation::Seatbelt => "seatbelt",
        }
    }
}

/// What bounds the number of processes a program can have at once.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ProcessLimit {
    /// A pids cgroup per run (`pids.max`): holds for root too.
    Cgroup,
    /// `RLIMIT_NPROC` inside the sandbox's own user namespace (bubblewrap, not root).
    Rlimit,
    /// Nothing but the wall clock (e.g. root without a writable cgroup hierarchy).
    #[default]
    None,
}

impl ProcessLimit {
    /// The name used in results and notes.
    pub fn as_str(self) -> &'static str {
        match self {
            ProcessLimit::Cgroup => "cgroup",
            ProcessLimit::Rlimit => "rlimit",
            ProcessLimit::None => "none",
        }
    }
}

/// What happened to one program.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ExecutionResult {
    /// The program ran to completion without raising.
    pub success: bool,
    /// Captured standard output of the program (truncated to 64 KiB).
    pub stdout: String,
    /// Captured standard error (truncated to 64 KiB).
    pub stderr: String,
    /// Short reason for failure (`None` on success).
    pub error: Option<String>,
    /// Killed for exceeding the time limit.
    pub timeout: bool,
    /// Ran out of its memory allowance.
    pub memory_exceeded: bool,
    /// Whether the run had no network access (see module docs).
    pub network_isolated: bool,
    /// Which sandbox ran it.
    #[serde(default)]
    pub isolation: Isolation,
    /// What bounded its process count.
    #[serde(default)]
    pub process_limit: ProcessLimit,
}

/// How the seatbelt's child cuts off its network.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum NetMode {
    NewNet,
    UserAndNet,
    None,
}

impl NetMode {
    fn unshare_flags(self) -> libc::c_int {
        match self {
            NetMode::NewNet => libc::CLONE_NEWNET,
            NetMode::UserAndNet => libc::CLONE_NEWUSER | libc::CLONE_NEWNET,
            NetMode::None => 0,
        }
    }
}

#[derive(Debug, Clone)]
enum Mode {
    Bubblewrap(Bubblewrap),
    Seatbelt(NetMode),
}

/// A configured sandbox; cheap to share across threads.
#[derive(Debug, Clone)]
pub struct Sandbox {
    cfg: SandboxConfig,
    python: PathBuf,
    mode: Mode,
    pids: Option<PidsHierarchy>,
    limit: ProcessLimit,
}

/// Processes bubblewrap adds to a run: the outer monitor and the namespace's init.
const BWRAP_PROCESSES: u64 = 2;

const INSTALL_HINT: &str = "install it (Debian/Ubuntu: `apt-get install bubblewrap`, Fedora: \
     `dnf install bubblewrap`, Arch: `pacman -S bubblewrap`) or set `sandbox.bwrap` to its path";

const USERNS_HINT: &str =
    "it needs user namespaces: check `sysctl kernel.unprivileged_userns_clone` \
     (Debian), `kernel.apparmor_restrict_unprivileged_userns` (Ubuntu >= 23.10) and \
     `user.max_user_namespaces`; in a container, the runtime must allow them (e.g. podman, or \
     docker with a seccomp profile that permits unshare)";

/// Sets the in-sandbox process limit when asked (argv[2] > 0: `RLIMIT_NPROC`, which must be
/// set inside bubblewrap's user namespace to count only the sandbox's processes), replaces
/// dangerous functions with `None`, then runs `program.py` with fresh globals and reports the
/// outcome through the exit code and a nonce line that only this runner prints. Its first
/// stderr line (`<nonce>-started`) tells a program that failed from one that never ran.
const RUNNER: &str = r#"import sys
_nonce = sys.argv[1]
sys.__stderr__.write(_nonce + "-started\n")
sys.__stderr__.flush()
_nproc = int(sys.argv[2])
if _nproc > 0:
    import resource
    resource.setrlimit(resource.RLIMIT_NPROC, (_nproc, _nproc))
    del resource
with open("program.py", encoding="utf-8") as _f:
    _source = _f.read()
import builtins, faulthandler, os, shutil, subprocess
faulthandler.disable()
os.environ["OMP_NUM_THREADS"] = "1"
_exit = os._exit
for _name in ("kill", "system", "putenv", "remove", "removedirs", "rmdir", "fchdir", "setuid",
              "fork", "forkpty", "killpg", "rename", "renames", "truncate", "replace", "unlink",
              "fchmod", "fchown", "chmod", "chown", "chroot", "lchflags", "lchmod", "lchown",
              "getcwd", "chdir"):
    if hasattr(os, _name):
        setattr(os, _name, None)
shutil.rmtree = None
shutil.move = None
shutil.chown = None
subprocess.Popen = None
builtins.exit = None
builtins.quit = None
builtins.help = None
for _mod in ("ipdb", "joblib", "resource", "psutil", "tkinter"):
    sys.modules[_mod] = None
try:
    exec(compile(_source, "program.py", "exec"), {})
except MemoryError as _e:
    sys.__stderr__.write("MemoryError: %s\n" % (_e,))
    sys.__stderr__.flush()
    _exit(3)
except BaseException as _e:
    sys.__stderr__.write("%s: %s\n" % (type(_e).__name__, _e))
    sys.__stderr__.flush()
    _exit(1)
sys.__stdout__.write("\n" + _nonce + "\n")
sys.__stdout__.flush()
_exit(0)
"#;

const MAX_CAPTURE: usize = 64 << 10;

/// The interpreter's absolute path and the directories it needs (prefixes and `sys.path`).
const PYTHON_INFO: &str = "import json, os, sys; print(json.dumps({'executable': sys.executable, \
     'roots': [sys.prefix, sys.exec_prefix, sys.base_prefix, sys.base_exec_prefix, \
     os.path.dirname(os.path.realpath(sys.executable))] + [p for p in sys.path if p]}))";

#[derive(Deserialize)]
struct PythonInfo {
    executable: PathBuf,
    roots: Vec<PathBuf>,
}

impl Sandbox {
    /// Resolve the interpreter, then find the strongest sandbox this machine allows: bubblewrap
    /// if installed and permitted (else the seatbelt, or an error with `require_isolation`),
    /// network isolation, and a process-count limit.
    pub fn new(cfg: SandboxConfig) -> Result<Self> {
        let info = query_python(&cfg.python)?;
        let mut sb = Sandbox {
            cfg,
            python: info.executable,
            mode: Mode::Seatbelt(NetMode::None),
            pids: None,
            limit: ProcessLimit::None,
        };
        sb.pids = sb.usable_pids_hierarchy();
        sb.mode = match sb.bubblewrap(&info.roots) {
            Ok(bw) => Mode::Bubblewrap(bw),
            Err(why) if sb.cfg.require_isolation => {
                return Err(EvalError::Sandbox(format!(
                    "require_isolation = true, but {why}; or set require_isolation = false to \
                     fall back to the weaker seatbelt sandbox"
                )))
            }
            Err(why) => {
                tracing::warn!(
                    "sandbox: {why}; falling back to the seatbelt, which does not stop \
                     generated code from reading or writing the user's files"
                );
                Mode::Seatbelt(sb.seatbelt_network()?)
            }
        };
        sb.limit = sb.process_limit_achieved();
        if !sb.network_isolated() {
            tracing::warn!("sandbox: no network namespace; generated code can reach the network");
        }
        if sb.limit == ProcessLimit::None && sb.cfg.max_processes > 0 {
            tracing::warn!(
                "sandbox: no process-count limit is available (no writable pids cgroup; \
                 RLIMIT_NPROC does not bind root); a fork bomb is stopped only by the time limit"
            );
        }
        tracing::debug!(
            isolation = sb.isolation().as_str(),
            network_isolated = sb.network_isolated(),
            process_limit = sb.limit.as_str(),
            "sandbox ready"
        );
        Ok(sb)
    }

    /// Which sandbox runs the programs.
    pub fn isolation(&self) -> Isolation {
        match self.mode {
            Mode::Bubblewrap(_) => Isolation::Bubblewrap,
            Mode::Seatbelt(_) => Isolation::Seatbelt,
        }
    }

    /// Whether runs are cut off from the network.
    pub fn network_isolated(&self) -> bool {
        match &self.mode {
            Mode::Bubblewrap(bw) => bw.profile.network,
            Mode::Seatbelt(net) => *net != NetMode::None,
        }
    }

    /// What bounds the number of processes of a run.
    pub fn process_limit(&self) -> ProcessLimit {
        self.limit
    }

    /// The first pids cgroup directory where a run's cgroup can be created and joined.
    fn usable_pids_hierarchy(&self) -> Option<PidsHierarchy> {
        if self.cfg.max_processes == 0 {
            return None;
        }
        PidsHierarchy::locate().into_iter().find(|hierarchy| {
            let run = match hierarchy.create_run(8) {
                Ok(run) => run,
                Err(e) => {
                    tracing::debug!(path = %hierarchy.path().display(), error = %e, "sandbox: no pids cgroup here");
                    return false;
                }
            };
            let mut cmd = Command::new(&self.python);
            cmd.args(["-I", "-c", "pass"]);
            self.install_pre_exec(&mut cmd, 0, Some(run.procs_file()));
            match probe(cmd) {
                Ok(()) => true,
                Err(e) => {
                    tracing::debug!(path = %hierarchy.path().display(), error = %e, "sandbox: cannot join a pids cgroup here");
                    false
                }
            }
        })
    }

    /// The first bubblewrap profile that starts the interpreter, or why there is none.
    fn bubblewrap(&self, python_roots: &[PathBuf]) -> std::result::Result<Bubblewrap, String> {
        if self.cfg.bwrap.is_empty() {
            return Err("bubblewrap is turned off (sandbox.bwrap = \"\")".into());
        }
        let program = Bubblewrap::find(&self.cfg.bwrap).ok_or_else(|| {
            format!(
                "bubblewrap (`{}`) is not installed; {INSTALL_HINT}",
                self.cfg.bwrap
            )
        })?;
        let mut refusals = Vec::new();
        // bwrap < 0.7 has no `--size`: then /tmp is unbounded (each file still max_file_bytes).
        for tmpfs_bytes in [Some(self.cfg.tmpfs_bytes), None] {
            if tmpfs_bytes.is_none() && !refusals.iter().any(|r: &String| r.contains("--size")) {
                break;
            }
            for profile in PROFILES {
                if !profile.network && self.cfg.require_network_isolation {
                    continue;
                }
                let bw = Bubblewrap::new(program.clone(), profile, python_roots, tmpfs_bytes);
                let mut cmd = bw.command(&self.python, &[], &["-I", "-c", "pass"]);
                self.install_pre_exec(&mut cmd, 0, None);
                match probe(cmd) {
                    Ok(()) => {
                        if tmpfs_bytes.is_none() {
                            tracing::warn!(
                                "sandbox: {} is older than 0.7 (no --size): the sandbox's /tmp \
                                 is not size-limited",
                                program.display()
                            );
                        }
                        return Ok(bw);
                    }
                    Err(e) => refusals.push(e),
                }
            }
        }
        Err(format!(
            "{} cannot start a sandbox here ({}); {USERNS_HINT}",
            program.display(),
            refusals.join("; ")
        ))
    }

    /// The seatbelt's network isolation: the first `unshare` the kernel allows.
    fn seatbelt_network(&self) -> Result<NetMode> {
        for mode in [NetMode::NewNet, NetMode::UserAndNet] {
            let mut cmd = Command::new(&self.python);
            cmd.args(["-I", "-c", "pass"]);
            self.install_pre_exec(&mut cmd, mode.unshare_flags(), None);
            if probe(cmd).is_ok() {
                return Ok(mode);
            }
        }
        if self.cfg.require_network_isolation {
            return Err(EvalError::Sandbox(
                "the kernel refused unshare(CLONE_NEWNET) with and without a user namespace; \
                 set require_network_isolation = false to run code with network access"
                    .into(),
            ));
        }
        Ok(NetMode::None)
    }

    fn process_limit_achieved(&self) -> ProcessLimit {
        if self.cfg.max_processes == 0 {
            return ProcessLimit::None;
        }
        if self.pids.is_some() {
            return ProcessLimit::Cgroup;
        }
        // SAFETY: plain syscall without arguments.
        let root = unsafe { libc::geteuid() } == 0;
        match &self.mode {
            // Only in a user namespace of its own does RLIMIT_NPROC count just the sandbox's
            // processes (Linux >= 5.14), and it never binds the host's root.
            Mode::Bubblewrap(bw) if bw.profile.userns && !root => ProcessLimit::Rlimit,
            _ => ProcessLimit::None,
        }
    }

    /// `pids.max` of a run's cgroup: the program's allowance plus bubblewrap's own processes.
    fn cgroup_max_tasks(&self) -> u64 {
        match self.mode {
            Mode::Bubblewrap(_) => self.cfg.max_processes + BWRAP_PROCESSES,
            Mode::Seatbelt(_) => self.cfg.max_processes,
        }
    }

    fn install_pre_exec(&self, cmd: &mut Command, unshare: libc::c_int, cgroup: Option<CString>) {
        let mem = self.cfg.memory_bytes as libc::rlim_t;
        let fsize = self.cfg.max_file_bytes as libc::rlim_t;
        let cpu = (self.cfg.timeout_s.ceil() as libc::rlim_t) + 1;
        // SAFETY: the closure runs in the forked child before exec and only makes
        // async-signal-safe system calls (open, write, close, setpgid, setrlimit, unshare); it
        // allocates nothing (the cgroup path was allocated before the fork).
        unsafe {
            cmd.pre_exec(move || {
                if let Some(procs) = &cgroup {
                    join_cgroup(procs)?;
                }
                if libc::setpgid(0, 0) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                let set = |res, v: libc::rlim_t| {
                    let lim = libc::rlimit {
                        rlim_cur: v,
                        rlim_max: v,
                    };
                    if libc::setrlimit(res, &lim) != 0 {
                        Err(std::io::Error::last_os_error())
                    } else {
                        Ok(())
                    }
                };
                set(libc::RLIMIT_AS, mem)?;
                set(libc::RLIMIT_DATA, mem)?;
                set(libc::RLIMIT_STACK, mem.min(64 << 20))?;
                set(libc::RLIMIT_FSIZE, fsize)?;
                set(libc::RLIMIT_CORE, 0)?;
                set(libc::RLIMIT_CPU, cpu)?;
                if unshare != 0 && libc::unshare(unshare) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
    }

    /// Run `program` (a complete Python program) and report what happened.
    pub fn execute(&self, program: &str) -> Result<ExecutionResult> {
        let dir = tempfile::Builder::new()
            .prefix("nanochat-sandbox-")
            .tempdir()
            .map_err(|e| EvalError::Sandbox(format!("cannot create a temp dir: {e}")))?;
        let path = dir.path();
        let write = |name: &str, text: &str| {
            std::fs::write(path.join(name), text).map_err(|e| EvalError::io(path.join(name), e))
        };
        write("program.py", program)?;
        write("runner.py", RUNNER)?;
        let nonce = format!("sandbox-ok-{:016x}{:016x}", rand_u64(), rand_u64());
        let file = |name: &str| {
            std::fs::File::create(path.join(name)).map_err(|e| EvalError::io(path.join(name), e))
        };
        let (out_f, err_f) = (file("stdout.txt")?, file("stderr.txt")?);
        let cgroup = match &self.pids {
            Some(h) => Some(h.create_run(self.cgroup_max_tasks()).map_err(|e| {
                EvalError::Sandbox(format!(
                    "cannot create a pids cgroup under {}: {e}",
                    h.path().display()
                ))
            })?),
            None => None,
        };
        // The init of bubblewrap's PID namespace shares the sandbox's user namespace.
        let nproc = match self.limit {
            ProcessLimit::Rlimit => (self.cfg.max_processes + 1).to_string(),
            _ => "0".to_string(),
        };
        let runner_args = ["-I", "-B", "runner.py", nonce.as_str(), nproc.as_str()];
        let (mut cmd, home, unshare) = match &self.mode {
            Mode::Bubblewrap(bw) => {
                let files = [path.join("program.py"), path.join("runner.py")];
                let cmd = bw.command(&self.python, &files, &runner_args);
                (cmd, Path::new(WORK_DIR), 0)
            }
            Mode::Seatbelt(net) => {
                let mut cmd = Command::new(&self.python);
                cmd.args(runner_args);
                (cmd, path, net.unshare_flags())
            }
        };
        cmd.current_dir(path)
            .env_clear()
            .env("PATH", "/usr/bin:/bin")
            .env("HOME", home)
            .env("LANG", "C.UTF-8")
            .env("PYTHONIOENCODING", "utf-8")
            .stdin(Stdio::null())
            .stdout(out_f)
            .stderr(err_f);
        self.install_pre_exec(&mut cmd, unshare, cgroup.as_ref().map(|c| c.procs_file()));
        let mut child = cmd.spawn().map_err(|e| {
            EvalError::Sandbox(format!("cannot start {}: {e}", self.python.display()))
        })?;
        let pgid = child.id() as libc::pid_t;
        let deadline = Instant::now() + Duration::from_secs_f64(self.cfg.timeout_s);
        let mut timed_out = false;
        let status = loop {
            match child.try_wait() {
                Ok(Some(s)) => break s,
                Ok(None) if Instant::now() >= deadline => {
                    timed_out = true;
                    kill_group(pgid);
                    break child
                        .wait()
                        .map_err(|e| EvalError::Sandbox(format!("wait failed: {e}")))?;
                }
                Ok(None) => std::thread::sleep(Duration::from_millis(5)),
                Err(e) => {
                    kill_group(pgid);
                    return Err(EvalError::Sandbox(format!("wait failed: {e}")));
                }
            }
        };
        // Whatever the program left running dies now: its process group (bubblewrap's PID
        // namespace goes with the bwrap process), then anything else in its cgroup.
        kill_group(pgid);
        drop(cgroup);
        let read = |name: &str| read_capped(&path.join(name));
        let stdout = read("stdout.txt");
        let stderr = read("stderr.txt");
        // The runner's first line: without it the program never ran (bwrap or the interpreter
        // failed to start), which must not be scored as a wrong answer.
        let started = format!("{nonce}-started\n");
        let stderr = match stderr.strip_prefix(started.as_str()) {
            Some(rest) => rest.to_string(),
            None if timed_out => stderr,
            None => {
                return Err(EvalError::Sandbox(format!(
                    "the {} sandbox did not start the program ({status}): {}",
                    self.isolation().as_str(),
                    stderr
                        .trim()
                        .lines()
                        .take(5)
                        .collect::<Vec<_>>()
                        .join(" | ")
                )))
            }
        };
        let ran_through = status.code() == Some(0)
            && stdout.trim_end().rsplit('\n').next() == Some(nonce.as_str());
        // bwrap reports a child killed by signal N as exit status 128 + N.
        let signal = status.signal().or(match (&self.mode, status.code()) {
            (Mode::Bubblewrap(_), Some(c)) if c > 128 => Some(c - 128),
            _ => None,
        });
        let cpu_killed = signal == Some(libc::SIGXCPU);
        let memory_exceeded = status.code() == Some(3) || stderr.contains("MemoryError");
        let timeout = timed_out || cpu_killed;
        let clean_stdout = match stdout.trim_end().strip_suffix(nonce.as_str()) {
            Some(s) if ran_through => s.strip_suffix('\n').unwrap_or(s).to_string(),
            _ => stdout.clone(),
        };
        let error = if ran_through {
            None
        } else if timeout {
            Some("timeout: execution exceeded the time limit (process group killed)".to_string())
        } else if memory_exceeded {
            Some("memory: memory limit exceeded".to_string())
        } else if let Some(sig) = signal {
            Some(format!("signal: killed by signal {sig}"))
        } else {
            let last = stderr.trim_end().lines().last().unwrap_or("").to_string();
            Some(format!(
                "exception: {}",
                if last.is_empty() {
                    format!("exit status {:?}", status.code())
                } else {
                    last
                }
            ))
        };
        Ok(ExecutionResult {
            success: ran_through,
            stdout: clean_stdout,
            stderr,
            error,
            timeout,
            memory_exceeded,
            network_isolated: self.network_isolated(),
            isolation: self.isolation(),
            process_limit: self.limit,
        })
    }
}

/// Ask the interpreter where it is and which directories it reads.
fn query_python(python: &str) -> Result<PythonInfo> {
    let out = Command::new(python)
        .args(["-I", "-c", PYTHON_INFO])
        .stdin(Stdio::null())
        .output()
        .map_err(|e| EvalError::Sandbox(format!("cannot run {python}: {e}")))?;
    if !out.status.success() {
        return Err(EvalError::Sandbox(format!(
            "{python} -c ... failed: {}",
            String::from_utf8_lossy(&out.stderr)
        )));
    }
    serde_json::from_slice(&out.stdout).map_err(|e| {
        EvalError::Sandbox(format!(
            "{python} printed something unexpected for its sys.executable and paths ({e}): {}",
            String::from_utf8_lossy(&out.stdout)
        ))
    })
}

/// Run a probe command to completion: `Ok` if it exited 0, else what it said.
fn probe(mut cmd: Command) -> std::result::Result<(), String> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("cannot start it: {e}"))?;
    if out.status.success() {
        return Ok(());
    }
    let stderr = String::from_utf8_lossy(&out.stderr);
    Err(match stderr.trim().lines().last() {
        Some(line) => line.to_string(),
        None => format!("{}", out.status),
    })
}

/// Move the calling process into a cgroup by writing `0` to its `cgroup.procs`.
///
/// # Safety
/// Called between fork and exec: only async-signal-safe syscalls.
unsafe fn join_cgroup(procs: &CString) -> std::io::Result<()> {
    let fd = libc::open(procs.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    let written = libc::write(fd, b"0".as_ptr().cast(), 1);
    let err = std::io::Error::last_os_error();
    libc::close(fd);
    if written != 1 {
        return Err(err);
    }
    Ok(())
}

fn kill_group(pgid: libc::pid_t) {
    // SAFETY: plain syscall; a negative pid addresses the process group we created.
    unsafe {
        libc::kill(-pgid, libc::SIGKILL);
    }
}

/// The first [`MAX_CAPTURE`] bytes of a file (the rest may be up to `max_file_bytes`).
fn read_capped(path: &Path) -> String {
    let mut bytes = Vec::new();
    if let Ok(f) = std::fs::File::open(path) {
        let _ = f.take(MAX_CAPTURE as u64).read_to_end(&mut bytes);
    }
    String::from_utf8_lossy(&bytes).into_owned()
}

/// A little entropy for the nonce without a `rand` dependency.
fn rand_u64() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0),
    );
    h.finish()
}
