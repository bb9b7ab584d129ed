//! A GPT on whichever device the user asked for (`--device cpu|cuda[:N]`), behind one type, so
//! the commands and servers that hold a model are written once.
//!
//! An enum rather than a trait object: [`StepModel`] has an associated cache type, and the
//! variants are few and known at build time (CUDA only with the `cuda` feature).

#[cfg(feature = "cuda")]
use nanochat_model::compute::cuda::Cuda;
use nanochat_model::compute::Cpu;
use nanochat_model::{Device, Gpt, GptConfig, KvCache};

use crate::model::StepModel;
use crate::EngineError;

/// A GPT on the CPU or a GPU.
pub enum DeviceGpt {
    /// On the host.
    Cpu(Gpt<Cpu>),
    /// On an NVIDIA GPU.
    #[cfg(feature = "cuda")]
    Cuda(Gpt<Cuda>),
}

/// The KV cache of a [`DeviceGpt`], on the same device.
pub enum DeviceKvCache {
    /// On the host.
    Cpu(KvCache<Cpu>),
    /// On an NVIDIA GPU.
    #[cfg(feature = "cuda")]
    Cuda(KvCache<Cuda>),
}

/// Runs `$body` with `$m` bound to the model of whichever variant `$self` is.
macro_rules! on_device {
    ($self:expr, $m:ident => $body:expr) => {
        match $self {
            DeviceGpt::Cpu($m) => $body,
            #[cfg(feature = "cuda")]
            DeviceGpt::Cuda($m) => $body,
        }
    };
}

fn mismatch() -> EngineError {
    EngineError::Internal("a KV cache used with a model on another device".into())
}

impl DeviceGpt {
    /// Moves a model loaded on the host to `device`. Errors say why a device cannot be opened
    /// (no GPU, driver or cuBLAS missing, or a build without `--features cuda`).
    pub fn on(model: Gpt, device: Device) -> Result<Self, nanochat_model::ModelError> {
        match device {
            Device::Cpu => Ok(DeviceGpt::Cpu(model)),
            #[cfg(feature = "cuda")]
            Device::Cuda(_) => {
                let gpu = Cuda::open(device.cuda_index().unwrap_or(0))?;
                Ok(DeviceGpt::Cuda(model.to_backend(gpu)?))
            }
            #[cfg(not(feature = "cuda"))]
            Device::Cuda(_) => {
                struct Fail;
                impl nanochat_model::compute::BackendTask for Fail {
                    type Output = ();
                    fn run<B: nanochat_model::Backend>(self, _: B) {}
                }
                // The seam's error names the missing feature and how to rebuild.
                nanochat_model::compute::with_backend(device, Fail)?;
                Ok(DeviceGpt::Cpu(model))
            }
        }
    }

    /// The model's configuration.
    pub fn config(&self) -> &GptConfig {
        on_device!(self, m => m.config())
    }

    /// The device, as its backend describes itself.
    pub fn describe(&self) -> String {
        use nanochat_model::Backend;
        on_device!(self, m => m.backend().describe())
    }

    /// The model on the host (a copy when it lives on a GPU), for what needs host weights.
    pub fn to_host(&self) -> Result<Gpt, nanochat_model::ModelError> {
        on_device!(self, m => m.to_backend(Cpu))
    }
}

impl StepModel for DeviceGpt {
    type Cache = DeviceKvCache;

    fn vocab_size(&self) -> usize {
        on_device!(self, m => m.vocab_size())
    }

    fn context_len(&self) -> usize {
        on_device!(self, m => StepModel::context_len(m))
    }

    fn new_cache(&self, rows: usize) -> Result<DeviceKvCache, EngineError> {
        match self {
            DeviceGpt::Cpu(m) => Ok(DeviceKvCache::Cpu(m.new_cache(rows)?)),
            #[cfg(feature = "cuda")]
            DeviceGpt::Cuda(m) => Ok(DeviceKvCache::Cuda(m.new_cache(rows)?)),
        }
    }

    fn forward(
        &self,
        cache: &mut DeviceKvCache,
        batch: &[(usize, &[u32])],
    ) -> Result<Vec<f32>, EngineError> {
        match (self, cache) {
            (DeviceGpt::Cpu(m), DeviceKvCache::Cpu(c)) => m.forward(c, batch),
            #[cfg(feature = "cuda")]
            (DeviceGpt::Cuda(m), DeviceKvCache::Cuda(c)) => m.forward(c, batch),
            #[allow(unreachable_patterns)]
            _ => Err(mismatch()),
        }
    }

    fn reset_row(&self, cache: &mut DeviceKvCache, row: usize) -> Result<(), EngineError> {
        match (self, cache) {
            (DeviceGpt::Cpu(m), DeviceKvCache::Cpu(c)) => m.reset_row(c, row),
            #[cfg(feature = "cuda")]
            (DeviceGpt::Cuda(m), DeviceKvCache::Cuda(c)) => m.reset_row(c, row),
            #[allow(unreachable_patterns)]
            _ => Err(mismatch()),
        }
    }

    fn copy_row(
        &self,
        cache: &mut DeviceKvCache,
        src: usize,
        dst: usize,
    ) -> Result<(), EngineError> {
        match (self, cache) {
            (DeviceGpt::Cpu(m), DeviceKvCache::Cpu(c)) => m.copy_row(c, src, dst),
            #[cfg(feature = "cuda")]
            (DeviceGpt::Cuda(m), DeviceKvCache::Cuda(c)) => m.copy_row(c, src, dst),
            #[allow(unreachable_patterns)]
            _ => Err(mismatch()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cpu_variant_generates_as_the_model_does_and_cuda_without_the_feature_is_explained() {
        let cfg = GptConfig::from_depth(1, 64, 32).unwrap();
        let gpt = Gpt::new(cfg.clone(), 1).unwrap();
        let direct = Gpt::new(cfg, 1).unwrap();
        let dev = DeviceGpt::on(gpt, Device::Cpu).unwrap();
        assert!(dev.describe().starts_with("cpu"));
        let mut c1 = dev.new_cache(1).unwrap();
        let mut c2 = direct.new_cache(1).unwrap();
        let a = dev.forward(&mut c1, &[(0, &[1, 2, 3])]).unwrap();
        let b = direct.forward(&mut c2, &[(0, &[1, 2, 3])]).unwrap();
        assert_eq!(a, b);
        dev.reset_row(&mut c1, 0).unwrap();
        if !cfg!(feature = "cuda") {
            let m = Gpt::new(GptConfig::from_depth(1, 64, 32).unwrap(), 1).unwrap();
            let e = DeviceGpt::on(m, Device::Cuda(None))
                .err()
                .unwrap()
                .to_string();
            assert!(e.contains("--features cuda"), "{e}");
        }
    }
}
