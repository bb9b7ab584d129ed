//! Which kernel each op family runs on this CPU, chosen once per process.
//!
//! Features decide most of it: AVX-512F or AVX2+FMA for the f32 GEMM (trueno's BLIS kernels)
//! and the decode GEMV, AVX-512 BF16 for the bf16 micro-kernel. What features do not tell is
//! whether the bf16 GEMM is *faster* than f32: on Zen 4 `VDPBF16PS` has twice the FLOP rate of
//! an f32 FMA, on an Intel Xeon with AVX-512 BF16 but no AMX it has none (issue 18 measured
//! bf16 at 0.85x f32 there), and the bf16 path also pays a rounding pass while packing. So
//! where the bf16 kernel exists a short calibration (a few ms: the same prepacked-weight GEMM
//! in both precisions, best of a few alternating runs) decides, and a request for bf16 matmuls
//! on a CPU where they lose falls back to f32 with one warning. AMX tiles are detected and
//! reported; no AMX kernel exists yet, so such CPUs take the AVX-512 BF16 path.
//!
//! The decision logic ([`choose`], [`resolve_precision`]) is pure over [`CpuFeatures`] and a
//! [`Calibration`] so that it is tested with made-up machines; [`kernel_choice`] feeds it the
//! real CPU once.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::OnceLock;
use std::time::Instant;

use super::bf16::{self, GemmOpts, Op, PackedB};
use super::kernels;
use crate::Precision;

/// The instruction-set features the CPU kernels care about.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CpuFeatures {
    /// AVX2 with FMA (Haswell / Zen 1 and later).
    pub avx2_fma: bool,
    /// AVX-512 Foundation.
    pub avx512f: bool,
    /// AVX-512 BF16 (`VDPBF16PS`), with AVX-512BW for the packing loads.
    pub avx512_bf16: bool,
    /// AMX tiles with bf16 (Sapphire Rapids and later).
    pub amx_bf16: bool,
}

impl CpuFeatures {
    /// This CPU's features (`NANOCHAT_PORTABLE_BF16=1` hides AVX-512 BF16, as the bf16 module
    /// does, so that the report matches the kernel that runs).
    pub fn detect() -> Self {
        #[cfg(target_arch = "x86_64")]
        {
            use std::arch::is_x86_feature_detected as has;
            CpuFeatures {
                avx2_fma: kernels::has_avx2(),
                avx512f: has!("avx512f") && has!("fma"),
                avx512_bf16: bf16::has_avx512_bf16(),
                amx_bf16: amx_bf16_in_cpuid(),
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            CpuFeatures::default()
        }
    }

    /// The features as `lscpu` spells them, for reports.
    pub fn names(&self) -> String {
        let mut v = Vec::new();
        if self.avx2_fma {
            v.push("avx2+fma");
        }
        if self.avx512f {
            v.push("avx512f");
        }
        if self.avx512_bf16 {
            v.push("avx512_bf16");
        }
        if self.amx_bf16 {
            v.push("amx_bf16");
        }
        if v.is_empty() {
            "none".into()
        } else {
            v.join(" ")
        }
    }
}

/// AMX-TILE and AMX-BF16 in CPUID leaf 7 (EDX bits 24 and 22). Read directly: std's detection
/// of the AMX features is still unstable. Only reported (no AMX kernel runs), so the OS-side
/// permission (`arch_prctl(ARCH_REQ_XCOMP_PERM)`) is not requested.
#[cfg(target_arch = "x86_64")]
fn amx_bf16_in_cpuid() -> bool {
    use std::arch::x86_64::{__cpuid, __cpuid_count};
    // SAFETY: CPUID exists on every x86_64 CPU; leaf 7 is read only when leaf 0 lists it.
    #[allow(unused_unsafe)]
    let edx = unsafe {
        if __cpuid(0).eax < 7 {
            return false;
        }
        __cpuid_count(7, 0).edx
    };
    edx & (1 << 24) != 0 && edx & (1 << 22) != 0
}

/// The f32 GEMM's micro-kernel (trueno's BLIS dispatch, mirrored here to report it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum F32Gemm {
    /// 8×16 zmm tiles.
    Avx512,
    /// 8×8 ymm tiles.
    Avx2,
    /// Scalar loops.
    Portable,
}

/// The bf16 GEMM's kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Bf16Gemm {
    /// The 14×32 `VDPBF16PS` micro-kernel.
    Avx512Bf16,
    /// Round to bf16, then the f32 GEMM (same numerics, never faster than f32).
    Portable,
}

/// The decode GEMV's inner product (f32 weights, or bf16 weight rows widened on the fly,
/// streamed once per token).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Gemv {
    /// ymm FMAs, one weight row after the other. Also where AVX-512F exists: the loop is
    /// memory-bound, and a zmm variant measured no faster on Zen 4.
    Avx2,
    /// Auto-vectorized baseline loop.
    Portable,
}

/// GFLOP/s of the same GEMM in both precisions, measured in this process.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Calibration {
    /// f32 GEMM.
    pub f32_gflops: f64,
    /// bf16 GEMM (operand rounding included, as training runs it).
    pub bf16_gflops: f64,
}

impl Calibration {
    /// bf16 throughput over f32.
    pub fn ratio(&self) -> f64 {
        self.bf16_gflops / self.f32_gflops.max(1e-9)
    }
}

/// What runs on this CPU, and why.
#[derive(Debug, Clone, PartialEq)]
pub struct KernelChoice {
    /// The features the choice was made from.
    pub features: CpuFeatures,
    /// f32 GEMM kernel.
    pub f32_gemm: F32Gemm,
    /// bf16 GEMM kernel.
    pub bf16_gemm: Bf16Gemm,
    /// Decode GEMV kernel.
    pub gemv: Gemv,
    /// The calibration, when one ran (only where features leave bf16 vs f32 open).
    pub calibration: Option<Calibration>,
    /// Whether bf16 matmuls beat f32 here (a bf16 request is honoured only then).
    pub bf16_faster: bool,
}

/// bf16 must beat f32 by this factor to be kept: a tie is noise on a shared machine, and f32
/// is the reference's numerics, so ties go to f32.
const BF16_MIN_GAIN: f64 = 1.05;

/// The choice for a CPU with `features`; `calibrate` runs only when the bf16 kernel exists
/// (without it bf16 is the f32 GEMM plus a rounding pass: slower by construction).
pub fn choose(features: CpuFeatures, calibrate: impl FnOnce() -> Calibration) -> KernelChoice {
    let f32_gemm = if features.avx512f {
        F32Gemm::Avx512
    } else if features.avx2_fma {
        F32Gemm::Avx2
    } else {
        F32Gemm::Portable
    };
    let gemv = if features.avx2_fma {
        Gemv::Avx2
    } else {
        Gemv::Portable
    };
    let (bf16_gemm, calibration) = if features.avx512_bf16 {
        (Bf16Gemm::Avx512Bf16, Some(calibrate()))
    } else {
        (Bf16Gemm::Portable, None)
    };
    let bf16_faster = calibration.is_some_and(|c| c.ratio() >= BF16_MIN_GAIN);
    KernelChoice {
        features,
        f32_gemm,
        bf16_gemm,
        gemv,
        calibration,
        bf16_faster,
    }
}

impl KernelChoice {
    /// One line per op family: which path and why (`nanochat info`, the benches).
    pub fn report(&self) -> Vec<String> {
        let f = &self.features;
        let f32_line = match self.f32_gemm {
            F32Gemm::Avx512 => "gemm f32: trueno BLIS avx512f 8x16 micro-kernel (avx512f present)",
            F32Gemm::Avx2 => "gemm f32: trueno BLIS avx2 8x8 micro-kernel (avx2+fma, no avx512f)",
            F32Gemm::Portable => "gemm f32: portable loops (no avx2+fma)",
        };
        let bf16_line = match (self.bf16_gemm, self.calibration) {
            (Bf16Gemm::Avx512Bf16, Some(c)) => format!(
                "gemm bf16: avx512_bf16 14x32 micro-kernel (calibrated {:.2}x f32: {:.0} vs {:.0} GFLOP/s) -> {}",
                c.ratio(),
                c.bf16_gflops,
                c.f32_gflops,
                if self.bf16_faster {
                    "bf16 requests honoured"
                } else {
                    "bf16 requests fall back to f32"
                }
            ),
            _ => "gemm bf16: portable (no avx512_bf16: round + f32 GEMM, slower than f32) -> bf16 requests fall back to f32".to_string(),
        };
        let amx = if f.amx_bf16 {
            "amx: amx_bf16 present, no AMX kernel yet (bf16 takes the avx512_bf16 path)"
        } else {
            "amx: not present"
        };
        let gemv = match self.gemv {
            Gemv::Avx2 => {
                "decode gemv (f32 weights, or bf16 rows with bf16 matmuls: half the bytes): \
                 avx2+fma, rows streamed by all threads (memory-bound: zmm measured no faster)"
            }
            Gemv::Portable => {
                "decode gemv (f32 weights, or bf16 rows with bf16 matmuls): portable loop"
            }
        };
        vec![
            format!("cpu features: {}", f.names()),
            f32_line.to_string(),
            bf16_line,
            amx.to_string(),
            gemv.to_string(),
        ]
    }
}

/// The precision a request for `requested` matmuls runs at, and the warning to log when it
/// differs (bf16 asked for where it is slower than f32).
pub fn resolve_precision(
    choice: &KernelChoice,
    requested: Precision,
) -> (Precision, Option<String>) {
    if requested != Precision::Bf16 || choice.bf16_faster {
        return (requested, None);
    }
    let why = match choice.calibration {
        Some(c) => format!(
            "the bf16 GEMM calibrated at {:.2}x the f32 GEMM on this CPU ({:.0} vs {:.0} GFLOP/s)",
            c.ratio(),
            c.bf16_gflops,
            c.f32_gflops
        ),
        None => "this CPU has no AVX-512 BF16, so bf16 matmuls would be the f32 GEMM plus a rounding pass".into(),
    };
    (
        Precision::F32,
        Some(format!(
            "matmul_precision = \"bf16\" falls back to f32: {why}; f32 is never slower"
        )),
    )
}

/// The kernel choice for this CPU (features detected and the calibration run on first use).
/// `NANOCHAT_CPU_BF16=on|off` skips the calibration and says which precision wins.
pub fn kernel_choice() -> &'static KernelChoice {
    static CHOICE: OnceLock<KernelChoice> = OnceLock::new();
    CHOICE.get_or_init(|| {
        let forced = std::env::var("NANOCHAT_CPU_BF16").ok();
        let mut c = choose(CpuFeatures::detect(), calibrate);
        match forced.as_deref() {
            Some("on") => c.bf16_faster = c.bf16_gemm == Bf16Gemm::Avx512Bf16,
            Some("off") => c.bf16_faster = false,
            _ => {}
        }
        c
    })
}

/// [`resolve_precision`] on this CPU, logging the fallback once per process.
pub fn effective_precision(requested: Precision) -> Precision {
    static WARNED: AtomicBool = AtomicBool::new(false);
    let (p, msg) = resolve_precision(kernel_choice(), requested);
    if let Some(msg) = msg {
        if !WARNED.swap(true, Ordering::Relaxed) {
            tracing::warn!("{msg}");
        }
    }
    p
}

/// Times the prepacked-weight GEMM training runs (`x·Wᵀ`, 256 rows against a 512×1024 weight:
/// 268 MFLOP, ~1–3 ms per run) in f32 and bf16, alternating, best of 4 each, so that a burst
/// of load from another process hits both alike.
fn calibrate() -> Calibration {
    let (m, n, k) = (256usize, 1024usize, 512usize);
    let a: Vec<f32> = (0..m * k).map(|i| ((i % 13) as f32 - 6.0) * 0.05).collect();
    let b: Vec<f32> = (0..k * n).map(|i| ((i % 11) as f32 - 5.0) * 0.05).collect();
    let mut c = vec![0f32; m * n];
    let flops = 2.0 * (m * n * k) as f64;
    let Ok(packed) = PackedB::new(Op::N, k, n, &b) else {
        return Calibration {
            f32_gflops: 1.0,
            bf16_gflops: 0.0,
        };
    };
    let opts = GemmOpts {
        accumulate: false,
        parallel: true,
    };
    let (mut best_f32, mut best_bf16) = (0f64, 0f64);
    for round in 0..5 {
        let t = Instant::now();
        let ok = kernels::gemm_set(m, n, k, &a, &b, &mut c).is_ok();
        let f = flops / t.elapsed().as_secs_f64().max(1e-9) / 1e9;
        let t = Instant::now();
        let ok = ok && bf16::gemm_bf16_prepacked_with(Op::N, m, &a, &packed, &mut c, opts).is_ok();
        let h = flops / t.elapsed().as_secs_f64().max(1e-9) / 1e9;
        if !ok {
            return Calibration {
                f32_gflops: 1.0,
                bf16_gflops: 0.0,
            };
        }
        // Round 0 warms caches, page faults and the thread pool.
        if round > 0 {
            best_f32 = best_f32.max(f);
            best_bf16 = best_bf16.max(h);
        }
    }
    std::hint::black_box(&c);
    Calibration {
        f32_gflops: best_f32,
        bf16_gflops: best_bf16,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn zen4() -> CpuFeatures {
        CpuFeatures {
            avx2_fma: true,
            avx512f: true,
            avx512_bf16: true,
            amx_bf16: false,
        }
    }

    fn cal(f32_gflops: f64, bf16_gflops: f64) -> Calibration {
        Calibration {
            f32_gflops,
            bf16_gflops,
        }
    }

    #[test]
    fn features_pick_the_f32_kernels() {
        let c = choose(zen4(), || cal(200.0, 360.0));
        assert_eq!((c.f32_gemm, c.gemv), (F32Gemm::Avx512, Gemv::Avx2));
        let avx2 = CpuFeatures {
            avx2_fma: true,
            ..CpuFeatures::default()
        };
        let c = choose(avx2, || panic!("no bf16 kernel: nothing to calibrate"));
        assert_eq!((c.f32_gemm, c.gemv), (F32Gemm::Avx2, Gemv::Avx2));
        assert_eq!(c.bf16_gemm, Bf16Gemm::Portable);
        assert!(!c.bf16_faster);
        let c = choose(CpuFeatures::default(), || panic!("no bf16 kernel"));
        assert_eq!((c.f32_gemm, c.gemv), (F32Gemm::Portable, Gemv::Portable));
    }

    #[test]
    fn calibration_decides_bf16_where_features_do_not() {
        // Zen 4: bf16 has twice the FMA rate.
        let c = choose(zen4(), || cal(200.0, 360.0));
        assert_eq!(c.bf16_gemm, Bf16Gemm::Avx512Bf16);
        assert!(c.bf16_faster);
        assert_eq!(
            resolve_precision(&c, Precision::Bf16),
            (Precision::Bf16, None)
        );
        // An Intel Xeon with AVX-512 BF16 and no AMX (issue 18: 152 vs 180 GFLOP/s).
        let c = choose(zen4(), || cal(180.2, 152.4));
        assert!(!c.bf16_faster);
        assert_eq!(resolve_precision(&c, Precision::Bf16).0, Precision::F32);
        // A tie within noise goes to f32.
        let c = choose(zen4(), || cal(200.0, 205.0));
        assert!(!c.bf16_faster);
    }

    #[test]
    fn f32_requests_are_never_changed() {
        for cal_result in [cal(200.0, 360.0), cal(200.0, 100.0)] {
            let c = choose(zen4(), || cal_result);
            assert_eq!(
                resolve_precision(&c, Precision::F32),
                (Precision::F32, None)
            );
        }
    }

    #[test]
    fn the_fallback_message_says_why() {
        let c = choose(zen4(), || cal(180.2, 152.4));
        let (p, msg) = resolve_precision(&c, Precision::Bf16);
        assert_eq!(p, Precision::F32);
        let msg = msg.expect("a fallback is announced");
        assert!(msg.contains("falls back to f32"), "{msg}");
        assert!(msg.contains("0.85x"), "{msg}");
        assert!(msg.contains("152 vs 180"), "{msg}");

        let no_bf16 = CpuFeatures {
            avx2_fma: true,
            avx512f: true,
            ..CpuFeatures::default()
        };
        let c = choose(no_bf16, || panic!("no bf16 kernel"));
        let msg = resolve_precision(&c, Precision::Bf16).1.expect("announced");
        assert!(msg.contains("no AVX-512 BF16"), "{msg}");
    }

    #[test]
    fn the_report_names_every_op_family() {
        let amx = CpuFeatures {
            amx_bf16: true,
            ..zen4()
        };
        let r = choose(amx, || cal(200.0, 320.0)).report().join("\n");
        assert!(r.contains("gemm f32: trueno BLIS avx512f"), "{r}");
        assert!(r.contains("gemm bf16: avx512_bf16"), "{r}");
        assert!(r.contains("calibrated 1.60x f32"), "{r}");
        assert!(r.contains("bf16 requests honoured"), "{r}");
        assert!(r.contains("amx_bf16 present, no AMX kernel"), "{r}");
        assert!(r.contains("decode gemv (f32 weights, or bf16 rows"), "{r}");
        let r = choose(zen4(), || cal(200.0, 150.0)).report().join("\n");
        assert!(r.contains("bf16 requests fall back to f32"), "{r}");
    }

    #[test]
    fn the_real_cpu_gets_a_consistent_choice() {
        let c = kernel_choice();
        assert_eq!(c.features, CpuFeatures::detect());
        assert_eq!(c.calibration.is_some(), c.features.avx512_bf16);
        if let Some(cal) = c.calibration {
            assert!(cal.f32_gflops > 0.0 && cal.bf16_gflops > 0.0, "{cal:?}");
        }
        // Whatever was chosen, a bf16 request resolves to something that is not slower.
        let p = effective_precision(Precision::Bf16);
        assert_eq!(p == Precision::Bf16, c.bf16_faster);
    }
}
