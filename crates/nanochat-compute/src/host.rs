//! Host memory: what the machine has, and allocations that fail with an error instead of
//! aborting the process.

use crate::error::{ComputeError, Result};

/// Bytes the OS says a new allocation can use: `MemAvailable` from /proc/meminfo, capped by a
/// cgroup v2 limit when one is set. `None` where that is unknown (non-Linux).
pub fn available_memory() -> Option<u64> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
    let avail = meminfo
        .lines()
        .find(|l| l.starts_with("MemAvailable:"))?
        .split_whitespace()
        .nth(1)?
        .parse::<u64>()
        .ok()?
        * 1024;
    let cgroup = std::fs::read_to_string("/sys/fs/cgroup/memory.max")
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok());
    let used = std::fs::read_to_string("/sys/fs/cgroup/memory.current")
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok());
    Some(match (cgroup, used) {
        (Some(max), Some(cur)) => avail.min(max.saturating_sub(cur)),
        _ => avail,
    })
}

/// Errors when `bytes` exceed the available host memory.
pub fn check_fits(bytes: u64, what: &str) -> Result<()> {
    match available_memory() {
        Some(avail) if bytes > avail => Err(ComputeError::oom(what, bytes, Some(avail))),
        _ => Ok(()),
    }
}

/// A zeroed `f32` buffer; allocation failure is an error, not an abort.
pub fn alloc_f32(len: usize, what: &str) -> Result<Vec<f32>> {
    let mut v: Vec<f32> = Vec::new();
    v.try_reserve_exact(len)
        .map_err(|_| ComputeError::oom(what, (len as u64) * 4, available_memory()))?;
    v.resize(len, 0.0);
    Ok(v)
}

/// A zeroed `i32` buffer; allocation failure is an error, not an abort.
pub fn alloc_i32(len: usize, what: &str) -> Result<Vec<i32>> {
    let mut v: Vec<i32> = Vec::new();
    v.try_reserve_exact(len)
        .map_err(|_| ComputeError::oom(what, (len as u64) * 4, available_memory()))?;
    v.resize(len, 0);
    Ok(v)
}
