//! Server configuration: a TOML file (unknown keys rejected) overridden by command-line flags.

use serde::{Deserialize, Serialize};
use std::path::Path;

use crate::error::{InferenceError, Result};

/// Everything the server can be told. Every field has a default; a TOML file may set any subset.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    /// Address to bind. Defaults to loopback; expose deliberately.
    pub host: String,
    /// Port to bind (0 picks a free one).
    pub port: u16,
    /// Decode workers; each owns a decoder and runs its own continuous batch.
    pub workers: usize,
    /// Most sequences one worker decodes together.
    pub max_batch: usize,
    /// Most requests waiting for a decode slot; beyond it requests get 429.
    pub queue_capacity: usize,
    /// Wall-clock limit per request (queueing included), seconds.
    pub request_timeout_secs: f64,
    /// Largest accepted request body, bytes.
    pub max_body_bytes: usize,
    /// Name reported by /v1/models and required in `model` (None: derived from the model).
    pub model_name: Option<String>,
    /// Bearer token for /admin endpoints; they do not exist unless this is set.
    pub admin_token: Option<String>,
    /// Abuse limits.
    pub limits: Limits,
    /// Sampling defaults for fields a request leaves out.
    pub defaults: SamplingDefaults,
    /// Deterministic-response cache.
    pub cache: CacheConfig,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            host: "127.0.0.1".into(),
            port: 8000,
            workers: 1,
            max_batch: 32,
            queue_capacity: 64,
            request_timeout_secs: 300.0,
            max_body_bytes: 1 << 20,
            model_name: None,
            admin_token: None,
            limits: Limits::default(),
            defaults: SamplingDefaults::default(),
            cache: CacheConfig::default(),
        }
    }
}

/// Request limits (nanochat's chat_web values by default).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Most messages per chat request.
    pub max_messages: usize,
    /// Most characters (Unicode scalar values) per message.
    pub max_message_chars: usize,
    /// Most characters over all messages (or a completion prompt).
    pub max_total_chars: usize,
    /// Highest accepted temperature (lowest is 0).
    pub max_temperature: f64,
    /// Highest accepted top_k (0 disables top-k).
    pub max_top_k: i64,
    /// Highest accepted max_tokens (lowest is 1).
    pub max_tokens: i64,
    /// Most choices per request (`n`).
    pub max_n: i64,
    /// Most stop strings per request.
    pub max_stop_sequences: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_messages: 500,
            max_message_chars: 8000,
            max_total_chars: 32000,
            max_temperature: 2.0,
            max_top_k: 200,
            max_tokens: 4096,
            max_n: 8,
            max_stop_sequences: 4,
        }
    }
}

/// Sampling values used when a request omits them.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct SamplingDefaults {
    /// Default temperature.
    pub temperature: f64,
    /// Default top_k (0: off).
    pub top_k: i64,
    /// Default max_tokens.
    pub max_tokens: i64,
}

impl Default for SamplingDefaults {
    fn default() -> Self {
        Self {
            temperature: 0.8,
            top_k: 50,
            max_tokens: 512,
        }
    }
}

/// Response cache bounds.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct CacheConfig {
    /// Cache deterministic responses at all.
    pub enabled: bool,
    /// Most entries kept.
    pub max_entries: usize,
    /// Most bytes of cached text kept (approximate, includes per-chunk overhead).
    pub max_bytes: usize,
    /// Seconds an entry stays valid.
    pub ttl_secs: f64,
}

impl Default for CacheConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            max_entries: 4096,
            max_bytes: 64 << 20,
            ttl_secs: 3600.0,
        }
    }
}

impl ServerConfig {
    /// Parse a TOML document; unknown keys are errors.
    pub fn from_toml_str(text: &str) -> Result<Self> {
        let cfg: Self = toml::from_str(text).map_err(|e| InferenceError::Config(e.to_string()))?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Read and parse a TOML file.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|source| InferenceError::Io {
            path: path.display().to_string(),
            source,
        })?;
        Self::from_toml_str(&text)
            .map_err(|e| InferenceError::Config(format!("{}: {e}", path.display())))
    }

    /// Reject values the server cannot run with.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: &str| Err(InferenceError::Config(m.to_string()));
        if self.workers == 0 {
            return bad("workers must be at least 1");
        }
        if self.max_batch == 0 {
            return bad("max_batch must be at least 1");
        }
        if !(self.request_timeout_secs.is_finite() && self.request_timeout_secs > 0.0) {
            return bad("request_timeout_secs must be a positive number");
        }
        if self.max_body_bytes < 1024 {
            return bad("max_body_bytes must be at least 1024");
        }
        if self.limits.max_tokens < 1 || self.limits.max_n < 1 {
            return bad("limits.max_tokens and limits.max_n must be at least 1");
        }
        if !(0.0..=self.limits.max_temperature).contains(&self.defaults.temperature) {
            return bad("defaults.temperature must lie in [0, limits.max_temperature]");
        }
        if !(0..=self.limits.max_top_k).contains(&self.defaults.top_k) {
            return bad("defaults.top_k must lie in [0, limits.max_top_k]");
        }
        if !(1..=self.limits.max_tokens).contains(&self.defaults.max_tokens) {
            return bad("defaults.max_tokens must lie in [1, limits.max_tokens]");
        }
        if !(self.cache.ttl_secs.is_finite() && self.cache.ttl_secs > 0.0) {
            return bad("cache.ttl_secs must be a positive number");
        }
        if self.admin_token.as_deref() == Some("") {
            return bad("admin_token must not be empty (leave it out to disable /admin)");
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partial_toml_keeps_defaults() {
        let cfg = ServerConfig::from_toml_str("port = 9000\n[limits]\nmax_messages = 3\n").unwrap();
        assert_eq!(cfg.port, 9000);
        assert_eq!(cfg.limits.max_messages, 3);
        assert_eq!(cfg.limits.max_message_chars, 8000);
        assert_eq!(cfg.host, "127.0.0.1");
    }

    #[test]
    fn unknown_keys_are_rejected() {
        let err = ServerConfig::from_toml_str("prot = 9000\n").unwrap_err();
        assert!(err.to_string().contains("prot"), "{err}");
        let err = ServerConfig::from_toml_str("[cache]\nsize = 3\n").unwrap_err();
        assert!(err.to_string().contains("size"), "{err}");
    }

    #[test]
    fn impossible_values_are_rejected() {
        assert!(ServerConfig::from_toml_str("workers = 0\n").is_err());
        assert!(ServerConfig::from_toml_str("[defaults]\ntemperature = 3.0\n").is_err());
        assert!(ServerConfig::from_toml_str("admin_token = \"\"\n").is_err());
    }
}
