//! CPU paths: run-time detection, the `#[target_feature]` instantiations of the block
//! kernel, and the only `unsafe` code of the crate.
//!
//! Following matrixmultiply, the kernel body (`block::q_block`) is written once in safe,
//! `#[inline(always)]` Rust over fixed-size register tiles; each function below compiles
//! it with one set of CPU features so that the compiler emits AVX-512, AVX2+FMA or
//! baseline (SSE2 on x86-64) vector code. [`CpuPath::detect`] picks the best one the CPU
//! has; the environment variable `ATTENTION_CPU_PATH` (`portable`, `avx2`, `avx512`) or
//! [`AttentionOptions::with_cpu_path`](crate::AttentionOptions::with_cpu_path) forces one,
//! which is how the tests run every path.

use std::any::Any;
use std::sync::OnceLock;

use super::{Job, Scratch, block};
use crate::{AttentionError, Element};

/// A compiled variant of the kernel, chosen by CPU features.
///
/// # Example
/// ```
/// use attention_core::CpuPath;
/// let best = CpuPath::detect();
/// assert!(best.is_supported());
/// assert!(CpuPath::supported().contains(&CpuPath::Portable));
/// ```
#[non_exhaustive]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum CpuPath {
    /// Plain Rust, compiled for the target's baseline (SSE2 on x86-64); runs everywhere.
    Portable,
    /// x86-64 with AVX2 and FMA (256-bit vectors, fused multiply-add).
    Avx2,
    /// x86-64 with AVX-512F (512-bit vectors).
    Avx512,
}

impl CpuPath {
    /// Whether this CPU can run the path.
    #[must_use]
    pub fn is_supported(self) -> bool {
        match self {
            CpuPath::Portable => true,
            #[cfg(target_arch = "x86_64")]
            CpuPath::Avx2 => {
                std::arch::is_x86_feature_detected!("avx2")
                    && std::arch::is_x86_feature_detected!("fma")
            }
            #[cfg(target_arch = "x86_64")]
            CpuPath::Avx512 => {
                std::arch::is_x86_feature_detected!("avx512f")
                    && std::arch::is_x86_feature_detected!("avx2")
                    && std::arch::is_x86_feature_detected!("fma")
            }
            #[cfg(not(target_arch = "x86_64"))]
            _ => false,
        }
    }

    /// Every path this CPU can run, slowest first.
    #[must_use]
    pub fn supported() -> Vec<CpuPath> {
        [CpuPath::Portable, CpuPath::Avx2, CpuPath::Avx512]
            .into_iter()
            .filter(|p| p.is_supported())
            .collect()
    }

    /// The path calls use by default: the one `ATTENTION_CPU_PATH` names if it is set
    /// and supported, else the fastest supported. Read once per process.
    #[must_use]
    pub fn detect() -> CpuPath {
        static DETECTED: OnceLock<CpuPath> = OnceLock::new();
        *DETECTED.get_or_init(|| {
            let forced = std::env::var("ATTENTION_CPU_PATH").ok().and_then(|name| {
                match name.to_ascii_lowercase().as_str() {
                    "portable" => Some(CpuPath::Portable),
                    "avx2" => Some(CpuPath::Avx2),
                    "avx512" => Some(CpuPath::Avx512),
                    _ => None,
                }
            });
            match forced {
                Some(p) if p.is_supported() => p,
                _ => *CpuPath::supported().last().unwrap_or(&CpuPath::Portable),
            }
        })
    }

    /// `Ok(self)` if supported, else the typed error.
    pub(crate) fn check(self) -> Result<CpuPath, AttentionError> {
        if self.is_supported() {
            Ok(self)
        } else {
            Err(AttentionError::UnsupportedCpuPath { path: self })
        }
    }
}

type BlockFn<T> = fn(
    &Job<'_, T>,
    usize,
    &mut Scratch<T>,
    &mut [&mut [T]],
    &mut [T],
) -> Result<(), AttentionError>;

/// One instantiation of the block kernel with its tile sizes.
pub(crate) struct Kernel<T: Element> {
    /// Keys per register tile of `Sᵀ` (and per packed K panel).
    pub mr: usize,
    /// Queries per block (a multiple of the register tile's lanes).
    pub bq: usize,
    /// Keys per online-softmax step.
    pub bk: usize,
    /// Value columns per register tile of `Oᵀ`.
    pub mrv: usize,
    pub block: BlockFn<T>,
}

impl<T: Element> Clone for Kernel<T> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<T: Element> Copy for Kernel<T> {}

/// Declares one kernel instantiation as a `static Kernel`: a `#[target_feature]` function
/// compiling the body with `$features`, and a safe entry point that calls it.
macro_rules! simd_kernel {
    ($kernel:ident: $t:ty, $features:literal, mr = $mr:literal, nr = $nr:literal,
     bq = $bq:literal, bk = $bk:literal, mrv = $mrv:literal) => {
        #[cfg(target_arch = "x86_64")]
        static $kernel: Kernel<$t> = {
            #[target_feature(enable = $features)]
            fn compiled(
                job: &Job<'_, $t>,
                qb: usize,
                scratch: &mut Scratch<$t>,
                cols: &mut [&mut [$t]],
                lse: &mut [$t],
            ) -> Result<(), AttentionError> {
                block::q_block::<$t, true, $mr, $nr, $bq, $mrv>(job, qb, scratch, cols, lse)
            }
            fn entry(
                job: &Job<'_, $t>,
                qb: usize,
                scratch: &mut Scratch<$t>,
                cols: &mut [&mut [$t]],
                lse: &mut [$t],
            ) -> Result<(), AttentionError> {
                // SAFETY: this kernel is only reachable through `Kernel::select`, which
                // returns it only for a `CpuPath` whose `is_supported()` is true, i.e. on
                // a CPU with every feature in `$features`.
                unsafe { compiled(job, qb, scratch, cols, lse) }
            }
            assert!($bq % $nr == 0 && $bk % $mr == 0);
            Kernel {
                mr: $mr,
                bq: $bq,
                bk: $bk,
                mrv: $mrv,
                block: entry,
            }
        };
    };
}

/// Declares the portable kernel: the same body, no target features, no FMA.
macro_rules! portable_kernel {
    ($kernel:ident: $t:ty, mr = $mr:literal, nr = $nr:literal, bq = $bq:literal,
     bk = $bk:literal, mrv = $mrv:literal) => {
        static $kernel: Kernel<$t> = {
            fn entry(
                job: &Job<'_, $t>,
                qb: usize,
                scratch: &mut Scratch<$t>,
                cols: &mut [&mut [$t]],
                lse: &mut [$t],
            ) -> Result<(), AttentionError> {
                block::q_block::<$t, false, $mr, $nr, $bq, $mrv>(job, qb, scratch, cols, lse)
            }
            assert!($bq % $nr == 0 && $bk % $mr == 0);
            Kernel {
                mr: $mr,
                bq: $bq,
                bk: $bk,
                mrv: $mrv,
                block: entry,
            }
        };
    };
}

// Tile sizes: `mr × nr` accumulators must fit the register file (32 zmm / 16 ymm / 16 xmm)
// with room for the loaded operands.
simd_kernel!(AVX512_F32: f32, "avx512f,avx2,fma", mr = 8, nr = 32, bq = 64, bk = 64, mrv = 8);
simd_kernel!(AVX512_F64: f64, "avx512f,avx2,fma", mr = 8, nr = 16, bq = 32, bk = 64, mrv = 8);
simd_kernel!(AVX2_F32: f32, "avx2,fma", mr = 6, nr = 16, bq = 64, bk = 60, mrv = 6);
simd_kernel!(AVX2_F64: f64, "avx2,fma", mr = 6, nr = 8, bq = 32, bk = 60, mrv = 6);
portable_kernel!(PORTABLE_F32: f32, mr = 4, nr = 8, bq = 32, bk = 64, mrv = 4);
portable_kernel!(PORTABLE_F64: f64, mr = 4, nr = 4, bq = 16, bk = 64, mrv = 4);

impl<T: Element> Kernel<T> {
    /// The kernel for element type `T` on `path`. The caller has checked that the CPU
    /// supports `path` (an unsupported path falls back to the portable kernel).
    pub(crate) fn select(path: CpuPath) -> Kernel<T> {
        let path = if path.is_supported() {
            path
        } else {
            CpuPath::Portable
        };
        let (k32, k64): (&Kernel<f32>, &Kernel<f64>) = match path {
            #[cfg(target_arch = "x86_64")]
            CpuPath::Avx512 => (&AVX512_F32, &AVX512_F64),
            #[cfg(target_arch = "x86_64")]
            CpuPath::Avx2 => (&AVX2_F32, &AVX2_F64),
            _ => (&PORTABLE_F32, &PORTABLE_F64),
        };
        // `Element` is sealed to f32 and f64, so exactly one downcast succeeds.
        let any32: &dyn Any = k32;
        let any64: &dyn Any = k64;
        *any32
            .downcast_ref::<Kernel<T>>()
            .or_else(|| any64.downcast_ref::<Kernel<T>>())
            .expect("Element is implemented only for f32 and f64")
    }
}
