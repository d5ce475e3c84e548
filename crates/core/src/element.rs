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
    /// Whether an output is its f64 numerator divided by the row sum (f64) or multiplied
    /// by the sum's reciprocal (f32: see `score::row_output`).
    #[doc(hidden)]
    const DIVIDE_OUTPUTS: bool;
    /// The value whose `abs_bits` is `bits` (non-negative).
    #[doc(hidden)]
    fn from_abs_bits(bits: u64) -> Self;
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
    const DIVIDE_OUTPUTS: bool = false;
    #[inline(always)]
    fn abs_bits(self) -> u64 {
        u64::from(self.to_bits() & 0x7fff_ffff)
    }
    #[inline(always)]
    fn from_abs_bits(bits: u64) -> Self {
        f32::from_bits(bits as u32)
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
    const DIVIDE_OUTPUTS: bool = true;
    #[inline(always)]
    fn abs_bits(self) -> u64 {
        self.to_bits() & 0x7fff_ffff_ffff_ffff
    }
    #[inline(always)]
    fn from_abs_bits(bits: u64) -> Self {
        f64::from_bits(bits)
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
