//! Property tests of plain attention (no options): agreement with the reference oracle and
//! the invariants of softmax attention, for f32 and f64, through every CPU path this
//! machine has. Bounds: see `common/mod.rs`.

// These tests pass views by reference (`&m.columns(..)`), the form that worked before
// views could be passed by value; clippy would have them by value, but the old form must
// keep compiling.
#![allow(clippy::needless_borrows_for_generic_args)]

mod common;

use attention_core::{
    AttentionOptions, CpuPath, Element, Parallelism, attention_weights,
    scaled_dot_product_attention, scaled_dot_product_attention_with_lse,
};
use common::*;
use nalgebra::DMatrix;
use proptest::prelude::*;
use rand::seq::SliceRandom;

fn config() -> ProptestConfig {
    ProptestConfig::with_cases(96)
}

/// Options forcing `path`, single-threaded or not.
fn on<T: Element>(path: CpuPath, parallelism: Parallelism) -> AttentionOptions<'static, T> {
    AttentionOptions::new()
        .with_cpu_path(path)
        .with_parallelism(parallelism)
}

fn scale_of(d_k: usize) -> f64 {
    1.0 / (d_k as f64).sqrt()
}

/// Core on every CPU path (and threaded or not) agrees with the reference: output and lse.
/// So any two paths agree within twice the bound (each is within the bound of the
/// reference).
fn agrees_with_reference<T: Element>(p: &Problem) {
    let p = p.rounded::<T>();
    let (q, k, v) = p.cast::<T>();
    let eps = T::EPSILON.to_f64();
    let want = attention_reference::attention(&p.q, &p.k, &p.v, &Default::default());
    let delta = score_error(&p.q, &p.k, scale_of(p.q.ncols()), &[], eps);
    for path in CpuPath::supported() {
        for par in [Parallelism::Sequential, Parallelism::Rayon] {
            let (out, lse) =
                scaled_dot_product_attention_with_lse(&q, &k, &v, &on(path, par)).unwrap();
            let label = format!("{path:?}/{par:?}");
            assert_output_close(&widen(&out), &want.output, &p.v, &delta, eps, &label);
            let lse: Vec<f64> = lse.iter().map(|x| x.to_f64()).collect();
            assert_lse_close(&lse, &want.lse, &delta, p.k.nrows(), eps, &label);
        }
    }
}

/// Threads never change a bit: sequential and threaded calls (pools of 1, 2 and 7
/// threads) give the same output and lse on every CPU path. The problems are large enough
/// for the kernel to run threads (see `common::assert_thread_count_irrelevant`).
fn thread_count_is_bitwise_irrelevant<T: Element>(p: &Problem) {
    let (q, k, v) = p.cast::<T>();
    let label = std::any::type_name::<T>();
    assert_thread_count_irrelevant(&q, &k, &v, &AttentionOptions::new(), label);
}

/// Problems the kernel splits over threads: n_q, n_kv in 260..=520, d_k, d_v in 32..=64,
/// so `n_q·n_kv·(d_k + d_v)` ≥ 260²·64 > `PARALLEL_MIN_WORK` (4·2^20); n_kv crosses 512,
/// a packing-chunk edge.
fn threaded_problem() -> impl Strategy<Value = Problem> {
    (
        260..=520usize,
        260..=520usize,
        32..=64usize,
        32..=64usize,
        magnitude(),
        magnitude(),
        magnitude(),
    )
        .prop_flat_map(|(n_q, n_kv, d_k, d_v, sq, sk, sv)| {
            problem_of((n_q, n_kv, d_k, d_v), (sq, sk, sv))
        })
}

/// Rows of the weights sum to 1 (each weight ≥ 0).
fn weights_sum_to_one<T: Element>(p: &Problem) {
    let (q, k, v) = p.cast::<T>();
    let w = attention_weights(&q, &k, &v, &AttentionOptions::new()).unwrap();
    let eps = T::EPSILON.to_f64();
    let n_kv = k.nrows();
    for i in 0..w.nrows() {
        // Σ of n_kv rounded weights, each with relative error ≤ (n_kv + 3)u.
        let sum: f64 = w.row(i).iter().map(|x| x.to_f64()).sum();
        assert!(w.row(i).iter().all(|&x| x >= T::zero()));
        let tol = SECOND_ORDER * (2.0 * n_kv as f64 + 6.0) * eps;
        // No keys: the row attends to nothing and its weights are all 0.
        let want = if n_kv == 0 { 0.0 } else { 1.0 };
        assert!((sum - want).abs() <= tol, "row {i} sums to {sum}");
    }
}

/// Each output entry lies in its V column's [min, max] (up to the rounding of Σ p_j v_j).
fn output_within_value_range<T: Element>(p: &Problem) {
    let (q, k, v) = p.cast::<T>();
    let out = scaled_dot_product_attention(&q, &k, &v, &AttentionOptions::new()).unwrap();
    let eps = T::EPSILON.to_f64();
    let n_kv = k.nrows();
    for c in 0..v.ncols() {
        if n_kv == 0 {
            assert!(out.column(c).iter().all(|&x| x == T::zero()));
            continue;
        }
        let (lo, hi) = (v.column(c).min().to_f64(), v.column(c).max().to_f64());
        let slack = SECOND_ORDER * (n_kv as f64 + 6.0) * eps * v.column(c).amax().to_f64();
        for i in 0..out.nrows() {
            let o = out[(i, c)].to_f64();
            assert!(
                o >= lo - slack && o <= hi + slack,
                "out[{i},{c}] = {o} outside [{lo}, {hi}]"
            );
        }
    }
}

/// Permuting K and V rows together leaves the output unchanged (up to summation order).
fn key_permutation_invariant<T: Element>(p: &Problem, seed: u64) {
    let p = p.rounded::<T>();
    let n_kv = p.k.nrows();
    let mut perm: Vec<usize> = (0..n_kv).collect();
    // A deterministic shuffle from proptest's seed.
    perm.shuffle(&mut attention_testdata::seeded_rng(seed));
    let kp = DMatrix::from_fn(n_kv, p.k.ncols(), |j, c| p.k[(perm[j], c)]);
    let vp = DMatrix::from_fn(n_kv, p.v.ncols(), |j, c| p.v[(perm[j], c)]);
    let (q, k, v) = p.cast::<T>();
    let a = scaled_dot_product_attention(&q, &k, &v, &AttentionOptions::new()).unwrap();
    let b = scaled_dot_product_attention(
        &q,
        &narrow::<T>(&kp),
        &narrow::<T>(&vp),
        &AttentionOptions::new(),
    )
    .unwrap();
    let eps = T::EPSILON.to_f64();
    let delta = score_error(&p.q, &p.k, scale_of(p.q.ncols()), &[], eps);
    // Both are within the bound of the exact result, so within twice the bound of each other.
    let twice: Vec<f64> = delta.iter().map(|d| 2.0 * d).collect();
    assert_output_close(
        &widen(&a),
        &widen(&b),
        &p.v,
        &twice,
        2.0 * eps,
        "permuted keys",
    );
}

/// Permuting Q rows permutes the output rows, bit for bit: each query is computed alone.
fn query_permutation_equivariant<T: Element>(p: &Problem) {
    let (q, k, v) = p.cast::<T>();
    let n_q = q.nrows();
    let rev = DMatrix::from_fn(n_q, q.ncols(), |i, c| q[(n_q - 1 - i, c)]);
    let a = scaled_dot_product_attention(&q, &k, &v, &AttentionOptions::new()).unwrap();
    let b = scaled_dot_product_attention(&rev, &k, &v, &AttentionOptions::new()).unwrap();
    for i in 0..n_q {
        assert_eq!(a.row(i), b.row(n_q - 1 - i), "row {i}");
    }
}

/// Adding the same vector c to every key changes each row's scores by the constant q·c,
/// which softmax ignores.
fn key_shift_invariant<T: Element>(p: &Problem, shift: &DMatrix<f64>) {
    let p = p.rounded::<T>();
    let shifted = Problem {
        q: p.q.clone(),
        k: DMatrix::from_fn(p.k.nrows(), p.k.ncols(), |j, c| p.k[(j, c)] + shift[(0, c)]),
        v: p.v.clone(),
    }
    .rounded::<T>();
    let (q, k, v) = p.cast::<T>();
    let (_, ks, _) = shifted.cast::<T>();
    let a = scaled_dot_product_attention(&q, &k, &v, &AttentionOptions::new()).unwrap();
    let b = scaled_dot_product_attention(&q, &ks, &v, &AttentionOptions::new()).unwrap();
    let eps = T::EPSILON.to_f64();
    let s = scale_of(p.q.ncols());
    // The shifted keys round once more (≤ u relative) and have larger magnitudes.
    let da = score_error(&p.q, &p.k, s, &[], eps);
    let db = score_error(&shifted.q, &shifted.k, s, &[], eps);
    let both: Vec<f64> = da.iter().zip(&db).map(|(a, b)| a + 2.0 * b).collect();
    assert_output_close(
        &widen(&a),
        &widen(&b),
        &p.v,
        &both,
        2.0 * eps,
        "shifted keys",
    );
}

/// attention(Q, K, a·V1 + b·V2) = a·attention(Q, K, V1) + b·attention(Q, K, V2).
fn linear_in_values<T: Element>(p: &Problem, v2: &DMatrix<f64>, a: f64, b: f64) {
    let p = p.rounded::<T>();
    let v2 = widen(&narrow::<T>(v2));
    let mix = widen(&narrow::<T>(&(&p.v * a + &v2 * b)));
    let (q, k, v1) = p.cast::<T>();
    let opts = AttentionOptions::new();
    let o1 = widen(&scaled_dot_product_attention(&q, &k, &v1, &opts).unwrap());
    let o2 = widen(&scaled_dot_product_attention(&q, &k, &narrow::<T>(&v2), &opts).unwrap());
    let om = widen(&scaled_dot_product_attention(&q, &k, &narrow::<T>(&mix), &opts).unwrap());
    let eps = T::EPSILON.to_f64();
    let delta = score_error(&p.q, &p.k, scale_of(p.q.ncols()), &[], eps);
    // Each of the three outputs is within the bound of its exact value; the exact values are
    // linear; the bound scales with max|v| of each operand.
    let combined = &o1 * a + &o2 * b;
    let n_kv = p.k.nrows() as f64;
    for c in 0..om.ncols() {
        let scale_c =
            p.v.column(c).amax() * a.abs() + v2.column(c).amax() * b.abs() + mix.column(c).amax();
        for i in 0..om.nrows() {
            let tol = SECOND_ORDER * (2.0 * delta[i] + (n_kv + 8.0) * eps) * scale_c;
            let err = (om[(i, c)] - combined[(i, c)]).abs();
            assert!(err <= tol, "linearity [{i},{c}]: {err:e} > {tol:e}");
        }
    }
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn f32_agrees_with_reference(p in problem(70, 70)) { agrees_with_reference::<f32>(&p); }
    #[test]
    fn f64_agrees_with_reference(p in problem(70, 70)) { agrees_with_reference::<f64>(&p); }

    #[test]
    fn f32_weights_sum_to_one(p in problem(70, 70)) { weights_sum_to_one::<f32>(&p); }
    #[test]
    fn f64_weights_sum_to_one(p in problem(70, 70)) { weights_sum_to_one::<f64>(&p); }

    #[test]
    fn f32_output_within_value_range(p in problem(70, 70)) { output_within_value_range::<f32>(&p); }
    #[test]
    fn f64_output_within_value_range(p in problem(70, 70)) { output_within_value_range::<f64>(&p); }

    #[test]
    fn f32_key_permutation(p in problem(70, 70), seed in any::<u64>()) { key_permutation_invariant::<f32>(&p, seed); }
    #[test]
    fn f64_key_permutation(p in problem(70, 70), seed in any::<u64>()) { key_permutation_invariant::<f64>(&p, seed); }

    #[test]
    fn f32_query_permutation(p in problem(70, 70)) { query_permutation_equivariant::<f32>(&p); }
    #[test]
    fn f64_query_permutation(p in problem(70, 70)) { query_permutation_equivariant::<f64>(&p); }

    #[test]
    fn f32_key_shift((p, c) in problem(70, 70).prop_flat_map(|p| { let d = p.q.ncols(); (Just(p), normal_matrix(1, d, 3.0)) })) {
        key_shift_invariant::<f32>(&p, &c);
    }
    #[test]
    fn f64_key_shift((p, c) in problem(70, 70).prop_flat_map(|p| { let d = p.q.ncols(); (Just(p), normal_matrix(1, d, 3.0)) })) {
        key_shift_invariant::<f64>(&p, &c);
    }

    #[test]
    fn f32_linear_in_values((p, v2) in problem(70, 70).prop_flat_map(|p| { let s = p.v.shape(); (Just(p), normal_matrix(s.0, s.1, 1.0)) }), a in -3.0f64..3.0, b in -3.0f64..3.0) {
        linear_in_values::<f32>(&p, &v2, a, b);
    }
    #[test]
    fn f64_linear_in_values((p, v2) in problem(70, 70).prop_flat_map(|p| { let s = p.v.shape(); (Just(p), normal_matrix(s.0, s.1, 1.0)) }), a in -3.0f64..3.0, b in -3.0f64..3.0) {
        linear_in_values::<f64>(&p, &v2, a, b);
    }
}

/// A single key: the softmax weight is exactly exp(0)/1 = 1, so the output is V's row.
fn single_key_returns_value_row<T: Element>(p: &Problem) {
    let (q, k, v) = p.cast::<T>();
    for path in CpuPath::supported() {
        let out = scaled_dot_product_attention(
            &q,
            &k.rows(0, 1),
            &v.rows(0, 1),
            &on(path, Parallelism::Rayon),
        )
        .unwrap();
        for i in 0..q.nrows() {
            assert_eq!(out.row(i), v.row(0), "{path:?} row {i}");
        }
    }
}

/// Identical keys: every weight is 1/n_kv, so each output row is the mean of V's rows.
fn identical_keys_give_mean<T: Element>(p: &Problem) {
    let n_kv = p.k.nrows();
    let k_same = DMatrix::from_fn(n_kv, p.k.ncols(), |_, c| p.k[(0, c)]);
    let (q, _, v) = p.cast::<T>();
    let k = narrow::<T>(&k_same);
    let vw = widen(&v);
    let mean = vw.row_mean();
    let eps = T::EPSILON.to_f64();
    for path in CpuPath::supported() {
        let out = widen(
            &scaled_dot_product_attention(&q, &k, &v, &on(path, Parallelism::Rayon)).unwrap(),
        );
        for c in 0..v.ncols() {
            let tol = SECOND_ORDER * (n_kv as f64 + 6.0) * eps * vw.column(c).amax();
            for i in 0..out.nrows() {
                let err = (out[(i, c)] - mean[c]).abs();
                assert!(err <= tol, "{path:?} [{i},{c}] {err:e} > {tol:e}");
            }
        }
    }
}

/// Scores up to ~1e4 in magnitude (|q|,|k| large): finite, and within the bound.
fn large_scores_match<T: Element>(p: &Problem) {
    assert_plain_matches_reference::<T>(p, |path| on(path, Parallelism::Rayon));
}

/// Problems whose scores reach ~1e4: d_k in 1..=64, |q|,|k| ≈ 30·√(1e4/(30²·d_k)) scaled up.
fn large_problem() -> impl Strategy<Value = Problem> {
    (1..=70usize, 1..=70usize, 1..=64usize, 1..=16usize).prop_flat_map(|(n_q, n_kv, d_k, d_v)| {
        // |s| = |q·k|/√d_k ≈ σ_q σ_k for N(0,σ²) entries; σ_q = σ_k = 100 gives ~1e4.
        (
            normal_matrix(n_q, d_k, 100.0),
            normal_matrix(n_kv, d_k, 100.0),
            normal_matrix(n_kv, d_v, 1.0),
        )
            .prop_map(|(q, k, v)| Problem { q, k, v })
    })
}

proptest! {
    // Each case is 24 calls of up to 46M multiply-adds.
    #![proptest_config(ProptestConfig::with_cases(6))]

    #[test]
    fn f32_threads_bitwise(p in threaded_problem()) { thread_count_is_bitwise_irrelevant::<f32>(&p); }
    #[test]
    fn f64_threads_bitwise(p in threaded_problem()) { thread_count_is_bitwise_irrelevant::<f64>(&p); }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    #[test]
    fn f32_single_key(p in problem(70, 70).prop_filter("needs a key", |p| p.k.nrows() > 0)) { single_key_returns_value_row::<f32>(&p); }
    #[test]
    fn f64_single_key(p in problem(70, 70).prop_filter("needs a key", |p| p.k.nrows() > 0)) { single_key_returns_value_row::<f64>(&p); }

    #[test]
    fn f32_identical_keys(p in problem(70, 70).prop_filter("needs a key", |p| p.k.nrows() > 0)) { identical_keys_give_mean::<f32>(&p); }
    #[test]
    fn f64_identical_keys(p in problem(70, 70).prop_filter("needs a key", |p| p.k.nrows() > 0)) { identical_keys_give_mean::<f64>(&p); }

    #[test]
    fn f32_large_scores(p in large_problem()) { large_scores_match::<f32>(&p); }
    #[test]
    fn f64_large_scores(p in large_problem()) { large_scores_match::<f64>(&p); }
}
