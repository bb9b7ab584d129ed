//! KV cache and incremental (cached) forward for inference.

use nanochat_compute::{Backend, Cpu, DecodeShape};

use crate::config::GptConfig;
use crate::error::{ModelError, Result};
use crate::forward::{self, Attn};
use crate::model::{upload_batch, Gpt};
use crate::plan::{Activations, PassShape};

/// Keys and values of past positions for a batch of independent rows (sequences), each with
/// its own length, on the model's device. Layout `[layer][row][position][kv_head·head_dim]`.
/// It also keeps the buffers of the decode pass, so that a step allocates nothing once they
/// have grown to the largest call.
pub struct KvCache<B: Backend = Cpu> {
    backend: B,
    n_layer: usize,
    kv_width: usize,
    rows: usize,
    capacity: usize,
    lens: Vec<usize>,
    k: B::Buf,
    v: B::Buf,
    work: Option<DecodeWork<B>>,
}

/// The decode pass's buffers for up to `tokens` new tokens per call.
struct DecodeWork<B: Backend> {
    tokens: usize,
    acts: Box<Activations<B::Buf, B::IBuf>>,
    rows: B::IBuf,
    kv_index: B::IBuf,
}

impl<B: Backend> std::fmt::Debug for KvCache<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KvCache")
            .field("rows", &self.rows)
            .field("capacity", &self.capacity)
            .field("lens", &self.lens)
            .finish_non_exhaustive()
    }
}

pub(crate) fn kv_cache_bytes(cfg: &GptConfig, rows: usize, capacity: usize) -> u64 {
    2 * 4 * (cfg.n_layer * rows * capacity * cfg.n_kv_head * cfg.head_dim()) as u64
}

impl KvCache<Cpu> {
    /// An empty CPU cache for `rows` sequences of up to `capacity` positions each.
    pub fn new(cfg: &GptConfig, rows: usize, capacity: usize) -> Result<Self> {
        Self::new_on(Cpu, cfg, rows, capacity)
    }
}

impl<B: Backend> KvCache<B> {
    /// An empty cache on `backend` for `rows` sequences of up to `capacity` positions each.
    pub fn new_on(backend: B, cfg: &GptConfig, rows: usize, capacity: usize) -> Result<Self> {
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
        let bytes = kv_cache_bytes(cfg, rows, capacity);
        if let Some(avail) = backend.available_memory() {
            if bytes > avail {
                return Err(ModelError::oom("KV cache", bytes, Some(avail)));
            }
        }
        let kv_width = cfg.n_kv_head * cfg.head_dim();
        let len = cfg.n_layer * rows * capacity * kv_width;
        let k = backend.alloc(len, "KV cache keys")?;
        let v = backend.alloc(len, "KV cache values")?;
        Ok(KvCache {
            backend,
            n_layer: cfg.n_layer,
            kv_width,
            rows,
            capacity,
            lens: vec![0; rows],
            k,
            v,
            work: None,
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
            self.backend
                .copy_within(B::view_mut(&mut self.k), s, d, n)?;
            self.backend
                .copy_within(B::view_mut(&mut self.v), s, d, n)?;
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

    /// Buffers for a call of `tokens` new tokens (grown geometrically, never shrunk).
    fn ensure_work(&mut self, model: &Gpt<B>, tokens: usize) -> Result<()> {
        if self.work.as_ref().is_some_and(|w| w.tokens >= tokens) {
            return Ok(());
        }
        let cap = tokens.next_power_of_two().max(16);
        self.work = None;
        let acts = model.new_acts(PassShape {
            b: 1,
            t: cap,
            layers: 1,
            with_grad: false,
            causal: false,
            device: model.backend().kind(),
        })?;
        self.work = Some(DecodeWork {
            tokens: cap,
            acts,
            rows: self.backend.alloc_ints(cap, "decode rows")?,
            kv_index: self.backend.alloc_ints(cap, "decode cache slots")?,
        });
        Ok(())
    }
}

/// Host-side description of one cached call: which token goes where.
struct CachedBatch {
    tokens: Vec<u32>,
    rows: Vec<i32>,
    positions: Vec<i32>,
    kv_index: Vec<i32>,
    /// Index (into the call's tokens) of each entry's last token.
    last: Vec<i32>,
}

impl<B: Backend> Gpt<B> {
    /// An empty KV cache on this model's device.
    pub fn new_kv_cache(&self, rows: usize, capacity: usize) -> Result<KvCache<B>> {
        KvCache::new_on(self.backend.clone(), &self.cfg, rows, capacity)
    }

    /// Runs new tokens through the model, extending the cache. `batch` lists `(row, tokens)`
    /// pairs (each row at most once; tokens continue that row's sequence: a whole prompt to
    /// prefill, or one token per decode step). Returns softcapped logits `[Σ tokens, vocab]`,
    /// in the order given: the same numbers a full forward over each row's sequence gives.
    pub fn forward_cached(
        &self,
        cache: &mut KvCache<B>,
        batch: &[(usize, &[u32])],
    ) -> Result<Vec<f32>> {
        self.backend
            .run_step(|| self.forward_cached_step(cache, batch, false))
    }

    /// Like [`Gpt::forward_cached`], but returns only the logits after each entry's last token:
    /// `[batch.len(), vocab]`, in the order given. Prefill needs nothing else, and skipping the
    /// lm_head GEMM for the other positions removes most of its cost at large vocabularies
    /// (that projection is `vocab * n_embd` per position, more than a whole layer).
    pub fn forward_cached_last(
        &self,
        cache: &mut KvCache<B>,
        batch: &[(usize, &[u32])],
    ) -> Result<Vec<f32>> {
        self.backend
            .run_step(|| self.forward_cached_step(cache, batch, true))
    }

    fn plan_cached(
        &self,
        cache: &KvCache<B>,
        batch: &[(usize, &[u32])],
        last_only: bool,
    ) -> Result<CachedBatch> {
        let cfg = &self.cfg;
        if cache.n_layer != cfg.n_layer || cache.kv_width != cfg.n_kv_head * cfg.head_dim() {
            return Err(ModelError::InvalidInput(
                "KV cache was created for a different model config".into(),
            ));
        }
        let mut seen = vec![false; cache.rows];
        let mut plan = CachedBatch {
            tokens: Vec::new(),
            rows: Vec::new(),
            positions: Vec::new(),
            kv_index: Vec::new(),
            last: Vec::new(),
        };
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
                let pos = start + j;
                plan.tokens.push(tok);
                plan.rows.push(row as i32);
                plan.positions.push(pos as i32);
                plan.kv_index.push((row * cache.capacity + pos) as i32);
            }
            if !ts.is_empty() {
                plan.last.push(plan.tokens.len() as i32 - 1);
            }
        }
        Ok(plan)
    }

    fn forward_cached_step(
        &self,
        cache: &mut KvCache<B>,
        batch: &[(usize, &[u32])],
        last_only: bool,
    ) -> Result<Vec<f32>> {
        let plan = self.plan_cached(cache, batch, last_only)?;
        let m = plan.tokens.len();
        if m == 0 {
            return Ok(Vec::new());
        }
        let cfg = &self.cfg;
        let prec = self.backend.decode_precision(self.precision);
        cache.ensure_work(self, m)?;
        let capacity = cache.capacity;
        let layer_len = cache.rows * capacity * cache.kv_width;
        let (k_all, v_all) = (&mut cache.k, &mut cache.v);
        let work = cache
            .work
            .as_mut()
            .ok_or_else(|| ModelError::Kernel("decode buffers missing".into()))?;
        let be = &self.backend;
        upload_batch(be, &mut work.acts, &plan.tokens, &[])?;
        be.upload_ints(&plan.positions, &mut work.acts.pos)?;
        be.upload_ints(&plan.rows, &mut work.rows)?;
        be.upload_ints(&plan.kv_index, &mut work.kv_index)?;
        let w = self.weights(prec)?;
        let a = &mut *work.acts;
        let c = cfg.n_embd;
        let idx = B::islice(B::iview(&a.idx), 0..m);
        forward::embed(&w, idx, &mut a.x, &mut a.xn0, &mut a.rstd0, m)?;
        let shape = DecodeShape {
            h: cfg.n_head,
            hk: cfg.n_kv_head,
            d: cfg.head_dim(),
            capacity,
        };
        let pos = B::islice(B::iview(&a.pos), 0..m);
        let la = &mut a.layers[0];
        for l in 0..cfg.n_layer {
            let range = l * layer_len..(l + 1) * layer_len;
            let attn = Attn::Cached {
                shape,
                k_cache: B::slice_mut(B::view_mut(k_all), range.clone()),
                v_cache: B::slice_mut(B::view_mut(v_all), range),
                kv_index: B::islice(B::iview(&work.kv_index), 0..m),
                rows: B::islice(B::iview(&work.rows), 0..m),
            };
            forward::block(&w, l, &mut a.x, la, m, pos, attn, prec)?;
        }
        be.rmsnorm(
            B::slice(B::view(&a.x), 0..m * c),
            B::slice_mut(B::view_mut(&mut a.xf), 0..m * c),
            B::slice_mut(B::view_mut(&mut a.rstdf), 0..m),
            c,
        )?;
        let n_out = if last_only {
            forward::select_rows(&w, a, &plan.last)?;
            plan.last.len()
        } else {
            m
        };
        let mut out = vec![0.0; n_out * cfg.vocab_size];
        forward::head_eval(&w, a, n_out, Some(&mut out), prec)?;
        for &(row, ts) in batch {
            cache.lens[row] += ts.len();
        }
        Ok(out)
    }
}
