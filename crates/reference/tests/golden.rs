//! The reference against every golden case (PyTorch float64, see `attention-testdata`).
//!
//! # Tolerance
//!
//! Both sides evaluate the same formula in f64, so they differ only by rounding. For a
//! quantity of magnitude `mag`, PyTorch's ordinary f64 evaluation is off by at most about
//! `γ_n · mag` with `γ_n = n·u/(1 − n·u)`, `u = 2⁻⁵³` and `n` the longest reduction
//! (`n ≤ max(d_k, n_kv) = 239` here), plus a few `u` for `exp`, `ln`, `tanh` and the scale;
//! the reference is off by a few `u · mag` (compensated dots and sums). So
//! `|ref − golden| ≤ (239 + 8)·u·mag ≈ 2.7e-14·mag`, and we allow
//! `TOL·(1 + mag)` with `TOL = 1e-12`: ~35× the a-priori bound, so it cannot flake on
//! rounding, yet ~10⁴ times tighter than any mistake in the formula (a wrong mask, order of
//! operations or diagonal changes results at the 1e-3 level or more). Observed errors are at
//! most ~5 u (reported when the test runs with `--nocapture`).
//!
//! The magnitudes are those that set each quantity's rounding error:
//! - `output[i, c]` is a convex combination of column c of V: `mag = max_j |v_jc|` (not
//!   `|output|`, which can be ~0 by cancellation);
//! - `lse[i]` carries the rounding of the scores: `mag = max(|lse_i|, max_j |s_ij|ₐ)` where
//!   `|s_ij|ₐ = |scale|·Σ_m |q_im·k_jm| + |alibi term| + |bias_ij|` bounds the score's terms;
//! - `weights` lie in [0, 1]: `mag = 1`.
//!
//! Fully masked rows must match exactly: output 0 and lse −∞.

use attention_reference::{Attention, Causal, Options, attention, self_attention};
use attention_testdata::{CausalAlign, GoldenCase, golden_cases};
use nalgebra::DMatrix;

const TOL: f64 = 1e-12;

fn options(c: &GoldenCase) -> Options {
    Options {
        scale: c.scale,
        causal: c.causal.map(|a| match a {
            CausalAlign::TopLeft => Causal::TopLeft,
            CausalAlign::BottomRight => Causal::BottomRight,
        }),
        mask: c.mask.clone(),
        key_mask: c.key_mask.clone(),
        bias: c.bias.clone(),
        window: c.window,
        softcap: c.softcap,
        alibi_slope: c.alibi_slope,
        dropout: None,
    }
}

/// `max_j |s_ij|ₐ` for row `i`: a bound on the magnitude of the terms of each score.
fn score_magnitude(c: &GoldenCase, i: usize) -> f64 {
    let scale = c.scale.unwrap_or(1.0 / (c.d_k as f64).sqrt()).abs();
    let diag = match c.causal {
        Some(CausalAlign::TopLeft) => i as f64,
        _ => i as f64 + c.n_kv as f64 - c.n_q as f64,
    };
    (0..c.n_kv)
        .map(|j| {
            let qk: f64 = (0..c.d_k).map(|m| (c.q[(i, m)] * c.k[(j, m)]).abs()).sum();
            let alibi = c.alibi_slope.map_or(0.0, |m| (m * (diag - j as f64)).abs());
            let bias = c.bias.as_ref().map_or(0.0, |b| {
                if b[(i, j)].is_finite() {
                    b[(i, j)].abs()
                } else {
                    0.0
                }
            });
            scale * qk + alibi + bias
        })
        .fold(0.0, f64::max)
}

/// Checks one case and returns the largest error in units of `u·(1 + mag)`.
fn check(c: &GoldenCase, got: &Attention) -> f64 {
    let u = f64::EPSILON / 2.0;
    let mut worst: f64 = 0.0;
    let mut compare = |what: &str, got: f64, want: f64, mag: f64| {
        let err = (got - want).abs();
        assert!(
            err <= TOL * (1.0 + mag),
            "{}: {what}: reference {got:e}, golden {want:e}, |Δ| = {err:e} > {TOL:e}·(1 + {mag:e})",
            c.name
        );
        worst = worst.max(err / (u * (1.0 + mag)));
    };

    assert_eq!(
        got.output.shape(),
        (c.n_q, c.d_v),
        "{}: output shape",
        c.name
    );
    for i in 0..c.n_q {
        if c.lse[i] == f64::NEG_INFINITY {
            assert_eq!(
                got.lse[i],
                f64::NEG_INFINITY,
                "{}: row {i} should be fully masked",
                c.name
            );
            assert!(
                got.output.row(i).iter().all(|&x| x == 0.0),
                "{}: fully masked row {i} should be 0",
                c.name
            );
            continue;
        }
        let lse_mag = c.lse[i].abs().max(score_magnitude(c, i));
        compare(&format!("lse[{i}]"), got.lse[i], c.lse[i], lse_mag);
        for col in 0..c.d_v {
            let v_mag = c.v.column(col).amax();
            compare(
                &format!("output[({i}, {col})]"),
                got.output[(i, col)],
                c.output[(i, col)],
                v_mag,
            );
        }
    }
    if let Some(weights) = &c.weights {
        for i in 0..c.n_q {
            for j in 0..c.n_kv {
                compare(
                    &format!("weights[({i}, {j})]"),
                    got.weights[(i, j)],
                    weights[(i, j)],
                    1.0,
                );
            }
        }
    }
    worst
}

#[test]
fn every_golden_case() {
    let cases = golden_cases();
    assert_eq!(cases.len(), 113);
    let mut worst = (0.0, String::new());
    for c in &cases {
        let got = attention(&c.q, &c.k, &c.v, &options(c));
        let err = check(c, &got);
        if err > worst.0 {
            worst = (err, c.name.clone());
        }
    }
    println!(
        "largest error: {:.1} u·(1 + magnitude) in {} (tolerance {:.0} u)",
        worst.0,
        worst.1,
        TOL / (f64::EPSILON / 2.0)
    );
}

#[test]
fn golden_cases_through_f32_inputs_where_exact() {
    // Cases whose inputs are exactly representable in f32 must give identical results
    // from f32 and f64 matrices, since the reference widens to f64 before computing.
    let cases = golden_cases();
    let mut checked = 0;
    for c in cases.iter().filter(|c| {
        [&c.q, &c.k, &c.v]
            .iter()
            .all(|m| m.iter().all(|&x| f64::from(x as f32) == x))
    }) {
        let narrow = |m: &DMatrix<f64>| m.map(|x| x as f32);
        let a32 = attention(&narrow(&c.q), &narrow(&c.k), &narrow(&c.v), &options(c));
        let a64 = attention(&c.q, &c.k, &c.v, &options(c));
        assert_eq!(a32.output, a64.output, "{}", c.name);
        assert_eq!(a32.lse, a64.lse, "{}", c.name);
        checked += 1;
    }
    // At least the seed example has small-integer inputs.
    assert!(checked >= 1);
}

#[test]
fn seed_example() {
    let q = DMatrix::from_row_slice(2, 2, &[1.0, 0.0, 0.0, 1.0]);
    let v = DMatrix::from_row_slice(2, 2, &[1.0, 2.0, 3.0, 4.0]);
    let out = self_attention(&q, &q, &v);
    let expected = DMatrix::from_row_slice(
        2,
        2,
        &[
            1.660476901346686,
            2.660476901346686,
            2.3395230986533138,
            3.3395230986533138,
        ],
    );
    // The golden first row is one ulp below the correctly rounded value
    // (1.66047690134668614876… rounds to 1.6604769013466862), which the reference returns.
    assert!((&out - &expected).amax() <= 1e-15, "{out}");
    assert_eq!(out[(0, 0)], 1.6604769013466862);
}
