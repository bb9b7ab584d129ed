//! Every op of the CUDA backend against the CPU backend on the same inputs. Element-wise and
//! optimizer ops must agree bit for bit (the kernels round as the CPU does); reductions,
//! norms and f32 GEMMs to f32 accuracy; bf16 paths to bf16 accuracy.
//!
//! Skips with a notice where no GPU can be opened. Run on a GPU machine by scripts/gpu-tests.sh.
#![cfg(feature = "cuda")]

use nanochat_compute::cuda::{Cuda, DeviceBuf};
use nanochat_compute::{
    AdamWStep, AttnShape, Backend, Cpu, DecodeShape, Gemm, Precision, WeightRef, WeightSlot,
};

fn gpu() -> Option<Cuda> {
    match Cuda::open(0) {
        Ok(g) => Some(g),
        Err(e) => {
            eprintln!("notice: CUDA tests skipped: {e}");
            None
        }
    }
}

struct Rng(u64);
impl Rng {
    fn f(&mut self) -> f32 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        ((self.0 >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }
    fn vec(&mut self, n: usize) -> Vec<f32> {
        (0..n).map(|_| self.f()).collect()
    }
    fn below(&mut self, n: usize) -> usize {
        ((self.f() + 1.0) * 0.5 * n as f32) as usize % n
    }
}

fn up(g: &Cuda, v: &[f32]) -> DeviceBuf<f32> {
    let mut b = g.alloc(v.len(), "test").unwrap();
    g.upload(v, Cuda::view_mut(&mut b)).unwrap();
    b
}

fn upi(g: &Cuda, v: &[i32]) -> DeviceBuf<i32> {
    let mut b = g.alloc_ints(v.len(), "test").unwrap();
    g.upload_ints(v, &mut b).unwrap();
    b
}

fn down(g: &Cuda, b: &DeviceBuf<f32>) -> Vec<f32> {
    let n = Cuda::len(&Cuda::view(b));
    let mut v = vec![0f32; n];
    g.download(Cuda::view(b), &mut v).unwrap();
    v
}

/// max |a−b| / max(max |b|, tiny)
fn rel(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len());
    let mut d = 0f64;
    let mut m = 1e-30f64;
    for (x, y) in a.iter().zip(b) {
        assert!(x.is_finite(), "non-finite GPU value {x}");
        d = d.max((*x as f64 - *y as f64).abs());
        m = m.max((*y as f64).abs());
    }
    d / m
}

fn assert_close(what: &str, gpu: &[f32], cpu: &[f32], tol: f64) {
    let e = rel(gpu, cpu);
    eprintln!("{what}: rel err {e:.3e}");
    assert!(
        e <= tol,
        "{what}: GPU differs from CPU by {e:.3e} (tolerance {tol:.1e})"
    );
}

fn assert_bits(what: &str, gpu: &[f32], cpu: &[f32]) {
    let bad = gpu
        .iter()
        .zip(cpu)
        .filter(|(a, b)| a.to_bits() != b.to_bits())
        .count();
    eprintln!("{what}: {bad} of {} differ in bits", gpu.len());
    assert_eq!(
        bad,
        0,
        "{what}: {bad} elements differ from the CPU (first: {:?})",
        gpu.iter()
            .zip(cpu)
            .find(|(a, b)| a.to_bits() != b.to_bits())
    );
}

#[test]
fn elementwise_and_optimizer_ops_match_the_cpu_bit_for_bit() {
    let Some(g) = gpu() else { return };
    let c = Cpu::new();
    let mut r = Rng(7);
    let n = 100_003;
    let x = r.vec(n);
    let y = r.vec(n);
    macro_rules! both {
        ($name:expr, |$b:ident, $xs:ident, $ys:ident| $body:expr) => {{
            let mut cx = x.clone();
            let cy = y.clone();
            {
                let $b = &c;
                let $xs = &mut cx[..];
                let $ys = &cy[..];
                $body;
            }
            let mut gx = up(&g, &x);
            let gy = up(&g, &y);
            {
                let $b = &g;
                let $xs = Cuda::view_mut(&mut gx);
                let $ys = Cuda::view(&gy);
                $body;
            }
            assert_bits($name, &down(&g, &gx), &cx);
        }};
    }
    both!("fill", |b, xs, _ys| b.fill(xs, 0.25).unwrap());
    both!("scale", |b, xs, _ys| b.scale(xs, -1.7).unwrap());
    both!("relu2_bwd", |b, xs, ys| b.relu2_bwd(xs, ys).unwrap());
    both!("round_bf16", |b, xs, _ys| b.round_bf16(xs).unwrap());
    for rnd in [false, true] {
        both!("scale_copy", |b, xs, ys| b
            .scale_copy(ys, xs, 0.37, rnd)
            .unwrap());
        both!("axpby", |b, xs, ys| b
            .axpby(xs, 0.9, ys, -2.1, rnd)
            .unwrap());
        both!("frobenius_normalize", |b, xs, _ys| b
            .frobenius_normalize(xs, 1e-7, rnd)
            .unwrap());
    }
    // relu2 writes y from x
    let mut cy = vec![0f32; n];
    c.relu2(&x, &mut cy).unwrap();
    let gx = up(&g, &x);
    let mut gy = g.alloc(n, "y").unwrap();
    g.relu2(Cuda::view(&gx), Cuda::view_mut(&mut gy)).unwrap();
    assert_bits("relu2", &down(&g, &gy), &cy);

    for (nesterov, rnd) in [(false, false), (true, false), (true, true)] {
        let mut cbuf = x.clone();
        let mut cu = vec![0f32; n];
        c.muon_momentum(&mut cbuf, &y, &mut cu, 0.95, nesterov, rnd)
            .unwrap();
        let mut gbuf = up(&g, &x);
        let gg = up(&g, &y);
        let mut gu = g.alloc(n, "u").unwrap();
        g.muon_momentum(
            Cuda::view_mut(&mut gbuf),
            Cuda::view(&gg),
            Cuda::view_mut(&mut gu),
            0.95,
            nesterov,
            rnd,
        )
        .unwrap();
        assert_bits("muon_momentum buf", &down(&g, &gbuf), &cbuf);
        assert_bits("muon_momentum update", &down(&g, &gu), &cu);
    }

    let h = AdamWStep {
        beta1: 0.8,
        beta2: 0.95,
        eps: 1e-10,
        step_size: 0.004,
        inv_bc2_sqrt: 3.1,
        decay: 0.999,
    };
    let (mut cp, mut cm, mut cv) = (x.clone(), vec![0f32; n], vec![0f32; n]);
    let (mut gp, mut gm, mut gv) = (
        up(&g, &x),
        g.alloc(n, "m").unwrap(),
        g.alloc(n, "v").unwrap(),
    );
    let gg = up(&g, &y);
    for _ in 0..3 {
        c.adamw(&mut cp, &y, &mut cm, &mut cv, h).unwrap();
        g.adamw(
            Cuda::view_mut(&mut gp),
            Cuda::view(&gg),
            Cuda::view_mut(&mut gm),
            Cuda::view_mut(&mut gv),
            h,
        )
        .unwrap();
    }
    assert_bits("adamw params", &down(&g, &gp), &cp);
    assert_bits("adamw exp_avg_sq", &down(&g, &gv), &cv);

    let sum_c = c.sum(&x).unwrap();
    let sum_g = g.sum(Cuda::view(&gx)).unwrap();
    assert!(
        (sum_c - sum_g).abs() <= 1e-9 * sum_c.abs().max(1.0),
        "sum {sum_g} vs {sum_c}"
    );
    let sq_c = c.sum_squares(&x).unwrap();
    let sq_g = g.sum_squares(Cuda::view(&gx)).unwrap();
    assert!(
        (sq_c - sq_g).abs() <= 1e-12 * sq_c,
        "sum_squares {sq_g} vs {sq_c}"
    );
    // Deterministic: the same reduction twice gives the same bits.
    assert_eq!(
        g.sum_squares(Cuda::view(&gx)).unwrap().to_bits(),
        sq_g.to_bits()
    );
}

#[test]
fn layout_ops_match_the_cpu() {
    let Some(g) = gpu() else { return };
    let c = Cpu::new();
    let mut r = Rng(11);
    let (rows, cols) = (37, 53);
    let x = r.vec(rows * cols);
    let mut ct = vec![0f32; rows * cols];
    c.transpose(&x, rows, cols, &mut ct).unwrap();
    let gx = up(&g, &x);
    let mut gt = g.alloc(rows * cols, "t").unwrap();
    g.transpose(Cuda::view(&gx), rows, cols, Cuda::view_mut(&mut gt))
        .unwrap();
    assert_bits("transpose", &down(&g, &gt), &ct);

    // copy_rows: 5 rows of 20 from stride 53 into stride 31
    let mut cd = vec![0f32; 5 * 31];
    c.copy_rows(&x, cols, &mut cd, 31, 20, 5).unwrap();
    let mut gd = g.alloc(5 * 31, "d").unwrap();
    g.copy_rows(Cuda::view(&gx), cols, Cuda::view_mut(&mut gd), 31, 20, 5)
        .unwrap();
    assert_bits("copy_rows", &down(&g, &gd), &cd);
    let mut host = vec![0f32; 5 * 20];
    g.download_rows(Cuda::view(&gx), cols, 20, &mut host)
        .unwrap();
    let mut want = vec![0f32; 5 * 20];
    c.download_rows(&x, cols, 20, &mut want).unwrap();
    assert_bits("download_rows", &host, &want);

    // gather / scatter / scatter-add with repeated indices
    let dim = 24;
    let table = r.vec(50 * dim);
    let idx: Vec<i32> = (0..300).map(|_| r.below(50) as i32).collect();
    let src = r.vec(300 * dim);
    let (gtab, gidx, gsrc) = (up(&g, &table), upi(&g, &idx), up(&g, &src));
    let mut cout = vec![0f32; 300 * dim];
    c.gather_rows(&table, dim, &idx, &mut cout).unwrap();
    let mut gout = g.alloc(300 * dim, "out").unwrap();
    g.gather_rows(
        Cuda::view(&gtab),
        dim,
        Cuda::iview(&gidx),
        Cuda::view_mut(&mut gout),
    )
    .unwrap();
    assert_bits("gather_rows", &down(&g, &gout), &cout);
    let mut ctab = table.clone();
    c.scatter_add_rows(&src, dim, &idx, &mut ctab).unwrap();
    let mut gtab2 = up(&g, &table);
    g.scatter_add_rows(
        Cuda::view(&gsrc),
        dim,
        Cuda::iview(&gidx),
        Cuda::view_mut(&mut gtab2),
    )
    .unwrap();
    assert_bits("scatter_add_rows", &down(&g, &gtab2), &ctab);
    let distinct: Vec<i32> = (0..20).map(|i| i * 7 % 50).collect();
    let s20 = r.vec(20 * dim);
    let mut ctab = table.clone();
    c.scatter_rows(&s20, dim, &distinct, &mut ctab).unwrap();
    let mut gtab3 = up(&g, &table);
    let (gd20, gs20) = (upi(&g, &distinct), up(&g, &s20));
    g.scatter_rows(
        Cuda::view(&gs20),
        dim,
        Cuda::iview(&gd20),
        Cuda::view_mut(&mut gtab3),
    )
    .unwrap();
    assert_bits("scatter_rows", &down(&g, &gtab3), &ctab);
    let bad = upi(&g, &[0, 50]);
    let two = up(&g, &r.vec(2 * dim));
    let e = g
        .scatter_add_rows(
            Cuda::view(&two),
            dim,
            Cuda::iview(&bad),
            Cuda::view_mut(&mut gtab3),
        )
        .unwrap_err()
        .to_string();
    assert!(e.contains("outside"), "{e}");
}

#[test]
fn norms_rope_and_loss_match_the_cpu() {
    let Some(g) = gpu() else { return };
    let c = Cpu::new();
    let mut r = Rng(13);
    let (rows, dim) = (33, 320);
    let x: Vec<f32> = r.vec(rows * dim).iter().map(|v| v * 3.0).collect();
    let dy = r.vec(rows * dim);
    let (mut cy, mut cr) = (vec![0f32; rows * dim], vec![0f32; rows]);
    c.rmsnorm(&x, &mut cy, &mut cr, dim).unwrap();
    let gx = up(&g, &x);
    let (mut gy, mut gr) = (
        g.alloc(rows * dim, "y").unwrap(),
        g.alloc(rows, "r").unwrap(),
    );
    g.rmsnorm(
        Cuda::view(&gx),
        Cuda::view_mut(&mut gy),
        Cuda::view_mut(&mut gr),
        dim,
    )
    .unwrap();
    assert_close("rmsnorm", &down(&g, &gy), &cy, 1e-6);
    assert_close("rmsnorm rstd", &down(&g, &gr), &cr, 1e-6);
    let mut gx2 = up(&g, &x);
    g.rmsnorm_inplace(Cuda::view_mut(&mut gx2), Cuda::view_mut(&mut gr), dim)
        .unwrap();
    assert_close("rmsnorm_inplace", &down(&g, &gx2), &cy, 1e-6);
    for acc in [false, true] {
        let mut cdx = x.clone();
        c.rmsnorm_bwd(&dy, &cy, &cr, &mut cdx, dim, acc).unwrap();
        let (gdy, gyy, grr) = (up(&g, &dy), up(&g, &cy), up(&g, &cr));
        let mut gdx = up(&g, &x);
        g.rmsnorm_bwd(
            Cuda::view(&gdy),
            Cuda::view(&gyy),
            Cuda::view(&grr),
            Cuda::view_mut(&mut gdx),
            dim,
            acc,
        )
        .unwrap();
        assert_close("rmsnorm_bwd", &down(&g, &gdx), &cdx, 1e-5);
    }
    let mut cg = dy.clone();
    c.rmsnorm_bwd_inplace(&mut cg, &cy, &cr, dim).unwrap();
    let mut gg = up(&g, &dy);
    let (gyy, grr) = (up(&g, &cy), up(&g, &cr));
    g.rmsnorm_bwd_inplace(
        Cuda::view_mut(&mut gg),
        Cuda::view(&gyy),
        Cuda::view(&grr),
        dim,
    )
    .unwrap();
    assert_close("rmsnorm_bwd_inplace", &down(&g, &gg), &cg, 1e-5);

    // rope: 4 heads of 16 per token, positions scattered
    let (heads, hd, maxpos) = (4, 16, 40);
    let cos: Vec<f32> = (0..maxpos * hd / 2)
        .map(|i| (i as f32 * 0.1).cos())
        .collect();
    let sin: Vec<f32> = (0..maxpos * hd / 2)
        .map(|i| (i as f32 * 0.1).sin())
        .collect();
    let tokens = 29;
    let pos: Vec<i32> = (0..tokens).map(|i| (i * 3 % maxpos) as i32).collect();
    let xr = r.vec(tokens * heads * hd);
    for inverse in [false, true] {
        let mut cx = xr.clone();
        c.rope(&mut cx, heads, hd, &pos, &cos, &sin, inverse)
            .unwrap();
        let mut gxr = up(&g, &xr);
        let (gp, gc, gs) = (upi(&g, &pos), up(&g, &cos), up(&g, &sin));
        g.rope(
            Cuda::view_mut(&mut gxr),
            heads,
            hd,
            Cuda::iview(&gp),
            Cuda::view(&gc),
            Cuda::view(&gs),
            inverse,
        )
        .unwrap();
        assert_bits("rope", &down(&g, &gxr), &cx);
    }

    // softcapped cross-entropy: vocab 1000 padded to 1024, some ignored rows
    let (rows, vocab, padded) = (17, 1000, 1024);
    let logits: Vec<f32> = r.vec(rows * padded).iter().map(|v| v * 20.0).collect();
    let targets: Vec<i32> = (0..rows)
        .map(|i| {
            if i % 5 == 3 {
                -1
            } else {
                r.below(vocab) as i32
            }
        })
        .collect();
    for softcap in [None, Some(15.0)] {
        for grad in [None, Some(1.0 / 13.0)] {
            let mut cl = logits.clone();
            let mut closs = vec![0f32; rows];
            c.softcap_ce(
                &mut cl, rows, vocab, padded, &targets, softcap, grad, &mut closs,
            )
            .unwrap();
            let mut gl = up(&g, &logits);
            let gt = upi(&g, &targets);
            let mut gloss = g.alloc(rows, "loss").unwrap();
            g.softcap_ce(
                Cuda::view_mut(&mut gl),
                rows,
                vocab,
                padded,
                Cuda::iview(&gt),
                softcap,
                grad,
                Cuda::view_mut(&mut gloss),
            )
            .unwrap();
            let what = format!("softcap_ce cap={softcap:?} grad={grad:?}");
            assert_close(&format!("{what} loss"), &down(&g, &gloss), &closs, 1e-5);
            assert_close(&format!("{what} logits"), &down(&g, &gl), &cl, 1e-5);
        }
    }
}

fn gemm_case(g: &Cuda, c: &Cpu, r: &mut Rng, ta: bool, tb: bool, p: Precision) {
    let (m, n, k) = (45, 70, 33);
    let a = r.vec(m * k);
    let b = r.vec(k * n);
    let c0 = r.vec(m * n);
    let spec = Gemm {
        ta,
        tb,
        m,
        n,
        k,
        alpha: 0.7,
        beta: 0.5,
        precision: p,
    };
    let mut cc = c0.clone();
    c.gemm(spec, &a, &b, &mut cc).unwrap();
    let (ga, gb) = (up(g, &a), up(g, &b));
    let mut gc = up(g, &c0);
    g.gemm(
        spec,
        Cuda::view(&ga),
        Cuda::view(&gb),
        Cuda::view_mut(&mut gc),
    )
    .unwrap();
    let tol = if p == Precision::F32 { 1e-5 } else { 1e-4 };
    assert_close(
        &format!("gemm ta={ta} tb={tb} {p}"),
        &down(g, &gc),
        &cc,
        tol,
    );
}

#[test]
fn gemms_and_linear_layers_match_the_cpu() {
    let Some(g) = gpu() else { return };
    let c = Cpu::new();
    let mut r = Rng(17);
    for p in [Precision::F32, Precision::Bf16] {
        for (ta, tb) in [(false, false), (true, false), (false, true), (true, true)] {
            gemm_case(&g, &c, &mut r, ta, tb, p);
        }
    }
    // Two weights in one flat buffer, the second at an offset.
    let layout = [
        WeightSlot {
            offset: 0,
            out: 24,
            inp: 40,
            matmul: true,
        },
        WeightSlot {
            offset: 1024,
            out: 48,
            inp: 40,
            matmul: true,
        },
    ];
    let params = r.vec(1024 + 48 * 40);
    let rows = 19;
    let x = r.vec(rows * 40);
    let dy = r.vec(rows * 48);
    let gparams = up(&g, &params);
    for p in [Precision::F32, Precision::Bf16] {
        let tol = if p == Precision::F32 { 1e-5 } else { 1e-4 };
        let mut ccache = None;
        c.update_weight_cache(&params, &layout, p, &mut ccache)
            .unwrap();
        let mut gcache = None;
        g.update_weight_cache(Cuda::view(&gparams), &layout, p, &mut gcache)
            .unwrap();
        let (ccache, gcache) = (ccache.unwrap(), gcache.unwrap());
        let cw = WeightRef::<Cpu> {
            params: &params,
            cache: &ccache,
            index: 1,
            slot: layout[1],
        };
        let gw = WeightRef::<Cuda> {
            params: Cuda::view(&gparams),
            cache: &gcache,
            index: 1,
            slot: layout[1],
        };
        let mut cy = vec![0.5f32; rows * 48];
        c.linear(cw, &x, &mut cy, rows, true, p).unwrap();
        let gx = up(&g, &x);
        let mut gy = up(&g, &vec![0.5f32; rows * 48]);
        g.linear(gw, Cuda::view(&gx), Cuda::view_mut(&mut gy), rows, true, p)
            .unwrap();
        assert_close(&format!("linear {p}"), &down(&g, &gy), &cy, tol);
        let mut cdx = vec![0f32; rows * 40];
        c.linear_bwd_input(cw, &dy, &mut cdx, rows, false, p)
            .unwrap();
        let gdy = up(&g, &dy);
        let mut gdx = g.alloc(rows * 40, "dx").unwrap();
        g.linear_bwd_input(
            gw,
            Cuda::view(&gdy),
            Cuda::view_mut(&mut gdx),
            rows,
            false,
            p,
        )
        .unwrap();
        assert_close(&format!("linear_bwd_input {p}"), &down(&g, &gdx), &cdx, tol);
        let w0 = r.vec(48 * 40);
        let mut cdw = w0.clone();
        c.linear_bwd_weight(&dy, &x, &mut cdw, rows, 48, 40, p)
            .unwrap();
        let mut gdw = up(&g, &w0);
        g.linear_bwd_weight(
            Cuda::view(&gdy),
            Cuda::view(&gx),
            Cuda::view_mut(&mut gdw),
            rows,
            48,
            40,
            p,
        )
        .unwrap();
        assert_close(
            &format!("linear_bwd_weight {p}"),
            &down(&g, &gdw),
            &cdw,
            tol,
        );
    }
}

#[test]
fn attention_forward_backward_and_decode_match_the_cpu() {
    let Some(g) = gpu() else { return };
    let c = Cpu::new();
    let mut r = Rng(19);
    for p in [Precision::F32, Precision::Bf16] {
        let s = AttnShape {
            b: 3,
            t: 67,
            h: 4,
            hk: 2,
            d: 16,
            precision: p,
        };
        let nq = s.b * s.t * s.h * s.d;
        let nk = s.b * s.t * s.hk * s.d;
        let (q, k, v, dy) = (r.vec(nq), r.vec(nk), r.vec(nk), r.vec(nq));
        let (mut cy, mut clse) = (vec![0f32; nq], vec![0f32; s.b * s.h * s.t]);
        c.attention(s, &q, &k, &v, &mut cy, &mut clse).unwrap();
        let (gq, gk, gv, gdy) = (up(&g, &q), up(&g, &k), up(&g, &v), up(&g, &dy));
        let (mut gy, mut glse) = (
            g.alloc(nq, "y").unwrap(),
            g.alloc(s.b * s.h * s.t, "lse").unwrap(),
        );
        g.attention(
            s,
            Cuda::view(&gq),
            Cuda::view(&gk),
            Cuda::view(&gv),
            Cuda::view_mut(&mut gy),
            Cuda::view_mut(&mut glse),
        )
        .unwrap();
        let tol = if p == Precision::F32 { 1e-5 } else { 2e-2 };
        assert_close(&format!("attention y {p}"), &down(&g, &gy), &cy, tol);
        assert_close(&format!("attention lse {p}"), &down(&g, &glse), &clse, tol);
        let (mut cdq, mut cdk, mut cdv) = (vec![0f32; nq], vec![0f32; nk], vec![0f32; nk]);
        c.attention_bwd(s, &q, &k, &v, &cy, &clse, &dy, &mut cdq, &mut cdk, &mut cdv)
            .unwrap();
        let (gyc, glc) = (up(&g, &cy), up(&g, &clse));
        let (mut gdq, mut gdk, mut gdv) = (
            g.alloc(nq, "dq").unwrap(),
            g.alloc(nk, "dk").unwrap(),
            g.alloc(nk, "dv").unwrap(),
        );
        g.attention_bwd(
            s,
            Cuda::view(&gq),
            Cuda::view(&gk),
            Cuda::view(&gv),
            Cuda::view(&gyc),
            Cuda::view(&glc),
            Cuda::view(&gdy),
            Cuda::view_mut(&mut gdq),
            Cuda::view_mut(&mut gdk),
            Cuda::view_mut(&mut gdv),
        )
        .unwrap();
        let tol = if p == Precision::F32 { 1e-4 } else { 3e-2 };
        assert_close(&format!("attention dq {p}"), &down(&g, &gdq), &cdq, tol);
        assert_close(&format!("attention dk {p}"), &down(&g, &gdk), &cdk, tol);
        assert_close(&format!("attention dv {p}"), &down(&g, &gdv), &cdv, tol);
    }

    // decode: 3 cache rows of capacity 50, 5 new tokens at assorted positions
    let ds = DecodeShape {
        h: 4,
        hk: 2,
        d: 16,
        capacity: 50,
    };
    let cache_len = 3 * ds.capacity * ds.hk * ds.d;
    let (kc, vc) = (r.vec(cache_len), r.vec(cache_len));
    let rows_: Vec<i32> = vec![0, 2, 1, 2, 0];
    let pos: Vec<i32> = vec![0, 7, 49, 8, 30];
    let q = r.vec(5 * ds.h * ds.d);
    let mut cy = vec![0f32; q.len()];
    c.attention_decode(ds, &q, &pos, &rows_, &kc, &vc, &mut cy)
        .unwrap();
    let (gq, gp, gr, gkc, gvc) = (
        up(&g, &q),
        upi(&g, &pos),
        upi(&g, &rows_),
        up(&g, &kc),
        up(&g, &vc),
    );
    let mut gy = g.alloc(q.len(), "y").unwrap();
    g.attention_decode(
        ds,
        Cuda::view(&gq),
        Cuda::iview(&gp),
        Cuda::iview(&gr),
        Cuda::view(&gkc),
        Cuda::view(&gvc),
        Cuda::view_mut(&mut gy),
    )
    .unwrap();
    assert_close("attention_decode", &down(&g, &gy), &cy, 1e-5);
}

#[test]
fn a_missing_device_index_is_a_clear_error() {
    let Some(_g) = gpu() else { return };
    let e = Cuda::open(999)
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(e.contains("CUDA device"), "{e}");
}

/// The bf16 copies of GEMM operands are reused only while their source is unchanged: a kernel
/// writing the source, a GEMM writing over it, or an upload must each give a fresh copy.
#[test]
fn bf16_operand_copies_follow_writes_to_their_source() {
    let Some(gpu) = gpu() else { return };
    let g = &gpu;
    let c = Cpu::new();
    let mut r = Rng(29);
    let (m, n, k) = (64, 48, 40);
    let spec = Gemm {
        ta: false,
        tb: false,
        m,
        n,
        k,
        alpha: 1.0,
        beta: 0.0,
        precision: Precision::Bf16,
    };
    let mut a = r.vec(m * k);
    let b = r.vec(k * n);
    // `a` lives in a larger buffer so a GEMM can write over it (unaligned tail: scalar path).
    let mut ga = up(g, &[a.clone(), vec![0.0; 3]].concat());
    let gb = up(g, &b);
    let mut gc = g.alloc(m * n, "c").unwrap();
    let check = |what: &str, g: &Cuda, ga: &DeviceBuf<f32>, gc: &mut DeviceBuf<f32>, a: &[f32]| {
        let av = Cuda::slice(Cuda::view(ga), 0..m * k);
        g.gemm(spec, av, Cuda::view(&gb), Cuda::view_mut(gc))
            .unwrap();
        let mut want = vec![0f32; m * n];
        c.gemm(spec, a, &b, &mut want).unwrap();
        assert_close(what, &down(g, gc), &want, 1e-4);
    };
    check("first use", g, &ga, &mut gc, &a);
    check("reused copy", g, &ga, &mut gc, &a);
    // A kernel writes the source.
    g.scale(Cuda::slice_mut(Cuda::view_mut(&mut ga), 0..m * k), -2.0)
        .unwrap();
    a.iter_mut().for_each(|x| *x *= -2.0);
    check("after a kernel wrote the source", g, &ga, &mut gc, &a);
    // An upload writes the source.
    a = r.vec(m * k);
    g.upload(&a, Cuda::slice_mut(Cuda::view_mut(&mut ga), 0..m * k))
        .unwrap();
    check("after an upload", g, &ga, &mut gc, &a);
    // A GEMM writes over the source's first rows: C = [m2, n] at the start of `a`.
    let (m2, k2) = (8, 40);
    let small = Gemm {
        m: m2,
        n: k,
        k: k2,
        ..spec
    };
    let x = r.vec(m2 * k2);
    let y = r.vec(k2 * k);
    let (gx, gy) = (up(g, &x), up(g, &y));
    g.gemm(
        small,
        Cuda::view(&gx),
        Cuda::view(&gy),
        Cuda::slice_mut(Cuda::view_mut(&mut ga), 0..m2 * k),
    )
    .unwrap();
    let mut head = vec![0f32; m2 * k];
    c.gemm(small, &x, &y, &mut head).unwrap();
    // The GPU's own result is the new source (bf16 products differ from the CPU's slightly).
    let now = down(g, &ga);
    assert_close("the overwriting GEMM", &now[..m2 * k], &head, 1e-4);
    a[..m2 * k].copy_from_slice(&now[..m2 * k]);
    check("after a GEMM wrote over the source", g, &ga, &mut gc, &a);
}

/// The flash-attention forward (bf16, head dims 64 and 128) against the CPU and against the
/// score-matrix path on the same GPU: sequence lengths that are and are not multiples of the
/// 64-row tile, grouped and plain heads, and inputs scaled so the softmax is peaked (the online
/// rescaling matters). The backward pass then runs on the flash kernel's y and lse.
#[test]
fn flash_attention_matches_the_cpu_and_the_score_matrix_path() {
    let Some(g) = gpu() else { return };
    let c = Cpu::new();
    let mut r = Rng(31);
    for (b, t, h, hk, d, amp) in [
        (2, 200, 4, 2, 128, 1.0f32),
        (1, 64, 2, 2, 128, 4.0),
        (3, 131, 4, 4, 64, 3.0),
        (1, 1, 2, 1, 64, 1.0),
    ] {
        let s = AttnShape {
            b,
            t,
            h,
            hk,
            d,
            precision: Precision::Bf16,
        };
        let what = format!("flash b{b} t{t} h{h}/{hk} d{d}");
        let nq = b * t * h * d;
        let nk = b * t * hk * d;
        let scaled =
            |r: &mut Rng, n: usize| -> Vec<f32> { r.vec(n).iter().map(|x| x * amp).collect() };
        let (q, k, v, dy) = (scaled(&mut r, nq), scaled(&mut r, nk), r.vec(nk), r.vec(nq));
        let (mut cy, mut clse) = (vec![0f32; nq], vec![0f32; b * h * t]);
        c.attention(s, &q, &k, &v, &mut cy, &mut clse).unwrap();
        let (gq, gk, gv, gdy) = (up(&g, &q), up(&g, &k), up(&g, &v), up(&g, &dy));
        let run = |flash: bool| {
            g.set_flash_attention(flash);
            let (mut gy, mut glse) = (
                g.alloc(nq, "y").unwrap(),
                g.alloc(b * h * t, "lse").unwrap(),
            );
            g.attention(
                s,
                Cuda::view(&gq),
                Cuda::view(&gk),
                Cuda::view(&gv),
                Cuda::view_mut(&mut gy),
                Cuda::view_mut(&mut glse),
            )
            .unwrap();
            (gy, glse)
        };
        let (fy, flse) = run(true);
        let (sy, slse) = run(false);
        g.set_flash_attention(true);
        let (fyv, flv) = (down(&g, &fy), down(&g, &flse));
        assert_close(&format!("{what} y vs cpu"), &fyv, &cy, 2e-2);
        assert_close(&format!("{what} lse vs cpu"), &flv, &clse, 1e-2);
        assert_close(&format!("{what} y vs scores"), &fyv, &down(&g, &sy), 2e-2);
        assert_close(
            &format!("{what} lse vs scores"),
            &flv,
            &down(&g, &slse),
            1e-2,
        );
        let (mut cdq, mut cdk, mut cdv) = (vec![0f32; nq], vec![0f32; nk], vec![0f32; nk]);
        c.attention_bwd(s, &q, &k, &v, &cy, &clse, &dy, &mut cdq, &mut cdk, &mut cdv)
            .unwrap();
        let (mut gdq, mut gdk, mut gdv) = (
            g.alloc(nq, "dq").unwrap(),
            g.alloc(nk, "dk").unwrap(),
            g.alloc(nk, "dv").unwrap(),
        );
        g.attention_bwd(
            s,
            Cuda::view(&gq),
            Cuda::view(&gk),
            Cuda::view(&gv),
            Cuda::view(&fy),
            Cuda::view(&flse),
            Cuda::view(&gdy),
            Cuda::view_mut(&mut gdq),
            Cuda::view_mut(&mut gdk),
            Cuda::view_mut(&mut gdv),
        )
        .unwrap();
        assert_close(&format!("{what} dq"), &down(&g, &gdq), &cdq, 3e-2);
        assert_close(&format!("{what} dk"), &down(&g, &gdk), &cdk, 3e-2);
        assert_close(&format!("{what} dv"), &down(&g, &gdv), &cdv, 3e-2);
    }
}
