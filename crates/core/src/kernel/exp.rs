//! The softmax's branch-free `exp`: its constants, and the scalar form [`exp_nonpos`] that
//! the decoding kernel (`decode.rs`) calls in loops the compiler vectorises under each
//! path's target features. The block kernel's is `simd.rs`'s `exp_v`, written over the
//! vector operations of every CPU path (the portable lanes included), with a smaller
//! polynomial and a table in a register (below).
//!
//! The kernels only ever need `exp(x)` for `x ≤ 0` (a score minus its row maximum) or
//! `x = −∞` (a masked score, which must give exactly 0). Method (Cody–Waite):
//!
//! ```text
//! exp(x) = 2^n · exp(r),   n = round(x · log2 e),   r = x − n·ln2_hi − n·ln2_lo,  |r| ≤ ln2/2
//! ```
//! `exp(r)` is its Taylor polynomial, degree 7 for f32 (truncation < 6e-9 relative) and 13
//! for f64 (< 5e-18), evaluated by Horner; `2^n` is built from the exponent bits. `round`
//! is the add-and-subtract-1.5·2^p trick, which needs no rounding instruction. Arguments
//! below −59 (f32) / −640 (f64) give 0: there e^x < 2^−85 (f32) / 2^−923 (f64), and every
//! caller adds it to a sum that holds a term equal to 1 (the row's largest weight, or 1 −
//! e in `tanh`, which rounds to 1 from |x| ≈ 9 for f32, 19 for f64), so it cannot matter
//! even summed over 2^40 keys. The cutoff is not the smallest normal number (e^−87 /
//! e^−708): a weight between the two, times a value below 1, is a subnormal number, and
//! x86 cores take a microcode assist of about a hundred cycles for every vector
//! instruction with a subnormal result. Measured (`options` bench, f32, n = 4096, d =
//! 128, ALiBi slope whose far keys fall in that range): 0.66–0.78 of the plain rate with
//! the cutoff at −87, 0.95–1.16 with subnormal results flushed by the CPU instead. Above
//! the cutoff, a weight times a value is a normal number unless |v| < 2^−41 (f32) /
//! 2^−99 (f64).
//! Measured error: `scalar_exp_within_2_ulp` (at most 1 ulp from `std`'s, fused or not).
//!
//! **The block kernel's exponential** (`simd.rs`, `exp_v`) reduces further, by a table of
//! N = 16 (f32) or 8 (f64) entries, so that its polynomial is shorter:
//! ```text
//! exp(x) = 2^(k/N) · exp(r),  k = round(x · N·log2 e),  r = x − k·ln2_hi/N − k·ln2_lo/N,
//! |r| ≤ ln2/(2N);  2^(k/N) = 2^⌊k/N⌋ · T[k mod N],  T[j] = 2^(j/N) rounded once
//! exp(x) ≈ s + s·(r·q(r)),  s = 2^(k/N),  q(r) = Σ_{i<d} r^i/(i+1)!  (d = 3 for f32, 8 for f64)
//! ```
//! (truncation below 0.08 ulp for f32, 0.007 ulp for f64). `q` is evaluated by Horner,
//! except for AVX2 f64 (`Lanes::ESTRIN`), by Estrin's scheme (`r² = r·r`, `r⁴ = r²·r²`,
//! four FMAs on pairs of coefficients, two joining them with `r²`, one with `r⁴`): two
//! more multiplications than Horner's 7 FMAs, and a dependent chain of 3 FMAs after `r⁴`
//! instead of 7, which the AVX2 softmax, with room in 16 registers for few exponentials
//! at a time, could not hide (Zen 4, d = 64: about 2% faster; on AVX-512 about 1% slower).
//! The worst error measured is the same either way: 0.987 ulp by Estrin, 0.984 by Horner
//! (AVX2 and AVX-512 alike on the test's grid). The table lookup is one
//! permutation across a register (`vpermd`/`vpermq` on AVX-512; on AVX2 two 8 × 32-bit
//! permutations and a blend), so it is cheaper than the polynomial terms it saves: the
//! f64 exponential's FMA-pipe instructions drop from 17 to 12 per vector (14 with Estrin's
//! scheme; llvm-mca `-mcpu=znver5`: 19.5 to 14.8 cycles per vector, the model's 512-bit
//! FMA taking two of its pipes' cycles), and the f32 one's from 11 to 8. The last step
//! rounds once, so the table's own rounding (½ ulp) and that step's (½ ulp) are the
//! error: `vector_exp_within_2_ulp_on_every_path` measures at most 1 ulp from `std`'s, on
//! every path, as the Taylor form above did. Scalar code keeps the Taylor form: in a loop
//! the compiler vectorises, a table lookup becomes a gather.
//!
//! The softcap's `tanh` ([`tanh`]) is built on the same exponential, branch-free, so that
//! it vectorises too:
//! ```text
//! |x| < 0.625:  tanh(x) = x + x·z·P(z),  z = x²    (P: Chebyshev fit of (tanh(√z)/√z − 1)/z,
//!                                                  degree 5 for f32, 11 for f64)
//! |x| ≥ 0.625:  tanh(x) = ±(1 − e)/(1 + e),  e = exp(−2|x|) = exp_nonpos(−2|x|)
//! ```
//! The fit's own error is below 0.02 ulp (f32) and 0.015 ulp (f64), and `e ≤ 0.29` in
//! the large branch, so `1 − e` loses little to cancellation. Measured
//! (`tanh_within_3_ulp`): at most 1 ulp from the correctly rounded f32 result, at most 3
//! ulp from `f64::tanh`, over both branches, tiny and huge arguments; exact at ±0, ±∞ and
//! where tanh rounds to ±1. It uses no fused multiply-add, so every path and every caller
//! of this scalar form (`score.rs`: the softcap of the decoding kernel, the careful path
//! and the weights, its derivative in the backward pass) gets the same bits; it replaced
//! `std`'s `tanh`, a library call per score that kept the softcap at a fifth of the plain
//! rate. The block kernel softcaps a whole tile at once with `simd.rs`'s `tanh_v`: the
//! same method with fused multiply-adds and the table exponential (f64 n 1024 d 64 on Zen
//! 5: the softcapped rate 0.63 → 0.72 of the plain one); at most 2 ulp (f32) and 3 ulp
//! (f64) from `f64::tanh` on every path (`vector_tanh_within_3_ulp_on_every_path`). A tile
//! whose `|x/c|` are all below 0.625 takes the polynomial alone, with the same bits
//! (`softcap_shortcut_gives_the_full_formulas_bits_on_every_path`; f64 on Zen 4: 0.73–0.82
//! → 0.78–0.93 of the plain rate).

/// The constants of the exponential for one element type.
pub(crate) trait ExpConsts: crate::Element {
    const LOG2E: Self;
    /// 1.5·2^(mantissa bits): adding and subtracting it rounds to an integer.
    const SHIFT: Self;
    /// ln 2 split so that `n·LN2_HI` is exact for the `n` that occur.
    const LN2_HI: Self;
    const LN2_LO: Self;
    /// Below this the result is 0 (see the module documentation: well above the smallest
    /// normal number, so that weights times values stay normal).
    const CUTOFF: Self;
    /// Taylor coefficients 1/k!, highest degree first.
    const COEFFS: &'static [Self];
    /// Builds 2^n from `t = n + SHIFT`.
    fn pow2_shifted(t: Self) -> Self;
    /// The block kernel's table method (see the module documentation): `N·log2 e`,
    /// `ln2_hi / N`, `ln2_lo / N` (exact: N is a power of 2).
    const LOG2E_N: Self;
    const LN2_HI_N: Self;
    const LN2_LO_N: Self;
    /// The table method's polynomial `(e^r − 1)/r` for `|r| ≤ ln2/(2N)`: Taylor
    /// coefficients 1/(k+1)!, highest degree first.
    const TABLE_COEFFS: &'static [Self];
    /// 2^(k/N) from `t = k + SHIFT` (the scalar form of the vector paths' table lookup).
    fn pow2_table(t: Self) -> Self;
    /// The coefficients of `P` of [`tanh`]'s small branch, highest degree first.
    const TANH_COEFFS: &'static [Self];
    /// Where [`tanh`] switches from the polynomial to the exponential: 0.625.
    const TANH_SMALL: Self;
}

impl ExpConsts for f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const SHIFT: f32 = 12_582_912.0; // 1.5 · 2^23
    const LN2_HI: f32 = 0.693_359_4; // ln 2 to 12 bits
    const LN2_LO: f32 = -2.121_944_4e-4; // ln 2 − LN2_HI
    const CUTOFF: f32 = -59.0;
    const COEFFS: &'static [f32] = &[
        1.0 / 5040.0,
        1.0 / 720.0,
        1.0 / 120.0,
        1.0 / 24.0,
        1.0 / 6.0,
        0.5,
        1.0,
        1.0,
    ];
    const TANH_COEFFS: &'static [f32] = &[
        0.002_292_744_8,
        -0.008_343_945,
        0.021_768_918,
        -0.053_959_258,
        0.133_333_04,
        -0.333_333_34,
    ];
    const TANH_SMALL: f32 = 0.625;
    #[inline(always)]
    fn pow2_shifted(t: f32) -> f32 {
        // t's low mantissa bits hold 2^22 + n; subtracting SHIFT's bits leaves n.
        let n = t.to_bits().wrapping_sub(Self::SHIFT.to_bits()) as i32;
        f32::from_bits(((n + 127) as u32) << 23)
    }
    const LOG2E_N: f32 = Self::LOG2E * 16.0;
    const LN2_HI_N: f32 = Self::LN2_HI / 16.0;
    const LN2_LO_N: f32 = Self::LN2_LO / 16.0;
    // 1/3!, 1/2!, 1/1!: `COEFFS` without its four highest terms and its constant.
    const TABLE_COEFFS: &'static [f32] = Self::COEFFS.split_at(4).1.split_at(3).0;
    #[inline(always)]
    fn pow2_table(t: f32) -> f32 {
        let b = t.to_bits();
        f32::from_bits(POW2_TABLE_F32[(b & 15) as usize].wrapping_add(b << 19))
    }
}

impl ExpConsts for f64 {
    const LOG2E: f64 = std::f64::consts::LOG2_E;
    const SHIFT: f64 = 6_755_399_441_055_744.0; // 1.5 · 2^52
    const LN2_HI: f64 = 0.693_147_180_369_123_8; // fdlibm's split of ln 2
    const LN2_LO: f64 = 1.908_214_929_270_587_7e-10;
    const CUTOFF: f64 = -640.0;
    const COEFFS: &'static [f64] = &[
        1.0 / 6_227_020_800.0,
        1.0 / 479_001_600.0,
        1.0 / 39_916_800.0,
        1.0 / 3_628_800.0,
        1.0 / 362_880.0,
        1.0 / 40320.0,
        1.0 / 5040.0,
        1.0 / 720.0,
        1.0 / 120.0,
        1.0 / 24.0,
        1.0 / 6.0,
        0.5,
        1.0,
        1.0,
    ];
    const TANH_COEFFS: &'static [f64] = &[
        6.485_163_482_793_113e-6,
        -3.120_110_142_579_74e-5,
        9.257_116_129_556_769e-5,
        -0.000_237_590_649_605_556_2,
        0.000_589_660_657_775_704_3,
        -0.001_455_775_412_047_805_5,
        0.003_592_121_751_154_962_2,
        -0.008_863_235_103_240_878,
        0.021_869_488_519_008_305,
        -0.053_968_253_967_896_99,
        0.133_333_333_333_330_42,
        -0.333_333_333_333_333_3,
    ];
    const TANH_SMALL: f64 = 0.625;
    #[inline(always)]
    fn pow2_shifted(t: f64) -> f64 {
        let n = t.to_bits().wrapping_sub(Self::SHIFT.to_bits()) as i64;
        f64::from_bits(((n + 1023) as u64) << 52)
    }
    const LOG2E_N: f64 = Self::LOG2E * 8.0;
    const LN2_HI_N: f64 = Self::LN2_HI / 8.0;
    const LN2_LO_N: f64 = Self::LN2_LO / 8.0;
    // 1/8! .. 1/1!: `COEFFS` without its five highest terms and its constant.
    const TABLE_COEFFS: &'static [f64] = Self::COEFFS.split_at(5).1.split_at(8).0;
    #[inline(always)]
    fn pow2_table(t: f64) -> f64 {
        let b = t.to_bits();
        f64::from_bits(POW2_TABLE_F64[(b & 7) as usize].wrapping_add(b << 49))
    }
}

/// The bits of 2^(j/16), j < 16, correctly rounded to f32 (computed with Python's
/// `decimal` at 60 digits; `pow2_fractions_correctly_rounded` checks them).
pub(crate) const POW2_FRAC_F32: [u32; 16] = [
    0x3f80_0000,
    0x3f85_aac3,
    0x3f8b_95c2,
    0x3f91_c3d3,
    0x3f98_37f0,
    0x3f9e_f532,
    0x3fa5_fed7,
    0x3fad_583f,
    0x3fb5_04f3,
    0x3fbd_08a4,
    0x3fc5_672a,
    0x3fce_248c,
    0x3fd7_44fd,
    0x3fe0_ccdf,
    0x3fea_c0c7,
    0x3ff5_257d,
];
/// The bits of 2^(j/8), j < 8, correctly rounded to f64 (as [`POW2_FRAC_F32`]).
pub(crate) const POW2_FRAC_F64: [u64; 8] = [
    0x3ff0_0000_0000_0000,
    0x3ff1_72b8_3c7d_517b,
    0x3ff3_06fe_0a31_b715,
    0x3ff4_bfda_d536_2a27,
    0x3ff6_a09e_667f_3bcd,
    0x3ff8_ace5_422a_a0db,
    0x3ffa_e89f_995a_d3ad,
    0x3ffd_5818_dcfb_a487,
];
/// The tables as the lookups read them: entry j less `j << (mantissa bits − log2 N)`, so
/// that adding `t`'s bits shifted left by `mantissa bits − log2 N` (which moves `k = N·n +
/// j` there: `n` into the exponent field, `j` into the top of the mantissa) leaves the
/// bits of 2^n · 2^(j/N). `SHIFT`'s own bits leave in that shift (its low 13 bits for f32,
/// 15 for f64, are zero), and the wrapping add handles negative `k`.
pub(crate) const POW2_TABLE_F32: [u32; 16] = {
    let mut a = POW2_FRAC_F32;
    let mut j = 0;
    while j < 16 {
        a[j] -= (j as u32) << 19;
        j += 1;
    }
    a
};
/// [`POW2_TABLE_F32`] for f64: 8 entries, `j << 49`.
pub(crate) const POW2_TABLE_F64: [u64; 8] = {
    let mut a = POW2_FRAC_F64;
    let mut j = 0;
    while j < 8 {
        a[j] -= (j as u64) << 49;
        j += 1;
    }
    a
};

/// `a · b + c`, fused when the kernel was compiled for a CPU with FMA.
#[inline(always)]
pub(crate) fn madd<T: crate::Element, const FMA: bool>(a: T, b: T, c: T) -> T {
    if FMA { a.mul_add(b, c) } else { a * b + c }
}

/// `exp(x)` for `x ≤ 0` or `x = −∞`, scalar and branch-free; the same operations as
/// `simd.rs`'s `exp_v` lane by lane (see the module documentation).
#[inline(always)]
pub(crate) fn exp_nonpos<T: ExpConsts, const FMA: bool>(x: T) -> T {
    let xc = if x < T::CUTOFF { T::CUTOFF } else { x };
    let t = madd::<T, FMA>(xc, T::LOG2E, T::SHIFT);
    let n = t - T::SHIFT;
    let r = madd::<T, FMA>(n, -T::LN2_HI, xc);
    let r = madd::<T, FMA>(n, -T::LN2_LO, r);
    let mut p = T::COEFFS[0];
    for &c in &T::COEFFS[1..] {
        p = madd::<T, FMA>(p, r, c);
    }
    if x < T::CUTOFF {
        T::zero()
    } else {
        p * T::pow2_shifted(t)
    }
}

/// `tanh(x)` for every finite `x` (and ±∞), branch-free: see the module documentation.
#[inline(always)]
pub(crate) fn tanh<T: ExpConsts>(x: T) -> T {
    let a = x.abs();
    let z = a * a;
    let mut p = T::TANH_COEFFS[0];
    for &c in &T::TANH_COEFFS[1..] {
        p = p * z + c;
    }
    let small = a + a * (z * p);
    // −2|x| is −∞ for |x| > MAX/2: exp gives 0 and tanh 1.
    let e = exp_nonpos::<T, false>(-(a + a));
    let large = (T::one() - e) / (T::one() + e);
    let t = if a < T::TANH_SMALL { small } else { large };
    t.copysign(x)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// [`tanh`] against `f64::tanh` (for f32, rounded once: a correctly rounded reference
    /// up to f64's own error) and, for f64, against a reference computed in higher
    /// precision where `f64::tanh` is itself not exact: within 3 ulp, across both
    /// branches, tiny and huge arguments, ±0 and ±∞.
    #[test]
    fn tanh_within_3_ulp() {
        let ulps32 =
            |got: f32, want: f32| (got.to_bits() as i64 - want.to_bits() as i64).unsigned_abs();
        let mut worst = 0;
        for i in 0..=400_000 {
            for x in [i as f32 * 5e-5, -(i as f32) * 5e-5, i as f32 * 2e-8] {
                let want = f64::from(x).tanh() as f32;
                let got = tanh(x);
                worst = worst.max(ulps32(got, want));
                assert!(ulps32(got, want) <= 3, "tanh({x}) = {got}, want {want}");
            }
        }
        println!("f32: worst {worst} ulp");
        for x in [0.0f32, 1e-30, 9.0, 50.0, 1e30, f32::MAX, f32::INFINITY] {
            let want = f64::from(x).tanh() as f32;
            assert!(ulps32(tanh(x), want) <= 1, "tanh({x})");
            assert_eq!(tanh(-x).to_bits(), (-tanh(x)).to_bits(), "tanh(-{x}): odd");
        }
        // Exact where tanh is: ±0, tiny arguments, ±1 far out.
        for x in [0.0f32, 1e-30, 50.0, f32::MAX, f32::INFINITY] {
            let want = f64::from(x).tanh() as f32;
            assert_eq!(tanh(x).to_bits(), want.to_bits(), "tanh({x})");
        }
        assert_eq!(tanh(-0.0f32).to_bits(), (-0.0f32).to_bits());
        // f64: against `f64::tanh` (≤ 1 ulp from the truth in glibc), so within 3 + 1.
        let ulps64 =
            |got: f64, want: f64| (got.to_bits() as i128 - want.to_bits() as i128).unsigned_abs();
        let mut worst = 0;
        for i in 0..=400_000 {
            for x in [i as f64 * 5e-5, -(i as f64) * 5e-5, i as f64 * 2e-12] {
                let (got, want) = (tanh(x), x.tanh());
                worst = worst.max(ulps64(got, want));
                assert!(ulps64(got, want) <= 4, "tanh({x}) = {got}, want {want}");
            }
        }
        println!("f64: worst {worst} ulp");
        for x in [0.0f64, 1e-300, 20.0, 1e300, f64::MAX, f64::INFINITY] {
            assert!(ulps64(tanh(x), x.tanh()) <= 1, "tanh({x})");
            assert_eq!(tanh(-x).to_bits(), (-tanh(x)).to_bits(), "tanh(-{x}): odd");
        }
        for x in [0.0f64, 1e-300, 30.0, f64::MAX, f64::INFINITY] {
            assert_eq!(tanh(x).to_bits(), x.tanh().to_bits(), "tanh({x})");
        }
        assert_eq!(tanh(-0.0f64).to_bits(), (-0.0f64).to_bits());
    }

    /// The table of the block kernel's exponential: each 2^(j/N) is the correctly
    /// rounded value (f32: `f64::exp2` rounded to f32, whose own error is far below the
    /// f32 rounding step; f64: within 1 ulp of `f64::exp2`, and 2^(1/2) is `sqrt(2)`, which
    /// IEEE rounds correctly), and `pow2_table(k + SHIFT)` is 2^(k/N) exactly for every
    /// `k` the exponential can produce (down to its cutoff), negative ones included.
    #[test]
    fn pow2_fractions_correctly_rounded() {
        for (j, &b) in POW2_FRAC_F32.iter().enumerate() {
            let want = (j as f64 / 16.0).exp2() as f32;
            assert_eq!(b, want.to_bits(), "2^({j}/16)");
        }
        for (j, &b) in POW2_FRAC_F64.iter().enumerate() {
            let want = (j as f64 / 8.0).exp2();
            let ulps = (b as i64 - want.to_bits() as i64).unsigned_abs();
            assert!(ulps <= 1, "2^({j}/8): {} against {want}", f64::from_bits(b));
        }
        assert_eq!(POW2_FRAC_F64[4], std::f64::consts::SQRT_2.to_bits());
        assert_eq!(POW2_FRAC_F32[8], std::f32::consts::SQRT_2.to_bits());
        let lowest32 = (f32::CUTOFF * f32::LOG2E_N).floor() as i32 - 1;
        for k in lowest32..=16 {
            let got = f32::pow2_table(k as f32 + f32::SHIFT);
            let (n, j) = (k.div_euclid(16), k.rem_euclid(16) as usize);
            let want = f32::from_bits(POW2_FRAC_F32[j]) * 2f32.powi(n);
            assert_eq!(got.to_bits(), want.to_bits(), "2^({k}/16)");
        }
        let lowest64 = (f64::CUTOFF * f64::LOG2E_N).floor() as i64 - 1;
        for k in lowest64..=8 {
            let got = f64::pow2_table(k as f64 + f64::SHIFT);
            let (n, j) = (k.div_euclid(8), k.rem_euclid(8) as usize);
            let want = f64::from_bits(POW2_FRAC_F64[j]) * 2f64.powi(n as i32);
            assert_eq!(got.to_bits(), want.to_bits(), "2^({k}/8)");
        }
    }

    /// The scalar exp against `f64::exp`: within 2 ulp from the cutoff (−59 for f32,
    /// −640 for f64) to 0, 0 below the cutoff and at −∞, 1 at 0, fused or not.
    #[test]
    fn scalar_exp_within_2_ulp() {
        for i in 0..=87_000 {
            let x = -(i as f32) * 1e-3;
            if x < f32::CUTOFF {
                continue; // 0 by design (see the module documentation)
            }
            let want = (f64::from(x)).exp() as f32;
            for got in [exp_nonpos::<f32, true>(x), exp_nonpos::<f32, false>(x)] {
                let ulps = (got.to_bits() as i64 - want.to_bits() as i64).unsigned_abs();
                assert!(ulps <= 2, "exp({x}) = {got}, want {want}");
            }
        }
        for i in 0..=70_800 {
            let x = -(i as f64) * 1e-2;
            if x < f64::CUTOFF {
                continue;
            }
            let want = x.exp();
            for got in [exp_nonpos::<f64, true>(x), exp_nonpos::<f64, false>(x)] {
                let ulps = (got.to_bits() as i128 - want.to_bits() as i128).unsigned_abs();
                assert!(ulps <= 2, "exp({x}) = {got}, want {want}");
            }
        }
        assert_eq!(exp_nonpos::<f32, true>(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp_nonpos::<f64, false>(f64::NEG_INFINITY), 0.0);
        assert_eq!(exp_nonpos::<f32, false>(-100.0), 0.0);
        assert_eq!(exp_nonpos::<f64, true>(0.0), 1.0);
    }
}
