//! Devices as users name them, and the one place a run-time choice of device becomes a type.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::backend::Backend;
use crate::cpu::Cpu;
use crate::error::{ComputeError, Result};

/// A compute device: `cpu`, `cuda` (GPU 0, or the one `LOCAL_RANK` names in a multi-rank run)
/// or `cuda:N`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Device {
    /// The host CPU.
    #[default]
    Cpu,
    /// An NVIDIA GPU; `None` means the default one.
    Cuda(Option<usize>),
}

impl FromStr for Device {
    type Err = ComputeError;
    fn from_str(s: &str) -> Result<Self> {
        let t = s.trim().to_ascii_lowercase();
        match t.as_str() {
            "cpu" => Ok(Device::Cpu),
            "cuda" | "gpu" => Ok(Device::Cuda(None)),
            _ => match t.strip_prefix("cuda:").map(str::parse::<usize>) {
                Some(Ok(n)) => Ok(Device::Cuda(Some(n))),
                _ => Err(ComputeError::UnknownDevice(s.to_string())),
            },
        }
    }
}

impl fmt::Display for Device {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Device::Cpu => f.write_str("cpu"),
            Device::Cuda(None) => f.write_str("cuda"),
            Device::Cuda(Some(n)) => write!(f, "cuda:{n}"),
        }
    }
}

impl Serialize for Device {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Device {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

impl Device {
    /// The GPU index this device resolves to: its own, else `LOCAL_RANK` (one GPU per rank on a
    /// node, as torchrun assigns them), else 0.
    pub fn cuda_index(&self) -> Option<usize> {
        match self {
            Device::Cpu => None,
            Device::Cuda(Some(n)) => Some(*n),
            Device::Cuda(None) => Some(
                std::env::var("LOCAL_RANK")
                    .ok()
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(0),
            ),
        }
    }
}

/// Generic code to run on whichever backend a [`Device`] opens (a closure generic over the
/// backend type, which Rust closures cannot be).
pub trait BackendTask {
    /// What the task returns.
    type Output;
    /// Runs the task on `backend`.
    fn run<B: Backend>(self, backend: B) -> Self::Output;
}

/// Opens `device` and runs `task` on it. Errors when the device cannot be opened (no such GPU,
/// driver or library missing, or this build lacks its backend), saying what to do.
pub fn with_backend<T: BackendTask>(device: Device, task: T) -> Result<T::Output> {
    match device {
        Device::Cpu => Ok(task.run(Cpu::new())),
        Device::Cuda(_) => open_cuda(device, task),
    }
}

#[cfg(feature = "cuda")]
fn open_cuda<T: BackendTask>(device: Device, task: T) -> Result<T::Output> {
    let index = device.cuda_index().unwrap_or(0);
    let backend = crate::cuda::Cuda::open(index)?;
    Ok(task.run(backend))
}

#[cfg(not(feature = "cuda"))]
fn open_cuda<T: BackendTask>(device: Device, _task: T) -> Result<T::Output> {
    Err(ComputeError::Unavailable {
        device: device.to_string(),
        reason: "this build of nanochat-rs has no CUDA backend; rebuild with \
                 `cargo build --release --features cuda` (nothing is compiled from C: the CUDA \
                 driver and cuBLAS are loaded at run time)"
            .into(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn devices_parse_and_print_as_users_write_them() {
        for (s, d) in [
            ("cpu", Device::Cpu),
            ("CUDA", Device::Cuda(None)),
            ("cuda:3", Device::Cuda(Some(3))),
        ] {
            assert_eq!(s.parse::<Device>().unwrap(), d);
        }
        assert_eq!(Device::Cuda(Some(2)).to_string(), "cuda:2");
        for bad in ["tpu", "cuda:x", "cuda:-1", ""] {
            let e = bad.parse::<Device>().unwrap_err().to_string();
            assert!(e.contains("cuda:N"), "{e}");
        }
        assert_eq!(Device::Cuda(Some(5)).cuda_index(), Some(5));
        assert_eq!(Device::Cpu.cuda_index(), None);
    }

    struct Name;
    impl BackendTask for Name {
        type Output = String;
        fn run<B: Backend>(self, backend: B) -> String {
            backend.describe()
        }
    }

    #[test]
    fn cpu_opens_and_a_missing_gpu_is_a_clear_error() {
        assert!(with_backend(Device::Cpu, Name).unwrap().starts_with("cpu"));
        if cfg!(feature = "cuda") {
            return; // with the feature, whether it opens depends on the machine
        }
        let e = with_backend(Device::Cuda(None), Name)
            .unwrap_err()
            .to_string();
        assert!(e.contains("--features cuda"), "{e}");
    }
}
