//! `nanochat serve`: the OpenAI-compatible server of nanochat-inference, started from the CLI.
//!
//! A thin shell over the inference library: the model argument is resolved like the other
//! commands' (directory or store ref), flags override the optional TOML config, and the bound
//! address is printed on stderr so scripts using `--port 0` can find it.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{Context, Result};
use clap::Args;
use nanochat_inference::{Server, ServerConfig};

use crate::{usage, ModelArgs};

/// Flags of `nanochat serve`.
#[derive(Args, Debug)]
pub struct ServeArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Server configuration file (TOML, as `nanochat-inference --config`); flags override it.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Address to bind (default 127.0.0.1, or the config file's).
    #[arg(long)]
    host: Option<String>,
    /// Port to bind; 0 picks a free one (default 8000, or the config file's).
    #[arg(long)]
    port: Option<u16>,
    /// Decode workers, each running its own continuous batch.
    #[arg(long)]
    workers: Option<usize>,
}

impl ServeArgs {
    fn server_config(&self) -> Result<ServerConfig> {
        let mut cfg = match &self.config {
            Some(path) => ServerConfig::from_file(path)
                .with_context(|| format!("reading server config {}", path.display()))?,
            None => ServerConfig::default(),
        };
        if let Some(h) = &self.host {
            cfg.host = h.clone();
        }
        if let Some(p) = self.port {
            cfg.port = p;
        }
        if let Some(w) = self.workers {
            cfg.workers = w;
        }
        if let Err(e) = cfg.validate() {
            usage!("{e}");
        }
        Ok(cfg)
    }
}

/// Loads the model and serves it until the process is stopped.
pub fn run(args: ServeArgs) -> Result<ExitCode> {
    let cfg = args.server_config()?;
    // Resolve refs and artifact layouts the same way `generate`/`chat` do.
    let loc = crate::load::locate(
        &args.model.model,
        args.model.tokenizer.as_deref(),
        &args.model.store,
    )?;
    let model = nanochat_inference::load::load_model_on(
        &loc.checkpoint,
        Some(&loc.tokenizer),
        args.model.device,
    )
    .with_context(|| format!("loading the model from {}", loc.checkpoint.display()))?;
    let system = actix_web::rt::System::new();
    system.block_on(async move {
        let server = Server::bind(cfg, Arc::new(model)).context("starting the server")?;
        eprintln!(
            "nanochat: serving {} on http://{}/ (OpenAI API at /v1, health at /health) on {}",
            server.state.model_name(),
            server.addr,
            server.state.device()
        );
        server.run().await.context("serving")
    })?;
    Ok(ExitCode::SUCCESS)
}
