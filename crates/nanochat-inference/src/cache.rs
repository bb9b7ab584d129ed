//! Cache of deterministic responses (temperature 0 or an explicit seed).
//!
//! Entries store the generation (per-choice text deltas, finish reasons, usage, and the response
//! id/created), not a rendered body: a non-streaming hit re-renders the byte-identical body and a
//! streaming hit replays the same deltas as a stream. Bounded by entry count and by bytes, with
//! least-recently-used eviction and a time-to-live.

use std::num::NonZeroUsize;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use lru::LruCache;
use serde::Serialize;
use sha2::{Digest, Sha256};

use crate::backend::Finish;
use crate::config::CacheConfig;

/// One cached choice.
#[derive(Debug, Clone, PartialEq)]
pub struct CachedChoice {
    /// Text deltas in the order they were streamed.
    pub deltas: Vec<String>,
    /// Why it stopped.
    pub finish: Finish,
}

/// One cached response.
#[derive(Debug, Clone, PartialEq)]
pub struct CachedResponse {
    /// Response id of the original.
    pub id: String,
    /// `created` of the original.
    pub created: u64,
    /// Choices in index order.
    pub choices: Vec<CachedChoice>,
    /// Prompt tokens.
    pub prompt_tokens: usize,
    /// Generated tokens over all choices.
    pub completion_tokens: usize,
}

impl CachedResponse {
    fn cost_bytes(&self) -> usize {
        // Per-delta overhead approximates the String headers and Vec slots.
        128 + self
            .choices
            .iter()
            .map(|c| 64 + c.deltas.iter().map(|d| d.len() + 32).sum::<usize>())
            .sum::<usize>()
    }
}

struct Entry {
    value: Arc<CachedResponse>,
    inserted: Instant,
    cost: usize,
}

struct Inner {
    lru: LruCache<[u8; 32], Entry>,
    bytes: usize,
}

/// The cache; shared by all HTTP workers.
pub struct ResponseCache {
    cfg: CacheConfig,
    ttl: Duration,
    inner: Mutex<Inner>,
    hits: AtomicU64,
    misses: AtomicU64,
}

/// Cache figures for /stats.
#[derive(Debug, Clone, Serialize)]
pub struct CacheStats {
    /// Whether caching is on.
    pub enabled: bool,
    /// Lookups answered from the cache.
    pub hits: u64,
    /// Lookups that had to generate.
    pub misses: u64,
    /// hits / (hits + misses), 0 when there were none.
    pub hit_rate: f64,
    /// Entries held.
    pub entries: usize,
    /// Approximate bytes held.
    pub bytes: usize,
}

/// Hex sha256 of some bytes.
pub fn hex_digest(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// Cache key: sha256 over the model identity and a canonical rendering of the request.
pub fn cache_key(artifact_id: &str, normalized_request: &impl Serialize) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(artifact_id.as_bytes());
    h.update([0u8]);
    // serde_json writes struct fields in declaration order: a stable canonical form.
    h.update(serde_json::to_vec(normalized_request).unwrap_or_default());
    h.finalize().into()
}

impl ResponseCache {
    /// A cache with these bounds.
    pub fn new(cfg: CacheConfig) -> Self {
        let cap = NonZeroUsize::new(cfg.max_entries.max(1)).unwrap_or(NonZeroUsize::MIN);
        Self {
            ttl: Duration::from_secs_f64(cfg.ttl_secs),
            cfg,
            inner: Mutex::new(Inner {
                lru: LruCache::new(cap),
                bytes: 0,
            }),
            hits: AtomicU64::new(0),
            misses: AtomicU64::new(0),
        }
    }

    fn inner(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether caching is on.
    pub fn enabled(&self) -> bool {
        self.cfg.enabled && self.cfg.max_entries > 0
    }

    /// Look up; counts a hit or a miss. Expired entries are dropped.
    pub fn get(&self, key: &[u8; 32]) -> Option<Arc<CachedResponse>> {
        if !self.enabled() {
            return None;
        }
        let mut inner = self.inner();
        let found = match inner.lru.get(key) {
            Some(e) if e.inserted.elapsed() < self.ttl => Some(e.value.clone()),
            Some(_) => {
                if let Some(e) = inner.lru.pop(key) {
                    inner.bytes -= e.cost;
                }
                None
            }
            None => None,
        };
        drop(inner);
        let counter = if found.is_some() {
            &self.hits
        } else {
            &self.misses
        };
        counter.fetch_add(1, Ordering::Relaxed);
        found
    }

    /// Store a completed response, evicting least-recently-used entries to stay in bounds.
    pub fn put(&self, key: [u8; 32], value: CachedResponse) {
        if !self.enabled() {
            return;
        }
        let cost = value.cost_bytes();
        if cost > self.cfg.max_bytes {
            return;
        }
        let mut inner = self.inner();
        let entry = Entry {
            value: Arc::new(value),
            inserted: Instant::now(),
            cost,
        };
        if let Some((_, old)) = inner.lru.push(key, entry) {
            inner.bytes -= old.cost;
        }
        inner.bytes += cost;
        while inner.bytes > self.cfg.max_bytes {
            match inner.lru.pop_lru() {
                Some((_, e)) => inner.bytes -= e.cost,
                None => break,
            }
        }
    }

    /// Drop everything; returns how many entries there were.
    pub fn clear(&self) -> usize {
        let mut inner = self.inner();
        let n = inner.lru.len();
        inner.lru.clear();
        inner.bytes = 0;
        n
    }

    /// Figures for /stats.
    pub fn stats(&self) -> CacheStats {
        let (entries, bytes) = {
            let inner = self.inner();
            (inner.lru.len(), inner.bytes)
        };
        let hits = self.hits.load(Ordering::Relaxed);
        let misses = self.misses.load(Ordering::Relaxed);
        let total = hits + misses;
        CacheStats {
            enabled: self.enabled(),
            hits,
            misses,
            hit_rate: if total == 0 {
                0.0
            } else {
                hits as f64 / total as f64
            },
            entries,
            bytes,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn resp(text: &str) -> CachedResponse {
        CachedResponse {
            id: "x".into(),
            created: 1,
            choices: vec![CachedChoice {
                deltas: vec![text.to_string()],
                finish: Finish::Stop,
            }],
            prompt_tokens: 1,
            completion_tokens: 1,
        }
    }

    fn cfg(entries: usize, bytes: usize, ttl: f64) -> CacheConfig {
        CacheConfig {
            enabled: true,
            max_entries: entries,
            max_bytes: bytes,
            ttl_secs: ttl,
        }
    }

    #[test]
    fn key_depends_on_model_and_request() {
        let a = cache_key("m1", &("hi", 0.0));
        assert_eq!(a, cache_key("m1", &("hi", 0.0)));
        assert_ne!(a, cache_key("m2", &("hi", 0.0)));
        assert_ne!(a, cache_key("m1", &("hi", 0.5)));
    }

    #[test]
    fn hit_miss_counting_and_lru_entry_bound() {
        let c = ResponseCache::new(cfg(2, 1 << 20, 60.0));
        let (k1, k2, k3) = ([1; 32], [2; 32], [3; 32]);
        assert!(c.get(&k1).is_none());
        c.put(k1, resp("a"));
        c.put(k2, resp("b"));
        assert_eq!(c.get(&k1).unwrap().choices[0].deltas[0], "a"); // k1 now most recent
        c.put(k3, resp("c")); // evicts k2
        assert!(c.get(&k2).is_none());
        assert!(c.get(&k1).is_some() && c.get(&k3).is_some());
        let s = c.stats();
        assert_eq!((s.hits, s.misses, s.entries), (3, 2, 2));
        assert!((s.hit_rate - 0.6).abs() < 1e-9);
        assert_eq!(c.clear(), 2);
        assert_eq!(c.stats().bytes, 0);
    }

    #[test]
    fn byte_bound_evicts_and_oversize_is_skipped() {
        let one = resp(&"x".repeat(1000)).cost_bytes();
        let c = ResponseCache::new(cfg(100, one * 2 + 10, 60.0));
        for i in 0..5u8 {
            c.put([i; 32], resp(&"x".repeat(1000)));
        }
        let s = c.stats();
        assert_eq!(s.entries, 2);
        assert!(s.bytes <= one * 2 + 10);
        c.put([9; 32], resp(&"x".repeat(10_000)));
        assert!(c.get(&[9; 32]).is_none());
    }

    #[test]
    fn entries_expire() {
        let c = ResponseCache::new(cfg(10, 1 << 20, 0.05));
        c.put([1; 32], resp("a"));
        assert!(c.get(&[1; 32]).is_some());
        std::thread::sleep(Duration::from_millis(80));
        assert!(c.get(&[1; 32]).is_none());
        assert_eq!(c.stats().entries, 0);
    }
}
