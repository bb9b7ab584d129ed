//! The server configs the pipelines' `serve:` targets name parse, and hold nanochat's
//! chat_web.py settings (port 8000, temperature 0.8, top-k 50, 512 new tokens).

use std::path::Path;

use nanochat_inference::config::ServerConfig;

#[test]
fn speedrun_serve_configs_parse_with_nanochats_settings() {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    for f in [
        "configs/speedrun/serve.toml",
        "configs/speedrun-ci/serve.toml",
    ] {
        let cfg = ServerConfig::from_file(&repo.join(f)).unwrap_or_else(|e| panic!("{f}: {e}"));
        assert_eq!(cfg.port, 8000, "{f}");
        assert_eq!(cfg.defaults.temperature, 0.8, "{f}");
        assert_eq!(cfg.defaults.top_k, 50, "{f}");
        assert_eq!(cfg.defaults.max_tokens, 512, "{f}");
    }
}
