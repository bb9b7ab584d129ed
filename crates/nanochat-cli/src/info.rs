//! `nanochat info`: what a model is, how big, what it needs, where it came from.

use std::io::Write;
use std::process::ExitCode;

use anyhow::Result;
use clap::Args;
use nanochat_engine::DeviceGpt;
use nanochat_model::{estimate_memory_on, MemoryEstimate, Workload};
use serde_json::json;

use crate::{load, ModelArgs};

#[derive(Args)]
pub struct InfoArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Concurrent sequences to size the KV-cache estimate for.
    #[arg(long, default_value_t = 1)]
    batch: usize,
}

fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / (1024.0 * 1024.0))
}

/// The memory estimate on the device the model is on (its buffer layout may differ there).
fn memory_on_device(
    model: &DeviceGpt,
    cfg: &nanochat_model::GptConfig,
    workload: Workload,
) -> MemoryEstimate {
    match model {
        DeviceGpt::Cpu(m) => estimate_memory_on(m.backend(), cfg, workload),
        #[cfg(feature = "cuda")]
        DeviceGpt::Cuda(m) => estimate_memory_on(m.backend(), cfg, workload),
    }
}

/// Which kernel each op family takes on the model's device, and why (CPU only: the CUDA
/// backend's choices are in its device description).
fn kernel_paths(model: &DeviceGpt) -> Vec<String> {
    match model {
        DeviceGpt::Cpu(_) => nanochat_model::compute::cpu::select::kernel_choice().report(),
        #[cfg(feature = "cuda")]
        DeviceGpt::Cuda(_) => Vec::new(),
    }
}

pub fn run(args: InfoArgs, json_out: bool) -> Result<ExitCode> {
    let loaded = load::load(&args.model)?;
    let cfg = loaded.model.config().clone();
    let params = cfg.num_params();
    let workload = Workload::Inference {
        rows: args.batch.max(1),
        capacity: cfg.sequence_len,
    };
    let mem = memory_on_device(&loaded.model, &cfg, workload);
    let meta = &loaded.meta;
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    if json_out {
        let v = json!({
            "checkpoint": loaded.checkpoint_dir.display().to_string(),
            "tokenizer": loaded.tokenizer_dir.display().to_string(),
            "device": loaded.model.describe(),
            "kernels": kernel_paths(&loaded.model),
            "config": cfg,
            "params": params,
            "memory_bytes": {
                "weights": mem.weights,
                "weight_cache": mem.weight_cache,
                "activations": mem.activations,
                "kv_cache": mem.kv_cache,
                "total": mem.total(),
                "batch": args.batch.max(1),
            },
            "meta": meta,
            "tokenizer_vocab_size": loaded.tokenizer.vocab_size(),
        });
        serde_json::to_writer_pretty(&mut out, &v)?;
        writeln!(out)?;
        return Ok(ExitCode::SUCCESS);
    }
    writeln!(out, "checkpoint   {}", loaded.checkpoint_dir.display())?;
    writeln!(
        out,
        "tokenizer    {} ({} tokens)",
        loaded.tokenizer_dir.display(),
        loaded.tokenizer.vocab_size()
    )?;
    writeln!(
        out,
        "model        {} layers, width {}, {} heads ({} kv), head dim {}",
        cfg.n_layer,
        cfg.n_embd,
        cfg.n_head,
        cfg.n_kv_head,
        cfg.head_dim()
    )?;
    writeln!(
        out,
        "             vocab {} (padded {}), context {}, rope base {}, softcap {}",
        cfg.vocab_size,
        cfg.padded_vocab_size(),
        cfg.sequence_len,
        cfg.rope_base,
        cfg.softcap.map_or("off".to_string(), |c| c.to_string())
    )?;
    writeln!(
        out,
        "parameters   {} ({:.2} M)",
        params,
        params as f64 / 1e6
    )?;
    writeln!(
        out,
        "memory       {} total for {} sequence(s): weights {}, derived weight copies {}, KV cache {}, activations {}",
        mib(mem.total()),
        args.batch.max(1),
        mib(mem.weights),
        mib(mem.weight_cache),
        mib(mem.kv_cache),
        mib(mem.activations)
    )?;
    writeln!(out, "device       {}", loaded.model.describe())?;
    for line in kernel_paths(&loaded.model) {
        writeln!(out, "kernels      {line}")?;
    }
    writeln!(out, "step         {}", meta.step)?;
    if let Some(loss) = meta.loss {
        writeln!(out, "loss         {loss:.4}")?;
    }
    writeln!(
        out,
        "tokenizer id {}",
        meta.tokenizer_id.as_deref().unwrap_or("(not recorded)")
    )?;
    writeln!(
        out,
        "trained from {}",
        meta.parent_artifact.as_deref().unwrap_or("(not recorded)")
    )?;
    writeln!(out, "weights sha256 {}", meta.weights_sha256)?;
    Ok(ExitCode::SUCCESS)
}
