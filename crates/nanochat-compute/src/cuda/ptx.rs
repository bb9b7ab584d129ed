//! The CUDA backend's kernels, written as PTX text by Rust (no nvcc, no C++ at build time).
//!
//! One module holds every kernel; the driver JIT-compiles it for the GPU it runs on (the target
//! is `sm_80`, the first with bf16 conversions; newer GPUs compile it forward). Kernels come in
//! three shapes:
//! - element-wise: one thread per element, `n` elements, parameters `(pointers…, n, scalars…)`;
//!   each pointer `p` also gets `%a_p = p + 4·gid` precomputed;
//! - row kernels: one 256-thread block per row, with block-wide tree reductions in shared
//!   memory (fixed order: results are deterministic run to run);
//! - a few specials (KV-cached attention, sorted scatter-add).
//!
//! Arithmetic is written with explicit `.rn` rounding so ptxas does not contract `a·b + c` into
//! an FMA where the CPU backend rounds twice: the element-wise optimizer and Muon ops then give
//! the CPU's results bit for bit. Transcendentals use the hardware approximations (`ex2`,
//! `lg2`, relative error about 2⁻²²), well inside the bf16 tolerance training runs at.

use std::fmt::Write;

/// Threads per block of the row kernels (the tree reductions assume it).
pub const ROW_THREADS: u32 = 256;
/// Threads per block of the KV-cached attention kernel.
pub const DECODE_THREADS: u32 = 128;
/// Threads per block of the element-wise kernels.
pub const ELEMENTWISE_THREADS: u32 = 256;

/// `log2(e)` as a PTX float literal.
pub(crate) const LOG2E: &str = "0f3FB8AA3B";
/// `ln(2)`.
const LN2: &str = "0f3F317218";
/// `f32::EPSILON`, `F.rms_norm`'s default epsilon.
const RMS_EPS: &str = "0f34000000";

#[derive(Clone, Copy)]
pub(crate) enum Ty {
    Ptr,
    U32,
    F32,
}

fn ty_decl(t: Ty) -> &'static str {
    match t {
        Ty::Ptr => ".u64",
        Ty::U32 => ".u32",
        Ty::F32 => ".f32",
    }
}

/// Registers every kernel may use: numbered scratch of each type, plus the bf16 rounding
/// temporaries [`round`] uses.
const COMMON_REGS: &str = "    .reg .pred %p<16>;
    .reg .b16 %hb;
    .reg .b32 %r<48>;
    .reg .b32 %rb;
    .reg .b64 %rd<32>;
    .reg .f32 %f<48>;
    .reg .f64 %fd<16>;
    .reg .b32 %tx, %gid;
";

pub(crate) fn header(out: &mut String, name: &str, params: &[(&str, Ty)]) {
    let list: Vec<String> = params
        .iter()
        .map(|(p, t)| format!("    .param {} {p}", ty_decl(*t)))
        .collect();
    let _ = writeln!(out, ".visible .entry {name}(\n{}\n)\n{{", list.join(",\n"));
    out.push_str(COMMON_REGS);
}

/// Loads every parameter into a register of the same name (pointers as global addresses).
pub(crate) fn load_params(out: &mut String, params: &[(&str, Ty)]) {
    for (p, t) in params {
        match t {
            Ty::Ptr => {
                let _ = writeln!(out, "    .reg .b64 %{p};\n    ld.param.u64 %{p}, [{p}];\n    cvta.to.global.u64 %{p}, %{p};");
            }
            Ty::U32 => {
                let _ = writeln!(out, "    .reg .b32 %{p};\n    ld.param.u32 %{p}, [{p}];");
            }
            Ty::F32 => {
                let _ = writeln!(out, "    .reg .f32 %{p};\n    ld.param.f32 %{p}, [{p}];");
            }
        }
    }
}

/// Rounds f32 register `v` to the nearest bf16 (ties to even), keeping it in f32; under
/// predicate `pred` when given.
fn round(v: &str, pred: Option<&str>) -> String {
    let g = pred.map(|p| format!("@{p} ")).unwrap_or_default();
    format!(
        "    {g}cvt.rn.bf16.f32 %hb, {v};\n    {g}cvt.u32.u16 %rb, %hb;\n    {g}shl.b32 %rb, %rb, 16;\n    {g}mov.b32 {v}, %rb;\n"
    )
}

/// `dst = e^src` (f32 registers; `dst` may equal `src`).
fn exp(dst: &str, src: &str) -> String {
    format!("    mul.f32 {dst}, {src}, {LOG2E};\n    ex2.approx.ftz.f32 {dst}, {dst};\n")
}

/// `dst = ln(src)`.
fn ln(dst: &str, src: &str) -> String {
    format!("    lg2.approx.ftz.f32 {dst}, {src};\n    mul.f32 {dst}, {dst}, {LN2};\n")
}

/// An element-wise kernel: `gid < n` threads, each with `%a_<ptr>` = its element's address.
fn elementwise(out: &mut String, name: &str, ptrs: &[&str], scalars: &[(&str, Ty)], body: &str) {
    let mut params: Vec<(&str, Ty)> = ptrs.iter().map(|p| (*p, Ty::Ptr)).collect();
    params.push(("n", Ty::U32));
    params.extend_from_slice(scalars);
    header(out, name, &params);
    out.push_str(
        "    mov.u32 %r0, %ctaid.x;\n    mov.u32 %r1, %ntid.x;\n    mov.u32 %tx, %tid.x;\n    mad.lo.u32 %gid, %r0, %r1, %tx;\n",
    );
    load_params(out, &params);
    out.push_str("    setp.ge.u32 %p0, %gid, %n;\n    @%p0 bra DONE;\n");
    out.push_str("    .reg .b64 %off, %off2;\n    mul.wide.u32 %off, %gid, 4;\n    mul.wide.u32 %off2, %gid, 2;\n");
    for p in ptrs {
        let _ = writeln!(
            out,
            "    .reg .b64 %a_{p};\n    add.u64 %a_{p}, %{p}, %off;"
        );
    }
    out.push_str(body);
    out.push_str("DONE:\n    ret;\n}\n\n");
}

/// `dst = base + 4·idx` for a u32 element index register.
fn addr(dst: &str, base: &str, idx: &str) -> String {
    format!("    mul.wide.u32 {dst}, {idx}, 4;\n    add.u64 {dst}, {base}, {dst};\n")
}

/// A block-wide reduction of f32 (or f64) register `v` over `threads` threads with `op`
/// (`add`/`max`), in shared array `red`; every thread ends with the result in `v`. Uses
/// `%r40..%r42`, `%p15`, `%f46..47` / `%fd14..15`.
fn tree_reduce(v: &str, ty: &str, op: &str, threads: u32) -> String {
    let (size, a, b) = if ty == "f64" {
        (8, "%fd14", "%fd15")
    } else {
        (4, "%f46", "%f47")
    };
    let opi = match (op, ty) {
        ("add", _) => format!("add.rn.{ty}"),
        _ => format!("max.{ty}"),
    };
    let mut s = String::new();
    let _ = writeln!(
        s,
        "    mov.u32 %r40, red;\n    mad.lo.u32 %r41, %tx, {size}, %r40;"
    );
    let _ = writeln!(s, "    st.shared.{ty} [%r41], {v};\n    bar.sync 0;");
    let mut step = threads / 2;
    while step >= 1 {
        let _ = writeln!(
            s,
            "    setp.lt.u32 %p15, %tx, {step};\n    @%p15 ld.shared.{ty} {a}, [%r41];\n    @%p15 ld.shared.{ty} {b}, [%r41+{}];\n    @%p15 {opi} {a}, {a}, {b};\n    @%p15 st.shared.{ty} [%r41], {a};\n    bar.sync 0;",
            step * size
        );
        step /= 2;
    }
    let _ = writeln!(s, "    ld.shared.{ty} {v}, [%r40];\n    bar.sync 0;");
    s
}

/// A row kernel: one block per row (`ctaid.x`), `%tx` set, shared `red` for reductions.
fn row_kernel(out: &mut String, name: &str, params: &[(&str, Ty)], body: &str) {
    header(out, name, params);
    out.push_str("    .shared .align 8 .b8 red[2048];\n    mov.u32 %tx, %tid.x;\n");
    load_params(out, params);
    out.push_str(body);
    out.push_str("DONE:\n    ret;\n}\n\n");
}

/// The whole module's PTX source.
pub fn module_source() -> String {
    let mut m = String::from(
        "//\n// nanochat-rs CUDA kernels (generated by nanochat-compute/src/cuda/ptx.rs)\n//\n.version 7.8\n.target sm_80\n.address_size 64\n\n",
    );
    elementwise_kernels(&mut m);
    layout_kernels(&mut m);
    row_kernels(&mut m);
    reduction_kernels(&mut m);
    attention_kernels(&mut m);
    m
}

fn elementwise_kernels(m: &mut String) {
    elementwise(
        m,
        "k_fill",
        &["x"],
        &[("value", Ty::F32)],
        "    st.global.f32 [%a_x], %value;\n",
    );
    elementwise(
        m,
        "k_scale",
        &["x"],
        &[("s", Ty::F32)],
        "    ld.global.f32 %f1, [%a_x];\n    mul.rn.f32 %f1, %f1, %s;\n    st.global.f32 [%a_x], %f1;\n",
    );
    elementwise(
        m,
        "k_relu2",
        &["x", "y"],
        &[],
        "    ld.global.f32 %f1, [%a_x];\n    max.f32 %f1, %f1, 0f00000000;\n    mul.rn.f32 %f1, %f1, %f1;\n    st.global.f32 [%a_y], %f1;\n",
    );
    elementwise(
        m,
        "k_relu2_bwd",
        &["g", "x"],
        &[],
        "    ld.global.f32 %f1, [%a_g];\n    ld.global.f32 %f2, [%a_x];\n    max.f32 %f2, %f2, 0f00000000;\n    add.rn.f32 %f2, %f2, %f2;\n    mul.rn.f32 %f1, %f1, %f2;\n    st.global.f32 [%a_g], %f1;\n",
    );
    elementwise(
        m,
        "k_round_bf16",
        &["x"],
        &[],
        &format!(
            "    ld.global.f32 %f1, [%a_x];\n{}    st.global.f32 [%a_x], %f1;\n",
            round("%f1", None)
        ),
    );
    elementwise(
        m,
        "k_scale_copy",
        &["src", "dst"],
        &[("s", Ty::F32), ("rnd", Ty::U32)],
        &format!(
            "    setp.ne.u32 %p1, %rnd, 0;\n    ld.global.f32 %f1, [%a_src];\n    mul.rn.f32 %f1, %s, %f1;\n{}    st.global.f32 [%a_dst], %f1;\n",
            round("%f1", Some("%p1"))
        ),
    );
    // dst = rnd(rnd(beta·src) + rnd(alpha·dst))
    elementwise(
        m,
        "k_axpby",
        &["dst", "src"],
        &[("alpha", Ty::F32), ("beta", Ty::F32), ("rnd", Ty::U32)],
        &format!(
            "    setp.ne.u32 %p1, %rnd, 0;\n    ld.global.f32 %f1, [%a_dst];\n    ld.global.f32 %f2, [%a_src];\n    mul.rn.f32 %f3, %beta, %f2;\n    mul.rn.f32 %f4, %alpha, %f1;\n{}{}    add.rn.f32 %f5, %f3, %f4;\n{}    st.global.f32 [%a_dst], %f5;\n",
            round("%f3", Some("%p1")),
            round("%f4", Some("%p1")),
            round("%f5", Some("%p1"))
        ),
    );
    // buf ← buf + (1−μ)(g − buf); u = rnd(nesterov ? g + μ(buf − g) : buf)
    elementwise(
        m,
        "k_muon_momentum",
        &["buf", "g", "u"],
        &[("mu", Ty::F32), ("nesterov", Ty::U32), ("rnd", Ty::U32)],
        &format!(
            "    setp.ne.u32 %p1, %rnd, 0;\n    setp.ne.u32 %p2, %nesterov, 0;\n    ld.global.f32 %f1, [%a_buf];\n    ld.global.f32 %f2, [%a_g];\n    sub.rn.f32 %f3, 0f3F800000, %mu;\n    sub.rn.f32 %f4, %f2, %f1;\n    mul.rn.f32 %f4, %f3, %f4;\n    add.rn.f32 %f5, %f1, %f4;\n    st.global.f32 [%a_buf], %f5;\n    sub.rn.f32 %f6, %f5, %f2;\n    mul.rn.f32 %f6, %mu, %f6;\n    add.rn.f32 %f6, %f2, %f6;\n    selp.f32 %f7, %f6, %f5, %p2;\n{}    st.global.f32 [%a_u], %f7;\n",
            round("%f7", Some("%p1"))
        ),
    );
    // torch's AdamW (see AdamWStep): lerp first moment, then the bias-corrected update.
    elementwise(
        m,
        "k_adamw",
        &["pw", "g", "m", "v"],
        &[
            ("beta1", Ty::F32),
            ("beta2", Ty::F32),
            ("eps", Ty::F32),
            ("step", Ty::F32),
            ("ibc", Ty::F32),
            ("decay", Ty::F32),
        ],
        "    ld.global.f32 %f1, [%a_g];\n    ld.global.f32 %f2, [%a_m];\n    ld.global.f32 %f3, [%a_v];\n    ld.global.f32 %f4, [%a_pw];\n\
    sub.rn.f32 %f5, 0f3F800000, %beta1;\n    sub.rn.f32 %f6, %f1, %f2;\n    mul.rn.f32 %f6, %f5, %f6;\n    add.rn.f32 %f7, %f2, %f6;\n\
    mul.rn.f32 %f8, %beta2, %f3;\n    sub.rn.f32 %f9, 0f3F800000, %beta2;\n    mul.rn.f32 %f9, %f9, %f1;\n    mul.rn.f32 %f9, %f9, %f1;\n    add.rn.f32 %f10, %f8, %f9;\n\
    st.global.f32 [%a_m], %f7;\n    st.global.f32 [%a_v], %f10;\n\
    sqrt.rn.f32 %f11, %f10;\n    mul.rn.f32 %f11, %f11, %ibc;\n    add.rn.f32 %f11, %f11, %eps;\n\
    mul.rn.f32 %f12, %f4, %decay;\n    mul.rn.f32 %f13, %step, %f7;\n    div.rn.f32 %f13, %f13, %f11;\n    sub.rn.f32 %f14, %f12, %f13;\n    st.global.f32 [%a_pw], %f14;\n",
    );
    elementwise(
        m,
        "k_to_bf16",
        &["src", "dst"],
        &[],
        "    ld.global.f32 %f1, [%a_src];\n    cvt.rn.bf16.f32 %hb, %f1;\n    add.u64 %rd1, %dst, %off2;\n    st.global.b16 [%rd1], %hb;\n",
    );
    // Four at a time (`n` counts quads; 16-byte aligned source, 8-byte aligned destination):
    // one vector load and store per thread, the conversion's share of HBM bandwidth.
    elementwise(
        m,
        "k_to_bf16_x4",
        &["src", "dst"],
        &[],
        "    mul.wide.u32 %rd1, %gid, 16;\n    add.u64 %rd1, %src, %rd1;\n    ld.global.v4.f32 {%f1, %f2, %f3, %f4}, [%rd1];\n\
    cvt.rn.bf16x2.f32 %r1, %f2, %f1;\n    cvt.rn.bf16x2.f32 %r2, %f4, %f3;\n\
    mul.wide.u32 %rd2, %gid, 8;\n    add.u64 %rd2, %dst, %rd2;\n    st.global.v2.b32 [%rd2], {%r1, %r2};\n",
    );
    // x ← rnd(x / rnd(rnd(√Σx²) + eps)), Σx² (f64) read from the device.
    elementwise(
        m,
        "k_frob_scale",
        &["x", "nsq"],
        &[("eps", Ty::F32), ("rnd", Ty::U32)],
        &format!(
            "    setp.ne.u32 %p1, %rnd, 0;\n    ld.global.f64 %fd1, [%nsq];\n    sqrt.rn.f64 %fd1, %fd1;\n    cvt.rn.f32.f64 %f1, %fd1;\n{}    add.rn.f32 %f1, %f1, %eps;\n{}    ld.global.f32 %f2, [%a_x];\n    div.rn.f32 %f2, %f2, %f1;\n{}    st.global.f32 [%a_x], %f2;\n",
            round("%f1", Some("%p1")),
            round("%f1", Some("%p1")),
            round("%f2", Some("%p1"))
        ),
    );
}

fn layout_kernels(m: &mut String) {
    // dst[r·ds + c] = src[r·ss + c], gid = r·width + c
    elementwise(
        m,
        "k_copy_rows",
        &["src", "dst"],
        &[("ss", Ty::U32), ("ds", Ty::U32), ("width", Ty::U32)],
        &format!(
            "    div.u32 %r2, %gid, %width;\n    rem.u32 %r3, %gid, %width;\n    mad.lo.u32 %r4, %r2, %ss, %r3;\n    mad.lo.u32 %r5, %r2, %ds, %r3;\n{}{}    ld.global.f32 %f1, [%rd1];\n    st.global.f32 [%rd2], %f1;\n",
            addr("%rd1", "%src", "%r4"),
            addr("%rd2", "%dst", "%r5")
        ),
    );
    // out[gid] = table[idx[r]·dim + c]
    elementwise(
        m,
        "k_gather_rows",
        &["table", "idx", "out"],
        &[("dim", Ty::U32)],
        &format!(
            "    div.u32 %r2, %gid, %dim;\n    rem.u32 %r3, %gid, %dim;\n{}    ld.global.u32 %r4, [%rd1];\n    mad.lo.u32 %r5, %r4, %dim, %r3;\n{}    ld.global.f32 %f1, [%rd2];\n    st.global.f32 [%a_out], %f1;\n",
            addr("%rd1", "%idx", "%r2"),
            addr("%rd2", "%table", "%r5")
        ),
    );
    // table[idx[r]·dim + c] = src[gid]
    elementwise(
        m,
        "k_scatter_rows",
        &["src", "idx", "table"],
        &[("dim", Ty::U32)],
        &format!(
            "    div.u32 %r2, %gid, %dim;\n    rem.u32 %r3, %gid, %dim;\n{}    ld.global.u32 %r4, [%rd1];\n    mad.lo.u32 %r5, %r4, %dim, %r3;\n{}    ld.global.f32 %f1, [%a_src];\n    st.global.f32 [%rd2], %f1;\n",
            addr("%rd1", "%idx", "%r2"),
            addr("%rd2", "%table", "%r5")
        ),
    );
    // nanochat's rotary embedding, one thread per (token, head, pair); `sign` −1 inverts.
    elementwise(
        m,
        "k_rope",
        &["x", "pos", "cs", "sn"],
        &[("heads", Ty::U32), ("half", Ty::U32), ("sign", Ty::F32)],
        &format!(
            "    rem.u32 %r2, %gid, %half;\n    div.u32 %r3, %gid, %half;\n    div.u32 %r4, %r3, %heads;\n    shl.b32 %r5, %half, 1;\n    mad.lo.u32 %r6, %r3, %r5, %r2;\n    add.u32 %r7, %r6, %half;\n\
{}    ld.global.u32 %r8, [%rd1];\n    mad.lo.u32 %r9, %r8, %half, %r2;\n{}{}    ld.global.f32 %f1, [%rd2];\n    ld.global.f32 %f2, [%rd3];\n    mul.rn.f32 %f2, %sign, %f2;\n\
{}{}    ld.global.f32 %f3, [%rd4];\n    ld.global.f32 %f4, [%rd5];\n\
    mul.rn.f32 %f5, %f3, %f1;\n    mul.rn.f32 %f6, %f4, %f2;\n    add.rn.f32 %f7, %f5, %f6;\n\
    mul.rn.f32 %f8, %f4, %f1;\n    mul.rn.f32 %f9, %f3, %f2;\n    sub.rn.f32 %f10, %f8, %f9;\n\
    st.global.f32 [%rd4], %f7;\n    st.global.f32 [%rd5], %f10;\n",
            addr("%rd1", "%pos", "%r4"),
            addr("%rd2", "%cs", "%r9"),
            addr("%rd3", "%sn", "%r9"),
            addr("%rd4", "%x", "%r6"),
            addr("%rd5", "%x", "%r7")
        ),
    );
    // dst[c·rows + r] = src[r·cols + c]
    elementwise(
        m,
        "k_transpose",
        &["src", "dst"],
        &[("rows", Ty::U32), ("cols", Ty::U32)],
        &format!(
            "    div.u32 %r2, %gid, %cols;\n    rem.u32 %r3, %gid, %cols;\n    mad.lo.u32 %r4, %r3, %rows, %r2;\n{}    ld.global.f32 %f1, [%a_src];\n    st.global.f32 [%rd1], %f1;\n",
            addr("%rd1", "%dst", "%r4")
        ),
    );
    // [B,T,Hk,D] → [B,H,T,D] (each query head reads its KV head h / G), f32 or bf16 out.
    for (name, store) in [
        ("k_heads_to_bhtd_f32", "    st.global.f32 [%a_out], %f1;\n"),
        (
            "k_heads_to_bhtd_bf16",
            "    cvt.rn.bf16.f32 %hb, %f1;\n    add.u64 %rd2, %out, %off2;\n    st.global.b16 [%rd2], %hb;\n",
        ),
    ] {
        elementwise(
            m,
            name,
            &["x", "out"],
            &[("t", Ty::U32), ("h", Ty::U32), ("g", Ty::U32), ("d", Ty::U32)],
            &format!(
                "    rem.u32 %r2, %gid, %d;\n    div.u32 %r3, %gid, %d;\n    rem.u32 %r4, %r3, %t;\n    div.u32 %r5, %r3, %t;\n    rem.u32 %r6, %r5, %h;\n    div.u32 %r7, %r5, %h;\n\
    div.u32 %r8, %r6, %g;\n    div.u32 %r9, %h, %g;\n    mad.lo.u32 %r10, %r7, %t, %r4;\n    mad.lo.u32 %r10, %r10, %r9, %r8;\n    mad.lo.u32 %r10, %r10, %d, %r2;\n\
{}    ld.global.f32 %f1, [%rd1];\n{store}",
                addr("%rd1", "%x", "%r10")
            ),
        );
    }
    // [B,H,T,D] → [B,T,Hk,D], summing the G query heads of each KV head.
    elementwise(
        m,
        "k_bhtd_to_heads",
        &["x", "out"],
        &[("t", Ty::U32), ("hk", Ty::U32), ("g", Ty::U32), ("d", Ty::U32)],
        &format!(
            "    rem.u32 %r2, %gid, %d;\n    div.u32 %r3, %gid, %d;\n    rem.u32 %r4, %r3, %hk;\n    div.u32 %r5, %r3, %hk;\n    rem.u32 %r6, %r5, %t;\n    div.u32 %r7, %r5, %t;\n\
    mul.lo.u32 %r8, %hk, %g;\n    mul.lo.u32 %r9, %r4, %g;\n    mad.lo.u32 %r10, %r7, %r8, %r9;\n    mov.f32 %f1, 0f00000000;\n    mov.u32 %r11, 0;\n\
GLOOP:\n    add.u32 %r12, %r10, %r11;\n    mad.lo.u32 %r12, %r12, %t, %r6;\n    mad.lo.u32 %r12, %r12, %d, %r2;\n{}    ld.global.f32 %f2, [%rd1];\n    add.rn.f32 %f1, %f1, %f2;\n    add.u32 %r11, %r11, 1;\n    setp.lt.u32 %p1, %r11, %g;\n    @%p1 bra GLOOP;\n    st.global.f32 [%a_out], %f1;\n",
            addr("%rd1", "%x", "%r12")
        ),
    );
}

/// Rows per block of the warp-per-row kernels (one warp a row, [`ROW_THREADS`] threads).
pub const WARP_ROWS: u32 = ROW_THREADS / 32;

/// A warp-per-row kernel: row `%row` = `ctaid.x`·[`WARP_ROWS`] + warp, lane `%lane`; a `nrows`
/// parameter is appended, and warps past the last row return at once. Every branch in the
/// body must be uniform across the warp (the row's loops are: lanes stride by 32 over one
/// row), since [`warp_sum`]'s shuffles need all 32 lanes.
fn warp_row_kernel(out: &mut String, name: &str, params: &[(&str, Ty)], body: &str) {
    let mut all = params.to_vec();
    all.push(("nrows", Ty::U32));
    header(out, name, &all);
    out.push_str("    .reg .b32 %lane, %row;\n    mov.u32 %tx, %tid.x;\n    and.b32 %lane, %tx, 31;\n    shr.u32 %row, %tx, 5;\n    mov.u32 %r0, %ctaid.x;\n");
    let _ = writeln!(out, "    mad.lo.u32 %row, %r0, {WARP_ROWS}, %row;");
    load_params(out, &all);
    out.push_str("    setp.ge.u32 %p0, %row, %nrows;\n    @%p0 bra DONE;\n");
    out.push_str(body);
    out.push_str("DONE:\n    ret;\n}\n\n");
}

/// Butterfly sum of f32 register `v` over the 32 lanes of a warp: every lane ends with the
/// total, in a fixed order (deterministic run to run). Uses `%f46`.
fn warp_sum(v: &str) -> String {
    let mut s = String::new();
    for lane in [16, 8, 4, 2, 1] {
        let _ = writeln!(
            s,
            "    shfl.sync.bfly.b32 %f46, {v}, {lane}, 31, -1;\n    add.rn.f32 {v}, {v}, %f46;"
        );
    }
    s
}

fn row_kernels(m: &mut String) {
    // y = x·rstd, rstd = 1/√(mean(x²) + ε); y may be x. One warp per row: RMSNorm rows are
    // short (QK-norm rows are one head, 64–128 floats), so a 256-thread block per row left
    // most threads idle and paid sixteen barriers a row; a warp reduces with five shuffles.
    warp_row_kernel(
        m,
        "k_rmsnorm",
        &[("x", Ty::Ptr), ("y", Ty::Ptr), ("rstd", Ty::Ptr), ("dim", Ty::U32)],
        &format!(
            "    mul.lo.u32 %r2, %row, %dim;\n    mov.f32 %f1, 0f00000000;\n    mov.u32 %r3, %lane;\n\
L1:\n    setp.ge.u32 %p1, %r3, %dim;\n    @%p1 bra L1E;\n    add.u32 %r4, %r2, %r3;\n{}    ld.global.f32 %f2, [%rd1];\n    fma.rn.f32 %f1, %f2, %f2, %f1;\n    add.u32 %r3, %r3, 32;\n    bra L1;\nL1E:\n\
{}    cvt.rn.f32.u32 %f3, %dim;\n    div.rn.f32 %f4, %f1, %f3;\n    add.rn.f32 %f4, %f4, {RMS_EPS};\n    sqrt.rn.f32 %f4, %f4;\n    rcp.rn.f32 %f4, %f4;\n\
    setp.eq.u32 %p2, %lane, 0;\n{}    @%p2 st.global.f32 [%rd2], %f4;\n    mov.u32 %r3, %lane;\n\
L2:\n    setp.ge.u32 %p1, %r3, %dim;\n    @%p1 bra DONE;\n    add.u32 %r4, %r2, %r3;\n{}{}    ld.global.f32 %f2, [%rd1];\n    mul.rn.f32 %f2, %f2, %f4;\n    st.global.f32 [%rd3], %f2;\n    add.u32 %r3, %r3, 32;\n    bra L2;\n",
            addr("%rd1", "%x", "%r4"),
            warp_sum("%f1"),
            addr("%rd2", "%rstd", "%row"),
            addr("%rd1", "%x", "%r4"),
            addr("%rd3", "%y", "%r4"),
        ),
    );
    // dx (+)= rstd·(dy − y·mean(dy∘y)); dx may be dy. One warp per row, as above.
    warp_row_kernel(
        m,
        "k_rmsnorm_bwd",
        &[
            ("dy", Ty::Ptr),
            ("y", Ty::Ptr),
            ("rstd", Ty::Ptr),
            ("dx", Ty::Ptr),
            ("dim", Ty::U32),
            ("acc", Ty::U32),
        ],
        &format!(
            "    setp.ne.u32 %p3, %acc, 0;\n    mul.lo.u32 %r2, %row, %dim;\n    mov.f32 %f1, 0f00000000;\n    mov.u32 %r3, %lane;\n\
L1:\n    setp.ge.u32 %p1, %r3, %dim;\n    @%p1 bra L1E;\n    add.u32 %r4, %r2, %r3;\n{}{}    ld.global.f32 %f2, [%rd1];\n    ld.global.f32 %f3, [%rd2];\n    fma.rn.f32 %f1, %f2, %f3, %f1;\n    add.u32 %r3, %r3, 32;\n    bra L1;\nL1E:\n\
{}    cvt.rn.f32.u32 %f4, %dim;\n    div.rn.f32 %f5, %f1, %f4;\n{}    ld.global.f32 %f6, [%rd3];\n    mov.u32 %r3, %lane;\n\
L2:\n    setp.ge.u32 %p1, %r3, %dim;\n    @%p1 bra DONE;\n    add.u32 %r4, %r2, %r3;\n{}{}{}    ld.global.f32 %f2, [%rd1];\n    ld.global.f32 %f3, [%rd2];\n    mul.rn.f32 %f7, %f3, %f5;\n    sub.rn.f32 %f7, %f2, %f7;\n    mul.rn.f32 %f7, %f6, %f7;\n    @%p3 ld.global.f32 %f8, [%rd4];\n    @%p3 add.rn.f32 %f7, %f8, %f7;\n    st.global.f32 [%rd4], %f7;\n    add.u32 %r3, %r3, 32;\n    bra L2;\n",
            addr("%rd1", "%dy", "%r4"),
            addr("%rd2", "%y", "%r4"),
            warp_sum("%f1"),
            addr("%rd3", "%rstd", "%row"),
            addr("%rd1", "%dy", "%r4"),
            addr("%rd2", "%y", "%r4"),
            addr("%rd4", "%dx", "%r4"),
        ),
    );
    softcap_ce(m);
}

/// Softcapped cross-entropy fused with its gradient, one block per row (see
/// `Backend::softcap_ce`). `cap` 0 means no softcap; `grad` 0 leaves the capped logits.
fn softcap_ce(m: &mut String) {
    let t = ROW_THREADS;
    // tanh(x) = 1 − 2/(e^{2x} + 1): accurate in absolute terms, which is what c·tanh(z/c) needs.
    let cap_one = format!(
        "    @%p4 mul.rn.f32 %f10, %f2, %f20;\n    @%p4 add.f32 %f10, %f10, %f10;\n{}    @%p4 add.f32 %f10, %f10, 0f3F800000;\n    @%p4 div.rn.f32 %f10, 0f40000000, %f10;\n    @%p4 sub.f32 %f10, 0f3F800000, %f10;\n    @%p4 mul.rn.f32 %f2, %cap, %f10;\n",
        exp("%f10", "%f10").replace("    ", "    @%p4 ")
    );
    let body = format!(
        "    setp.ne.f32 %p4, %cap, 0f00000000;\n    setp.ne.u32 %p5, %grad, 0;\n    rcp.rn.f32 %f20, %cap;\n\
    mov.u32 %r1, %ctaid.x;\n    mul.lo.u32 %r2, %r1, %padded;\n{}    ld.global.s32 %r20, [%rd9];\n    setp.ge.s32 %p6, %r20, 0;\n\
    mov.f32 %f1, 0fFF800000;\n    mov.u32 %r3, %tx;\n\
L1:\n    setp.ge.u32 %p1, %r3, %vocab;\n    @%p1 bra L1E;\n    add.u32 %r4, %r2, %r3;\n{}    ld.global.f32 %f2, [%rd1];\n{cap_one}    @%p4 st.global.f32 [%rd1], %f2;\n    max.f32 %f1, %f1, %f2;\n    add.u32 %r3, %r3, {t};\n    bra L1;\nL1E:\n\
    or.pred %p7, %p6, %p5;\n    setp.eq.u32 %p2, %tx, 0;\n{}    @%p7 bra LIVE;\n    @%p2 st.global.f32 [%rd8], 0f00000000;\n    bra DONE;\nLIVE:\n\
{}    mov.f32 %f3, 0f00000000;\n    mov.u32 %r3, %tx;\n\
L2:\n    setp.ge.u32 %p1, %r3, %vocab;\n    @%p1 bra L2E;\n    add.u32 %r4, %r2, %r3;\n{}    ld.global.f32 %f2, [%rd1];\n    sub.f32 %f2, %f2, %f1;\n{}    add.f32 %f3, %f3, %f2;\n    add.u32 %r3, %r3, {t};\n    bra L2;\nL2E:\n\
{}    mov.f32 %f4, 0f00000000;\n    @!%p6 bra STORE;\n{}{}    ld.global.f32 %f5, [%rd2];\n{}    add.f32 %f4, %f4, %f1;\n    sub.f32 %f4, %f4, %f5;\nSTORE:\n    @%p2 st.global.f32 [%rd8], %f4;\n\
    @!%p5 bra DONE;\n    rcp.rn.f32 %f6, %f3;\n    mov.u32 %r3, %tx;\n\
L3:\n    setp.ge.u32 %p1, %r3, %padded;\n    @%p1 bra DONE;\n    add.u32 %r4, %r2, %r3;\n{}    mov.f32 %f7, 0f00000000;\n    setp.ge.u32 %p8, %r3, %vocab;\n    not.pred %p9, %p6;\n    or.pred %p8, %p8, %p9;\n    @%p8 bra W3;\n\
    ld.global.f32 %f2, [%rd1];\n    sub.f32 %f8, %f2, %f1;\n{}    mul.rn.f32 %f7, %f8, %f6;\n    mul.rn.f32 %f7, %f7, %scale;\n\
    mov.f32 %f9, 0f3F800000;\n    @%p4 mul.rn.f32 %f11, %f2, %f20;\n    @%p4 mul.rn.f32 %f11, %f11, %f11;\n    @%p4 sub.rn.f32 %f9, 0f3F800000, %f11;\n    mul.rn.f32 %f7, %f7, %f9;\n\
    setp.eq.u32 %p10, %r3, %r20;\n    mul.rn.f32 %f12, %scale, %f9;\n    @%p10 sub.rn.f32 %f7, %f7, %f12;\n\
W3:\n    st.global.f32 [%rd1], %f7;\n    add.u32 %r3, %r3, {t};\n    bra L3;\n",
        addr("%rd9", "%targets", "%r1"),
        addr("%rd1", "%logits", "%r4"),
        addr("%rd8", "%losses", "%r1"),
        tree_reduce("%f1", "f32", "max", t),
        addr("%rd1", "%logits", "%r4"),
        exp("%f2", "%f2"),
        tree_reduce("%f3", "f32", "add", t),
        "    add.u32 %r21, %r2, %r20;\n",
        addr("%rd2", "%logits", "%r21"),
        ln("%f4", "%f3"),
        addr("%rd1", "%logits", "%r4"),
        exp("%f8", "%f8"),
    );
    row_kernel(
        m,
        "k_softcap_ce",
        &[
            ("logits", Ty::Ptr),
            ("targets", Ty::Ptr),
            ("losses", Ty::Ptr),
            ("vocab", Ty::U32),
            ("padded", Ty::U32),
            ("cap", Ty::F32),
            ("grad", Ty::U32),
            ("scale", Ty::F32),
        ],
        &body,
    );
}

fn reduction_kernels(m: &mut String) {
    let t = ROW_THREADS;
    // partials[block] = Σ f(x[i]) over i ≡ block·256 + tid (mod grid·256), in f64.
    row_kernel(
        m,
        "k_reduce_partial",
        &[("x", Ty::Ptr), ("partials", Ty::Ptr), ("n", Ty::U32), ("sq", Ty::U32)],
        &format!(
            "    setp.ne.u32 %p3, %sq, 0;\n    mov.u32 %r1, %ctaid.x;\n    mov.u32 %r2, %nctaid.x;\n    mul.lo.u32 %r5, %r2, {t};\n    mad.lo.u32 %r3, %r1, {t}, %tx;\n    mov.f64 %fd1, 0d0000000000000000;\n\
L1:\n    setp.ge.u32 %p1, %r3, %n;\n    @%p1 bra L1E;\n{}    ld.global.f32 %f1, [%rd1];\n    cvt.f64.f32 %fd2, %f1;\n    @%p3 mul.rn.f64 %fd2, %fd2, %fd2;\n    add.rn.f64 %fd1, %fd1, %fd2;\n    add.u32 %r3, %r3, %r5;\n    bra L1;\nL1E:\n\
{}    setp.eq.u32 %p2, %tx, 0;\n    mul.wide.u32 %rd2, %r1, 8;\n    add.u64 %rd2, %partials, %rd2;\n    @%p2 st.global.f64 [%rd2], %fd1;\n",
            addr("%rd1", "%x", "%r3"),
            tree_reduce("%fd1", "f64", "add", t)
        ),
    );
    // out[0] = Σ partials (one block).
    row_kernel(
        m,
        "k_reduce_final",
        &[("partials", Ty::Ptr), ("out", Ty::Ptr), ("count", Ty::U32)],
        &format!(
            "    mov.f64 %fd1, 0d0000000000000000;\n    mov.u32 %r3, %tx;\n\
L1:\n    setp.ge.u32 %p1, %r3, %count;\n    @%p1 bra L1E;\n    mul.wide.u32 %rd1, %r3, 8;\n    add.u64 %rd1, %partials, %rd1;\n    ld.global.f64 %fd2, [%rd1];\n    add.rn.f64 %fd1, %fd1, %fd2;\n    add.u32 %r3, %r3, {t};\n    bra L1;\nL1E:\n\
{}    setp.eq.u32 %p2, %tx, 0;\n    @%p2 st.global.f64 [%out], %fd1;\n",
            tree_reduce("%fd1", "f64", "add", t)
        ),
    );
    // table[row] += Σ src[order[k]] for k in the segment, in increasing k (one block per
    // distinct row; `order` lists source rows sorted stably by destination).
    row_kernel(
        m,
        "k_scatter_add_sorted",
        &[
            ("src", Ty::Ptr),
            ("order", Ty::Ptr),
            ("seg_start", Ty::Ptr),
            ("seg_row", Ty::Ptr),
            ("table", Ty::Ptr),
            ("dim", Ty::U32),
        ],
        &format!(
            "    mov.u32 %r1, %ctaid.x;\n{}    ld.global.u32 %r2, [%rd1];\n{}    ld.global.u32 %r3, [%rd2];\n    ld.global.u32 %r4, [%rd2+4];\n    mov.u32 %r5, %tx;\n\
L1:\n    setp.ge.u32 %p1, %r5, %dim;\n    @%p1 bra DONE;\n    mad.lo.u32 %r6, %r2, %dim, %r5;\n{}    ld.global.f32 %f1, [%rd3];\n    mov.u32 %r7, %r3;\n\
L2:\n    setp.ge.u32 %p2, %r7, %r4;\n    @%p2 bra L2E;\n{}    ld.global.u32 %r8, [%rd4];\n    mad.lo.u32 %r9, %r8, %dim, %r5;\n{}    ld.global.f32 %f2, [%rd5];\n    add.rn.f32 %f1, %f1, %f2;\n    add.u32 %r7, %r7, 1;\n    bra L2;\nL2E:\n\
    st.global.f32 [%rd3], %f1;\n    add.u32 %r5, %r5, {t};\n    bra L1;\n",
            addr("%rd1", "%seg_row", "%r1"),
            addr("%rd2", "%seg_start", "%r1"),
            addr("%rd3", "%table", "%r6"),
            addr("%rd4", "%order", "%r7"),
            addr("%rd5", "%src", "%r9"),
        ),
    );
}

fn attention_kernels(m: &mut String) {
    let t = ROW_THREADS;
    // Causal softmax of one query row of scores (grid: x = query t, y = batch·head):
    // lse = log Σ_{j≤t} e^{scale·s_j}; p_j = e^{scale·s_j − lse} (0 for j > t), f32 in place or
    // bf16 into `p`.
    row_kernel(
        m,
        "k_attn_softmax",
        &[
            ("s", Ty::Ptr),
            ("pbuf", Ty::Ptr),
            ("lse", Ty::Ptr),
            ("t", Ty::U32),
            ("scale", Ty::F32),
            ("bf", Ty::U32),
        ],
        &format!(
            "    setp.ne.u32 %p5, %bf, 0;\n    mov.u32 %r1, %ctaid.x;\n    mov.u32 %r2, %ctaid.y;\n    mad.lo.u32 %r10, %r2, %t, %r1;\n    mul.lo.u32 %r11, %r10, %t;\n\
    mov.f32 %f1, 0fFF800000;\n    mov.u32 %r3, %tx;\n\
L1:\n    setp.gt.u32 %p1, %r3, %r1;\n    @%p1 bra L1E;\n    add.u32 %r4, %r11, %r3;\n{}    ld.global.f32 %f2, [%rd1];\n    mul.rn.f32 %f2, %f2, %scale;\n    max.f32 %f1, %f1, %f2;\n    add.u32 %r3, %r3, {t};\n    bra L1;\nL1E:\n\
{}    mov.f32 %f3, 0f00000000;\n    mov.u32 %r3, %tx;\n\
L2:\n    setp.gt.u32 %p1, %r3, %r1;\n    @%p1 bra L2E;\n    add.u32 %r4, %r11, %r3;\n{}    ld.global.f32 %f2, [%rd1];\n    mul.rn.f32 %f2, %f2, %scale;\n    sub.f32 %f2, %f2, %f1;\n{}    add.f32 %f3, %f3, %f2;\n    add.u32 %r3, %r3, {t};\n    bra L2;\nL2E:\n\
{}{}    add.f32 %f4, %f4, %f1;\n    setp.eq.u32 %p2, %tx, 0;\n{}    @%p2 st.global.f32 [%rd2], %f4;\n    mov.u32 %r3, %tx;\n\
L3:\n    setp.ge.u32 %p1, %r3, %t;\n    @%p1 bra DONE;\n    add.u32 %r4, %r11, %r3;\n    mov.f32 %f5, 0f00000000;\n    setp.gt.u32 %p3, %r3, %r1;\n    @%p3 bra W3;\n{}    ld.global.f32 %f5, [%rd1];\n    mul.rn.f32 %f5, %f5, %scale;\n    sub.f32 %f5, %f5, %f4;\n{}W3:\n\
    @%p5 bra B3;\n{}    st.global.f32 [%rd1], %f5;\n    bra N3;\nB3:\n    cvt.rn.bf16.f32 %hb, %f5;\n    mul.wide.u32 %rd3, %r4, 2;\n    add.u64 %rd3, %pbuf, %rd3;\n    st.global.b16 [%rd3], %hb;\nN3:\n    add.u32 %r3, %r3, {t};\n    bra L3;\n",
            addr("%rd1", "%s", "%r4"),
            tree_reduce("%f1", "f32", "max", t),
            addr("%rd1", "%s", "%r4"),
            exp("%f2", "%f2"),
            tree_reduce("%f3", "f32", "add", t),
            ln("%f4", "%f3"),
            addr("%rd2", "%lse", "%r10"),
            addr("%rd1", "%s", "%r4"),
            exp("%f5", "%f5"),
            addr("%rd1", "%s", "%r4"),
        ),
    );
    // Backward of the causal softmax, element-wise over [BH, T, T] (gid = (row)·T + j):
    // p = e^{scale·s − lse[row]}, ds = p·(dp − drow[row]) for j ≤ t, else 0. f32 results go to
    // `pout`/`dsout` at 4-byte strides (they may be `s`/`dp`), bf16 at 2-byte strides.
    elementwise(
        m,
        "k_attn_softmax_bwd",
        &["s", "dp", "lse", "drow", "pout", "dsout"],
        &[("t", Ty::U32), ("scale", Ty::F32), ("bf", Ty::U32)],
        &format!(
            "    setp.ne.u32 %p5, %bf, 0;\n    rem.u32 %r2, %gid, %t;\n    div.u32 %r3, %gid, %t;\n    rem.u32 %r4, %r3, %t;\n    mov.f32 %f5, 0f00000000;\n    mov.f32 %f6, 0f00000000;\n    setp.gt.u32 %p1, %r2, %r4;\n    @%p1 bra W;\n\
{}{}    ld.global.f32 %f1, [%a_s];\n    ld.global.f32 %f2, [%a_dp];\n    ld.global.f32 %f3, [%rd1];\n    ld.global.f32 %f4, [%rd2];\n    mul.rn.f32 %f1, %f1, %scale;\n    sub.f32 %f1, %f1, %f3;\n{}    mov.f32 %f5, %f1;\n    sub.f32 %f2, %f2, %f4;\n    mul.f32 %f6, %f5, %f2;\nW:\n\
    @%p5 bra B;\n    st.global.f32 [%a_pout], %f5;\n    st.global.f32 [%a_dsout], %f6;\n    bra DONE;\nB:\n    cvt.rn.bf16.f32 %hb, %f5;\n    add.u64 %rd3, %pout, %off2;\n    st.global.b16 [%rd3], %hb;\n    cvt.rn.bf16.f32 %hb, %f6;\n    add.u64 %rd3, %dsout, %off2;\n    st.global.b16 [%rd3], %hb;\n",
            addr("%rd1", "%lse", "%r3"),
            addr("%rd2", "%drow", "%r3"),
            exp("%f1", "%f1"),
        ),
    );
    // drow[(b·H + h)·T + t] = Σ_d dy[b,t,h,d]·y[b,t,h,d]; gid = (b·T + t)·H + h.
    elementwise(
        m,
        "k_attn_row_dot",
        &["dy", "y", "out"],
        &[("t", Ty::U32), ("h", Ty::U32), ("d", Ty::U32)],
        &format!(
            "    mul.lo.u32 %r2, %t, %h;\n    div.u32 %r3, %gid, %r2;\n    rem.u32 %r4, %gid, %r2;\n    div.u32 %r5, %r4, %h;\n    rem.u32 %r6, %r4, %h;\n    mad.lo.u32 %r7, %r3, %h, %r6;\n    mad.lo.u32 %r7, %r7, %t, %r5;\n\
    mul.lo.u32 %r8, %gid, %d;\n    mov.f32 %f1, 0f00000000;\n    mov.u32 %r9, 0;\n\
L:\n    add.u32 %r10, %r8, %r9;\n{}{}    ld.global.f32 %f2, [%rd1];\n    ld.global.f32 %f3, [%rd2];\n    fma.rn.f32 %f1, %f2, %f3, %f1;\n    add.u32 %r9, %r9, 1;\n    setp.lt.u32 %p1, %r9, %d;\n    @%p1 bra L;\n{}    st.global.f32 [%rd3], %f1;\n",
            addr("%rd1", "%dy", "%r10"),
            addr("%rd2", "%y", "%r10"),
            addr("%rd3", "%out", "%r7"),
        ),
    );
    decode_kernel(m);
    for d in FLASH_HEAD_DIMS {
        flash_forward(m, *d);
        crate::flash::backward_kv(m, *d);
        crate::flash::backward_q(m, *d);
    }
    let _ = t;
}

/// Attention of M new tokens against a KV cache: grid (token, head), 128 threads, the scores in
/// dynamic shared memory (`capacity` floats).
fn decode_kernel(m: &mut String) {
    let t = DECODE_THREADS;
    let params = [
        ("q", Ty::Ptr),
        ("pos", Ty::Ptr),
        ("rows", Ty::Ptr),
        ("kc", Ty::Ptr),
        ("vc", Ty::Ptr),
        ("y", Ty::Ptr),
        ("h", Ty::U32),
        ("hk", Ty::U32),
        ("d", Ty::U32),
        ("cap", Ty::U32),
        ("scale", Ty::F32),
    ];
    // Dynamic shared memory is declared once, at module scope.
    m.push_str(".extern .shared .align 4 .f32 scores[];\n\n");
    header(m, "k_attn_decode", &params);
    m.push_str("    .shared .align 8 .b8 red[2048];\n    .shared .align 4 .f32 qsh[512];\n    mov.u32 %tx, %tid.x;\n");
    load_params(m, &params);
    let body = format!(
        "    mov.u32 %r1, %ctaid.x;\n    mov.u32 %r2, %ctaid.y;\n{}    ld.global.u32 %r3, [%rd1];\n{}    ld.global.u32 %r4, [%rd2];\n\
    div.u32 %r5, %h, %hk;\n    div.u32 %r6, %r2, %r5;\n\
    mad.lo.u32 %r7, %r1, %h, %r2;\n    mul.lo.u32 %r7, %r7, %d;\n    mov.u32 %r8, qsh;\n    mov.u32 %r9, scores;\n    mov.u32 %r10, %tx;\n\
LQ:\n    setp.ge.u32 %p1, %r10, %d;\n    @%p1 bra LQE;\n    add.u32 %r11, %r7, %r10;\n{}    ld.global.f32 %f1, [%rd3];\n    mad.lo.u32 %r12, %r10, 4, %r8;\n    st.shared.f32 [%r12], %f1;\n    add.u32 %r10, %r10, {t};\n    bra LQ;\nLQE:\n    bar.sync 0;\n\
    mul.wide.u32 %rd10, %r4, %cap;\n    mul.lo.u32 %r13, %hk, %d;\n    cvt.u64.u32 %rd11, %r13;\n    mul.lo.u64 %rd10, %rd10, %rd11;\n    mul.wide.u32 %rd12, %r6, %d;\n    add.u64 %rd10, %rd10, %rd12;\n\
    mul.wide.u32 %rd13, %r13, 4;\n\
    mov.f32 %f2, 0fFF800000;\n    mov.u32 %r10, %tx;\n\
LS:\n    setp.gt.u32 %p1, %r10, %r3;\n    @%p1 bra LSE;\n    cvt.u64.u32 %rd14, %r10;\n    mul.lo.u64 %rd14, %rd14, %rd11;\n    add.u64 %rd14, %rd14, %rd10;\n    shl.b64 %rd14, %rd14, 2;\n    add.u64 %rd14, %kc, %rd14;\n\
    mov.f32 %f3, 0f00000000;\n    mov.u32 %r14, 0;\n    mov.u32 %r12, %r8;\n\
LD:\n    ld.shared.f32 %f4, [%r12];\n    ld.global.f32 %f5, [%rd14];\n    fma.rn.f32 %f3, %f4, %f5, %f3;\n    add.u32 %r12, %r12, 4;\n    add.u64 %rd14, %rd14, 4;\n    add.u32 %r14, %r14, 1;\n    setp.lt.u32 %p2, %r14, %d;\n    @%p2 bra LD;\n\
    mul.rn.f32 %f3, %f3, %scale;\n    mad.lo.u32 %r15, %r10, 4, %r9;\n    st.shared.f32 [%r15], %f3;\n    max.f32 %f2, %f2, %f3;\n    add.u32 %r10, %r10, {t};\n    bra LS;\nLSE:\n\
{}    mov.f32 %f6, 0f00000000;\n    mov.u32 %r10, %tx;\n\
LE:\n    setp.gt.u32 %p1, %r10, %r3;\n    @%p1 bra LEE;\n    mad.lo.u32 %r15, %r10, 4, %r9;\n    ld.shared.f32 %f3, [%r15];\n    sub.f32 %f3, %f3, %f2;\n{}    st.shared.f32 [%r15], %f3;\n    add.f32 %f6, %f6, %f3;\n    add.u32 %r10, %r10, {t};\n    bra LE;\nLEE:\n\
{}    rcp.rn.f32 %f7, %f6;\n    mov.u32 %r10, %tx;\n\
LO:\n    setp.ge.u32 %p1, %r10, %d;\n    @%p1 bra DONE;\n    cvt.u64.u32 %rd15, %r10;\n    add.u64 %rd15, %rd15, %rd10;\n    shl.b64 %rd15, %rd15, 2;\n    add.u64 %rd15, %vc, %rd15;\n    mov.f32 %f8, 0f00000000;\n    mov.u32 %r14, 0;\n    mov.u32 %r15, %r9;\n\
LV:\n    setp.gt.u32 %p2, %r14, %r3;\n    @%p2 bra LVE;\n    ld.shared.f32 %f4, [%r15];\n    ld.global.f32 %f5, [%rd15];\n    fma.rn.f32 %f8, %f4, %f5, %f8;\n    add.u32 %r15, %r15, 4;\n    add.u64 %rd15, %rd15, %rd13;\n    add.u32 %r14, %r14, 1;\n    bra LV;\nLVE:\n\
    mul.rn.f32 %f8, %f8, %f7;\n    add.u32 %r11, %r7, %r10;\n{}    st.global.f32 [%rd3], %f8;\n    add.u32 %r10, %r10, {t};\n    bra LO;\n",
        addr("%rd1", "%pos", "%r1"),
        addr("%rd2", "%rows", "%r1"),
        addr("%rd3", "%q", "%r11"),
        tree_reduce("%f2", "f32", "max", t),
        exp("%f3", "%f3"),
        tree_reduce("%f6", "f32", "add", t),
        addr("%rd3", "%y", "%r11"),
    );
    m.push_str(&body);
    m.push_str("DONE:\n    ret;\n}\n\n");
}

/// Head dims with a flash-attention forward kernel (`k_flash_fwd_d{D}`).
pub const FLASH_HEAD_DIMS: &[usize] = &[64, 128];
/// Query rows per flash-attention block (four warps of sixteen rows) and keys per tile.
pub const FLASH_ROWS: u32 = 64;
/// Threads per flash-attention block.
pub const FLASH_THREADS: u32 = 128;

/// `mma.sync` m16n8k16, bf16 inputs, f32 accumulators `acc[0..4]` in place.
pub(crate) fn mma(acc: &[String; 4], a: &[String; 4], b: [&str; 2]) -> String {
    format!(
        "    mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {{{0}, {1}, {2}, {3}}}, {{{4}, {5}, {6}, {7}}}, {{{8}, {9}}}, {{{0}, {1}, {2}, {3}}};\n",
        acc[0], acc[1], acc[2], acc[3], a[0], a[1], a[2], a[3], b[0], b[1]
    )
}

/// Causal attention forward without a score matrix (FlashAttention-2's schedule), bf16
/// tensor-core products with f32 accumulation and an online softmax, for head dim `d`.
///
/// Grid: x = query block (heaviest first, since causal blocks near the end see the most keys),
/// y = batch·head; 128 threads, each warp owning sixteen query rows of the block's 64. q/k/v
/// are read in place in the model's `[B,T,H,D]` f32 layout and rounded to bf16 on load (the
/// operand rounding the GEMM path applies), so no head-layout copies are made. Per key tile of
/// 64: K goes to shared memory as rows (the `mma` B operand of S = Q·Kᵀ reads a key's
/// consecutive dims), V transposed (P·V's B operand reads a dim's consecutive keys); rows are
/// padded by four words so the eight rows a warp reads at once fall in distinct banks. The
/// fragment layout of the S accumulators is the A layout of the next product, so P never
/// leaves registers. y = O/l, lse = m + ln l (natural log, as the softmax kernel writes it).
fn flash_forward(m: &mut String, d: usize) {
    let name = format!("k_flash_fwd_d{d}");
    let params = [
        ("q", Ty::Ptr),
        ("k", Ty::Ptr),
        ("v", Ty::Ptr),
        ("y", Ty::Ptr),
        ("lse", Ty::Ptr),
        ("t", Ty::U32),
        ("h", Ty::U32),
        ("hk", Ty::U32),
        ("sl2", Ty::F32),
    ];
    let ks_n = d / 16; // k-steps of Q·Kᵀ
    let on = d / 8; // n-tiles of O
    let kw = d / 2 + 4; // words per padded K row
    let vw = 32 + 4; // words per padded Vᵀ row (64 keys)
    header(m, &name, &params);
    let _ = writeln!(
        m,
        "    .shared .align 16 .b32 ksm[{}];\n    .shared .align 16 .b32 vsm[{}];",
        64 * kw,
        d * vw
    );
    let _ = writeln!(
        m,
        "    .reg .b32 %qa<{}>, %pa<4>, %kb<2>;\n    .reg .f32 %sa<32>, %oa<{}>;\n    .reg .f32 %m<2>, %l<2>, %c<2>, %mx<2>, %ft;\n    .reg .b32 %lane, %warp, %g, %tig, %qb, %b, %hh, %kvh, %row0, %row1, %kt, %kread, %vread, %kst, %vst, %kcol, %kbase;\n    .reg .b64 %qp0, %qp1, %kg, %vg, %kinc, %tinc;\n    .reg .pred %pv0, %pv1, %pk;",
        4 * ks_n,
        4 * on
    );
    m.push_str("    mov.u32 %tx, %tid.x;\n");
    load_params(m, &params);
    // Thread coordinates, heads, rows.
    let _ = writeln!(
        m,
        "    and.b32 %lane, %tx, 31;\n    shr.u32 %warp, %tx, 5;\n    shr.u32 %g, %lane, 2;\n    and.b32 %tig, %lane, 3;\n\
    mov.u32 %r1, %nctaid.x;\n    mov.u32 %r2, %ctaid.x;\n    sub.u32 %qb, %r1, %r2;\n    sub.u32 %qb, %qb, 1;\n\
    mov.u32 %r3, %ctaid.y;\n    div.u32 %b, %r3, %h;\n    rem.u32 %hh, %r3, %h;\n    div.u32 %r4, %h, %hk;\n    div.u32 %kvh, %hh, %r4;\n\
    shl.b32 %r5, %qb, 6;\n    mad.lo.u32 %row0, %warp, 16, %r5;\n    add.u32 %row0, %row0, %g;\n    add.u32 %row1, %row0, 8;\n\
    setp.lt.u32 %pv0, %row0, %t;\n    setp.lt.u32 %pv1, %row1, %t;"
    );
    // Row base addresses of q (and, later, y): ((b·T + row)·H + hh)·D floats, plus 2·tig.
    let row_addr = |dst: &str, base: &str, row: &str| {
        format!(
            "    mad.lo.u32 %r6, %b, %t, {row};\n    mad.lo.u32 %r6, %r6, %h, %hh;\n    mul.wide.u32 %rd1, %r6, {};\n    add.u64 {dst}, {base}, %rd1;\n    mul.wide.u32 %rd2, %tig, 8;\n    add.u64 {dst}, {dst}, %rd2;\n",
            d * 4
        )
    };
    m.push_str(&row_addr("%qp0", "%q", "%row0"));
    m.push_str(&row_addr("%qp1", "%q", "%row1"));
    // Q fragments: register 4·ks + j holds rows (g, g+8, g, g+8)[j], dims 16·ks + 8·(j/2) + 2·tig.
    for ks in 0..ks_n {
        for j in 0..4 {
            let (ptr, pred) = if j % 2 == 0 {
                ("%qp0", "%pv0")
            } else {
                ("%qp1", "%pv1")
            };
            let off = (ks * 16 + (j / 2) * 8) * 4;
            let _ = writeln!(
                m,
                "    mov.f32 %f1, 0f00000000;\n    mov.f32 %f2, 0f00000000;\n    @{pred} ld.global.v2.f32 {{%f1, %f2}}, [{ptr}+{off}];\n    cvt.rn.bf16x2.f32 %qa{}, %f2, %f1;",
                4 * ks + j
            );
        }
    }
    // Running max (log2 units), partial sums, accumulators.
    m.push_str("    mov.f32 %m0, 0fFF800000;\n    mov.f32 %m1, 0fFF800000;\n    mov.f32 %l0, 0f00000000;\n    mov.f32 %l1, 0f00000000;\n");
    for i in 0..4 * on {
        let _ = writeln!(m, "    mov.f32 %oa{i}, 0f00000000;");
    }
    // Tile loaders: K rows (one word = two dims per thread per step), V transposed (two keys
    // × two dims per thread per step). dw/dp = tx mod D/2; first key (pair) = tx / (D/2).
    let half = d / 2;
    let kstep = 256 / d; // keys (K) or key pairs (V) between a thread's steps
    let _ = writeln!(
        m,
        "    rem.u32 %r7, %tx, {half};\n    div.u32 %r8, %tx, {half};\n\
    mad.lo.u32 %r9, %b, %t, %r8;\n    mad.lo.u32 %r9, %r9, %hk, %kvh;\n    mul.lo.u32 %r9, %r9, {d};\n    shl.b32 %r10, %r7, 1;\n    add.u32 %r9, %r9, %r10;\n    mul.wide.u32 %rd3, %r9, 4;\n    add.u64 %kg, %k, %rd3;\n\
    shl.b32 %r11, %r8, 1;\n    mad.lo.u32 %r12, %b, %t, %r11;\n    mad.lo.u32 %r12, %r12, %hk, %kvh;\n    mul.lo.u32 %r12, %r12, {d};\n    add.u32 %r12, %r12, %r10;\n    mul.wide.u32 %rd4, %r12, 4;\n    add.u64 %vg, %v, %rd4;\n\
    mul.lo.u32 %r13, %hk, {d};\n    mul.wide.u32 %kinc, %r13, 4;\n    mul.wide.u32 %tinc, %r13, 256;\n\
    mov.u32 %r14, ksm;\n    mad.lo.u32 %r15, %r8, {kw}, %r7;\n    mad.lo.u32 %kst, %r15, 4, %r14;\n\
    mov.u32 %r16, vsm;\n    mul.lo.u32 %r17, %r7, {};\n    add.u32 %r17, %r17, %r8;\n    mad.lo.u32 %vst, %r17, 4, %r16;\n\
    mad.lo.u32 %r18, %g, {kw}, %tig;\n    mad.lo.u32 %kread, %r18, 4, %r14;\n    mad.lo.u32 %r19, %g, {vw}, %tig;\n    mad.lo.u32 %vread, %r19, 4, %r16;\n\
    mov.u32 %kbase, %r8;\n    mov.u32 %kt, 0;",
        2 * vw,
    );
    // %kinc = bytes between consecutive keys; a thread's K steps are kstep keys apart, its V
    // steps 2·kstep keys; %tinc = a whole tile (64 keys).
    m.push_str("TILE:\n    bar.sync 0;\n");
    // K tile: 64/kstep steps, key = kbase + j·kstep.
    for j in 0..64 / kstep {
        let _ = writeln!(
            m,
            "    add.u32 %r20, %kbase, {};\n    setp.lt.u32 %pk, %r20, %t;\n    mov.f32 %f1, 0f00000000;\n    mov.f32 %f2, 0f00000000;\n    mul.lo.u64 %rd5, %kinc, {};\n    add.u64 %rd5, %kg, %rd5;\n    @%pk ld.global.v2.f32 {{%f1, %f2}}, [%rd5];\n    cvt.rn.bf16x2.f32 %r21, %f2, %f1;\n    st.shared.b32 [%kst+{}], %r21;",
            j * kstep,
            j * kstep,
            j * kstep * kw * 4
        );
    }
    // V tile: 32/kstep steps over key pairs kp = r8 + j·kstep, keys 64·kt + 2kp and the next
    // (kbase + r8 = 64·kt + 2·r8).
    for j in 0..32 / kstep {
        let _ = writeln!(
            m,
            "    add.u32 %r20, %kbase, %r8;\n    add.u32 %r20, %r20, {};\n    setp.lt.u32 %pk, %r20, %t;\n    mov.f32 %f1, 0f00000000;\n    mov.f32 %f2, 0f00000000;\n    mov.f32 %f3, 0f00000000;\n    mov.f32 %f4, 0f00000000;\n    mul.lo.u64 %rd5, %kinc, {};\n    add.u64 %rd5, %vg, %rd5;\n    @%pk ld.global.v2.f32 {{%f1, %f2}}, [%rd5];\n    add.u32 %r20, %r20, 1;\n    setp.lt.u32 %pk, %r20, %t;\n    add.u64 %rd5, %rd5, %kinc;\n    @%pk ld.global.v2.f32 {{%f3, %f4}}, [%rd5];\n    cvt.rn.bf16x2.f32 %r21, %f3, %f1;\n    cvt.rn.bf16x2.f32 %r22, %f4, %f2;\n    st.shared.b32 [%vst+{}], %r21;\n    st.shared.b32 [%vst+{}], %r22;",
            2 * j * kstep,
            2 * j * kstep,
            j * kstep * 4,
            j * kstep * 4 + vw * 4
        );
    }
    m.push_str("    bar.sync 0;\n");
    let sa = |nt: usize, e: usize| format!("%sa{}", 4 * nt + e);
    let oa = |nt: usize, e: usize| format!("%oa{}", 4 * nt + e);
    let quad = |f: &dyn Fn(usize) -> String| -> [String; 4] { [f(0), f(1), f(2), f(3)] };
    // S = Q·Kᵀ over the tile's eight 8-key n-tiles.
    for nt in 0..8 {
        for e in 0..4 {
            let _ = writeln!(m, "    mov.f32 {}, 0f00000000;", sa(nt, e));
        }
        for ks in 0..ks_n {
            let off = (nt * 8 * kw + ks * 8) * 4;
            let _ = writeln!(
                m,
                "    ld.shared.b32 %kb0, [%kread+{off}];\n    ld.shared.b32 %kb1, [%kread+{}];",
                off + 16
            );
            m.push_str(&mma(
                &quad(&|e| sa(nt, e)),
                &quad(&|j| format!("%qa{}", 4 * ks + j)),
                ["%kb0", "%kb1"],
            ));
        }
    }
    // Scale into log2 units; on the diagonal tile mask keys past the row.
    for nt in 0..8 {
        for e in 0..4 {
            let _ = writeln!(m, "    mul.f32 {0}, {0}, %sl2;", sa(nt, e));
        }
    }
    m.push_str("    setp.ne.u32 %pk, %kt, %qb;\n    @%pk bra NOMASK;\n    shl.b32 %kcol, %kt, 6;\n    shl.b32 %r23, %tig, 1;\n    add.u32 %kcol, %kcol, %r23;\n");
    for nt in 0..8 {
        for e in 0..4 {
            let row = if e < 2 { "%row0" } else { "%row1" };
            let _ = writeln!(
                m,
                "    add.u32 %r24, %kcol, {};\n    setp.gt.u32 %pk, %r24, {row};\n    @%pk mov.f32 {}, 0fFF800000;",
                nt * 8 + (e & 1),
                sa(nt, e)
            );
        }
    }
    m.push_str("NOMASK:\n");
    // Online softmax per row (row g: elements 0,1; row g+8: elements 2,3 of each n-tile).
    for r in 0..2 {
        let _ = writeln!(m, "    mov.f32 %mx{r}, {};", sa(0, 2 * r));
        for nt in 0..8 {
            for e in [2 * r, 2 * r + 1] {
                let _ = writeln!(m, "    max.f32 %mx{r}, %mx{r}, {};", sa(nt, e));
            }
        }
        for lane in [1, 2] {
            let _ = writeln!(
                m,
                "    shfl.sync.bfly.b32 %ft, %mx{r}, {lane}, 31, -1;\n    max.f32 %mx{r}, %mx{r}, %ft;"
            );
        }
        let _ = writeln!(
            m,
            "    max.f32 %mx{r}, %mx{r}, %m{r};\n    sub.f32 %ft, %m{r}, %mx{r};\n    ex2.approx.ftz.f32 %c{r}, %ft;\n    mov.f32 %m{r}, %mx{r};\n    mul.f32 %l{r}, %l{r}, %c{r};"
        );
        for nt in 0..8 {
            for e in [2 * r, 2 * r + 1] {
                let _ = writeln!(
                    m,
                    "    sub.f32 {0}, {0}, %m{r};\n    ex2.approx.ftz.f32 {0}, {0};\n    add.f32 %l{r}, %l{r}, {0};",
                    sa(nt, e)
                );
            }
        }
        for nt in 0..on {
            for e in [2 * r, 2 * r + 1] {
                let _ = writeln!(m, "    mul.f32 {0}, {0}, %c{r};", oa(nt, e));
            }
        }
    }
    // O += P·V: P's k-step ks is S n-tiles 2ks and 2ks+1, rounded to bf16 pairs.
    for ks in 0..4 {
        let _ = writeln!(
            m,
            "    cvt.rn.bf16x2.f32 %pa0, {}, {};\n    cvt.rn.bf16x2.f32 %pa1, {}, {};\n    cvt.rn.bf16x2.f32 %pa2, {}, {};\n    cvt.rn.bf16x2.f32 %pa3, {}, {};",
            sa(2 * ks, 1),
            sa(2 * ks, 0),
            sa(2 * ks, 3),
            sa(2 * ks, 2),
            sa(2 * ks + 1, 1),
            sa(2 * ks + 1, 0),
            sa(2 * ks + 1, 3),
            sa(2 * ks + 1, 2)
        );
        for nt in 0..on {
            let off = (nt * 8 * vw + ks * 8) * 4;
            let _ = writeln!(
                m,
                "    ld.shared.b32 %kb0, [%vread+{off}];\n    ld.shared.b32 %kb1, [%vread+{}];",
                off + 16
            );
            m.push_str(&mma(
                &quad(&|e| oa(nt, e)),
                &quad(&|j| format!("%pa{j}")),
                ["%kb0", "%kb1"],
            ));
        }
    }
    // Next tile, through the diagonal one.
    m.push_str("    add.u64 %kg, %kg, %tinc;\n    add.u64 %vg, %vg, %tinc;\n    add.u32 %kbase, %kbase, 64;\n    add.u32 %kt, %kt, 1;\n    setp.le.u32 %pk, %kt, %qb;\n    @%pk bra TILE;\n");
    // Finish: sum l over the row's four lanes, y = O/l, lse.
    for r in 0..2 {
        for lane in [1, 2] {
            let _ = writeln!(
                m,
                "    shfl.sync.bfly.b32 %ft, %l{r}, {lane}, 31, -1;\n    add.f32 %l{r}, %l{r}, %ft;"
            );
        }
        let _ = writeln!(m, "    rcp.rn.f32 %c{r}, %l{r};");
    }
    m.push_str(&row_addr("%qp0", "%y", "%row0"));
    m.push_str(&row_addr("%qp1", "%y", "%row1"));
    for nt in 0..on {
        for r in 0..2 {
            let _ = writeln!(
                m,
                "    mul.f32 %f1, {}, %c{r};\n    mul.f32 %f2, {}, %c{r};\n    @%pv{r} st.global.v2.f32 [%qp{r}+{}], {{%f1, %f2}};",
                oa(nt, 2 * r),
                oa(nt, 2 * r + 1),
                nt * 32
            );
        }
    }
    let _ = writeln!(
        m,
        "    setp.ne.u32 %pk, %tig, 0;\n    @%pk bra DONE;\n    mov.u32 %r25, %ctaid.y;\n    mul.lo.u32 %r25, %r25, %t;"
    );
    for r in 0..2 {
        let _ = writeln!(
            m,
            "    lg2.approx.ftz.f32 %f1, %l{r};\n    add.f32 %f1, %f1, %m{r};\n    mul.f32 %f1, %f1, {LN2};\n    add.u32 %r26, %r25, %row{r};\n{}    @%pv{r} st.global.f32 [%rd6], %f1;",
            addr("%rd6", "%lse", "%r26")
        );
    }
    m.push_str("DONE:\n    ret;\n}\n\n");
}

/// Every kernel the module defines, for lookup at load time.
pub const KERNELS: &[&str] = &[
    "k_fill",
    "k_scale",
    "k_relu2",
    "k_relu2_bwd",
    "k_round_bf16",
    "k_scale_copy",
    "k_axpby",
    "k_muon_momentum",
    "k_adamw",
    "k_to_bf16",
    "k_to_bf16_x4",
    "k_frob_scale",
    "k_copy_rows",
    "k_gather_rows",
    "k_scatter_rows",
    "k_rope",
    "k_transpose",
    "k_heads_to_bhtd_f32",
    "k_heads_to_bhtd_bf16",
    "k_bhtd_to_heads",
    "k_rmsnorm",
    "k_rmsnorm_bwd",
    "k_softcap_ce",
    "k_reduce_partial",
    "k_reduce_final",
    "k_scatter_add_sorted",
    "k_attn_softmax",
    "k_attn_softmax_bwd",
    "k_attn_row_dot",
    "k_attn_decode",
    "k_flash_fwd_d64",
    "k_flash_bwd_kv_d64",
    "k_flash_bwd_q_d64",
    "k_flash_fwd_d128",
    "k_flash_bwd_kv_d128",
    "k_flash_bwd_q_d128",
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_module_defines_every_kernel_once_and_nothing_else() {
        let src = module_source();
        let entries: Vec<&str> = src
            .lines()
            .filter_map(|l| l.strip_prefix(".visible .entry "))
            .map(|l| l.trim_end_matches('('))
            .collect();
        assert_eq!(entries, KERNELS);
        // Every `{` closes; every branch target is a label of its kernel.
        assert_eq!(src.matches('{').count(), src.matches('}').count());
        for kernel in src.split(".visible .entry ").skip(1) {
            let labels: Vec<&str> = kernel
                .lines()
                .filter_map(|l| l.strip_suffix(':'))
                .filter(|l| !l.starts_with(' '))
                .collect();
            for l in kernel.lines().filter_map(|l| l.split("bra ").nth(1)) {
                let target = l.trim_end_matches(';');
                assert!(
                    labels.contains(&target),
                    "branch to {target} without a label"
                );
            }
        }
    }

    /// Assembles the module with `ptxas` when one is installed (`NANOCHAT_PTXAS` or on PATH):
    /// the check that the text is valid PTX, on machines without a GPU.
    #[test]
    fn ptxas_accepts_the_module() {
        let ptxas = std::env::var("NANOCHAT_PTXAS").unwrap_or_else(|_| "ptxas".into());
        let dir = std::env::temp_dir().join(format!("nanochat-ptx-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let src = dir.join("module.ptx");
        std::fs::write(&src, module_source()).unwrap();
        if let Ok(copy) = std::env::var("NANOCHAT_PTX_DUMP") {
            // For reading the generated text (and `ptxas -v` register counts) by hand.
            std::fs::copy(&src, copy).unwrap();
        }
        let out = std::process::Command::new(&ptxas)
            .args(["-arch=sm_90", "-o"])
            .arg(dir.join("module.cubin"))
            .arg(&src)
            .output();
        match out {
            Err(_) => eprintln!("notice: no ptxas ({ptxas}); set NANOCHAT_PTXAS to check the PTX"),
            Ok(o) => assert!(
                o.status.success(),
                "ptxas rejected the module:\n{}",
                String::from_utf8_lossy(&o.stderr)
            ),
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
}
