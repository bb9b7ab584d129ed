//! Parameter names, shapes and optimizer groups, in the reference's state_dict order.

use crate::config::GptConfig;

/// Which optimizer group a parameter belongs to (the reference: AdamW for the embedding and the
/// lm_head with their own learning rates, Muon for every block matrix).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ParamGroup {
    /// `transformer.wte.weight`.
    Embedding,
    /// `lm_head.weight`.
    LmHead,
    /// Every 2-D matrix inside the transformer blocks.
    Matrix,
}

/// Name, PyTorch `[out, in]` shape and group of one parameter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParamSpec {
    /// The reference's state_dict key.
    pub name: String,
    /// `[rows, cols]` = `[out_features, in_features]` (embedding: `[padded_vocab, n_embd]`).
    pub shape: [usize; 2],
    /// Optimizer group.
    pub group: ParamGroup,
}

/// Parameters per block, in order.
pub(crate) const PER_LAYER: usize = 6;
pub(crate) const Q: usize = 0;
pub(crate) const K: usize = 1;
pub(crate) const V: usize = 2;
pub(crate) const PROJ: usize = 3;
pub(crate) const FC: usize = 4;
pub(crate) const MLP_PROJ: usize = 5;
pub(crate) const WTE: usize = 0;

pub(crate) fn layer_param(layer: usize, slot: usize) -> usize {
    1 + layer * PER_LAYER + slot
}
pub(crate) fn lm_head_index(cfg: &GptConfig) -> usize {
    1 + cfg.n_layer * PER_LAYER
}

/// All parameters of a config, in a fixed order: wte, then per block c_q, c_k, c_v, c_proj,
/// c_fc, mlp.c_proj, then lm_head.
pub fn param_specs(cfg: &GptConfig) -> Vec<ParamSpec> {
    let c = cfg.n_embd;
    let kv = cfg.n_kv_head * cfg.head_dim();
    let vp = cfg.padded_vocab_size();
    let mut specs = vec![ParamSpec {
        name: "transformer.wte.weight".into(),
        shape: [vp, c],
        group: ParamGroup::Embedding,
    }];
    for i in 0..cfg.n_layer {
        let m = |suffix: &str, shape: [usize; 2]| ParamSpec {
            name: format!("transformer.h.{i}.{suffix}"),
            shape,
            group: ParamGroup::Matrix,
        };
        specs.push(m("attn.c_q.weight", [c, c]));
        specs.push(m("attn.c_k.weight", [kv, c]));
        specs.push(m("attn.c_v.weight", [kv, c]));
        specs.push(m("attn.c_proj.weight", [c, c]));
        specs.push(m("mlp.c_fc.weight", [4 * c, c]));
        specs.push(m("mlp.c_proj.weight", [c, 4 * c]));
    }
    specs.push(ParamSpec {
        name: "lm_head.weight".into(),
        shape: [vp, c],
        group: ParamGroup::LmHead,
    });
    specs
}

/// Elements each parameter's offset in the flat buffers is rounded up to (256 bytes: a GPU's
/// preferred alignment for kernel operands and wgpu's default storage-buffer offset alignment).
pub const PARAM_ALIGN: usize = 64;

/// Where every parameter sits in the flat parameter (and gradient) buffer, in [`param_specs`]
/// order, and the buffer's total length. Gaps between parameters stay zero.
pub fn param_layout(specs: &[ParamSpec]) -> (Vec<nanochat_compute::WeightSlot>, usize) {
    let mut offset = 0;
    let slots = specs
        .iter()
        .map(|s| {
            let slot = nanochat_compute::WeightSlot {
                offset,
                out: s.shape[0],
                inp: s.shape[1],
                matmul: s.group != ParamGroup::Embedding,
            };
            offset += (s.shape[0] * s.shape[1]).div_ceil(PARAM_ALIGN) * PARAM_ALIGN;
            slot
        })
        .collect();
    (slots, offset)
}
