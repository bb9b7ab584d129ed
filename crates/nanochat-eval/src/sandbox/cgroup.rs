//! One pids cgroup per sandboxed run.
//!
//! It gives two things nothing else gives a process running as root: a limit on how many
//! processes and threads the run may have at once (`pids.max`; `RLIMIT_NPROC` does not apply to
//! root), and the list of every process of the run, wherever it moved (`setsid`, a new process
//! group), so that all of them can be killed when the run ends. It needs a writable cgroup
//! hierarchy with the pids controller (cgroup v1's `pids` mount, or cgroup v2 with `pids`
//! enabled for the children of this process's cgroup): usually root on a machine or VM, or a
//! delegated subtree. [`PidsHierarchy::locate`] lists the candidates: this process's own
//! cgroup, then the root of the hierarchy as mounted (on cgroup v2 a cgroup that has processes
//! cannot enable controllers for its children, so on a systemd host run as root only the root
//! works); the sandbox probes them once, in that order.

use std::ffi::CString;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// The cgroup directory under which each run's cgroup is created.
#[derive(Debug, Clone)]
pub(super) struct PidsHierarchy {
    parent: PathBuf,
}

/// Distinguishes the cgroups of concurrent runs of this process.
static NEXT_RUN: AtomicU64 = AtomicU64::new(0);

/// How long the end of a run waits for its killed processes to leave the cgroup.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);

impl PidsHierarchy {
    /// This process's own pids cgroup, then the hierarchy's mount point, if the pids
    /// controller is mounted; empty otherwise. Whether run cgroups can be created in them is
    /// found out by the caller's probe.
    pub(super) fn locate() -> Vec<PidsHierarchy> {
        let read = |p: &str| std::fs::read_to_string(p).unwrap_or_default();
        locate_in(&read("/proc/self/mountinfo"), &read("/proc/self/cgroup"))
            .into_iter()
            .map(|parent| PidsHierarchy { parent })
            .collect()
    }

    /// Create an empty cgroup that allows at most `max_tasks` processes and threads.
    pub(super) fn create_run(&self, max_tasks: u64) -> io::Result<RunCgroup> {
        let name = format!(
            "nanochat-sandbox-{}-{}",
            std::process::id(),
            NEXT_RUN.fetch_add(1, Ordering::Relaxed)
        );
        let dir = self.parent.join(name);
        std::fs::create_dir(&dir)?;
        let cgroup = RunCgroup {
            procs: CString::new(dir.join("cgroup.procs").as_os_str().as_bytes())
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?,
            dir,
        };
        // Without the controller enabled here, `pids.max` does not exist and this fails; the
        // cgroup is then removed by the drop.
        std::fs::write(cgroup.dir.join("pids.max"), max_tasks.to_string())?;
        Ok(cgroup)
    }

    /// Where run cgroups are created (for messages).
    pub(super) fn path(&self) -> &Path {
        &self.parent
    }
}

/// A run's cgroup: joined by the child before exec, emptied and removed when dropped.
#[derive(Debug)]
pub(super) struct RunCgroup {
    dir: PathBuf,
    procs: CString,
}

impl RunCgroup {
    /// The `cgroup.procs` file a child writes `0` to, to move itself in.
    pub(super) fn procs_file(&self) -> CString {
        self.procs.clone()
    }

    /// SIGKILL every process in the cgroup until none is left (or [`DRAIN_TIMEOUT`] passed).
    pub(super) fn kill_all(&self) {
        let kill_file = self.dir.join("cgroup.kill");
        let deadline = Instant::now() + DRAIN_TIMEOUT;
        loop {
            let pids = self.pids();
            if pids.is_empty() {
                return;
            }
            // cgroup v2 kills the whole cgroup atomically; v1 needs one kill per process, and
            // the loop catches processes forked between the read and the kills.
            if std::fs::write(&kill_file, "1").is_err() {
                for pid in pids {
                    // SAFETY: plain syscall on a pid that was in this run's cgroup.
                    unsafe {
                        libc::kill(pid, libc::SIGKILL);
                    }
                }
            }
            if Instant::now() >= deadline {
                tracing::warn!(cgroup = %self.dir.display(), "sandbox: processes still in the run's cgroup after SIGKILL");
                return;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// The processes now in the cgroup.
    pub(super) fn pids(&self) -> Vec<libc::pid_t> {
        std::fs::read_to_string(self.dir.join("cgroup.procs"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.trim().parse().ok())
            .collect()
    }
}

impl Drop for RunCgroup {
    fn drop(&mut self) {
        self.kill_all();
        // rmdir fails with EBUSY until the last killed process has left.
        let deadline = Instant::now() + DRAIN_TIMEOUT;
        while let Err(e) = std::fs::remove_dir(&self.dir) {
            if e.kind() == io::ErrorKind::NotFound {
                return;
            }
            if Instant::now() >= deadline {
                tracing::warn!(cgroup = %self.dir.display(), error = %e, "sandbox: cannot remove the run's cgroup");
                return;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }
}

/// The directory of this process's pids cgroup, then the hierarchy's mount point when that is
/// another directory, from `/proc/self/mountinfo` and `/proc/self/cgroup`: cgroup v1's `pids`
/// hierarchy when mounted, else the v2 hierarchy.
fn locate_in(mountinfo: &str, cgroups: &str) -> Vec<PathBuf> {
    locate_own(mountinfo, cgroups)
        .map(|(own, mount_point)| {
            let mut v = vec![own];
            if v[0] != mount_point {
                v.push(mount_point);
            }
            v
        })
        .unwrap_or_default()
}

/// This process's pids cgroup directory and the mount point of its hierarchy.
fn locate_own(mountinfo: &str, cgroups: &str) -> Option<(PathBuf, PathBuf)> {
    let mut v1 = None;
    let mut v2 = None;
    for line in mountinfo.lines() {
        let Some((left, right)) = line.split_once(" - ") else {
            continue;
        };
        let left: Vec<&str> = left.split(' ').collect();
        let right: Vec<&str> = right.split(' ').collect();
        let (Some(root), Some(mount_point), Some(fstype)) =
            (left.get(3), left.get(4), right.first())
        else {
            continue;
        };
        match *fstype {
            "cgroup"
                if right
                    .get(2)
                    .is_some_and(|o| o.split(',').any(|o| o == "pids")) =>
            {
                v1 = Some((root.to_string(), mount_point.to_string()));
            }
            "cgroup2" if v2.is_none() => v2 = Some((root.to_string(), mount_point.to_string())),
            _ => {}
        }
    }
    let own_path = |v1: bool| {
        cgroups.lines().find_map(|l| {
            let mut parts = l.splitn(3, ':');
            let (_, controllers, path) = (parts.next()?, parts.next()?, parts.next()?);
            let wanted = if v1 {
                controllers.split(',').any(|c| c == "pids")
            } else {
                controllers.is_empty()
            };
            wanted.then(|| path.to_string())
        })
    };
    let ((root, mount_point), path) = match v1 {
        Some(m) => (m, own_path(true)?),
        None => (v2?, own_path(false)?),
    };
    // In a container the mount's root is the container's own cgroup, which /proc/self/cgroup
    // also names: the part below it is where this process is inside the mount.
    let below = path
        .strip_prefix(root.as_str())
        .filter(|_| root != "/")
        .unwrap_or(&path)
        .trim_start_matches('/');
    Some((
        Path::new(&mount_point).join(below),
        PathBuf::from(mount_point),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    const HYBRID_MOUNTS: &str = "\
30 25 0:26 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
31 30 0:27 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
38 30 0:34 / /sys/fs/cgroup/pids rw,relatime - cgroup cgroup rw,pids
39 30 0:35 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
";

    fn paths(p: &[&str]) -> Vec<PathBuf> {
        p.iter().map(PathBuf::from).collect()
    }

    #[test]
    fn v1_pids_hierarchy_wins_over_v2() {
        let cgroups = "8:pids:/user.slice/u\n4:memory:/m\n0::/user.slice/u/s.scope\n";
        assert_eq!(
            locate_in(HYBRID_MOUNTS, cgroups),
            paths(&["/sys/fs/cgroup/pids/user.slice/u", "/sys/fs/cgroup/pids"])
        );
        assert_eq!(
            locate_in(HYBRID_MOUNTS, "8:pids:/\n0::/\n"),
            paths(&["/sys/fs/cgroup/pids"])
        );
    }

    #[test]
    fn v2_only_uses_the_unified_path() {
        let mounts = "30 25 0:26 / /sys/fs/cgroup rw,nosuid - cgroup2 cgroup2 rw,nsdelegate\n";
        assert_eq!(
            locate_in(mounts, "0::/system.slice/ci.service\n"),
            paths(&["/sys/fs/cgroup/system.slice/ci.service", "/sys/fs/cgroup"])
        );
    }

    #[test]
    fn container_mount_root_is_stripped() {
        let mounts = "40 30 0:34 /docker/abc /sys/fs/cgroup/pids ro - cgroup cgroup rw,pids\n";
        assert_eq!(
            locate_in(mounts, "5:pids:/docker/abc/job\n"),
            paths(&["/sys/fs/cgroup/pids/job", "/sys/fs/cgroup/pids"])
        );
    }

    #[test]
    fn no_pids_controller_no_hierarchy() {
        let mounts = "39 30 0:35 / /sys/fs/cgroup/memory rw - cgroup cgroup rw,memory\n";
        assert!(locate_in(mounts, "4:memory:/\n").is_empty());
        assert!(locate_in("", "").is_empty());
    }
}
