//! `compute_qkv_backward`: against the reference's gradients (f64, compensated dots)
//! within a bound from the arithmetic, f32 and f64; against central differences of core's
//! own `compute_qkv` in f64; views; every bad input typed.

mod common;

use attention_core::{
    AttentionError, Axis, Element, GradientOf, Operand, compute_qkv, compute_qkv_backward,
};
use attention_testdata::gaussian;
use common::{narrow, widen};
use nalgebra::{DMatrix, DMatrixView, Dyn};
use proptest::prelude::*;

/// The inputs of one problem (f64; rounded to T by the checks).
struct Problem {
    x: DMatrix<f64>,
    w: [DMatrix<f64>; 3],
    g: [DMatrix<f64>; 3],
}

fn problem(n: usize, d_model: usize, d_k: usize, d_v: usize, seed: u64) -> Problem {
    let m = |r, c, s: u64| gaussian(r, c, 1.0, seed.wrapping_mul(16).wrapping_add(s));
    Problem {
        x: m(n, d_model, 1),
        w: [m(d_model, d_k, 2), m(d_model, d_k, 3), m(d_model, d_v, 4)],
        g: [m(n, d_k, 5), m(n, d_k, 6), m(n, d_v, 7)],
    }
}

/// Each result entry is one sum of `len` products computed in T (in some order) and
/// rounded once: within `len·u·Σ|terms| + u·|g|` of the exact value (γ_len, with 1% for
/// the second-order terms), the reference being exact to 1e-16 relative.
fn check<T: Element>(p: &Problem) -> Result<(), TestCaseError> {
    let (x, w, g) = (
        narrow::<T>(&p.x),
        p.w.each_ref().map(narrow::<T>),
        p.g.each_ref().map(narrow::<T>),
    );
    let got = compute_qkv_backward(&x, &w[0], &w[1], &w[2], &g[0], &g[1], &g[2])
        .map_err(|e| TestCaseError::fail(format!("{e}")))?;
    let (xw, ww, gw) = (widen(&x), w.each_ref().map(widen), g.each_ref().map(widen));
    let want = attention_reference::compute_qkv_backward(
        &xw, &ww[0], &ww[1], &ww[2], &gw[0], &gw[1], &gw[2],
    );
    let u = T::EPSILON.to_f64();
    let (n, d_model) = x.shape();
    let abs = |m: &DMatrix<f64>| m.abs();
    // Σ|terms| of each entry: |X|ᵀ·|G| and Σ_w |G|·|W|ᵀ.
    let bound_dw = |gi: &DMatrix<f64>| abs(&xw).transpose() * abs(gi) * (n as f64 * u * 1.01);
    let len_dx = (gw[0].ncols() + gw[1].ncols() + gw[2].ncols()) as f64;
    let bound_dx = (abs(&gw[0]) * abs(&ww[0]).transpose()
        + abs(&gw[1]) * abs(&ww[1]).transpose()
        + abs(&gw[2]) * abs(&ww[2]).transpose())
        * (len_dx * u * 1.01);
    for (name, got, want, bound) in [
        ("dx", widen(&got.dx), &want.0, bound_dx),
        ("dw_q", widen(&got.dw_q), &want.1, bound_dw(&gw[0])),
        ("dw_k", widen(&got.dw_k), &want.2, bound_dw(&gw[1])),
        ("dw_v", widen(&got.dw_v), &want.3, bound_dw(&gw[2])),
    ] {
        prop_assert_eq!(got.shape(), want.shape(), "{} shape", name);
        for ((a, b), e) in got.iter().zip(want.iter()).zip(bound.iter()) {
            let tol = e + u * b.abs() + 1e-300;
            prop_assert!(
                (a - b).abs() <= tol,
                "{}: {} vs reference {} (error {:e} > bound {:e}; n {}, d_model {})",
                name,
                a,
                b,
                (a - b).abs(),
                tol,
                n,
                d_model
            );
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    /// Shapes from 1 token and width 1 up (nalgebra's products change method with size).
    #[test]
    fn gradients_match_the_reference(
        n in 1..40usize, d_model in 1..24usize, d_k in 1..12usize, d_v in 1..12usize, seed in any::<u64>()
    ) {
        let p = problem(n, d_model, d_k, d_v, seed);
        check::<f64>(&p)?;
        check::<f32>(&p)?;
    }
}

/// `L = Σ dQ∘Q + dK∘K + dV∘V` through core's own `compute_qkv`, in f64: central
/// differences of L with respect to every entry of X and of each weight match the
/// gradients. L is linear in each operand, so the difference quotient is exact but for
/// the rounding of L (about `u·Σ|terms|/h`).
#[test]
fn gradients_match_central_differences() {
    let p = problem(5, 4, 3, 2, 9);
    let loss = |x: &DMatrix<f64>, w: &[DMatrix<f64>; 3]| -> f64 {
        let (q, k, v) = compute_qkv(x, &w[0], &w[1], &w[2]).expect("forward");
        q.component_mul(&p.g[0]).sum()
            + k.component_mul(&p.g[1]).sum()
            + v.component_mul(&p.g[2]).sum()
    };
    let got = compute_qkv_backward(&p.x, &p.w[0], &p.w[1], &p.w[2], &p.g[0], &p.g[1], &p.g[2])
        .expect("backward");
    let h = 1e-3;
    let tol = 1e-9;
    for r in 0..p.x.nrows() {
        for c in 0..p.x.ncols() {
            let (mut plus, mut minus) = (p.x.clone(), p.x.clone());
            plus[(r, c)] += h;
            minus[(r, c)] -= h;
            let fd = (loss(&plus, &p.w) - loss(&minus, &p.w)) / (2.0 * h);
            assert!(
                (fd - got.dx[(r, c)]).abs() < tol,
                "dx[{r}][{c}]: {fd} vs {}",
                got.dx[(r, c)]
            );
        }
    }
    for (which, dw) in [&got.dw_q, &got.dw_k, &got.dw_v].into_iter().enumerate() {
        for r in 0..dw.nrows() {
            for c in 0..dw.ncols() {
                let (mut plus, mut minus) = (p.w.clone(), p.w.clone());
                plus[which][(r, c)] += h;
                minus[which][(r, c)] -= h;
                let fd = (loss(&p.x, &plus) - loss(&p.x, &minus)) / (2.0 * h);
                assert!(
                    (fd - dw[(r, c)]).abs() < tol,
                    "dw[{which}][{r}][{c}]: {fd} vs {}",
                    dw[(r, c)]
                );
            }
        }
    }
}

/// Views (a row-strided X, a column block of a wider gradient) give the owned matrices'
/// bits.
#[test]
fn views_give_the_same_bits() {
    let p = problem(7, 5, 3, 4, 3);
    let want = compute_qkv_backward(&p.x, &p.w[0], &p.w[1], &p.w[2], &p.g[0], &p.g[1], &p.g[2])
        .expect("backward");
    // X stored by rows: row stride 5, column stride 1.
    let xt = p.x.transpose();
    let x_rows =
        DMatrixView::from_slice_with_strides_generic(xt.as_slice(), Dyn(7), Dyn(5), Dyn(5), Dyn(1));
    assert_eq!(x_rows, p.x);
    let wide = DMatrix::from_fn(7, 10, |r, c| if c < 4 { p.g[2][(r, c)] } else { -1.0 });
    let got = compute_qkv_backward(
        x_rows,
        &p.w[0],
        &p.w[1],
        &p.w[2],
        &p.g[0],
        &p.g[1],
        wide.columns(0, 4),
    )
    .expect("backward");
    assert_eq!(got, want);
}

#[test]
fn bad_inputs_are_typed_errors() {
    let p = problem(4, 3, 2, 2, 5);
    let call = |g: [&DMatrix<f64>; 3]| {
        compute_qkv_backward(&p.x, &p.w[0], &p.w[1], &p.w[2], g[0], g[1], g[2])
    };
    // dK with a wrong width.
    let wrong = DMatrix::zeros(4, 3);
    assert!(matches!(
        call([&p.g[0], &wrong, &p.g[2]]),
        Err(AttentionError::DimensionMismatch {
            operand: Operand::Gradient(GradientOf::Key),
            axis: Axis::Columns,
            ..
        })
    ));
    // dQ with a wrong row count.
    let wrong = DMatrix::zeros(5, 2);
    assert!(matches!(
        call([&wrong, &p.g[1], &p.g[2]]),
        Err(AttentionError::DimensionMismatch {
            operand: Operand::Gradient(GradientOf::Query),
            axis: Axis::Rows,
            ..
        })
    ));
    // NaN in dV, at (2, 1).
    let mut nan = p.g[2].clone();
    nan[(2, 1)] = f64::NAN;
    assert!(matches!(
        call([&p.g[0], &p.g[1], &nan]),
        Err(AttentionError::NonFinite {
            operand: Operand::Gradient(GradientOf::Value),
            row: 2,
            column: 1,
            ..
        })
    ));
    // A weight with the wrong rows: compute_qkv's own error.
    let bad_w = DMatrix::zeros(2, 2);
    assert!(matches!(
        compute_qkv_backward(&p.x, &bad_w, &p.w[1], &p.w[2], &p.g[0], &p.g[1], &p.g[2]),
        Err(AttentionError::DimensionMismatch {
            operand: Operand::QueryWeight,
            ..
        })
    ));
    // Products past f32's range: the first overflowing entry of dX.
    let big = DMatrix::<f32>::from_element(4, 3, 3e38);
    let w = DMatrix::<f32>::from_element(3, 2, 2.0);
    let g = DMatrix::<f32>::from_element(4, 2, 1.0);
    assert!(matches!(
        compute_qkv_backward(&big, &w, &w, &w, &g, &g, &g),
        Err(AttentionError::ProductOverflow {
            operand: Operand::Gradient(GradientOf::QueryWeight),
            row: 0,
            column: 0
        })
    ));
}
