//! Fixed tests: the seed example, extreme magnitudes, empty shapes, views, and every error.

// These tests pass views by reference (`&m.columns(..)`), the form that worked before
// views could be passed by value; clippy would have them by value, but the old form must
// keep compiling.
#![allow(clippy::needless_borrows_for_generic_args)]

mod common;

use attention_core::{
    AttentionError, AttentionOptions, Axis, CpuPath, Element, Operand, Parallelism, compute_qkv,
    scaled_dot_product_attention, scaled_dot_product_attention_into,
    scaled_dot_product_attention_with_lse, self_attention,
};
use common::*;
use nalgebra::{DMatrix, DMatrixView, Dyn};

/// The seed's expected output as computed by PyTorch 2.15 in float64 (the `seed_example`
/// golden case; numpy prints the same to 7 digits).
const SEED: [[f64; 2]; 2] = [
    [1.660476901346686, 2.660476901346686],
    [2.3395230986533138, 3.3395230986533138],
];

fn seed_run<T: Element>() -> DMatrix<T> {
    let m = |v: [f64; 4]| DMatrix::from_row_slice(2, 2, &v.map(T::from_f64_rounded));
    let x = m([1.0, 0.0, 0.0, 1.0]);
    let w = m([1.0, 0.0, 0.0, 1.0]);
    let w_v = m([1.0, 2.0, 3.0, 4.0]);
    let (q, k, v) = compute_qkv(&x, &w, &w, &w_v).unwrap();
    self_attention(&q, &k, &v).unwrap()
}

#[test]
fn seed_example_f64_within_1e_12() {
    let out = seed_run::<f64>();
    for i in 0..2 {
        for j in 0..2 {
            assert!(
                (out[(i, j)] - SEED[i][j]).abs() < 1e-12,
                "[{i},{j}] = {}",
                out[(i, j)]
            );
        }
    }
}

#[test]
fn seed_example_f32_within_1e_6() {
    let out = seed_run::<f32>();
    for i in 0..2 {
        for j in 0..2 {
            assert!(
                (out[(i, j)] as f64 - SEED[i][j]).abs() < 1e-6,
                "[{i},{j}] = {}",
                out[(i, j)]
            );
        }
    }
}

/// Entries of magnitude 100 with d_k = 64: scores around 1e5, where numpy's exp overflows.
fn magnitude_100<T: Element>() {
    // A fixed, irregular pattern of ±100·(0.5..1.5) entries (no RNG needed for one case).
    let val = |i: usize, j: usize, salt: usize| {
        let h = (i * 7919 + j * 104_729 + salt * 1_299_709) % 1000;
        let sign = if (i + 3 * j + salt).is_multiple_of(3) {
            -1.0
        } else {
            1.0
        };
        sign * 100.0 * (0.5 + h as f64 / 1000.0)
    };
    for (n_q, n_kv) in [(17, 33), (100, 100), (130, 70)] {
        let p = Problem {
            q: DMatrix::from_fn(n_q, 64, |i, j| val(i, j, 1)),
            k: DMatrix::from_fn(n_kv, 64, |i, j| val(i, j, 2)),
            v: DMatrix::from_fn(n_kv, 8, |i, j| val(i, j, 3) / 100.0),
        };
        let want = assert_plain_matches_reference::<T>(&p, |path| {
            AttentionOptions::new().with_cpu_path(path)
        });
        assert!(want.lse.iter().any(|&l| l.abs() > 5e4), "scores reach ~1e5");
    }
}

#[test]
fn magnitude_100_f32_is_finite_and_matches_reference() {
    magnitude_100::<f32>();
}

#[test]
fn magnitude_100_f64_is_finite_and_matches_reference() {
    magnitude_100::<f64>();
}

#[test]
fn empty_queries_give_empty_output() {
    let q = DMatrix::<f32>::zeros(0, 4);
    let k = DMatrix::<f32>::from_element(3, 4, 1.0);
    let v = DMatrix::<f32>::from_element(3, 5, 1.0);
    let out = self_attention(&q, &k, &v).unwrap();
    assert_eq!(out.shape(), (0, 5));
}

#[test]
fn no_keys_give_zeros_and_neg_infinite_lse() {
    for n_q in [1, 3, 200] {
        let q = DMatrix::<f64>::from_element(n_q, 4, 0.5);
        let k = DMatrix::<f64>::zeros(0, 4);
        let v = DMatrix::<f64>::zeros(0, 6);
        let mut out = nan_matrix::<f64>(n_q, 6);
        scaled_dot_product_attention_into(&q, &k, &v, &AttentionOptions::new(), &mut out).unwrap();
        assert!(out.iter().all(|&x| x == 0.0));
        let (_, lse) =
            scaled_dot_product_attention_with_lse(&q, &k, &v, &AttentionOptions::new()).unwrap();
        assert!(lse.iter().all(|&x| x == f64::NEG_INFINITY));
    }
}

#[test]
fn zero_head_dim_needs_a_scale() {
    let q = DMatrix::<f32>::zeros(2, 0);
    let v = DMatrix::<f32>::from_row_slice(2, 1, &[1.0, 3.0]);
    assert_eq!(self_attention(&q, &q, &v), Err(AttentionError::ZeroHeadDim));
    // With an explicit scale every score is 0: uniform weights, the mean of V.
    let out =
        scaled_dot_product_attention(&q, &q, &v, &AttentionOptions::new().with_scale(1.0)).unwrap();
    assert_eq!(out, DMatrix::from_element(2, 1, 2.0));
}

#[test]
fn views_work_without_copies() {
    // Q, K, V as column blocks of one wide matrix [Q | K | V], and a transposed view.
    let wide = DMatrix::<f64>::from_fn(70, 12, |i, j| ((i * 31 + j * 17) % 13) as f64 * 0.1 - 0.6);
    let (q, k, v) = (wide.columns(0, 4), wide.columns(4, 4), wide.columns(8, 4));
    let out = self_attention(&q, &k, &v).unwrap();
    let copy = self_attention(&q.clone_owned(), &k.clone_owned(), &v.clone_owned()).unwrap();
    assert_eq!(out, copy);

    // A transposed view of a 4×70 matrix, built from its strides (row stride = 70's column
    // stride becomes 1 ↔ 4 swap).
    let kt = k.transpose(); // 4 × 70, column-major
    let k_view: DMatrixView<'_, f64, Dyn, Dyn> = DMatrixView::from_slice_with_strides_generic(
        kt.as_slice(),
        Dyn(70),
        Dyn(4),
        Dyn(4),
        Dyn(1),
    );
    assert_eq!(self_attention(&q, k_view, &v).unwrap(), copy);

    // The same with three queries (the row-at-a-time path) against the strided keys.
    let q3 = q.rows(0, 3);
    let copy3 = self_attention(&q3.clone_owned(), &k.clone_owned(), &v.clone_owned()).unwrap();
    assert_eq!(self_attention(&q3, k_view, &v).unwrap(), copy3);
}

#[test]
fn into_checks_the_output_shape() {
    let q = DMatrix::<f32>::zeros(3, 2);
    let v = DMatrix::<f32>::zeros(3, 4);
    let mut out = DMatrix::<f32>::zeros(3, 5);
    let err = scaled_dot_product_attention_into(&q, &q, &v, &AttentionOptions::new(), &mut out)
        .unwrap_err();
    assert_eq!(
        err,
        AttentionError::DimensionMismatch {
            operand: Operand::Output,
            axis: Axis::Columns,
            found: 5,
            expected: 4,
            against: Operand::Value,
            rule: "the output is n_q x d_v",
        }
    );
}

#[test]
fn shape_errors_name_operands_and_shapes() {
    let q = DMatrix::<f64>::zeros(3, 4);
    let k_bad = DMatrix::<f64>::zeros(5, 5);
    let v = DMatrix::<f64>::zeros(5, 2);
    let err = self_attention(&q, &k_bad, &v).unwrap_err();
    assert_eq!(
        err.to_string(),
        "key has 5 columns but query has 4 (d_k must match)"
    );

    let k = DMatrix::<f64>::zeros(5, 4);
    let v_bad = DMatrix::<f64>::zeros(6, 2);
    let err = self_attention(&q, &k, &v_bad).unwrap_err();
    assert_eq!(
        err,
        AttentionError::DimensionMismatch {
            operand: Operand::Value,
            axis: Axis::Rows,
            found: 6,
            expected: 5,
            against: Operand::Key,
            rule: "one value row per key: n_kv must match",
        }
    );
    assert_eq!(
        err.to_string(),
        "value has 6 rows but key has 5 (one value row per key: n_kv must match)"
    );
}

#[test]
fn compute_qkv_shape_errors() {
    let x = DMatrix::<f32>::zeros(3, 4);
    let w = DMatrix::<f32>::zeros(4, 2);
    let w_bad_rows = DMatrix::<f32>::zeros(5, 2);
    let w_bad_cols = DMatrix::<f32>::zeros(4, 3);
    for (args, operand) in [
        ((&w_bad_rows, &w, &w), Operand::QueryWeight),
        ((&w, &w_bad_rows, &w), Operand::KeyWeight),
        ((&w, &w, &w_bad_rows), Operand::ValueWeight),
    ] {
        let err = compute_qkv(&x, args.0, args.1, args.2).unwrap_err();
        assert!(
            matches!(err, AttentionError::DimensionMismatch { operand: o, axis: Axis::Rows, found: 5, expected: 4, against: Operand::Input, .. } if o == operand),
            "{err}"
        );
    }
    let err = compute_qkv(&x, &w, &w_bad_cols, &w).unwrap_err();
    assert!(matches!(
        err,
        AttentionError::DimensionMismatch {
            operand: Operand::KeyWeight,
            axis: Axis::Columns,
            found: 3,
            expected: 2,
            ..
        }
    ));
    // W_v may have any width (d_v).
    let (_, _, v) = compute_qkv(&x, &w, &w, &w_bad_cols).unwrap();
    assert_eq!(v.shape(), (3, 3));
}

fn non_finite_inputs_are_reported<T: Element>() {
    for bad in [f64::NAN, f64::INFINITY, f64::NEG_INFINITY] {
        for (which, operand) in [(0, Operand::Query), (1, Operand::Key), (2, Operand::Value)] {
            let mut mats = [
                DMatrix::<T>::from_element(4, 3, T::one()),
                DMatrix::<T>::from_element(5, 3, T::one()),
                DMatrix::<T>::from_element(5, 2, T::one()),
            ];
            mats[which][(2, 1)] = T::from_f64_rounded(bad);
            let err = self_attention(&mats[0], &mats[1], &mats[2]).unwrap_err();
            match err {
                AttentionError::NonFinite {
                    operand: o,
                    row: 2,
                    column: 1,
                    value,
                } => {
                    assert_eq!(o, operand);
                    assert!(value.is_nan() == bad.is_nan());
                }
                other => panic!("expected NonFinite for {operand}, got {other}"),
            }
        }
        for (which, operand) in [
            (0, Operand::Input),
            (1, Operand::QueryWeight),
            (2, Operand::KeyWeight),
            (3, Operand::ValueWeight),
        ] {
            let mut mats = [
                DMatrix::<T>::from_element(3, 3, T::one()),
                DMatrix::<T>::from_element(3, 3, T::one()),
                DMatrix::<T>::from_element(3, 3, T::one()),
                DMatrix::<T>::from_element(3, 3, T::one()),
            ];
            mats[which][(0, 2)] = T::from_f64_rounded(bad);
            let err = compute_qkv(&mats[0], &mats[1], &mats[2], &mats[3]).unwrap_err();
            assert!(
                matches!(err, AttentionError::NonFinite { operand: o, row: 0, column: 2, .. } if o == operand),
                "{err}"
            );
        }
    }
}

#[test]
fn non_finite_inputs_are_reported_f32() {
    non_finite_inputs_are_reported::<f32>();
}

#[test]
fn non_finite_inputs_are_reported_f64() {
    non_finite_inputs_are_reported::<f64>();
}

#[test]
fn non_finite_scale_is_an_error() {
    let q = DMatrix::<f32>::from_element(2, 2, 1.0);
    for s in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
        let err = scaled_dot_product_attention(&q, &q, &q, &AttentionOptions::new().with_scale(s))
            .unwrap_err();
        assert!(matches!(err, AttentionError::InvalidScale { .. }), "{err}");
    }
}

fn score_overflow_is_an_error<T: Element>() {
    // The score (MAX/2·4√d_k + …)/√d_k ≈ 2·MAX overflows; sizes on both the direct and
    // the fused path.
    let big = T::MAX / T::from_f64_rounded(2.0);
    for (n_q, n_kv, d_k) in [(2, 2, 2), (100, 90, 16)] {
        let mut q = DMatrix::<T>::from_element(n_q, d_k, T::one());
        let k =
            DMatrix::<T>::from_element(n_kv, d_k, T::from_f64_rounded(4.0 * (d_k as f64).sqrt()));
        let v = DMatrix::<T>::from_element(n_kv, 3, T::one());
        q[(n_q - 1, 0)] = big;
        for path in CpuPath::supported() {
            for par in [Parallelism::Sequential, Parallelism::Rayon] {
                let opts = AttentionOptions::new()
                    .with_cpu_path(path)
                    .with_parallelism(par);
                let err = scaled_dot_product_attention(&q, &k, &v, &opts).unwrap_err();
                assert_eq!(
                    err,
                    AttentionError::ScoreOverflow {
                        query: n_q - 1,
                        key: 0
                    },
                    "{path:?}"
                );
            }
        }
        // A huge scale overflows a finite q·k too.
        let q1 = DMatrix::<T>::from_element(n_q, d_k, T::one());
        let opts = AttentionOptions::new().with_scale(big);
        assert_eq!(
            scaled_dot_product_attention(&q1, &k, &v, &opts).unwrap_err(),
            AttentionError::ScoreOverflow { query: 0, key: 0 }
        );
        // What counts is the score scale·q·k, not the intermediate q·k: with scale 1/8,
        // q·k ≈ 2·MAX·√d_k gives scores ≈ MAX/4·√d_k/… inside the range, computed right
        // (V ≡ 1, so every output is 1 within the bound of `common`) on every path.
        let opts =
            AttentionOptions::new().with_scale(T::from_f64_rounded(0.125 / (d_k as f64).sqrt()));
        for path in CpuPath::supported() {
            let out = scaled_dot_product_attention(&q, &k, &v, &opts.clone().with_cpu_path(path))
                .unwrap_or_else(|e| panic!("{path:?}: {e}"));
            let tol = SECOND_ORDER * (n_kv as f64 + 6.0) * T::EPSILON.to_f64();
            assert!(
                out.iter().all(|&x| (x.to_f64() - 1.0).abs() <= tol),
                "{path:?}: {out}"
            );
        }
    }
}

#[test]
fn score_overflow_is_an_error_f32() {
    score_overflow_is_an_error::<f32>();
}

#[test]
fn score_overflow_is_an_error_f64() {
    score_overflow_is_an_error::<f64>();
}

#[test]
fn projection_overflow_is_an_error() {
    let x = DMatrix::<f32>::from_element(2, 2, 3e38);
    let w = DMatrix::<f32>::from_element(2, 2, 1.0);
    let err = compute_qkv(&x, &w, &w, &w).unwrap_err();
    assert_eq!(
        err,
        AttentionError::ProductOverflow {
            operand: Operand::Query,
            row: 0,
            column: 0
        }
    );
}

/// The environment variable naming the CPU paths (`avx2`, `avx512`, comma-separated) this
/// machine is known to lack; see `docs/TESTING.md`.
const HOST_LACKS: &str = "ATTENTION_TEST_HOST_LACKS";

/// Every test that loops over `CpuPath::supported()` silently tests fewer paths on a CPU
/// without AVX2 or AVX-512: this fails instead, unless `ATTENTION_TEST_HOST_LACKS` names
/// each missing path (so that a run on such a host is a decision, not an accident).
#[test]
fn every_cpu_path_is_tested_or_declared_missing() {
    let declared = std::env::var(HOST_LACKS)
        .unwrap_or_default()
        .to_ascii_lowercase();
    let declared: Vec<&str> = declared.split(',').map(str::trim).collect();
    for (path, name) in [(CpuPath::Avx2, "avx2"), (CpuPath::Avx512, "avx512")] {
        assert!(
            path.is_supported() || declared.contains(&name),
            "this CPU lacks the {path:?} path, so no test here runs it; set \
             {HOST_LACKS}={name} (comma-separated) if this machine is known to lack it"
        );
    }
}

/// Forcing a path: the supported ones run, the others are the typed error (whose message
/// is checked here unconditionally; which CPUs lack which path is unit-tested with
/// simulated feature sets in `src/cpu.rs`). A call without a forced path runs the
/// detected one.
#[test]
fn forced_path_runs_or_is_the_typed_error() {
    // Equal keys: every weight is exp(0)/80 and Σ_j 0.5 = 40 is exact in any order, so
    // every path gives exactly 0.5 (80 queries: the fused kernel, not the row path).
    let q = DMatrix::<f64>::from_element(80, 8, 0.5);
    let exact = DMatrix::<f64>::from_element(80, 8, 0.5);
    assert_eq!(self_attention(&q, &q, &q), Ok(exact.clone()));
    for path in [CpuPath::Portable, CpuPath::Avx2, CpuPath::Avx512] {
        let forced =
            scaled_dot_product_attention(&q, &q, &q, &AttentionOptions::new().with_cpu_path(path));
        let expected = if path.is_supported() {
            Ok(exact.clone())
        } else {
            Err(AttentionError::UnsupportedCpuPath { path })
        };
        assert_eq!(forced, expected, "{path:?}");
    }
    assert_eq!(
        AttentionError::UnsupportedCpuPath {
            path: CpuPath::Avx512
        }
        .to_string(),
        "the Avx512 kernel path needs CPU features this machine lacks"
    );
    assert!(CpuPath::supported().contains(&CpuPath::Portable));
    assert!(CpuPath::detect().is_supported());
}

/// Values near the type's maximum: Σ_j p_j·v_j would overflow if summed naively (up to
/// n_kv·max|v|), but the output is a convex combination of values and must come out
/// finite and right, on the direct path (few keys: up to one lane group, and more) and
/// the fused one, on every CPU path. The direct path runs only on the default path (a
/// forced path runs its own kernels at every size), so that is tried first.
fn huge_values<T: Element>() {
    let top = T::MAX.to_f64() * 0.9;
    for (n_q, n_kv) in [(3, 5), (3, 20), (70, 200)] {
        let p = Problem {
            q: DMatrix::from_fn(n_q, 4, |i, j| ((i * 3 + j) % 5) as f64 * 0.1),
            k: DMatrix::from_fn(n_kv, 4, |i, j| ((i + 2 * j) % 7) as f64 * 0.1),
            // Column 0: all near +MAX (the sum overflows); column 1: mixed signs near MAX;
            // column 2: ordinary values, which must keep their full accuracy.
            v: DMatrix::from_fn(n_kv, 3, |j, c| match c {
                0 => top * (1.0 - j as f64 * 1e-3),
                1 => top * if j % 2 == 0 { 1.0 } else { -0.5 },
                _ => (j % 11) as f64 - 5.0,
            }),
        }
        .rounded::<T>();
        let (q, k, v) = p.cast::<T>();
        let eps = T::EPSILON.to_f64();
        let delta = score_error(&p.q, &p.k, 0.5, &[], eps);
        // The reference sums in f64, which holds f32's maximum many times over; for f64
        // inputs the expected output is checked against the convex-combination bounds.
        let want = (T::EPSILON.to_f64() > 1e-10)
            .then(|| attention_reference::attention(&p.q, &p.k, &p.v, &Default::default()));
        let paths = std::iter::once(None).chain(CpuPath::supported().into_iter().map(Some));
        for path in paths {
            let mut opts = AttentionOptions::new();
            if let Some(path) = path {
                opts = opts.with_cpu_path(path);
            }
            let out = scaled_dot_product_attention(&q, &k, &v, &opts).unwrap();
            assert!(out.iter().all(|x| x.finite()), "{path:?} {n_q}x{n_kv}");
            let out = widen(&out);
            if let Some(want) = &want {
                assert_output_close(&out, &want.output, &p.v, &delta, eps, &format!("{path:?}"));
            }
            for c in 0..3 {
                let (lo, hi) = (p.v.column(c).min(), p.v.column(c).max());
                let slack = 8.0 * n_kv as f64 * eps * p.v.column(c).amax();
                assert!(
                    out.column(c)
                        .iter()
                        .all(|&o| o >= lo - slack && o <= hi + slack)
                );
            }
        }
    }
}

#[test]
fn huge_values_f32() {
    huge_values::<f32>();
}

#[test]
fn huge_values_f64() {
    huge_values::<f64>();
}

/// Degenerate widths on the fused path (sizes past the direct path's limit): d_k = 0 with
/// an explicit scale gives uniform weights (the mean of V); d_v = 0 gives an n_q × 0
/// output and still a log-sum-exp of ln n_kv.
#[test]
fn zero_widths_on_the_fused_path() {
    for path in CpuPath::supported() {
        for par in [Parallelism::Sequential, Parallelism::Rayon] {
            let opts = AttentionOptions::new()
                .with_scale(1.0)
                .with_cpu_path(path)
                .with_parallelism(par);
            let q = DMatrix::<f64>::zeros(300, 0);
            let k = DMatrix::<f64>::zeros(200, 0);
            let v = DMatrix::<f64>::from_fn(200, 5, |j, c| (j * (c + 1)) as f64);
            let out = scaled_dot_product_attention(&q, &k, &v, &opts).unwrap();
            let mean = v.row_mean();
            for i in 0..300 {
                for c in 0..5 {
                    assert!((out[(i, c)] - mean[c]).abs() <= 1e-12 * mean[c].abs().max(1.0));
                }
            }
            let q = DMatrix::<f32>::from_element(300, 3, 0.5);
            let k = DMatrix::<f32>::from_element(200, 3, 0.5);
            let v = DMatrix::<f32>::zeros(200, 0);
            let opts32 = AttentionOptions::new()
                .with_cpu_path(path)
                .with_parallelism(par);
            let (out, lse) = scaled_dot_product_attention_with_lse(&q, &k, &v, &opts32).unwrap();
            assert_eq!(out.shape(), (300, 0));
            // Equal scores s = 0.75/√3: lse = s + ln n_kv. Bound of common/mod.rs:
            // 2·(Δ + (n_kv + 4)u + u|lse|) with Δ = (d_k + 4)·u·s.
            let s = 0.75 / 3f64.sqrt();
            let want = s + 200f64.ln();
            let u = f32::EPSILON as f64;
            let tol = 2.0 * (7.0 * u * s + 204.0 * u + u * want);
            assert!(
                lse.iter().all(|&l| (l as f64 - want).abs() <= tol),
                "{path:?}"
            );
        }
    }
}

/// Row-strided left operands of nalgebra's product (a transposed view of 3–5 rows):
/// nalgebra 0.35's small-matrix path took the strided slice's length for the row count
/// and wrote past its output column (an out-of-bounds `get_unchecked_mut`, caught by
/// debug assertions). `compute_qkv` and `attention_weights` copy such views first; the
/// results equal those of the contiguous matrix bit for bit.
#[test]
fn row_strided_left_operands_of_products() {
    for n in [2, 3, 5] {
        let x = DMatrix::<f64>::from_fn(n, 4, |i, j| ((i * 4 + j) as f64 * 0.7).sin());
        let xt = x.transpose();
        let strided: DMatrixView<'_, f64, Dyn, Dyn> = DMatrixView::from_slice_with_strides_generic(
            xt.as_slice(),
            Dyn(n),
            Dyn(4),
            Dyn(4),
            Dyn(1),
        );
        let w = DMatrix::<f64>::from_fn(4, 3, |i, j| (i + 2 * j) as f64 * 0.1);
        assert_eq!(
            attention_core::compute_qkv(strided, &w, &w, &w).unwrap(),
            attention_core::compute_qkv(&x, &w, &w, &w).unwrap()
        );
        let options = AttentionOptions::new();
        assert_eq!(
            attention_core::attention_weights(strided, strided, strided, &options).unwrap(),
            attention_core::attention_weights(&x, &x, &x, &options).unwrap()
        );
    }
}

/// A single-head call may give its ALiBi slope, mask and bias as one-entry lists (the
/// multi-head forms): the same call, so the same bits, on every route (row path,
/// decoding kernel, block kernel) and CPU path.
fn one_entry_lists_equal_single_forms<T: Element>() {
    for (n_q, n_kv) in [(2, 3), (5, 100), (70, 90)] {
        let m = |r: usize, c: usize, s: f64| {
            DMatrix::<T>::from_fn(r, c, |i, j| {
                T::from_f64_rounded(((i * c + j) as f64 * 0.37 + s).sin())
            })
        };
        let (q, k, v) = (m(n_q, 8, 0.1), m(n_kv, 8, 0.2), m(n_kv, 6, 0.3));
        let mask = DMatrix::from_fn(n_q, n_kv, |i, j| (i + 2 * j) % 5 != 0);
        let bias = m(n_q, n_kv, 0.4);
        let slope = [T::from_f64_rounded(0.25)];
        let masks = [(&mask).into()];
        let biases = [(&bias).into()];
        let paths = std::iter::once(None).chain(CpuPath::supported().into_iter().map(Some));
        for path in paths {
            let mut single = AttentionOptions::new()
                .with_alibi_slope(slope[0])
                .with_mask(&mask)
                .with_bias(&bias);
            let mut lists = AttentionOptions::new()
                .with_alibi_slopes(&slope)
                .with_sequence_masks(&masks)
                .with_sequence_biases(&biases);
            if let Some(p) = path {
                (single, lists) = (single.with_cpu_path(p), lists.with_cpu_path(p));
            }
            let want = scaled_dot_product_attention(&q, &k, &v, &single).unwrap();
            let got = scaled_dot_product_attention(&q, &k, &v, &lists).unwrap();
            assert_eq!(got, want, "{n_q}x{n_kv} {path:?}");
        }
    }
}

#[test]
fn one_entry_lists_equal_single_forms_f32() {
    one_entry_lists_equal_single_forms::<f32>();
}

#[test]
fn one_entry_lists_equal_single_forms_f64() {
    one_entry_lists_equal_single_forms::<f64>();
}
