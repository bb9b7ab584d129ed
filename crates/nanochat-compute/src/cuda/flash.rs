//! FlashAttention-2's backward pass as two PTX kernels, bf16 tensor-core products with f32
//! accumulation, for the head dims of [`crate::ptx::FLASH_HEAD_DIMS`].
//!
//! Both recompute the probabilities from q, k and the forward's log-sum-exp, so no score
//! matrix is ever in memory. They split the work the deterministic way: `k_flash_bwd_kv_d{D}`
//! owns 64 keys per block and walks every query tile (of every query head sharing its KV head)
//! that sees them, accumulating dK and dV in registers; `k_flash_bwd_q_d{D}` owns 64 queries
//! per block and walks the key tiles, accumulating dQ. Atomics would save the second kernel's
//! recomputation (S and dP again) but make gradients differ run to run, and a resumed run
//! must reproduce the uninterrupted one bit for bit.
//!
//! Operand layouts (m16n8k16, A row-major, B "col"): a tensor read as an `mma` A operand or as
//! a B operand whose k runs along head dims sits in shared memory (or registers) as rows; a B
//! operand whose k runs along tokens is read from those same rows with `ldmatrix .trans`.
//! Rows are padded by 16 bytes: eight rows a warp reads at once then fall in distinct banks.

use std::fmt::Write;

use crate::ptx::{header, load_params, mma, Ty, LOG2E};

fn quad(f: impl Fn(usize) -> String) -> [String; 4] {
    [f(0), f(1), f(2), f(3)]
}

/// Register `{p}{4·tile + e}`: element `e` of accumulator tile `tile`.
fn acc(p: &str, tile: usize, e: usize) -> String {
    format!("%{p}{}", 4 * tile + e)
}

/// Words per padded shared row of `d` bf16 values.
fn row_words(d: usize) -> usize {
    d / 2 + 4
}

/// Thread constants both kernels share: lane, warp, group `g`, `tig`, and the tile loader's
/// `%dw` (word of a row, tx mod D/2) and `%lr` (first row, tx / (D/2)).
fn thread_ids(m: &mut String, d: usize) {
    let _ = writeln!(
        m,
        "    mov.u32 %tx, %tid.x;\n    and.b32 %lane, %tx, 31;\n    shr.u32 %warp, %tx, 5;\n    shr.u32 %g, %lane, 2;\n    and.b32 %tig, %lane, 3;\n    rem.u32 %dw, %tx, {};\n    div.u32 %lr, %tx, {};",
        d / 2,
        d / 2
    );
}

/// Loads rows `rowbase..rowbase+rows` of head `head` (of `heads`) of a `[B,T,heads,D]` f32
/// tensor into shared rows at `smem` (bf16, padded), zeros past `%t`. All 128 threads take
/// part: thread tx loads word tx mod D/2 of rows tx/(D/2) + j·(256/D).
#[allow(clippy::too_many_arguments)]
fn load_rows(
    m: &mut String,
    d: usize,
    rows: usize,
    x: &str,
    heads: &str,
    head: &str,
    rowbase: &str,
    smem: &str,
) {
    let step = 256 / d;
    let kw = row_words(d);
    let _ = writeln!(
        m,
        "    add.u32 %r30, {rowbase}, %lr;\n    mad.lo.u32 %r31, %b, %t, %r30;\n    mad.lo.u32 %r31, %r31, {heads}, {head};\n    mul.lo.u32 %r31, %r31, {d};\n    shl.b32 %r32, %dw, 1;\n    add.u32 %r31, %r31, %r32;\n    mul.wide.u32 %rd7, %r31, 4;\n    add.u64 %rd7, {x}, %rd7;\n    mul.lo.u32 %r32, {heads}, {};\n    cvt.u64.u32 %rd8, %r32;\n    mov.u32 %r33, {smem};\n    mad.lo.u32 %r34, %lr, {kw}, %dw;\n    mad.lo.u32 %r33, %r34, 4, %r33;",
        d * 4 * step
    );
    for j in 0..rows / step {
        let _ = writeln!(
            m,
            "    add.u32 %r35, %r30, {};\n    setp.lt.u32 %pk, %r35, %t;\n    mov.f32 %f1, 0f00000000;\n    mov.f32 %f2, 0f00000000;\n    @%pk ld.global.v2.f32 {{%f1, %f2}}, [%rd7];\n    cvt.rn.bf16x2.f32 %r36, %f2, %f1;\n    st.shared.b32 [%r33+{}], %r36;\n    add.u64 %rd7, %rd7, %rd8;",
            j * step,
            j * step * kw * 4
        );
    }
}

/// A-operand fragments of one warp's sixteen rows (`row0`, `row0 + 8`) of a `[B,T,heads,D]`
/// f32 tensor, straight from global memory into `%{reg}0..` (zeros past `%t`).
fn rows_to_fragments(m: &mut String, d: usize, x: &str, heads: &str, head: &str, reg: &str) {
    for (r, row) in ["%row0", "%row1"].iter().enumerate() {
        let _ = writeln!(
            m,
            "    mad.lo.u32 %r30, %b, %t, {row};\n    mad.lo.u32 %r30, %r30, {heads}, {head};\n    mul.wide.u32 %rd7, %r30, {};\n    add.u64 %rd7, {x}, %rd7;\n    mul.wide.u32 %rd8, %tig, 8;\n    add.u64 %rd{}, %rd7, %rd8;",
            d * 4,
            9 + r
        );
    }
    for ks in 0..d / 16 {
        for j in 0..4 {
            let (ptr, pred) = if j % 2 == 0 {
                ("%rd9", "%pv0")
            } else {
                ("%rd10", "%pv1")
            };
            let off = (ks * 16 + (j / 2) * 8) * 4;
            let _ = writeln!(
                m,
                "    mov.f32 %f1, 0f00000000;\n    mov.f32 %f2, 0f00000000;\n    @{pred} ld.global.v2.f32 {{%f1, %f2}}, [{ptr}+{off}];\n    cvt.rn.bf16x2.f32 %{reg}{}, %f2, %f1;",
                4 * ks + j
            );
        }
    }
}

/// Stores a warp's sixteen rows of `D/8` accumulator tiles `%{reg}`, times `%scale`, to a
/// `[B,T,heads,D]` f32 tensor (rows below `%t` only).
fn store_rows(m: &mut String, d: usize, x: &str, heads: &str, head: &str, reg: &str) {
    for (r, row) in ["%row0", "%row1"].iter().enumerate() {
        let _ = writeln!(
            m,
            "    mad.lo.u32 %r30, %b, %t, {row};\n    mad.lo.u32 %r30, %r30, {heads}, {head};\n    mul.wide.u32 %rd7, %r30, {};\n    add.u64 %rd7, {x}, %rd7;\n    mul.wide.u32 %rd8, %tig, 8;\n    add.u64 %rd{}, %rd7, %rd8;",
            d * 4,
            9 + r
        );
    }
    for nt in 0..d / 8 {
        for r in 0..2 {
            let _ = writeln!(
                m,
                "    mul.f32 %f1, {}, %scale;\n    mul.f32 %f2, {}, %scale;\n    @%pv{r} st.global.v2.f32 [%rd{}+{}], {{%f1, %f2}};",
                acc(reg, nt, 2 * r),
                acc(reg, nt, 2 * r + 1),
                9 + r,
                nt * 32
            );
        }
    }
}

/// `acc[nt] += A·B` over `tiles` n-tiles of 8 and `d/16` k-steps, A from `a(ks, j)`, B words
/// read from padded shared rows (n = row, k = head dim) at `%{base}`.
fn product_over_dims(
    m: &mut String,
    d: usize,
    tiles: usize,
    acc_reg: &str,
    a: &dyn Fn(usize, usize) -> String,
    base: &str,
) {
    let kw = row_words(d);
    for nt in 0..tiles {
        for e in 0..4 {
            let _ = writeln!(m, "    mov.f32 {}, 0f00000000;", acc(acc_reg, nt, e));
        }
    }
    for ks in 0..d / 16 {
        for nt in 0..tiles {
            let off = (nt * 8 * kw + ks * 8) * 4;
            let _ = writeln!(
                m,
                "    ld.shared.b32 %fb0, [{base}+{off}];\n    ld.shared.b32 %fb1, [{base}+{}];",
                off + 16
            );
            m.push_str(&mma(
                &quad(|e| acc(acc_reg, nt, e)),
                &quad(|j| a(ks, j)),
                ["%fb0", "%fb1"],
            ));
        }
    }
}

/// `acc += A·B` with k along tokens: A the bf16 pairs of accumulator tiles `%{src}` (k-step
/// ks = tiles 2ks, 2ks+1), B from padded shared rows (k = row, n = head dim) through
/// `ldmatrix .trans` at per-lane address `%{ldm}`.
fn product_over_tokens(
    m: &mut String,
    d: usize,
    ksteps: usize,
    src: &str,
    acc_reg: &str,
    ldm: &str,
) {
    let kw = row_words(d);
    for ks in 0..ksteps {
        let _ = writeln!(
            m,
            "    cvt.rn.bf16x2.f32 %pa0, {}, {};\n    cvt.rn.bf16x2.f32 %pa1, {}, {};\n    cvt.rn.bf16x2.f32 %pa2, {}, {};\n    cvt.rn.bf16x2.f32 %pa3, {}, {};",
            acc(src, 2 * ks, 1),
            acc(src, 2 * ks, 0),
            acc(src, 2 * ks, 3),
            acc(src, 2 * ks, 2),
            acc(src, 2 * ks + 1, 1),
            acc(src, 2 * ks + 1, 0),
            acc(src, 2 * ks + 1, 3),
            acc(src, 2 * ks + 1, 2)
        );
        for np in 0..d / 16 {
            let off = ks * 16 * kw * 4 + np * 32;
            let _ = writeln!(
                m,
                "    ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {{%fb0, %fb1, %fb2, %fb3}}, [{ldm}+{off}];"
            );
            let pa = quad(|j| format!("%pa{j}"));
            m.push_str(&mma(
                &quad(|e| acc(acc_reg, 2 * np, e)),
                &pa,
                ["%fb0", "%fb1"],
            ));
            m.push_str(&mma(
                &quad(|e| acc(acc_reg, 2 * np + 1, e)),
                &pa,
                ["%fb2", "%fb3"],
            ));
        }
    }
}

/// `%{ldm}` = shared base `arr` + row (lane mod 16) + 8 columns for lanes 16..31: the lane's
/// row address for `ldmatrix.x4.trans` over a 16-row, 16-column block.
fn ldmatrix_lane(m: &mut String, d: usize, arr: &str, ldm: &str) {
    let _ = writeln!(
        m,
        "    and.b32 %r37, %lane, 15;\n    shr.u32 %r38, %lane, 4;\n    mov.u32 {ldm}, {arr};\n    mad.lo.u32 {ldm}, %r37, {}, {ldm};\n    mad.lo.u32 {ldm}, %r38, 16, {ldm};",
        row_words(d) * 4
    );
}

const COMMON: &str = "    .reg .b32 %lane, %warp, %g, %tig, %dw, %lr, %b, %row0, %row1, %pa<4>, %fb<4>;\n    .reg .pred %pv0, %pv1, %pk;\n";

/// dK and dV of 64 keys per block (grid: x = key block, y = batch·KV head; 128 threads, warp
/// w owning keys 16w..16w+15 of the block). Per query tile of 32 (queries at or after the
/// block's first key, of each query head in the KV head's group): Sᵀ = K·Qᵀ, Pᵀ =
/// 2^(Sᵀ·scale·log2e − lse·log2e) masked to query ≥ key, dV += Pᵀ·dO, dPᵀ = V·dOᵀ, dSᵀ =
/// Pᵀ∘(dPᵀ − δ), dK += dSᵀ·Q; dK is scaled once at the end.
pub(crate) fn backward_kv(m: &mut String, d: usize) {
    let name = format!("k_flash_bwd_kv_d{d}");
    let params = [
        ("q", Ty::Ptr),
        ("k", Ty::Ptr),
        ("v", Ty::Ptr),
        ("dy", Ty::Ptr),
        ("lse", Ty::Ptr),
        ("drow", Ty::Ptr),
        ("dk", Ty::Ptr),
        ("dv", Ty::Ptr),
        ("t", Ty::U32),
        ("h", Ty::U32),
        ("hk", Ty::U32),
        ("sl2", Ty::F32),
        ("scale", Ty::F32),
    ];
    let on = d / 8;
    let kw = row_words(d);
    header(m, &name, &params);
    let _ = writeln!(
        m,
        "    .shared .align 16 .b32 vsm[{}];\n    .shared .align 16 .b32 qsm[{}];\n    .shared .align 16 .b32 osm[{}];\n    .shared .align 16 .f32 lsm[32];\n    .shared .align 16 .f32 dsm[32];",
        64 * kw,
        32 * kw,
        32 * kw
    );
    m.push_str(COMMON);
    let _ = writeln!(
        m,
        "    .reg .b32 %ka<{}>, %jb, %kvh, %grp, %hq, %hend, %qt, %qbase, %qread, %vread, %ldq, %ldo, %kb0;\n    .reg .f32 %sa<16>, %dpa<16>, %dka<{}>, %dva<{}>, %lq<8>, %dq<8>;",
        d / 4,
        4 * on,
        4 * on
    );
    thread_ids(m, d);
    load_params(m, &params);
    let _ = writeln!(
        m,
        "    mov.u32 %jb, %ctaid.x;\n    mov.u32 %r1, %ctaid.y;\n    div.u32 %b, %r1, %hk;\n    rem.u32 %kvh, %r1, %hk;\n    div.u32 %grp, %h, %hk;\n\
    shl.b32 %kb0, %jb, 6;\n    mad.lo.u32 %row0, %warp, 16, %kb0;\n    add.u32 %row0, %row0, %g;\n    add.u32 %row1, %row0, 8;\n    setp.lt.u32 %pv0, %row0, %t;\n    setp.lt.u32 %pv1, %row1, %t;"
    );
    // This warp's keys as A fragments; the block's V rows in shared memory.
    rows_to_fragments(m, d, "%k", "%hk", "%kvh", "ka");
    load_rows(m, d, 64, "%v", "%hk", "%kvh", "%kb0", "vsm");
    for i in 0..4 * on {
        let _ = writeln!(
            m,
            "    mov.f32 %dka{i}, 0f00000000;\n    mov.f32 %dva{i}, 0f00000000;"
        );
    }
    let _ = writeln!(
        m,
        "    mov.u32 %r2, qsm;\n    mad.lo.u32 %r3, %g, {kw}, %tig;\n    mad.lo.u32 %qread, %r3, 4, %r2;\n    mov.u32 %r2, osm;\n    mad.lo.u32 %r4, %r3, 4, %r2;\n\
    mov.u32 %r2, vsm;\n    mad.lo.u32 %r5, %warp, 16, %g;\n    mad.lo.u32 %r5, %r5, {kw}, %tig;\n    mad.lo.u32 %vread, %r5, 4, %r2;"
    );
    ldmatrix_lane(m, d, "qsm", "%ldq");
    ldmatrix_lane(m, d, "osm", "%ldo");
    // Query heads of this KV head: kvh·grp .. (kvh+1)·grp.
    m.push_str("    mul.lo.u32 %hq, %kvh, %grp;\n    add.u32 %hend, %hq, %grp;\nHEAD:\n    shr.u32 %qt, %kb0, 5;\nTILE:\n    shl.b32 %qbase, %qt, 5;\n    bar.sync 0;\n");
    load_rows(m, d, 32, "%q", "%h", "%hq", "%qbase", "qsm");
    load_rows(m, d, 32, "%dy", "%h", "%hq", "%qbase", "osm");
    // lse (log2 units; +inf past the end: P = 0 there) and δ of the tile's 32 queries.
    let _ = writeln!(
        m,
        "    setp.ge.u32 %pk, %tx, 32;\n    @%pk bra LOADED;\n    add.u32 %r6, %qbase, %tx;\n    mov.f32 %f3, 0f7F800000;\n    mov.f32 %f4, 0f00000000;\n    setp.lt.u32 %pk, %r6, %t;\n    mad.lo.u32 %r7, %b, %h, %hq;\n    mad.lo.u32 %r7, %r7, %t, %r6;\n    mul.wide.u32 %rd1, %r7, 4;\n    add.u64 %rd2, %lse, %rd1;\n    add.u64 %rd3, %drow, %rd1;\n    @%pk ld.global.f32 %f3, [%rd2];\n    @%pk mul.f32 %f3, %f3, {LOG2E};\n    @%pk ld.global.f32 %f4, [%rd3];\n    mov.u32 %r8, lsm;\n    mad.lo.u32 %r8, %tx, 4, %r8;\n    st.shared.f32 [%r8], %f3;\n    mov.u32 %r8, dsm;\n    mad.lo.u32 %r8, %tx, 4, %r8;\n    st.shared.f32 [%r8], %f4;\nLOADED:\n    bar.sync 0;"
    );
    // The lse and δ this thread's columns need: queries nt·8 + 2tig (+1), nt = 0..3.
    let _ = writeln!(
        m,
        "    mov.u32 %r9, lsm;\n    mad.lo.u32 %r9, %tig, 8, %r9;\n    mov.u32 %r10, dsm;\n    mad.lo.u32 %r10, %tig, 8, %r10;"
    );
    for nt in 0..4 {
        let _ = writeln!(
            m,
            "    ld.shared.v2.f32 {{%lq{}, %lq{}}}, [%r9+{}];\n    ld.shared.v2.f32 {{%dq{}, %dq{}}}, [%r10+{}];",
            2 * nt,
            2 * nt + 1,
            nt * 32,
            2 * nt,
            2 * nt + 1,
            nt * 32
        );
    }
    // Sᵀ = K·Qᵀ (16 keys × 32 queries).
    product_over_dims(
        m,
        d,
        4,
        "sa",
        &|ks, j| format!("%ka{}", 4 * ks + j),
        "%qread",
    );
    // Pᵀ, masked to query ≥ key.
    m.push_str("    shl.b32 %r11, %tig, 1;\n    add.u32 %r11, %r11, %qbase;\n");
    for nt in 0..4 {
        for e in 0..4 {
            let key = if e < 2 { "%row0" } else { "%row1" };
            let _ = writeln!(
                m,
                "    mul.f32 {0}, {0}, %sl2;\n    sub.f32 {0}, {0}, %lq{1};\n    ex2.approx.ftz.f32 {0}, {0};\n    add.u32 %r12, %r11, {2};\n    setp.lt.u32 %pk, %r12, {key};\n    @%pk mov.f32 {0}, 0f00000000;",
                acc("sa", nt, e),
                2 * nt + (e & 1),
                nt * 8 + (e & 1)
            );
        }
    }
    // dV += Pᵀ·dO (k = the tile's 32 queries).
    product_over_tokens(m, d, 2, "sa", "dva", "%ldo");
    // dPᵀ = V·dOᵀ, V's A fragments from shared rows.
    for nt in 0..4 {
        for e in 0..4 {
            let _ = writeln!(m, "    mov.f32 {}, 0f00000000;", acc("dpa", nt, e));
        }
    }
    for ks in 0..d / 16 {
        for j in 0..4 {
            let off = (j & 1) * 8 * kw * 4 + (ks * 8 + (j >> 1) * 4) * 4;
            let _ = writeln!(m, "    ld.shared.b32 %fb{j}, [%vread+{off}];");
        }
        for nt in 0..4 {
            let off = (nt * 8 * kw + ks * 8) * 4;
            let _ = writeln!(
                m,
                "    ld.shared.b32 %pa0, [%r4+{off}];\n    ld.shared.b32 %pa1, [%r4+{}];",
                off + 16
            );
            m.push_str(&mma(
                &quad(|e| acc("dpa", nt, e)),
                &quad(|j| format!("%fb{j}")),
                ["%pa0", "%pa1"],
            ));
        }
    }
    // dSᵀ = Pᵀ∘(dPᵀ − δ), over Pᵀ.
    for nt in 0..4 {
        for e in 0..4 {
            let _ = writeln!(
                m,
                "    sub.f32 %f5, {1}, %dq{2};\n    mul.f32 {0}, {0}, %f5;",
                acc("sa", nt, e),
                acc("dpa", nt, e),
                2 * nt + (e & 1)
            );
        }
    }
    // dK += dSᵀ·Q.
    product_over_tokens(m, d, 2, "sa", "dka", "%ldq");
    m.push_str("    add.u32 %qt, %qt, 1;\n    shl.b32 %r13, %qt, 5;\n    setp.lt.u32 %pk, %r13, %t;\n    @%pk bra TILE;\n    add.u32 %hq, %hq, 1;\n    setp.lt.u32 %pk, %hq, %hend;\n    @%pk bra HEAD;\n");
    store_rows(m, d, "%dk", "%hk", "%kvh", "dka");
    m.push_str("    mov.f32 %scale, 0f3F800000;\n");
    store_rows(m, d, "%dv", "%hk", "%kvh", "dva");
    m.push_str("DONE:\n    ret;\n}\n\n");
}

/// dQ of 64 queries per block (grid: x = query block, heaviest first; y = batch·head; warp w
/// owning queries 16w..16w+15). Per key tile of 64 through the diagonal: S = Q·Kᵀ, P =
/// 2^(S·scale·log2e − lse·log2e) masked to key ≤ query, dP = dO·Vᵀ, dS = P∘(dP − δ),
/// dQ += dS·K; dQ is scaled once at the end.
pub(crate) fn backward_q(m: &mut String, d: usize) {
    let name = format!("k_flash_bwd_q_d{d}");
    let params = [
        ("q", Ty::Ptr),
        ("k", Ty::Ptr),
        ("v", Ty::Ptr),
        ("dy", Ty::Ptr),
        ("lse", Ty::Ptr),
        ("drow", Ty::Ptr),
        ("dq", Ty::Ptr),
        ("t", Ty::U32),
        ("h", Ty::U32),
        ("hk", Ty::U32),
        ("sl2", Ty::F32),
        ("scale", Ty::F32),
    ];
    let on = d / 8;
    let kw = row_words(d);
    header(m, &name, &params);
    let _ = writeln!(
        m,
        "    .shared .align 16 .b32 ksm[{}];\n    .shared .align 16 .b32 vsm[{}];",
        64 * kw,
        64 * kw
    );
    m.push_str(COMMON);
    let _ = writeln!(
        m,
        "    .reg .b32 %qa<{}>, %oa<{}>, %qb, %hh, %kvh, %kt, %kbase, %kread, %vread, %ldk;\n    .reg .f32 %sa<32>, %dpa<32>, %dqa<{}>, %ls<2>, %dl<2>;",
        d / 4,
        d / 4,
        4 * on
    );
    thread_ids(m, d);
    load_params(m, &params);
    let _ = writeln!(
        m,
        "    mov.u32 %r1, %nctaid.x;\n    mov.u32 %r2, %ctaid.x;\n    sub.u32 %qb, %r1, %r2;\n    sub.u32 %qb, %qb, 1;\n\
    mov.u32 %r3, %ctaid.y;\n    div.u32 %b, %r3, %h;\n    rem.u32 %hh, %r3, %h;\n    div.u32 %r4, %h, %hk;\n    div.u32 %kvh, %hh, %r4;\n\
    shl.b32 %r5, %qb, 6;\n    mad.lo.u32 %row0, %warp, 16, %r5;\n    add.u32 %row0, %row0, %g;\n    add.u32 %row1, %row0, 8;\n    setp.lt.u32 %pv0, %row0, %t;\n    setp.lt.u32 %pv1, %row1, %t;"
    );
    rows_to_fragments(m, d, "%q", "%h", "%hh", "qa");
    rows_to_fragments(m, d, "%dy", "%h", "%hh", "oa");
    // lse (log2 units, +inf past the end) and δ of this thread's two rows.
    for r in 0..2 {
        let _ = writeln!(
            m,
            "    mov.f32 %ls{r}, 0f7F800000;\n    mov.f32 %dl{r}, 0f00000000;\n    mad.lo.u32 %r6, %r3, %t, %row{r};\n    mul.wide.u32 %rd1, %r6, 4;\n    add.u64 %rd2, %lse, %rd1;\n    add.u64 %rd3, %drow, %rd1;\n    @%pv{r} ld.global.f32 %ls{r}, [%rd2];\n    @%pv{r} mul.f32 %ls{r}, %ls{r}, {LOG2E};\n    @%pv{r} ld.global.f32 %dl{r}, [%rd3];"
        );
    }
    for i in 0..4 * on {
        let _ = writeln!(m, "    mov.f32 %dqa{i}, 0f00000000;");
    }
    let _ = writeln!(
        m,
        "    mad.lo.u32 %r7, %g, {kw}, %tig;\n    mov.u32 %r8, ksm;\n    mad.lo.u32 %kread, %r7, 4, %r8;\n    mov.u32 %r8, vsm;\n    mad.lo.u32 %vread, %r7, 4, %r8;\n    mov.u32 %kt, 0;"
    );
    ldmatrix_lane(m, d, "ksm", "%ldk");
    m.push_str("TILE:\n    shl.b32 %kbase, %kt, 6;\n    bar.sync 0;\n");
    load_rows(m, d, 64, "%k", "%hk", "%kvh", "%kbase", "ksm");
    load_rows(m, d, 64, "%v", "%hk", "%kvh", "%kbase", "vsm");
    m.push_str("    bar.sync 0;\n");
    // S = Q·Kᵀ (16 queries × 64 keys), then P masked to key ≤ query.
    product_over_dims(
        m,
        d,
        8,
        "sa",
        &|ks, j| format!("%qa{}", 4 * ks + j),
        "%kread",
    );
    m.push_str("    shl.b32 %r9, %tig, 1;\n    add.u32 %r9, %r9, %kbase;\n");
    for nt in 0..8 {
        for e in 0..4 {
            let r = e / 2;
            let _ = writeln!(
                m,
                "    mul.f32 {0}, {0}, %sl2;\n    sub.f32 {0}, {0}, %ls{r};\n    ex2.approx.ftz.f32 {0}, {0};\n    add.u32 %r10, %r9, {1};\n    setp.gt.u32 %pk, %r10, %row{r};\n    @%pk mov.f32 {0}, 0f00000000;",
                acc("sa", nt, e),
                nt * 8 + (e & 1)
            );
        }
    }
    // dP = dO·Vᵀ, then dS = P∘(dP − δ) over P.
    product_over_dims(
        m,
        d,
        8,
        "dpa",
        &|ks, j| format!("%oa{}", 4 * ks + j),
        "%vread",
    );
    for nt in 0..8 {
        for e in 0..4 {
            let _ = writeln!(
                m,
                "    sub.f32 %f5, {1}, %dl{2};\n    mul.f32 {0}, {0}, %f5;",
                acc("sa", nt, e),
                acc("dpa", nt, e),
                e / 2
            );
        }
    }
    // dQ += dS·K (k = the tile's 64 keys).
    product_over_tokens(m, d, 4, "sa", "dqa", "%ldk");
    m.push_str("    add.u32 %kt, %kt, 1;\n    setp.le.u32 %pk, %kt, %qb;\n    @%pk bra TILE;\n");
    store_rows(m, d, "%dq", "%h", "%hh", "dqa");
    m.push_str("DONE:\n    ret;\n}\n\n");
}
