//! KV cache and incremental (cached) forward for inference.

use crate::config::GptConfig;
use crate::error::{alloc_f32, ModelError, Result};
use crate::kernels::{gemm_acc, gemm_set, matmul_wt_few_rows};
use crate::model::Gpt;
use crate::ops::{attention_cached, rmsnorm_fwd, rmsnorm_inplace, softcapped_ce_row};
use crate::params::{layer_param, lm_head_index, FC, K, MLP_PROJ, PROJ, Q, V, WTE};

/// Keys and values of past positions for a batch of independent rows (sequences), each with
/// its own length. Layout `[layer][row][position][kv_head·head_dim]`.
#[derive(Debug, Clone)]
pub struct KvCache {
    n_layer: usize,
    kv_width: usize,
    rows: usize,
    capacity: usize,
    lens: Vec<usize>,
    k: Vec<f32>,
    v: Vec<f32>,
}

pub(crate) fn kv_cache_bytes(cfg: &GptConfig, rows: usize, capacity: usize) -> u64 {
    2 * 4 * (cfg.n_layer * rows * capacity * cfg.n_kv_head * cfg.head_dim()) as u64
}

impl KvCache {
    /// An empty cache for `rows` sequences of up to `capacity` positions each.
    pub fn new(cfg: &GptConfig, rows: usize, capacity: usize) -> Result<Self> {
        if rows == 0 || capacity == 0 {
            return Err(ModelError::InvalidInput(format!(
                "KV cache needs at least one row and one position (got {rows} × {capacity})"
            )));
        }
        if capacity > cfg.max_positions() {
            return Err(ModelError::InvalidInput(format!(
                "KV cache capacity {capacity} exceeds the rotary table ({} positions)",
                cfg.max_positions()
            )));
        }
        crate::memory::check_fits(kv_cache_bytes(cfg, rows, capacity), "KV cache")?;
        let kv_width = cfg.n_kv_head * cfg.head_dim();
        let len = cfg.n_layer * rows * capacity * kv_width;
        Ok(KvCache {
            n_layer: cfg.n_layer,
            kv_width,
            rows,
            capacity,
            lens: vec![0; rows],
            k: alloc_f32(len, "KV cache keys")?,
            v: alloc_f32(len, "KV cache values")?,
        })
    }

    /// Number of rows.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Positions each row can hold.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Positions filled in `row`.
    pub fn len(&self, row: usize) -> usize {
        self.lens.get(row).copied().unwrap_or(0)
    }

    /// Whether every row is empty.
    pub fn is_empty(&self) -> bool {
        self.lens.iter().all(|&l| l == 0)
    }

    /// Empties one row (its old contents are simply overwritten later).
    pub fn reset(&mut self, row: usize) -> Result<()> {
        self.check_row(row)?;
        self.lens[row] = 0;
        Ok(())
    }

    /// Copies row `src` (contents and length) into row `dst`, e.g. to fork several samples
    /// from one prefilled prompt.
    pub fn copy_row(&mut self, src: usize, dst: usize) -> Result<()> {
        self.check_row(src)?;
        self.check_row(dst)?;
        if src == dst {
            return Ok(());
        }
        let n = self.lens[src] * self.kv_width;
        for l in 0..self.n_layer {
            let (s, d) = (self.offset(l, src, 0), self.offset(l, dst, 0));
            self.k.copy_within(s..s + n, d);
            self.v.copy_within(s..s + n, d);
        }
        self.lens[dst] = self.lens[src];
        Ok(())
    }

    fn check_row(&self, row: usize) -> Result<()> {
        if row >= self.rows {
            return Err(ModelError::InvalidInput(format!(
                "KV cache row {row} does not exist (the cache has {} rows)",
                self.rows
            )));
        }
        Ok(())
    }

    fn offset(&self, layer: usize, row: usize, pos: usize) -> usize {
        ((layer * self.rows + row) * self.capacity + pos) * self.kv_width
    }
}

/// Up to this many new tokens, projections stream the `[out, in]` weights once (GEMV-like,
/// parallel over output blocks); beyond, they run as GEMMs. Measured at depth 8 / vocab 65,536
/// (`bench_engine`, 2 threads): the streaming path still wins at 12 rows, and a GEMM below
/// one 16-row tile pays for a whole padded tile anyway.
const FEW_ROWS: usize = 16;

impl Gpt {
    fn linear_any(&self, i: usize, rows: usize, x: &[f32], y: &mut [f32], acc: bool) -> Result<()> {
        let [out, inp] = self.specs[i].shape;
        if rows <= FEW_ROWS {
            matmul_wt_few_rows(rows, out, inp, x, &self.data[i], y, acc);
            Ok(())
        } else if acc {
            gemm_acc(rows, out, inp, x, &self.wt[i], y)
        } else {
            gemm_set(rows, out, inp, x, &self.wt[i], y)
        }
    }

    /// Runs new tokens through the model, extending the cache. `batch` lists `(row, tokens)`
    /// pairs (each row at most once; tokens continue that row's sequence: a whole prompt to
    /// prefill, or one token per decode step). Returns softcapped logits `[Σ tokens, vocab]`,
    /// in the order given: the same numbers a full forward over each row's sequence gives.
    pub fn forward_cached(
        &self,
        cache: &mut KvCache,
        batch: &[(usize, &[u32])],
    ) -> Result<Vec<f32>> {
        // Run the whole step on a rayon worker: the ~15 small parallel loops per layer then
        // start in-pool instead of each paying a cross-thread injection (which dominated
        // single-token latency at small widths).
        rayon::scope(|_| self.forward_cached_in_pool(cache, batch, false))
    }

    /// Like [`Gpt::forward_cached`], but returns only the logits after each entry's last token:
    /// `[batch.len(), vocab]`, in the order given. Prefill needs nothing else, and skipping the
    /// lm_head GEMM for the other positions removes most of its cost at large vocabularies
    /// (that projection is `vocab * n_embd` per position, more than a whole layer).
    pub fn forward_cached_last(
        &self,
        cache: &mut KvCache,
        batch: &[(usize, &[u32])],
    ) -> Result<Vec<f32>> {
        rayon::scope(|_| self.forward_cached_in_pool(cache, batch, true))
    }

    fn forward_cached_in_pool(
        &self,
        cache: &mut KvCache,
        batch: &[(usize, &[u32])],
        last_only: bool,
    ) -> Result<Vec<f32>> {
        let cfg = &self.cfg;
        if cache.n_layer != cfg.n_layer || cache.kv_width != cfg.n_kv_head * cfg.head_dim() {
            return Err(ModelError::InvalidInput(
                "KV cache was created for a different model config".into(),
            ));
        }
        let mut seen = vec![false; cache.rows];
        let (mut toks, mut rows, mut positions) = (Vec::new(), Vec::new(), Vec::new());
        for &(row, ts) in batch {
            cache.check_row(row)?;
            if std::mem::replace(&mut seen[row], true) {
                return Err(ModelError::InvalidInput(format!(
                    "KV cache row {row} appears twice in one forward_cached call"
                )));
            }
            if last_only && ts.is_empty() {
                return Err(ModelError::InvalidInput(format!(
                    "KV cache row {row} has no new tokens, so it has no last-position logits"
                )));
            }
            let start = cache.lens[row];
            if start + ts.len() > cache.capacity {
                return Err(ModelError::CacheFull {
                    row,
                    needed: start + ts.len(),
                    capacity: cache.capacity,
                });
            }
            for (j, &tok) in ts.iter().enumerate() {
                if tok as usize >= cfg.vocab_size {
                    return Err(ModelError::InvalidInput(format!(
                        "token id {tok} is outside the vocabulary (size {})",
                        cfg.vocab_size
                    )));
                }
                toks.push(tok);
                rows.push(row);
                positions.push(start + j);
            }
        }
        let m = toks.len();
        if m == 0 {
            return Ok(Vec::new());
        }
        let (c, d, h, hk) = (cfg.n_embd, cfg.head_dim(), cfg.n_head, cfg.n_kv_head);
        let (kd, f, vp, vocab) = (hk * d, 4 * c, cfg.padded_vocab_size(), cfg.vocab_size);
        let mut x = alloc_f32(m * c, "decode activations")?;
        let mut xn = alloc_f32(m * c, "decode activations")?;
        let mut q = alloc_f32(m * c, "decode activations")?;
        let mut kn = alloc_f32(m * kd, "decode activations")?;
        let mut vn = alloc_f32(m * kd, "decode activations")?;
        let mut y = alloc_f32(m * c, "decode activations")?;
        let mut hid = alloc_f32(m * f, "decode activations")?;
        let mut rs = vec![0f32; m * h.max(1)];
        let wte = &self.data[WTE];
        for (row, &tok) in x.chunks_exact_mut(c).zip(&toks) {
            row.copy_from_slice(&wte[tok as usize * c..(tok as usize + 1) * c]);
        }
        rmsnorm_fwd(&x, &mut xn, &mut rs[..m], c);
        x.copy_from_slice(&xn);
        for l in 0..cfg.n_layer {
            rmsnorm_fwd(&x, &mut xn, &mut rs[..m], c);
            self.linear_any(layer_param(l, Q), m, &xn, &mut q, false)?;
            self.linear_any(layer_param(l, K), m, &xn, &mut kn, false)?;
            self.linear_any(layer_param(l, V), m, &xn, &mut vn, false)?;
            self.rope.apply(&mut q, h, &positions, false);
            self.rope.apply(&mut kn, hk, &positions, false);
            rmsnorm_inplace(&mut q, &mut rs[..m * h], d);
            rmsnorm_inplace(&mut kn, &mut rs[..m * hk], d);
            for i in 0..m {
                let o = cache.offset(l, rows[i], positions[i]);
                cache.k[o..o + kd].copy_from_slice(&kn[i * kd..(i + 1) * kd]);
                cache.v[o..o + kd].copy_from_slice(&vn[i * kd..(i + 1) * kd]);
            }
            {
                let cache_ref = &*cache;
                let kv_row = |r: usize| {
                    let o = cache_ref.offset(l, r, 0);
                    let n = cache_ref.capacity * kd;
                    (&cache_ref.k[o..o + n], &cache_ref.v[o..o + n])
                };
                attention_cached(h, hk, d, &q, &positions, &rows, &kv_row, &mut y);
            }
            self.linear_any(layer_param(l, PROJ), m, &y, &mut x, true)?;
            rmsnorm_fwd(&x, &mut xn, &mut rs[..m], c);
            self.linear_any(layer_param(l, FC), m, &xn, &mut hid, false)?;
            hid.iter_mut().for_each(|v| {
                let r = v.max(0.0);
                *v = r * r;
            });
            self.linear_any(layer_param(l, MLP_PROJ), m, &hid, &mut x, true)?;
        }
        rmsnorm_fwd(&x, &mut xn, &mut rs[..m], c);
        // Only the positions whose logits are wanted go through lm_head.
        let (xn, m) = if last_only {
            let mut last = Vec::with_capacity(batch.len() * c);
            let mut end = 0;
            for &(_, ts) in batch {
                end += ts.len();
                last.extend_from_slice(&xn[(end - 1) * c..end * c]);
            }
            (last, batch.len())
        } else {
            (xn, m)
        };
        let mut logits = alloc_f32(m * vp, "logits")?;
        self.linear_any(lm_head_index(cfg), m, &xn, &mut logits, false)?;
        let mut out = alloc_f32(m * vocab, "logits")?;
        for (o, row) in out.chunks_exact_mut(vocab).zip(logits.chunks_exact_mut(vp)) {
            softcapped_ce_row(row, vocab, -1, cfg.softcap, None, &mut []);
            o.copy_from_slice(&row[..vocab]);
        }
        for &(row, ts) in batch {
            cache.lens[row] += ts.len();
        }
        Ok(out)
    }
}
