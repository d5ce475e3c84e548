//! Typical error on typical data: the root-mean-square error of the output and of the
//! log-sum-exp against the reference, for N(0, 1) inputs, on every CPU path, f32 and
//! f64, must stay below the RMS that the rounding of each operation predicts.
//!
//! The other accuracy tests use worst-case bounds (`common/mod.rs`), which grow like
//! `n_kv·u` and so cannot notice an exponential a few ulp worse than it should be: the
//! Taylor polynomial of `kernel/exp.rs` cut from degree 7 to 5 (errors up to ~20 ulp in
//! f32) passes all of them. Rounding errors are not worst-case on typical data: they are
//! about independent, so they add in quadrature, and their RMS is a few ulp.
//!
//! # The model
//! Rounding a number `x` to nearest has an error uniform in `±ulp(x)/2`, of RMS
//! `ulp(x)/√12 ≤ ρ·|x|` with `ρ = u/√12` (`u = T::EPSILON`); errors of distinct operations
//! are treated as independent with mean 0. With `w_j` the exact weights of a query row
//! (from the reference), `n = n_kv`, `d = d_k`, and `q`, `k` entries N(0, 1) with the
//! default scale `1/√d` (scores N(0, 1)), each term below is a variance in units of `ρ²`:
//!
//! - a score `s_j`: a dot product of `d` terms accumulated left to right, its `p`-th
//!   partial sum of variance `p`, so `Σ_p p = d(d+1)/2` before the scale `1/√d`:
//!   `(d+1)/2`; plus the rounding of each product (the portable kernel does not fuse
//!   them) and of the scaling: `+ 2`. Total `σ_s² = (d+1)/2 + 2` (absolute, in `s`).
//! - the exponential of `s_j − m` (`m` the row maximum): the subtraction rounds
//!   `|s_j − m| = |ln(w_j / w_max)|`, and the exponential itself is counted as 4
//!   roundings of its result (its Horner steps; it is within 2 ulp in the worst case).
//!   A relative error `η_j` of `e_j = exp(s_j − m)` moves the output by `Σ_j w_j·η_j·v_j`
//!   and the log-sum-exp by `Σ_j w_j·η_j`, both of variance
//!   `W = Σ_j w_j²·(σ_s² + 4 + ln²(w_j / w_max))` (per unit of `E v² = 1`).
//! - the sum `l = Σ_j e_j`, accumulated in key order (the kernels restart it per key tile,
//!   which only lowers this): relative variance `L = Σ_k (Σ_{j≤k} w_j)²` (about `n/3`).
//!   It scales a whole output row and adds to the log-sum-exp.
//! - the output sum `Σ_j e_j·v_j` in key order, one rounding per step (two unfused):
//!   partial sums of variance `Σ_{j≤k} w_j²`, so `A = Σ_j (n − j + 1)·w_j²` (`j` from 0; about
//!   `(n + 3)/2·Σ_j w_j²`), plus the rescaling by `α` once per key tile (at most
//!   `(n/60)·Σ_j w_j²`, tiles have 60 or 64 keys) and the final division and power-of-two
//!   unscaling (`2·Σ_j w_j²`).
//! - the log-sum-exp `m + ln l`: `ln` within 1 ulp (2 roundings of `ln l`), and the
//!   addition (one rounding of `lse`): `2·ln²(l) + lse²` with `ln l = −ln w_max`.
//!
//! So per row, with `E o_c² = Σ_j w_j²`:
//! ```text
//! E err_out² = ρ²·(W + (L + n/60 + 2)·Σ_j w_j² + A)           per output entry
//! E err_lse² = ρ²·(W + L + 2·ln²(w_max) + lse²)
//! ```
//! The reference's own rounding (same operations in f64, its sums compensated) is added
//! for `T = f64`; for f32 it is 2^-29 times smaller. The model is an expectation over
//! the data; the test measures the mean of `n_q` independent rows' squared errors, whose
//! relative standard deviation is `√(2/n_q)` for Gaussian errors, and allows 3 of those:
//! ```text
//! measured RMS ≤ model RMS · √(1 + 3·√(2/n_q))          (1.19× for n_q = 100)
//! ```
//! No other factor: `ρ` already over-estimates the RMS of a rounding (`ulp(x)/√12` is
//! between `ρ|x|/2` and `ρ|x|`), and the sums are counted as if never split into tiles.
//! Measured on this machine (AVX-512, every path, f32 and f64) with the inputs of
//! `attention_testdata::gaussian` (seeded `StdRng`): output RMS 0.48–0.86 of the model,
//! lse at most 0.76; at most 0.72 of the limit. (With the former xorshift inputs: output
//! 0.65–0.87, lse 0.2–0.95, and over 20 other seeds never above 0.83 of the limit.) With
//! the exponential's polynomial cut to degree 5 (f32; degree 11 for f64), whose truncation
//! error `r⁶/720` (`|r| ≤ ln2/2`) is up to 20 ulp, RMS 5.6 ulp, every case on the block
//! kernel exceeded the output limit (by 1.07–1.4× over 10 seeds of the former inputs),
//! while every other integration test still passed (see `docs/TESTING.md`); re-checked with
//! the seeded `StdRng` inputs for f32: this file's f32 test fails, properties, options,
//! golden, fixed and blocks pass.
//!
//! Sizes: up to 256 keys, where the sums' `√n` growth does not yet drown the exponential's
//! share; more than 8 queries (the block kernel and its exponential) and, once, exactly 8
//! (the row-at-a-time path, which uses `std`'s exponential).

mod common;

use attention_core::{AttentionOptions, CpuPath, Element, scaled_dot_product_attention_with_lse};
use common::{Problem, gaussian};

/// `(n_q, n_kv, d_k, d_v)`: one to four key tiles, head sizes 16 to 128.
const SIZES: [(usize, usize, usize, usize); 5] = [
    (100, 64, 64, 64),
    (100, 200, 64, 64),
    (150, 150, 16, 16),
    (96, 256, 128, 32),
    (8, 200, 64, 64),
];

/// The model's expected squared errors of one row (in units of `ρ²` of `T`): per output
/// entry, and of the lse. `reference` is `(ρ_f64/ρ_T)²`: the reference's own rounding,
/// the same as `T`'s for f64 and negligible for f32.
fn row_model(w: &[f64], lse: f64, d_k: usize, reference: f64) -> (f64, f64) {
    let n = w.len() as f64;
    let w_max = w.iter().copied().fold(0.0, f64::max);
    let sum_w2: f64 = w.iter().map(|x| x * x).sum();
    let sigma_s2 = (d_k as f64 + 1.0) / 2.0 + 2.0;
    // Σ_j w_j²·ln²(w_j / w_max): the rounding of each exponential's argument.
    let argument: f64 = w
        .iter()
        .filter(|&&x| x > 0.0)
        .map(|&x| x * x * (x / w_max).ln().powi(2))
        .sum();
    let weights = (sigma_s2 + 4.0) * sum_w2 + argument;
    let (mut prefix, mut l_var) = (0.0, 0.0);
    for &x in w {
        prefix += x;
        l_var += prefix * prefix;
    }
    let accumulation: f64 = w
        .iter()
        .enumerate()
        .map(|(j, &x)| (n - j as f64 + 1.0) * x * x)
        .sum();
    let ln_l2 = w_max.ln().powi(2);
    let out = weights + (l_var + n / 60.0 + 2.0) * sum_w2 + accumulation;
    let lse_var = weights + l_var + 2.0 * ln_l2 + lse * lse;
    // The reference rounds each score (its compensated dot product, then the scale), the
    // argument and the exponential, each output once more and the lse like core.
    let ref_weights = 4.0 * sum_w2 + argument;
    let ref_out = ref_weights + 2.0 * sum_w2;
    let ref_lse = ref_weights + 2.0 * ln_l2 + lse * lse;
    (out + reference * ref_out, lse_var + reference * ref_lse)
}

/// Measured and modelled RMS (in units of `T::EPSILON`) of output and lse on `path`.
struct Rms {
    out: f64,
    out_model: f64,
    lse: f64,
    lse_model: f64,
}

fn measure<T: Element>(p: &Problem, path: CpuPath) -> Rms {
    let (q, k, v) = p.cast::<T>();
    let want = attention_reference::attention(&p.q, &p.k, &p.v, &Default::default());
    let options = AttentionOptions::new().with_cpu_path(path);
    let (out, lse) = scaled_dot_product_attention_with_lse(&q, &k, &v, &options).unwrap();
    let eps = T::EPSILON.to_f64();
    let rho2 = eps * eps / 12.0;
    let reference = (f64::EPSILON / eps).powi(2);
    let (n_q, d_v) = (q.nrows(), v.ncols());
    let (mut out_err, mut out_model, mut lse_err, mut lse_model) = (0.0, 0.0, 0.0, 0.0);
    for i in 0..n_q {
        let w: Vec<f64> = want.weights.row(i).iter().copied().collect();
        let (o, l) = row_model(&w, want.lse[i], q.ncols(), reference);
        out_model += rho2 * o * d_v as f64;
        lse_model += rho2 * l;
        for c in 0..d_v {
            out_err += (out[(i, c)].to_f64() - want.output[(i, c)]).powi(2);
        }
        lse_err += (lse[i].to_f64() - want.lse[i]).powi(2);
    }
    // As RMS relative to the output's RMS, and absolute for the lse, in ulps of 1.
    let out_rms: f64 = want.output.iter().map(|x| x * x).sum::<f64>();
    let rel = |e: f64| (e / out_rms).sqrt() / eps;
    let abs = |e: f64| (e / n_q as f64).sqrt() / eps;
    Rms {
        out: rel(out_err),
        out_model: rel(out_model),
        lse: abs(lse_err),
        lse_model: abs(lse_model),
    }
}

fn typical_error<T: Element>() {
    let mut seed = 100;
    for (n_q, n_kv, d_k, d_v) in SIZES {
        let p = Problem {
            q: gaussian(n_q, d_k, 1.0, seed),
            k: gaussian(n_kv, d_k, 1.0, seed + 1),
            v: gaussian(n_kv, d_v, 1.0, seed + 2),
        }
        .rounded::<T>();
        seed += 3;
        // The sample mean of n_q squared errors (rows are independent; the entries of one
        // row share its `l`, so count rows only) fluctuates around its expectation with a
        // relative standard deviation √(2/n_q) for Gaussian errors: allow 3 of those.
        let allowance = (1.0 + 3.0 * (2.0 / n_q as f64).sqrt()).sqrt();
        for path in CpuPath::supported() {
            let r = measure::<T>(&p, path);
            let label = format!(
                "{} {path:?} {n_q}x{n_kv} d_k={d_k} d_v={d_v}",
                std::any::type_name::<T>()
            );
            let (out_max, lse_max) = (allowance * r.out_model, allowance * r.lse_model);
            println!(
                "{label}: output RMS {:.2} ulp (model {:.2}, limit {out_max:.2}), \
                 lse RMS {:.2} ulp (model {:.2}, limit {lse_max:.2})",
                r.out, r.out_model, r.lse, r.lse_model
            );
            assert!(
                r.out <= out_max,
                "{label}: output RMS relative error {:.2} ulp > {out_max:.2} ulp (model {:.2})",
                r.out,
                r.out_model
            );
            assert!(
                r.lse <= lse_max,
                "{label}: lse RMS error {:.2} ulp > {lse_max:.2} ulp (model {:.2})",
                r.lse,
                r.lse_model
            );
        }
    }
}

#[test]
fn typical_error_f32_within_the_rounding_model() {
    typical_error::<f32>();
}

#[test]
fn typical_error_f64_within_the_rounding_model() {
    typical_error::<f64>();
}
