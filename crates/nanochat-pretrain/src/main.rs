//! `nanochat-pretrain --config FILE.toml --input corpus=DIR --input tokenizer=DIR --out DIR --work DIR`
//!
//! Trains a base model from scratch on the corpus shards (every shard but the last is training
//! data, the last is validation), and publishes `model/` (safetensors + config + meta),
//! `metrics.jsonl` and `summary.json`. SIGINT/SIGTERM save a checkpoint into `--work` and exit
//! 130/143; rerunning resumes bit-identically.

use std::sync::Arc;

use anyhow::{Context, Result};
use nanochat_artifacts::stage::{self, StageContext};
use nanochat_data::packer::LoaderSpec;
use nanochat_data::{list_shards, PretrainLoader, Split};
use nanochat_model::{CheckpointMeta, Gpt, GptConfig};
use nanochat_tokenizer::Tokenizer;
use nanochat_train::process;
use nanochat_train::trainer::{train_on_device, BatchSource, LoopConfig, RunDirs, TrainJob};
use nanochat_train::TrainError;
use serde::Deserialize;

mod parity_dump;

/// The stage config.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Config {
    /// Model shape.
    model: ModelSection,
    /// Data loading.
    #[serde(default)]
    data: DataSection,
    /// The training loop.
    train: LoopConfig,
    /// Seed of the weight initialisation.
    #[serde(default)]
    seed: u64,
    /// Worker threads (0: all cores). Resume is bit-identical only with the same count.
    #[serde(default)]
    threads: usize,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ModelSection {
    /// Transformer depth; width is 64·depth (nanochat's sizing rule).
    depth: usize,
    /// Context length of training sequences.
    sequence_len: usize,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct DataSection {
    /// Batches prepared ahead by the loader thread.
    #[serde(default = "default_prefetch")]
    prefetch: usize,
    /// Which slice of the data this process reads: documents `rank, rank + world_size, …` of
    /// every shard (training and validation), nanochat's data-parallel sharding. For a single
    /// process that trains on a 1/`world_size` slice by itself; a data-parallel run (`ranks:`,
    /// Slurm, `RANK`/`WORLD_SIZE`) takes both from its launcher instead, and these must then
    /// stay unset. Must be < `world_size`.
    #[serde(default)]
    rank: usize,
    /// Number of slices the data is cut into (1: this process reads everything).
    #[serde(default = "default_world_size")]
    world_size: usize,
}

impl Default for DataSection {
    fn default() -> Self {
        DataSection {
            prefetch: default_prefetch(),
            rank: 0,
            world_size: default_world_size(),
        }
    }
}

impl DataSection {
    /// `(rank, world_size)` of the slice this process reads: the launcher's in a data-parallel
    /// run, else the config's.
    fn slice(&self, dist: &nanochat_dist::DistEnv) -> Result<(usize, usize)> {
        if !dist.is_distributed() {
            return Ok((self.rank, self.world_size));
        }
        if self.rank != 0 || self.world_size != 1 {
            anyhow::bail!(
                "[data] rank = {} / world_size = {} in a run of {} ranks: the launcher gives every \
                 rank its slice of the data; remove rank and world_size from [data]",
                self.rank,
                self.world_size,
                dist.world_size
            );
        }
        Ok((dist.rank, dist.world_size))
    }

    fn validate(&self) -> Result<()> {
        if self.world_size == 0 || self.rank >= self.world_size {
            anyhow::bail!(
                "[data] rank = {} with world_size = {}: need world_size ≥ 1 and 0 ≤ rank < world_size",
                self.rank,
                self.world_size
            );
        }
        Ok(())
    }
}

fn default_prefetch() -> usize {
    4
}

fn default_world_size() -> usize {
    1
}

fn main() {
    stage::run_main("nanochat-pretrain", run)
}

fn run(ctx: &StageContext) -> Result<i32> {
    let mut cfg: Config = ctx.config()?;
    cfg.data
        .validate()
        .with_context(|| format!("{}", ctx.config_path().display()))?;
    let dist = process::dist_env()?;
    let (data_rank, data_world) = cfg
        .data
        .slice(&dist)
        .with_context(|| format!("{}", ctx.config_path().display()))?;
    process::set_threads(cfg.threads)?;
    cfg.train.device = process::device_for_rank(cfg.train.device, &dist);
    let nccl = process::wants_nccl(&dist, cfg.train.device);
    let mut collective = process::collective_for(&dist, cfg.train.device)?;
    let tok_dir = ctx.input("tokenizer")?;
    let tokenizer = Arc::new(
        Tokenizer::load(tok_dir)
            .with_context(|| format!("loading tokenizer from {}", tok_dir.display()))?,
    );
    // A data-stage artifact holds `corpus/`; a plain shard directory works too.
    let mut corpus = ctx.input("corpus")?.to_path_buf();
    if corpus.join("corpus").is_dir() {
        corpus = corpus.join("corpus");
    }
    let train_shards = list_shards(&corpus, Split::Train)?;
    let val_shards = list_shards(&corpus, Split::Val)?;
    let mcfg = GptConfig::from_depth(
        cfg.model.depth,
        tokenizer.vocab_size() as usize,
        cfg.model.sequence_len,
    )
    .with_context(|| format!("model section of {}", ctx.config_path().display()))?;
    tracing::info!(?mcfg, params = mcfg.num_params(), "model");
    cfg.train
        .resolve_horizon(&mcfg)
        .with_context(|| format!("train section of {}", ctx.config_path().display()))?;
    let model = Gpt::new(mcfg, cfg.seed)?;
    let b = cfg.train.device_batch_size;
    let t = cfg.model.sequence_len;
    let spec = |shards: Vec<std::path::PathBuf>| LoaderSpec {
        shards,
        b,
        t,
        rank: data_rank,
        world_size: data_world,
        prefetch: cfg.data.prefetch,
    };
    let dump = parity_dump::ParityDump::from_env()?;
    if let Some(d) = &dump {
        d.write_start(&model, &cfg.train, b, t)?;
    }
    let mut make_train = |state| -> Result<Box<dyn BatchSource>, TrainError> {
        let loader: Box<dyn BatchSource> = Box::new(PretrainLoader::start(
            spec(train_shards.clone()),
            tokenizer.clone(),
            state,
        )?);
        Ok(match &dump {
            Some(d) => Box::new(d.wrap(loader)?),
            None => loader,
        })
    };
    let mut make_val = || -> Result<Box<dyn BatchSource>, TrainError> {
        Ok(Box::new(PretrainLoader::start(
            spec(val_shards.clone()),
            tokenizer.clone(),
            None,
        )?))
    };
    let job = TrainJob {
        cfg: &cfg.train,
        units_per_micro: b * t,
        tokenizer: &tokenizer,
        dirs: RunDirs {
            work: ctx.work_dir().to_path_buf(),
            out: ctx.out_dir().to_path_buf(),
            run: ctx.run_dir().map(std::path::Path::to_path_buf),
        },
        meta: CheckpointMeta::new(0),
        interrupted: &stage::interrupted,
        collective: collective.as_mut(),
        nccl,
    };
    let outcome = train_on_device(job, model, &mut make_train, &mut make_val)?;
    Ok(process::exit_code(outcome, "pretraining"))
}
