//! The element types attention is computed in: `f32` and `f64`.

use nalgebra::RealField;

mod sealed {
    pub trait Sealed {}
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
    /// True if the value is neither infinite nor NaN.
    fn finite(self) -> bool;
    /// `exp(self)` for `self ≤ 0` or −∞, vectorisable; the kernels' softmax exponential.
    #[doc(hidden)]
    fn exp_nonpos<const FMA: bool>(self) -> Self;
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
    fn finite(self) -> bool {
        self.is_finite()
    }
    #[inline(always)]
    fn exp_nonpos<const FMA: bool>(self) -> Self {
        crate::kernel::exp::exp_f32::<FMA>(self)
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
    fn finite(self) -> bool {
        self.is_finite()
    }
    #[inline(always)]
    fn exp_nonpos<const FMA: bool>(self) -> Self {
        crate::kernel::exp::exp_f64::<FMA>(self)
    }
}
