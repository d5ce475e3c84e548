//! The backward pass (`scaled_dot_product_attention_backward`):
//!
//! - the 40 PyTorch autograd cases (`backward_cases.json`, f64): per sequence and query
//!   head through the single-head call on views of the packed matrices (dK/dV summed over
//!   each GQA group here), with PyTorch's output and lse, within 1e-11 of
//!   max(1, max|g|) over the case (the README's rule);
//! - random problems (every option, sizes across the 64-row blocks of both passes, f32 and
//!   f64, the forward from core itself) against the reference's gradients within a bound
//!   derived below from the arithmetic, and thread counts changing no bit;
//! - masked keys and fully masked rows get gradient exactly 0;
//! - every bad input, typed.

mod common;

use attention_core::{
    AttentionError, AttentionOptions, Axis, Causal, Element, Operand, Parallelism,
    scaled_dot_product_attention_backward as backward, scaled_dot_product_attention_with_lse,
};
use attention_testdata::{CausalAlign, backward_cases, gaussian};
use common::{OptionParts, narrow, pools, widen};
use nalgebra::DMatrix;
use proptest::prelude::*;

/// A golden case's options that every head and sequence shares: scale, causal, window,
/// softcap.
fn shared_options(f: &attention_testdata::MhaCase) -> AttentionOptions<'static, f64> {
    let mut o = AttentionOptions::new();
    if let Some(x) = f.scale {
        o = o.with_scale(x);
    }
    if let Some(a) = f.causal {
        o = o.with_causal(match a {
            CausalAlign::TopLeft => Causal::TopLeft,
            CausalAlign::BottomRight => Causal::BottomRight,
        });
    }
    if let Some((l, r)) = f.window {
        o = o.with_window(l, r);
    }
    if let Some(cap) = f.softcap {
        o = o.with_softcap(cap);
    }
    o
}

#[test]
fn golden_cases_match_pytorch_autograd() {
    let cases = backward_cases();
    assert_eq!(cases.len(), 40);
    let mut worst = 0.0f64;
    for c in &cases {
        let f = &c.forward;
        let g = f.h_q / f.h_kv;
        let (mut dq, mut dk, mut dv) = (
            DMatrix::zeros(f.q.nrows(), f.q.ncols()),
            DMatrix::zeros(f.k.nrows(), f.k.ncols()),
            DMatrix::zeros(f.v.nrows(), f.v.ncols()),
        );
        let (mut r0, mut k0) = (0, 0);
        for (s, (&n_q, &n_kv)) in f.seqlens_q.iter().zip(&f.seqlens_kv).enumerate() {
            for h in 0..f.h_q {
                let j = h / g;
                let mut o = shared_options(f);
                if let Some(slopes) = &f.alibi_slopes {
                    o = o.with_alibi_slope(slopes[h]);
                }
                if let Some(km) = &f.key_mask {
                    o = o.with_key_mask(&km[k0..k0 + n_kv]);
                }
                if let Some(m) = &c.mask {
                    o = o.with_mask(m);
                }
                if let Some(b) = &c.bias {
                    o = o.with_bias(b);
                }
                let lse: Vec<f64> = (0..n_q).map(|i| f.lse[(r0 + i, h)]).collect();
                let got = backward(
                    f.q.view((r0, h * f.d_k), (n_q, f.d_k)),
                    f.k.view((k0, j * f.d_k), (n_kv, f.d_k)),
                    f.v.view((k0, j * f.d_v), (n_kv, f.d_v)),
                    f.output.view((r0, h * f.d_v), (n_q, f.d_v)),
                    &lse,
                    c.d_out.view((r0, h * f.d_v), (n_q, f.d_v)),
                    &o,
                )
                .unwrap_or_else(|e| panic!("{} s{s} h{h}: {e}", f.name));
                dq.view_mut((r0, h * f.d_k), (n_q, f.d_k))
                    .copy_from(&got.dq);
                let mut dk_j = dk.view_mut((k0, j * f.d_k), (n_kv, f.d_k));
                dk_j += &got.dk;
                let mut dv_j = dv.view_mut((k0, j * f.d_v), (n_kv, f.d_v));
                dv_j += &got.dv;
            }
            r0 += n_q;
            k0 += n_kv;
        }
        let magnitude = [&c.dq, &c.dk, &c.dv]
            .iter()
            .fold(1.0f64, |m, x| m.max(x.amax()));
        for (name, got, want) in [("dq", &dq, &c.dq), ("dk", &dk, &c.dk), ("dv", &dv, &c.dv)] {
            let err = (got - want).amax() / magnitude;
            assert!(
                err <= 1e-11,
                "{}: {name} off by {err:e} of max(1, max|g|)",
                f.name
            );
            worst = worst.max(err);
        }
    }
    println!("worst: {worst:e} of max(1, max|g|)");
}

/// A random problem with every option drawn, in f64 (rounded to `T` by the checks).
#[derive(Clone, Debug)]
struct Case {
    q: DMatrix<f64>,
    k: DMatrix<f64>,
    v: DMatrix<f64>,
    d_out: DMatrix<f64>,
    scale: Option<f64>,
    causal: Option<Causal>,
    mask: Option<DMatrix<bool>>,
    key_mask: Option<Vec<bool>>,
    bias: Option<DMatrix<f64>>,
    window: Option<(usize, usize)>,
    softcap: Option<f64>,
    alibi: Option<f64>,
    /// Dropout `(p, seed)`.
    dropout: Option<(f64, u64)>,
}

fn case(max_n: usize) -> impl Strategy<Value = Case> {
    (1..=max_n, 1..=max_n, 1..=20usize, 1..=20usize, any::<u64>())
        .prop_flat_map(|(n_q, n_kv, d_k, d_v, seed)| {
            (
                Just((n_q, n_kv, d_k, d_v, seed)),
                prop::option::of(prop::sample::select(vec![-0.7, 0.05, 0.4, 1.3])),
                prop::option::of(prop::sample::select(vec![
                    Causal::TopLeft,
                    Causal::BottomRight,
                ])),
                any::<bool>(),
                any::<bool>(),
                any::<bool>(),
                prop::option::of((0..8usize, 0..8usize)),
                prop::option::of(prop::sample::select(vec![0.5, 2.0, 20.0])),
                prop::option::of(prop::sample::select(vec![-0.3, 0.02, 0.25])),
                prop::option::of((prop::sample::select(vec![0.1, 0.5]), any::<u64>())),
            )
        })
        .prop_map(
            |(
                (n_q, n_kv, d_k, d_v, seed),
                scale,
                causal,
                mask,
                key_mask,
                bias,
                window,
                softcap,
                alibi,
                dropout,
            )| {
                let g = |r, c, s| gaussian(r, c, 1.0, seed.wrapping_add(s));
                let coin = |r: usize, c: usize, s: u64, p: f64| g(r, c, s).map(|x| x > p);
                Case {
                    q: g(n_q, d_k, 1),
                    k: g(n_kv, d_k, 2),
                    v: g(n_kv, d_v, 3),
                    d_out: g(n_q, d_v, 4),
                    scale,
                    causal,
                    mask: mask.then(|| coin(n_q, n_kv, 5, -1.0)),
                    key_mask: key_mask.then(|| coin(1, n_kv, 6, -1.2).iter().copied().collect()),
                    bias: bias.then(|| {
                        // Some −∞ entries: they mask like a false in `mask`.
                        g(n_q, n_kv, 7).map(|x| if x > 1.8 { f64::NEG_INFINITY } else { x })
                    }),
                    window,
                    softcap,
                    alibi,
                    dropout,
                }
            },
        )
}

/// Core's gradients against the reference's, entry by entry.
///
/// The bound: every quantity is a sum of terms, computed with relative error at most ρ
/// per term, where ρ collects what the forward and the backward round —
/// the recomputed scores `(d_k + 2)·u·|scale|·Σ_c|q_ic|·max|k|` (and the forward's, the
/// same again), lse `u·(1 + |lse_i|)`, the sums inside a 64 × 64 tile in T (at most
/// 64 terms, or d_v ≤ 20 for `dO·vᵀ`: `(n_kv + 64)·u`), those across tiles in f64
/// (`(n + d)·u₆₄`), softcap/ALiBi/bias additions `4u·|z|` — so each gradient entry is within `ρ·Σ|terms|` of the exact one,
/// where `Σ|terms|` is the formula with absolute values (`A` below, computed from the
/// reference's weights). The D_i term uses `Σ_c |dO_ic|·max_j|v_jc|`, which bounds both
/// `|D_i|` and the forward output's own error relative to max|v|. Factor 4 for second
/// order terms and the reference's own error (1e-15).
fn check<T: Element>(c: &Case) -> Result<(), TestCaseError> {
    let (q, k, v, d_out) = (
        narrow::<T>(&c.q),
        narrow::<T>(&c.k),
        narrow::<T>(&c.v),
        narrow::<T>(&c.d_out),
    );
    let bias = c.bias.as_ref().map(narrow::<T>);
    let parts = OptionParts {
        scale: c.scale.map(T::from_f64_rounded),
        causal: c.causal,
        mask: c.mask.as_ref(),
        key_mask: c.key_mask.as_deref(),
        bias: bias.as_ref(),
        window: c.window,
        softcap: c.softcap.map(T::from_f64_rounded),
        alibi: c.alibi.map(T::from_f64_rounded),
        dropout: c.dropout,
    };
    let options = parts.core();
    let (out, lse) = match scaled_dot_product_attention_with_lse(&q, &k, &v, &options) {
        Ok(r) => r,
        Err(e) => return Err(TestCaseError::reject(format!("forward: {e}"))),
    };
    let got = backward(&q, &k, &v, &out, lse.as_slice(), &d_out, &options)
        .map_err(|e| TestCaseError::fail(format!("backward: {e}")))?;
    let (qw, kw, vw, dw) = (widen(&q), widen(&k), widen(&v), widen(&d_out));
    let ro = parts.reference();
    let want = attention_reference::attention_backward(&qw, &kw, &vw, &dw, &ro);
    let p = attention_reference::attention(&qw, &kw, &vw, &ro).weights;
    // Dropout multiplies kept weights (hence every term below) by at most 1/(1 − p).
    let f_max = c.dropout.map_or(1.0, |(p, _)| 1.0 / (1.0 - p));
    let (n_q, d_k) = q.shape();
    let (n_kv, d_v) = v.shape();
    let scale = ro.scale.unwrap_or(1.0 / (d_k as f64).sqrt());
    let u = T::EPSILON.to_f64();
    let kmax = kw.amax();
    let vmax: Vec<f64> = (0..d_v).map(|c| vw.column(c).amax()).collect();
    let rho: Vec<f64> = (0..n_q)
        .map(|i| {
            let qsum: f64 = qw.row(i).iter().map(|x| x.abs()).sum();
            let lse_i = lse[i].to_f64();
            let lse_term = if lse_i.is_finite() {
                1.0 + lse_i.abs()
            } else {
                1.0
            };
            2.0 * (d_k as f64 + 2.0) * u * scale.abs() * qsum * kmax
                + u * lse_term
                + (n_kv + n_q + d_k + d_v) as f64 * 1.2e-16
                + 4.0
                    * u
                    * (1.0
                        + ro.softcap.unwrap_or(0.0)
                        + ro.alibi_slope
                            .map_or(0.0, |m| m.abs() * (n_q + n_kv) as f64)
                        + ro.bias.as_ref().map_or(0.0, |b| {
                            b.row(i)
                                .iter()
                                .filter(|x| x.is_finite())
                                .fold(0.0f64, |a, x| a.max(x.abs()))
                        }))
                + (n_kv as f64 + 64.0) * u
        })
        .collect();
    // |dT_ij| with absolute values: P_ij·(|dP_ij| + Σ_c |dO_ic|·max|v_c|) (softcap's factor ≤ 1).
    let abs_dt = DMatrix::from_fn(n_q, n_kv, |i, j| {
        let dp: f64 = (0..d_v).map(|c| (dw[(i, c)] * vw[(j, c)]).abs()).sum();
        let dd: f64 = (0..d_v).map(|c| dw[(i, c)].abs() * vmax[c]).sum();
        p[(i, j)] * (dp + dd) * f_max
    });
    // The kernels' exponential gives exactly 0 below its cutoff (`kernel/exp.rs`:
    // exp(x) for x < −59 in f32, −640 in f64), and the backward's weights are
    // `exp(scale·s − lse)`, so a pair whose weight is below e^cutoff (twice that, for the
    // rounding of the argument) may lose its terms entirely: relative error 1, not ρ.
    // (A key whose every weight is that small then gets dK = 0 where the exact value is
    // e.g. 4e−28: found by a random case, f32, causal with ALiBi.)
    let cutoff = if u > 1e-10 { -59.0f64 } else { -640.0 };
    let lost = |i: usize, j: usize| {
        if p[(i, j)] < 2.0 * cutoff.exp() {
            1.0
        } else {
            0.0
        }
    };
    let bound_dq = DMatrix::from_fn(n_q, d_k, |i, c| {
        scale.abs()
            * (0..n_kv)
                .map(|j| (4.0 * rho[i] + lost(i, j)) * abs_dt[(i, j)] * kw[(j, c)].abs())
                .sum::<f64>()
    });
    let bound_dk = DMatrix::from_fn(n_kv, d_k, |j, c| {
        scale.abs()
            * (0..n_q)
                .map(|i| (4.0 * rho[i] + lost(i, j)) * abs_dt[(i, j)] * qw[(i, c)].abs())
                .sum::<f64>()
    });
    let bound_dv = DMatrix::from_fn(n_kv, d_v, |j, c| {
        (0..n_q)
            .map(|i| (4.0 * rho[i] + lost(i, j)) * p[(i, j)] * f_max * dw[(i, c)].abs())
            .sum::<f64>()
    });
    for (name, got, want, bound) in [
        ("dq", widen(&got.dq), &want.dq, &bound_dq),
        ("dk", widen(&got.dk), &want.dk, &bound_dk),
        ("dv", widen(&got.dv), &want.dv, &bound_dv),
    ] {
        for ((g, w), b) in got.iter().zip(want.iter()).zip(bound.iter()) {
            // Rounding the result to T adds u·|g|; a tiny floor for exact zeros.
            let tol = b + u * w.abs() + 1e-300;
            prop_assert!(
                (g - w).abs() <= tol,
                "{}: {} vs reference {} (error {:e} > bound {:e})",
                name,
                g,
                w,
                (g - w).abs(),
                tol
            );
        }
    }
    // Thread counts change no bit.
    for (threads, pool) in pools() {
        let again = pool
            .install(|| {
                backward(
                    &q,
                    &k,
                    &v,
                    &out,
                    lse.as_slice(),
                    &d_out,
                    &options.clone().with_parallelism(Parallelism::Rayon),
                )
            })
            .map_err(|e| TestCaseError::fail(format!("{e}")))?;
        prop_assert!(again == got, "{} threads change the gradients", threads);
    }
    Ok(())
}

/// Sizes past the kernel's 8 key chunks (10 key blocks: chunks of one and two blocks,
/// dealt back and forth) and its 16-block rounds of query rows (1100 rows: two rounds), against the
/// reference, with and without per-score options and the causal band (whose tiles the
/// chunks skip unevenly).
#[test]
fn chunks_and_rounds_match_the_reference() {
    let (n_q, n_kv, d_k, d_v) = (1100, 600, 8, 5);
    let g = |r, c, s: u64| gaussian(r, c, 1.0, 40 + s);
    let plain = Case {
        q: g(n_q, d_k, 1),
        k: g(n_kv, d_k, 2),
        v: g(n_kv, d_v, 3),
        d_out: g(n_q, d_v, 4),
        scale: None,
        causal: None,
        mask: None,
        key_mask: None,
        bias: None,
        window: None,
        softcap: None,
        alibi: None,
        dropout: None,
    };
    let causal = Case {
        causal: Some(Causal::BottomRight),
        ..plain.clone()
    };
    let options = Case {
        softcap: Some(2.0),
        mask: Some(g(n_q, n_kv, 5).map(|x| x > -1.0)),
        causal: Some(Causal::TopLeft),
        ..plain.clone()
    };
    for case in [plain, causal, options] {
        check::<f64>(&case).unwrap();
        check::<f32>(&case).unwrap();
    }
}

/// A thread keeps the backward's layouts and f64 results between calls (reused in place):
/// a call after larger ones, whose stale entries are far larger (one of them fails on an
/// overflow after its layouts are built), gives the bits of the same call on a fresh
/// thread, and so does the larger call repeated.
#[test]
fn buffers_kept_between_calls_change_no_bit() {
    let run = |(n_q, n_kv, d): (usize, usize, usize), magnitude: f64, seed: u64| {
        let g = |r, c, s: u64| gaussian(r, c, magnitude, seed + s).map(|x| x as f32);
        let (q, k, v, d_out) = (
            g(n_q, d, 1),
            g(n_kv, d, 2),
            g(n_kv, d + 3, 3),
            g(n_q, d + 3, 4),
        );
        let o = AttentionOptions::new().with_causal(Causal::BottomRight);
        let (out, lse) = match scaled_dot_product_attention_with_lse(&q, &k, &v, &o) {
            Ok(r) => r,
            // Scores past f32: the backward with a made-up output and lse fails too.
            Err(_) => (g(n_q, d + 3, 5), g(n_q, 1, 6).column(0).into_owned()),
        };
        backward(&q, &k, &v, &out, lse.as_slice(), &d_out, &o).map(|g| [g.dq, g.dk, g.dv])
    };
    let small = ((70, 90, 10), 1.0, 10);
    let large = ((300, 260, 24), 30.0, 20);
    let fresh = |p: ((usize, usize, usize), f64, u64)| {
        std::thread::spawn(move || run(p.0, p.1, p.2).unwrap())
            .join()
            .unwrap()
    };
    let (want_small, want_large) = (fresh(small), fresh(large));
    std::thread::spawn(move || {
        assert!(run((200, 200, 24), 1e18, 30).is_err());
        let got = run(small.0, small.1, small.2).unwrap();
        for (g, w) in got.iter().zip(&want_small) {
            assert_eq!(
                common::bits(g.iter().copied()),
                common::bits(w.iter().copied())
            );
        }
        for _ in 0..2 {
            let got = run(large.0, large.1, large.2).unwrap();
            for (g, w) in got.iter().zip(&want_large) {
                assert_eq!(
                    common::bits(g.iter().copied()),
                    common::bits(w.iter().copied())
                );
            }
        }
    })
    .join()
    .unwrap();
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// Sizes across the 64-row blocks of both passes.
    #[test]
    fn gradients_match_the_reference(c in case(150)) {
        check::<f64>(&c)?;
        check::<f32>(&c)?;
    }
}

/// Key-masked keys get dK = dV = 0 and rows with no allowed key dQ = 0, exactly.
#[test]
fn masked_positions_get_exactly_zero() {
    let (n_q, n_kv, d) = (6, 9, 4);
    let q = gaussian(n_q, d, 1.0, 1);
    let k = gaussian(n_kv, d, 1.0, 2);
    let v = gaussian(n_kv, d, 1.0, 3);
    let d_out = gaussian(n_q, d, 1.0, 4);
    let key_mask = [true, false, true, true, false, true, true, true, false];
    // Bottom-right causal with a window of 0: row i sees key i + 3 only; rows 1 and 5
    // (keys 4 and 8) see only masked keys.
    let o = AttentionOptions::new()
        .with_key_mask(&key_mask)
        .with_causal(Causal::BottomRight)
        .with_window(0, 0);
    let (out, lse) = scaled_dot_product_attention_with_lse(&q, &k, &v, &o).unwrap();
    let g = backward(&q, &k, &v, &out, lse.as_slice(), &d_out, &o).unwrap();
    for j in [1, 4, 8] {
        assert!(
            g.dk.row(j)
                .iter()
                .chain(g.dv.row(j).iter())
                .all(|&x| x == 0.0),
            "key {j}"
        );
    }
    for i in [1, 5] {
        assert_eq!(lse[i], f64::NEG_INFINITY);
        assert!(g.dq.row(i).iter().all(|&x| x == 0.0), "row {i}");
    }
    // And the others are not all zero.
    assert!(g.dv.row(3).iter().any(|&x| x != 0.0));
}

#[test]
fn bad_inputs_are_typed_errors() {
    let (n_q, n_kv, d) = (3, 5, 2);
    let q = gaussian(n_q, d, 1.0, 1);
    let k = gaussian(n_kv, d, 1.0, 2);
    let v = gaussian(n_kv, d, 1.0, 3);
    let d_out = gaussian(n_q, d, 1.0, 4);
    let o = AttentionOptions::new();
    let (out, lse) = scaled_dot_product_attention_with_lse(&q, &k, &v, &o).unwrap();
    let lse = lse.as_slice().to_vec();
    let call =
        |out: &DMatrix<f64>, lse: &[f64], d_out: &DMatrix<f64>, o: &AttentionOptions<'_, f64>| {
            backward(&q, &k, &v, out, lse, d_out, o).unwrap_err()
        };
    // Shapes.
    assert_eq!(
        call(&out.rows(0, 2).into_owned(), &lse, &d_out, &o),
        AttentionError::DimensionMismatch {
            operand: Operand::Output,
            axis: Axis::Rows,
            found: 2,
            expected: 3,
            against: Operand::Query,
            rule: "one row per query"
        }
    );
    assert_eq!(
        call(&out, &lse, &d_out.columns(0, 1).into_owned(), &o),
        AttentionError::DimensionMismatch {
            operand: Operand::OutputGradient,
            axis: Axis::Columns,
            found: 1,
            expected: 2,
            against: Operand::Value,
            rule: "d_v must match"
        }
    );
    assert_eq!(
        call(&out, &lse[..2], &d_out, &o),
        AttentionError::DimensionMismatch {
            operand: Operand::Lse,
            axis: Axis::Entries,
            found: 2,
            expected: 3,
            against: Operand::Query,
            rule: "one log-sum-exp per query"
        }
    );
    // Values.
    let mut bad = d_out.clone();
    bad[(2, 1)] = f64::INFINITY;
    assert!(matches!(
        call(&out, &lse, &bad, &o),
        AttentionError::NonFinite {
            operand: Operand::OutputGradient,
            row: 2,
            column: 1,
            ..
        }
    ));
    let mut bad = out.clone();
    bad[(0, 0)] = f64::NAN;
    assert!(matches!(
        call(&bad, &lse, &d_out, &o),
        AttentionError::NonFinite {
            operand: Operand::Output,
            row: 0,
            column: 0,
            ..
        }
    ));
    for x in [f64::NAN, f64::INFINITY] {
        let mut l = lse.clone();
        l[1] = x;
        assert!(matches!(
            call(&out, &l, &d_out, &o),
            AttentionError::NonFinite {
                operand: Operand::Lse,
                row: 1,
                column: 0,
                ..
            }
        ));
    }
    // An lse that cannot come from these inputs: −∞ on a row with keys, or too small.
    let mut l = lse.clone();
    l[1] = f64::NEG_INFINITY;
    assert!(matches!(
        call(&out, &l, &d_out, &o),
        AttentionError::InvalidLse { row: 1, key: 0, .. }
    ));
    // Too small: with 5 keys the largest weight of a row is ≥ 1/5, so lowering lse by 2
    // makes it ≥ e²/5 > 1.
    let mut l = lse.clone();
    l[2] -= 2.0;
    assert!(matches!(
        call(&out, &l, &d_out, &o),
        AttentionError::InvalidLse { row: 2, .. }
    ));
    // The lse rounded the other way is accepted (within the forward's rounding).
    let mut l = lse.clone();
    l[2] -= 2.0 * f64::EPSILON * l[2].abs().max(1.0);
    assert!(backward(&q, &k, &v, &out, &l, &d_out, &o).is_ok());
    // The inputs' own errors, as the forward reports them.
    let mut q_bad = q.clone();
    q_bad[(1, 1)] = f64::NAN;
    assert!(matches!(
        backward(&q_bad, &k, &v, &out, &lse, &d_out, &o).unwrap_err(),
        AttentionError::NonFinite {
            operand: Operand::Query,
            ..
        }
    ));
    let huge = AttentionOptions::new().with_scale(1e306);
    let big_q = q.map(|x| x * 1e10);
    assert!(matches!(
        backward(&big_q, &k, &v, &out, &lse, &d_out, &huge).unwrap_err(),
        AttentionError::ScoreOverflow { .. }
    ));
}

// ------------------------------------------------------------------ multi-head, packed

/// The golden cases straight through `multi_head_attention_backward` (GQA sums inside),
/// with PyTorch's output and lse: within 1e-11 of max(1, max|g|).
#[test]
fn golden_cases_through_the_multi_head_call() {
    use attention_core::{HeadLayout, MatRef, multi_head_attention_backward};
    for c in &backward_cases() {
        let f = &c.forward;
        let layout = HeadLayout::new(f.h_q, f.h_kv).with_seqlens(&f.seqlens_q, &f.seqlens_kv);
        let masks: Vec<MatRef<'_, bool>> = c.mask.iter().map(Into::into).collect();
        let biases: Vec<MatRef<'_, f64>> = c.bias.iter().map(Into::into).collect();
        let mut o = shared_options(f);
        if let Some(slopes) = &f.alibi_slopes {
            o = o.with_alibi_slopes(slopes);
        }
        if let Some(km) = &f.key_mask {
            o = o.with_key_mask(km);
        }
        if !masks.is_empty() {
            o = o.with_sequence_masks(&masks);
        }
        if !biases.is_empty() {
            o = o.with_sequence_biases(&biases);
        }
        let g = multi_head_attention_backward(
            &f.q, &f.k, &f.v, &f.output, &f.lse, &c.d_out, &layout, &o,
        )
        .unwrap_or_else(|e| panic!("{}: {e}", f.name));
        let magnitude = [&c.dq, &c.dk, &c.dv]
            .iter()
            .fold(1.0f64, |m, x| m.max(x.amax()));
        for (name, got, want) in [
            ("dq", &g.dq, &c.dq),
            ("dk", &g.dk, &c.dk),
            ("dv", &g.dv, &c.dv),
        ] {
            let err = (got - want).amax() / magnitude;
            assert!(err <= 1e-11, "{}: {name} off by {err:e}", f.name);
        }
    }
}

/// `(h_kv, group, d_k, d_v, (n_q, n_kv) per sequence, causal, ALiBi, seed)`.
type Packed = (
    usize,
    usize,
    usize,
    usize,
    Vec<(usize, usize)>,
    Option<Causal>,
    bool,
    u64,
);

/// A random packed layout: sequences of 0–80 queries and keys, GQA groups of 1–3.
fn packed() -> impl Strategy<Value = Packed> {
    (
        1..=3usize,
        1..=3usize,
        1..=9usize,
        1..=9usize,
        prop::collection::vec((0..=80usize, 0..=80usize), 1..=3),
        prop::option::of(prop::sample::select(vec![
            Causal::TopLeft,
            Causal::BottomRight,
        ])),
        any::<bool>(),
        any::<u64>(),
    )
}

/// Multi-head gradients against the single-head call on each (sequence, head) block: dQ
/// bit for bit; dK and dV bit for bit without GQA, and with GQA within the rounding of the
/// single-head results being added (`g·u·Σ_h |dK_h|`: the multi-head call sums the heads
/// in f64 and rounds once); threads change no bit.
fn check_packed<T: Element>(
    (h_kv, group, d_k, d_v, seqs, causal, alibi, seed): &Packed,
) -> Result<(), TestCaseError> {
    use attention_core::{
        HeadLayout, multi_head_attention_backward, multi_head_attention_with_lse,
    };
    let (h_kv, g, d_k, d_v) = (*h_kv, *group, *d_k, *d_v);
    let h_q = h_kv * g;
    let lens_q: Vec<usize> = seqs.iter().map(|s| s.0).collect();
    let lens_kv: Vec<usize> = seqs.iter().map(|s| s.1).collect();
    let (rows_q, rows_kv) = (lens_q.iter().sum::<usize>(), lens_kv.iter().sum::<usize>());
    let m = |r, c, s: u64| narrow::<T>(&gaussian(r, c, 1.0, seed.wrapping_add(s)));
    let (q, k, v, d_out) = (
        m(rows_q, h_q * d_k, 1),
        m(rows_kv, h_kv * d_k, 2),
        m(rows_kv, h_kv * d_v, 3),
        m(rows_q, h_q * d_v, 4),
    );
    let slopes: Vec<T> = (0..h_q)
        .map(|h| T::from_f64_rounded(0.1 * (h + 1) as f64))
        .collect();
    let layout = HeadLayout::new(h_q, h_kv).with_seqlens(&lens_q, &lens_kv);
    let mut o = AttentionOptions::new();
    if let Some(c) = causal {
        o = o.with_causal(*c);
    }
    if *alibi {
        o = o.with_alibi_slopes(&slopes);
    }
    let (out, lse) = multi_head_attention_with_lse(&q, &k, &v, &layout, &o)
        .map_err(|e| TestCaseError::fail(format!("forward: {e}")))?;
    let got = multi_head_attention_backward(&q, &k, &v, &out, &lse, &d_out, &layout, &o)
        .map_err(|e| TestCaseError::fail(format!("backward: {e}")))?;
    let u = T::EPSILON.to_f64();
    let (mut r0, mut k0) = (0, 0);
    for (&n_q, &n_kv) in lens_q.iter().zip(&lens_kv) {
        for j in 0..h_kv {
            let mut sum_dk = DMatrix::<f64>::zeros(n_kv, d_k);
            let mut sum_dv = DMatrix::<f64>::zeros(n_kv, d_v);
            let mut abs_dk = sum_dk.clone();
            let mut abs_dv = sum_dv.clone();
            for h in j * g..(j + 1) * g {
                let mut single = AttentionOptions::new();
                if let Some(c) = causal {
                    single = single.with_causal(*c);
                }
                if *alibi {
                    single = single.with_alibi_slope(slopes[h]);
                }
                let lse_h: Vec<T> = (0..n_q).map(|i| lse[(r0 + i, h)]).collect();
                let s = backward(
                    q.view((r0, h * d_k), (n_q, d_k)),
                    k.view((k0, j * d_k), (n_kv, d_k)),
                    v.view((k0, j * d_v), (n_kv, d_v)),
                    out.view((r0, h * d_v), (n_q, d_v)),
                    &lse_h,
                    d_out.view((r0, h * d_v), (n_q, d_v)),
                    &single,
                )
                .map_err(|e| TestCaseError::fail(format!("single head {h}: {e}")))?;
                prop_assert!(
                    got.dq.view((r0, h * d_k), (n_q, d_k)) == s.dq,
                    "dq of head {}",
                    h
                );
                sum_dk += widen(&s.dk);
                sum_dv += widen(&s.dv);
                abs_dk += widen(&s.dk).abs();
                abs_dv += widen(&s.dv).abs();
            }
            for (name, mh, sum, abs) in [
                (
                    "dk",
                    widen(&got.dk.view((k0, j * d_k), (n_kv, d_k)).into_owned()),
                    &sum_dk,
                    &abs_dk,
                ),
                (
                    "dv",
                    widen(&got.dv.view((k0, j * d_v), (n_kv, d_v)).into_owned()),
                    &sum_dv,
                    &abs_dv,
                ),
            ] {
                for ((a, b), w) in mh.iter().zip(sum.iter()).zip(abs.iter()) {
                    let tol = if g == 1 {
                        0.0
                    } else {
                        (g as f64 + 1.0) * u * w
                    };
                    prop_assert!(
                        (a - b).abs() <= tol,
                        "{} of kv head {}: {} vs {} (g = {})",
                        name,
                        j,
                        a,
                        b,
                        g
                    );
                }
            }
        }
        r0 += n_q;
        k0 += n_kv;
    }
    for (threads, pool) in pools() {
        let again = pool
            .install(|| {
                multi_head_attention_backward(
                    &q,
                    &k,
                    &v,
                    &out,
                    &lse,
                    &d_out,
                    &layout,
                    &o.clone().with_parallelism(Parallelism::Rayon),
                )
            })
            .map_err(|e| TestCaseError::fail(format!("{e}")))?;
        prop_assert!(again == got, "{} threads change the gradients", threads);
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(32))]

    #[test]
    fn packed_gradients_equal_single_head_blocks(p in packed()) {
        check_packed::<f64>(&p)?;
        check_packed::<f32>(&p)?;
    }
}

/// The multi-head call's own errors: lse's shape, NaN/+∞ in lse (row, head), an invalid
/// lse named by head and packed row and key, a score overflow by head and packed rows.
#[test]
fn packed_errors_are_typed() {
    use attention_core::{
        HeadLayout, multi_head_attention_backward, multi_head_attention_with_lse,
    };
    let layout = HeadLayout::new(2, 1).with_seqlens(&[2, 3], &[4, 3]);
    let q = gaussian(5, 4, 1.0, 1);
    let k = gaussian(7, 2, 1.0, 2);
    let v = gaussian(7, 2, 1.0, 3);
    let d_out = gaussian(5, 4, 1.0, 4);
    let o = AttentionOptions::new();
    let (out, lse) = multi_head_attention_with_lse(&q, &k, &v, &layout, &o).unwrap();
    let call = |lse: &DMatrix<f64>| {
        multi_head_attention_backward(&q, &k, &v, &out, lse, &d_out, &layout, &o).unwrap_err()
    };
    assert_eq!(
        call(&lse.columns(0, 1).into_owned()),
        AttentionError::DimensionMismatch {
            operand: Operand::Lse,
            axis: Axis::Columns,
            found: 1,
            expected: 2,
            against: Operand::Query,
            rule: "one column per query head"
        }
    );
    let mut bad = lse.clone();
    bad[(3, 1)] = f64::NAN;
    assert!(matches!(
        call(&bad),
        AttentionError::NonFinite {
            operand: Operand::Lse,
            row: 3,
            column: 1,
            ..
        }
    ));
    let mut bad = lse.clone();
    bad[(3, 1)] = f64::NEG_INFINITY;
    // Row 3 is the second sequence's row 1, whose first key is packed key 4.
    assert!(
        matches!(
            call(&bad),
            AttentionError::InvalidLse {
                head: 1,
                row: 3,
                key: 4,
                ..
            }
        ),
        "{:?}",
        call(&bad)
    );
    // Two invalid entries: the smallest packed query row is reported, whatever the head
    // order of the blocks (head 0's row 4 comes first in block order).
    bad[(4, 0)] = f64::NEG_INFINITY;
    assert!(
        matches!(
            call(&bad),
            AttentionError::InvalidLse {
                head: 1,
                row: 3,
                ..
            }
        ),
        "{:?}",
        call(&bad)
    );
    let huge = AttentionOptions::new().with_scale(1e306);
    let big = q.map(|x| x * 1e10);
    assert!(matches!(
        multi_head_attention_backward(&big, &k, &v, &out, &lse, &d_out, &layout, &huge)
            .unwrap_err(),
        AttentionError::HeadScoreOverflow {
            head: 0,
            query: 0,
            key: 0
        }
    ));
}

// ------------------------------------------------------------------ _into and d_bias

/// `_into` gives the bits of the returning call, overwrites NaN-filled outputs entirely,
/// and with `d_bias` matches PyTorch's bias gradient on the 12 `bwd_bias_*` cases within
/// 1e-11 of max(1, max|g|); each row of it sums to 0 (the softmax is shift-invariant).
#[test]
fn into_and_bias_gradient_match_pytorch() {
    use attention_core::scaled_dot_product_attention_backward_into as into;
    let mut checked = 0;
    for c in backward_cases().iter().filter(|c| c.d_bias.is_some()) {
        let f = &c.forward;
        let bias = c.bias.as_ref().expect("a bias case has a bias");
        let mut o = shared_options(f).with_bias(bias);
        if let Some(m) = &c.mask {
            o = o.with_mask(m);
        }
        let lse: Vec<f64> = f.lse.column(0).iter().copied().collect();
        let want = backward(&f.q, &f.k, &f.v, &f.output, &lse, &c.d_out, &o).unwrap();
        let nan = |r, c| DMatrix::from_element(r, c, f64::NAN);
        let (mut dq, mut dk, mut dv) = (
            nan(f.q.nrows(), f.q.ncols()),
            nan(f.k.nrows(), f.k.ncols()),
            nan(f.v.nrows(), f.v.ncols()),
        );
        let mut d_bias = nan(f.q.nrows(), f.k.nrows());
        into(
            &f.q,
            &f.k,
            &f.v,
            &f.output,
            &lse,
            &c.d_out,
            &o,
            (&mut dq, &mut dk, &mut dv),
            Some((&mut d_bias).into()),
        )
        .unwrap_or_else(|e| panic!("{}: {e}", f.name));
        assert!(
            dq == want.dq && dk == want.dk && dv == want.dv,
            "{}: _into bits",
            f.name
        );
        let expected = c.d_bias.as_ref().unwrap();
        let magnitude = [&c.dq, &c.dk, &c.dv, expected]
            .iter()
            .fold(1.0f64, |m, x| m.max(x.amax()));
        let err = (&d_bias - expected).amax() / magnitude;
        assert!(err <= 1e-11, "{}: d_bias off by {err:e}", f.name);
        for i in 0..d_bias.nrows() {
            assert!(
                d_bias.row(i).sum().abs() <= 1e-12 * magnitude,
                "{}: row {i} sums to {}",
                f.name,
                d_bias.row(i).sum()
            );
        }
        checked += 1;
    }
    assert_eq!(checked, 12);
}

/// The bias gradient on random problems with softcap (d_bias is before the softcap
/// factor) against the reference's within the bound of `check`'s `dT` term, and the
/// `_into` errors: outputs of the wrong shape, `d_bias` without a bias; on every error
/// the outputs keep their contents.
#[test]
fn bias_gradient_against_the_reference_and_errors() {
    use attention_core::{GradientOf, scaled_dot_product_attention_backward_into as into};
    let (n_q, n_kv, d) = (70, 130, 8);
    let q = gaussian(n_q, d, 1.0, 11);
    let k = gaussian(n_kv, d, 1.0, 12);
    let v = gaussian(n_kv, d, 1.0, 13);
    let d_out = gaussian(n_q, d, 1.0, 14);
    let bias = gaussian(n_q, n_kv, 1.0, 15);
    let o = AttentionOptions::new()
        .with_bias(&bias)
        .with_softcap(3.0)
        .with_causal(Causal::BottomRight);
    let (out, lse) = scaled_dot_product_attention_with_lse(&q, &k, &v, &o).unwrap();
    let (mut dq, mut dk, mut dv) = (
        DMatrix::zeros(n_q, d),
        DMatrix::zeros(n_kv, d),
        DMatrix::zeros(n_kv, d),
    );
    let mut d_bias = DMatrix::from_element(n_q, n_kv, f64::NAN);
    into(
        &q,
        &k,
        &v,
        &out,
        lse.as_slice(),
        &d_out,
        &o,
        (&mut dq, &mut dk, &mut dv),
        Some((&mut d_bias).into()),
    )
    .unwrap();
    let ro = attention_reference::Options {
        bias: Some(bias.clone()),
        softcap: Some(3.0),
        causal: Some(attention_reference::Causal::BottomRight),
        ..Default::default()
    };
    let want = attention_reference::attention_backward(&q, &k, &v, &d_out, &ro);
    let magnitude = want.d_bias.amax().max(1.0);
    let err = (&d_bias - &want.d_bias).amax() / magnitude;
    // f64 throughout: the recomputed weights' and sums' rounding, far below 1e-12.
    assert!(err <= 1e-12, "d_bias off by {err:e}");
    // Masked (above the bottom-right diagonal) entries are exactly 0.
    assert_eq!(d_bias[(0, n_kv - n_q + 1)], 0.0);

    // Errors leave every output as it was.
    let (mut dq2, mut dk2, mut dv2) = (
        DMatrix::from_element(n_q, d, 7.0),
        DMatrix::from_element(n_kv, d, 7.0),
        DMatrix::from_element(n_kv, d, 7.0),
    );
    let unchanged = |a: &DMatrix<f64>| a.iter().all(|&x| x == 7.0);
    let mut wrong = DMatrix::from_element(n_q, n_kv + 1, 7.0);
    let e = into(
        &q,
        &k,
        &v,
        &out,
        lse.as_slice(),
        &d_out,
        &o,
        (&mut dq2, &mut dk2, &mut dv2),
        Some((&mut wrong).into()),
    )
    .unwrap_err();
    assert_eq!(
        e,
        AttentionError::DimensionMismatch {
            operand: Operand::Gradient(GradientOf::Bias),
            axis: Axis::Columns,
            found: n_kv + 1,
            expected: n_kv,
            against: Operand::Gradient(GradientOf::Bias),
            rule: "a gradient has its input's shape"
        }
    );
    let mut short = DMatrix::from_element(n_kv - 1, d, 7.0);
    let e = into(
        &q,
        &k,
        &v,
        &out,
        lse.as_slice(),
        &d_out,
        &o,
        (&mut dq2, &mut short, &mut dv2),
        None,
    )
    .unwrap_err();
    assert!(matches!(
        e,
        AttentionError::DimensionMismatch {
            operand: Operand::Gradient(GradientOf::Key),
            axis: Axis::Rows,
            ..
        }
    ));
    let plain = AttentionOptions::new();
    let mut d_bias2 = DMatrix::from_element(n_q, n_kv, 7.0);
    let e = into(
        &q,
        &k,
        &v,
        &out,
        lse.as_slice(),
        &d_out,
        &plain,
        (&mut dq2, &mut dk2, &mut dv2),
        Some((&mut d_bias2).into()),
    )
    .unwrap_err();
    assert!(matches!(
        e,
        AttentionError::InvalidOption {
            option: "d_bias",
            ..
        }
    ));
    // An invalid lse found during the computation: still nothing written.
    let mut l = lse.as_slice().to_vec();
    l[5] = f64::NEG_INFINITY;
    let e = into(
        &q,
        &k,
        &v,
        &out,
        &l,
        &d_out,
        &o,
        (&mut dq2, &mut dk2, &mut dv2),
        Some((&mut d_bias2).into()),
    )
    .unwrap_err();
    assert!(matches!(e, AttentionError::InvalidLse { row: 5, .. }));
    assert!(
        unchanged(&dq2)
            && unchanged(&dk2)
            && unchanged(&dv2)
            && unchanged(&d_bias2)
            && unchanged(&wrong)
            && unchanged(&short)
    );
}

/// A gradient past f32's range is `ProductOverflow` at its first entry in row-major
/// order, with or without GQA (the two ways the packed call assembles dK and dV). With
/// Q = K = 0 every weight of a row is 1/n_kv, and with V = 0 the output, `D` and dQ, dK
/// are 0, while dV_j sums dO_i/n_kv over the queries (and query heads) that read it: the
/// 8 queries of dO = 3.4e38 over 4 keys give 6.8e38 or more in sequence 1 (packed rows
/// 4..8), the one query of sequence 0 at most 1.7e38.
#[test]
fn packed_gradient_overflow_names_the_first_entry() {
    use attention_core::{
        HeadLayout, multi_head_attention_backward, multi_head_attention_with_lse,
    };
    for heads_kv in [2, 1] {
        let layout = HeadLayout::new(2, heads_kv).with_seqlens(&[1, 8], &[4, 4]);
        let q = DMatrix::<f32>::zeros(9, 4);
        let k = DMatrix::<f32>::zeros(8, 2 * heads_kv);
        let v = DMatrix::<f32>::zeros(8, 2 * heads_kv);
        let d_out = DMatrix::<f32>::from_element(9, 4, 3.4e38);
        let options = AttentionOptions::new();
        let (out, lse) = multi_head_attention_with_lse(&q, &k, &v, &layout, &options).unwrap();
        let r = multi_head_attention_backward(&q, &k, &v, &out, &lse, &d_out, &layout, &options);
        assert_eq!(
            r,
            Err(AttentionError::ProductOverflow {
                operand: Operand::Value,
                row: 4,
                column: 0
            }),
            "h_kv = {heads_kv}"
        );
    }
}
