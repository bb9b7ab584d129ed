//! Running model-written Python in a constrained subprocess (HumanEval).
//!
//! What each run gets (Linux):
//! - its own process, started as the leader of a new process group; on timeout, and after every
//!   run, the whole group is SIGKILLed, so forked helpers die with it;
//! - a wall-clock limit enforced by the parent, plus `RLIMIT_CPU` as a backstop;
//! - `RLIMIT_AS` / `RLIMIT_DATA` / `RLIMIT_STACK` memory caps (an allocation beyond them raises
//!   `MemoryError` inside Python), `RLIMIT_FSIZE` on written files, `RLIMIT_CORE = 0`;
//! - a fresh temporary working directory (deleted afterwards), an empty environment, stdin
//!   closed, stdout/stderr captured to files in that directory;
//! - a new network namespace (`unshare(CLONE_NEWNET)`, or with `CLONE_NEWUSER` when unprivileged)
//!   so there is no network interface but loopback — when the kernel allows it. Whether it did is
//!   probed once and reported in every result (`network_isolated`);
//! - in Python, the same guard nanochat applies: destructive `os`/`shutil`/`subprocess` functions
//!   replaced by `None` before the program runs, and the program `exec`'d with fresh globals.
//!
//! What it does NOT protect against: reading any file the user can read, writing outside the temp
//! dir through paths the guard does not cover (e.g. `open('/home/...', 'w')`), code that undoes the
//! Python guard (`ctypes`, re-importing modules), processes that leave the process group with
//! `setsid` before the final kill, and anything a kernel exploit can do. It is a seatbelt against
//! accidents of weak models, not a security boundary: run untrusted code in a VM or container.

use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

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
            require_network_isolation: false,
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
}

/// How the child's network is cut off.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum NetMode {
    NewNet,
    UserAndNet,
    None,
}

/// A configured sandbox; cheap to share across threads.
#[derive(Debug, Clone)]
pub struct Sandbox {
    cfg: SandboxConfig,
    python: PathBuf,
    net: NetMode,
}

/// Replaces dangerous functions with `None`, then runs `program.py` with fresh globals and
/// reports the outcome through the exit code and a nonce line that only this runner prints.
const RUNNER: &str = r#"import sys
_nonce = sys.argv[1]
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

impl Sandbox {
    /// Resolve the interpreter and probe network isolation.
    pub fn new(cfg: SandboxConfig) -> Result<Self> {
        let out = Command::new(&cfg.python)
            .args(["-c", "import sys; print(sys.executable)"])
            .stdin(Stdio::null())
            .output()
            .map_err(|e| EvalError::Sandbox(format!("cannot run {}: {e}", cfg.python)))?;
        if !out.status.success() {
            return Err(EvalError::Sandbox(format!(
                "{} -c ... failed: {}",
                cfg.python,
                String::from_utf8_lossy(&out.stderr)
            )));
        }
        let python = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        let mut sb = Sandbox {
            cfg,
            python,
            net: NetMode::None,
        };
        for mode in [NetMode::NewNet, NetMode::UserAndNet] {
            sb.net = mode;
            if sb.probe() {
                break;
            }
            sb.net = NetMode::None;
        }
        if sb.net == NetMode::None {
            if sb.cfg.require_network_isolation {
                return Err(EvalError::Sandbox(
                    "the kernel refused unshare(CLONE_NEWNET) with and without a user namespace; \
                     set require_network_isolation = false to run code with network access"
                        .into(),
                ));
            }
            tracing::warn!(
                "sandbox: network namespaces unavailable; generated code can reach the network"
            );
        }
        Ok(sb)
    }

    /// Whether runs are cut off from the network.
    pub fn network_isolated(&self) -> bool {
        self.net != NetMode::None
    }

    fn probe(&self) -> bool {
        let mut cmd = Command::new(&self.python);
        cmd.args(["-I", "-c", "pass"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        self.install_pre_exec(&mut cmd);
        matches!(cmd.status(), Ok(s) if s.success())
    }

    fn install_pre_exec(&self, cmd: &mut Command) {
        let mem = self.cfg.memory_bytes as libc::rlim_t;
        let fsize = self.cfg.max_file_bytes as libc::rlim_t;
        let cpu = (self.cfg.timeout_s.ceil() as libc::rlim_t) + 1;
        let net = self.net;
        // SAFETY: the closure runs in the forked child before exec and only makes
        // async-signal-safe system calls (setpgid, setrlimit, unshare); it allocates nothing.
        unsafe {
            cmd.pre_exec(move || {
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
                let flags = match net {
                    NetMode::NewNet => libc::CLONE_NEWNET,
                    NetMode::UserAndNet => libc::CLONE_NEWUSER | libc::CLONE_NEWNET,
                    NetMode::None => 0,
                };
                if flags != 0 && libc::unshare(flags) != 0 {
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
        let mut cmd = Command::new(&self.python);
        cmd.args(["-I", "-B", "runner.py", &nonce])
            .current_dir(path)
            .env_clear()
            .env("PATH", "/usr/bin:/bin")
            .env("HOME", path)
            .env("LANG", "C.UTF-8")
            .env("PYTHONIOENCODING", "utf-8")
            .stdin(Stdio::null())
            .stdout(out_f)
            .stderr(err_f);
        self.install_pre_exec(&mut cmd);
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
        // Whatever the program left running in its group dies now.
        kill_group(pgid);
        let read = |name: &str| read_capped(&path.join(name));
        let stdout = read("stdout.txt");
        let stderr = read("stderr.txt");
        let ran_through = status.code() == Some(0)
            && stdout.trim_end().rsplit('\n').next() == Some(nonce.as_str());
        let signal = status.signal();
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
        })
    }
}

fn kill_group(pgid: libc::pid_t) {
    // SAFETY: plain syscall; a negative pid addresses the process group we created.
    unsafe {
        libc::kill(-pgid, libc::SIGKILL);
    }
}

fn read_capped(path: &Path) -> String {
    let bytes = std::fs::read(path).unwrap_or_default();
    let end = bytes.len().min(MAX_CAPTURE);
    String::from_utf8_lossy(&bytes[..end]).into_owned()
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
