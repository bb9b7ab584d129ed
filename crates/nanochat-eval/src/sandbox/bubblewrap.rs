//! The command line that runs the interpreter under bubblewrap (`bwrap`).
//!
//! The sandbox sees a read-only system: `/usr` (and the `/bin`, `/lib`... links or directories
//! next to it), the dynamic loader's cache, Python's `/etc/python*` files, and the interpreter's
//! own install (its prefixes and `sys.path`, read-only, when they are outside `/usr`, as for
//! pyenv or a virtual environment). Nothing else of the host is visible: no `/home`, `/root`,
//! `/etc/passwd`, `/tmp` or `/work`. `/tmp` is a private tmpfs of bounded size that holds the
//! working directory; `/`, `/dev` (a minimal one) are read-only; `/proc` is the sandbox's own.

use std::path::{Path, PathBuf};
use std::process::Command;

/// Where the working directory is inside the sandbox.
pub(super) const WORK_DIR: &str = "/tmp/sandbox";

/// A set of namespace flags, tried in order until bwrap accepts one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Profile {
    /// bwrap's namespace arguments.
    flags: &'static [&'static str],
    /// The sandbox has its own network namespace (only loopback).
    pub(super) network: bool,
    /// The sandbox has its own user namespace (required, not just tried).
    pub(super) userns: bool,
}

/// Strongest first. `--unshare-all` is user(try), ipc, pid, net, uts, cgroup(try);
/// `--disable-userns` (bwrap >= 0.8) stops the program from making nested user namespaces.
pub(super) const PROFILES: [Profile; 3] = [
    Profile {
        flags: &["--unshare-all", "--unshare-user", "--disable-userns"],
        network: true,
        userns: true,
    },
    Profile {
        flags: &["--unshare-all"],
        network: true,
        userns: false,
    },
    // No network namespace (e.g. refused by a container runtime): still a private filesystem
    // and PID namespace; the missing network isolation is recorded.
    Profile {
        flags: &[
            "--unshare-user-try",
            "--unshare-ipc",
            "--unshare-pid",
            "--unshare-uts",
            "--unshare-cgroup-try",
        ],
        network: false,
        userns: false,
    },
];

/// bwrap, a namespace profile it accepted and the filesystem view, ready to build commands.
#[derive(Debug, Clone)]
pub(super) struct Bubblewrap {
    program: PathBuf,
    pub(super) profile: Profile,
    view: Vec<String>,
    /// `--size` of the private `/tmp`; `None` for bwrap < 0.7, which lacks the option.
    tmpfs_bytes: Option<u64>,
}

impl Bubblewrap {
    /// `program` (a path, or a name looked up in `PATH`) when it exists.
    pub(super) fn find(program: &str) -> Option<PathBuf> {
        if program.contains('/') {
            let p = PathBuf::from(program);
            return p.is_file().then_some(p);
        }
        let path = std::env::var_os("PATH")?;
        std::env::split_paths(&path)
            .map(|d| d.join(program))
            .find(|p| p.is_file())
    }

    /// The sandbox for `program` with `profile`; `python_roots` are the interpreter's
    /// directories (prefixes, `sys.path`) that must be visible.
    pub(super) fn new(
        program: PathBuf,
        profile: Profile,
        python_roots: &[PathBuf],
        tmpfs_bytes: Option<u64>,
    ) -> Self {
        Bubblewrap {
            program,
            profile,
            view: system_view(Path::new("/"), python_roots),
            tmpfs_bytes,
        }
    }

    /// A command running `python args...` in the sandbox; `files` are host files made visible
    /// read-only in the working directory under their own names.
    pub(super) fn command(&self, python: &Path, files: &[PathBuf], args: &[&str]) -> Command {
        let mut cmd = Command::new(&self.program);
        cmd.args(self.profile.flags);
        cmd.args(["--die-with-parent", "--new-session", "--cap-drop", "ALL"]);
        cmd.args(&self.view);
        cmd.args(["--proc", "/proc", "--dev", "/dev"]);
        if let Some(size) = self.tmpfs_bytes {
            cmd.arg("--size").arg(size.to_string());
        }
        cmd.args(["--tmpfs", "/tmp", "--dir", WORK_DIR]);
        for f in files {
            if let Some(name) = f.file_name() {
                cmd.arg("--ro-bind")
                    .arg(f)
                    .arg(Path::new(WORK_DIR).join(name));
            }
        }
        // Only /tmp stays writable: the root tmpfs that bwrap builds and /dev (its /dev/shm)
        // would otherwise be unbounded memory the program could fill.
        cmd.args([
            "--remount-ro",
            "/dev",
            "--remount-ro",
            "/",
            "--chdir",
            WORK_DIR,
        ]);
        cmd.arg("--").arg(python).args(args);
        cmd
    }
}

/// bwrap arguments for the read-only system view, looking at the host filesystem under `host`
/// (`/`; a test directory in tests).
fn system_view(host: &Path, python_roots: &[PathBuf]) -> Vec<String> {
    let mut args: Vec<String> = Vec::new();
    let bind = |args: &mut Vec<String>, kind: &str, path: &str| {
        args.extend([kind.to_string(), path.to_string(), path.to_string()]);
    };
    bind(&mut args, "--ro-bind", "/usr");
    // Merged-/usr systems have /bin -> usr/bin and the like; others have real directories.
    for top in ["/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32"] {
        let on_host = host.join(&top[1..]);
        match std::fs::symlink_metadata(&on_host) {
            Ok(m) if m.file_type().is_symlink() => {
                if let Ok(target) = std::fs::read_link(&on_host) {
                    args.extend([
                        "--symlink".to_string(),
                        target.display().to_string(),
                        top.to_string(),
                    ]);
                }
            }
            Ok(m) if m.is_dir() => bind(&mut args, "--ro-bind", top),
            _ => {}
        }
    }
    for f in ["/etc/ld.so.cache", "/etc/ld.so.conf", "/etc/ld.so.conf.d"] {
        bind(&mut args, "--ro-bind-try", f);
    }
    // Debian's sitecustomize.py is a link into /etc/python3.X.
    if let Ok(entries) = std::fs::read_dir(host.join("etc")) {
        let mut names: Vec<String> = entries
            .flatten()
            .filter_map(|e| e.file_name().into_string().ok())
            .filter(|n| n.starts_with("python"))
            .collect();
        names.sort();
        for n in names {
            bind(&mut args, "--ro-bind-try", &format!("/etc/{n}"));
        }
    }
    for root in extra_roots(python_roots) {
        bind(&mut args, "--ro-bind", &root.display().to_string());
    }
    args
}

/// The interpreter directories not already visible through `/usr`, without ones nested in
/// others, each also under its real path when it goes through a symlink. `/` itself is never
/// bound (it would expose everything).
fn extra_roots(python_roots: &[PathBuf]) -> Vec<PathBuf> {
    let mut roots: Vec<PathBuf> = Vec::new();
    for r in python_roots {
        let real = std::fs::canonicalize(r).ok();
        for p in std::iter::once(r.clone()).chain(real) {
            if p.is_absolute() && p.exists() && p != Path::new("/") {
                roots.push(p);
            }
        }
    }
    roots.sort();
    roots.dedup();
    let covered = |p: &Path, by: &Path| p != by && p.starts_with(by);
    let all = roots.clone();
    roots.retain(|p| !p.starts_with("/usr") && !all.iter().any(|other| covered(p, other)));
    roots
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roots_under_usr_or_nested_are_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let prefix = dir.path().join("py");
        std::fs::create_dir_all(prefix.join("lib/python3.11/site-packages")).unwrap();
        let roots = extra_roots(&[
            prefix.clone(),
            prefix.join("lib/python3.11"),
            prefix.join("lib/python3.11/site-packages"),
            prefix.join("missing.zip"),
            PathBuf::from("/usr/lib/python3"),
            PathBuf::from("/"),
            PathBuf::from("relative"),
        ]);
        let real = std::fs::canonicalize(&prefix).unwrap();
        let mut want = vec![prefix];
        if real != want[0] {
            want.push(real);
            want.sort();
        }
        assert_eq!(roots, want);
    }

    #[test]
    fn view_links_merged_usr_and_binds_real_dirs() {
        let host = tempfile::tempdir().unwrap();
        std::os::unix::fs::symlink("usr/bin", host.path().join("bin")).unwrap();
        std::fs::create_dir(host.path().join("lib64")).unwrap();
        std::fs::create_dir_all(host.path().join("etc/python3.11")).unwrap();
        std::fs::create_dir_all(host.path().join("etc/passwd-dir")).unwrap();
        let view = system_view(host.path(), &[]).join(" ");
        assert!(view.starts_with("--ro-bind /usr /usr"), "{view}");
        assert!(view.contains("--symlink usr/bin /bin"), "{view}");
        assert!(view.contains("--ro-bind /lib64 /lib64"), "{view}");
        assert!(!view.contains("/sbin"), "{view}");
        assert!(
            view.contains("--ro-bind-try /etc/python3.11 /etc/python3.11"),
            "{view}"
        );
        assert!(!view.contains("passwd"), "{view}");
    }
}
