//! Error-free transformations and the compensated reductions built on them.
//!
//! References: T. Ogita, S. M. Rump, S. Oishi, "Accurate sum and dot product", SIAM J. Sci.
//! Comput. 26(6), 2005 (`TwoSum`, `TwoProduct`, `Dot2`); A. Neumaier, "Rundungsfehleranalyse
//! einiger Verfahren zur Summation endlicher Summen", ZAMM 54, 1974.

/// `TwoSum` (Knuth): `(s, e)` with `s = fl(a + b)` and `a + b = s + e` exactly, for finite
/// inputs whose sum does not overflow. Six flops, no branch.
#[inline]
fn two_sum(a: f64, b: f64) -> (f64, f64) {
    let s = a + b;
    let b_virtual = s - a;
    let a_virtual = s - b_virtual;
    (s, (a - a_virtual) + (b - b_virtual))
}

/// `TwoProduct`: `(p, e)` with `p = fl(a·b)` and `a·b = p + e` exactly (barring underflow),
/// using one fused multiply-add for the rounding error of the product.
#[inline]
fn two_product(a: f64, b: f64) -> (f64, f64) {
    let p = a * b;
    (p, a.mul_add(b, -p))
}

/// Compensated dot product `Σᵢ aᵢ·bᵢ` (Ogita–Rump–Oishi `Dot2`).
///
/// Every product is split exactly into `p + e` with `TwoProduct` (via [`f64::mul_add`]), the
/// products are accumulated with `TwoSum`, and all rounding errors are summed separately and
/// added back at the end. The result is as accurate as if it had been computed in twice the
/// working precision and then rounded once:
///
/// `|dot2(a, b) − a·b| ≤ u·|a·b| + γ²ₙ·Σᵢ|aᵢ·bᵢ|`, with `u = 2⁻⁵³` and `γₙ = n·u/(1 − n·u)`,
///
/// so even badly conditioned dot products (heavy cancellation) come out right, where the
/// naive loop's error bound is `γₙ·Σᵢ|aᵢ·bᵢ|`.
///
/// An empty dot product is `0`. Non-finite inputs or overflow give a non-finite result
/// (`±∞` or NaN), as the naive loop would.
///
/// # Shapes
///
/// `a` and `b` both have length `n`.
///
/// # Panics
///
/// If `a.len() != b.len()`.
///
/// # Example
///
/// ```
/// use attention_reference::dot2;
///
/// let a = [1e16, 1.0, -1e16];
/// let b = [1.0, 1.0, 1.0];
/// // The naive left-to-right loop loses the 1 entirely: (1e16 + 1) rounds to 1e16.
/// let naive: f64 = a.iter().zip(&b).map(|(x, y)| x * y).sum();
/// assert_eq!(naive, 0.0);
/// assert_eq!(dot2(&a, &b), 1.0);
/// ```
#[must_use]
pub fn dot2(a: &[f64], b: &[f64]) -> f64 {
    assert_eq!(
        a.len(),
        b.len(),
        "dot2: the vectors have different lengths ({} and {})",
        a.len(),
        b.len()
    );
    let mut terms = a.iter().zip(b);
    let Some((&a0, &b0)) = terms.next() else {
        return 0.0;
    };
    // p: running rounded sum of the products; s: running sum of all rounding errors.
    let (mut p, mut s) = two_product(a0, b0);
    let mut naive = p;
    for (&x, &y) in terms {
        let (h, r) = two_product(x, y);
        let (sum, q) = two_sum(p, h);
        p = sum;
        s += q + r;
        naive += x * y;
    }
    let result = p + s;
    // With an infinite or NaN term the error terms are NaN (∞ − ∞); fall back on the naive
    // result so that, e.g., a single +∞ gives +∞ rather than NaN.
    if result.is_finite() { result } else { naive }
}

/// Compensated sum `Σᵢ xᵢ` (Neumaier's improved Kahan–Babuška summation).
///
/// A running sum `s` and a running correction `c` are kept; each addition's rounding error,
/// recovered exactly by comparing magnitudes, goes into `c`, and `s + c` is returned:
///
/// `|neumaier_sum(x) − Σxᵢ| ≤ 2u·|Σxᵢ| + O(n·u²)·Σ|xᵢ|`, with `u = 2⁻⁵³`,
///
/// compared with the naive bound `(n − 1)·u·Σ|xᵢ|`. Unlike plain Kahan summation, it stays
/// accurate when a term is larger than the running sum.
///
/// The empty sum is `0`. Infinite or NaN terms (or overflow) give the IEEE result of the
/// naive sum (`±∞` or NaN) rather than a NaN from the correction term.
///
/// # Example
///
/// ```
/// use attention_reference::neumaier_sum;
///
/// let xs = [1.0, 1e100, 1.0, -1e100];
/// assert_eq!(xs.iter().sum::<f64>(), 0.0); // naive: both 1s are lost
/// assert_eq!(neumaier_sum(xs), 2.0);
/// assert_eq!(neumaier_sum(std::iter::empty()), 0.0);
/// ```
#[must_use]
pub fn neumaier_sum(xs: impl IntoIterator<Item = f64>) -> f64 {
    let mut sum = 0.0_f64;
    let mut correction = 0.0_f64;
    for x in xs {
        let t = sum + x;
        correction += if sum.abs() >= x.abs() {
            (sum - t) + x
        } else {
            (x - t) + sum
        };
        sum = t;
    }
    // Once `sum` is infinite or NaN it stays so, and it is then the IEEE result of the
    // naive sum; the correction may be NaN (∞ − ∞) and must not be added.
    if sum.is_finite() {
        sum + correction
    } else {
        sum
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn two_sum_and_two_product_are_exact() {
        let (s, e) = two_sum(1.0, 1e-20);
        assert_eq!((s, e), (1.0, 1e-20));
        let a = 1.0 + f64::EPSILON;
        let (p, e) = two_product(a, a);
        // (1 + ε)² = 1 + 2ε + ε²; the product rounds to 1 + 2ε and the error is ε².
        assert_eq!(p, 1.0 + 2.0 * f64::EPSILON);
        assert_eq!(e, f64::EPSILON * f64::EPSILON);
    }

    #[test]
    fn dot2_ill_conditioned() {
        let a = [1e16, 1.0, -1e16];
        let b = [1.0, 1.0, 1.0];
        let naive: f64 = a.iter().zip(&b).map(|(x, y)| x * y).sum();
        assert_eq!(naive, 0.0, "naive f64 should fail on this input");
        assert_eq!(dot2(&a, &b), 1.0);

        // x² − y² next to a huge pair of terms that cancel: the naive loop absorbs x² and
        // −y² into 1e20 and loses them; Dot2 keeps every rounding error.
        let x = 1.0 + 2f64.powi(-30);
        let y = 1.0 - 2f64.powi(-30);
        let a = [x, 1e20, y, -1e20];
        let b = [x, 1.0, -y, 1.0];
        // Exact: x² − y² = 4·2⁻³⁰ = 2⁻²⁸.
        assert_eq!(dot2(&a, &b), 2f64.powi(-28));
        let naive: f64 = a.iter().zip(&b).map(|(p, q)| p * q).sum();
        assert_ne!(naive, 2f64.powi(-28));
    }

    #[test]
    fn dot2_small_cases() {
        assert_eq!(dot2(&[], &[]), 0.0);
        assert_eq!(dot2(&[3.0], &[-2.0]), -6.0);
        assert_eq!(dot2(&[1.0, 2.0, 3.0], &[4.0, 5.0, 6.0]), 32.0);
        assert_eq!(dot2(&[f64::INFINITY, 1.0], &[1.0, 1.0]), f64::INFINITY);
        assert!(dot2(&[f64::NAN, 1.0], &[1.0, 1.0]).is_nan());
    }

    #[test]
    #[should_panic(expected = "dot2: the vectors have different lengths (2 and 1)")]
    fn dot2_length_mismatch_panics() {
        let _ = dot2(&[1.0, 2.0], &[1.0]);
    }

    #[test]
    fn neumaier_beats_naive_and_kahan_case() {
        assert_eq!(neumaier_sum([1.0, 1e100, 1.0, -1e100]), 2.0);
        // 0.1 ten times: the exact sum of the f64 values is 1 + 5.55e-17 → rounds to 1.
        assert_eq!(neumaier_sum(std::iter::repeat_n(0.1, 10)), 1.0);
        assert_ne!(std::iter::repeat_n(0.1, 10).sum::<f64>(), 1.0);
        assert_eq!(neumaier_sum([f64::INFINITY, 1.0]), f64::INFINITY);
        assert_eq!(neumaier_sum([f64::NEG_INFINITY, 1.0]), f64::NEG_INFINITY);
        assert!(neumaier_sum([f64::INFINITY, f64::NEG_INFINITY]).is_nan());
    }
}
