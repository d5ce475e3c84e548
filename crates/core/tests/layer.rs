//! The attention layer ([`MultiHeadAttention`]): the 15 golden layers (PyTorch f64) on
//! every CPU path, the reference layer against the same numbers, f32 against the
//! reference, properties on random layers (GQA/MQA, d_v ≠ d_head, biases, RoPE with both
//! pairings and partial rotary dimensions, packed batches, causal, key masks,
//! cross-attention), decoding through a KV cache (`forward_cached` in chunks = causal
//! `forward`, with and without a sliding window), and every construction and call error
//! (a rejected `forward_cached` leaves the cache bitwise unchanged).
//!
//! # The error bound of a layer
//! With `u = T::EPSILON` (counted as one rounding's worth per operation, as in
//! `common/mod.rs`), X and the weights exact in `T`, and `|M|` the entrywise absolute
//! value. Each step's first-order error, per row `i` and head `h` (head maxima `max_h` are
//! over the head's columns):
//!
//! 1. **Projections** `Q = X·W_q + b_q` (likewise K, V): a length-`d_model` dot product
//!    plus a bias, `|ΔQ| ≤ E_Q := (d_model + 1)·u·(|X|·|W_q| + |b_q|)` (Higham §3.1).
//!    Let `e_Q[i,h] = max_h E_Q`, `m_Q[i,h] = max_h |Q|` (K, V alike).
//! 2. **RoPE** (if applied): a rotation maps an error pair `(Δa, Δb)` to one of entries
//!    `≤ |Δa| + |Δb|` and adds its own `1.5·u·ρ` (`tests/rope.rs`), `ρ ≤ |a| + |b|`; so
//!    `e ← 2e + 3u·m`, and `m ← 2m` bounds the rotated entries.
//! 3. **Scores** `s_ij = scale·q_i·k_j` (head width `d_head`; `M_K`, `E_K`, `M_V`, `E_V`
//!    the maxima of `m_K`, `e_K`, `m_V`, `e_V` over the sequence's keys of the K/V head):
//!    the input errors move a score by at most `scale·d_head·(e_Q·M_K + m_Q·E_K)`, the
//!    kernel's own rounding by `Δ = (d_head + 4)·u·scale·d_head·m_Q·M_K` (common's Δ with
//!    `A ≤ d_head·m_Q·M_K`): together `D[i,h]`.
//! 4. **Softmax·V**: scores off by `≤ D` move the output by `≤ 2D·M_V`; the kernel's sums
//!    add `S·M_V` (common's `sum_error(n_kv)`); errors of V move a convex combination by
//!    `≤ E_V`: `|ΔA[i,c]| ≤ (2D + S)·M_V + E_V`, and `|A[i,c]| ≤ M_V`.
//! 5. **Output** `y = A·W_o + b_o`: `|Δy[i,r]| ≤ Σ_c |ΔA[i,c]|·|W_o[c,r]| +
//!    (h_q·d_v + 1)·u·(Σ_c M_V(c)·|W_o[c,r]| + |b_o[r]|)`.
//!
//! The tests allow `SECOND_ORDER` (2) times this, as everywhere in the suite. Against
//! PyTorch's f64 numbers, which carry an error of the same form, twice that again. The
//! reference's own error is a few `u₆₄` and is not counted against f32.
//!
//! The golden cases must also meet the issue's criterion: `|y − golden| ≤ 1e-12·Y` with
//! `Y = max_{i,r} Σ_c M_V(c)·|W_o[c,r]| + |b_o[r]|`, the magnitude the output is formed at
//! (the layer's analogue of `max|V|`). For these sizes the worst-case bound above is a
//! few 1e-12·Y; the actual errors are far below both (printed by the test).

mod common;

use attention_core::{
    AttentionError, AttentionOptions, Axis, Causal, CpuPath, Element, KvCache, MatRef,
    MultiHeadAttention, Operand, Rope, RopeConvention, SeqId,
};
use attention_reference as reference;
use attention_testdata::{CausalAlign, LayerCase, layer_cases};
use common::{SECOND_ORDER, narrow, normal_matrix, sum_error, widen};
use nalgebra::{DMatrix, DMatrixView, DVector, Dyn};
use proptest::prelude::*;

// ---------------------------------------------------------------- the layer, both ways

/// A layer in f64 (every number exact in the `T` a test runs in), for core and reference.
#[derive(Clone, Debug)]
struct Weights {
    heads_q: usize,
    heads_kv: usize,
    w_q: DMatrix<f64>,
    w_k: DMatrix<f64>,
    w_v: DMatrix<f64>,
    w_o: DMatrix<f64>,
    /// b_q, b_k, b_v, b_o.
    biases: [Option<Vec<f64>>; 4],
    rope: Option<Rope>,
}

impl Weights {
    fn of_case(c: &LayerCase) -> Weights {
        Weights {
            heads_q: c.h_q,
            heads_kv: c.h_kv,
            w_q: c.w_q.clone(),
            w_k: c.w_k.clone(),
            w_v: c.w_v.clone(),
            w_o: c.w_o.clone(),
            biases: [c.b_q.clone(), c.b_k.clone(), c.b_v.clone(), c.b_o.clone()],
            rope: None,
        }
    }

    /// Every number rounded to `T` (and widened back), so core and reference read the same.
    fn rounded<T: Element>(&self) -> Weights {
        let r = |m: &DMatrix<f64>| widen(&narrow::<T>(m));
        let rv = |b: &Option<Vec<f64>>| {
            b.as_ref()
                .map(|b| b.iter().map(|&x| T::from_f64_rounded(x).to_f64()).collect())
        };
        Weights {
            w_q: r(&self.w_q),
            w_k: r(&self.w_k),
            w_v: r(&self.w_v),
            w_o: r(&self.w_o),
            biases: [0, 1, 2, 3].map(|i| rv(&self.biases[i])),
            ..self.clone()
        }
    }

    fn core<T: Element>(&self) -> MultiHeadAttention<T> {
        let b = |i: usize| {
            self.biases[i]
                .as_ref()
                .map(|b| DVector::from_iterator(b.len(), b.iter().map(|&x| T::from_f64_rounded(x))))
        };
        let layer = MultiHeadAttention::new(
            self.heads_q,
            self.heads_kv,
            narrow(&self.w_q),
            narrow(&self.w_k),
            narrow(&self.w_v),
            narrow(&self.w_o),
        )
        .and_then(|l| l.with_biases(b(0), b(1), b(2), b(3)))
        .expect("a valid layer");
        match self.rope {
            Some(rope) => layer.with_rope(rope).expect("a valid RoPE"),
            None => layer,
        }
    }

    fn reference(&self) -> reference::Layer {
        reference::Layer {
            heads_q: self.heads_q,
            heads_kv: self.heads_kv,
            w_q: self.w_q.clone(),
            w_k: self.w_k.clone(),
            w_v: self.w_v.clone(),
            w_o: self.w_o.clone(),
            b_q: self.biases[0].clone(),
            b_k: self.biases[1].clone(),
            b_v: self.biases[2].clone(),
            b_o: self.biases[3].clone(),
            rope: self.rope.map(|r| reference::LayerRope {
                rotary_dim: r.rotary_dim(),
                base: r.base(),
                convention: match r.convention() {
                    RopeConvention::Half => reference::RopeConvention::Half,
                    _ => reference::RopeConvention::Interleaved,
                },
            }),
        }
    }

    fn d_head(&self) -> usize {
        self.w_q.ncols() / self.heads_q
    }

    fn d_v(&self) -> usize {
        self.w_v.ncols() / self.heads_kv
    }

    /// `|X|·|W| + |b|`: what a projection's error is relative to (step 1).
    fn abs_projection(x: &DMatrix<f64>, w: &DMatrix<f64>, b: &Option<Vec<f64>>) -> DMatrix<f64> {
        let mut p = x.abs() * w.abs();
        if let Some(b) = b {
            for (mut col, b) in p.column_iter_mut().zip(b) {
                col.add_scalar_mut(b.abs());
            }
        }
        p
    }

    /// `X·W + b` by the reference's compensated product.
    fn projection(x: &DMatrix<f64>, w: &DMatrix<f64>, b: &Option<Vec<f64>>) -> DMatrix<f64> {
        let mut p = reference::project(x, w);
        if let Some(b) = b {
            for (mut col, b) in p.column_iter_mut().zip(b) {
                col.add_scalar_mut(*b);
            }
        }
        p
    }

    /// The first-order bound of the module documentation, entry by entry, for queries
    /// from `x_q` and keys/values from `x_kv`, split into sequences by the lengths;
    /// `rotate`: whether RoPE is applied. Also returns `Y` per entry (the output's scale).
    fn bound(
        &self,
        x_q: &DMatrix<f64>,
        x_kv: &DMatrix<f64>,
        (lens_q, lens_kv): (&[usize], &[usize]),
        rotate: bool,
        u: f64,
    ) -> (DMatrix<f64>, DMatrix<f64>) {
        let (h_q, h_kv, d_head, d_v) = (self.heads_q, self.heads_kv, self.d_head(), self.d_v());
        let g = h_q / h_kv;
        let d_model = self.w_q.nrows() as f64;
        let [b_q, b_k, b_v, b_o] = &self.biases;
        // Steps 1–2: per (row, head) error and magnitude of Q, K, V.
        let per_head =
            |x: &DMatrix<f64>, w: &DMatrix<f64>, b: &Option<Vec<f64>>, heads, width, rot: bool| {
                let e = Self::abs_projection(x, w, b) * ((d_model + 1.0) * u);
                let m = Self::projection(x, w, b).abs();
                let head_max = |a: &DMatrix<f64>| {
                    DMatrix::from_fn(x.nrows(), heads, |i, h| {
                        a.view((i, h * width), (1, width))
                            .iter()
                            .fold(0.0f64, |s, v| s.max(*v))
                    })
                };
                let (e, m) = (head_max(&e), head_max(&m));
                if rot {
                    (e * 2.0 + &m * (3.0 * u), m * 2.0)
                } else {
                    (e, m)
                }
            };
        let rot = rotate && self.rope.is_some();
        let (e_q, m_q) = per_head(x_q, &self.w_q, b_q, h_q, d_head, rot);
        let (e_k, m_k) = per_head(x_kv, &self.w_k, b_k, h_kv, d_head, rot);
        let (e_v, m_v) = per_head(x_kv, &self.w_v, b_v, h_kv, d_v, false);
        let scale = 1.0 / (d_head as f64).sqrt();
        let d = d_head as f64;
        let (n_out, n_model) = (x_q.nrows(), self.w_o.ncols());
        let mut bound = DMatrix::zeros(n_out, n_model);
        let mut y_scale = DMatrix::zeros(n_out, n_model);
        let (mut row_q, mut row_kv) = (0, 0);
        for (&n_q, &n_kv) in lens_q.iter().zip(lens_kv) {
            let col_max = |m: &DMatrix<f64>, h: usize| {
                (row_kv..row_kv + n_kv).fold(0.0f64, |s, j| s.max(m[(j, h)]))
            };
            let s_err = sum_error(n_kv, u);
            for i in row_q..row_q + n_q {
                // Steps 3–4: |ΔA| and |A| per column of the concatenated heads.
                let mut da = vec![0.0; h_q * d_v];
                let mut ma = vec![0.0; h_q * d_v];
                for h in 0..h_q {
                    let kv = h / g;
                    let (mk, ek, mv, ev) = (
                        col_max(&m_k, kv),
                        col_max(&e_k, kv),
                        col_max(&m_v, kv),
                        col_max(&e_v, kv),
                    );
                    let dd = scale * d * (e_q[(i, h)] * mk + m_q[(i, h)] * ek)
                        + (d + 4.0) * u * scale * d * m_q[(i, h)] * mk;
                    for c in h * d_v..(h + 1) * d_v {
                        da[c] = (2.0 * dd + s_err) * mv + ev;
                        ma[c] = mv;
                    }
                }
                // Step 5.
                let rounding = (h_q * d_v) as f64 + 1.0;
                for r in 0..n_model {
                    let (mut prop, mut mag) = (0.0, b_o.as_ref().map_or(0.0, |b| b[r].abs()));
                    for c in 0..h_q * d_v {
                        prop += da[c] * self.w_o[(c, r)].abs();
                        mag += ma[c] * self.w_o[(c, r)].abs();
                    }
                    bound[(i, r)] = SECOND_ORDER * (prop + rounding * u * mag);
                    y_scale[(i, r)] = mag;
                }
            }
            row_q += n_q;
            row_kv += n_kv;
        }
        (bound, y_scale)
    }
}

/// `|got − want| ≤ tol` entry by entry; returns the largest `|got − want| / scale`.
fn assert_within(got: &DMatrix<f64>, want: &DMatrix<f64>, tol: &DMatrix<f64>, label: &str) {
    assert_eq!(got.shape(), want.shape(), "{label}: shape");
    for i in 0..got.nrows() {
        for r in 0..got.ncols() {
            let err = (got[(i, r)] - want[(i, r)]).abs();
            assert!(
                err <= tol[(i, r)],
                "{label}: y[{i}, {r}] = {} but expected {} (error {err:e} > bound {:e})",
                got[(i, r)],
                want[(i, r)],
                tol[(i, r)]
            );
        }
    }
}

// ---------------------------------------------------------------- golden cases

const N_CASES: usize = 15;
/// The issue's criterion, relative to `Y` (module documentation).
const GOLDEN_REL: f64 = 1e-12;

fn cases() -> Vec<LayerCase> {
    let cases = layer_cases();
    assert_eq!(cases.len(), N_CASES, "layer golden file: number of cases");
    cases
}

fn causal_of(c: &LayerCase) -> Option<Causal> {
    c.causal.map(|c| match c {
        CausalAlign::TopLeft => Causal::TopLeft,
        CausalAlign::BottomRight => Causal::BottomRight,
    })
}

fn options_of<'a>(c: &LayerCase) -> AttentionOptions<'a, f64> {
    match causal_of(c) {
        Some(causal) => AttentionOptions::new().with_causal(causal),
        None => AttentionOptions::new(),
    }
}

/// The golden bound: twice the derived one (core's and torch's errors), and the issue's
/// 1e-12·Y, whichever is smaller.
fn golden_tolerance(c: &LayerCase) -> (DMatrix<f64>, DMatrix<f64>) {
    let n = [c.n];
    let (bound, y) = Weights::of_case(c).bound(&c.x, &c.x, (&n, &n), false, f64::EPSILON);
    let y_max = y.amax();
    (
        bound * 2.0,
        DMatrix::from_element(c.n, c.d_model, GOLDEN_REL * y_max),
    )
}

/// Core in f64 against PyTorch on every CPU path, through `forward`, `forward_packed` with
/// one sequence and a strided view of `x` (all the same bits).
#[test]
fn golden_f64_on_every_path() {
    let mut worst = 0.0f64;
    for c in cases() {
        let layer = Weights::of_case(&c).core::<f64>();
        let (derived, issue) = golden_tolerance(&c);
        let y_max = issue[(0, 0)] / GOLDEN_REL;
        // x as the middle columns of a wider matrix, and transposed storage (row stride ≠ 1).
        let mut wide = DMatrix::from_element(c.n, c.d_model + 2, f64::NAN);
        wide.columns_mut(1, c.d_model).copy_from(&c.x);
        let xt = c.x.transpose();
        let row_strided: MatRef<'_, f64> = DMatrixView::from_slice_with_strides_generic(
            xt.as_slice(),
            Dyn(c.n),
            Dyn(c.d_model),
            Dyn(c.d_model),
            Dyn(1),
        );
        for path in CpuPath::supported() {
            let label = format!("{} {path:?}", c.name);
            let options = options_of(&c).with_cpu_path(path);
            let y = layer
                .forward(&c.x, &options)
                .unwrap_or_else(|e| panic!("{label}: {e}"));
            assert_within(&y, &c.output, &derived, &format!("{label} (derived bound)"));
            assert_within(&y, &c.output, &issue, &format!("{label} (1e-12·Y)"));
            worst = worst.max((&y - &c.output).amax() / y_max);
            let packed = layer.forward_packed(&c.x, &[c.n], &options).unwrap();
            assert_eq!(packed, y, "{label}: forward_packed with one sequence");
            let by_view = layer.forward(wide.columns(1, c.d_model), &options).unwrap();
            assert_eq!(by_view, y, "{label}: column block by value");
            let strided = layer.forward(row_strided, &options).unwrap();
            assert_eq!(strided, y, "{label}: row-strided view");
            // Self-attention is cross-attention of x with itself (no RoPE here).
            let cross = layer.forward_cross(&c.x, &c.x, &options).unwrap();
            assert_eq!(cross, y, "{label}: forward_cross(x, x)");
        }
    }
    println!("worst |core − golden| / Y = {worst:e}");
}

/// The reference layer against PyTorch, within the same tolerances.
#[test]
fn reference_matches_golden() {
    for c in cases() {
        let (derived, issue) = golden_tolerance(&c);
        let options = reference::HeadOptions {
            base: reference::Options {
                causal: causal_of(&c).map(|_| reference::Causal::TopLeft),
                ..Default::default()
            },
            ..Default::default()
        };
        let y = Weights::of_case(&c)
            .reference()
            .forward(&c.x, &[c.n], &options);
        assert_within(&y, &c.output, &derived, &c.name);
        assert_within(&y, &c.output, &issue, &c.name);
    }
}

/// Core in f32 against the reference on the same rounded inputs, within the derived bound.
#[test]
fn golden_f32_against_reference() {
    for c in cases() {
        let w = Weights::of_case(&c).rounded::<f32>();
        let x = widen(&narrow::<f32>(&c.x));
        let layer = w.core::<f32>();
        let x_f32 = narrow::<f32>(&x);
        let reference_y = w.reference().forward(
            &x,
            &[c.n],
            &reference::HeadOptions {
                base: reference::Options {
                    causal: causal_of(&c).map(|_| reference::Causal::TopLeft),
                    ..Default::default()
                },
                ..Default::default()
            },
        );
        let n = [c.n];
        let (bound, _) = w.bound(&x, &x, (&n, &n), false, f64::from(f32::EPSILON));
        for path in CpuPath::supported() {
            let mut options = AttentionOptions::new().with_cpu_path(path);
            if let Some(causal) = causal_of(&c) {
                options = options.with_causal(causal);
            }
            let y = layer.forward(&x_f32, &options).unwrap();
            assert_within(
                &widen(&y),
                &reference_y,
                &bound,
                &format!("{} {path:?}", c.name),
            );
        }
    }
}

// ---------------------------------------------------------------- properties

/// A random layer and batch.
#[derive(Clone, Debug)]
struct Problem {
    weights: Weights,
    /// The packed tokens, Σ seqlens × d_model.
    x: DMatrix<f64>,
    seqlens: Vec<usize>,
    /// Encoder tokens for cross-attention, n_kv × d_model.
    x_kv: DMatrix<f64>,
    causal: Option<Causal>,
    /// Over the packed tokens (self-attention).
    key_mask: Option<Vec<bool>>,
    /// Over the encoder tokens (cross-attention).
    cross_key_mask: Option<Vec<bool>>,
}

fn bias(len: usize) -> impl Strategy<Value = Option<Vec<f64>>> {
    prop::option::of(normal_matrix(len, 1, 0.5).prop_map(|m| m.as_slice().to_vec()))
}

/// Heads 1–3 K/V heads × groups of 1–3, head widths 1–8 (d_v drawn separately),
/// d_model 1–12, 1–3 sequences of 0–20 tokens (across the row-path threshold of 8
/// queries), every bias present or not, RoPE on even head widths with either pairing,
/// rotary dim 2..=d_head, base 10^4 or 5·10^5, causal either way or not, key masks.
fn problem() -> impl Strategy<Value = Problem> {
    (
        1..=3usize,
        1..=3usize,
        1..=8usize,
        1..=8usize,
        1..=12usize,
        prop::collection::vec(0..=20usize, 1..=3),
        0..=12usize,
        prop::sample::select(vec![0.3, 1.0, 3.0]),
    )
        .prop_flat_map(|(h_kv, g, d_head, d_v, d_model, seqlens, n_kv, sx)| {
            let h_q = h_kv * g;
            let total: usize = seqlens.iter().sum();
            let ws = 1.0 / (d_model as f64).sqrt();
            let rope = if d_head >= 2 {
                prop::option::of((1..=d_head / 2, any::<bool>(), any::<bool>()))
                    .prop_map(|r| {
                        r.map(|(half, interleaved, big)| {
                            Rope::new(2 * half)
                                .with_base(if big { 500_000.0 } else { 10_000.0 })
                                .with_convention(if interleaved {
                                    RopeConvention::Interleaved
                                } else {
                                    RopeConvention::Half
                                })
                        })
                    })
                    .boxed()
            } else {
                Just(None).boxed()
            };
            (
                (
                    normal_matrix(d_model, h_q * d_head, ws),
                    normal_matrix(d_model, h_kv * d_head, ws),
                    normal_matrix(d_model, h_kv * d_v, ws),
                    normal_matrix(h_q * d_v, d_model, 1.0 / ((h_q * d_v) as f64).sqrt()),
                ),
                (
                    bias(h_q * d_head),
                    bias(h_kv * d_head),
                    bias(h_kv * d_v),
                    bias(d_model),
                ),
                rope,
                normal_matrix(total, d_model, sx),
                normal_matrix(n_kv, d_model, sx),
                prop::sample::select(vec![None, Some(Causal::TopLeft), Some(Causal::BottomRight)]),
                prop::option::of(prop::collection::vec(prop::bool::weighted(0.8), total)),
                prop::option::of(prop::collection::vec(prop::bool::weighted(0.8), n_kv)),
                Just((h_q, h_kv, seqlens)),
            )
        })
        .prop_map(
            |(
                (w_q, w_k, w_v, w_o),
                (b_q, b_k, b_v, b_o),
                rope,
                x,
                x_kv,
                causal,
                key_mask,
                cross_key_mask,
                (heads_q, heads_kv, seqlens),
            )| {
                Problem {
                    weights: Weights {
                        heads_q,
                        heads_kv,
                        w_q,
                        w_k,
                        w_v,
                        w_o,
                        biases: [b_q, b_k, b_v, b_o],
                        rope,
                    },
                    x,
                    seqlens,
                    x_kv,
                    causal,
                    key_mask,
                    cross_key_mask,
                }
            },
        )
}

fn reference_causal(c: Option<Causal>) -> Option<reference::Causal> {
    c.map(|c| match c {
        Causal::TopLeft => reference::Causal::TopLeft,
        _ => reference::Causal::BottomRight,
    })
}

fn core_options<'a, T: Element>(
    causal: Option<Causal>,
    key_mask: Option<&'a [bool]>,
    path: CpuPath,
) -> AttentionOptions<'a, T> {
    let mut o = AttentionOptions::new().with_cpu_path(path);
    if let Some(c) = causal {
        o = o.with_causal(c);
    }
    if let Some(m) = key_mask {
        o = o.with_key_mask(m);
    }
    o
}

/// The packed batch and cross-attention against the reference, and `forward_packed`
/// against `forward` on each sequence alone, on every path.
fn check<T: Element>(p: &Problem) -> Result<(), TestCaseError> {
    let u = T::EPSILON.to_f64();
    let w = p.weights.rounded::<T>();
    let x = widen(&narrow::<T>(&p.x));
    let x_kv = widen(&narrow::<T>(&p.x_kv));
    let layer = w.core::<T>();
    let reference_layer = w.reference();
    let (x_t, x_kv_t) = (narrow::<T>(&x), narrow::<T>(&x_kv));

    // Self-attention of the packed batch.
    let want = reference_layer.forward(
        &x,
        &p.seqlens,
        &reference::HeadOptions {
            base: reference::Options {
                causal: reference_causal(p.causal),
                ..Default::default()
            },
            key_mask: p.key_mask.clone(),
            ..Default::default()
        },
    );
    let lens = (&p.seqlens[..], &p.seqlens[..]);
    let (bound, _) = w.bound(&x, &x, lens, true, u);

    // Cross-attention: every packed token attends to the encoder's tokens.
    let want_cross = reference_layer.forward_cross(
        &x,
        &x_kv,
        &reference::HeadOptions {
            base: reference::Options {
                causal: reference_causal(p.causal),
                ..Default::default()
            },
            key_mask: p.cross_key_mask.clone(),
            ..Default::default()
        },
    );
    let (n, n_kv) = (x.nrows(), x_kv.nrows());
    let (bound_cross, _) = w.bound(&x, &x_kv, (&[n], &[n_kv]), false, u);

    for path in CpuPath::supported() {
        let label = format!("{path:?}");
        let options = core_options::<T>(p.causal, p.key_mask.as_deref(), path);
        let y = widen(&layer.forward_packed(&x_t, &p.seqlens, &options).unwrap());
        assert_within(&y, &want, &bound, &format!("{label} packed vs reference"));

        // Each sequence alone: the same rows. Not bit for bit: nalgebra's product picks
        // another algorithm below 6 rows, so the projections may round differently; both
        // are within the bound of the same exact value.
        let mut start = 0;
        for &len in &p.seqlens {
            let km = p.key_mask.as_ref().map(|m| &m[start..start + len]);
            let alone = widen(
                &layer
                    .forward(x_t.rows(start, len), &core_options::<T>(p.causal, km, path))
                    .unwrap(),
            );
            let rows = y.rows(start, len).into_owned();
            let tol = bound.rows(start, len) * 2.0;
            assert_within(
                &alone,
                &rows,
                &tol,
                &format!("{label} sequence at row {start}"),
            );
            start += len;
        }

        let options = core_options::<T>(p.causal, p.cross_key_mask.as_deref(), path);
        let y = widen(&layer.forward_cross(&x_t, &x_kv_t, &options).unwrap());
        assert_within(
            &y,
            &want_cross,
            &bound_cross,
            &format!("{label} cross vs reference"),
        );
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn random_layers_f64(p in problem()) {
        check::<f64>(&p)?;
    }

    #[test]
    fn random_layers_f32(p in problem()) {
        check::<f32>(&p)?;
    }
}

/// With no RoPE, `forward_packed` of a sequence of more than 5 tokens (nalgebra's product
/// takes one path for both) equals `forward` bit for bit, and the layer equals
/// `compute_qkv` + `multi_head_attention` + the output product done by hand.
#[test]
fn layer_is_its_definition() {
    let c = &cases()[13]; // n = 17, causal, 8 heads
    let layer = Weights::of_case(c).core::<f64>();
    let options = options_of(c);
    let y = layer.forward(&c.x, &options).unwrap();
    let b = |v: &Option<Vec<f64>>| {
        DMatrix::from_fn(c.n, v.as_ref().unwrap().len(), |_, j| {
            v.as_ref().unwrap()[j]
        })
    };
    let q = &c.x * &c.w_q + b(&c.b_q);
    let k = &c.x * &c.w_k + b(&c.b_k);
    let v = &c.x * &c.w_v + b(&c.b_v);
    let a = attention_core::multi_head_attention(
        &q,
        &k,
        &v,
        &attention_core::HeadLayout::new(c.h_q, c.h_kv),
        &options,
    )
    .unwrap();
    let by_hand = a * &c.w_o + b(&c.b_o);
    assert_eq!(y, by_hand);
}

// ---------------------------------------------------------------- errors

fn m(rows: usize, cols: usize) -> DMatrix<f64> {
    DMatrix::from_fn(rows, cols, |i, j| ((i * cols + j) as f64 * 0.37).sin())
}

/// d_model 6, 4 query heads of width 3 over 2 K/V heads, d_v 2.
fn layer_parts() -> [DMatrix<f64>; 4] {
    [m(6, 12), m(6, 6), m(6, 4), m(8, 6)]
}

fn build(
    parts: [DMatrix<f64>; 4],
    h_q: usize,
    h_kv: usize,
) -> Result<MultiHeadAttention<f64>, AttentionError> {
    let [w_q, w_k, w_v, w_o] = parts;
    MultiHeadAttention::new(h_q, h_kv, w_q, w_k, w_v, w_o)
}

#[test]
fn construction_errors_are_typed() {
    let ok = build(layer_parts(), 4, 2).unwrap();
    assert_eq!(
        (
            ok.d_model(),
            ok.heads_q(),
            ok.heads_kv(),
            ok.d_head(),
            ok.d_v()
        ),
        (6, 4, 2, 3, 2)
    );

    for (h_q, h_kv) in [(0, 1), (4, 0), (4, 3)] {
        assert_eq!(
            build(layer_parts(), h_q, h_kv).unwrap_err(),
            AttentionError::InvalidHeads {
                heads_q: h_q,
                heads_kv: h_kv
            }
        );
    }
    let with = |i: usize, w: DMatrix<f64>| {
        let mut parts = layer_parts();
        parts[i] = w;
        build(parts, 4, 2).unwrap_err()
    };
    let split = |operand, columns, heads, head_width| AttentionError::HeadSplit {
        operand,
        columns,
        heads,
        head_width,
    };
    assert_eq!(with(0, m(6, 10)), split(Operand::QueryWeight, 10, 4, None));
    assert_eq!(with(1, m(6, 4)), split(Operand::KeyWeight, 4, 2, Some(3)));
    assert_eq!(with(2, m(6, 5)), split(Operand::ValueWeight, 5, 2, None));
    let dim = |operand, axis, found, expected, against, rule| AttentionError::DimensionMismatch {
        operand,
        axis,
        found,
        expected,
        against,
        rule,
    };
    assert_eq!(
        with(1, m(5, 6)),
        dim(
            Operand::KeyWeight,
            Axis::Rows,
            5,
            6,
            Operand::QueryWeight,
            "every input projection has d_model rows"
        )
    );
    assert_eq!(
        with(2, m(7, 4)),
        dim(
            Operand::ValueWeight,
            Axis::Rows,
            7,
            6,
            Operand::QueryWeight,
            "every input projection has d_model rows"
        )
    );
    let e = with(3, m(12, 6));
    assert_eq!(
        e,
        dim(
            Operand::OutputWeight,
            Axis::Rows,
            12,
            8,
            Operand::ValueWeight,
            "W_o has one row per column of the concatenated heads (h_q·d_v)"
        )
    );
    assert_eq!(
        e.to_string(),
        "output weight has 12 rows but value weight has 8 (W_o has one row per column of the concatenated heads (h_q·d_v))"
    );
    assert_eq!(
        with(3, m(8, 5)),
        dim(
            Operand::OutputWeight,
            Axis::Columns,
            5,
            6,
            Operand::QueryWeight,
            "the layer maps d_model columns back to d_model"
        )
    );

    // NaN and ±∞ in each weight, named with its position.
    for (i, operand) in [
        Operand::QueryWeight,
        Operand::KeyWeight,
        Operand::ValueWeight,
        Operand::OutputWeight,
    ]
    .into_iter()
    .enumerate()
    {
        for bad in [f64::NAN, f64::INFINITY, f64::NEG_INFINITY] {
            let mut parts = layer_parts();
            parts[i][(2, 1)] = bad;
            match build(parts, 4, 2).unwrap_err() {
                AttentionError::NonFinite {
                    operand: o,
                    row: 2,
                    column: 1,
                    value,
                } => {
                    assert_eq!(o, operand);
                    assert!(value.is_nan() == bad.is_nan());
                }
                other => panic!("{operand}: {other:?}"),
            }
        }
    }
}

#[test]
fn bias_and_rope_errors_are_typed() {
    let layer = || build(layer_parts(), 4, 2).unwrap();
    let v = |n: usize| Some(DVector::from_element(n, 0.25));
    // Right lengths: 12, 6, 4, 6.
    assert!(layer().with_biases(v(12), v(6), v(4), v(6)).is_ok());
    let cases = [
        (0, Operand::QueryBias, 12, Operand::QueryWeight),
        (1, Operand::KeyBias, 6, Operand::KeyWeight),
        (2, Operand::ValueBias, 4, Operand::ValueWeight),
        (3, Operand::OutputBias, 6, Operand::OutputWeight),
    ];
    for (i, operand, len, against) in cases {
        let mut b = [None, None, None, None];
        b[i] = v(len + 1);
        let [b_q, b_k, b_v, b_o] = b;
        assert_eq!(
            layer().with_biases(b_q, b_k, b_v, b_o).unwrap_err(),
            AttentionError::DimensionMismatch {
                operand,
                axis: Axis::Entries,
                found: len + 1,
                expected: len,
                against,
                rule: "a bias has one entry per column of its weight",
            }
        );
        let mut bad = DVector::from_element(len, 0.5);
        bad[len - 1] = f64::NAN;
        let mut b = [None, None, None, None];
        b[i] = Some(bad);
        let [b_q, b_k, b_v, b_o] = b;
        let e = layer().with_biases(b_q, b_k, b_v, b_o).unwrap_err();
        assert!(
            matches!(e, AttentionError::NonFinite { operand: o, row, column: 0, .. } if o == operand && row == len - 1),
            "{e:?}"
        );
        assert_eq!(
            e.to_string(),
            format!("{operand}[{}] is NaN: inputs must be finite", len - 1)
        );
    }

    // RoPE: head width 3.
    assert!(layer().with_rope(Rope::new(2)).is_ok());
    for (r, rule) in [
        (3, "must be even"),
        (4, "must not exceed the head width"),
        (0, "must be at least 2"),
    ] {
        assert_eq!(
            layer().with_rope(Rope::new(r)).unwrap_err(),
            AttentionError::InvalidRotaryDim {
                rotary_dim: r,
                head_dim: 3,
                rule
            }
        );
    }
    assert_eq!(
        layer().with_rope(Rope::new(2).with_base(0.5)).unwrap_err(),
        AttentionError::InvalidRopeBase { value: 0.5 }
    );
}

#[test]
fn call_errors_are_typed() {
    let layer = build(layer_parts(), 4, 2)
        .unwrap()
        .with_rope(Rope::new(2))
        .unwrap();
    let o = AttentionOptions::new();
    let cols = |operand, found| AttentionError::DimensionMismatch {
        operand,
        axis: Axis::Columns,
        found,
        expected: 6,
        against: Operand::QueryWeight,
        rule: "the layer's input has d_model columns (the rows of W_q)",
    };
    assert_eq!(
        layer.forward(&m(3, 5), &o).unwrap_err(),
        cols(Operand::Input, 5)
    );
    assert_eq!(
        layer.forward_packed(&m(3, 7), &[3], &o).unwrap_err(),
        cols(Operand::Input, 7)
    );
    assert_eq!(
        layer.forward_cross(&m(3, 5), &m(2, 6), &o).unwrap_err(),
        cols(Operand::Input, 5)
    );
    assert_eq!(
        layer.forward_cross(&m(3, 6), &m(2, 4), &o).unwrap_err(),
        cols(Operand::KeyValueInput, 4)
    );
    // Lengths that do not sum to the rows, including a sum past usize::MAX.
    for (lens, sum) in [
        (vec![1, 1], 2),
        (vec![2, 2], 4),
        (vec![usize::MAX, 2], usize::MAX),
    ] {
        assert_eq!(
            layer.forward_packed(&m(3, 6), &lens, &o).unwrap_err(),
            AttentionError::SequenceLengths {
                operand: Operand::Input,
                sum,
                rows: 3
            }
        );
    }
    // NaN / ∞ in the inputs.
    let mut x = m(3, 6);
    x[(1, 4)] = f64::INFINITY;
    let non_finite = |operand| AttentionError::NonFinite {
        operand,
        row: 1,
        column: 4,
        value: f64::INFINITY,
    };
    assert_eq!(
        layer.forward(&x, &o).unwrap_err(),
        non_finite(Operand::Input)
    );
    assert_eq!(
        layer.forward_packed(&x, &[1, 2], &o).unwrap_err(),
        non_finite(Operand::Input)
    );
    assert_eq!(
        layer.forward_cross(&x, &m(2, 6), &o).unwrap_err(),
        non_finite(Operand::Input)
    );
    assert_eq!(
        layer.forward_cross(&m(2, 6), &x, &o).unwrap_err(),
        non_finite(Operand::KeyValueInput)
    );
    // Options are checked as multi_head_attention checks them: a key mask of the wrong
    // length names the key mask.
    let e = layer
        .forward_cross(
            &m(2, 6),
            &m(3, 6),
            &AttentionOptions::new().with_key_mask(&[true, false]),
        )
        .unwrap_err();
    assert!(
        matches!(
            e,
            AttentionError::DimensionMismatch {
                operand: Operand::KeyMask,
                found: 2,
                expected: 3,
                ..
            }
        ),
        "{e:?}"
    );
}

#[test]
fn projection_overflow_names_the_projection() {
    // d_model 1, one head of width 1: Q = x·w_q, …, y = a·w_o.
    let one = |v: f64| DMatrix::from_element(1, 1, v);
    let layer = MultiHeadAttention::new(1, 1, one(1e200), one(0.0), one(1.0), one(1e10)).unwrap();
    let o = AttentionOptions::new();
    // x·w_q = 1e300·1e200 overflows: the query projection.
    assert_eq!(
        layer.forward(&one(1e300), &o).unwrap_err(),
        AttentionError::ProductOverflow {
            operand: Operand::Query,
            row: 0,
            column: 0
        }
    );
    // Q = 1e200 is fine, V = 1e300, a = 1e300 and a·w_o = 1e310: the output projection.
    let layer = MultiHeadAttention::new(1, 1, one(1.0), one(0.0), one(1.0), one(1e10)).unwrap();
    let e = layer.forward(&one(1e300), &o).unwrap_err();
    assert_eq!(
        e,
        AttentionError::ProductOverflow {
            operand: Operand::Output,
            row: 0,
            column: 0
        }
    );
    assert_eq!(
        e.to_string(),
        "computing the output overflowed at [0, 0]: the product exceeds the element type's range"
    );
    // A bias that pushes a finite product past MAX: caught after the bias is added.
    let layer = MultiHeadAttention::new(1, 1, one(1.0), one(0.0), one(1.0), one(1.0))
        .unwrap()
        .with_biases(None, None, Some(DVector::from_element(1, f64::MAX)), None)
        .unwrap();
    assert_eq!(
        layer.forward(&one(f64::MAX), &o).unwrap_err(),
        AttentionError::ProductOverflow {
            operand: Operand::Value,
            row: 0,
            column: 0
        }
    );
}

/// Empty inputs: no tokens gives 0 rows; cross-attention to no keys gives b_o per row.
#[test]
fn empty_inputs() {
    let b_o = DVector::from_fn(6, |i, _| i as f64);
    let layer = build(layer_parts(), 4, 2)
        .unwrap()
        .with_biases(None, None, None, Some(b_o.clone()))
        .unwrap();
    let o = AttentionOptions::new();
    assert_eq!(layer.forward(&m(0, 6), &o).unwrap().shape(), (0, 6));
    assert_eq!(
        layer.forward_packed(&m(3, 6), &[0, 3, 0], &o).unwrap(),
        layer.forward(&m(3, 6), &o).unwrap()
    );
    let y = layer.forward_cross(&m(2, 6), &m(0, 6), &o).unwrap();
    for i in 0..2 {
        assert_eq!(y.row(i).transpose(), b_o);
    }
}

// ---------------------------------------------------------------- decoding through a cache

/// A layer of [`problem`] fed through `forward_cached` as one sequence (all its packed
/// tokens): a prefill chunk of `prefill` tokens, then chunks of `step` (1 or 2) tokens,
/// into a cache of pages of `page_size`, with a sliding window or not.
#[derive(Clone, Debug)]
struct Decoding {
    problem: Problem,
    prefill: usize,
    step: usize,
    page_size: usize,
    window: Option<usize>,
}

fn decoding() -> impl Strategy<Value = Decoding> {
    (
        problem(),
        0..=24usize,
        1..=2usize,
        prop::sample::select(vec![1, 3, 4, 64]),
        prop::option::of(1..=9usize),
    )
        .prop_map(|(problem, prefill, step, page_size, window)| Decoding {
            prefill: prefill.min(problem.x.nrows()),
            problem,
            step,
            page_size,
            window,
        })
}

/// `forward_cached` chunk by chunk against `forward` of the whole sequence with causal
/// (top-left, = bottom-right for n_q = n_kv) and, for a sliding-window cache of `w`, the
/// window `(w − 1, 0)`: within twice the layer's bound (both are within the bound of the
/// same exact value). A first chunk of more than 8 tokens equals `forward` of those
/// tokens alone bit for bit (the same products — more than 5 rows — and the same block
/// kernel on the same numbers); up to 8 the decoding kernel runs, which sums the cache's
/// values (stored by rows) in another order than `forward`'s projected V (by columns),
/// so those chunks are held to the bound. Against `forward` of the whole sequence no
/// chunk need be bitwise (another kernel may run for more queries). Every CPU path.
fn check_decoding<T: Element>(d: &Decoding) -> Result<(), TestCaseError> {
    let p = &d.problem;
    let u = T::EPSILON.to_f64();
    let w = p.weights.rounded::<T>();
    let x = widen(&narrow::<T>(&p.x));
    let x_t = narrow::<T>(&x);
    let layer = w.core::<T>();
    let n = x.nrows();
    let (bound, _) = w.bound(&x, &x, (&[n], &[n]), true, u);
    let tol = bound * 2.0;
    for path in CpuPath::supported() {
        let mut full_options = AttentionOptions::new()
            .with_cpu_path(path)
            .with_causal(Causal::TopLeft);
        let mut cache = KvCache::<T>::new(layer.heads_kv(), layer.d_head(), layer.d_v())
            .unwrap()
            .with_page_size(d.page_size)
            .unwrap();
        if let Some(win) = d.window {
            full_options = full_options.with_window(win - 1, 0);
            cache = cache.with_window(win).unwrap();
        }
        let full = layer.forward(&x_t, &full_options).unwrap();
        let full_f64 = widen(&full);
        let seq = cache.add_sequence();
        let options = AttentionOptions::new().with_cpu_path(path);
        let mut start = 0;
        while start < n {
            let len = if start == 0 && d.prefill > 0 {
                d.prefill
            } else {
                d.step.min(n - start)
            };
            let y = layer
                .forward_cached(x_t.rows(start, len), &mut cache, seq, &options)
                .unwrap();
            let label = format!("{path:?}, tokens {start}..{}", start + len);
            prop_assert_eq!(cache.len(seq).unwrap(), start + len, "{}", label);
            if start == 0 && len > 8 {
                let alone = layer.forward(x_t.rows(0, len), &full_options).unwrap();
                prop_assert!(
                    y == alone,
                    "{}: a first chunk differs from forward on its tokens",
                    label
                );
            }
            assert_within(
                &widen(&y),
                &full_f64.rows(start, len).into_owned(),
                &tol.rows(start, len).into_owned(),
                &label,
            );
            start += len;
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    #[test]
    fn cached_decoding_equals_forward_f64(d in decoding()) {
        check_decoding::<f64>(&d)?;
    }

    #[test]
    fn cached_decoding_equals_forward_f32(d in decoding()) {
        check_decoding::<f32>(&d)?;
    }
}

/// A fixed case large enough for every kernel: 40 tokens through a layer of 4 query heads
/// over 2 K/V heads with RoPE of each pairing (partial rotary dimension), a prompt of 13
/// (the block kernel), then one token at a time (the decoding kernel), across 3 pages of
/// 16; and on a window of 7 that evicts pages.
#[test]
fn decoding_a_sequence_token_by_token() {
    let (d_model, h_q, h_kv, d_head) = (16, 4, 2, 6);
    let g = |r: usize, c: usize, s: f64| {
        DMatrix::from_fn(r, c, |i, j| {
            ((i * c + j) as f64 * s).sin() / (r as f64).sqrt()
        })
    };
    for convention in [RopeConvention::Half, RopeConvention::Interleaved] {
        for window in [None, Some(7)] {
            let w = Weights {
                heads_q: h_q,
                heads_kv: h_kv,
                w_q: g(d_model, h_q * d_head, 0.37),
                w_k: g(d_model, h_kv * d_head, 0.53),
                w_v: g(d_model, h_kv * d_head, 0.71),
                w_o: g(h_q * d_head, d_model, 0.29),
                biases: [None, Some(vec![0.1; h_kv * d_head]), None, None],
                rope: Some(Rope::new(4).with_convention(convention)),
            };
            let p = Decoding {
                problem: Problem {
                    weights: w,
                    x: g(40, d_model, 0.91) * 4.0,
                    seqlens: vec![40],
                    x_kv: DMatrix::zeros(0, d_model),
                    causal: None,
                    key_mask: None,
                    cross_key_mask: None,
                },
                prefill: 13,
                step: 1,
                page_size: 16,
                window,
            };
            check_decoding::<f64>(&p).unwrap();
            check_decoding::<f32>(&p).unwrap();
        }
    }
}

/// Every rejected `forward_cached` leaves the cache bitwise as it was: errors found
/// before the append (input, cache, sequence, options, values) and errors after it (a
/// score or the output projection overflowing), whose append is undone, evicted pages
/// and the pool's stale pages included. A good call then still works.
#[test]
fn rejected_forward_cached_leaves_the_cache_unchanged() {
    // d_model 6, 4 query heads of width 3 over 2 K/V heads of widths 3 and 2.
    let layer = build(layer_parts(), 4, 2)
        .unwrap()
        .with_rope(Rope::new(2))
        .unwrap();
    let new_cache = |window: Option<usize>| {
        let mut cache = KvCache::<f64>::new(2, 3, 2)
            .unwrap()
            .with_page_size(2)
            .unwrap();
        if let Some(w) = window {
            cache = cache.with_window(w).unwrap();
        }
        let other = cache.add_sequence();
        let seq = cache.add_sequence();
        layer
            .forward_cached(&m(5, 6), &mut cache, other, &AttentionOptions::new())
            .unwrap();
        layer
            .forward_cached(&m(7, 6), &mut cache, seq, &AttentionOptions::new())
            .unwrap();
        cache.remove(other).unwrap(); // stale pages in the pool
        (cache, seq, other)
    };
    let o = AttentionOptions::new();
    let mut nan = m(2, 6);
    nan[(1, 3)] = f64::NAN;
    let mask = DMatrix::from_element(2, 9, true);
    let key_mask = [true; 9];
    for window in [None, Some(3)] {
        let (mut cache, seq, other) = new_cache(window);
        let before = cache.snapshot();
        let reject = |layer: &MultiHeadAttention<f64>,
                      x: &DMatrix<f64>,
                      cache: &mut KvCache<f64>,
                      seq: SeqId,
                      options: &AttentionOptions<'_, f64>| {
            let e = layer.forward_cached(x, cache, seq, options).unwrap_err();
            assert!(
                cache.snapshot() == before,
                "{window:?}: {e:?} changed the cache"
            );
            e
        };
        // Before the append.
        let e = reject(&layer, &m(2, 5), &mut cache, seq, &o);
        assert!(
            matches!(
                e,
                AttentionError::DimensionMismatch {
                    operand: Operand::Input,
                    ..
                }
            ),
            "{e:?}"
        );
        let e = reject(&layer, &nan, &mut cache, seq, &o);
        assert!(
            matches!(
                e,
                AttentionError::NonFinite {
                    operand: Operand::Input,
                    ..
                }
            ),
            "{e:?}"
        );
        let e = reject(
            &layer,
            &m(2, 6),
            &mut cache,
            seq,
            &o.clone().with_scale(f64::NAN),
        );
        assert!(matches!(e, AttentionError::InvalidScale { .. }), "{e:?}");
        for options in [
            o.clone().with_causal(Causal::TopLeft),
            o.clone().with_mask(&mask),
            o.clone().with_key_mask(&key_mask),
        ] {
            let e = reject(&layer, &m(2, 6), &mut cache, seq, &options);
            assert!(matches!(e, AttentionError::InvalidOption { .. }), "{e:?}");
        }
        let e = reject(
            &layer,
            &m(2, 6),
            &mut cache,
            seq,
            &o.clone().with_alibi_slopes(&[0.5; 3]),
        );
        assert!(
            matches!(
                e,
                AttentionError::DimensionMismatch {
                    operand: Operand::AlibiSlopes,
                    ..
                }
            ),
            "{e:?}"
        );
        if window.is_some() {
            let e = reject(
                &layer,
                &m(2, 6),
                &mut cache,
                seq,
                &o.clone().with_window(1, 0),
            );
            assert!(
                matches!(
                    e,
                    AttentionError::InvalidOption {
                        option: "with_window",
                        ..
                    }
                ),
                "{e:?}"
            );
        }
        // After the append: Q = K = 6e154 per entry, scores of 3·36e308/√3 overflow.
        let huge = DMatrix::from_element(6, 12, 1e154);
        let [_, _, w_v, w_o] = layer_parts();
        let hot = MultiHeadAttention::new(
            4,
            2,
            huge.clone(),
            huge.columns(0, 6).into_owned(),
            w_v,
            w_o,
        )
        .unwrap();
        let e = reject(&hot, &DMatrix::from_element(3, 6, 1.0), &mut cache, seq, &o);
        assert!(
            matches!(e, AttentionError::HeadScoreOverflow { .. }),
            "{e:?}"
        );
        // After the append: the output projection overflows (V ≈ 1, W_o = 1e308).
        let [w_q, w_k, w_v, _] = layer_parts();
        let loud = MultiHeadAttention::new(4, 2, w_q, w_k, w_v, DMatrix::from_element(8, 6, 1e308))
            .unwrap();
        let e = reject(
            &loud,
            &DMatrix::from_element(3, 6, 3.0),
            &mut cache,
            seq,
            &o,
        );
        assert!(
            matches!(
                e,
                AttentionError::ProductOverflow {
                    operand: Operand::Output,
                    ..
                }
            ),
            "{e:?}"
        );
        // A removed sequence's id.
        let e = reject(&layer, &m(2, 6), &mut cache, other, &o);
        assert_eq!(e, AttentionError::UnknownSequence { sequence: other });
        // A good call still works, and equals the same call on a fresh copy.
        let y = layer.forward_cached(&m(2, 6), &mut cache, seq, &o).unwrap();
        let (mut fresh, fresh_seq, _) = new_cache(window);
        assert_eq!(
            y,
            layer
                .forward_cached(&m(2, 6), &mut fresh, fresh_seq, &o)
                .unwrap()
        );
    }
    // A cache of other heads or widths than the layer's (2 K/V heads, 3 and 2 wide).
    for (heads, d_k, d_v, axis, found) in [
        (1, 6, 4, Axis::Heads, 1),
        (2, 2, 2, Axis::Columns, 4),
        (2, 3, 3, Axis::Columns, 6),
    ] {
        let mut cache = KvCache::<f64>::new(heads, d_k, d_v).unwrap();
        let seq = cache.add_sequence();
        let before = cache.snapshot();
        let e = layer
            .forward_cached(&m(2, 6), &mut cache, seq, &o)
            .unwrap_err();
        assert!(
            matches!(e, AttentionError::DimensionMismatch { operand: Operand::KvCache, axis: a, found: f, .. } if a == axis && f == found),
            "{e:?}"
        );
        assert!(cache.snapshot() == before);
    }
}
