//! The element types attention is computed in: `f32` and `f64`.

use nalgebra::RealField;

mod sealed {
    /// Seals [`Element`](super::Element) to `f32` and `f64`, and through its supertrait
    /// gives each its own kernels and thread-local buffers.
    pub trait Sealed: crate::kernel::ElementKernels {}
    impl Sealed for f32 {}
    impl Sealed for f64 {}
}

/// A floating-point type this crate computes attention in: implemented for `f32` and `f64`
/// only (the trait is sealed, so each type can map to its own SIMD kernels).
///
/// It extends nalgebra's [`RealField`] with the few constants and conversions the kernels
/// need.
///
/// # Example
/// ```
/// use attention_core::Element;
/// fn eps<T: Element>() -> f64 { T::EPSILON.to_f64() }
/// assert_eq!(eps::<f32>(), f32::EPSILON as f64);
/// ```
pub trait Element: RealField + Copy + Send + Sync + sealed::Sealed + 'static {
    /// Machine epsilon: the gap between 1 and the next representable number.
    const EPSILON: Self;
    /// Negative infinity, the score of a masked position.
    const NEG_INFINITY: Self;
    /// The largest finite value.
    const MAX: Self;
    /// Widens to f64 (exact for both types).
    fn to_f64(self) -> f64;
    /// Rounds an f64 to this type.
    fn from_f64_rounded(x: f64) -> Self;
    /// Converts a count to this type (exact up to 2^24 for f32, 2^53 for f64).
    fn from_count(n: usize) -> Self;
    /// Converts an `i32` to this type, rounded once as [`Element::from_count`] rounds the
    /// same number (a conversion that vectorises).
    #[doc(hidden)]
    fn from_small(n: i32) -> Self;
    /// True if the value is neither infinite nor NaN.
    fn finite(self) -> bool;
    /// The bits of `|self|` as an integer: ordered like `|self|` for finite values, and
    /// `≥ Self::INFINITY_BITS` exactly for ±∞ and NaN. Lets validation scan with integer
    /// max-reductions, which vectorise.
    #[doc(hidden)]
    fn abs_bits(self) -> u64;
    /// The bits of +∞ (see [`Element::abs_bits`]).
    #[doc(hidden)]
    const INFINITY_BITS: u64;
    /// The value whose `abs_bits` is `bits` (non-negative).
    #[doc(hidden)]
    fn from_abs_bits(bits: u64) -> Self;
    /// The largest `abs_bits` of `xs` (0 if empty) when every entry is finite, else some
    /// value `≥ Self::INFINITY_BITS`; computed in 16 independent lanes so that the
    /// compiler vectorises it even for the baseline target.
    #[doc(hidden)]
    fn max_abs_bits(xs: &[Self]) -> u64;
    /// `abs_bits` in the type's own width as a signed integer (the sign bit is clear, so
    /// it is non-negative and ordered alike): a maximum over them vectorises as a signed
    /// integer max wherever the CPU has one (AVX2, AVX-512).
    #[doc(hidden)]
    type Bits: Copy + Ord + Default + Send + Sync + std::fmt::Debug + 'static;
    /// See [`Element::Bits`].
    #[doc(hidden)]
    fn abs_bits_native(self) -> Self::Bits;
    /// Widens [`Element::Bits`] to the `u64` of [`Element::abs_bits`].
    #[doc(hidden)]
    fn bits_to_u64(bits: Self::Bits) -> u64;
}

/// `max_abs_bits` for one element type, in 16 lanes of floats so that it vectorises even
/// for baseline x86-64 (SSE2 has a float max and multiply, but no 32- or 64-bit integer
/// max): the largest `|x|` by float comparison, exact for finite values (non-negative
/// floats order as their bits), and `Σ x·0`, which is NaN exactly when some `x` is ±∞ or
/// NaN (finite `x` give ±0, and sums of zeros are never NaN); then any non-finite entry
/// gives `INFINITY_BITS`.
fn max_abs_bits_of<T: Element>(xs: &[T]) -> u64 {
    if xs.len() < 16 {
        // Short columns (one new token of a KV cache is 1-row columns): no lanes to set up.
        return xs.iter().fold(0, |m, x| m.max(x.abs_bits()));
    }
    let mut max = [T::zero(); 16];
    let mut poison = [T::zero(); 16];
    let chunks = xs.chunks_exact(16);
    let rest = chunks.remainder();
    for chunk in chunks {
        for t in 0..16 {
            let a = chunk[t].abs();
            max[t] = if a > max[t] { a } else { max[t] };
            poison[t] += chunk[t] * T::zero();
        }
    }
    for (t, &x) in rest.iter().enumerate() {
        let a = x.abs();
        max[t] = if a > max[t] { a } else { max[t] };
        poison[t] += x * T::zero();
    }
    if poison.iter().any(|p| !p.finite()) {
        return T::INFINITY_BITS;
    }
    max.iter()
        .fold(T::zero(), |m, &x| if x > m { x } else { m })
        .abs_bits()
}

impl Element for f32 {
    const EPSILON: Self = f32::EPSILON;
    const NEG_INFINITY: Self = f32::NEG_INFINITY;
    const MAX: Self = f32::MAX;
    #[inline(always)]
    fn to_f64(self) -> f64 {
        f64::from(self)
    }
    #[inline(always)]
    fn from_f64_rounded(x: f64) -> Self {
        x as f32
    }
    #[inline(always)]
    fn from_count(n: usize) -> Self {
        n as f32
    }
    #[inline(always)]
    fn from_small(n: i32) -> Self {
        n as f32
    }
    #[inline(always)]
    fn finite(self) -> bool {
        self.is_finite()
    }
    const INFINITY_BITS: u64 = 0x7f80_0000;
    #[inline(always)]
    fn abs_bits(self) -> u64 {
        u64::from(self.to_bits() & 0x7fff_ffff)
    }
    #[inline(always)]
    fn from_abs_bits(bits: u64) -> Self {
        f32::from_bits(bits as u32)
    }
    fn max_abs_bits(xs: &[Self]) -> u64 {
        max_abs_bits_of(xs)
    }
    type Bits = i32;
    #[inline(always)]
    fn abs_bits_native(self) -> i32 {
        (self.to_bits() & 0x7fff_ffff) as i32
    }
    #[inline(always)]
    fn bits_to_u64(bits: i32) -> u64 {
        bits as u64
    }
}

impl Element for f64 {
    const EPSILON: Self = f64::EPSILON;
    const NEG_INFINITY: Self = f64::NEG_INFINITY;
    const MAX: Self = f64::MAX;
    #[inline(always)]
    fn to_f64(self) -> f64 {
        self
    }
    #[inline(always)]
    fn from_f64_rounded(x: f64) -> Self {
        x
    }
    #[inline(always)]
    fn from_count(n: usize) -> Self {
        n as f64
    }
    #[inline(always)]
    fn from_small(n: i32) -> Self {
        f64::from(n)
    }
    #[inline(always)]
    fn finite(self) -> bool {
        self.is_finite()
    }
    const INFINITY_BITS: u64 = 0x7ff0_0000_0000_0000;
    #[inline(always)]
    fn abs_bits(self) -> u64 {
        self.to_bits() & 0x7fff_ffff_ffff_ffff
    }
    #[inline(always)]
    fn from_abs_bits(bits: u64) -> Self {
        f64::from_bits(bits)
    }
    fn max_abs_bits(xs: &[Self]) -> u64 {
        max_abs_bits_of(xs)
    }
    type Bits = i64;
    #[inline(always)]
    fn abs_bits_native(self) -> i64 {
        (self.to_bits() & 0x7fff_ffff_ffff_ffff) as i64
    }
    #[inline(always)]
    fn bits_to_u64(bits: i64) -> u64 {
        bits as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The lane-chunked maximum equals the plain one, and ±∞/NaN anywhere (chunk or
    /// remainder) lift it to at least `INFINITY_BITS`.
    fn max_abs_bits_is_exact<T: Element>() {
        for len in 0..40 {
            let xs: Vec<T> = (0..len)
                .map(|i| T::from_f64_rounded(((i * 7919) % 23) as f64 - 11.5))
                .collect();
            let want = xs
                .iter()
                .map(|x| x.abs())
                .fold(T::zero(), |a, b| if b > a { b } else { a });
            assert_eq!(T::from_abs_bits(T::max_abs_bits(&xs)), want, "len {len}");
            for at in 0..len {
                for bad in [f64::NAN, f64::INFINITY, f64::NEG_INFINITY] {
                    let mut ys = xs.clone();
                    ys[at] = T::from_f64_rounded(bad);
                    assert!(
                        T::max_abs_bits(&ys) >= T::INFINITY_BITS,
                        "len {len}, at {at}"
                    );
                }
            }
        }
    }

    #[test]
    fn max_abs_bits_f32() {
        max_abs_bits_is_exact::<f32>();
    }

    #[test]
    fn max_abs_bits_f64() {
        max_abs_bits_is_exact::<f64>();
    }
}
