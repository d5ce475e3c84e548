//! Property tests of [`AttentionOptions`]: every option, alone and combined, for f32 and
//! f64, through a CPU path drawn from those this machine has.
//!
//! - random combinations against the reference (output, lse, weights);
//! - each option equals its explicit form (causal and window as masks, ALiBi as a bias,
//!   the key mask as a full mask);
//! - weights·V is the output and exp(s − lse) the weights;
//! - attention over blocks of keys, merged, is attention over all keys;
//! - values, keys and bias at disallowed positions change nothing;
//! - causal rows never see later tokens;
//! - finite inputs never give NaN, fully masked rows are exactly 0;
//! - every invalid option is the documented error.
//!
//! All randomness comes from proptest; every comparison uses the bound of `common/mod.rs`.

// These tests pass views by reference (`&m.columns(..)`), the form that worked before
// views could be passed by value; clippy would have them by value, but the old form must
// keep compiling.
#![allow(clippy::needless_borrows_for_generic_args)]

mod common;

use attention_core::{
    AttentionError, AttentionOptions, Axis, Causal, CpuPath, Element, Operand, attention_weights,
    merge_partial_attention, scaled_dot_product_attention, scaled_dot_product_attention_into,
    scaled_dot_product_attention_with_lse,
};
use attention_reference::dot2;
use common::{
    OptionParts, Problem, assert_fully_masked_rows, assert_lse_close, assert_output_close,
    assert_weights_close, diag, extra, lse_f64, magnitude, nan_matrix, narrow, normal_matrix,
    problem, problem_in, problem_of, problem_sized, score_error, widen,
};
use nalgebra::{DMatrix, DVector};
use proptest::prelude::*;

/// Largest n_q and n_kv of the small problems (half of the main properties' cases).
const MAX_N: usize = 40;
/// Largest d_k and d_v.
const MAX_D: usize = 16;
/// n_q of the tiled problems (the other half): more than 8 queries, so the block kernel
/// runs (not the row-at-a-time path), up to more than one block of 64.
const TILED_Q: std::ops::RangeInclusive<usize> = 9..=72;
/// n_kv of the tiled problems: three or four key tiles of the kernel (60 or 64 keys
/// each), so the online softmax rescales across tiles with every option on.
const TILED_KV: std::ops::RangeInclusive<usize> = 129..=200;
/// Largest n_kv of the long-key properties: 4–5 key tiles, past the first 256-key packing
/// chunk (at 253–255 keys the AVX2 path used to panic: see `blocks.rs`).
const MAX_LONG_KV: usize = 300;

/// Cases per property: the whole file runs in a few seconds.
fn config() -> ProptestConfig {
    ProptestConfig::with_cases(256)
}

/// The long-key properties cost more per case.
fn long_config() -> ProptestConfig {
    ProptestConfig::with_cases(32)
}

/// Error checks are cheap and pick one of nine faults: more cases.
fn error_config() -> ProptestConfig {
    ProptestConfig::with_cases(1024)
}

// ---------------------------------------------------------------------------------------
// Options in f64, convertible to core's and the reference's.
// ---------------------------------------------------------------------------------------

/// Every option, owned, numbers in f64 (rounded to `T` by [`Opts::rounded`]).
#[derive(Clone, Debug)]
struct Opts {
    scale: Option<f64>,
    causal: Option<Causal>,
    mask: Option<DMatrix<bool>>,
    key_mask: Option<Vec<bool>>,
    bias: Option<DMatrix<f64>>,
    window: Option<(usize, usize)>,
    softcap: Option<f64>,
    alibi: Option<f64>,
}

impl Opts {
    /// The numeric options rounded to `T` (and widened back, exactly).
    fn rounded<T: Element>(&self) -> Opts {
        let round = |x: f64| T::from_f64_rounded(x).to_f64();
        Opts {
            scale: self.scale.map(round),
            bias: self.bias.as_ref().map(|b| b.map(round)),
            softcap: self.softcap.map(round),
            alibi: self.alibi.map(round),
            ..self.clone()
        }
    }

    /// Every option, borrowed (numbers as they are: call on [`Opts::rounded`] for `T`'s).
    fn parts(&self) -> OptionParts<'_, f64> {
        OptionParts {
            scale: self.scale,
            causal: self.causal,
            mask: self.mask.as_ref(),
            key_mask: self.key_mask.as_deref(),
            bias: self.bias.as_ref(),
            window: self.window,
            softcap: self.softcap,
            alibi: self.alibi,
            dropout: None,
        }
    }

    fn reference(&self) -> attention_reference::Options {
        self.parts().reference()
    }

    /// `diag(i)`: `i` for top-left causal, `i + n_kv − n_q` otherwise.
    fn diag(&self, i: usize, n_q: usize, n_kv: usize) -> i64 {
        diag(i, n_q, n_kv, self.top_left())
    }

    fn top_left(&self) -> bool {
        self.causal == Some(Causal::TopLeft)
    }

    /// Whether the causal mask lets query `i` see key `j`.
    fn causal_allows(&self, i: usize, j: usize, n_q: usize, n_kv: usize) -> bool {
        self.causal.is_none() || j as i64 <= self.diag(i, n_q, n_kv)
    }

    /// Whether the window lets query `i` see key `j`.
    fn window_allows(&self, i: usize, j: usize, n_q: usize, n_kv: usize) -> bool {
        self.window.is_none_or(|(left, right)| {
            let (d, j) = (self.diag(i, n_q, n_kv) as i128, j as i128);
            d - left as i128 <= j && j <= d + right as i128
        })
    }

    /// Whether `(i, j)` is allowed by position: mask, key mask, causal and window (the
    /// bias aside).
    fn positional(&self, i: usize, j: usize, n_q: usize, n_kv: usize) -> bool {
        self.mask.as_ref().is_none_or(|m| m[(i, j)])
            && self.key_mask.as_ref().is_none_or(|km| km[j])
            && self.causal_allows(i, j, n_q, n_kv)
            && self.window_allows(i, j, n_q, n_kv)
    }

    /// Whether `(i, j)` is allowed at all (also: bias not −∞).
    fn allowed(&self, i: usize, j: usize, n_q: usize, n_kv: usize) -> bool {
        self.positional(i, j, n_q, n_kv)
            && self
                .bias
                .as_ref()
                .is_none_or(|b| b[(i, j)] != f64::NEG_INFINITY)
    }

    /// `B_i` of the bound: per row, the largest finite |bias|, plus |ALiBi slope| times the
    /// largest |diag(i) − j|, plus the softcap.
    fn extra(&self, n_q: usize, n_kv: usize) -> Vec<f64> {
        extra(
            (n_q, n_kv),
            self.top_left(),
            self.bias.as_ref(),
            self.softcap,
            self.alibi,
        )
    }

    /// `Δ_i` of the bound for these options on `q`, `k` (already rounded to `T`).
    fn delta(&self, q: &DMatrix<f64>, k: &DMatrix<f64>, eps: f64) -> Vec<f64> {
        let scale = self.scale.unwrap_or(1.0 / (q.ncols() as f64).sqrt());
        score_error(q, k, scale, &self.extra(q.nrows(), k.nrows()), eps)
    }

    /// The mask with `keep` and-ed in (a new all-true mask if there was none).
    fn mask_and(
        &self,
        n_q: usize,
        n_kv: usize,
        keep: impl Fn(usize, usize) -> bool,
    ) -> DMatrix<bool> {
        DMatrix::from_fn(n_q, n_kv, |i, j| {
            self.mask.as_ref().is_none_or(|m| m[(i, j)]) && keep(i, j)
        })
    }

    /// The window as part of the mask.
    fn fold_window(&self, n_q: usize, n_kv: usize) -> Opts {
        if self.window.is_none() {
            return self.clone();
        }
        Opts {
            mask: Some(self.mask_and(n_q, n_kv, |i, j| self.window_allows(i, j, n_q, n_kv))),
            window: None,
            ..self.clone()
        }
    }

    /// ALiBi as part of the bias: `bias − m·|diag(i) − j|` (−∞ stays −∞).
    fn fold_alibi(&self, n_q: usize, n_kv: usize) -> Opts {
        let Some(m) = self.alibi else {
            return self.clone();
        };
        let bias = DMatrix::from_fn(n_q, n_kv, |i, j| {
            let b = self.bias.as_ref().map_or(0.0, |b| b[(i, j)]);
            let dist = (self.diag(i, n_q, n_kv) - j as i64).unsigned_abs() as f64;
            b - m * dist
        });
        Opts {
            bias: Some(bias),
            alibi: None,
            ..self.clone()
        }
    }

    /// Causal as part of the mask. Top-left causal also places the diagonal of the window
    /// and ALiBi, which without it is bottom-right, so those are folded first.
    fn fold_causal(&self, n_q: usize, n_kv: usize) -> Opts {
        let base = match self.causal {
            None => return self.clone(),
            Some(Causal::TopLeft) => self.fold_window(n_q, n_kv).fold_alibi(n_q, n_kv),
            Some(Causal::BottomRight) => self.clone(),
        };
        Opts {
            mask: Some(base.mask_and(n_q, n_kv, |i, j| base.causal_allows(i, j, n_q, n_kv))),
            causal: None,
            ..base
        }
    }

    /// The key mask as part of the mask.
    fn fold_key_mask(&self, n_q: usize, n_kv: usize) -> Opts {
        let Some(km) = &self.key_mask else {
            return self.clone();
        };
        Opts {
            mask: Some(self.mask_and(n_q, n_kv, |_, j| km[j])),
            key_mask: None,
            ..self.clone()
        }
    }

    /// Only options that do not depend on positions (mask, key mask, bias, scale, softcap):
    /// what blocks of keys can be given.
    fn positionless(&self, n_q: usize, n_kv: usize) -> Opts {
        self.fold_alibi(n_q, n_kv)
            .fold_window(n_q, n_kv)
            .fold_causal(n_q, n_kv)
    }
}

/// `opts` with numbers in `T`, owning the bias that core borrows.
struct Typed<T: Element> {
    o: Opts,
    bias: Option<DMatrix<T>>,
}

impl<T: Element> Typed<T> {
    fn new(o: &Opts) -> Self {
        let o = o.rounded::<T>();
        let bias = o.bias.as_ref().map(narrow);
        Typed { o, bias }
    }

    fn options(&self) -> AttentionOptions<'_, T> {
        let o = &self.o;
        OptionParts {
            scale: o.scale.map(T::from_f64_rounded),
            causal: o.causal,
            mask: o.mask.as_ref(),
            key_mask: o.key_mask.as_deref(),
            bias: self.bias.as_ref(),
            window: o.window,
            softcap: o.softcap.map(T::from_f64_rounded),
            alibi: o.alibi.map(T::from_f64_rounded),
            dropout: None,
        }
        .core()
    }
}

// ---------------------------------------------------------------------------------------
// Strategies.
// ---------------------------------------------------------------------------------------

/// A window side: small, up to past the sequence, or unbounded.
fn window_side() -> impl Strategy<Value = usize> {
    prop_oneof![
        0..=4usize,
        0..=MAX_N + 5,
        0..=*TILED_KV.end() + 5,
        Just(usize::MAX)
    ]
}

/// Random options for an `n_q × n_kv` problem; each is present about half the time. The
/// mask sometimes kills whole rows, the bias has some −∞ entries.
fn opts(n_q: usize, n_kv: usize) -> impl Strategy<Value = Opts> {
    let scale = prop_oneof![
        2 => Just(None),
        1 => Just(Some(0.0)),
        3 => (-2.0f64..2.0).prop_map(Some),
    ];
    let causal = prop_oneof![
        Just(None),
        Just(Some(Causal::TopLeft)),
        Just(Some(Causal::BottomRight)),
    ];
    let mask = prop::option::of(
        (
            prop::collection::vec(prop::bool::weighted(0.75), n_q * n_kv),
            prop::collection::vec(prop::bool::weighted(0.15), n_q),
        )
            .prop_map(move |(cells, dead)| {
                DMatrix::from_fn(n_q, n_kv, |i, j| cells[i * n_kv + j] && !dead[i])
            }),
    );
    let key_mask = prop::option::of(prop::collection::vec(prop::bool::weighted(0.8), n_kv));
    let bias = prop::option::of(magnitude().prop_flat_map(move |m| {
        (
            normal_matrix(n_q, n_kv, m),
            prop::collection::vec(prop::bool::weighted(0.1), n_q * n_kv),
        )
            .prop_map(|(mut b, neg)| {
                for (x, n) in b.iter_mut().zip(neg) {
                    if n {
                        *x = f64::NEG_INFINITY;
                    }
                }
                b
            })
    }));
    let window = prop::option::of((window_side(), window_side()));
    let softcap = prop::option::of(prop_oneof![0.1f64..2.0, 2.0f64..50.0]);
    let alibi = prop::option::of(-1.0f64..1.0);
    (scale, causal, mask, key_mask, bias, window, softcap, alibi).prop_map(
        |(scale, causal, mask, key_mask, bias, window, softcap, alibi)| Opts {
            scale,
            causal,
            mask,
            key_mask,
            bias,
            window,
            softcap,
            alibi,
        },
    )
}

fn cpu_path() -> impl Strategy<Value = CpuPath> {
    prop::sample::select(CpuPath::supported())
}

/// A problem (inputs not yet rounded), its options and the CPU path to run on.
#[derive(Clone, Debug)]
struct Input {
    p: Problem,
    o: Opts,
    path: CpuPath,
}

/// Half small problems (up to [`MAX_N`] queries and keys: the row path, the direct path,
/// one key tile), half tiled ones ([`TILED_Q`] × [`TILED_KV`]).
fn input() -> impl Strategy<Value = Input> {
    prop_oneof![problem(MAX_N, MAX_D), problem_in(TILED_Q, TILED_KV, MAX_D)].prop_flat_map(|p| {
        let (n_q, n_kv) = (p.q.nrows(), p.k.nrows());
        (Just(p), opts(n_q, n_kv), cpu_path()).prop_map(|(p, o, path)| Input { p, o, path })
    })
}

/// n_q up to [`MAX_N`] but n_kv up to [`MAX_LONG_KV`].
fn long_input() -> impl Strategy<Value = Input> {
    problem_sized(MAX_N, MAX_LONG_KV, MAX_D).prop_flat_map(|p| {
        let (n_q, n_kv) = (p.q.nrows(), p.k.nrows());
        (Just(p), opts(n_q, n_kv), cpu_path()).prop_map(|(p, o, path)| Input { p, o, path })
    })
}

// ---------------------------------------------------------------------------------------
// Helpers.
// ---------------------------------------------------------------------------------------

/// An input rounded to `T`: core's matrices and options, and the same numbers in f64.
struct Case<T: Element> {
    q: DMatrix<T>,
    k: DMatrix<T>,
    v: DMatrix<T>,
    /// `q`, `k`, `v` widened (exactly) to f64.
    wide: Problem,
    t: Typed<T>,
    path: CpuPath,
    eps: f64,
    n_q: usize,
    n_kv: usize,
}

impl<T: Element> Case<T> {
    fn new(input: &Input) -> Self {
        let wide = input.p.rounded::<T>();
        let (q, k, v) = wide.cast::<T>();
        let (n_q, n_kv) = (q.nrows(), k.nrows());
        Case {
            q,
            k,
            v,
            wide,
            t: Typed::new(&input.o),
            path: input.path,
            eps: T::EPSILON.to_f64(),
            n_q,
            n_kv,
        }
    }

    fn delta(&self) -> Vec<f64> {
        self.t.o.delta(&self.wide.q, &self.wide.k, self.eps)
    }

    /// Core's `(output, lse)` with options `o` (rounded to `T`), widened to f64.
    fn run(&self, o: &Typed<T>) -> (DMatrix<f64>, Vec<f64>) {
        let (out, lse) = scaled_dot_product_attention_with_lse(
            &self.q,
            &self.k,
            &self.v,
            &o.options().with_cpu_path(self.path),
        )
        .unwrap_or_else(|e| panic!("{}: {e}", type_name::<T>()));
        (widen(&out), lse_f64(&lse))
    }

    fn weights(&self, o: &Typed<T>) -> DMatrix<f64> {
        let w = attention_weights(
            &self.q,
            &self.k,
            &self.v,
            &o.options().with_cpu_path(self.path),
        )
        .unwrap_or_else(|e| panic!("{}: weights: {e}", type_name::<T>()));
        widen(&w)
    }

    fn reference(&self) -> attention_reference::Attention {
        attention_reference::attention(
            &self.wide.q,
            &self.wide.k,
            &self.wide.v,
            &self.t.o.reference(),
        )
    }

    fn label(&self, what: &str) -> String {
        format!("{} {what} ({:?})", type_name::<T>(), self.path)
    }

    /// `got` within the bound of `want`, fully masked rows (lse −∞ in `want`) exactly 0.
    fn assert_close(
        &self,
        got: &(DMatrix<f64>, Vec<f64>),
        want: (&DMatrix<f64>, &[f64]),
        delta: &[f64],
        what: &str,
    ) {
        let label = self.label(what);
        assert_output_close(&got.0, want.0, &self.wide.v, delta, self.eps, &label);
        assert_lse_close(&got.1, want.1, delta, self.n_kv, self.eps, &label);
        assert_fully_masked_rows(&got.0, None, &got.1, want.1, &label);
    }
}

fn type_name<T>() -> &'static str {
    std::any::type_name::<T>()
}

/// Exact equality (`==`, so −0 = +0) of two results.
fn assert_equal(a: &(DMatrix<f64>, Vec<f64>), b: &(DMatrix<f64>, Vec<f64>), label: &str) {
    assert_eq!(a.0.shape(), b.0.shape(), "{label}: shape");
    for i in 0..a.0.nrows() {
        for c in 0..a.0.ncols() {
            let (x, y) = (a.0[(i, c)], b.0[(i, c)]);
            assert!(x == y, "{label}: output[{i}, {c}] = {x} but {y}");
        }
    }
    assert_eq!(a.1.len(), b.1.len(), "{label}: lse length");
    for (i, (x, y)) in a.1.iter().zip(&b.1).enumerate() {
        assert!(x == y, "{label}: lse[{i}] = {x} but {y}");
    }
}

/// The final scores in f64 from the (rounded) inputs, as the options define them; −∞
/// where disallowed.
fn scores_f64(q: &DMatrix<f64>, k: &DMatrix<f64>, o: &Opts) -> DMatrix<f64> {
    let (n_q, n_kv) = (q.nrows(), k.nrows());
    let scale = o.scale.unwrap_or(1.0 / (q.ncols() as f64).sqrt());
    let rows = |m: &DMatrix<f64>, i: usize| m.row(i).iter().copied().collect::<Vec<f64>>();
    DMatrix::from_fn(n_q, n_kv, |i, j| {
        if !o.positional(i, j, n_q, n_kv) {
            return f64::NEG_INFINITY;
        }
        let mut s = scale * dot2(&rows(q, i), &rows(k, j));
        if let Some(c) = o.softcap {
            s = c * (s / c).tanh();
        }
        if let Some(m) = o.alibi {
            s -= m * (o.diag(i, n_q, n_kv) - j as i64).unsigned_abs() as f64;
        }
        if let Some(b) = &o.bias {
            s += b[(i, j)];
        }
        s
    })
}

// ---------------------------------------------------------------------------------------
// Properties (one generic body each).
// ---------------------------------------------------------------------------------------

/// Every combination of options agrees with the reference: output, lse, weights; the
/// three entry points agree with each other; nothing is NaN; fully masked rows are 0.
fn combination_matches_reference<T: Element>(input: &Input) {
    let c = Case::<T>::new(input);
    let delta = c.delta();
    let want = c.reference();
    let options = c.t.options().with_cpu_path(c.path);

    let (out, lse) = scaled_dot_product_attention_with_lse(&c.q, &c.k, &c.v, &options)
        .unwrap_or_else(|e| panic!("{}: {e}", c.label("with_lse")));
    let plain = scaled_dot_product_attention(&c.q, &c.k, &c.v, &options).unwrap();
    let mut into = nan_matrix::<T>(c.n_q, c.v.ncols());
    scaled_dot_product_attention_into(&c.q, &c.k, &c.v, &options, &mut into).unwrap();
    // The three forms run the same computation: same bits.
    for (idx, ((a, b), x)) in out.iter().zip(plain.iter()).zip(into.iter()).enumerate() {
        let bits = a.to_f64().to_bits();
        assert!(
            bits == b.to_f64().to_bits() && bits == x.to_f64().to_bits(),
            "{}: element {idx}: with_lse {a:?}, plain {b:?}, into {x:?}",
            c.label("entry points")
        );
    }

    let got = (widen(&out), lse_f64(&lse));
    assert!(
        got.0.iter().all(|x| x.is_finite()),
        "{}",
        c.label("NaN/inf output")
    );
    assert!(
        got.1.iter().all(|x| !x.is_nan() && *x != f64::INFINITY),
        "{}",
        c.label("NaN/+inf lse")
    );
    c.assert_close(&got, (&want.output, &want.lse), &delta, "vs reference");

    let w = c.weights(&c.t);
    assert!(w.iter().all(|x| x.is_finite()), "{}", c.label("weights"));
    assert_weights_close(&w, &want.weights, &delta, c.eps, &c.label("weights"));
    for i in 0..c.n_q {
        for j in 0..c.n_kv {
            if !c.t.o.allowed(i, j, c.n_q, c.n_kv) {
                assert_eq!(
                    w[(i, j)],
                    0.0,
                    "{}: weight ({i}, {j})",
                    c.label("disallowed")
                );
            }
        }
        let masked = (0..c.n_kv).all(|j| !c.t.o.allowed(i, j, c.n_q, c.n_kv));
        assert_eq!(
            got.1[i] == f64::NEG_INFINITY,
            masked,
            "{}: row {i}: lse −∞ exactly when no key is allowed",
            c.label("masked rows")
        );
    }
}

/// Causal, window, ALiBi and the key mask equal their explicit forms, alone and all at once.
fn options_equal_explicit_forms<T: Element>(input: &Input) {
    let c = Case::<T>::new(input);
    let delta = c.delta();
    let base = c.run(&c.t);
    let o = &c.t.o;
    let (n_q, n_kv) = (c.n_q, c.n_kv);
    let variants = [
        ("causal as mask", o.fold_causal(n_q, n_kv)),
        ("window as mask", o.fold_window(n_q, n_kv)),
        ("alibi as bias", o.fold_alibi(n_q, n_kv)),
        ("key mask as mask", o.fold_key_mask(n_q, n_kv)),
        (
            "all explicit",
            o.positionless(n_q, n_kv).fold_key_mask(n_q, n_kv),
        ),
    ];
    for (what, v) in variants {
        let got = c.run(&Typed::new(&v));
        c.assert_close(&got, (&base.0, &base.1), &delta, what);
    }
}

/// `weights·V` is the output and `exp(s − lse)` the weights, `s` from the inputs in f64.
fn weights_consistent_with_output_and_lse<T: Element>(input: &Input) {
    let c = Case::<T>::new(input);
    let delta = c.delta();
    let (out, lse) = c.run(&c.t);
    let w = c.weights(&c.t);

    // Σ_j w_ij v_jc, compensated, in f64.
    let cols: Vec<Vec<f64>> = (0..c.wide.v.ncols())
        .map(|col| c.wide.v.column(col).iter().copied().collect())
        .collect();
    let wv = DMatrix::from_fn(c.n_q, cols.len(), |i, col| {
        let row: Vec<f64> = w.row(i).iter().copied().collect();
        dot2(&row, &cols[col])
    });
    assert_output_close(&wv, &out, &c.wide.v, &delta, c.eps, &c.label("weights·V"));

    let s = scores_f64(&c.wide.q, &c.wide.k, &c.t.o);
    let from_lse = DMatrix::from_fn(c.n_q, c.n_kv, |i, j| {
        if lse[i] == f64::NEG_INFINITY {
            0.0
        } else {
            (s[(i, j)] - lse[i]).exp()
        }
    });
    assert_weights_close(&w, &from_lse, &delta, c.eps, &c.label("exp(s − lse)"));
}

/// Attention over contiguous blocks of keys, merged, equals attention over all keys.
fn blocks_merge_to_full<T: Element>(input: &Input, cuts: &[usize]) {
    let c = Case::<T>::new(input);
    let delta = c.delta();
    let full = c.run(&c.t);

    // Positions shift inside a block: causal, window and ALiBi become mask and bias.
    let t = Typed::<T>::new(&c.t.o.positionless(c.n_q, c.n_kv));
    let mut bounds: Vec<usize> = cuts.iter().map(|&x| x.min(c.n_kv)).collect();
    bounds.push(0);
    bounds.push(c.n_kv);
    bounds.sort_unstable();

    let mut parts: Vec<(DMatrix<T>, DVector<T>)> = Vec::new();
    for w in bounds.windows(2) {
        let (a, len) = (w[0], w[1] - w[0]);
        let mask = t.o.mask.as_ref().map(|m| m.columns(a, len));
        let bias = t.bias.as_ref().map(|b| b.columns(a, len));
        let mut o = AttentionOptions::new().with_cpu_path(c.path);
        if let Some(s) = t.o.scale {
            o = o.with_scale(T::from_f64_rounded(s));
        }
        if let Some(cap) = t.o.softcap {
            o = o.with_softcap(T::from_f64_rounded(cap));
        }
        if let Some(m) = &mask {
            o = o.with_mask(m);
        }
        if let Some(km) = &t.o.key_mask {
            o = o.with_key_mask(&km[a..a + len]);
        }
        if let Some(b) = &bias {
            o = o.with_bias(b);
        }
        let part =
            scaled_dot_product_attention_with_lse(&c.q, &c.k.rows(a, len), &c.v.rows(a, len), &o)
                .unwrap_or_else(|e| panic!("{}: {e}", c.label("block")));
        parts.push(part);
    }
    let (out, lse) = merge_partial_attention(parts.iter().map(|(o, l)| (o, l.as_slice())))
        .unwrap_or_else(|e| panic!("{}: {e}", c.label("merge")));
    let merged = (widen(&out), lse_f64(&lse));
    c.assert_close(
        &merged,
        (&full.0, &full.1),
        &delta,
        &format!("merge of {bounds:?}"),
    );
}

/// Keys no query may see (their K rows) and the bias at positions masked otherwise can be
/// anything (here ±1e30), and their V rows anything within the largest |V|: the result
/// does not change at all. (Outputs are clamped to ±max|V| over all keys, the documented
/// bound of `row_output`; a hidden value larger than every other would move that bound,
/// which can change an output that rounding had pushed onto it by one ulp.)
fn disallowed_positions_change_nothing<T: Element>(input: &Input, signs: &[bool]) {
    let c = Case::<T>::new(input);
    let (n_q, n_kv) = (c.n_q, c.n_kv);
    let o = &c.t.o;
    let base = c.run(&c.t);
    let base_w = c.weights(&c.t);

    let sign = |idx: usize| {
        let s = if signs[idx % signs.len().max(1)] {
            1e30
        } else {
            -1e30
        };
        T::from_f64_rounded(s)
    };
    let hidden: Vec<usize> = (0..n_kv)
        .filter(|&j| (0..n_q).all(|i| !o.allowed(i, j, n_q, n_kv)))
        .collect();
    let (mut k, mut v) = (c.k.clone(), c.v.clone());
    let v_max = v.iter().fold(T::zero(), |m, x| m.max(x.abs()));
    for &j in &hidden {
        for p in 0..k.ncols() {
            k[(j, p)] = sign(j * 7 + p);
        }
        for p in 0..v.ncols() {
            v[(j, p)] = if sign(j * 11 + p + 3) > T::zero() {
                v_max
            } else {
                -v_max
            };
        }
    }
    let mut t = Typed::<T>::new(o);
    if let Some(b) = &mut t.bias {
        for i in 0..n_q {
            for j in 0..n_kv {
                if !o.positional(i, j, n_q, n_kv) {
                    b[(i, j)] = sign(i * 13 + j);
                }
            }
        }
    }
    let options = t.options().with_cpu_path(c.path);
    let (out, lse) = scaled_dot_product_attention_with_lse(&c.q, &k, &v, &options)
        .unwrap_or_else(|e| panic!("{}: {e}", c.label("changed")));
    let changed = (widen(&out), lse_f64(&lse));
    assert_equal(
        &changed,
        &base,
        &c.label(&format!("keys {hidden:?} set to ±1e30")),
    );
    let w = widen(&attention_weights(&c.q, &k, &v, &options).unwrap());
    for (idx, (a, b)) in w.iter().zip(base_w.iter()).enumerate() {
        assert!(
            a == b,
            "{}: weight {idx}: {a} vs {b}",
            c.label("changed weights")
        );
    }
}

/// Top-left causal self-attention: rows `0..=i` do not depend on tokens after `i` (bit
/// for bit), and equal attention over the first `i + 1` tokens alone (within the bound).
fn causal_rows_ignore_later_tokens<T: Element>(input: &CausalInput) {
    let c = Case::<T>::new(&input.input);
    let n = c.n_q;
    let i = input.row.min(n - 1);
    let base = c.run(&c.t);

    let later = input.later.rounded::<T>();
    let (lq, lk, lv) = later.cast::<T>();
    let (mut q, mut k, mut v) = (c.q.clone(), c.k.clone(), c.v.clone());
    for r in i + 1..n {
        q.set_row(r, &lq.row(r));
        k.set_row(r, &lk.row(r));
        v.set_row(r, &lv.row(r));
    }
    let (out, lse) =
        scaled_dot_product_attention_with_lse(&q, &k, &v, &c.t.options().with_cpu_path(c.path))
            .unwrap();
    let prefix =
        |(o, l): &(DMatrix<f64>, Vec<f64>)| (o.rows(0, i + 1).into_owned(), l[..=i].to_vec());
    let changed = (widen(&out), lse_f64(&lse));
    assert_equal(
        &prefix(&changed),
        &prefix(&base),
        &c.label(&format!("rows 0..={i}")),
    );

    // Incremental decoding: the first i + 1 tokens alone give the same rows.
    let m = i + 1;
    let cut = |o: &Opts| Opts {
        mask: o.mask.as_ref().map(|x| x.view((0, 0), (m, m)).into_owned()),
        key_mask: o.key_mask.as_ref().map(|x| x[..m].to_vec()),
        bias: o.bias.as_ref().map(|x| x.view((0, 0), (m, m)).into_owned()),
        ..o.clone()
    };
    let short = Typed::<T>::new(&cut(&c.t.o));
    let (out, lse) = scaled_dot_product_attention_with_lse(
        &c.q.rows(0, m),
        &c.k.rows(0, m),
        &c.v.rows(0, m),
        &short.options().with_cpu_path(c.path),
    )
    .unwrap();
    let delta = short.o.delta(
        &c.wide.q.rows(0, m).into_owned(),
        &c.wide.k.rows(0, m).into_owned(),
        c.eps,
    );
    let label = c.label(&format!("first {m} tokens"));
    let (want_out, want_lse) = prefix(&base);
    let v_short = c.wide.v.rows(0, m).into_owned();
    assert_output_close(&widen(&out), &want_out, &v_short, &delta, c.eps, &label);
    assert_lse_close(&lse_f64(&lse), &want_lse, &delta, m, c.eps, &label);
}

/// Extreme but finite inputs (tiny or huge Q, K, V, bias) never give NaN: the result is
/// finite, fully masked rows are exactly 0 with lse −∞, and the reference agrees.
fn finite_inputs_never_nan<T: Element>(input: &Input, factors: &(f64, f64, f64, f64)) {
    let (fq, fk, fv, fb) = *factors;
    let p = Problem {
        q: &input.p.q * fq,
        k: &input.p.k * fk,
        v: &input.p.v * fv,
    };
    let mut o = input.o.clone();
    o.bias = o.bias.map(|b| b.map(|x| x * fb));
    let c = Case::<T>::new(&Input {
        p,
        o,
        path: input.path,
    });
    let (out, lse) = scaled_dot_product_attention_with_lse(
        &c.q,
        &c.k,
        &c.v,
        &c.t.options().with_cpu_path(c.path),
    )
    .unwrap_or_else(|e| panic!("{}: {e}", c.label("extreme")));
    let w = c.weights(&c.t);
    let got = (widen(&out), lse_f64(&lse));
    assert!(
        got.0.iter().all(|x| x.is_finite()),
        "{}",
        c.label("output not finite")
    );
    assert!(
        w.iter().all(|x| x.is_finite()),
        "{}",
        c.label("weights not finite")
    );
    for i in 0..c.n_q {
        let masked = (0..c.n_kv).all(|j| !c.t.o.allowed(i, j, c.n_q, c.n_kv));
        if masked {
            assert_eq!(got.1[i], f64::NEG_INFINITY, "{}: row {i}", c.label("lse"));
            assert!(
                got.0.row(i).iter().all(|&x| x == 0.0),
                "{}: row {i}",
                c.label("masked")
            );
            assert!(
                w.row(i).iter().all(|&x| x == 0.0),
                "{}: row {i}",
                c.label("masked w")
            );
        } else {
            assert!(
                got.1[i].is_finite(),
                "{}: lse[{i}] = {}",
                c.label("lse"),
                got.1[i]
            );
        }
    }
    let want = c.reference();
    c.assert_close(
        &got,
        (&want.output, &want.lse),
        &c.delta(),
        "extreme vs reference",
    );
}

// ---------------------------------------------------------------------------------------
// Errors.
// ---------------------------------------------------------------------------------------

/// One invalid option, injected into otherwise valid random options.
#[derive(Clone, Debug)]
enum Fault {
    MaskRows(usize),
    MaskColumns(usize),
    KeyMaskLen(usize),
    BiasRows(usize),
    BiasColumns(usize),
    /// NaN (`false`) or +∞ (`true`) at `(row, column)`.
    BiasValue(usize, usize, bool),
    Softcap(f64),
    Alibi(f64),
    Scale(f64),
}

/// A size other than `n`.
fn wrong(n: usize) -> impl Strategy<Value = usize> {
    (0..=n + 3).prop_filter("a wrong size", move |&x| x != n)
}

fn fault(n_q: usize, n_kv: usize) -> impl Strategy<Value = Fault> {
    let non_finite = || prop::sample::select(vec![f64::NAN, f64::INFINITY, f64::NEG_INFINITY]);
    let mut faults: Vec<BoxedStrategy<Fault>> = vec![
        wrong(n_q).prop_map(Fault::MaskRows).boxed(),
        wrong(n_kv).prop_map(Fault::MaskColumns).boxed(),
        wrong(n_kv).prop_map(Fault::KeyMaskLen).boxed(),
        wrong(n_q).prop_map(Fault::BiasRows).boxed(),
        wrong(n_kv).prop_map(Fault::BiasColumns).boxed(),
        prop_oneof![
            Just(0.0),
            Just(-0.0),
            -50.0f64..0.0,
            Just(f64::NAN),
            Just(f64::INFINITY),
            Just(f64::NEG_INFINITY),
        ]
        .prop_map(Fault::Softcap)
        .boxed(),
        non_finite().prop_map(Fault::Alibi).boxed(),
        non_finite().prop_map(Fault::Scale).boxed(),
    ];
    if n_q > 0 && n_kv > 0 {
        faults.push(
            (0..n_q, 0..n_kv, any::<bool>())
                .prop_map(|(r, c, inf)| Fault::BiasValue(r, c, inf))
                .boxed(),
        );
    }
    prop::strategy::Union::new(faults)
}

/// Bits equal, or both NaN.
fn same_value(a: f64, b: f64) -> bool {
    a.to_bits() == b.to_bits() || (a.is_nan() && b.is_nan())
}

/// Every entry point returns the documented error for an invalid option.
fn invalid_option_is_reported<T: Element>(input: &Input, fault: &Fault) {
    let c = Case::<T>::new(input);
    let (n_q, n_kv) = (c.n_q, c.n_kv);
    let mut t = Typed::<T>::new(&input.o);
    let bad_value = |x: f64| T::from_f64_rounded(x);
    let mut bad_mask = None;
    let mut bad_key_mask = None;
    match *fault {
        Fault::MaskRows(r) => bad_mask = Some(DMatrix::from_element(r, n_kv, true)),
        Fault::MaskColumns(k) => bad_mask = Some(DMatrix::from_element(n_q, k, true)),
        Fault::KeyMaskLen(l) => bad_key_mask = Some(vec![true; l]),
        Fault::BiasRows(r) => t.bias = Some(DMatrix::zeros(r, n_kv)),
        Fault::BiasColumns(k) => t.bias = Some(DMatrix::zeros(n_q, k)),
        Fault::BiasValue(r, k, inf) => {
            let mut b = t.bias.take().unwrap_or_else(|| DMatrix::zeros(n_q, n_kv));
            // Other entries stay finite or −∞, so this is the first invalid one.
            b[(r, k)] = bad_value(if inf { f64::INFINITY } else { f64::NAN });
            t.bias = Some(b);
        }
        Fault::Softcap(_) | Fault::Alibi(_) | Fault::Scale(_) => {}
    }
    let mut options = t.options().with_cpu_path(c.path);
    if let Some(m) = &bad_mask {
        options = options.with_mask(m);
    }
    if let Some(km) = &bad_key_mask {
        options = options.with_key_mask(km);
    }
    match *fault {
        Fault::Softcap(x) => options = options.with_softcap(bad_value(x)),
        Fault::Alibi(x) => options = options.with_alibi_slope(bad_value(x)),
        Fault::Scale(x) => options = options.with_scale(bad_value(x)),
        _ => {}
    }

    let mut into = nan_matrix::<T>(n_q, c.v.ncols());
    let errors = [
        scaled_dot_product_attention(&c.q, &c.k, &c.v, &options).err(),
        scaled_dot_product_attention_with_lse(&c.q, &c.k, &c.v, &options).err(),
        scaled_dot_product_attention_into(&c.q, &c.k, &c.v, &options, &mut into).err(),
        attention_weights(&c.q, &c.k, &c.v, &options).err(),
    ];
    let label = c.label(&format!("{fault:?}"));
    for (entry, err) in ["sdpa", "with_lse", "into", "weights"].iter().zip(errors) {
        let err = err.unwrap_or_else(|| panic!("{label}: {entry} accepted it"));
        let dims = |operand: Operand, axis: Axis, found: usize, against: Operand| {
            let expected = if against == Operand::Query { n_q } else { n_kv };
            let AttentionError::DimensionMismatch {
                operand: o,
                axis: a,
                found: f,
                expected: e,
                against: g,
                ..
            } = err
            else {
                return false;
            };
            // The message starts with the operand's name ("mask has 3 rows but …").
            (o, a, f, e, g) == (operand, axis, found, expected, against)
                && err
                    .to_string()
                    .starts_with(&format!("{operand} has {found} {axis}"))
        };
        let value_is = |want: f64| match err {
            AttentionError::InvalidSoftcap { value }
            | AttentionError::InvalidAlibiSlope { value }
            | AttentionError::InvalidScale { value } => same_value(value, bad_value(want).to_f64()),
            _ => false,
        };
        let ok = match *fault {
            Fault::MaskRows(r) => dims(Operand::Mask, Axis::Rows, r, Operand::Query),
            Fault::MaskColumns(k) => dims(Operand::Mask, Axis::Columns, k, Operand::Key),
            Fault::KeyMaskLen(l) => dims(Operand::KeyMask, Axis::Entries, l, Operand::Key),
            Fault::BiasRows(r) => dims(Operand::Bias, Axis::Rows, r, Operand::Query),
            Fault::BiasColumns(k) => dims(Operand::Bias, Axis::Columns, k, Operand::Key),
            Fault::BiasValue(r, k, inf) => {
                let want = if inf { f64::INFINITY } else { f64::NAN };
                let at = matches!(
                    err,
                    AttentionError::NonFinite { operand: Operand::Bias, row, column, .. }
                        if row == r && column == k
                );
                let value = matches!(
                    err,
                    AttentionError::NonFinite { value, .. } if same_value(value, want)
                );
                at && value && err.to_string().starts_with(&format!("bias[{r}, {k}]"))
            }
            Fault::Softcap(x) => {
                matches!(err, AttentionError::InvalidSoftcap { .. }) && value_is(x)
            }
            Fault::Alibi(x) => {
                matches!(err, AttentionError::InvalidAlibiSlope { .. }) && value_is(x)
            }
            Fault::Scale(x) => matches!(err, AttentionError::InvalidScale { .. }) && value_is(x),
        };
        assert!(ok, "{label}: {entry} returned {err:?} ({err})");
    }
}

/// A score that overflows at a position no option lets the query see is no error: each
/// way of hiding the key (mask, key mask, −∞ bias, causal, window) ignores it, and the
/// one allowed key gets weight 1. Unhidden, it is [`AttentionError::ScoreOverflow`].
fn overflow_at_hidden_position_is_ignored<T: Element>() {
    // q·k_h = big² overflows T; q·k_other = big does not.
    let big = T::MAX.sqrt() * T::from_f64_rounded(2.0);
    let one = T::one();
    let column = |x: [T; 2]| DMatrix::from_row_slice(2, 1, &x);
    let q = DMatrix::from_row_slice(1, 1, &[big]);
    let v = column([T::from_f64_rounded(5.0), T::from_f64_rounded(7.0)]);
    let mask = DMatrix::from_row_slice(1, 2, &[true, false]);
    let bias = DMatrix::from_row_slice(1, 2, &[T::zero(), T::NEG_INFINITY]);
    let key_mask = [true, false];
    let base = || AttentionOptions::<T>::new().with_scale(one);
    // (hidden key, options hiding it); n_q = 1, n_kv = 2, so the bottom-right diagonal is 1.
    let cases = [
        (1, "mask", base().with_mask(&mask)),
        (1, "key mask", base().with_key_mask(&key_mask)),
        (1, "-inf bias", base().with_bias(&bias)),
        (1, "causal", base().with_causal(Causal::TopLeft)),
        (0, "window", base().with_window(0, 0)),
    ];
    for (hidden, what, options) in cases {
        let seen = 1 - hidden;
        let k = if hidden == 1 {
            column([one, big])
        } else {
            column([big, one])
        };
        let label = format!("{} {what}", type_name::<T>());
        let (out, lse) = scaled_dot_product_attention_with_lse(&q, &k, &v, &options)
            .unwrap_or_else(|e| panic!("{label}: {e}"));
        assert_eq!(out[(0, 0)], v[(seen, 0)], "{label}: output");
        assert_eq!(lse[0], big, "{label}: lse");
        let w = attention_weights(&q, &k, &v, &options).unwrap_or_else(|e| panic!("{label}: {e}"));
        assert_eq!(
            (w[(0, seen)], w[(0, hidden)]),
            (one, T::zero()),
            "{label}: weights"
        );

        let err = scaled_dot_product_attention(&q, &k, &v, &base()).unwrap_err();
        assert_eq!(
            err,
            AttentionError::ScoreOverflow {
                query: 0,
                key: hidden
            },
            "{label}: unhidden"
        );
    }
}

#[test]
fn overflow_at_hidden_position_is_ignored_f32() {
    overflow_at_hidden_position_is_ignored::<f32>();
}

#[test]
fn overflow_at_hidden_position_is_ignored_f64() {
    overflow_at_hidden_position_is_ignored::<f64>();
}

// ---------------------------------------------------------------------------------------
// Inputs of the special properties.
// ---------------------------------------------------------------------------------------

/// Cut points for 1..=5 blocks of keys (sorted by the body; blocks may be empty).
fn with_cuts(inputs: impl Strategy<Value = Input>) -> impl Strategy<Value = (Input, Vec<usize>)> {
    inputs.prop_flat_map(|input| {
        let n_kv = input.p.k.nrows();
        (Just(input), prop::collection::vec(0..=n_kv, 0..=4))
    })
}

/// Signs of the ±1e30 values written at disallowed positions.
fn with_signs() -> impl Strategy<Value = (Input, Vec<bool>)> {
    (input(), prop::collection::vec(any::<bool>(), 1..=16))
}

/// A self-attention problem (n_q = n_kv) with top-left causal options, replacement tokens
/// for the rows after `row`, and `row`.
#[derive(Clone, Debug)]
struct CausalInput {
    input: Input,
    later: Problem,
    row: usize,
}

fn causal_input() -> impl Strategy<Value = CausalInput> {
    (
        1..=MAX_N,
        1..=MAX_D,
        1..=MAX_D,
        magnitude(),
        magnitude(),
        magnitude(),
    )
        .prop_flat_map(|(n, d_k, d_v, sq, sk, sv)| {
            let tokens = move || problem_of((n, n, d_k, d_v), (sq, sk, sv));
            (tokens(), tokens(), opts(n, n), cpu_path(), 0..n)
        })
        .prop_map(|(p, later, mut o, path, row)| {
            o.causal = Some(Causal::TopLeft);
            CausalInput {
                input: Input { p, o, path },
                later,
                row,
            }
        })
}

/// Factors for Q, K, V and the bias, from tiny to huge (all results stay representable
/// in f32: |scale·q·k| ≲ 1e20, |v| ≤ 1e30).
fn extreme() -> impl Strategy<Value = (Input, (f64, f64, f64, f64))> {
    let f = || prop::sample::select(vec![1e-20, 1e-3, 1.0, 1e3, 1e8]);
    (
        input(),
        (
            f(),
            f(),
            prop::sample::select(vec![1e-30, 1.0, 1e28]),
            prop::sample::select(vec![1e-30, 1.0, 1e28]),
        ),
    )
}

fn error_input() -> impl Strategy<Value = (Input, Fault)> {
    input().prop_flat_map(|input| {
        let (n_q, n_kv) = (input.p.q.nrows(), input.p.k.nrows());
        (Just(input), fault(n_q, n_kv))
    })
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn combination_matches_reference_f32(input in input()) {
        combination_matches_reference::<f32>(&input);
    }
    #[test]
    fn combination_matches_reference_f64(input in input()) {
        combination_matches_reference::<f64>(&input);
    }

    #[test]
    fn options_equal_explicit_forms_f32(input in input()) {
        options_equal_explicit_forms::<f32>(&input);
    }
    #[test]
    fn options_equal_explicit_forms_f64(input in input()) {
        options_equal_explicit_forms::<f64>(&input);
    }

    #[test]
    fn weights_consistent_f32(input in input()) {
        weights_consistent_with_output_and_lse::<f32>(&input);
    }
    #[test]
    fn weights_consistent_f64(input in input()) {
        weights_consistent_with_output_and_lse::<f64>(&input);
    }

    #[test]
    fn blocks_merge_to_full_f32((input, cuts) in with_cuts(input())) {
        blocks_merge_to_full::<f32>(&input, &cuts);
    }
    #[test]
    fn blocks_merge_to_full_f64((input, cuts) in with_cuts(input())) {
        blocks_merge_to_full::<f64>(&input, &cuts);
    }

    #[test]
    fn disallowed_positions_change_nothing_f32((input, signs) in with_signs()) {
        disallowed_positions_change_nothing::<f32>(&input, &signs);
    }
    #[test]
    fn disallowed_positions_change_nothing_f64((input, signs) in with_signs()) {
        disallowed_positions_change_nothing::<f64>(&input, &signs);
    }

    #[test]
    fn causal_rows_ignore_later_tokens_f32(input in causal_input()) {
        causal_rows_ignore_later_tokens::<f32>(&input);
    }
    #[test]
    fn causal_rows_ignore_later_tokens_f64(input in causal_input()) {
        causal_rows_ignore_later_tokens::<f64>(&input);
    }

    #[test]
    fn finite_inputs_never_nan_f32((input, factors) in extreme()) {
        finite_inputs_never_nan::<f32>(&input, &factors);
    }
    #[test]
    fn finite_inputs_never_nan_f64((input, factors) in extreme()) {
        finite_inputs_never_nan::<f64>(&input, &factors);
    }

}

proptest! {
    #![proptest_config(long_config())]

    #[test]
    fn long_keys_match_reference_f32(input in long_input()) {
        combination_matches_reference::<f32>(&input);
    }
    #[test]
    fn long_keys_match_reference_f64(input in long_input()) {
        combination_matches_reference::<f64>(&input);
    }

    #[test]
    fn long_keys_merge_to_full_f32((input, cuts) in with_cuts(long_input())) {
        blocks_merge_to_full::<f32>(&input, &cuts);
    }
    #[test]
    fn long_keys_merge_to_full_f64((input, cuts) in with_cuts(long_input())) {
        blocks_merge_to_full::<f64>(&input, &cuts);
    }
}

proptest! {
    #![proptest_config(error_config())]

    #[test]
    fn invalid_option_is_reported_f32((input, fault) in error_input()) {
        invalid_option_is_reported::<f32>(&input, &fault);
    }
    #[test]
    fn invalid_option_is_reported_f64((input, fault) in error_input()) {
        invalid_option_is_reported::<f64>(&input, &fault);
    }
}

/// A bias large enough (≥ 2^18 entries) that validation scans it in column blocks over the
/// threads: a NaN or +∞ anywhere is reported at its position (the first in column-major
/// order), and the range that decides the careful path is the whole bias's, whether the
/// scan ran on one thread or several.
#[test]
fn large_bias_scanned_in_blocks() {
    use attention_core::{KernelRun, Parallelism, last_kernel_run};
    let (n_q, n_kv, d) = (520, 530, 4);
    let q = DMatrix::<f32>::from_fn(n_q, d, |i, p| ((i * 3 + p) % 7) as f32 * 0.1);
    let k = DMatrix::<f32>::from_fn(n_kv, d, |j, p| ((j + 2 * p) % 5) as f32 * 0.1);
    let bias0 = DMatrix::<f32>::from_fn(n_q, n_kv, |i, j| ((i * 7 + j) % 11) as f32 - 5.0);
    for par in [Parallelism::Sequential, Parallelism::Rayon] {
        for (bad, at, first) in [
            (f32::NAN, vec![(519, 529), (3, 400)], (3, 400)),
            (f32::INFINITY, vec![(0, 529), (519, 0)], (519, 0)),
            (f32::NAN, vec![(260, 265)], (260, 265)),
        ] {
            let mut bias = bias0.clone();
            for &e in &at {
                bias[e] = bad;
            }
            let o = AttentionOptions::new()
                .with_bias(&bias)
                .with_parallelism(par);
            let Err(err) = scaled_dot_product_attention(&q, &k, &k, &o) else {
                panic!("{par:?} {at:?}: a bias with {bad} accepted");
            };
            assert!(
                matches!(err, AttentionError::NonFinite { operand: Operand::Bias, row, column, .. }
                    if (row, column) == first),
                "{par:?} {at:?}: {err}"
            );
        }
        // −∞ masks; a huge entry in the last column block sends the call to the careful
        // path, as a small one does not.
        let mut bias = bias0.clone();
        bias[(10, 2)] = f32::NEG_INFINITY;
        let o = AttentionOptions::new()
            .with_bias(&bias)
            .with_parallelism(par);
        scaled_dot_product_attention(&q, &k, &k, &o).unwrap();
        assert_ne!(last_kernel_run(), Some(KernelRun::Careful), "{par:?}");
        bias[(500, 529)] = 3e38;
        let o = AttentionOptions::new()
            .with_bias(&bias)
            .with_parallelism(par);
        scaled_dot_product_attention(&q, &k, &k, &o).unwrap();
        assert_eq!(last_kernel_run(), Some(KernelRun::Careful), "{par:?}");
    }
}
