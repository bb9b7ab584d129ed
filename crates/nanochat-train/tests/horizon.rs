//! The speedrun config derives its step count from the data:param ratio the way nanochat's
//! `base_train.py` does, and a config without any horizon is rejected with a clear message.

use std::path::Path;

use nanochat_model::GptConfig;
use nanochat_train::trainer::LoopConfig;
use serde::Deserialize;

#[derive(Deserialize)]
struct PretrainConfig {
    model: Model,
    train: LoopConfig,
}

#[derive(Deserialize)]
struct Model {
    depth: usize,
    sequence_len: usize,
}

#[test]
fn speedrun_pretrain_derives_21400_steps_from_ratio_20() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../configs/speedrun/pretrain.toml");
    let mut cfg: PretrainConfig = nanochat_artifacts::stage::load_toml(&path).unwrap();
    assert_eq!(
        cfg.train.num_iterations, 0,
        "the speedrun derives its horizon"
    );
    assert_eq!(cfg.train.target_param_data_ratio, 20.0);
    let model = GptConfig::from_depth(cfg.model.depth, 65536, cfg.model.sequence_len).unwrap();
    assert_eq!(model.num_params(), 560_988_160);
    assert_eq!(cfg.train.resolve_horizon(&model).unwrap(), 21_400);
    assert_eq!(cfg.train.num_iterations, 21_400);
}

#[test]
fn explicit_steps_win_and_a_missing_horizon_is_an_error() {
    let model = GptConfig::from_depth(2, 256, 128).unwrap();
    let mut cfg: LoopConfig =
        toml_train("total_batch_size = 2048\nnum_iterations = 5\ntarget_param_data_ratio = 20.0");
    assert_eq!(cfg.resolve_horizon(&model).unwrap(), 5);
    let mut cfg = toml_train("total_batch_size = 2048");
    let err = cfg.resolve_horizon(&model).unwrap_err().to_string();
    assert!(err.contains("target_param_data_ratio"), "{err}");
    // Validation of a stage that never resolves (midtrain, SFT) names the way out too.
    assert!(cfg
        .validate(1024)
        .unwrap_err()
        .to_string()
        .contains("num_iterations"));
}

fn toml_train(body: &str) -> LoopConfig {
    let text = format!("device_batch_size = 8\n{body}\n");
    nanochat_artifacts::stage::parse_toml(&text, Path::new("train.toml")).unwrap()
}
