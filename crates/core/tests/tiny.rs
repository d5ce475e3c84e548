//! The row path's entry for tiny calls (`kernel::tiny`: options that set only a scale, at
//! most 8 queries and 8 keys, columns contiguous) skips the general checks' set-up and
//! computes without a `Spec`. It must give what the general route gives: the same bits as
//! the row path it stands for, the same errors, every output entry written. The general
//! route is reached with the same problem and an all-true key mask, which changes no score
//! but is an option, so the call takes the row path through a `Spec`.

mod common;

use attention_core::{
    AttentionError, AttentionOptions, CpuPath, Element, KernelRun, Operand, last_kernel_run,
    scaled_dot_product_attention_into, scaled_dot_product_attention_with_lse, self_attention,
};
use common::{assert_same_bits, nan_matrix};
use nalgebra::{DMatrix, DMatrixView, Dyn};

/// A reproducible `rows × cols` matrix of magnitude about `magnitude` (xorshift).
fn matrix<T: Element>(rows: usize, cols: usize, magnitude: f64, seed: u64) -> DMatrix<T> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    DMatrix::from_fn(rows, cols, |_, _| {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        let u = (s >> 11) as f64 / (1u64 << 53) as f64;
        T::from_f64_rounded((2.0 * u - 1.0) * magnitude)
    })
}

/// Whether this process may take the tiny entry at all: a CPU path forced through the
/// environment sends every call to that path's kernels.
fn unforced() -> bool {
    std::env::var("ATTENTION_CPU_PATH").is_err()
}

/// Output and lse of one call written into outputs pre-filled with NaN, and the kernel
/// that ran.
#[allow(clippy::type_complexity)]
fn call<T: Element>(
    q: &DMatrix<T>,
    k: &DMatrix<T>,
    v: &DMatrix<T>,
    options: &AttentionOptions<'_, T>,
) -> Result<(DMatrix<T>, Vec<T>, Option<KernelRun>), AttentionError> {
    let mut out = nan_matrix::<T>(q.nrows(), v.ncols());
    scaled_dot_product_attention_into(q, k, v, options, &mut out)?;
    let run = last_kernel_run();
    let (out_lse, lse) = scaled_dot_product_attention_with_lse(q, k, v, options)?;
    assert_same_bits(out_lse.iter(), out.iter(), "with_lse and _into outputs");
    Ok((out, lse.iter().copied().collect(), run))
}

/// Every size up to one past the tiny limits, several magnitudes and scales: the tiny
/// entry and the row path through a `Spec` agree bit for bit, output and lse, and both
/// are the row path where the sizes are tiny.
fn same_bits_as_the_row_path<T: Element>() {
    let mut seed = 1u64;
    let mut tiny_calls = 0;
    for n_q in 1..=9 {
        for n_kv in 1..=9 {
            for (d_k, d_v) in [(0, 1), (1, 1), (2, 2), (3, 5), (8, 4), (17, 3), (64, 1)] {
                for (magnitude, scale) in [(1.0, None), (30.0, Some(0.05)), (1e-3, Some(-2.0))] {
                    seed += 1;
                    if d_k == 0 && scale.is_none() {
                        continue; // ZeroHeadDim: checked below
                    }
                    let q = matrix::<T>(n_q, d_k, magnitude, seed);
                    let k = matrix::<T>(n_kv, d_k, magnitude, seed + 1000);
                    let v = matrix::<T>(n_kv, d_v, 3.0, seed + 2000);
                    let mut plain = AttentionOptions::new();
                    if let Some(s) = scale {
                        plain = plain.with_scale(T::from_f64_rounded(s));
                    }
                    let all_true = vec![true; n_kv];
                    let masked = plain.clone().with_key_mask(&all_true);
                    let label = format!("n_q {n_q} n_kv {n_kv} d_k {d_k} d_v {d_v} x{magnitude}");
                    let (out, lse, run) = call(&q, &k, &v, &plain).unwrap();
                    let (want, want_lse, want_run) = call(&q, &k, &v, &masked).unwrap();
                    assert_same_bits(out.iter(), want.iter(), &label);
                    assert_same_bits(lse.iter(), want_lse.iter(), &label);
                    assert!(out.iter().all(|x| x.finite()), "{label}");
                    if unforced() && n_q <= 8 && n_kv <= 8 {
                        assert_eq!(run, Some(KernelRun::Row), "{label}");
                        assert_eq!(want_run, Some(KernelRun::Row), "{label}");
                        tiny_calls += 1;
                    }
                }
            }
        }
    }
    assert!(!unforced() || tiny_calls > 1000);
}

#[test]
fn f32_same_bits_as_the_row_path() {
    same_bits_as_the_row_path::<f32>();
}

#[test]
fn f64_same_bits_as_the_row_path() {
    same_bits_as_the_row_path::<f64>();
}

/// The seed's 2 × 2 through `self_attention` is such a call, and gives what the row path
/// gives.
#[test]
fn seed_call_is_tiny() {
    let q = DMatrix::<f64>::from_row_slice(2, 2, &[1.0, 0.0, 0.0, 1.0]);
    let v = DMatrix::from_row_slice(2, 2, &[1.0, 2.0, 3.0, 4.0]);
    let out = self_attention(&q, &q, &v).unwrap();
    if unforced() {
        assert_eq!(last_kernel_run(), Some(KernelRun::Row));
    }
    let all_true = [true, true];
    let want = attention_core::scaled_dot_product_attention(
        &q,
        &q,
        &v,
        &AttentionOptions::new().with_key_mask(&all_true),
    )
    .unwrap();
    assert_same_bits(out.iter(), want.iter(), "seed");
}

/// Bad inputs of tiny size get the errors the general route gives, in its order (Q, K, V,
/// then the scale), and write nothing.
#[test]
fn errors_are_the_general_routes() {
    let q = matrix::<f32>(2, 3, 1.0, 7);
    let k = matrix::<f32>(3, 3, 1.0, 8);
    let v = matrix::<f32>(3, 2, 1.0, 9);
    let all_true = [true; 3];
    let check = |q: &DMatrix<f32>, k: &DMatrix<f32>, v: &DMatrix<f32>, want: AttentionError| {
        let plain = AttentionOptions::new();
        let n_kv = k.nrows();
        let mask = vec![true; n_kv];
        let masked = AttentionOptions::new().with_key_mask(&mask);
        let mut out = nan_matrix::<f32>(q.nrows(), v.ncols());
        let got = scaled_dot_product_attention_into(q, k, v, &plain, &mut out).unwrap_err();
        assert_eq!(got, want);
        assert!(
            out.iter().all(|x| x.is_nan()),
            "nothing written on {want:?}"
        );
        if k.nrows() == v.nrows() {
            let general = scaled_dot_product_attention_into(q, k, v, &masked, &mut out);
            assert_eq!(general.unwrap_err(), want);
        }
    };
    // NaN and ∞ in each operand; the first in column-major order is named, and an error
    // in Q comes before one in K, K before V.
    let (mut qb, mut kb, mut vb) = (q.clone(), k.clone(), v.clone());
    qb[(1, 2)] = f32::NAN;
    let q_err = AttentionError::NonFinite {
        operand: Operand::Query,
        row: 1,
        column: 2,
        value: f64::NAN,
    };
    let got = scaled_dot_product_attention_into(
        &qb,
        &k,
        &v,
        &AttentionOptions::new(),
        &mut nan_matrix::<f32>(2, 2),
    )
    .unwrap_err();
    assert!(
        matches!(got, AttentionError::NonFinite { operand: Operand::Query, row: 1, column: 2, value } if value.is_nan()),
        "{got:?} against {q_err:?}"
    );
    kb[(2, 0)] = f32::INFINITY;
    kb[(0, 1)] = f32::NEG_INFINITY;
    vb[(1, 1)] = f32::INFINITY;
    check(
        &q,
        &kb,
        &vb,
        AttentionError::NonFinite {
            operand: Operand::Key,
            row: 2,
            column: 0,
            value: f64::INFINITY,
        },
    );
    check(
        &q,
        &k,
        &vb,
        AttentionError::NonFinite {
            operand: Operand::Value,
            row: 1,
            column: 1,
            value: f64::INFINITY,
        },
    );
    // Shapes: K's width, V's rows.
    let k_narrow = matrix::<f32>(3, 2, 1.0, 10);
    let got = scaled_dot_product_attention_into(
        &q,
        &k_narrow,
        &v,
        &AttentionOptions::new(),
        &mut nan_matrix::<f32>(2, 2),
    )
    .unwrap_err();
    let want = scaled_dot_product_attention_into(
        &q,
        &k_narrow,
        &v,
        &AttentionOptions::new().with_key_mask(&all_true),
        &mut nan_matrix::<f32>(2, 2),
    )
    .unwrap_err();
    assert_eq!(got, want);
    assert!(
        matches!(got, AttentionError::DimensionMismatch { .. }),
        "{got:?}"
    );
    let v_short = matrix::<f32>(2, 2, 1.0, 11);
    let got = scaled_dot_product_attention_into(
        &q,
        &k,
        &v_short,
        &AttentionOptions::new(),
        &mut nan_matrix::<f32>(2, 2),
    )
    .unwrap_err();
    assert!(
        matches!(got, AttentionError::DimensionMismatch { .. }),
        "{got:?}"
    );
    // d_k = 0 without a scale; a non-finite scale.
    let q0 = DMatrix::<f32>::zeros(2, 0);
    let k0 = DMatrix::<f32>::zeros(3, 0);
    check(&q0, &k0, &v, AttentionError::ZeroHeadDim);
    let got = scaled_dot_product_attention_into(
        &q,
        &k,
        &v,
        &AttentionOptions::new().with_scale(f32::NAN),
        &mut nan_matrix::<f32>(2, 2),
    )
    .unwrap_err();
    assert!(
        matches!(got, AttentionError::InvalidScale { .. }),
        "{got:?}"
    );
}

/// Calls the tiny entry hands back to the general route: values near the type's maximum
/// (scaled sums), scores that may overflow (the careful path), a forced CPU path,
/// strided views. Each gets the general route's result.
#[test]
fn handed_back_calls_take_the_general_route() {
    let big = matrix::<f32>(3, 2, 1.0, 12).map(|x| x * 1e38);
    let q = matrix::<f32>(2, 2, 1.0, 13);
    let all_true = [true; 3];
    let masked = AttentionOptions::new().with_key_mask(&all_true);
    // Values within a factor 2(n_kv + 1) of MAX: the row path with value scaling. (With
    // at most 8 keys every sum is taken in f64, so scaling changes no bit here; this checks
    // the result, not that the call was handed back.)
    let (out, _, run_plain) = call(
        &q,
        &q.clone().insert_row(2, 0.5),
        &big,
        &AttentionOptions::new(),
    )
    .unwrap();
    let (want, _, _) = call(&q, &q.clone().insert_row(2, 0.5), &big, &masked).unwrap();
    assert_same_bits(out.iter(), want.iter(), "values near MAX");
    if unforced() {
        assert_eq!(run_plain, Some(KernelRun::Row));
    }
    // Scores not provably in range (the bound γ·d_k·max|q|·max|k| is above MAX/4, the
    // scores themselves are finite): the careful path.
    let huge = matrix::<f32>(3, 2, 1e19, 14);
    let v = matrix::<f32>(3, 2, 1.0, 15);
    let (out, _, run_huge) = call(
        &huge.rows(0, 2).into_owned(),
        &huge,
        &v,
        &AttentionOptions::new(),
    )
    .unwrap();
    assert_eq!(run_huge, Some(KernelRun::Careful));
    assert!(out.iter().all(|x| x.finite()));
    // A forced path runs that path's kernels even for a tiny call.
    for path in CpuPath::supported() {
        let (out, _, run) = call(&q, &q, &q, &AttentionOptions::new().with_cpu_path(path)).unwrap();
        assert_ne!(run, Some(KernelRun::Row), "{path:?}");
        assert!(out.iter().all(|x| x.finite()));
    }
    // Q stored by rows (a view of row stride 2): the general route, the same bits as the
    // same Q stored by columns.
    let q = matrix::<f64>(2, 2, 1.0, 16);
    let k = matrix::<f64>(3, 2, 1.0, 17);
    let v = matrix::<f64>(3, 2, 1.0, 18);
    let by_rows = q.transpose();
    let view = DMatrixView::from_slice_with_strides_generic(
        by_rows.as_slice(),
        Dyn(2),
        Dyn(2),
        Dyn(2),
        Dyn(1),
    );
    assert_eq!(view, q);
    let strided =
        attention_core::scaled_dot_product_attention(view, &k, &v, &AttentionOptions::new())
            .unwrap();
    let contiguous = self_attention(&q, &k, &v).unwrap();
    assert_same_bits(strided.iter(), contiguous.iter(), "strided Q");
}

/// Up to 8 queries against up to 8 keys take the row path whatever their width (the
/// decoding kernel keeps 16 partial sums per query and value column whatever the number
/// of keys); 9 keys or more, with as much work, the decoding kernel. Either way within
/// the reference's bound, every entry written.
fn few_queries_few_keys<T: Element>() {
    let cases = [
        // (n_q, n_kv, d): n_q·n_kv·2d above the tiny work limit of 8192.
        (8, 8, 128, true),
        (5, 8, 128, true),
        (8, 5, 160, true),
        (3, 7, 200, true),
        (8, 9, 128, false),
        (4, 16, 128, false),
    ];
    for (n_q, n_kv, d, row) in cases {
        let (q, k, v) = (
            matrix::<T>(n_q, d, 1.0, 7 + n_q as u64),
            matrix::<T>(n_kv, d, 1.0, 11 + n_kv as u64),
            matrix::<T>(n_kv, d, 1.0, 13 + d as u64),
        );
        let wide = |m: &DMatrix<T>| m.map(|x| x.to_f64());
        let (q64, k64, v64) = (wide(&q), wide(&k), wide(&v));
        let want = attention_reference::attention(&q64, &k64, &v64, &Default::default());
        let eps = T::EPSILON.to_f64();
        let delta = common::score_error(&q64, &k64, 1.0 / (d as f64).sqrt(), &[], eps);
        let want_run = if row {
            KernelRun::Row
        } else {
            KernelRun::Decode(CpuPath::detect())
        };
        // Plain (the tiny entry, where it fits) and through a `Spec` (an all-true key
        // mask changes no score but is an option: the general route).
        let all_true = vec![true; n_kv];
        let options = [
            AttentionOptions::new(),
            AttentionOptions::new().with_key_mask(&all_true),
        ];
        let mut outs = Vec::new();
        for (o, options) in options.iter().enumerate() {
            let (out, lse, run) = call(&q, &k, &v, options).expect("a finite call");
            let label = format!("{n_q} × {n_kv} keys, d {d}, options {o}");
            assert_eq!(run, Some(want_run), "{label}");
            common::assert_output_close(&wide(&out), &want.output, &v64, &delta, eps, &label);
            outs.push((out, lse));
        }
        // The same code either way (the tiny entry stands for the row path).
        let label = format!("{n_q} × {n_kv} keys, d {d}: plain against masked");
        assert_same_bits(outs[0].0.iter(), outs[1].0.iter(), &label);
        assert_same_bits(outs[0].1.iter(), outs[1].1.iter(), &label);
    }
}

#[test]
fn few_queries_against_few_keys_take_the_row_path() {
    if unforced() {
        few_queries_few_keys::<f32>();
        few_queries_few_keys::<f64>();
    }
}
