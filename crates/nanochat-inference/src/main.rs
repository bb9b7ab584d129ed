//! `nanochat-inference`: serve a nanochat model over an OpenAI-compatible HTTP API.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Parser;
use nanochat_inference::fake::FakeModel;
use nanochat_inference::{ServedModel, Server, ServerConfig};
use nanochat_model::Device;

/// Serve a nanochat checkpoint with an OpenAI-compatible API and a chat page at `/`.
#[derive(Debug, Parser)]
#[command(name = "nanochat-inference", version)]
struct Cli {
    /// Model artifact directory (checkpoint + tokenizer files).
    #[arg(long, required_unless_present = "fake")]
    model: Option<PathBuf>,
    /// Tokenizer directory, when it is not stored with the model.
    #[arg(long, requires = "model")]
    tokenizer: Option<PathBuf>,
    /// Device to serve on: `cpu`, `cuda` (GPU 0, or the one LOCAL_RANK names), `gpu` (same as
    /// `cuda`) or `cuda:N`. A GPU needs a build with `--features cuda` (docs/gpu.md).
    #[arg(long, env = "NANOCHAT_DEVICE", default_value = "cpu")]
    device: Device,
    /// Serve the scripted echo model instead of a checkpoint (UI work, load tests).
    #[arg(long, conflicts_with = "model")]
    fake: bool,
    /// Simulated decode-step time of the fake model, milliseconds.
    #[arg(long, default_value_t = 5, requires = "fake")]
    fake_step_ms: u64,
    /// TOML configuration file; flags override its values.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Address to bind.
    #[arg(long)]
    host: Option<String>,
    /// Port to bind.
    #[arg(long)]
    port: Option<u16>,
    /// Decode workers (each runs its own continuous batch).
    #[arg(long)]
    workers: Option<usize>,
    /// Most sequences per worker batch.
    #[arg(long)]
    max_batch: Option<usize>,
    /// Most waiting requests before answering 429.
    #[arg(long)]
    queue_capacity: Option<usize>,
    /// Per-request time limit, seconds.
    #[arg(long)]
    timeout_secs: Option<f64>,
    /// Name clients use in `model` (default: derived from the model).
    #[arg(long)]
    model_name: Option<String>,
    /// Enables POST /admin/cache/clear with this bearer token.
    #[arg(long, env = "NANOCHAT_ADMIN_TOKEN", hide_env_values = true)]
    admin_token: Option<String>,
    /// Response-cache entry bound (0 disables the cache).
    #[arg(long)]
    cache_entries: Option<usize>,
    /// Response-cache time-to-live, seconds.
    #[arg(long)]
    cache_ttl_secs: Option<f64>,
}

impl Cli {
    fn config(&self) -> Result<ServerConfig> {
        let mut cfg = match &self.config {
            Some(path) => ServerConfig::from_file(path)?,
            None => ServerConfig::default(),
        };
        if let Some(v) = &self.host {
            cfg.host = v.clone();
        }
        if let Some(v) = self.port {
            cfg.port = v;
        }
        if let Some(v) = self.workers {
            cfg.workers = v;
        }
        if let Some(v) = self.max_batch {
            cfg.max_batch = v;
        }
        if let Some(v) = self.queue_capacity {
            cfg.queue_capacity = v;
        }
        if let Some(v) = self.timeout_secs {
            cfg.request_timeout_secs = v;
        }
        if let Some(v) = &self.model_name {
            cfg.model_name = Some(v.clone());
        }
        if let Some(v) = &self.admin_token {
            cfg.admin_token = Some(v.clone());
        }
        if let Some(v) = self.cache_entries {
            cfg.cache.max_entries = v;
            cfg.cache.enabled = v > 0;
        }
        if let Some(v) = self.cache_ttl_secs {
            cfg.cache.ttl_secs = v;
        }
        cfg.validate()?;
        Ok(cfg)
    }
}

fn load_model(cli: &Cli) -> Result<Arc<dyn ServedModel>> {
    if cli.fake {
        return Ok(Arc::new(FakeModel::new(Duration::from_millis(
            cli.fake_step_ms,
        ))));
    }
    let dir = cli.model.as_ref().context("--model is required")?;
    let model = nanochat_inference::load::load_model_on(dir, cli.tokenizer.as_deref(), cli.device)
        .with_context(|| format!("loading the model from {}", dir.display()))?;
    Ok(Arc::new(model))
}

#[actix_web::main]
async fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let cfg = cli.config()?;
    let model = load_model(&cli)?;
    let server = Server::bind(cfg.clone(), model).context("starting the server")?;
    tracing::info!(
        addr = %server.addr,
        model = server.state.model_name(),
        device = server.state.device(),
        workers = cfg.workers,
        max_batch = cfg.max_batch,
        "serving: open http://{}/ for the chat page",
        server.addr
    );
    server.run().await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> std::result::Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("nanochat-inference").chain(args.iter().copied()))
    }

    #[test]
    fn device_flag_parses_defaults_to_cpu_and_rejects_unknown_names() {
        if std::env::var_os("NANOCHAT_DEVICE").is_none() {
            let cli = parse(&["--model", "m"]).unwrap();
            assert_eq!(cli.device, Device::Cpu);
        }
        for (flag, device) in [
            ("cpu", Device::Cpu),
            ("cuda", Device::Cuda(None)),
            ("gpu", Device::Cuda(None)),
            ("cuda:1", Device::Cuda(Some(1))),
        ] {
            let cli = parse(&["--model", "m", "--device", flag]).unwrap();
            assert_eq!(cli.device, device, "{flag}");
        }
        let err = parse(&["--model", "m", "--device", "tpu"])
            .err()
            .unwrap()
            .to_string();
        assert!(
            err.contains("--device") && err.contains("\"cpu\", \"cuda\" or \"cuda:N\""),
            "{err}"
        );
    }
}
