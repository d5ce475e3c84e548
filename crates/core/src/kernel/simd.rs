//! The kernels of the CPU paths ([`CpuPath`], chosen in `cpu.rs`): the
//! `#[target_feature]` instantiations of the block kernel, and all the `unsafe` code of
//! the kernel (the crate's only other is `view.rs`).
//!
//! The block kernel (`block::q_group`) is written once, generic over its four inner loops
//! ([`MicroKernels`]). Here those loops are written once ([`Simd`]), generic over a small
//! set of vector operations ([`Lanes`]) implemented three times, in f32 and f64: with
//! `std::arch` intrinsics for AVX-512 and for AVX2+FMA, each combination compiled inside a
//! `#[target_feature]` function so that everything inlines into straight vector code; and
//! with plain arrays for the portable path (what the compiler vectorises for the target's
//! baseline). [`CpuPath::detect`] picks the best path the CPU has; the environment variable `ATTENTION_CPU_PATH` (`portable`, `avx2`, `avx512`) or
//! [`AttentionOptions::with_cpu_path`](crate::AttentionOptions::with_cpu_path) forces one,
//! which is how the tests run every path.

use std::marker::PhantomData;

use num_traits::Zero;

#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::*;

use super::block::{self, BiasTile, Epilogue, Factors, MicroKernels, Step, Sums};
use super::decode::{self, Group, PartFn, State};
use super::exp::ExpConsts;
#[cfg(target_arch = "x86_64")]
use super::exp::{POW2_TABLE_F32, POW2_TABLE_F64};
use super::grad::{
    self, BLOCK, Chunk, Failure, GradKernel, GradKernels, Operands, Out, RowsOf, TileScratch,
};
use super::{Job, Scratch};
use crate::columns::for_each_column;
use crate::cpu::CpuPath;
use crate::options::MatRef;
use crate::view::MatMut;
use crate::{AttentionError, Element};
use std::ops::Range;

type BlockFn<T> = fn(
    &Job<'_, T>,
    usize,
    &mut Scratch<T>,
    &mut MatMut<'_, T>,
    &mut [T],
) -> Result<(), AttentionError>;

/// One compiled variant of the block kernel with its tile sizes.
pub struct Kernel<T: Element> {
    /// Keys per packed K panel.
    pub(crate) mr: usize,
    /// Queries per block.
    pub(crate) bq: usize,
    /// Keys per online-softmax step.
    pub(crate) bk: usize,
    /// Value columns per register tile (V rows are padded to a multiple).
    pub(crate) mrv: usize,
    pub(crate) block: BlockFn<T>,
}

impl<T: Element> Clone for Kernel<T> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<T: Element> Copy for Kernel<T> {}

impl<T: Element> Kernel<T> {
    const fn of<MK: MicroKernels<T>>(block: BlockFn<T>) -> Self {
        Kernel {
            mr: MK::MR,
            bq: MK::BQ,
            bk: MK::BK,
            mrv: MK::MRV,
            block,
        }
    }
}

/// Proof that this CPU has AVX-512F, AVX2 and FMA (the features of [`CpuPath::Avx512`] and
/// of the AVX-512 kernels' `#[target_feature]`): the private field means a value can only
/// be made here, and [`Avx512::detect`] is the only code that makes one.
#[cfg(target_arch = "x86_64")]
#[derive(Clone, Copy)]
struct Avx512(());

/// Proof that this CPU has AVX2 and FMA (the features of [`CpuPath::Avx2`]); made only by
/// [`Avx2::detect`].
#[cfg(target_arch = "x86_64")]
#[derive(Clone, Copy)]
struct Avx2(());

#[cfg(target_arch = "x86_64")]
impl Avx512 {
    /// The token if [`CpuPath::Avx512`] is supported.
    fn detect() -> Option<Self> {
        CpuPath::Avx512.is_supported().then_some(Avx512(()))
    }
}

#[cfg(target_arch = "x86_64")]
impl Avx2 {
    /// The token if [`CpuPath::Avx2`] is supported.
    fn detect() -> Option<Self> {
        CpuPath::Avx2.is_supported().then_some(Avx2(()))
    }
}

/// Vector operations of one instruction set on one element type: `N` lanes of `T` in a
/// register (`std::arch` intrinsics for AVX-512 and AVX2+FMA) or in a plain array (the
/// portable lanes, which the compiler vectorises for the target's baseline).
///
/// # Safety
/// An implementation promises that a value of [`Lanes::Features`] exists only on a CPU
/// that can run its methods: the SIMD micro-kernels ([`Simd`]) are safe functions that
/// call the methods given such a value. The methods themselves are `unsafe`: they require
/// the CPU features of the implementing type (AVX-512F, or AVX2 and FMA; none for the
/// portable lanes), and pointer arguments valid for `N` elements (unaligned is fine).
unsafe trait Lanes {
    /// The token that proves the CPU has this instruction set ([`Avx512`], [`Avx2`]; `()`
    /// for the portable lanes, which need nothing beyond the target's baseline).
    type Features: Copy;
    type T: ExpConsts;
    type V: Copy;
    /// Lanes per vector.
    const N: usize;
    /// The f64 vectors of the same instruction set (`Self` for f64): the kernels' running
    /// sums are kept in f64 (see "Accuracy" in `block.rs`).
    type W: Lanes<T = f64>;
    /// How many `W` vectors one vector widens to: `N = PARTS · W::N` (2 for f32, 1 for f64).
    const PARTS: usize;
    /// Whether [`exp_v`] evaluates f64's 8-term polynomial by Estrin's scheme (2 more
    /// multiplications, a dependent chain of 3 FMAs after `r⁴` instead of 7) rather than
    /// by Horner. Measured on Zen 4 (`docs/PERFORMANCE.md`, "AVX2 f64: longer value tiles
    /// and a shorter chain"): about 2% faster on AVX2, whose 16 registers hold few
    /// exponentials in flight, and about 1% slower on AVX-512, whose 32 hide Horner's
    /// chain; so AVX2 f64 only.
    const ESTRIN: bool = false;
    /// Lanes `k·W::N ..` of `v` (`k < PARTS`) widened to f64, exactly.
    unsafe fn widen(v: Self::V, k: usize) -> <Self::W as Lanes>::V;
    unsafe fn splat(x: Self::T) -> Self::V;
    unsafe fn load(p: *const Self::T) -> Self::V;
    unsafe fn store(p: *mut Self::T, v: Self::V);
    unsafe fn add(a: Self::V, b: Self::V) -> Self::V;
    unsafe fn sub(a: Self::V, b: Self::V) -> Self::V;
    unsafe fn mul(a: Self::V, b: Self::V) -> Self::V;
    unsafe fn div(a: Self::V, b: Self::V) -> Self::V;
    /// `a·b + c`: fused on the SIMD paths, a multiplication then an addition on the
    /// portable one (the baseline has no FMA instruction).
    unsafe fn fma(a: Self::V, b: Self::V, c: Self::V) -> Self::V;
    /// `a` where `a > b`, else `b`.
    unsafe fn max(a: Self::V, b: Self::V) -> Self::V;
    /// Lane-wise 2^(k/N) from `t = k + SHIFT` (N = 16 for f32, 8 for f64): the table entry
    /// for `k mod N` picked by a permutation across the register, plus `k`'s bits shifted
    /// into place (see `exp.rs`, `ExpConsts::pow2_table`).
    unsafe fn pow2_table(t: Self::V) -> Self::V;
    /// `y` where `x ≥ cutoff`, 0 elsewhere.
    unsafe fn zero_below(x: Self::V, cutoff: Self::V, y: Self::V) -> Self::V;
    /// `x` where `a < b`, `y` elsewhere (ordered: `y` where either is NaN).
    unsafe fn select_lt(a: Self::V, b: Self::V, x: Self::V, y: Self::V) -> Self::V;
}

/// `exp` lane by lane for arguments ≤ 0 or −∞, on every path (see `exp.rs` for the
/// method, its constants and its accuracy).
#[inline(always)]
unsafe fn exp_v<L: Lanes>(x: L::V) -> L::V {
    // SAFETY: the caller guarantees the CPU features of `L`.
    unsafe {
        let cutoff = L::splat(L::T::CUTOFF);
        let xc = L::max(x, cutoff);
        let shift = L::splat(L::T::SHIFT);
        let t = L::fma(xc, L::splat(L::T::LOG2E_N), shift);
        let k = L::sub(t, shift);
        let r = L::fma(k, L::splat(-L::T::LN2_HI_N), xc);
        let r = L::fma(k, L::splat(-L::T::LN2_LO_N), r);
        let c = L::T::TABLE_COEFFS;
        // q(r) by Horner is a chain of dependent FMAs (7 for f64: 28 cycles on Zen 4);
        // where `L::ESTRIN` (AVX2 f64), by Estrin's scheme (error unchanged: `exp.rs`).
        let p = if L::ESTRIN && c.len() == 8 {
            let r2 = L::mul(r, r);
            let r4 = L::mul(r2, r2);
            let a3 = L::fma(L::splat(c[0]), r, L::splat(c[1]));
            let a2 = L::fma(L::splat(c[2]), r, L::splat(c[3]));
            let a1 = L::fma(L::splat(c[4]), r, L::splat(c[5]));
            let a0 = L::fma(L::splat(c[6]), r, L::splat(c[7]));
            let b1 = L::fma(a3, r2, a2);
            let b0 = L::fma(a1, r2, a0);
            L::fma(b1, r4, b0)
        } else {
            let mut p = L::splat(c[0]);
            for &ci in &c[1..] {
                p = L::fma(p, r, L::splat(ci));
            }
            p
        };
        // e^r − 1 = r·p; 2^(k/N)·e^r = scale + scale·(e^r − 1), rounded once.
        let scale = L::pow2_table(t);
        L::zero_below(x, cutoff, L::fma(scale, L::mul(p, r), scale))
    }
}

/// `tanh` lane by lane, for finite `x`: the method of `exp.rs`'s scalar [`tanh`]
/// (`x + x·z·P(z)` below 0.625, `±(1 − e)/(1 + e)` with `e = exp(−2|x|)` above), with fused
/// multiply-adds and the block kernel's [`exp_v`]: the softcap of the block kernel
/// (`MicroKernels::softcap`). The scalar form, without fused operations, serves the other
/// callers (decoding, the careful path, the backward pass); the two differ by rounding
/// only (`vector_tanh_within_3_ulp_on_every_path`). ±0 gives +0.
///
/// # Safety
/// The CPU must have `L`'s features.
///
/// [`tanh`]: super::exp::tanh
///
/// With `SMALL_ONLY` the caller knows every `|x|` is below `TANH_SMALL`: the result is the
/// same, without computing the other branch.
#[inline(always)]
unsafe fn tanh_v<L: Lanes, const SMALL_ONLY: bool>(x: L::V) -> L::V {
    // SAFETY: the caller guarantees the CPU features of `L`.
    unsafe {
        let zero = L::splat(L::T::zero());
        let a = L::max(x, L::sub(zero, x));
        let z = L::mul(a, a);
        let c = L::T::TANH_COEFFS;
        let mut p = L::splat(c[0]);
        for &ci in &c[1..] {
            p = L::fma(p, z, L::splat(ci));
        }
        let small = L::fma(a, L::mul(z, p), a);
        let t = if SMALL_ONLY {
            small
        } else {
            let one = L::splat(<L::T as num_traits::One>::one());
            let e = exp_v::<L>(L::sub(zero, L::add(a, a)));
            let large = L::div(L::sub(one, e), L::add(one, e));
            L::select_lt(a, L::splat(L::T::TANH_SMALL), small, large)
        };
        // The sign of x: −t where x < 0.
        L::select_lt(x, zero, L::sub(zero, t), t)
    }
}

/// `block::span_store` and `block::span_flush` for a vector of partial sums `x` (`N` rows
/// from the pointers): `value = x` (first tile of a span) or `α·span + x`, in T; stored to
/// `span`, or when flushing added to the f64 running sums instead, `run = β·run + value`.
///
/// # Safety
/// The CPU must have `L`'s features; `span` must be valid for `N` elements of T, `beta`
/// and `run` for `N` f64 (unaligned is fine).
#[inline(always)]
unsafe fn span_update_v<L: Lanes>(
    step: Step,
    x: L::V,
    alpha: L::V,
    beta: *const f64,
    span: *mut L::T,
    run: *mut f64,
) {
    // SAFETY: the caller guarantees the CPU features and the pointers' extents; the f64
    // vectors at k·W::N with k < PARTS cover exactly N = PARTS·W::N lanes.
    unsafe {
        let value = if step.first {
            x
        } else {
            L::fma(alpha, L::load(span), x)
        };
        if step.flush {
            for k in 0..L::PARTS {
                let at = k * <L::W as Lanes>::N;
                let b = <L::W as Lanes>::load(beta.add(at));
                let old = <L::W as Lanes>::load(run.add(at));
                let new = <L::W as Lanes>::fma(b, old, L::widen(value, k));
                <L::W as Lanes>::store(run.add(at), new);
            }
        } else {
            L::store(span, value);
        }
    }
}

/// `β = exp(m_run − m')` for the `N` lanes of `m_run` and `m_use` (`m'`), in f64, where
/// the difference is exact for f32; stored to `beta`.
///
/// # Safety
/// The CPU must have `L`'s features; `beta` must be valid for `N` f64.
#[inline(always)]
unsafe fn beta_v<L: Lanes>(m_run: L::V, m_use: L::V, beta: *mut f64) {
    // SAFETY: the caller guarantees the CPU features and `beta`'s extent; the f64 vectors
    // at k·W::N with k < PARTS cover exactly N = PARTS·W::N lanes.
    unsafe {
        for k in 0..L::PARTS {
            let diff = <L::W as Lanes>::sub(L::widen(m_run, k), L::widen(m_use, k));
            <L::W as Lanes>::store(beta.add(k * <L::W as Lanes>::N), exp_v::<L::W>(diff));
        }
    }
}

/// [`span_update_v`] for a register tile of `pv`: `tile[m][v]` holds the partial sums of
/// value column `m` (relative to the pointers), query lanes `v·N ..`; rows of the span and
/// running sums are `BQ` apart, `alpha` and `beta` are per query lane.
///
/// # Safety
/// The CPU must have `L`'s features; `acc_span` (T) and `acc` (f64) must be valid for
/// `(MRV − 1)·BQ + NV·N` elements, `alpha` (T) and `beta` (f64) for `NV·N`.
#[inline(always)]
unsafe fn span_update_tile<L: Lanes, const NV: usize, const BQ: usize, const MRV: usize>(
    step: Step,
    tile: &[[L::V; NV]; MRV],
    alpha: *const L::T,
    beta: *const f64,
    acc_span: *mut L::T,
    acc: *mut f64,
) {
    // SAFETY: the caller guarantees the CPU features and the pointers' extents: the N
    // lanes from m·BQ + v·N (m < MRV, v < NV) of `acc_span` and `acc`, from v·N of
    // `alpha` and `beta`.
    unsafe {
        for v in 0..NV {
            let r = v * L::N;
            let a = L::load(alpha.add(r));
            for (m, row) in tile.iter().enumerate() {
                let at = m * BQ + r;
                span_update_v::<L>(step, row[v], a, beta.add(r), acc_span.add(at), acc.add(at));
            }
        }
    }
}

/// Implements [`Lanes`] for one instruction set and element type from its intrinsics.
macro_rules! lanes {
    ($name:ident, $t:ty, $v:ty, $n:literal, $features:literal, $token:ty,
     set1 = $set1:ident, loadu = $loadu:ident, storeu = $storeu:ident, add = $add:ident,
     sub = $sub:ident, mul = $mul:ident, div = $div:ident, fmadd = $fmadd:ident, max = $max:ident,
     pow2 = |$tv:ident| $pow2:expr, zero_below = |$x:ident, $c:ident, $y:ident| $zb:expr,
     select_lt = |$sa:ident, $sb:ident, $sx:ident, $sy:ident| $sel:expr,
     wide = $w:ty, parts = $parts:literal, widen = |$wv:ident, $wk:ident| $widen:expr
     $(, estrin = $estrin:literal)?) => {
        #[cfg(target_arch = "x86_64")]
        struct $name;
        // SAFETY: `$token` is made only by its `detect`, after CPU detection found the
        // features of its path, which include `$features`.
        #[cfg(target_arch = "x86_64")]
        unsafe impl Lanes for $name {
            type Features = $token;
            type T = $t;
            type V = $v;
            const N: usize = $n;
            type W = $w;
            const PARTS: usize = $parts;
            $(const ESTRIN: bool = $estrin;)?
            #[inline(always)]
            #[allow(unused_unsafe)] // for f64 it is the identity
            unsafe fn widen($wv: $v, $wk: usize) -> <$w as Lanes>::V {
                // SAFETY: the trait's contract: the CPU has `$features`.
                unsafe { $widen }
            }
            #[inline(always)]
            unsafe fn splat(x: $t) -> $v {
                // SAFETY: the trait's contract: the CPU has `$features`.
                unsafe { $set1(x) }
            }
            #[inline(always)]
            unsafe fn load(p: *const $t) -> $v {
                // SAFETY: the trait's contract: features present, `p` valid for N lanes.
                unsafe { $loadu(p) }
            }
            #[inline(always)]
            unsafe fn store(p: *mut $t, v: $v) {
                // SAFETY: the trait's contract: features present, `p` valid for N lanes.
                unsafe { $storeu(p, v) }
            }
            #[inline(always)]
            unsafe fn add(a: $v, b: $v) -> $v {
                // SAFETY: the trait's contract: the CPU has `$features`.
                unsafe { $add(a, b) }
            }
            #[inline(always)]
            unsafe fn sub(a: $v, b: $v) -> $v {
                // SAFETY: the trait's contract: the CPU has `$features`.
                unsafe { $sub(a, b) }
            }
            #[inline(always)]
            unsafe fn mul(a: $v, b: $v) -> $v {
                // SAFETY: the trait's contract: the CPU has `$features`.
                unsafe { $mul(a, b) }
            }
            #[inline(always)]
            unsafe fn div(a: $v, b: $v) -> $v {
                // SAFETY: the trait's contract: the CPU has `$features`.
                unsafe { $div(a, b) }
            }
            #[inline(always)]
            unsafe fn fma(a: $v, b: $v, c: $v) -> $v {
                // SAFETY: the trait's contract: the CPU has `$features`.
                unsafe { $fmadd(a, b, c) }
            }
            #[inline(always)]
            unsafe fn max(a: $v, b: $v) -> $v {
                // SAFETY: the trait's contract: the CPU has `$features`.
                unsafe { $max(a, b) }
            }
            #[inline(always)]
            unsafe fn pow2_table($tv: $v) -> $v {
                // SAFETY: the trait's contract: the CPU has `$features`.
                unsafe { $pow2 }
            }
            #[inline(always)]
            unsafe fn zero_below($x: $v, $c: $v, $y: $v) -> $v {
                // SAFETY: the trait's contract: the CPU has `$features`.
                unsafe { $zb }
            }
            #[inline(always)]
            unsafe fn select_lt($sa: $v, $sb: $v, $sx: $v, $sy: $v) -> $v {
                // SAFETY: the trait's contract: the CPU has `$features`.
                unsafe { $sel }
            }
        }
    };
}

lanes!(
    Avx512F32,
    f32,
    __m512,
    16,
    "avx512f",
    Avx512,
    set1 = _mm512_set1_ps,
    loadu = _mm512_loadu_ps,
    storeu = _mm512_storeu_ps,
    add = _mm512_add_ps,
    sub = _mm512_sub_ps,
    mul = _mm512_mul_ps,
    div = _mm512_div_ps,
    fmadd = _mm512_fmadd_ps,
    max = _mm512_max_ps,
    pow2 = |t| {
        let b = _mm512_castps_si512(t);
        let table = _mm512_loadu_si512(POW2_TABLE_F32.as_ptr().cast());
        let frac = _mm512_permutexvar_epi32(b, table);
        _mm512_castsi512_ps(_mm512_add_epi32(frac, _mm512_slli_epi32::<19>(b)))
    },
    zero_below = |x, c, y| _mm512_maskz_mov_ps(_mm512_cmp_ps_mask::<_CMP_GE_OQ>(x, c), y),
    select_lt = |a, b, x, y| _mm512_mask_blend_ps(_mm512_cmp_ps_mask::<_CMP_LT_OQ>(a, b), y, x),
    wide = Avx512F64,
    parts = 2,
    widen = |v, k| if k == 0 {
        _mm512_cvtps_pd(_mm512_castps512_ps256(v))
    } else {
        _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(
            _mm512_castps_pd(v),
        )))
    }
);

lanes!(
    Avx512F64,
    f64,
    __m512d,
    8,
    "avx512f",
    Avx512,
    set1 = _mm512_set1_pd,
    loadu = _mm512_loadu_pd,
    storeu = _mm512_storeu_pd,
    add = _mm512_add_pd,
    sub = _mm512_sub_pd,
    mul = _mm512_mul_pd,
    div = _mm512_div_pd,
    fmadd = _mm512_fmadd_pd,
    max = _mm512_max_pd,
    pow2 = |t| {
        let b = _mm512_castpd_si512(t);
        let table = _mm512_loadu_si512(POW2_TABLE_F64.as_ptr().cast());
        let frac = _mm512_permutexvar_epi64(b, table);
        _mm512_castsi512_pd(_mm512_add_epi64(frac, _mm512_slli_epi64::<49>(b)))
    },
    zero_below = |x, c, y| _mm512_maskz_mov_pd(_mm512_cmp_pd_mask::<_CMP_GE_OQ>(x, c), y),
    select_lt = |a, b, x, y| _mm512_mask_blend_pd(_mm512_cmp_pd_mask::<_CMP_LT_OQ>(a, b), y, x),
    wide = Avx512F64,
    parts = 1,
    widen = |v, _k| v
);

lanes!(
    Avx2F32,
    f32,
    __m256,
    8,
    "avx2,fma",
    Avx2,
    set1 = _mm256_set1_ps,
    loadu = _mm256_loadu_ps,
    storeu = _mm256_storeu_ps,
    add = _mm256_add_ps,
    sub = _mm256_sub_ps,
    mul = _mm256_mul_ps,
    div = _mm256_div_ps,
    fmadd = _mm256_fmadd_ps,
    max = _mm256_max_ps,
    pow2 = |t| {
        // Entries 0..8 and 8..16 from the low three bits, chosen by bit 3 (moved to the
        // sign bit for the blend).
        let b = _mm256_castps_si256(t);
        let lo = _mm256_loadu_si256(POW2_TABLE_F32.as_ptr().cast());
        let hi = _mm256_loadu_si256(POW2_TABLE_F32[8..].as_ptr().cast());
        let frac = _mm256_blendv_ps(
            _mm256_castsi256_ps(_mm256_permutevar8x32_epi32(lo, b)),
            _mm256_castsi256_ps(_mm256_permutevar8x32_epi32(hi, b)),
            _mm256_castsi256_ps(_mm256_slli_epi32::<28>(b)),
        );
        _mm256_castsi256_ps(_mm256_add_epi32(
            _mm256_castps_si256(frac),
            _mm256_slli_epi32::<19>(b),
        ))
    },
    zero_below = |x, c, y| _mm256_and_ps(_mm256_cmp_ps::<_CMP_GE_OQ>(x, c), y),
    select_lt = |a, b, x, y| _mm256_blendv_ps(y, x, _mm256_cmp_ps::<_CMP_LT_OQ>(a, b)),
    wide = Avx2F64,
    parts = 2,
    widen = |v, k| if k == 0 {
        _mm256_cvtps_pd(_mm256_castps256_ps128(v))
    } else {
        _mm256_cvtps_pd(_mm256_extractf128_ps::<1>(v))
    }
);

lanes!(
    Avx2F64,
    f64,
    __m256d,
    4,
    "avx2,fma",
    Avx2,
    set1 = _mm256_set1_pd,
    loadu = _mm256_loadu_pd,
    storeu = _mm256_storeu_pd,
    add = _mm256_add_pd,
    sub = _mm256_sub_pd,
    mul = _mm256_mul_pd,
    div = _mm256_div_pd,
    fmadd = _mm256_fmadd_pd,
    max = _mm256_max_pd,
    pow2 = |t| {
        // AVX2 has no variable permutation of 64-bit lanes: permute 32-bit halves, with
        // indices 2j' and 2j' + 1 (j' = j mod 4, from k's bits doubled and copied to both
        // halves), from entries 0..4 and 4..8, chosen by bit 2 (moved to the sign bit).
        let b = _mm256_castpd_si256(t);
        let idx = _mm256_add_epi32(
            _mm256_shuffle_epi32::<0b10_10_00_00>(_mm256_slli_epi64::<1>(b)),
            _mm256_set_epi32(1, 0, 1, 0, 1, 0, 1, 0),
        );
        let lo = _mm256_loadu_si256(POW2_TABLE_F64.as_ptr().cast());
        let hi = _mm256_loadu_si256(POW2_TABLE_F64[4..].as_ptr().cast());
        let frac = _mm256_blendv_pd(
            _mm256_castsi256_pd(_mm256_permutevar8x32_epi32(lo, idx)),
            _mm256_castsi256_pd(_mm256_permutevar8x32_epi32(hi, idx)),
            _mm256_castsi256_pd(_mm256_slli_epi64::<61>(b)),
        );
        _mm256_castsi256_pd(_mm256_add_epi64(
            _mm256_castpd_si256(frac),
            _mm256_slli_epi64::<49>(b),
        ))
    },
    zero_below = |x, c, y| _mm256_and_pd(_mm256_cmp_pd::<_CMP_GE_OQ>(x, c), y),
    select_lt = |a, b, x, y| _mm256_blendv_pd(y, x, _mm256_cmp_pd::<_CMP_LT_OQ>(a, b)),
    wide = Avx2F64,
    parts = 1,
    widen = |v, _k| v,
    estrin = true
);

/// Implements [`Lanes`] with `N` lanes in a plain array, lane by lane: what the compiler
/// vectorises for the target's baseline (SSE2 on x86-64), with no `unsafe` but the
/// pointer accesses. The operations are those of `exp.rs` and of the SIMD lanes, with
/// `a·b + c` unfused (as the scalar `exp_nonpos::<false>`).
macro_rules! portable_lanes {
    ($name:ident, $t:ty, $n:literal, wide = $w:ty, parts = $parts:literal) => {
        struct $name;
        // SAFETY: `Features = ()`: the methods need no CPU feature beyond the target's
        // baseline, which every CPU running this binary has.
        unsafe impl Lanes for $name {
            type Features = ();
            type T = $t;
            type V = [$t; $n];
            const N: usize = $n;
            type W = $w;
            const PARTS: usize = $parts;
            #[inline(always)]
            unsafe fn widen(v: [$t; $n], k: usize) -> <$w as Lanes>::V {
                // Through memory: otherwise the compiler shaped the f32 sums (and the
                // exponentials feeding them) in pairs, as SSE2 widens two lanes at a time,
                // and computed the exponential on half-filled vectors (f32 5% slower).
                let v = std::hint::black_box(v);
                std::array::from_fn(|i| f64::from(v[k * <$w as Lanes>::N + i]))
            }
            #[inline(always)]
            unsafe fn splat(x: $t) -> [$t; $n] {
                [x; $n]
            }
            #[inline(always)]
            unsafe fn load(p: *const $t) -> [$t; $n] {
                // SAFETY: the trait's contract: `p` is valid for N lanes (unaligned).
                std::array::from_fn(|i| unsafe { p.add(i).read_unaligned() })
            }
            #[inline(always)]
            unsafe fn store(p: *mut $t, v: [$t; $n]) {
                for (i, x) in v.into_iter().enumerate() {
                    // SAFETY: the trait's contract: `p` is valid for N lanes (unaligned).
                    unsafe { p.add(i).write_unaligned(x) }
                }
            }
            #[inline(always)]
            unsafe fn add(a: [$t; $n], b: [$t; $n]) -> [$t; $n] {
                std::array::from_fn(|i| a[i] + b[i])
            }
            #[inline(always)]
            unsafe fn sub(a: [$t; $n], b: [$t; $n]) -> [$t; $n] {
                std::array::from_fn(|i| a[i] - b[i])
            }
            #[inline(always)]
            unsafe fn mul(a: [$t; $n], b: [$t; $n]) -> [$t; $n] {
                std::array::from_fn(|i| a[i] * b[i])
            }
            #[inline(always)]
            unsafe fn div(a: [$t; $n], b: [$t; $n]) -> [$t; $n] {
                std::array::from_fn(|i| a[i] / b[i])
            }
            #[inline(always)]
            unsafe fn fma(a: [$t; $n], b: [$t; $n], c: [$t; $n]) -> [$t; $n] {
                std::array::from_fn(|i| a[i] * b[i] + c[i])
            }
            #[inline(always)]
            unsafe fn max(a: [$t; $n], b: [$t; $n]) -> [$t; $n] {
                std::array::from_fn(|i| if a[i] > b[i] { a[i] } else { b[i] })
            }
            #[inline(always)]
            unsafe fn pow2_table(t: [$t; $n]) -> [$t; $n] {
                std::array::from_fn(|i| <$t as ExpConsts>::pow2_table(t[i]))
            }
            #[inline(always)]
            unsafe fn zero_below(x: [$t; $n], c: [$t; $n], y: [$t; $n]) -> [$t; $n] {
                std::array::from_fn(|i| if x[i] >= c[i] { y[i] } else { 0.0 })
            }
            #[inline(always)]
            unsafe fn select_lt(a: [$t; $n], b: [$t; $n], x: [$t; $n], y: [$t; $n]) -> [$t; $n] {
                std::array::from_fn(|i| if a[i] < b[i] { x[i] } else { y[i] })
            }
        }
    };
}

portable_lanes!(PortableF32, f32, 8, wide = PortableF64, parts = 2);
portable_lanes!(PortableF64, f64, 4, wide = PortableF64, parts = 1);

/// The micro-kernels of every path, written once over the vector operations `L`: register
/// tiles of `MR` keys (or `MRV` value columns) × `NV` vectors of queries, `BQ` queries per
/// block, `BK` keys per step.
///
/// [`MicroKernels::scores`] of [`Simd`], with the ALiBi terms subtracted at the store
/// when `ALIBI` and the bias added when `BIAS` (each given then).
#[allow(clippy::too_many_arguments)] // the tile's operands, as slices
#[inline(always)]
fn score_tiles<
    L: Lanes,
    const MR: usize,
    const NV: usize,
    const BQ: usize,
    const ALIBI: bool,
    const BIAS: bool,
>(
    _: L::Features,
    qt: &[L::T],
    kp: &[L::T],
    d_k: usize,
    scale: L::T,
    alibi: Option<&[L::T]>,
    bias: Option<BiasTile<'_, L::T>>,
    s: &mut [L::T],
    probe: &mut [L::T],
) -> bool {
    let jpad = s.len() / BQ;
    assert!(
        BQ.is_multiple_of(NV * L::N)
            && s.len() == jpad * BQ
            && jpad.is_multiple_of(MR)
            && qt.len() >= d_k * BQ
            && kp.len() >= jpad * d_k
            && probe.len() >= L::N
    );
    // The term of lane r and tile key j is at `alibi_at + r + (jpad − 1 − j)`.
    let alibi_at = if ALIBI {
        let a = alibi.expect("the ALiBi terms, with ALIBI");
        assert!(a.len() >= BQ + jpad - 1);
        a.as_ptr()
    } else {
        std::ptr::null()
    };
    // The bias's entry (i0 + r, j0 + j) is at `bias_at + j·bias_cs + r`, added for keys
    // j < bias_keys (none without a bias).
    let (bias_at, bias_cs, bias_keys) = match bias.filter(|_| BIAS) {
        Some(b) => {
            let (rows, cols) = b.m.shape();
            assert!(
                b.m.strides().0 == 1 && b.i0 + BQ <= rows && b.j0 + b.jn <= cols && b.jn <= jpad
            );
            let cs = b.m.strides().1;
            (b.m.as_ptr().wrapping_add(b.i0 + b.j0 * cs), cs, b.jn)
        }
        None => (std::ptr::null(), 0, 0),
    };
    let (qt, kp, s) = (qt.as_ptr(), kp.as_ptr(), s.as_mut_ptr());
    // SAFETY: CPU features: the `L::Features` token argument proves them. Bounds, from the
    // assert: loads read qt[p·BQ + rt + v·N ..][..N] with p < d_k and rt + NV·N ≤ BQ;
    // broadcasts read kp[jt·d_k + p·MR + m] < (jt + MR)·d_k ≤ jpad·d_k; stores write
    // s[(jt + m)·BQ + rt + v·N ..][..N] < jpad·BQ, and the first N of `probe`. ALiBi loads
    // (only with ALIBI, and then the slice is there: asserted) read
    // alibi[rt + v·N + jpad − 1 − (jt + m) ..][..N], below BQ + jpad − 1. Bias loads
    // (only for keys below `bias_keys`, 0 without a bias) read the view's entries
    // (i0 + rt + v·N ..)[..N] of column j0 + jt + m, with i0 + rt + v·N + N ≤ i0 + BQ ≤ its
    // rows and j0 + jt + m < j0 + jn ≤ its columns: inside the view (row stride 1, column
    // stride `bias_cs`), which is borrowed for the call.
    unsafe {
        let sc = L::splat(scale);
        let mut pr = L::splat(L::T::zero());
        for jt in (0..jpad).step_by(MR) {
            let panel = kp.add(jt * d_k);
            for rt in (0..BQ).step_by(NV * L::N) {
                let mut acc = [[L::splat(L::T::zero()); NV]; MR];
                for p in 0..d_k {
                    let qrow = qt.add(p * BQ + rt);
                    let mut qv = [L::splat(L::T::zero()); NV];
                    for (v, q) in qv.iter_mut().enumerate() {
                        *q = L::load(qrow.add(v * L::N));
                    }
                    for (m, row) in acc.iter_mut().enumerate() {
                        let kb = L::splat(*panel.add(p * MR + m));
                        for (a, &q) in row.iter_mut().zip(&qv) {
                            *a = L::fma(kb, q, *a);
                        }
                    }
                }
                for (m, row) in acc.iter().enumerate() {
                    let with_bias = BIAS && jt + m < bias_keys;
                    for (v, &a) in row.iter().enumerate() {
                        let x = L::mul(a, sc);
                        // x − x is 0 for finite x and NaN for ±∞ or NaN: the check is on
                        // the scaled score (a bias of −∞ masks, it does not overflow).
                        pr = L::add(pr, L::sub(x, x));
                        let x = if ALIBI {
                            let t = alibi_at.add(rt + v * L::N + jpad - 1 - (jt + m));
                            L::sub(x, L::load(t))
                        } else {
                            x
                        };
                        let x = if with_bias {
                            let b = bias_at.add((jt + m) * bias_cs + rt + v * L::N);
                            L::add(x, L::load(b))
                        } else {
                            x
                        };
                        L::store(s.add((jt + m) * BQ + rt + v * L::N), x);
                    }
                }
            }
        }
        L::store(probe.as_mut_ptr(), pr);
    }
    probe[..L::N].iter().all(|&p| p == L::T::zero())
}

/// The trait methods are safe because each takes `L::Features`, a token that exists only
/// if the CPU has `L`'s instruction set (the [`Lanes`] contract; see [`MicroKernels`] for
/// why a token and not `unsafe fn`). The SIMD ones are instantiated inside the
/// `#[target_feature]` functions of `simd_kernel!`, so that the intrinsics inline into
/// straight vector code; the portable ones (`L::Features = ()`) in `portable_kernel!`.
struct Simd<L, const MR: usize, const NV: usize, const BQ: usize, const MRV: usize, const BK: usize>(
    PhantomData<L>,
);

impl<L: Lanes, const MR: usize, const NV: usize, const BQ: usize, const MRV: usize, const BK: usize>
    MicroKernels<L::T> for Simd<L, MR, NV, BQ, MRV, BK>
{
    type Features = L::Features;
    const MR: usize = MR;
    const BQ: usize = BQ;
    const MRV: usize = MRV;
    const BK: usize = BK;

    #[inline(always)]
    fn scores(
        features: L::Features,
        qt: &[L::T],
        kp: &[L::T],
        d_k: usize,
        scale: L::T,
        epilogue: Option<Epilogue<'_, L::T>>,
        s: &mut [L::T],
        probe: &mut [L::T],
    ) -> bool {
        // One instance of the loop per set of options, so that the plain one has no trace
        // of them.
        let (alibi, bias) = epilogue.map_or((None, None), |e| (e.alibi, e.bias));
        let f = features;
        match (alibi.is_some(), bias.is_some()) {
            (false, false) => score_tiles::<L, MR, NV, BQ, false, false>(
                f, qt, kp, d_k, scale, None, None, s, probe,
            ),
            (true, false) => score_tiles::<L, MR, NV, BQ, true, false>(
                f, qt, kp, d_k, scale, alibi, None, s, probe,
            ),
            (false, true) => score_tiles::<L, MR, NV, BQ, false, true>(
                f, qt, kp, d_k, scale, None, bias, s, probe,
            ),
            (true, true) => score_tiles::<L, MR, NV, BQ, true, true>(
                f, qt, kp, d_k, scale, alibi, bias, s, probe,
            ),
        }
    }

    #[inline(always)]
    fn softcap(_: L::Features, s: &mut [L::T], c: L::T) {
        assert!(s.len().is_multiple_of(L::N));
        let p = s.as_mut_ptr();
        // SAFETY: CPU features: the `L::Features` token argument proves them. Bounds: the
        // vectors at multiples of N below `s.len()`, a multiple of N, and the first N of
        // `lanes` (16 ≥ N).
        unsafe {
            let cv = L::splat(c);
            // Softcaps are chosen above the usual scores, so a tile's `|x/c|` are most
            // often all below `TANH_SMALL`, where `tanh` is its polynomial alone. Whether
            // they are: every `|x| < small_x = c·TANH_SMALL·(1 − 4ε)` (rounded: still
            // below `c·TANH_SMALL·(1 − 2ε)`, so `fl(|x|/c) < TANH_SMALL`) and every x
            // finite (`x − x` is 0, else NaN: a NaN would escape the maximum).
            let zero = L::splat(L::T::zero());
            let (mut amax, mut poison) = (zero, zero);
            for at in (0..s.len()).step_by(L::N) {
                let x = L::load(p.add(at));
                amax = L::max(amax, L::max(x, L::sub(zero, x)));
                poison = L::add(poison, L::sub(x, x));
            }
            let shrink = L::T::from_f64_rounded(1.0 - 4.0 * L::T::EPSILON.to_f64());
            let small_x = c * L::T::TANH_SMALL * shrink;
            let mut lanes = [L::T::zero(); 16];
            L::store(lanes.as_mut_ptr(), amax);
            let below = lanes[..L::N].iter().all(|&a| a < small_x);
            L::store(lanes.as_mut_ptr(), poison);
            if below && lanes[..L::N].iter().all(|&z| z == L::T::zero()) {
                for at in (0..s.len()).step_by(L::N) {
                    let x = L::load(p.add(at));
                    L::store(p.add(at), L::mul(cv, tanh_v::<L, true>(L::div(x, cv))));
                }
            } else {
                for at in (0..s.len()).step_by(L::N) {
                    let x = L::load(p.add(at));
                    L::store(p.add(at), L::mul(cv, tanh_v::<L, false>(L::div(x, cv))));
                }
            }
        }
    }

    #[inline(always)]
    fn softmax_step(
        _: L::Features,
        s: &mut [L::T],
        step: Step,
        sums: &mut Sums<'_, L::T>,
        factors: &mut Factors<'_, L::T>,
    ) {
        let jpad = s.len() / BQ;
        assert!(
            BQ.is_multiple_of(L::N)
                && L::N == L::PARTS * <L::W as Lanes>::N
                && s.len() == jpad * BQ
                && sums.m.len() >= BQ
                && sums.m_run.len() >= BQ
                && sums.l.len() >= BQ
                && sums.l_span.len() >= BQ
                && factors.alpha.len() >= BQ
                && factors.beta.len() >= BQ
        );
        let s = s.as_mut_ptr();
        let (m, m_run) = (sums.m.as_mut_ptr(), sums.m_run.as_mut_ptr());
        let (l, l_span) = (sums.l.as_mut_ptr(), sums.l_span.as_mut_ptr());
        let (alpha, beta) = (factors.alpha.as_mut_ptr(), factors.beta.as_mut_ptr());
        // SAFETY: CPU features: the `L::Features` token argument proves them (`L::W` is the
        // f64 type of the same instruction set). Bounds: rt + N ≤ BQ, so every vector lies
        // in the first BQ of m, m_run, l_span, alpha and in row j < jpad of `s`; the N f64
        // lanes from rt of l and beta (for `span_update_v`, `beta_v`) lie in the first BQ.
        unsafe {
            let neg_inf = L::splat(L::T::NEG_INFINITY);
            // m' = −∞ (nothing allowed yet) is replaced by the lowest finite number, so
            // s − m' stays −∞ for masked scores and exp gives exactly 0, as do α and β
            // (m and m_run are −∞ too): the lane stays empty, with no NaN.
            let lowest = L::splat(-L::T::MAX);
            for rt in (0..BQ).step_by(L::N) {
                // Four maxima in flight (a single one is a chain of `jpad` dependent
                // `max`es); `max` is exact, so the grouping changes no bit.
                let mut mb = [neg_inf; 4];
                let mut j = 0;
                while j + 4 <= jpad {
                    for (u, m) in mb.iter_mut().enumerate() {
                        *m = L::max(*m, L::load(s.add((j + u) * BQ + rt)));
                    }
                    j += 4;
                }
                for j in j..jpad {
                    mb[0] = L::max(mb[0], L::load(s.add(j * BQ + rt)));
                }
                let m_blk = L::max(L::max(mb[0], mb[1]), L::max(mb[2], mb[3]));
                let m_old = L::load(m.add(rt));
                let m_new = L::max(m_old, m_blk);
                let m_use = L::max(m_new, lowest);
                let a = exp_v::<L>(L::sub(m_old, m_use));
                L::store(m.add(rt), m_new);
                L::store(alpha.add(rt), a);
                if step.flush {
                    beta_v::<L>(L::load(m_run.add(rt)), m_use, beta.add(rt));
                    L::store(m_run.add(rt), m_new);
                }
                // Four exponentials per pass, written side by side so that their chains
                // of dependent FMAs overlap (one per pass left the FMA pipes idle for
                // latency: on Zen 5, f64, n 4096, this and the four maxima above took the
                // block kernel from 94.5 to 105 GFLOP/s at d 64, 96 to 115 at d 128).
                // `L` is still summed one key at a time, in key order.
                let mut l_blk = L::splat(L::T::zero());
                let mut j = 0;
                while j + 4 <= jpad {
                    let mut e = [l_blk; 4];
                    for (u, e) in e.iter_mut().enumerate() {
                        *e = exp_v::<L>(L::sub(L::load(s.add((j + u) * BQ + rt)), m_use));
                    }
                    for (u, &e) in e.iter().enumerate() {
                        L::store(s.add((j + u) * BQ + rt), e);
                        l_blk = L::add(l_blk, e);
                    }
                    j += 4;
                }
                for j in j..jpad {
                    let e = exp_v::<L>(L::sub(L::load(s.add(j * BQ + rt)), m_use));
                    L::store(s.add(j * BQ + rt), e);
                    l_blk = L::add(l_blk, e);
                }
                span_update_v::<L>(step, l_blk, a, beta.add(rt), l_span.add(rt), l.add(rt));
            }
        }
    }

    #[inline(always)]
    fn pv(
        _: L::Features,
        p: &[L::T],
        vp: &[L::T],
        v_panel: usize,
        dvp: usize,
        step: Step,
        acc: &mut [f64],
        acc_span: &mut [L::T],
        alpha: &[L::T],
        beta: &[f64],
    ) {
        let jpad = p.len() / BQ;
        assert!(
            BQ.is_multiple_of(NV * L::N)
                && L::N == L::PARTS * <L::W as Lanes>::N
                && p.len() == jpad * BQ
                && dvp.is_multiple_of(MRV)
                && (dvp == 0
                    || v_panel >= jpad * MRV && vp.len() >= (dvp / MRV - 1) * v_panel + jpad * MRV)
                && acc.len() >= dvp * BQ
                && acc_span.len() >= dvp * BQ
                && alpha.len() >= BQ
                && beta.len() >= BQ
        );
        let (p, vp) = (p.as_ptr(), vp.as_ptr());
        let (acc, acc_span) = (acc.as_mut_ptr(), acc_span.as_mut_ptr());
        let (alpha, beta) = (alpha.as_ptr(), beta.as_ptr());
        // SAFETY: CPU features: the `L::Features` token argument proves them. Bounds, from the assert:
        // p[j·BQ + rt + v·N ..][..N] with j < jpad; vp[ct/MRV·v_panel + j·MRV + m] with
        // ct + MRV ≤ dvp, j < jpad, m < MRV;
        // `span_update_tile` gets acc_span (T) and acc (f64) from ct·BQ + rt, whose
        // (MRV − 1)·BQ + NV·N lanes lie below dvp·BQ, and alpha (T) and beta (f64) from rt,
        // whose NV·N lanes lie below BQ.
        unsafe {
            for ct in (0..dvp).step_by(MRV) {
                let panel = vp.add(ct / MRV * v_panel);
                for rt in (0..BQ).step_by(NV * L::N) {
                    // The tile's partial sums, in T from zero.
                    let mut tile = [[L::splat(L::T::zero()); NV]; MRV];
                    for j in 0..jpad {
                        let mut pv = [L::splat(L::T::zero()); NV];
                        for (v, x) in pv.iter_mut().enumerate() {
                            *x = L::load(p.add(j * BQ + rt + v * L::N));
                        }
                        for (m, row) in tile.iter_mut().enumerate() {
                            let vb = L::splat(*panel.add(j * MRV + m));
                            for (t, &x) in row.iter_mut().zip(&pv) {
                                *t = L::fma(vb, x, *t);
                            }
                        }
                    }
                    let (at, a, b) = (ct * BQ + rt, alpha.add(rt), beta.add(rt));
                    let (span, run) = (acc_span.add(at), acc.add(at));
                    span_update_tile::<L, NV, BQ, MRV>(step, &tile, a, b, span, run);
                }
            }
        }
    }
}

/// The backward pass's inner loops ([`GradKernels`], `grad.rs`), written once over the
/// vector operations `L`: register tiles of `MR` rows of `n` × `NV` vectors along `m`.
struct GradSimd<L, const MR: usize, const NV: usize>(PhantomData<L>);

/// One register tile of [`GradKernels::product`]: `MR × V` vectors of sums over `p < k`,
/// from zero, in T; then each handed to `emit(row, vector, sums)`.
///
/// # Safety
/// The CPU must have `L`'s features; `a[p·a_k + v·N ..][..N]` and `b[p·b_k + r·b_n]` must
/// be readable for `p < k`, `v < V`, `r < MR`.
#[inline(always)]
unsafe fn register_tile<L: Lanes, const MR: usize, const V: usize>(
    a: *const L::T,
    a_k: usize,
    b: *const L::T,
    (b_k, b_n): (usize, usize),
    k: usize,
    mut emit: impl FnMut(usize, usize, L::V),
) {
    // SAFETY: the caller's contract.
    unsafe {
        let mut acc = [[L::splat(L::T::zero()); V]; MR];
        for p in 0..k {
            let ap = a.add(p * a_k);
            let mut av = [L::splat(L::T::zero()); V];
            for (v, x) in av.iter_mut().enumerate() {
                *x = L::load(ap.add(v * L::N));
            }
            let bp = b.add(p * b_k);
            for (r, row) in acc.iter_mut().enumerate() {
                let bb = L::splat(*bp.add(r * b_n));
                for (t, &x) in row.iter_mut().zip(&av) {
                    *t = L::fma(bb, x, *t);
                }
            }
        }
        for (r, row) in acc.iter().enumerate() {
            for (v, &x) in row.iter().enumerate() {
                emit(r, v, x);
            }
        }
    }
}

impl<L: Lanes, const MR: usize, const NV: usize> GradKernels<L::T> for GradSimd<L, MR, NV> {
    type Features = L::Features;
    const MR: usize = MR;

    #[inline(always)]
    fn product(
        _: L::Features,
        a: &[L::T],
        a_k: usize,
        b: &[L::T],
        (b_k, b_n, b_panel): (usize, usize, usize),
        (k, m, n): (usize, usize, usize),
        out: Out<'_, L::T>,
    ) {
        if m == 0 || n == 0 {
            return;
        }
        let (out_len, stride) = match &out {
            Out::Store(o, s) => (o.len(), *s),
            Out::Add(o, s) => (o.len(), *s),
        };
        assert!(
            m.is_multiple_of(L::N)
                && n.is_multiple_of(MR)
                && (k == 0
                    || (a.len() >= (k - 1) * a_k + m
                        && b.len() > (n / MR - 1) * b_panel + (k - 1) * b_k + (MR - 1) * b_n))
                && out_len >= (n - 1) * stride + m
                && L::N == L::PARTS * <L::W as Lanes>::N
        );
        let (a, b) = (a.as_ptr(), b.as_ptr());
        // SAFETY: CPU features: the `L::Features` token argument proves them. Bounds, from
        // the assert: register tiles start at `mt < m` (a multiple of N, with `mt + V·N ≤ m`)
        // and `nt < n` (a multiple of MR, `nt + MR ≤ n`), so they read a[p·a_k + mt + v·N ..]
        // [..N] < (k − 1)·a_k + m and b[(nt/MR)·b_panel + p·b_k + r·b_n] ≤
        // (n/MR − 1)·b_panel + (k − 1)·b_k + (MR − 1)·b_n,
        // and write out[(nt + r)·stride + mt + v·N ..][..N] < (n − 1)·stride + m (the f64
        // parts of a vector: PARTS consecutive runs of W::N).
        unsafe {
            // One register tile at (mt, nt) with $v vectors: its results stored, or
            // widened and added into f64.
            macro_rules! run {
                ($v:expr, $mt:expr, $nt:expr) => {{
                    let (mt, nt) = ($mt, $nt);
                    let (ap, bp) = (a.add(mt), b.add(nt / MR * b_panel));
                    match &out {
                        Out::Store(o, _) => {
                            let o = o.as_ptr().cast_mut();
                            register_tile::<L, MR, $v>(ap, a_k, bp, (b_k, b_n), k, |r, v, x| {
                                L::store(o.add((nt + r) * stride + mt + v * L::N), x)
                            });
                        }
                        Out::Add(o, _) => {
                            let o = o.as_ptr().cast_mut();
                            register_tile::<L, MR, $v>(ap, a_k, bp, (b_k, b_n), k, |r, v, x| {
                                let at = o.add((nt + r) * stride + mt + v * L::N);
                                for part in 0..L::PARTS {
                                    let p = at.add(part * <L::W as Lanes>::N);
                                    let w = L::widen(x, part);
                                    <L::W as Lanes>::store(
                                        p,
                                        <L::W as Lanes>::add(<L::W as Lanes>::load(p), w),
                                    );
                                }
                            });
                        }
                    }
                }};
            }
            let full = m / (NV * L::N) * (NV * L::N);
            for mt in (0..full).step_by(NV * L::N) {
                for nt in (0..n).step_by(MR) {
                    run!(NV, mt, nt);
                }
            }
            for mt in (full..m).step_by(L::N) {
                for nt in (0..n).step_by(MR) {
                    run!(1, mt, nt);
                }
            }
        }
    }

    #[inline(always)]
    fn plain_weights(
        _: L::Features,
        (s, ds): (&mut [L::T], &mut [L::T]),
        (keys, n): (usize, usize),
        rows: RowsOf<'_, L::T>,
        scale: L::T,
    ) -> bool {
        assert!(
            keys <= n
                && s.len() >= n * BLOCK
                && ds.len() >= n * BLOCK
                && rows.lse.len() >= BLOCK
                && rows.slack.len() >= BLOCK
                && rows.d.len() >= BLOCK
                && BLOCK.is_multiple_of(L::N)
        );
        let (sp, dsp) = (s.as_mut_ptr(), ds.as_mut_ptr());
        let (lse, slack, d) = (rows.lse.as_ptr(), rows.slack.as_ptr(), rows.d.as_ptr());
        let mut worst = [L::T::zero(); 16];
        // SAFETY: CPU features: the `L::Features` token argument proves them. Bounds, from
        // the assert: vectors at rt < BLOCK (rt + N ≤ BLOCK) of the rows' values, and at
        // j·BLOCK + rt with j < n of `s` and `ds`; `worst` holds N ≤ 16 lanes.
        unsafe {
            let zero = L::splat(L::T::zero());
            let sc = L::splat(scale);
            let four_u = L::splat(L::T::EPSILON * L::T::from_count(4));
            // The check first, on the scores alone: an lse of −∞ gives +∞ here. Four
            // maxima in flight (one is a chain of dependent `max`es; `max` is exact).
            let mut w = [L::splat(L::T::NEG_INFINITY); 4];
            for rt in (0..BLOCK).step_by(L::N) {
                let (l, sl) = (L::load(lse.add(rt)), L::load(slack.add(rt)));
                let mut j = 0;
                while j < keys {
                    for (u, w) in w.iter_mut().enumerate().take(keys - j) {
                        let z = L::mul(L::load(sp.add((j + u) * BLOCK + rt)), sc);
                        let abs = L::max(z, L::sub(zero, z));
                        let excess = L::sub(L::sub(L::sub(z, l), sl), L::mul(four_u, abs));
                        *w = L::max(*w, excess);
                    }
                    j += 4;
                }
            }
            let w = L::max(L::max(w[0], w[1]), L::max(w[2], w[3]));
            L::store(worst.as_mut_ptr(), w);
            if worst[..L::N].iter().any(|&x| x > L::T::zero()) {
                return false;
            }
            for rt in (0..BLOCK).step_by(L::N) {
                let (l, dv) = (L::load(lse.add(rt)), L::load(d.add(rt)));
                // Four keys per pass, side by side, so that their exponentials' chains of
                // dependent FMAs overlap (as in the forward `softmax_step`). No closures:
                // they would not inherit the target features.
                let mut j = 0;
                while j + 4 <= keys {
                    let mut p = [zero; 4];
                    for (u, p) in p.iter_mut().enumerate() {
                        let x = L::sub(L::mul(L::load(sp.add((j + u) * BLOCK + rt)), sc), l);
                        // min(x, 0): a weight within the slack above 1 is 1.
                        *p = exp_v::<L>(L::sub(zero, L::max(L::sub(zero, x), zero)));
                    }
                    for (u, &p) in p.iter().enumerate() {
                        let at = (j + u) * BLOCK + rt;
                        L::store(sp.add(at), p);
                        L::store(dsp.add(at), L::mul(p, L::sub(L::load(dsp.add(at)), dv)));
                    }
                    j += 4;
                }
                for j in j..keys {
                    let at = j * BLOCK + rt;
                    let x = L::sub(L::mul(L::load(sp.add(at)), sc), l);
                    let p = exp_v::<L>(L::sub(zero, L::max(L::sub(zero, x), zero)));
                    L::store(sp.add(at), p);
                    L::store(dsp.add(at), L::mul(p, L::sub(L::load(dsp.add(at)), dv)));
                }
                for j in keys..n {
                    L::store(sp.add(j * BLOCK + rt), zero);
                    L::store(dsp.add(j * BLOCK + rt), zero);
                }
            }
        }
        true
    }
}

/// Declares one path's backward kernel as a `static GradKernel`: a chunk's round and a
/// tile with the inner loops `$gk`, compiled by `#[target_feature]` functions, called
/// through safe entry points.
macro_rules! grad_kernel {
    ($kernel:ident: $t:ty, $features:literal, $token:ident, $gk:ty) => {
        #[cfg(target_arch = "x86_64")]
        static $kernel: GradKernel<$t> = {
            #[target_feature(enable = $features)]
            fn round_compiled(
                token: $token,
                ops: &Operands<'_, '_, $t>,
                blocks: Range<usize>,
                chunk: &mut Chunk<$t>,
            ) {
                grad::round::<$t, $gk>(token, ops, blocks, chunk)
            }
            fn round_entry(
                ops: &Operands<'_, '_, $t>,
                blocks: Range<usize>,
                chunk: &mut Chunk<$t>,
            ) {
                // `grad_f32` / `grad_f64` hand out this kernel only for a supported path.
                let token = $token::detect().expect("the kernel of a path this CPU supports");
                // SAFETY: `token` exists, so the CPU has every feature of `$token`'s path,
                // which are the features in `$features` (`CpuFeatures::supports`).
                unsafe { round_compiled(token, ops, blocks, chunk) }
            }
            #[target_feature(enable = $features)]
            fn tile_compiled(
                token: $token,
                ops: &Operands<'_, '_, $t>,
                at: (usize, usize),
                scratch: &mut TileScratch<$t>,
                chain: bool,
            ) -> Result<(), Failure> {
                grad::tile::<$t, $gk>(token, ops, at, scratch, chain)
            }
            fn tile_entry(
                ops: &Operands<'_, '_, $t>,
                at: (usize, usize),
                scratch: &mut TileScratch<$t>,
                chain: bool,
            ) -> Result<(), Failure> {
                let token = $token::detect().expect("the kernel of a path this CPU supports");
                // SAFETY: as in `round_entry`.
                unsafe { tile_compiled(token, ops, at, scratch, chain) }
            }
            GradKernel {
                mr: <$gk as GradKernels<$t>>::MR,
                round: round_entry,
                tile: tile_entry,
            }
        };
    };
}

/// Declares a portable backward kernel: the same bodies over the portable lanes.
macro_rules! portable_grad_kernel {
    ($kernel:ident: $t:ty, $gk:ty) => {
        static $kernel: GradKernel<$t> = {
            fn round_entry(
                ops: &Operands<'_, '_, $t>,
                blocks: Range<usize>,
                chunk: &mut Chunk<$t>,
            ) {
                grad::round::<$t, $gk>((), ops, blocks, chunk)
            }
            fn tile_entry(
                ops: &Operands<'_, '_, $t>,
                at: (usize, usize),
                scratch: &mut TileScratch<$t>,
                chain: bool,
            ) -> Result<(), Failure> {
                grad::tile::<$t, $gk>((), ops, at, scratch, chain)
            }
            GradKernel {
                mr: <$gk as GradKernels<$t>>::MR,
                round: round_entry,
                tile: tile_entry,
            }
        };
    };
}

// The backward's register tiles: `MR` rows of `n` (a divisor of the 64-row blocks) ×
// `NV` vectors along `m`, `MR × NV` accumulators.
grad_kernel!(GRAD_AVX512_F32: f32, "avx512f,avx2,fma", Avx512, GradSimd<Avx512F32, 4, 4>);
grad_kernel!(GRAD_AVX512_F64: f64, "avx512f,avx2,fma", Avx512, GradSimd<Avx512F64, 4, 4>);
grad_kernel!(GRAD_AVX2_F32: f32, "avx2,fma", Avx2, GradSimd<Avx2F32, 4, 2>);
grad_kernel!(GRAD_AVX2_F64: f64, "avx2,fma", Avx2, GradSimd<Avx2F64, 4, 2>);
portable_grad_kernel!(GRAD_PORTABLE_F32: f32, GradSimd<PortableF32, 4, 2>);
portable_grad_kernel!(GRAD_PORTABLE_F64: f64, GradSimd<PortableF64, 4, 2>);

/// Declares one SIMD kernel as a `static Kernel`: the block body with micro-kernels `$mk`,
/// compiled by a `#[target_feature]` function, called through a safe entry point.
macro_rules! simd_kernel {
    ($kernel:ident: $t:ty, $features:literal, $token:ident, $mk:ty) => {
        #[cfg(target_arch = "x86_64")]
        static $kernel: Kernel<$t> = {
            #[target_feature(enable = $features)]
            fn compiled(
                token: $token,
                job: &Job<'_, $t>,
                first_block: usize,
                scratch: &mut Scratch<$t>,
                out: &mut MatMut<'_, $t>,
                lse: &mut [$t],
            ) -> Result<(), AttentionError> {
                block::q_group::<$t, $mk>(token, job, first_block, scratch, out, lse)
            }
            fn entry(
                job: &Job<'_, $t>,
                first_block: usize,
                scratch: &mut Scratch<$t>,
                out: &mut MatMut<'_, $t>,
                lse: &mut [$t],
            ) -> Result<(), AttentionError> {
                // `kernel_f32` / `kernel_f64` hand out this kernel only for a supported
                // path, so detection succeeds here (a few cached atomic loads per group).
                let token = $token::detect().expect("the kernel of a path this CPU supports");
                // SAFETY: `token` exists, so the CPU has every feature of `$token`'s path,
                // which are the features in `$features` (`CpuFeatures::supports`).
                unsafe { compiled(token, job, first_block, scratch, out, lse) }
            }
            Kernel::of::<$mk>(entry)
        };
    };
}

/// Declares a portable kernel: the same body and micro-kernels over the portable lanes,
/// no target features.
macro_rules! portable_kernel {
    ($kernel:ident: $t:ty, $mk:ty) => {
        static $kernel: Kernel<$t> = {
            fn entry(
                job: &Job<'_, $t>,
                first_block: usize,
                scratch: &mut Scratch<$t>,
                out: &mut MatMut<'_, $t>,
                lse: &mut [$t],
            ) -> Result<(), AttentionError> {
                block::q_group::<$t, $mk>((), job, first_block, scratch, out, lse)
            }
            Kernel::of::<$mk>(entry)
        };
    };
}

// Tile sizes, named per path. The arguments are, in order, `MR` keys per register tile
// and K panel, `NV` vectors of queries per register tile, `BQ`
// queries per block, `MRV` value columns per register tile, `BK` keys per online-softmax
// step. (Const generics, not a struct of sizes: stable Rust cannot size the register
// arrays from a trait's associated constants.) The `MR × NV` (and `MRV × NV`)
// accumulators plus the loaded operands must fit the register file: 32 zmm for AVX-512,
// 16 ymm for AVX2; `BK` is the largest multiple of `MR` up to 64.

/// AVX-512, f32: scores 6 keys × 4 × 16 queries (24 accumulators: every query of the
/// block), `P·V` 4 value columns × 4 × 16 queries, blocks of 64 queries, 60-key steps.
/// Per FMA a quarter of a broadcast (was half with 8 keys × 2 × 16): each broadcast takes
/// a vector pipe besides the load on Zen 4 (llvm-mca `-mcpu=znver4`: the score loop from
/// 67% to 80% of the FMA pipes' rate) and the shape measured faster on a Xeon with two
/// FMA units (`docs/PERFORMANCE.md`, "Register tiles").
#[cfg(target_arch = "x86_64")]
type Avx512F32Tiles = Simd<Avx512F32, 6, 4, 64, 4, 60>;
/// AVX-512, f64: the same shapes over 8 lanes: 6 keys × 4 × 8 queries, 4 value columns ×
/// 4 × 8 queries, blocks of 32 queries, 60-key steps.
#[cfg(target_arch = "x86_64")]
type Avx512F64Tiles = Simd<Avx512F64, 6, 4, 32, 4, 60>;
/// AVX2, f32: 6 keys × 2 × 8 queries (12 of the 16 ymm), 6 value columns × 2 × 8 queries
/// (12 accumulators, as AVX2 f64), 60-key steps. With 4 value columns `P·V` had 8
/// accumulators, exactly the FMA latency × units of Zen 4 and Ice Lake: on an Ice Lake
/// Xeon 6 columns measured 5–7% faster (`docs/PERFORMANCE.md`, "AVX2 f32: six value
/// columns"), on Zen 4 no different (its seventh session), although d = 64 and 128 pad to
/// 66 and 132 columns.
#[cfg(target_arch = "x86_64")]
type Avx2F32Tiles = Simd<Avx2F32, 6, 2, 64, 6, 60>;
/// AVX2, f64: 6 keys × 2 × 4 queries, 6 value columns × 2 × 4 queries (12 accumulators
/// each), blocks of 32 queries, 60-key steps. With 4 value columns `P·V` had 8
/// accumulators, as many as Zen 4's FMA latency × pipes, and twice as many tiles per step
/// at d = 64 (64 against 44), each with its loop exit and its partial sums' update: 6
/// columns measured about 3% faster (`docs/PERFORMANCE.md`, "AVX2 f64: longer value tiles
/// and a shorter chain"), although d = 64 and 128 pad to 66 and 132 columns.
#[cfg(target_arch = "x86_64")]
type Avx2F64Tiles = Simd<Avx2F64, 6, 2, 32, 6, 60>;
/// Portable, f32: 4 keys × 1 array of 8 queries, blocks of 32 queries; no FMA (the
/// baseline lacks it).
type PortableF32Tiles = Simd<PortableF32, 4, 1, 32, 4, 64>;
/// Portable, f64: 4 keys × 1 array of 4 queries, blocks of 16 queries.
type PortableF64Tiles = Simd<PortableF64, 4, 1, 16, 4, 64>;

simd_kernel!(AVX512_F32: f32, "avx512f,avx2,fma", Avx512, Avx512F32Tiles);
simd_kernel!(AVX512_F64: f64, "avx512f,avx2,fma", Avx512, Avx512F64Tiles);
simd_kernel!(AVX2_F32: f32, "avx2,fma", Avx2, Avx2F32Tiles);
simd_kernel!(AVX2_F64: f64, "avx2,fma", Avx2, Avx2F64Tiles);
portable_kernel!(PORTABLE_F32: f32, PortableF32Tiles);
portable_kernel!(PORTABLE_F64: f64, PortableF64Tiles);

/// Declares `$name(path)`: the kernel (block or decoding) for one element type on `path`, the portable one if
/// the CPU lacks the path (callers check support first and report it as an error).
macro_rules! select {
    ($name:ident: $ret:ty, $avx512:ident, $avx2:ident, $portable:ident) => {
        pub(super) fn $name(path: CpuPath) -> $ret {
            let path = if path.is_supported() {
                path
            } else {
                CpuPath::Portable
            };
            match path {
                #[cfg(target_arch = "x86_64")]
                CpuPath::Avx512 => $avx512,
                #[cfg(target_arch = "x86_64")]
                CpuPath::Avx2 => $avx2,
                _ => $portable,
            }
        }
    };
}
select!(kernel_f32: Kernel<f32>, AVX512_F32, AVX2_F32, PORTABLE_F32);
select!(kernel_f64: Kernel<f64>, AVX512_F64, AVX2_F64, PORTABLE_F64);

/// `spec::check_finite`'s scan of an operand: the largest `|x|` of `m` as its bits
/// ([`Element::abs_bits`]), or [`Element::INFINITY_BITS`] if an entry is NaN or ±∞.
pub(crate) type AbsMaxFn<T> = fn(&MatRef<'_, T>) -> u64;

/// The body of every path's [`AbsMaxFn`], over the vector operations `L`, four vectors of
/// accumulators kept across the columns (reduced once at the end: reducing per column
/// cost as much as the scan for columns of 64, and the compiler's own vectorisation of a
/// plain loop came out with gathers under AVX-512). `|x| = max(x, 0 − x)` and the poison
/// sum `Σ x·0` (NaN exactly when some `x` is NaN or ±∞) are exact, so every path gives
/// the same result.
///
/// # Safety
/// The CPU must have `L`'s features.
#[inline(always)]
unsafe fn abs_max_bits<L: Lanes>(m: &MatRef<'_, L::T>) -> u64 {
    // SAFETY: the caller guarantees the features; every load reads N elements of a chunk
    // of exactly N, and every store writes N lanes into a buffer of 16 ≥ N.
    unsafe {
        let zero = L::splat(L::T::zero());
        let mut acc = AbsMaxAcc::<L> {
            max: [zero; 4],
            poison: [zero; 4],
            max_s: L::T::zero(),
            poison_s: L::T::zero(),
        };
        let (rows, cols) = m.shape();
        if m.strides() == (1, rows) {
            // Columns back to back (a whole matrix, or a block of whole columns): one run,
            // so no per-column setup (which cost as much as the scan for columns of 64).
            // SAFETY: with these strides the view's entries are exactly the `rows · cols`
            // elements from its first one, all valid for reads while `m` is borrowed.
            let all = std::slice::from_raw_parts(m.as_ptr(), rows * cols);
            abs_max_run::<L>(all, &mut acc);
        } else {
            for_each_column(
                m,
                0..rows,
                &mut Vec::new(),
                #[inline(always)]
                |_, col| abs_max_run::<L>(col, &mut acc),
            );
        }
        let AbsMaxAcc {
            max,
            poison,
            mut max_s,
            mut poison_s,
        } = acc;
        if rows * cols >= L::N {
            // The four vectors into one, then its lanes (skipped when no whole vector was
            // read: for a 2 × 2 call this reduction was most of the scan).
            let mx = L::max(L::max(max[0], max[1]), L::max(max[2], max[3]));
            let po = L::add(L::add(poison[0], poison[1]), L::add(poison[2], poison[3]));
            let (mut lanes, mut poisons) = ([L::T::zero(); 16], [L::T::zero(); 16]);
            L::store(lanes.as_mut_ptr(), mx);
            L::store(poisons.as_mut_ptr(), po);
            max_s = lanes[..L::N]
                .iter()
                .fold(max_s, |a, &b| if b > a { b } else { a });
            poison_s = poisons[..L::N].iter().fold(poison_s, |a, &b| a + b);
        }
        if poison_s.finite() {
            max_s.abs_bits()
        } else {
            L::T::INFINITY_BITS
        }
    }
}

/// [`abs_max_bits`]' accumulators: four vectors of `|x|` maxima and of poison sums, and
/// scalar ones for the elements past the last whole vector of a run.
struct AbsMaxAcc<L: Lanes> {
    max: [L::V; 4],
    poison: [L::V; 4],
    max_s: L::T,
    poison_s: L::T,
}

/// Takes the run `col` into `acc` (a function, not a closure: a closure does not inherit
/// its caller's target features, and its intrinsics became calls).
///
/// # Safety
/// The CPU must have `L`'s features.
#[inline(always)]
unsafe fn abs_max_run<L: Lanes>(col: &[L::T], acc: &mut AbsMaxAcc<L>) {
    // SAFETY: the caller guarantees the features; every load reads N elements of a chunk
    // of exactly 4N or N.
    unsafe {
        let zero = L::splat(L::T::zero());
        let quads = col.chunks_exact(4 * L::N);
        let singles = quads.remainder().chunks_exact(L::N);
        let rest = singles.remainder();
        for quad in quads {
            for (u, (mx, po)) in acc.max.iter_mut().zip(&mut acc.poison).enumerate() {
                let x = L::load(quad.as_ptr().add(u * L::N));
                *mx = L::max(*mx, L::max(x, L::sub(zero, x)));
                *po = L::add(*po, L::mul(x, zero));
            }
        }
        for single in singles {
            let x = L::load(single.as_ptr());
            acc.max[0] = L::max(acc.max[0], L::max(x, L::sub(zero, x)));
            acc.poison[0] = L::add(acc.poison[0], L::mul(x, zero));
        }
        for &x in rest {
            let a = if x < L::T::zero() { -x } else { x };
            acc.max_s = if a > acc.max_s { a } else { acc.max_s };
            acc.poison_s += x * L::T::zero();
        }
    }
}

/// Declares one path's [`AbsMaxFn`] as a `static`: [`abs_max_bits`] compiled by a
/// `#[target_feature]` function, called through a safe entry point.
macro_rules! abs_max_scan {
    ($scan:ident: $t:ty, $lanes:ty, $features:literal, $token:ident) => {
        #[cfg(target_arch = "x86_64")]
        static $scan: AbsMaxFn<$t> = {
            #[target_feature(enable = $features)]
            fn compiled(_: $token, m: &MatRef<'_, $t>) -> u64 {
                // SAFETY: the token proves the CPU has `$features`, `$lanes`' features.
                unsafe { abs_max_bits::<$lanes>(m) }
            }
            fn entry(m: &MatRef<'_, $t>) -> u64 {
                // `abs_max_f32` / `abs_max_f64` hand out this scan only for a supported
                // path, so detection succeeds here.
                let token = $token::detect().expect("the scan of a path this CPU supports");
                // SAFETY: `token` exists, so the CPU has `$features`.
                unsafe { compiled(token, m) }
            }
            entry
        };
    };
}

abs_max_scan!(ABS_MAX_AVX512_F32: f32, Avx512F32, "avx512f,avx2,fma", Avx512);
abs_max_scan!(ABS_MAX_AVX512_F64: f64, Avx512F64, "avx512f,avx2,fma", Avx512);
abs_max_scan!(ABS_MAX_AVX2_F32: f32, Avx2F32, "avx2,fma", Avx2);
abs_max_scan!(ABS_MAX_AVX2_F64: f64, Avx2F64, "avx2,fma", Avx2);
static ABS_MAX_PORTABLE_F32: AbsMaxFn<f32> = |m| {
    // SAFETY: the portable lanes need no CPU feature.
    unsafe { abs_max_bits::<PortableF32>(m) }
};
static ABS_MAX_PORTABLE_F64: AbsMaxFn<f64> = |m| {
    // SAFETY: as above.
    unsafe { abs_max_bits::<PortableF64>(m) }
};
select!(abs_max_f32: AbsMaxFn<f32>, ABS_MAX_AVX512_F32, ABS_MAX_AVX2_F32, ABS_MAX_PORTABLE_F32);
select!(abs_max_f64: AbsMaxFn<f64>, ABS_MAX_AVX512_F64, ABS_MAX_AVX2_F64, ABS_MAX_PORTABLE_F64);

/// Declares one path's decoding kernel as a `static`: the body (`decode::part`, with FMA)
/// compiled by a `#[target_feature]` function, called through a safe entry point. The
/// vector code is what the compiler makes of the body's loops over keys under the path's
/// target features.
macro_rules! decode_kernel {
    ($kernel:ident: $t:ty, $features:literal, $token:ident) => {
        #[cfg(target_arch = "x86_64")]
        static $kernel: PartFn<$t> = {
            #[target_feature(enable = $features)]
            fn compiled(_: $token, group: &Group<'_, '_, $t>, keys: Range<usize>) -> State<$t> {
                decode::part::<$t, true>(group, keys)
            }
            fn entry(group: &Group<'_, '_, $t>, keys: Range<usize>) -> State<$t> {
                // `decode_f32` / `decode_f64` hand out this kernel only for a supported
                // path, so detection succeeds here.
                let token = $token::detect().expect("the kernel of a path this CPU supports");
                // SAFETY: `token` exists, so the CPU has every feature of `$token`'s path,
                // which are the features in `$features` (`CpuFeatures::supports`).
                unsafe { compiled(token, group, keys) }
            }
            entry
        };
    };
}

decode_kernel!(DECODE_AVX512_F32: f32, "avx512f,avx2,fma", Avx512);
decode_kernel!(DECODE_AVX512_F64: f64, "avx512f,avx2,fma", Avx512);
decode_kernel!(DECODE_AVX2_F32: f32, "avx2,fma", Avx2);
decode_kernel!(DECODE_AVX2_F64: f64, "avx2,fma", Avx2);
/// The portable decoding kernels: the same body, no target features, no FMA.
static DECODE_PORTABLE_F32: PartFn<f32> = decode::part::<f32, false>;
static DECODE_PORTABLE_F64: PartFn<f64> = decode::part::<f64, false>;
select!(decode_f32: PartFn<f32>, DECODE_AVX512_F32, DECODE_AVX2_F32, DECODE_PORTABLE_F32);
select!(decode_f64: PartFn<f64>, DECODE_AVX512_F64, DECODE_AVX2_F64, DECODE_PORTABLE_F64);
select!(grad_f32: GradKernel<f32>, GRAD_AVX512_F32, GRAD_AVX2_F32, GRAD_PORTABLE_F32);
select!(grad_f64: GradKernel<f64>, GRAD_AVX512_F64, GRAD_AVX2_F64, GRAD_PORTABLE_F64);

/// Calls `f` from a function compiled for `path`'s instruction set (the portable path, or
/// a path this CPU lacks: the target's baseline), so that the loops `f` inlines are
/// vectorised for it: for plain-Rust scans over an operand (the bias check, `spec.rs`)
/// that would otherwise run on SSE2's 128-bit registers. Only code inlined into `f` gets
/// the features: keep what `f` calls `#[inline(always)]`. `f` must compute the same
/// result on every path (exact operations), which is what makes the choice free.
pub(crate) fn with_path_features<R>(path: CpuPath, f: impl FnOnce() -> R) -> R {
    #[cfg(target_arch = "x86_64")]
    {
        #[target_feature(enable = "avx512f,avx2,fma")]
        fn avx512<R>(_: Avx512, f: impl FnOnce() -> R) -> R {
            f()
        }
        #[target_feature(enable = "avx2,fma")]
        fn avx2<R>(_: Avx2, f: impl FnOnce() -> R) -> R {
            f()
        }
        match path {
            CpuPath::Avx512 => {
                if let Some(token) = Avx512::detect() {
                    // SAFETY: the token proves the CPU has the function's features.
                    return unsafe { avx512(token, f) };
                }
            }
            CpuPath::Avx2 => {
                if let Some(token) = Avx2::detect() {
                    // SAFETY: as above.
                    return unsafe { avx2(token, f) };
                }
            }
            CpuPath::Portable => {}
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = path;
    f()
}

/// Asks the CPU to bring the cache line holding `x` into its level-2 cache (x86-64's
/// `prefetcht1`; nothing elsewhere): a hint that reads and changes nothing. The decoding
/// kernel issues it for each line of the next chunk while it computes the current one,
/// since its keys and values come from memory once per token and the hardware prefetcher
/// alone leaves it waiting on them (a KV cache's pages: 1.95× → 1.5× the bandwidth floor,
/// measured on a Xeon, `docs/PERFORMANCE.md`).
#[inline(always)]
pub(crate) fn prefetch<T>(x: &T) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: `prefetcht1` needs SSE, part of every x86-64 CPU; a prefetch never faults,
    // reads nothing into the program and writes nothing, and `x` is a valid reference.
    unsafe {
        use std::arch::x86_64::{_MM_HINT_T1, _mm_prefetch};
        _mm_prefetch::<_MM_HINT_T1>(std::ptr::from_ref(x).cast::<i8>());
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = x;
}

#[cfg(all(test, target_arch = "x86_64"))]
mod tests {
    use super::*;

    /// `f` applied to `xs` (length a multiple of N), N lanes at a time.
    ///
    /// # Safety
    /// The CPU must have `L`'s features (`f` runs them on each vector).
    unsafe fn map_lanes<L: Lanes>(xs: &[L::T], f: impl Fn(L::V) -> L::V) -> Vec<L::T> {
        let mut out = vec![L::T::zero(); xs.len()];
        for i in (0..xs.len()).step_by(L::N) {
            // SAFETY: i + N ≤ len for both buffers; features per the caller.
            unsafe { L::store(out.as_mut_ptr().add(i), f(L::load(xs.as_ptr().add(i)))) };
        }
        out
    }

    /// Worst error in ulps of `exp_v::<L>` against `f64::exp` over `xs` (lengths a multiple
    /// of the lane count).
    ///
    /// # Safety
    /// The CPU must have `L`'s features.
    unsafe fn worst_ulps<L: Lanes>(xs: &[L::T]) -> u64
    where
        L::T: Into<f64> + Copy,
    {
        // Exactly 1 at ±0, exactly 0 at −∞ (masked scores) and far below the cutoff, in
        // every lane.
        let huge = L::T::from_f64_rounded(-1e30);
        let special = [L::T::zero(), -L::T::zero(), L::T::NEG_INFINITY, huge];
        for x in special {
            let mut y = vec![L::T::MAX; L::N];
            // SAFETY: `y` holds exactly N lanes; features per the caller.
            unsafe { L::store(y.as_mut_ptr(), exp_v::<L>(L::splat(x))) };
            let want = if x == L::T::zero() {
                L::T::from_f64_rounded(1.0)
            } else {
                L::T::zero()
            };
            assert!(y.iter().all(|&e| e == want), "exp({x:?}) = {y:?}");
        }
        // SAFETY: features per the caller.
        let out = unsafe { map_lanes::<L>(xs, |v| exp_v::<L>(v)) };
        xs.iter()
            .zip(&out)
            .map(|(&x, &y)| {
                let want = L::T::from_f64_rounded(Into::<f64>::into(x).exp());
                let (a, b) = (Into::<f64>::into(y), Into::<f64>::into(want));
                // Compare as ulps of the element type.
                ((a - b).abs() / (b * L::T::EPSILON.to_f64()).max(f64::MIN_POSITIVE)).ceil() as u64
            })
            .max()
            .unwrap_or(0)
    }

    fn grid<T: Element>(lo: f64, count: usize) -> Vec<T> {
        (0..count)
            .map(|i| T::from_f64_rounded(lo * i as f64 / count as f64))
            .collect()
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f,avx2,fma")]
    fn avx512_worst() -> (u64, u64) {
        // SAFETY: this function is only called after the features were detected.
        unsafe {
            (
                worst_ulps::<Avx512F32>(&grid::<f32>(f64::from(f32::CUTOFF), 1 << 16)),
                worst_ulps::<Avx512F64>(&grid::<f64>(f64::CUTOFF, 1 << 16)),
            )
        }
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    fn avx2_worst() -> (u64, u64) {
        // SAFETY: this function is only called after the features were detected.
        unsafe {
            (
                worst_ulps::<Avx2F32>(&grid::<f32>(f64::from(f32::CUTOFF), 1 << 16)),
                worst_ulps::<Avx2F64>(&grid::<f64>(f64::CUTOFF, 1 << 16)),
            )
        }
    }

    /// Whether to test `path` (named `name` in `ATTENTION_TEST_HOST_LACKS`): true if this
    /// CPU has it; false if it lacks it and the variable names it; otherwise the test
    /// fails, so that a host without AVX2 or AVX-512 cannot pass without testing them
    /// unless someone said it lacks them (see `docs/TESTING.md`).
    #[cfg(target_arch = "x86_64")]
    fn must_test(path: CpuPath, name: &str) -> bool {
        if path.is_supported() {
            return true;
        }
        let declared = std::env::var("ATTENTION_TEST_HOST_LACKS").unwrap_or_default();
        assert!(
            declared
                .to_ascii_lowercase()
                .split(',')
                .any(|d| d.trim() == name),
            "this CPU lacks the {path:?} path, so its exponential is untested; set \
             ATTENTION_TEST_HOST_LACKS={name} (comma-separated) if that is expected"
        );
        eprintln!("{path:?} not tested: ATTENTION_TEST_HOST_LACKS says this CPU lacks it");
        false
    }

    /// The vector exponential of every path, against `std`, and its special values (the
    /// portable lanes on dense grids: every 10⁻⁴ down to the cutoff, −59, for f32, every
    /// 10⁻³ down to −640 for f64).
    #[test]
    fn vector_exp_within_2_ulp_on_every_path() {
        // SAFETY: the portable lanes need no CPU feature.
        let (w32, w64) = unsafe {
            (
                worst_ulps::<PortableF32>(&grid::<f32>(f64::from(f32::CUTOFF), 590_000)),
                worst_ulps::<PortableF64>(&grid::<f64>(f64::CUTOFF, 640_000)),
            )
        };
        println!("portable exp: worst {w32} / {w64} ulp");
        assert!(w32 <= 2 && w64 <= 2, "portable exp: {w32} / {w64} ulp");
        #[cfg(target_arch = "x86_64")]
        if must_test(CpuPath::Avx512, "avx512") {
            // SAFETY: AVX-512F, AVX2 and FMA were detected (`is_supported`) just above.
            let (w32, w64) = unsafe { avx512_worst() };
            println!("AVX-512 exp: worst {w32} / {w64} ulp");
            assert!(w32 <= 2 && w64 <= 2, "AVX-512 exp: {w32} / {w64} ulp");
        }
        #[cfg(target_arch = "x86_64")]
        if must_test(CpuPath::Avx2, "avx2") {
            // SAFETY: AVX2 and FMA were detected (`is_supported`) just above.
            let (w32, w64) = unsafe { avx2_worst() };
            println!("AVX2 exp: worst {w32} / {w64} ulp");
            assert!(w32 <= 2 && w64 <= 2, "AVX2 exp: {w32} / {w64} ulp");
        }
    }

    /// Worst error in ulps (of T) of `tanh_v::<L>` against `f64::tanh` (rounded to T) over
    /// `xs` (length a multiple of N).
    ///
    /// # Safety
    /// The CPU must have `L`'s features.
    unsafe fn worst_tanh_ulps<L: Lanes>(xs: &[L::T]) -> u64
    where
        L::T: Into<f64> + Copy,
    {
        // SAFETY: features per the caller.
        let out = unsafe { map_lanes::<L>(xs, |v| tanh_v::<L, false>(v)) };
        xs.iter()
            .zip(&out)
            .map(|(&x, &y)| {
                let want = L::T::from_f64_rounded(Into::<f64>::into(x).tanh());
                let (a, b) = (Into::<f64>::into(y), Into::<f64>::into(want));
                if a == b {
                    return 0;
                }
                let ulp = (b.abs() * L::T::EPSILON.to_f64()).max(f64::MIN_POSITIVE);
                ((a - b).abs() / ulp).ceil() as u64
            })
            .max()
            .unwrap_or(0)
    }

    /// Arguments for the vector `tanh`: both signs, every 5·10⁻⁵ up to 20 (across the
    /// switch at 0.625 and out to where tanh rounds to 1), tiny and huge ones, ±0.
    fn tanh_grid<T: Element>() -> Vec<T> {
        let mut xs: Vec<T> = (0..400_000)
            .flat_map(|i| {
                let x = i as f64 * 5e-5;
                [x, -x]
            })
            .map(T::from_f64_rounded)
            .collect();
        for x in [1e-30, 1e-6, 0.625, 30.0, 1e30, T::MAX.to_f64()] {
            xs.extend([T::from_f64_rounded(x), T::from_f64_rounded(-x)]);
        }
        xs.resize(xs.len().next_multiple_of(16), T::zero());
        xs
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f,avx2,fma")]
    fn avx512_tanh_worst() -> (u64, u64) {
        // SAFETY: this function is only called after the features were detected.
        unsafe {
            (
                worst_tanh_ulps::<Avx512F32>(&tanh_grid::<f32>()),
                worst_tanh_ulps::<Avx512F64>(&tanh_grid::<f64>()),
            )
        }
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    fn avx2_tanh_worst() -> (u64, u64) {
        // SAFETY: this function is only called after the features were detected.
        unsafe {
            (
                worst_tanh_ulps::<Avx2F32>(&tanh_grid::<f32>()),
                worst_tanh_ulps::<Avx2F64>(&tanh_grid::<f64>()),
            )
        }
    }

    /// The block kernel's softcap `tanh` on every path: within 3 ulp of `f64::tanh`
    /// rounded to the type (the scalar form's bound, `exp.rs`; `f64::tanh` is itself within
    /// 1 ulp for f64), exact at 0 and where tanh rounds to ±1.
    #[test]
    fn vector_tanh_within_3_ulp_on_every_path() {
        // SAFETY: the portable lanes need no CPU feature.
        let mut worst = vec![("portable", unsafe {
            (
                worst_tanh_ulps::<PortableF32>(&tanh_grid::<f32>()),
                worst_tanh_ulps::<PortableF64>(&tanh_grid::<f64>()),
            )
        })];
        #[cfg(target_arch = "x86_64")]
        if must_test(CpuPath::Avx512, "avx512") {
            // SAFETY: AVX-512F, AVX2 and FMA were detected (`is_supported`) just above.
            worst.push(("AVX-512", unsafe { avx512_tanh_worst() }));
        }
        #[cfg(target_arch = "x86_64")]
        if must_test(CpuPath::Avx2, "avx2") {
            // SAFETY: AVX2 and FMA were detected (`is_supported`) just above.
            worst.push(("AVX2", unsafe { avx2_tanh_worst() }));
        }
        for (path, (w32, w64)) in worst {
            println!("{path} tanh: worst {w32} / {w64} ulp");
            assert!(w32 <= 3 && w64 <= 3, "{path} tanh: {w32} / {w64} ulp");
        }
    }

    /// `c·tanh(x/c)` of `xs` (length a multiple of N) lane by lane with both branches of
    /// `tanh_v`: what `MicroKernels::softcap` must give, shortcut or not.
    ///
    /// # Safety
    /// The CPU must have `L`'s features.
    unsafe fn softcap_full<L: Lanes>(xs: &[L::T], c: L::T) -> Vec<L::T> {
        // SAFETY: features per the caller.
        unsafe {
            map_lanes::<L>(xs, |x| {
                let cv = L::splat(c);
                L::mul(cv, tanh_v::<L, false>(L::div(x, cv)))
            })
        }
    }

    /// Tiles of 60 × 16 scores for the softcap `c`: all `|x/c|` below `TANH_SMALL`, some
    /// 5 to 20 ulps from it (the shortcut applies); the same with one entry at 0.7·c, or ±∞
    /// or NaN, first or last (it must not).
    fn softcap_tiles<T: Element>(c: f64) -> Vec<Vec<T>> {
        let small = 0.625 * c;
        let base: Vec<T> = (0..60 * 16)
            .map(|i| {
                let x = if i < 16 {
                    small * (1.0 - (5 + i) as f64 * T::EPSILON.to_f64())
                } else {
                    small * (((i * 7919) % 1000) as f64 / 1000.0 - 0.5) * 1.99
                };
                T::from_f64_rounded(if i % 2 == 0 { x } else { -x })
            })
            .collect();
        let mut tiles = vec![base.clone()];
        for bad in [
            0.7 * c,
            -0.7 * c,
            f64::INFINITY,
            f64::NEG_INFINITY,
            f64::NAN,
        ] {
            for at in [0, base.len() - 1] {
                let mut t = base.clone();
                t[at] = T::from_f64_rounded(bad);
                tiles.push(t);
            }
        }
        tiles
    }

    /// The block kernel's softcap (`MicroKernels::softcap` of each path) takes the
    /// polynomial alone only where every `|x/c|` is below `TANH_SMALL`: its bits equal the
    /// full formula's lane by lane on every tile of [`softcap_tiles`].
    fn check_softcap<L: Lanes, MK: MicroKernels<L::T>>(
        features: MK::Features,
        full: impl Fn(&[L::T], L::T) -> Vec<L::T>,
        path: &str,
    ) {
        for c in [30.0, 0.5, 1e-3] {
            for (t, tile) in softcap_tiles::<L::T>(c).into_iter().enumerate() {
                let cv = L::T::from_f64_rounded(c);
                let want = full(&tile, cv);
                let mut got = tile.clone();
                MK::softcap(features, &mut got, cv);
                for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                    assert!(
                        g.to_f64().to_bits() == w.to_f64().to_bits(),
                        "{path} softcap {c}, tile {t}, entry {i} (x = {:?}): {g:?} against {w:?}",
                        tile[i]
                    );
                }
            }
        }
    }

    #[test]
    fn softcap_shortcut_gives_the_full_formulas_bits_on_every_path() {
        // SAFETY: the portable lanes need no CPU feature.
        let full = |x: &[f32], c| unsafe { softcap_full::<PortableF32>(x, c) };
        check_softcap::<PortableF32, PortableF32Tiles>((), full, "portable f32");
        // SAFETY: as above.
        let full = |x: &[f64], c| unsafe { softcap_full::<PortableF64>(x, c) };
        check_softcap::<PortableF64, PortableF64Tiles>((), full, "portable f64");
        if must_test(CpuPath::Avx512, "avx512") {
            let f = Avx512::detect().expect("detected just above");
            // SAFETY: AVX-512F, AVX2 and FMA were detected just above.
            let full = |x: &[f32], c| unsafe { softcap_full::<Avx512F32>(x, c) };
            check_softcap::<Avx512F32, Avx512F32Tiles>(f, full, "AVX-512 f32");
            // SAFETY: as above.
            let full = |x: &[f64], c| unsafe { softcap_full::<Avx512F64>(x, c) };
            check_softcap::<Avx512F64, Avx512F64Tiles>(f, full, "AVX-512 f64");
        }
        if must_test(CpuPath::Avx2, "avx2") {
            let f = Avx2::detect().expect("detected just above");
            // SAFETY: AVX2 and FMA were detected just above.
            let full = |x: &[f32], c| unsafe { softcap_full::<Avx2F32>(x, c) };
            check_softcap::<Avx2F32, Avx2F32Tiles>(f, full, "AVX2 f32");
            // SAFETY: as above.
            let full = |x: &[f64], c| unsafe { softcap_full::<Avx2F64>(x, c) };
            check_softcap::<Avx2F64, Avx2F64Tiles>(f, full, "AVX2 f64");
        }
    }

    /// Every path's `check_finite` scan equals the plain maximum of `|x|` over matrices
    /// whose columns end in every position of a vector of four vectors (lengths 0..70,
    /// one to three columns, contiguous and with a row stride), and ±∞ or NaN at any entry
    /// (vector body or scalar rest) lifts it to `INFINITY_BITS`.
    fn check_abs_max<T: Element>(scan: AbsMaxFn<T>, path: CpuPath) {
        use nalgebra::DMatrix;
        for rows in 0..70 {
            for cols in 1..4 {
                let m = DMatrix::<T>::from_fn(rows, cols, |i, j| {
                    T::from_f64_rounded(((i * 7919 + j * 31) % 23) as f64 - 11.5)
                });
                let want = m.iter().fold(T::zero(), |a, &b| {
                    let b = if b < T::zero() { -b } else { b };
                    if b > a { b } else { a }
                });
                let view: MatRef<'_, T> = m.view_with_steps((0, 0), (rows, cols), (0, 0));
                assert_eq!(scan(&view), want.abs_bits(), "{path:?}: {rows} x {cols}");
                // Every other row: a row stride of 2 (the columns copied out).
                let wide = DMatrix::<T>::from_fn(2 * rows, cols, |i, j| {
                    if i % 2 == 0 {
                        m[(i / 2, j)]
                    } else {
                        T::from_f64_rounded(1e6)
                    }
                });
                let strided: MatRef<'_, T> = wide.view_with_steps((0, 0), (rows, cols), (1, 0));
                assert_eq!(
                    scan(&strided),
                    want.abs_bits(),
                    "{path:?}: strided {rows} x {cols}"
                );
                for at in 0..rows * cols {
                    for bad in [f64::NAN, f64::INFINITY, f64::NEG_INFINITY] {
                        let mut bad_m = m.clone();
                        bad_m[at] = T::from_f64_rounded(bad);
                        let view: MatRef<'_, T> =
                            bad_m.view_with_steps((0, 0), (rows, cols), (0, 0));
                        assert_eq!(scan(&view), T::INFINITY_BITS, "{path:?}: {bad} at {at}");
                    }
                }
            }
        }
    }

    #[test]
    fn abs_max_scan_exact_on_every_path() {
        let mut paths = vec![CpuPath::Portable];
        #[cfg(target_arch = "x86_64")]
        {
            if must_test(CpuPath::Avx2, "avx2") {
                paths.push(CpuPath::Avx2);
            }
            if must_test(CpuPath::Avx512, "avx512") {
                paths.push(CpuPath::Avx512);
            }
        }
        for path in paths {
            check_abs_max::<f32>(abs_max_f32(path), path);
            check_abs_max::<f64>(abs_max_f64(path), path);
        }
    }

    /// One online-softmax step alone (`MK::softmax_step`), on query lanes in four states
    /// repeated over the block: no key yet, a smaller and a larger earlier maximum, and
    /// every score masked. Checked against the formulas of `block.rs`'s module
    /// documentation, computed here in f64 with `std`'s exponential.
    fn check_softmax_step<MK: MicroKernels<f64>>(features: MK::Features) {
        let bq = MK::BQ;
        let ninf = f64::NEG_INFINITY;
        // Two keys (rows of `s`), lane r in state r % 4.
        let scores = [[0.5, 1.0, ninf, ninf], [-1.0, 2.0, ninf, ninf]];
        let (m_old, l_old) = ([ninf, 0.0, 1.0, ninf], [0.0, 2.0, 3.0, 0.0]);
        let lanes = |x: [f64; 4]| (0..bq).map(|r| x[r % 4]).collect::<Vec<_>>();
        let mut s: Vec<f64> = scores.iter().flat_map(|&row| lanes(row)).collect();
        let (mut m, mut m_run, mut l) = (lanes(m_old), lanes(m_old), lanes(l_old));
        let (mut acc, mut l_span, mut acc_span) =
            (vec![0.0; bq], vec![f64::NAN; bq], vec![0.0; bq]);
        let (mut alpha, mut beta, mut probe) = (vec![0.0; bq], vec![0.0; bq], vec![0.0; bq]);
        let mut sums = Sums {
            m: &mut m,
            m_run: &mut m_run,
            l: &mut l,
            acc: &mut acc,
            l_span: &mut l_span,
            acc_span: &mut acc_span,
        };
        let mut factors = Factors {
            alpha: &mut alpha,
            beta: &mut beta,
            probe: &mut probe,
        };
        let step = Step {
            first: true,
            flush: true,
        };
        MK::softmax_step(features, &mut s, step, &mut sums, &mut factors);

        for r in 0..bq {
            let k = r % 4;
            let m_new = m_old[k].max(scores[0][k]).max(scores[1][k]);
            // m' = −∞ is replaced by the lowest finite number.
            let m_use = m_new.max(f64::MIN);
            let p: Vec<f64> = (0..2).map(|j| (scores[j][k] - m_use).exp()).collect();
            let a = (m_old[k] - m_use).exp();
            let l_new = a * l_old[k] + p[0] + p[1];
            let close = |got: f64, want: f64| {
                (got - want).abs() <= 4.0 * f64::EPSILON * want.abs().max(1.0)
            };
            assert_eq!(m[r], m_new, "lane {r}: m");
            assert!(close(alpha[r], a), "lane {r}: alpha {} vs {a}", alpha[r]);
            for j in 0..2 {
                assert!(close(s[j * bq + r], p[j]), "lane {r}, key {j}: p");
            }
            assert!(close(l[r], l_new), "lane {r}: l {} vs {l_new}", l[r]);
            assert!(!l[r].is_nan() && !alpha[r].is_nan(), "lane {r}: NaN");
            if k == 3 {
                // The masked lane: nothing, exactly.
                assert_eq!((s[r], s[bq + r], l[r], m[r]), (0.0, 0.0, 0.0, ninf));
            }
        }
    }

    /// The online-softmax step on every path this CPU has (see [`check_softmax_step`]).
    #[test]
    fn online_softmax_step_matches_its_formulas() {
        check_softmax_step::<PortableF64Tiles>(());
        #[cfg(target_arch = "x86_64")]
        if must_test(CpuPath::Avx512, "avx512") {
            let token = Avx512::detect().expect("detected just above");
            check_softmax_step::<Avx512F64Tiles>(token);
        }
        #[cfg(target_arch = "x86_64")]
        if must_test(CpuPath::Avx2, "avx2") {
            let token = Avx2::detect().expect("detected just above");
            check_softmax_step::<Avx2F64Tiles>(token);
        }
    }
}
