//! Shared helpers of the integration tests: random inputs drawn by proptest, conversion to
//! the reference's f64 world, and the error bound every comparison uses.
//!
//! # The error bound
//! For query row `i`, let `u = T::EPSILON` (one ulp at 1), `A_i = |scale|·max_j Σ_p
//! |q_ip|·|k_jp|` (the largest magnitude any `q·k` product sum can reach) and `B_i` the
//! largest |bias| + |ALiBi term| + softcap in the row. The kernel's scores satisfy
//! (Higham, *Accuracy and Stability*, §3.1: a length-`d` dot product with FMA has error at
//! most `γ_d·Σ|q||k|`, `γ_d ≈ d·u`; scaling, softcap, ALiBi and bias add a rounding each):
//! ```text
//! |ŝ_ij − s_ij| ≤ Δ_i := (d_k + 4)·u·(A_i + B_i)
//! ```
//! A softmax perturbed by at most `Δ_i` per score changes each weight by a relative
//! `≤ 2Δ_i` (first order; the roundings of `s − m` and of the rescale arguments `m − m'`
//! are covered by counting each of Δ's four roundings as `u` rather than `u/2`).
//!
//! The sums `l = Σ_j p_j` and `Σ_j p_j·v_jc` are never accumulated key by key into one
//! variable (see "Accuracy" in `kernel/block.rs`): the block kernel sums key tiles of at
//! most 64 keys (60 with AVX2 and AVX-512) in T from zero, combines the tiles of a span
//! of 8 in T (`span ← α·span + tile`) and adds each span to a running sum in f64
//! (`run ← β·run + span`); the row path and the weights use partials of at most 64 keys
//! in T and f64 above them, a special case. With `u₆₄ = f64::EPSILON`,
//! `B' = min(n_kv, 64)`, `t = ⌈n_kv/60⌉` tiles, `G' = min(t, 8)` tiles per span and
//! `R = ⌈t/8⌉ − 1` later spans, a term of either sum is rounded at most `B'` times in its
//! tile (`≤ B'·u/2`), at most `2(G' − 1)` times in its span (`≤ (G' − 1)·u`) and at most
//! `2R` times in f64 (`≤ R·u₆₄`); it is multiplied by at most `G' − 1` factors `α`, each
//! within 2 ulp (`≤ 2(G' − 1)·u`), and `R` factors `β`, each within 2 ulp of f64
//! (`≤ 2R·u₆₄`); the exponential adds ≤ 2 ulp (`2u`). The last three are the same in both
//! sums. A ratio of two sums whose terms carry such errors moves by at most the sum of
//! their two own errors plus twice the shared ones; with the division in f64 and one final
//! rounding (`u₆₄/2 + u/2`):
//! ```text
//! S     := (B' + 5 + 6·(G' − 1))·u + 6R·u₆₄                    (sum_error)
//! |ô_ic − o_ic| ≤ (2Δ_i + S) · max_j |v_jc|
//! |l̂se_i − lse_i| ≤ Δ_i + S + u·|lse_i|
//! |ŵ_ij − w_ij| ≤ 2Δ_i + S
//! ```
//! (For lse, S also covers the `ln` in f64, `≤ u·ln(n_kv)/2`, inside the slack of
//! `B' + 5`.) For f32 the `R` term is below `10⁻⁴·u` for any `n_kv ≤ 2²⁴`, so `S ≤ 111u`
//! whatever the row length; for f64 it grows like `n_kv/80`, not like `n_kv`. (Before the
//! multi-level sums, `S` was `(n_kv + 6)·u`.)
//!
//! These are worst-case first-order bounds; the tests multiply them by 2 to cover the
//! second-order terms (products of two `O(u)` errors, non-negligible only when Δ_i is not
//! small, e.g. scores near 1e4 in f32), never by more.
#![allow(dead_code)] // each test binary uses a different subset of these helpers

use std::sync::OnceLock;

use attention_core::{
    AttentionOptions, Causal, CpuPath, Element, Parallelism, scaled_dot_product_attention_with_lse,
};
use nalgebra::DMatrix;
use proptest::prelude::*;

/// The safety factor over the first-order bound (see the module documentation).
pub const SECOND_ORDER: f64 = 2.0;

/// `DMatrix<T>` → `DMatrix<f64>` (exact).
pub fn widen<T: Element>(m: &DMatrix<T>) -> DMatrix<f64> {
    m.map(|x| x.to_f64())
}

/// `DMatrix<f64>` → `DMatrix<T>` (rounded).
pub fn narrow<T: Element>(m: &DMatrix<f64>) -> DMatrix<T> {
    m.map(T::from_f64_rounded)
}

/// Standard normal samples from pairs of uniforms (Box–Muller), so that all randomness
/// comes from proptest and failures shrink and replay.
pub fn normal_matrix(rows: usize, cols: usize, scale: f64) -> impl Strategy<Value = DMatrix<f64>> {
    prop::collection::vec((1e-12f64..1.0, 0.0f64..1.0), rows * cols).prop_map(move |u| {
        let vals: Vec<f64> = u
            .iter()
            .map(|&(a, b)| scale * (-2.0 * a.ln()).sqrt() * (std::f64::consts::TAU * b).cos())
            .collect();
        DMatrix::from_vec(rows, cols, vals)
    })
}

/// Deterministic N(0, σ²) entries for fixed grids of cases that must be reproducible
/// without proptest (`attention_testdata::gaussian`: seeded `StdRng`).
#[allow(unused_imports)] // not every test binary draws fixed grids
pub use attention_testdata::gaussian;

/// One of the magnitudes the issue asks for.
pub fn magnitude() -> impl Strategy<Value = f64> {
    prop::sample::select(vec![0.1, 1.0, 3.0, 30.0])
}

/// A random problem: Q (n_q×d_k), K (n_kv×d_k), V (n_kv×d_v), already rounded to `T`
/// and returned in f64 (exact) so both core and reference read the same numbers.
#[derive(Clone, Debug)]
pub struct Problem {
    pub q: DMatrix<f64>,
    pub k: DMatrix<f64>,
    pub v: DMatrix<f64>,
}

impl Problem {
    pub fn cast<T: Element>(&self) -> (DMatrix<T>, DMatrix<T>, DMatrix<T>) {
        (narrow(&self.q), narrow(&self.k), narrow(&self.v))
    }
    /// The problem with every entry rounded to `T`, so the reference sees the same inputs.
    pub fn rounded<T: Element>(&self) -> Problem {
        let (q, k, v) = self.cast::<T>();
        Problem {
            q: widen(&q),
            k: widen(&k),
            v: widen(&v),
        }
    }
}

/// Problems with n_q, n_kv in `0..=max_n`, d_k, d_v in `1..=max_d`, entries N(0,1) times
/// a magnitude from {0.1, 1, 3, 30} (Q and K drawn with independent magnitudes).
pub fn problem(max_n: usize, max_d: usize) -> impl Strategy<Value = Problem> {
    problem_sized(max_n, max_n, max_d)
}

/// As [`problem`], with separate limits for n_q and n_kv.
pub fn problem_sized(max_q: usize, max_kv: usize, max_d: usize) -> impl Strategy<Value = Problem> {
    problem_in(0..=max_q, 0..=max_kv, max_d)
}

/// As [`problem`], with n_q and n_kv drawn from the given ranges.
pub fn problem_in(
    n_q: std::ops::RangeInclusive<usize>,
    n_kv: std::ops::RangeInclusive<usize>,
    max_d: usize,
) -> impl Strategy<Value = Problem> {
    (
        n_q,
        n_kv,
        1..=max_d,
        1..=max_d,
        magnitude(),
        magnitude(),
        magnitude(),
    )
        .prop_flat_map(|(n_q, n_kv, d_k, d_v, sq, sk, sv)| {
            problem_of((n_q, n_kv, d_k, d_v), (sq, sk, sv))
        })
}

/// A problem of the given `(n_q, n_kv, d_k, d_v)`, with Q, K and V N(0,1) times the
/// given magnitudes.
pub fn problem_of(
    (n_q, n_kv, d_k, d_v): (usize, usize, usize, usize),
    (sq, sk, sv): (f64, f64, f64),
) -> impl Strategy<Value = Problem> {
    (
        normal_matrix(n_q, d_k, sq),
        normal_matrix(n_kv, d_k, sk),
        normal_matrix(n_kv, d_v, sv),
    )
        .prop_map(|(q, k, v)| Problem { q, k, v })
}

/// Every option of one call, numbers in `T`, masks and bias borrowed: the one place that
/// turns a test's own record of options into core's and the reference's.
#[derive(Clone, Debug)]
pub struct OptionParts<'a, T> {
    pub scale: Option<T>,
    pub causal: Option<Causal>,
    pub mask: Option<&'a DMatrix<bool>>,
    pub key_mask: Option<&'a [bool]>,
    pub bias: Option<&'a DMatrix<T>>,
    pub window: Option<(usize, usize)>,
    pub softcap: Option<T>,
    pub alibi: Option<T>,
    /// Dropout `(p, seed)`.
    pub dropout: Option<(f64, u64)>,
}

impl<'a, T: Element> OptionParts<'a, T> {
    /// Core's options: each part that is present, nothing else.
    pub fn core(&self) -> AttentionOptions<'a, T> {
        let mut o = AttentionOptions::new();
        if let Some(s) = self.scale {
            o = o.with_scale(s);
        }
        if let Some(c) = self.causal {
            o = o.with_causal(c);
        }
        if let Some(m) = self.mask {
            o = o.with_mask(m);
        }
        if let Some(km) = self.key_mask {
            o = o.with_key_mask(km);
        }
        if let Some(b) = self.bias {
            o = o.with_bias(b);
        }
        if let Some((left, right)) = self.window {
            o = o.with_window(left, right);
        }
        if let Some(cap) = self.softcap {
            o = o.with_softcap(cap);
        }
        if let Some(m) = self.alibi {
            o = o.with_alibi_slope(m);
        }
        if let Some((p, seed)) = self.dropout {
            o = o.with_dropout(p, seed);
        }
        o
    }

    /// The reference's options for exactly the numbers core sees (widened exactly).
    pub fn reference(&self) -> attention_reference::Options {
        attention_reference::Options {
            scale: self.scale.map(Element::to_f64),
            causal: self.causal.map(|c| match c {
                Causal::TopLeft => attention_reference::Causal::TopLeft,
                Causal::BottomRight => attention_reference::Causal::BottomRight,
            }),
            mask: self.mask.cloned(),
            key_mask: self.key_mask.map(<[bool]>::to_vec),
            bias: self.bias.map(widen),
            window: self.window,
            softcap: self.softcap.map(Element::to_f64),
            alibi_slope: self.alibi.map(Element::to_f64),
            dropout: self.dropout.map(|(p, seed)| attention_reference::Dropout {
                p,
                seed,
                head: 0,
                sequence: 0,
            }),
        }
    }
}

/// The diagonal of query row `i` that causal, the window and ALiBi measure from: `i` for
/// top-left causal, `i + n_kv − n_q` otherwise.
pub fn diag(i: usize, n_q: usize, n_kv: usize, top_left: bool) -> i64 {
    if top_left {
        i as i64
    } else {
        i as i64 + n_kv as i64 - n_q as i64
    }
}

/// `B_i` of the bound: per row, the largest finite |bias|, plus |ALiBi slope| times the
/// largest distance |diag(i) − j| ([`diag`]), plus the softcap.
pub fn extra(
    (n_q, n_kv): (usize, usize),
    top_left: bool,
    bias: Option<&DMatrix<f64>>,
    softcap: Option<f64>,
    alibi: Option<f64>,
) -> Vec<f64> {
    (0..n_q)
        .map(|i| {
            let b = bias.map_or(0.0, |b| {
                b.row(i)
                    .iter()
                    .filter(|x| x.is_finite())
                    .fold(0.0, |acc: f64, x| acc.max(x.abs()))
            });
            let d = diag(i, n_q, n_kv, top_left);
            let dist = (0..n_kv)
                .map(|j| (d - j as i64).unsigned_abs())
                .max()
                .unwrap_or(0) as f64;
            b + alibi.map_or(0.0, |m| m.abs() * dist) + softcap.unwrap_or(0.0)
        })
        .collect()
}

/// `S` of the module documentation: the error of the softmax sums of a row of `n_kv`
/// keys, relative to the row's largest |value| (output) or absolute (weights, lse),
/// `(B' + 5 + 6·(G' − 1))·u + 6R·u₆₄` with `B' = min(n_kv, 64)`, `t = ⌈n_kv/60⌉`,
/// `G' = min(t, 8)`, `R = ⌈t/8⌉ − 1`.
pub fn sum_error(n_kv: usize, eps: f64) -> f64 {
    let partial = n_kv.min(64) as f64;
    let tiles = n_kv.div_ceil(60);
    let span = tiles.clamp(1, 8) as f64;
    let later_spans = tiles.div_ceil(8).saturating_sub(1) as f64;
    (partial + 5.0 + 6.0 * (span - 1.0)) * eps + 6.0 * later_spans * f64::EPSILON
}

/// `Δ_i` of the module documentation, for every query row. `extra[i]` is `B_i`.
pub fn score_error(
    q: &DMatrix<f64>,
    k: &DMatrix<f64>,
    scale: f64,
    extra: &[f64],
    eps: f64,
) -> Vec<f64> {
    let d_k = q.ncols();
    (0..q.nrows())
        .map(|i| {
            let a = (0..k.nrows())
                .map(|j| (0..d_k).map(|p| (q[(i, p)] * k[(j, p)]).abs()).sum::<f64>())
                .fold(0.0, f64::max);
            (d_k as f64 + 4.0) * eps * (scale.abs() * a + extra.get(i).copied().unwrap_or(0.0))
        })
        .collect()
}

/// Asserts `|got − want| ≤ SECOND_ORDER·(2Δ_i + S)·max_j|v_jc|` entry by entry
/// ([`sum_error`]).
pub fn assert_output_close(
    got: &DMatrix<f64>,
    want: &DMatrix<f64>,
    v: &DMatrix<f64>,
    delta: &[f64],
    eps: f64,
    label: &str,
) {
    assert_eq!(got.shape(), want.shape(), "{label}: shape");
    let sum = sum_error(v.nrows(), eps);
    for c in 0..got.ncols() {
        let vmax = v.column(c).amax();
        for i in 0..got.nrows() {
            let tol = SECOND_ORDER * (2.0 * delta[i] + sum) * vmax;
            let err = (got[(i, c)] - want[(i, c)]).abs();
            assert!(
                err <= tol,
                "{label}: output[{i}, {c}] = {} but reference {} (error {err:e} > bound {tol:e})",
                got[(i, c)],
                want[(i, c)]
            );
        }
    }
}

/// Asserts the log-sum-exp bound `SECOND_ORDER·(Δ_i + S + u·|lse_i|)`, with −∞ required
/// to match exactly.
pub fn assert_lse_close(
    got: &[f64],
    want: &[f64],
    delta: &[f64],
    n_kv: usize,
    eps: f64,
    label: &str,
) {
    assert_eq!(got.len(), want.len(), "{label}: lse length");
    let sum = sum_error(n_kv, eps);
    for i in 0..got.len() {
        if want[i] == f64::NEG_INFINITY || got[i] == f64::NEG_INFINITY {
            assert_eq!(
                got[i], want[i],
                "{label}: lse[{i}] (fully masked rows are -inf)"
            );
            continue;
        }
        let tol = SECOND_ORDER * (delta[i] + sum + eps * want[i].abs());
        let err = (got[i] - want[i]).abs();
        assert!(
            err <= tol,
            "{label}: lse[{i}] = {} but reference {} (error {err:e} > {tol:e})",
            got[i],
            want[i]
        );
    }
}

/// Asserts the weight bound `SECOND_ORDER·(2Δ_i + S)` entry by entry.
pub fn assert_weights_close(
    got: &DMatrix<f64>,
    want: &DMatrix<f64>,
    delta: &[f64],
    eps: f64,
    label: &str,
) {
    assert_eq!(got.shape(), want.shape(), "{label}: weights shape");
    let sum = sum_error(got.ncols(), eps);
    for i in 0..got.nrows() {
        let tol = SECOND_ORDER * (2.0 * delta[i] + sum);
        for j in 0..got.ncols() {
            let err = (got[(i, j)] - want[(i, j)]).abs();
            assert!(
                err <= tol,
                "{label}: weight[{i}, {j}] = {} but reference {} (error {err:e} > {tol:e})",
                got[(i, j)],
                want[(i, j)]
            );
        }
    }
}

/// The issue's reproducer 7 with `d_v` value columns: f32 Q (512×64) and K (1024×64) of
/// small entries but for two overflowing pairs, scores (0, 600) and (64, 0); V
/// (1024×`d_v`) of small integers.
pub fn overflow_reproducer(d_v: usize) -> (DMatrix<f32>, DMatrix<f32>, DMatrix<f32>) {
    let q = DMatrix::<f32>::from_fn(512, 64, |i, j| match (i, j) {
        (0, 0) | (64, 1) => 1e20,
        _ => ((i * 7 + j * 13) % 19) as f32 * 1e-3 + 1e-3,
    });
    let k = DMatrix::<f32>::from_fn(1024, 64, |i, j| match (i, j) {
        (600, 0) | (0, 1) => 1e20,
        _ => ((i * 11 + j * 5) % 23) as f32 * 1e-3 + 1e-3,
    });
    let v = DMatrix::<f32>::from_fn(1024, d_v, |i, j| ((i + j) % 7) as f32);
    (q, k, v)
}

/// `p` rounded to `T` against the reference, no options but the CPU path: on every path
/// this machine has, core's output under `options(path)` is finite and within
/// [`assert_output_close`]'s bound (default scale `1/√d_k`). Returns the reference's result.
pub fn assert_plain_matches_reference<T: Element>(
    p: &Problem,
    options: impl Fn(CpuPath) -> AttentionOptions<'static, T>,
) -> attention_reference::Attention {
    let p = p.rounded::<T>();
    let (q, k, v) = p.cast::<T>();
    let want = attention_reference::attention(&p.q, &p.k, &p.v, &Default::default());
    let eps = T::EPSILON.to_f64();
    let delta = score_error(&p.q, &p.k, 1.0 / (p.q.ncols() as f64).sqrt(), &[], eps);
    for path in CpuPath::supported() {
        let out = attention_core::scaled_dot_product_attention(&q, &k, &v, &options(path))
            .unwrap_or_else(|e| panic!("{path:?}: {e}"));
        assert!(
            out.iter().all(|x| x.finite()),
            "{path:?}: non-finite output"
        );
        assert_output_close(
            &widen(&out),
            &want.output,
            &p.v,
            &delta,
            eps,
            &format!("{path:?}"),
        );
    }
    want
}

/// A log-sum-exp vector widened to f64 (exact).
pub fn lse_f64<T: Element>(lse: &nalgebra::DVector<T>) -> Vec<f64> {
    lse.iter().map(|x| x.to_f64()).collect()
}

/// Rows whose expected lse is −∞ (no allowed key) are exactly 0 in output and weights.
pub fn assert_fully_masked_rows(
    out: &DMatrix<f64>,
    weights: Option<&DMatrix<f64>>,
    lse: &[f64],
    want_lse: &[f64],
    label: &str,
) {
    for (i, &want) in want_lse.iter().enumerate() {
        if want != f64::NEG_INFINITY {
            continue;
        }
        assert_eq!(
            lse[i],
            f64::NEG_INFINITY,
            "{label}: lse[{i}] of a fully masked row"
        );
        assert!(
            out.row(i).iter().all(|&x| x == 0.0),
            "{label}: fully masked output row {i} is {:?}, not 0",
            out.row(i)
        );
        if let Some(w) = weights {
            assert!(
                w.row(i).iter().all(|&x| x == 0.0),
                "{label}: fully masked weight row {i} is not 0"
            );
        }
    }
}

/// A matrix of the given shape filled with NaN, to show unwritten outputs.
pub fn nan_matrix<T: Element>(rows: usize, cols: usize) -> DMatrix<T> {
    DMatrix::from_element(rows, cols, T::from_f64_rounded(f64::NAN))
}

/// Work (multiply-adds `n_q·n_kv·(d_k + d_v)`) from which the kernel splits a call over
/// threads: `PARALLEL_MIN_WORK` in `kernel/mod.rs`, restated here (not exported).
pub const PARALLEL_MIN_WORK: usize = 4 << 20;
/// Queries up to which the kernel uses its row-at-a-time path, which never runs threads:
/// `DIRECT_MAX_QUERIES` in `kernel/mod.rs`.
pub const DIRECT_MAX_QUERIES: usize = 8;

/// Rayon pools of 1, 2 and 7 threads (built once per test binary). One thread runs
/// rayon's code with the largest groups of query blocks; two is this machine's core
/// count; seven is more threads than cores and splits the blocks unevenly.
pub fn pools() -> &'static [(usize, rayon::ThreadPool)] {
    static POOLS: OnceLock<Vec<(usize, rayon::ThreadPool)>> = OnceLock::new();
    POOLS.get_or_init(|| {
        [1, 2, 7]
            .into_iter()
            .map(|t| {
                let pool = rayon::ThreadPoolBuilder::new()
                    .num_threads(t)
                    .build()
                    .expect("a thread pool");
                (t, pool)
            })
            .collect()
    })
}

/// Asserts that threads change no bit: on every CPU path this machine has, the call with
/// `Parallelism::Sequential` and the call with `Parallelism::Rayon` inside each of
/// [`pools`] give the same bits of output and log-sum-exp (so −0 ≠ +0).
///
/// Panics if the problem is too small for the kernel to split it over threads (then both
/// calls would run the same single-threaded code and the comparison could not fail).
pub fn assert_thread_count_irrelevant<T: Element>(
    q: &DMatrix<T>,
    k: &DMatrix<T>,
    v: &DMatrix<T>,
    options: &AttentionOptions<'_, T>,
    label: &str,
) {
    let (n_q, n_kv, d_k, d_v) = (q.nrows(), k.nrows(), q.ncols(), v.ncols());
    assert!(
        n_q * n_kv * (d_k + d_v) >= PARALLEL_MIN_WORK && n_q > DIRECT_MAX_QUERIES,
        "{label}: {n_q}x{n_kv}, d_k={d_k}, d_v={d_v} is too small to run threaded"
    );
    let bits = |(out, lse): &(DMatrix<T>, nalgebra::DVector<T>)| -> Vec<u64> {
        out.iter()
            .chain(lse.iter())
            .map(|x| x.to_f64().to_bits())
            .collect()
    };
    for path in CpuPath::supported() {
        let on = |par| options.clone().with_cpu_path(path).with_parallelism(par);
        let run = |o: &AttentionOptions<'_, T>| {
            scaled_dot_product_attention_with_lse(q, k, v, o)
                .unwrap_or_else(|e| panic!("{label} {path:?}: {e}"))
        };
        let sequential = bits(&run(&on(Parallelism::Sequential)));
        for (threads, pool) in pools() {
            let threaded = bits(&pool.install(|| run(&on(Parallelism::Rayon))));
            if let Some(idx) = (0..sequential.len()).find(|&i| sequential[i] != threaded[i]) {
                let what = if idx < n_q * d_v {
                    format!("output[{}, {}]", idx % n_q, idx / n_q)
                } else {
                    format!("lse[{}]", idx - n_q * d_v)
                };
                panic!(
                    "{label} {path:?}: {threads} threads change {what}: {} sequential, {} threaded",
                    f64::from_bits(sequential[idx]),
                    f64::from_bits(threaded[idx])
                );
            }
            assert_eq!(sequential.len(), threaded.len(), "{label}: lengths");
        }
    }
}

/// A key mask, a bool mask and a bias sized for `n_q × n_kv`, for tests that run one call
/// with each option in turn ([`option_cases`]).
pub struct OptionInputs<T> {
    pub key_mask: Vec<bool>,
    pub mask: DMatrix<bool>,
    pub bias: DMatrix<T>,
}

/// [`OptionInputs`] of fixed patterns (every 7th key hidden, every 5th score masked, a
/// bias of standard deviation 0.5).
pub fn option_inputs<T: Element>(n_q: usize, n_kv: usize) -> OptionInputs<T> {
    OptionInputs {
        key_mask: (0..n_kv).map(|j| j % 7 != 3).collect(),
        mask: DMatrix::from_fn(n_q, n_kv, |i, j| (i + 2 * j) % 5 != 1),
        bias: gaussian(n_q, n_kv, 0.5, 77).map(T::from_f64_rounded),
    }
}

/// Every option once, named: none, causal both ways, two windows, the key mask, the
/// bool mask, the bias, softcap with ALiBi, a scale.
pub fn option_cases<T: Element>(
    x: &OptionInputs<T>,
) -> Vec<(&'static str, AttentionOptions<'_, T>)> {
    let o = AttentionOptions::new;
    vec![
        ("plain", o()),
        ("causal", o().with_causal(Causal::BottomRight)),
        ("top-left", o().with_causal(Causal::TopLeft)),
        ("window", o().with_window(100, 0)),
        ("window both ways", o().with_window(100, 30)),
        ("key mask", o().with_key_mask(&x.key_mask)),
        ("mask", o().with_mask(&x.mask)),
        ("bias", o().with_bias(&x.bias)),
        (
            "softcap+alibi",
            o().with_softcap(T::from_f64_rounded(5.0))
                .with_alibi_slope(T::from_f64_rounded(0.01)),
        ),
        ("scale", o().with_scale(T::from_f64_rounded(0.3))),
    ]
}

/// Each value's bits (as f64: exact for f32 and f64), for comparisons bit for bit.
pub fn bits<T: Element>(m: impl IntoIterator<Item = T>) -> Vec<u64> {
    m.into_iter().map(|x| x.to_f64().to_bits()).collect()
}

/// Asserts that `got` and `want` hold the same values bit for bit, in the same order.
pub fn assert_same_bits<'a, T: Element>(
    got: impl IntoIterator<Item = &'a T>,
    want: impl IntoIterator<Item = &'a T>,
    label: &str,
) {
    assert_eq!(
        bits(got.into_iter().copied()),
        bits(want.into_iter().copied()),
        "{label}"
    );
}
