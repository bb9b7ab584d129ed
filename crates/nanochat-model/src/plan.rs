//! The table of activation buffers: one builder that both allocates them on a backend and counts
//! them for the memory estimate, so the two cannot disagree.

use crate::config::GptConfig;
use crate::error::Result;
use nanochat_compute::DeviceKind;

/// Rows of the logits matrix materialised at once in the fused lm_head + loss: bounds the
/// logits memory whatever the batch (PyTorch holds all of them, several times over). Every
/// chunk streams the whole lm_head weight for `dX` and re-reads and re-writes its whole
/// gradient for `dW`, so fewer, larger chunks are faster while they fit.
/// - CPU with gradients, ~128 MB: 1024 rows instead of 256 at vocab 32768 made the d8 bf16
///   step 5–9% faster. Forward-only (evaluation), ~32 MB: no weight gradient to amortize, and
///   fresh pages cost page faults.
/// - GPU, ~1 GB (4096 rows at vocab 65536): at 512 rows the d12 step spent 24 ms re-reading and
///   re-writing the f32 lm_head gradient (128 chunks, each a full pass over it at HBM speed).
pub(crate) fn logit_chunk_rows(
    padded_vocab: usize,
    rows: usize,
    with_grad: bool,
    device: DeviceKind,
) -> usize {
    let (budget, max_rows) = match (device, with_grad) {
        (DeviceKind::Cpu, true) => (32 << 20, 1024),
        (DeviceKind::Cpu, false) => (8 << 20, 1024),
        (DeviceKind::Cuda, true) => (256 << 20, 8192),
        (DeviceKind::Cuda, false) => (64 << 20, 8192),
    };
    (budget / padded_vocab).clamp(64, max_rows).min(rows).max(1)
}

/// Saved activations of one transformer block (training), or the reused buffers of the block
/// being run (decoding).
pub(crate) struct LayerActs<T> {
    pub(crate) xn1: T,
    pub(crate) rstd1: T,
    pub(crate) q: T,
    pub(crate) k: T,
    pub(crate) v: T,
    pub(crate) rstd_q: T,
    pub(crate) rstd_k: T,
    pub(crate) yatt: T,
    /// Log-sum-exp of each query's scores `[B, H, T]` (training only; empty when decoding).
    pub(crate) lse: T,
    pub(crate) xn2: T,
    pub(crate) rstd2: T,
    pub(crate) hpre: T,
    pub(crate) act: T,
}

/// Gradient scratch of the backward pass.
pub(crate) struct GradActs<T> {
    pub(crate) dx: T,
    pub(crate) dxn: T,
    pub(crate) dya: T,
    pub(crate) dq: T,
    pub(crate) dk: T,
    pub(crate) dv: T,
    pub(crate) dh: T,
}

/// Every buffer of one `(b, t)` forward (and, with gradients, backward) pass. `T` is a float
/// buffer, `I` an int buffer; the memory estimate builds it with lengths instead.
pub(crate) struct Activations<T, I> {
    pub(crate) b: usize,
    pub(crate) t: usize,
    pub(crate) with_grad: bool,
    /// Residual stream `[n, c]`.
    pub(crate) x: T,
    pub(crate) xn0: T,
    pub(crate) rstd0: T,
    pub(crate) layers: Vec<LayerActs<T>>,
    pub(crate) xf: T,
    pub(crate) rstdf: T,
    /// Rows of `logits` per chunk of the fused lm_head + loss.
    pub(crate) logit_rows: usize,
    pub(crate) logits: T,
    /// Per-row losses `[n]`, summed once per pass.
    pub(crate) losses: T,
    /// Token ids, targets (-1 ignored) and positions, `[n]` each.
    pub(crate) idx: I,
    pub(crate) targets: I,
    pub(crate) pos: I,
    pub(crate) grad: Option<GradActs<T>>,
}

/// Which buffers a pass needs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct PassShape {
    pub(crate) b: usize,
    pub(crate) t: usize,
    /// Blocks whose activations are kept (every layer for training and full forwards; one,
    /// reused, for decoding).
    pub(crate) layers: usize,
    pub(crate) with_grad: bool,
    /// Whether the attention saves its log-sum-exp (full-sequence attention).
    pub(crate) causal: bool,
    /// The backend's kind (the logits chunk is sized per device).
    pub(crate) device: DeviceKind,
}

impl<T, I> Activations<T, I> {
    /// Builds every buffer through `f` (floats) and `g` (ints), each called with a name and a
    /// length.
    pub(crate) fn build(
        cfg: &GptConfig,
        s: PassShape,
        mut f: impl FnMut(&str, usize) -> Result<T>,
        mut g: impl FnMut(&str, usize) -> Result<I>,
    ) -> Result<Self> {
        let (n, c) = (s.b * s.t, cfg.n_embd);
        let kd = cfg.n_kv_head * cfg.head_dim();
        let ff = 4 * c;
        let vp = cfg.padded_vocab_size();
        let logit_rows = logit_chunk_rows(vp, n, s.with_grad, s.device);
        let mut layers = Vec::with_capacity(s.layers);
        for _ in 0..s.layers {
            layers.push(LayerActs {
                xn1: f("activations", n * c)?,
                rstd1: f("activations", n)?,
                q: f("activations", n * c)?,
                k: f("activations", n * kd)?,
                v: f("activations", n * kd)?,
                rstd_q: f("activations", n * cfg.n_head)?,
                rstd_k: f("activations", n * cfg.n_kv_head)?,
                yatt: f("activations", n * c)?,
                lse: f("activations", if s.causal { n * cfg.n_head } else { 0 })?,
                xn2: f("activations", n * c)?,
                rstd2: f("activations", n)?,
                hpre: f("activations", n * ff)?,
                act: f("activations", n * ff)?,
            });
        }
        let grad = if s.with_grad {
            Some(GradActs {
                dx: f("gradient scratch", n * c)?,
                dxn: f("gradient scratch", n * c)?,
                dya: f("gradient scratch", n * c)?,
                dq: f("gradient scratch", n * c)?,
                dk: f("gradient scratch", n * kd)?,
                dv: f("gradient scratch", n * kd)?,
                dh: f("gradient scratch", n * ff)?,
            })
        } else {
            None
        };
        Ok(Activations {
            b: s.b,
            t: s.t,
            with_grad: s.with_grad,
            x: f("activations", n * c)?,
            xn0: f("activations", n * c)?,
            rstd0: f("activations", n)?,
            layers,
            xf: f("activations", n * c)?,
            rstdf: f("activations", n)?,
            logit_rows,
            logits: f("logits", logit_rows * vp)?,
            losses: f("losses", n)?,
            idx: g("token ids", n)?,
            targets: g("targets", n)?,
            pos: g("positions", n)?,
            grad,
        })
    }

    pub(crate) fn fits(&self, b: usize, t: usize, with_grad: bool) -> bool {
        self.b == b && self.t == t && (self.with_grad || !with_grad)
    }
}

/// Bytes of every buffer of a pass: the same table [`Activations::build`] allocates.
pub(crate) fn activation_bytes(cfg: &GptConfig, s: PassShape) -> u64 {
    let mut total = 0u64;
    let counted = Activations::<(), ()>::build(
        cfg,
        s,
        |_, len| {
            total += 4 * len as u64;
            Ok(())
        },
        |_, _| Ok(()),
    );
    let ints = 3 * 4 * (s.b * s.t) as u64;
    debug_assert!(counted.is_ok());
    total + ints
}
