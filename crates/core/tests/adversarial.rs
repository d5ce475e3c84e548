//! Inputs a hostile user would try: every reproducer of the hardening issue, each on every
//! CPU path this machine has, threaded and not, and through every function that takes the
//! same problem. Each must give the mathematically right answer or a typed error, and the
//! same outcome everywhere (the same `Ok`/`Err` variant and fields; values within the
//! error bound of `common/mod.rs`).
//!
//! The rule for scores outside the type's range (see `kernel/careful.rs`): query `i`
//! overflows at key `j` if `j` is allowed and `scale·q_i·k_j` is outside the range or the
//! final score is `+∞`, or at its first allowed key if none of its allowed scores is
//! finite; the call reports the smallest such `(query, key)`.

mod common;

use attention_core::{
    AttentionError, AttentionOptions, Axis, CpuPath, Element, KernelRun, MatRef, Operand,
    Parallelism, attention_weights, compute_qkv, last_kernel_run, merge_partial_attention,
    scaled_dot_product_attention, scaled_dot_product_attention_into,
    scaled_dot_product_attention_with_lse,
};
use common::*;
use nalgebra::{DMatrix, DMatrixView, DVector, Dyn};
use proptest::prelude::*;

/// Every way of running one call: each supported path, sequential and threaded, and the
/// default (unforced) routing.
fn runs<'a, T: Element>(base: &AttentionOptions<'a, T>) -> Vec<(String, AttentionOptions<'a, T>)> {
    let mut all = vec![("default".to_string(), base.clone())];
    for path in CpuPath::supported() {
        for par in [Parallelism::Sequential, Parallelism::Rayon] {
            all.push((
                format!("{path:?}/{par:?}"),
                base.clone().with_cpu_path(path).with_parallelism(par),
            ));
        }
    }
    all
}

type Outcome<T> = Result<(DMatrix<T>, DVector<T>), AttentionError>;

/// Runs `sdpa_with_lse` every way; asserts every run gives the same error or an `Ok`,
/// and returns the outcomes with their labels.
fn every_way<T: Element>(
    q: &DMatrix<T>,
    k: &DMatrix<T>,
    v: &DMatrix<T>,
    base: &AttentionOptions<'_, T>,
) -> Vec<(String, Outcome<T>)> {
    let outcomes: Vec<(String, Outcome<T>)> = runs(base)
        .into_iter()
        .map(|(label, o)| (label, scaled_dot_product_attention_with_lse(q, k, v, &o)))
        .collect();
    let first_err = outcomes[0].1.as_ref().err().cloned();
    for (label, o) in &outcomes {
        assert_eq!(
            o.as_ref().err(),
            first_err.as_ref(),
            "{label} differs from the default run"
        );
    }
    outcomes
}

/// Asserts that every way of running the call, `attention_weights` included, returns
/// exactly `want`.
fn fails_everywhere<T: Element>(
    q: &DMatrix<T>,
    k: &DMatrix<T>,
    v: &DMatrix<T>,
    base: &AttentionOptions<'_, T>,
    want: AttentionError,
) {
    for (label, o) in every_way(q, k, v, base) {
        assert_eq!(o.err(), Some(want.clone()), "{label}");
    }
    assert_eq!(
        attention_weights(q, k, v, base).err(),
        Some(want.clone()),
        "weights"
    );
    let mut out = nan_matrix::<T>(q.nrows(), v.ncols());
    assert_eq!(
        scaled_dot_product_attention_into(q, k, v, base, &mut out).err(),
        Some(want),
        "_into"
    );
    // Nothing half-written: the output keeps its old contents.
    assert!(
        out.iter().all(|x| x.to_f64().is_nan()),
        "_into wrote before failing"
    );
}

/// Asserts that every way of running the call succeeds with `want` (column-major), each
/// entry within `tol` and finite.
fn gives_everywhere<T: Element>(
    q: &DMatrix<T>,
    k: &DMatrix<T>,
    v: &DMatrix<T>,
    base: &AttentionOptions<'_, T>,
    want: &[f64],
    tol: f64,
) {
    for (label, o) in every_way(q, k, v, base) {
        let (out, lse) = o.unwrap_or_else(|e| panic!("{label}: {e}"));
        let got: Vec<f64> = out.iter().map(|x| x.to_f64()).collect();
        assert_eq!(got.len(), want.len(), "{label}");
        for (g, w) in got.iter().zip(want) {
            assert!(
                g.is_finite() && (g - w).abs() <= tol,
                "{label}: {got:?} vs {want:?}"
            );
        }
        assert!(
            lse.iter().all(|l| l.to_f64() > f64::NEG_INFINITY),
            "{label}: lse {lse:?}"
        );
    }
}

fn m<T: Element>(rows: usize, cols: usize, xs: &[f64]) -> DMatrix<T> {
    DMatrix::from_row_slice(
        rows,
        cols,
        &xs.iter()
            .map(|&x| T::from_f64_rounded(x))
            .collect::<Vec<_>>(),
    )
}

// ---- 1. Panic on valid input when n_kv + padding crosses a 256-key packing chunk ----

/// n_kv around every multiple of 256 (the packing chunk) and every panel width (4, 6, 8),
/// with n_q above the row path's limit, against the reference, output pre-filled with NaN.
fn packing_edges<T: Element>() {
    let mut sizes: Vec<usize> = vec![
        253, 254, 255, 511, 1021, 1022, 1023, 1279, 1789, 1790, 1791, 2047,
    ];
    for base in [256usize, 512] {
        sizes.extend(base - 10..=base + 10);
    }
    let eps = T::EPSILON.to_f64();
    for &n_kv in &sizes {
        let n_q = 9 + n_kv % 5;
        let p = Problem {
            q: DMatrix::from_fn(n_q, 3, |i, j| ((i * 7 + j * 3) % 11) as f64 * 0.1 - 0.5),
            k: DMatrix::from_fn(n_kv, 3, |i, j| ((i * 5 + j) % 13) as f64 * 0.1 - 0.6),
            v: DMatrix::from_fn(n_kv, 2, |i, j| ((i * 3 + j * 7) % 17) as f64 - 8.0),
        }
        .rounded::<T>();
        let (q, k, v) = p.cast::<T>();
        let want = attention_reference::attention(&p.q, &p.k, &p.v, &Default::default());
        let delta = score_error(&p.q, &p.k, 1.0 / 3f64.sqrt(), &[], eps);
        for (label, o) in runs::<T>(&AttentionOptions::new()) {
            let mut out = nan_matrix::<T>(n_q, 2);
            scaled_dot_product_attention_into(&q, &k, &v, &o, &mut out)
                .unwrap_or_else(|e| panic!("n_kv {n_kv} {label}: {e}"));
            assert_output_close(
                &widen(&out),
                &want.output,
                &p.v,
                &delta,
                eps,
                &format!("n_kv {n_kv} {label}"),
            );
        }
        // The exact reproducer: zeros everywhere (every weight equal).
        let (q0, k0) = (DMatrix::<T>::zeros(9, 1), DMatrix::<T>::zeros(n_kv, 1));
        for (label, o) in runs::<T>(&AttentionOptions::new()) {
            let out = scaled_dot_product_attention(&q0, &k0, &k0, &o)
                .unwrap_or_else(|e| panic!("zeros, n_kv {n_kv} {label}: {e}"));
            assert!(
                out.iter().all(|&x| x == T::zero()),
                "zeros, n_kv {n_kv} {label}"
            );
        }
    }
}

#[test]
fn packing_edges_f32() {
    packing_edges::<f32>();
}

#[test]
fn packing_edges_f64() {
    packing_edges::<f64>();
}

// ---- 2. Views with a zero stride (numpy's broadcast_to) ----

#[test]
fn zero_stride_views_read_like_their_copies() {
    let data = [1.0f32, 2.0];
    // Row stride 0: four copies of the row [1, 2].
    let rows: MatRef<'_, f32> =
        DMatrixView::from_slice_with_strides_generic(&data, Dyn(4), Dyn(2), Dyn(0), Dyn(1));
    let data_c = [0.5f32, -1.0, 2.0, 0.25];
    // Column stride 0: three copies of the column [0.5, -1, 2, 0.25].
    let cols: MatRef<'_, f32> =
        DMatrixView::from_slice_with_strides_generic(&data_c, Dyn(4), Dyn(3), Dyn(1), Dyn(0));
    // The copies are made by indexing: nalgebra's own `clone_owned` misreads such views.
    let copy = |m: &MatRef<'_, f32>| DMatrix::from_fn(m.nrows(), m.ncols(), |i, j| m[(i, j)]);
    let rows_owned = copy(&rows);
    let cols_owned = copy(&cols);
    assert_eq!(
        rows_owned,
        DMatrix::from_row_slice(4, 2, &[1.0, 2.0, 1.0, 2.0, 1.0, 2.0, 1.0, 2.0])
    );

    let w = DMatrix::<f32>::from_fn(2, 3, |i, j| (i * 3 + j) as f32 - 2.0);
    let (q, k, v) = compute_qkv(rows, &w, &w, &w).unwrap();
    let want = &rows_owned * &w;
    assert_eq!((q.clone(), k, v), (want.clone(), want.clone(), want));
    // A broadcast weight matrix too.
    let w_b: MatRef<'_, f32> =
        DMatrixView::from_slice_with_strides_generic(&data, Dyn(2), Dyn(5), Dyn(1), Dyn(0));
    let (q2, _, _) = compute_qkv(rows, w_b, w_b, w_b).unwrap();
    assert_eq!(q2, &rows_owned * copy(&w_b));

    // Attention: Q, K, V, bias broadcast; every path, every function, against the copies.
    let k_owned = DMatrix::<f32>::from_fn(4, 3, |i, j| (i + 2 * j) as f32 * 0.3 - 1.0);
    let bias_data = [0.1f32, -0.2, 0.3, 0.0];
    let bias: MatRef<'_, f32> =
        DMatrixView::from_slice_with_strides_generic(&bias_data, Dyn(4), Dyn(4), Dyn(0), Dyn(1));
    let bias_owned = copy(&bias);
    let with_bias = AttentionOptions::new().with_bias(bias);
    let with_bias_owned = AttentionOptions::new().with_bias(&bias_owned);
    let want_w = attention_weights(&cols_owned, &k_owned, &cols_owned, &with_bias_owned).unwrap();
    let got_w = attention_weights(cols, &k_owned, cols, &with_bias).unwrap();
    assert_eq!(got_w, want_w);
    for (label, o) in runs(&with_bias) {
        let o_owned = match o.cpu_path() {
            Some(p) => with_bias_owned
                .clone()
                .with_cpu_path(p)
                .with_parallelism(o.parallelism()),
            None => with_bias_owned.clone(),
        };
        let got = scaled_dot_product_attention(cols, &k_owned, cols, &o).unwrap();
        let want =
            scaled_dot_product_attention(&cols_owned, &k_owned, &cols_owned, &o_owned).unwrap();
        assert_eq!(got, want, "{label}");
        // Rows of a broadcast query are identical, and so are their outputs.
        let got = scaled_dot_product_attention(rows, rows, rows, &o).unwrap();
        for i in 1..4 {
            assert_eq!(got.row(i), got.row(0), "{label}");
        }
    }
}

// ---- 3, 4, 7. Scores outside the type's range ----

#[test]
fn alibi_overflow_to_plus_infinity_is_an_error() {
    // Scores 0 − (−MAX)·(2, 1, 0) = (2·MAX, MAX, 0): the first decides the row.
    let (q, k, v) = (
        m::<f32>(1, 1, &[0.0]),
        m::<f32>(3, 1, &[0.0; 3]),
        m::<f32>(3, 1, &[1.0, 2.0, 3.0]),
    );
    let o = AttentionOptions::new().with_alibi_slope(-f32::MAX);
    fails_everywhere(
        &q,
        &k,
        &v,
        &o,
        AttentionError::ScoreOverflow { query: 0, key: 0 },
    );
}

#[test]
fn bias_overflow_to_plus_infinity_is_an_error() {
    // Scores 128·1e32 + MAX overflow at every position; the first is (0, 0).
    for (n, d) in [(16, 128), (3, 4), (70, 20)] {
        let q = DMatrix::<f32>::from_element(n, d, 1.0);
        let bias = DMatrix::<f32>::from_element(n, n, f32::MAX);
        let o = AttentionOptions::new().with_scale(1e32).with_bias(&bias);
        fails_everywhere(
            &q,
            &q,
            &q,
            &o,
            AttentionError::ScoreOverflow { query: 0, key: 0 },
        );
    }
}

#[test]
fn a_row_whose_every_score_falls_below_the_range_is_an_error() {
    // ALiBi +MAX: query 0 is 2 from its only key (score −2·MAX), query 1 one (−MAX), query
    // 2 zero. Query 0's only weight is undetermined in f32: an error, not a silent 0.
    let (q, k, v) = (
        m::<f32>(3, 1, &[0.0; 3]),
        m::<f32>(1, 1, &[0.0]),
        m::<f32>(1, 1, &[5.0]),
    );
    let o = AttentionOptions::new().with_alibi_slope(f32::MAX);
    fails_everywhere(
        &q,
        &k,
        &v,
        &o,
        AttentionError::ScoreOverflow { query: 0, key: 0 },
    );
    // Scale 1e32 and bias −MAX: both scores −1e32 − MAX round to −∞.
    let (q, k, v) = (
        m::<f32>(1, 1, &[1.0]),
        m::<f32>(2, 1, &[-1.0, -1.0]),
        m::<f32>(2, 1, &[1.0, 3.0]),
    );
    let bias = DMatrix::<f32>::from_element(1, 2, -f32::MAX);
    let o = AttentionOptions::new().with_scale(1e32).with_bias(&bias);
    fails_everywhere(
        &q,
        &k,
        &v,
        &o,
        AttentionError::ScoreOverflow { query: 0, key: 0 },
    );
}

#[test]
fn scores_below_the_range_beside_a_finite_one_get_weight_zero() {
    // ALiBi +MAX, each query i allowed keys i − 2, i − 1, i (n_q = n_kv: diag(i) = i), at
    // distances 2, 1, 0: scores −2·MAX (−∞ in f32), −MAX, 0. The true weights of the first
    // two are below e^(−2^127): exactly 0 after rounding, so the output is v_i.
    for n in [3, 20] {
        let q = DMatrix::<f32>::zeros(n, 1);
        let v = DMatrix::<f32>::from_fn(n, 1, |j, _| (j + 1) as f32);
        let mask = DMatrix::from_fn(n, n, |i, j| j <= i && i - j <= 2);
        let o = AttentionOptions::new()
            .with_alibi_slope(f32::MAX)
            .with_mask(&mask);
        let want: Vec<f64> = (0..n).map(|i| (i + 1) as f64).collect();
        // Scores 0 and the rest exactly 0 weight: the output is exact.
        gives_everywhere(&q, &q, &v, &o, &want, 0.0);
    }
}

/// An additive bias of −MAX (a common way to mask, PyTorch's `finfo.min`) with ordinary
/// scores keeps the fast kernels and equals the key mask it stands for.
fn neg_max_bias_masks<T: Element>() {
    let q = DMatrix::<T>::from_fn(12, 4, |i, j| T::from_f64_rounded((i + j) as f64 * 0.1));
    let v = DMatrix::<T>::from_fn(12, 2, |i, j| T::from_f64_rounded((i * 2 + j) as f64));
    let mut bias = DMatrix::<T>::zeros(12, 12);
    bias.column_mut(3).fill(-T::MAX);
    let plain_mask: Vec<bool> = (0..12).map(|j| j != 3).collect();
    let want = scaled_dot_product_attention(
        &q,
        &q,
        &v,
        &AttentionOptions::new().with_key_mask(&plain_mask),
    )
    .unwrap();
    let o = AttentionOptions::new().with_bias(&bias);
    for (label, o) in runs(&o) {
        let r = scaled_dot_product_attention_with_lse(&q, &q, &v, &o);
        assert_ne!(last_kernel_run(), Some(KernelRun::Careful), "{label}");
        let (out, _) = r.unwrap_or_else(|e| panic!("{label}: {e}"));
        // Within the bound of `common` (scores ≤ 2, n_kv = 12, max|v| = 23).
        let tol = SECOND_ORDER * (2.0 * 8.0 * 2.0 + 18.0) * T::EPSILON.to_f64() * 23.0;
        assert!(widen(&(out - &want)).amax() <= tol, "{label}");
    }
}

#[test]
fn neg_max_bias_masks_f32() {
    neg_max_bias_masks::<f32>();
}

#[test]
fn neg_max_bias_masks_f64() {
    neg_max_bias_masks::<f64>();
}

/// The reproducer 7: two overflowing pairs, (0, 600) and (64, 0); the smallest in
/// (query, key) order is reported by every path, thread count and function.
#[test]
fn the_first_overflow_in_query_key_order_is_reported() {
    let (q, k, v) = overflow_reproducer(64);
    let want = AttentionError::ScoreOverflow { query: 0, key: 600 };
    fails_everywhere(&q, &k, &v, &AttentionOptions::new(), want.clone());
    for threads in [1, 2, 3, 16] {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap();
        let got =
            pool.install(|| scaled_dot_product_attention(&q, &k, &v, &AttentionOptions::new()));
        assert_eq!(got.err(), Some(want.clone()), "{threads} threads");
    }
    // Pairs a causal mask forbids do not count: query 0 may only see key 0 (top-left),
    // so the first allowed overflow is (64, 0).
    let o = AttentionOptions::new().with_causal(attention_core::Causal::TopLeft);
    fails_everywhere(
        &q,
        &k,
        &v,
        &o,
        AttentionError::ScoreOverflow { query: 64, key: 0 },
    );
}

// ---- 5. Values at the type's maximum ----

fn values_at_the_maximum<T: Element>() {
    for n_q in [1, 9, 70] {
        let q = DMatrix::<T>::from_element(n_q, 1, T::one());
        let k = m::<T>(2, 1, &[0.0, 0.02]);
        let v = DMatrix::<T>::from_element(2, 3, T::MAX);
        let want = vec![T::MAX.to_f64(); n_q * 3];
        // The bound of `common/mod.rs` (scores exact to Δ ≈ 0 here): (n_kv + 6)·u·max|v|,
        // times the second-order factor; and never past MAX (a convex combination).
        let tol = SECOND_ORDER * 8.0 * T::EPSILON.to_f64() * T::MAX.to_f64();
        gives_everywhere(&q, &k, &v, &AttentionOptions::new(), &want, tol);
        let neg = -v.clone();
        let want_neg: Vec<f64> = want.iter().map(|x| -x).collect();
        gives_everywhere(&q, &k, &neg, &AttentionOptions::new(), &want_neg, tol);
    }
    // Ten equal parts holding MAX, each with lse 0: a convex combination of MAX is MAX.
    let part = DMatrix::<T>::from_element(2, 3, T::MAX);
    let lse = [T::zero(); 2];
    let (merged, lse_m) = merge_partial_attention((0..10).map(|_| (&part, &lse[..]))).unwrap();
    assert!(merged.iter().all(|&x| x == T::MAX), "{merged}");
    assert!(lse_m.iter().all(|x| x.finite()));
}

#[test]
fn values_at_the_maximum_f32() {
    values_at_the_maximum::<f32>();
}

#[test]
fn values_at_the_maximum_f64() {
    values_at_the_maximum::<f64>();
}

// ---- 8. Sizes that cannot be allocated ----

#[test]
fn sizes_that_cannot_be_allocated_are_errors() {
    let n = 200_000;
    let q = DMatrix::<f32>::zeros(n, 1);
    let err = attention_weights(&q, &q, &q, &AttentionOptions::new()).unwrap_err();
    assert!(
        matches!(err, AttentionError::TooLarge { operand: Operand::Weights, rows, columns } if rows == n && columns == n)
            // Some allocators grant 160 GB of address space lazily; then it is computed.
            || cfg!(miri),
        "{err}"
    );
    assert!(
        err.to_string()
            .contains("attention weights (200000 x 200000"),
        "{err}"
    );

    // 2^62 queries of width 0 (a view of no data): the output cannot exist.
    let empty: [f32; 0] = [];
    let huge = 1usize << 62;
    let q: MatRef<'_, f32> =
        DMatrixView::from_slice_with_strides_generic(&empty, Dyn(huge), Dyn(0), Dyn(1), Dyn(huge));
    let k = DMatrix::<f32>::zeros(3, 0);
    let v = DMatrix::<f32>::zeros(3, 2);
    let o = AttentionOptions::new().with_scale(1.0);
    assert_eq!(
        scaled_dot_product_attention(q, &k, &v, &o).unwrap_err(),
        AttentionError::TooLarge {
            operand: Operand::Output,
            rows: huge,
            columns: 2
        }
    );
    let v0 = DMatrix::<f32>::zeros(3, 0);
    assert_eq!(
        scaled_dot_product_attention_with_lse(q, &k, &v0, &o).unwrap_err(),
        AttentionError::TooLarge {
            operand: Operand::Lse,
            rows: huge,
            columns: 1
        }
    );
    // With no output columns and no lse there is nothing to compute or allocate.
    assert_eq!(
        scaled_dot_product_attention(q, &k, &v0, &o)
            .unwrap()
            .shape(),
        (huge, 0)
    );
}

// ---- 9. Messages ----

#[test]
fn messages_say_what_is_wrong() {
    let q = DMatrix::<f32>::zeros(1, 1);
    let k = DMatrix::<f32>::zeros(3, 1);
    let bias = m::<f32>(1, 3, &[0.0, f64::INFINITY, f64::NEG_INFINITY]);
    let err = scaled_dot_product_attention(&q, &k, &k, &AttentionOptions::new().with_bias(&bias))
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        "bias[0, 1] is +inf: its entries must be finite or -inf"
    );

    let err = scaled_dot_product_attention(
        &q,
        &k,
        &k,
        &AttentionOptions::new().with_key_mask(&[true; 4]),
    )
    .unwrap_err();
    assert_eq!(
        err,
        AttentionError::DimensionMismatch {
            operand: Operand::KeyMask,
            axis: Axis::Entries,
            found: 4,
            expected: 3,
            against: Operand::Key,
            rule: "one key-mask entry per key",
        }
    );
    assert_eq!(
        err.to_string(),
        "key mask has 4 entries but key has 3 (one key-mask entry per key)"
    );

    let part = DMatrix::<f32>::zeros(2, 1);
    let lse = [0.0f32, f32::NAN];
    let err = merge_partial_attention([(&part, &lse[..])]).unwrap_err();
    assert_eq!(
        err.to_string(),
        "partial log-sum-exp 0[1] is NaN: its entries must be finite or -inf"
    );
    let err = merge_partial_attention([(&part, &lse[..1])]).unwrap_err();
    assert_eq!(
        err.to_string(),
        "partial log-sum-exp 0 has 1 entries but partial output 0 has 2 (one log-sum-exp per query row)"
    );

    let inf_q = m::<f32>(1, 1, &[f64::INFINITY]);
    let err = scaled_dot_product_attention(&inf_q, &k, &k, &AttentionOptions::new()).unwrap_err();
    assert_eq!(
        err.to_string(),
        "query[0, 0] is +inf: inputs must be finite"
    );
}

// ---- Forced paths reach their own kernel at every size ----

#[test]
fn a_forced_path_runs_its_own_kernel_at_every_size() {
    for (n_q, n_kv) in [(1, 1), (2, 2), (1, 4096), (8, 300), (9, 9), (70, 70)] {
        let q = DMatrix::<f32>::from_fn(n_q, 4, |i, j| (i + j) as f32 * 0.1);
        let k = DMatrix::<f32>::from_fn(n_kv, 4, |i, j| (i * j) as f32 * 0.01);
        for path in CpuPath::supported() {
            for par in [Parallelism::Sequential, Parallelism::Rayon] {
                let o = AttentionOptions::new()
                    .with_cpu_path(path)
                    .with_parallelism(par);
                scaled_dot_product_attention(&q, &k, &k, &o).unwrap();
                // A few queries: the path's decoding kernel; more: its block kernel.
                let want = if n_q <= 8 {
                    KernelRun::Decode(path)
                } else {
                    KernelRun::Block(path)
                };
                assert_eq!(last_kernel_run(), Some(want), "{n_q}x{n_kv} {path:?}");
                // Row-strided inputs: the same kernel (the decoding kernel copies a part's
                // keys when their rows are not contiguous).
                let row_major = |m: &DMatrix<f32>| m.transpose().as_slice().to_vec();
                let (qd, kd) = (row_major(&q), row_major(&k));
                let qv = DMatrixView::from_slice_with_strides_generic(
                    &qd,
                    Dyn(n_q),
                    Dyn(4),
                    Dyn(4),
                    Dyn(1),
                );
                let kv = DMatrixView::from_slice_with_strides_generic(
                    &kd,
                    Dyn(n_kv),
                    Dyn(4),
                    Dyn(4),
                    Dyn(1),
                );
                scaled_dot_product_attention(qv, kv, kv, &o).unwrap();
                assert_eq!(
                    last_kernel_run(),
                    Some(want),
                    "{n_q}x{n_kv} {path:?} strided"
                );
            }
        }
        // Unforced: tiny calls take the row path, a few queries against more keys the
        // decoding kernel (unless the environment forces a path).
        if std::env::var_os("ATTENTION_CPU_PATH").is_none() && (n_q <= 8 || n_q * n_kv * 8 <= 8192)
        {
            scaled_dot_product_attention(&q, &k, &k, &AttentionOptions::new()).unwrap();
            let want = if n_kv <= 64 && n_q * n_kv * 8 <= 8192 {
                KernelRun::Row
            } else {
                KernelRun::Decode(CpuPath::detect())
            };
            assert_eq!(last_kernel_run(), Some(want), "{n_q}x{n_kv}");
        }
    }
    // Scores outside the range: the careful path, whatever was forced.
    let q = DMatrix::<f32>::from_element(10, 2, 1e20);
    for path in CpuPath::supported() {
        let o = AttentionOptions::new().with_cpu_path(path);
        let _ = scaled_dot_product_attention(&q, &q, &q, &o);
        assert_eq!(last_kernel_run(), Some(KernelRun::Careful), "{path:?}");
    }
}

// ---- Hostile values through every option: a property ----

/// A number chosen to hurt: the type's extremes, subnormals, signed zeros, huge and tiny
/// powers of ten, or an ordinary N(0, 1)-sized value. Kept symbolic so that each element
/// type gets its own extremes.
#[derive(Clone, Copy, Debug)]
enum Hostile {
    Max(bool),
    HalfMax(bool),
    SmallestNormal(bool),
    Subnormal(bool),
    Zero(bool),
    /// ±10^e.
    Pow10(bool, i32),
    Plain(f64),
}

impl Hostile {
    fn value<T: Element>(self) -> T {
        let sign = |neg: bool, x: f64| if neg { -x } else { x };
        let max = T::MAX.to_f64();
        let smallest_normal = if T::EPSILON.to_f64() > 1e-10 {
            f32::MIN_POSITIVE as f64
        } else {
            f64::MIN_POSITIVE
        };
        T::from_f64_rounded(match self {
            Hostile::Max(n) => sign(n, max),
            Hostile::HalfMax(n) => sign(n, max / 2.0),
            Hostile::SmallestNormal(n) => sign(n, smallest_normal),
            Hostile::Subnormal(n) => sign(n, smallest_normal / 1024.0),
            Hostile::Zero(n) => sign(n, 0.0),
            // Clamped into the type's range (f32 has 10^±38).
            Hostile::Pow10(n, e) => sign(n, 10f64.powi(e).min(max)),
            Hostile::Plain(x) => x,
        })
    }
}

fn hostile() -> impl Strategy<Value = Hostile> {
    prop_oneof![
        4 => (-3.0f64..3.0).prop_map(Hostile::Plain),
        1 => any::<bool>().prop_map(Hostile::Max),
        1 => any::<bool>().prop_map(Hostile::HalfMax),
        1 => any::<bool>().prop_map(Hostile::SmallestNormal),
        1 => any::<bool>().prop_map(Hostile::Subnormal),
        1 => any::<bool>().prop_map(Hostile::Zero),
        2 => (any::<bool>(), -40i32..40).prop_map(|(n, e)| Hostile::Pow10(n, e)),
    ]
}

/// Mostly ordinary values with hostile ones mixed in (a matrix of only extremes tests
/// little beyond its first overflow).
fn hostile_matrix(rows: usize, cols: usize) -> impl Strategy<Value = Vec<Hostile>> {
    prop::collection::vec(
        prop_oneof![6 => (-3.0f64..3.0).prop_map(Hostile::Plain), 1 => hostile()],
        rows * cols,
    )
}

/// A hostile problem with every option.
#[derive(Clone, Debug)]
struct HostileCase {
    n_q: usize,
    n_kv: usize,
    d_k: usize,
    d_v: usize,
    q: Vec<Hostile>,
    k: Vec<Hostile>,
    v: Vec<Hostile>,
    /// Read Q through a view whose rows all alias row 0 (row stride 0).
    broadcast_q: bool,
    /// Read K through a transposed (row-strided) view.
    strided_k: bool,
    scale: Option<Hostile>,
    causal: Option<attention_core::Causal>,
    window: Option<(usize, usize)>,
    softcap: Option<Hostile>,
    alibi: Option<Hostile>,
    /// Bias entries; `None` entries are −∞.
    bias: Option<Vec<Option<Hostile>>>,
    mask: Option<Vec<bool>>,
    key_mask: Option<Vec<bool>>,
}

fn hostile_case() -> impl Strategy<Value = HostileCase> {
    use attention_core::Causal;
    (0usize..=20, 0usize..=140, 0usize..=6, 0usize..=4).prop_flat_map(|(n_q, n_kv, d_k, d_v)| {
        let nn = n_q * n_kv;
        (
            (
                hostile_matrix(n_q, d_k),
                hostile_matrix(n_kv, d_k),
                hostile_matrix(n_kv, d_v),
                any::<bool>(),
                any::<bool>(),
            ),
            (
                // d_k = 0 needs a scale; otherwise it is optional.
                prop::option::weighted(if d_k == 0 { 0.999 } else { 0.5 }, hostile()),
                prop::option::of(prop_oneof![
                    Just(Causal::TopLeft),
                    Just(Causal::BottomRight)
                ]),
                prop::option::of((0usize..6, prop_oneof![0usize..6, Just(usize::MAX)])),
                prop::option::of(hostile().prop_filter("softcap > 0", |h| {
                    h.value::<f32>() > 0.0 && h.value::<f64>() > 0.0
                })),
                prop::option::of(hostile()),
            ),
            (
                prop::option::of(prop::collection::vec(
                    prop::option::weighted(0.9, hostile()),
                    nn,
                )),
                prop::option::of(prop::collection::vec(prop::bool::weighted(0.8), nn)),
                prop::option::of(prop::collection::vec(prop::bool::weighted(0.8), n_kv)),
            ),
        )
            .prop_map(
                move |(
                    (q, k, v, broadcast_q, strided_k),
                    (scale, causal, window, softcap, alibi),
                    (bias, mask, key_mask),
                )| HostileCase {
                    n_q,
                    n_kv,
                    d_k,
                    d_v,
                    q,
                    k,
                    v,
                    broadcast_q,
                    strided_k,
                    scale,
                    causal,
                    window,
                    softcap,
                    alibi,
                    bias,
                    mask,
                    key_mask,
                },
            )
    })
}

/// Whether query `i` may see key `j` under the case's options (an independent statement of
/// the documented rule: band, masks, −∞ bias).
fn allowed(c: &HostileCase, i: usize, j: usize) -> bool {
    use attention_core::Causal;
    let diag = match c.causal {
        Some(Causal::TopLeft) => i as i128,
        _ => i as i128 + c.n_kv as i128 - c.n_q as i128,
    };
    let jj = j as i128;
    c.causal.is_none_or(|_| jj <= diag)
        && c.window
            .is_none_or(|(l, r)| diag - l as i128 <= jj && jj <= diag + r as i128)
        && c.mask.as_ref().is_none_or(|m| m[j * c.n_q + i])
        && c.key_mask.as_ref().is_none_or(|km| km[j])
        && c.bias.as_ref().is_none_or(|b| b[j * c.n_q + i].is_some())
}

/// Every path, thread mode and function gives the same outcome; an `Ok` is never NaN,
/// stays within ±max|V|, has lse −∞ exactly for rows without an allowed key, and agrees
/// with the reference within the bound of `common/mod.rs` where the reference is finite.
fn hostile_holds<T: Element>(c: &HostileCase) {
    let mat = |vals: &[Hostile], r: usize, cl: usize| {
        DMatrix::<T>::from_iterator(r, cl, vals.iter().map(|h| h.value::<T>()))
    };
    let mut q = mat(&c.q, c.n_q, c.d_k);
    if c.broadcast_q && c.n_q > 0 {
        // The view below repeats row 0; the owned copy the reference sees must too.
        for i in 1..c.n_q {
            let row0 = q.row(0).clone_owned();
            q.row_mut(i).copy_from(&row0);
        }
    }
    let k = mat(&c.k, c.n_kv, c.d_k);
    let v = mat(&c.v, c.n_kv, c.d_v);
    let kt = k.transpose();
    let q_row0: Vec<T> = (0..c.d_k)
        .map(|p| if c.n_q > 0 { q[(0, p)] } else { T::zero() })
        .collect();
    let q_view: MatRef<'_, T> = if c.broadcast_q && c.n_q > 0 && c.d_k > 0 {
        DMatrixView::from_slice_with_strides_generic(
            &q_row0,
            Dyn(c.n_q),
            Dyn(c.d_k),
            Dyn(0),
            Dyn(1),
        )
    } else {
        q.as_view()
    };
    let k_view: MatRef<'_, T> = if c.strided_k && c.n_kv > 0 && c.d_k > 0 {
        DMatrixView::from_slice_with_strides_generic(
            kt.as_slice(),
            Dyn(c.n_kv),
            Dyn(c.d_k),
            Dyn(c.d_k),
            Dyn(1),
        )
    } else {
        k.as_view()
    };
    let bias = c.bias.as_ref().map(|b| {
        DMatrix::<T>::from_iterator(
            c.n_q,
            c.n_kv,
            b.iter()
                .map(|h| h.map_or(T::NEG_INFINITY, Hostile::value::<T>)),
        )
    });
    let mask = c
        .mask
        .as_ref()
        .map(|m| DMatrix::from_column_slice(c.n_q, c.n_kv, m));
    let mut o = AttentionOptions::<T>::new();
    if let Some(s) = c.scale {
        o = o.with_scale(s.value());
    }
    if let Some(causal) = c.causal {
        o = o.with_causal(causal);
    }
    if let Some((l, r)) = c.window {
        o = o.with_window(l, r);
    }
    if let Some(s) = c.softcap {
        o = o.with_softcap(s.value());
    }
    if let Some(a) = c.alibi {
        o = o.with_alibi_slope(a.value());
    }
    if let Some(b) = &bias {
        o = o.with_bias(b);
    }
    if let Some(m) = &mask {
        o = o.with_mask(m);
    }
    if let Some(km) = &c.key_mask {
        o = o.with_key_mask(km);
    }

    let outcomes: Vec<(String, Outcome<T>)> = runs(&o)
        .into_iter()
        .map(|(label, o)| {
            (
                label,
                scaled_dot_product_attention_with_lse(q_view, k_view, &v, &o),
            )
        })
        .collect();
    let first = outcomes[0].1.as_ref().err().cloned();
    let weights = attention_weights(q_view, k_view, &v, &o);
    assert_eq!(weights.as_ref().err(), first.as_ref(), "weights vs default");
    for (label, r) in &outcomes {
        assert_eq!(r.as_ref().err(), first.as_ref(), "{label} vs default");
    }
    if let Some(err) = first {
        assert!(
            matches!(
                err,
                AttentionError::ScoreOverflow { .. } | AttentionError::ZeroHeadDim
            ),
            "unexpected error {err}"
        );
        return;
    }

    // The reference, on the same (rounded) numbers, in f64.
    let wide = |m: &DMatrix<T>| widen(m);
    let r_opts = attention_reference::Options {
        scale: c.scale.map(|s| s.value::<T>().to_f64()),
        causal: c.causal.map(|cz| match cz {
            attention_core::Causal::TopLeft => attention_reference::Causal::TopLeft,
            attention_core::Causal::BottomRight => attention_reference::Causal::BottomRight,
        }),
        mask: mask.clone(),
        key_mask: c.key_mask.clone(),
        bias: bias.as_ref().map(wide),
        window: c.window,
        softcap: c.softcap.map(|s| s.value::<T>().to_f64()),
        alibi_slope: c.alibi.map(|a| a.value::<T>().to_f64()),
        dropout: None,
    };
    let (qf, kf, vf) = (wide(&q), wide(&k), wide(&v));
    let want = attention_reference::attention(&qf, &kf, &vf, &r_opts);
    let eps = T::EPSILON.to_f64();
    let scale = r_opts.scale.unwrap_or(1.0 / (c.d_k as f64).sqrt());
    // B_i: the largest |bias| + |ALiBi term| + softcap of the row.
    let extra: Vec<f64> = (0..c.n_q)
        .map(|i| {
            let b = bias.as_ref().map_or(0.0, |b| {
                (0..c.n_kv)
                    .map(|j| b[(i, j)].to_f64())
                    .filter(|x| x.is_finite())
                    .fold(0.0f64, |a, x| a.max(x.abs()))
            });
            let a = r_opts
                .alibi_slope
                .map_or(0.0, |m| m.abs() * (c.n_q + c.n_kv) as f64);
            b + a + r_opts.softcap.unwrap_or(0.0)
        })
        .collect();
    let delta = score_error(&qf, &kf, scale, &extra, eps);
    let v_max = vf.amax();
    for (label, r) in outcomes {
        let (out, lse) = r.unwrap();
        for i in 0..c.n_q {
            let has_key = (0..c.n_kv).any(|j| allowed(c, i, j));
            let l = lse[i].to_f64();
            assert!(!l.is_nan(), "{label}: lse[{i}] is NaN");
            assert_eq!(
                l == f64::NEG_INFINITY,
                !has_key,
                "{label}: lse[{i}] = {l}, allowed keys: {has_key}"
            );
            for col in 0..c.d_v {
                let x = out[(i, col)].to_f64();
                assert!(
                    x.is_finite() && x.abs() <= v_max,
                    "{label}: out[{i}, {col}] = {x}"
                );
                if !has_key {
                    assert_eq!(x, 0.0, "{label}: fully masked row {i}");
                }
            }
        }
        if want.output.iter().all(|x| x.is_finite()) && delta.iter().all(|d| d.is_finite()) {
            assert_output_close(&widen(&out), &want.output, &vf, &delta, eps, &label);
        }
    }
    let w = weights.unwrap();
    for i in 0..c.n_q {
        let sum: f64 = w.row(i).iter().map(|x| x.to_f64()).sum();
        assert!(
            w.row(i)
                .iter()
                .all(|x| x.to_f64() >= 0.0 && x.to_f64() <= 1.0),
            "weights row {i}"
        );
        let has_key = (0..c.n_kv).any(|j| allowed(c, i, j));
        let tol = SECOND_ORDER * (2.0 * c.n_kv as f64 + 6.0) * eps;
        assert!(
            (sum - if has_key { 1.0 } else { 0.0 }).abs() <= tol,
            "weights row {i} sums to {sum}"
        );
    }
}

/// Cases per run: 256 in CI; `ATTENTION_HOSTILE_CASES=10000` for a long hunt.
fn hostile_config() -> ProptestConfig {
    let cases = std::env::var("ATTENTION_HOSTILE_CASES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(256);
    ProptestConfig::with_cases(cases)
}

proptest! {
    #![proptest_config(hostile_config())]
    #[test]
    fn hostile_f32(c in hostile_case()) { hostile_holds::<f32>(&c); }
    #[test]
    fn hostile_f64(c in hostile_case()) { hostile_holds::<f64>(&c); }
}
