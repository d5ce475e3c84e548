//! The softmax's branch-free `exp`: its constants, and the scalar form [`exp_nonpos`] that
//! the decoding kernel (`decode.rs`) calls in loops the compiler vectorises under each
//! path's target features. The block kernel's is `simd.rs`'s `exp_v`, the same operations
//! written over the vector operations of every CPU path (the portable lanes included).
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
//! below −87 (f32) / −708 (f64) give 0: there e^x is below the smallest normal number,
//! and every caller adds it to a sum that holds a term equal to 1, so it cannot matter.
//! Measured error: see the `*exp*` tests of `simd.rs` (≤ 2 ulp against `std`, on every
//! path).

/// The constants of the exponential for one element type.
pub(crate) trait ExpConsts: crate::Element {
    const LOG2E: Self;
    /// 1.5·2^(mantissa bits): adding and subtracting it rounds to an integer.
    const SHIFT: Self;
    /// ln 2 split so that `n·LN2_HI` is exact for the `n` that occur.
    const LN2_HI: Self;
    const LN2_LO: Self;
    /// Below this, e^x is under the smallest normal number and the result is 0.
    const CUTOFF: Self;
    /// Taylor coefficients 1/k!, highest degree first.
    const COEFFS: &'static [Self];
    /// Builds 2^n from `t = n + SHIFT`.
    fn pow2_shifted(t: Self) -> Self;
}

impl ExpConsts for f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const SHIFT: f32 = 12_582_912.0; // 1.5 · 2^23
    const LN2_HI: f32 = 0.693_359_4; // ln 2 to 12 bits
    const LN2_LO: f32 = -2.121_944_4e-4; // ln 2 − LN2_HI
    const CUTOFF: f32 = -87.0;
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
    #[inline(always)]
    fn pow2_shifted(t: f32) -> f32 {
        // t's low mantissa bits hold 2^22 + n; subtracting SHIFT's bits leaves n.
        let n = t.to_bits().wrapping_sub(Self::SHIFT.to_bits()) as i32;
        f32::from_bits(((n + 127) as u32) << 23)
    }
}

impl ExpConsts for f64 {
    const LOG2E: f64 = std::f64::consts::LOG2_E;
    const SHIFT: f64 = 6_755_399_441_055_744.0; // 1.5 · 2^52
    const LN2_HI: f64 = 0.693_147_180_369_123_8; // fdlibm's split of ln 2
    const LN2_LO: f64 = 1.908_214_929_270_587_7e-10;
    const CUTOFF: f64 = -708.0;
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
    #[inline(always)]
    fn pow2_shifted(t: f64) -> f64 {
        let n = t.to_bits().wrapping_sub(Self::SHIFT.to_bits()) as i64;
        f64::from_bits(((n + 1023) as u64) << 52)
    }
}

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

#[cfg(test)]
mod tests {
    use super::*;

    /// The scalar exp against `f64::exp`: within 2 ulp from the cutoff (−87 for f32,
    /// −708 for f64) to 0, 0 below the cutoff and at −∞, 1 at 0, fused or not.
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
