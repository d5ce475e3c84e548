//! The golden cases (`attention_testdata::golden_cases()`, computed by PyTorch in f64 and
//! stored in `crates/testdata/data/sdpa_cases.json`, format in `crates/testdata/data/README.md`)
//! through every CPU path this machine has:
//!
//! - f64: core's output, log-sum-exp and weights against the golden numbers;
//! - f32: the inputs and options rounded to f32, core against the reference run on the
//!   same rounded numbers;
//! - the reference itself against the golden numbers (a sanity check of the oracle).
//!
//! Every comparison uses the bound of `common/mod.rs` for the element type. Fully masked
//! rows must be exactly 0 with log-sum-exp −∞. The `_into` form writes into a NaN-filled
//! matrix and must agree bit for bit with the `_with_lse` form. (The golden cases are too
//! small for the kernel to run threads, so threads are tested in `threads.rs`.)

mod common;

use attention_core::{
    AttentionOptions, Causal, CpuPath, Element, attention_weights,
    scaled_dot_product_attention_into, scaled_dot_product_attention_with_lse,
};
use attention_testdata::{CausalAlign, GoldenCase, golden_cases};
use common::{
    OptionParts, assert_fully_masked_rows, assert_lse_close, assert_output_close,
    assert_weights_close, extra, lse_f64, nan_matrix, score_error, widen,
};
use nalgebra::DMatrix;

/// How many cases the golden file holds; a smaller number means data went missing.
const N_CASES: usize = 113;

fn cases() -> Vec<GoldenCase> {
    let cases = golden_cases();
    assert_eq!(cases.len(), N_CASES, "golden file: number of cases");
    cases
}

/// A case's inputs and numeric options rounded to `T` (exact for f64).
struct Typed<T: Element> {
    q: DMatrix<T>,
    k: DMatrix<T>,
    v: DMatrix<T>,
    bias: Option<DMatrix<T>>,
    scale: Option<T>,
    softcap: Option<T>,
    alibi: Option<T>,
}

impl<T: Element> Typed<T> {
    fn new(c: &GoldenCase) -> Self {
        let round = |m: &DMatrix<f64>| m.map(T::from_f64_rounded);
        Typed {
            q: round(&c.q),
            k: round(&c.k),
            v: round(&c.v),
            bias: c.bias.as_ref().map(round),
            scale: c.scale.map(T::from_f64_rounded),
            softcap: c.softcap.map(T::from_f64_rounded),
            alibi: c.alibi_slope.map(T::from_f64_rounded),
        }
    }

    /// The case's options: masks from the case, numbers from `self`.
    fn parts<'a>(&'a self, c: &'a GoldenCase) -> OptionParts<'a, T> {
        OptionParts {
            scale: self.scale,
            causal: c.causal.map(|causal| match causal {
                CausalAlign::TopLeft => Causal::TopLeft,
                CausalAlign::BottomRight => Causal::BottomRight,
            }),
            mask: c.mask.as_ref(),
            key_mask: c.key_mask.as_deref(),
            bias: self.bias.as_ref(),
            window: c.window,
            softcap: self.softcap,
            alibi: self.alibi,
            dropout: None,
        }
    }

    /// Core's options for the case.
    fn options<'a>(&'a self, c: &'a GoldenCase) -> AttentionOptions<'a, T> {
        self.parts(c).core()
    }

    /// The reference's options for exactly the numbers core sees.
    fn reference_options(&self, c: &GoldenCase) -> attention_reference::Options {
        self.parts(c).reference()
    }

    /// `Δ_i` of the common bound for these inputs.
    fn delta(&self, c: &GoldenCase) -> Vec<f64> {
        let scale = self
            .scale
            .map_or(1.0 / (c.d_k as f64).sqrt(), Element::to_f64);
        let extra = extra(
            (c.n_q, c.n_kv),
            c.causal == Some(CausalAlign::TopLeft),
            self.bias.as_ref().map(widen).as_ref(),
            self.softcap.map(Element::to_f64),
            self.alibi.map(Element::to_f64),
        );
        score_error(
            &widen(&self.q),
            &widen(&self.k),
            scale,
            &extra,
            T::EPSILON.to_f64(),
        )
    }
}

/// Bit-for-bit equality (through the exact widening to f64, so −0 ≠ +0).
fn assert_bitwise<T: Element>(got: &[T], want: &[T], label: &str) {
    assert_eq!(got.len(), want.len(), "{label}: length");
    for (idx, (a, b)) in got.iter().zip(want).enumerate() {
        assert_eq!(
            a.to_f64().to_bits(),
            b.to_f64().to_bits(),
            "{label}: element {idx} is {a:?} but {b:?}"
        );
    }
}

/// What core must match for one case: output, lse, and (if given) weights, with the `V`
/// whose magnitudes scale the output bound.
struct Expected<'a> {
    output: &'a DMatrix<f64>,
    lse: &'a [f64],
    weights: Option<&'a DMatrix<f64>>,
    v: &'a DMatrix<f64>,
}

/// Runs core on `c` in type `T` on every CPU path and checks it against `want`.
fn check_core<T: Element>(c: &GoldenCase, t: &Typed<T>, want: &Expected<'_>, kind: &str) {
    let eps = T::EPSILON.to_f64();
    let delta = t.delta(c);
    for path in CpuPath::supported() {
        let label = format!("{} ({kind}, {path:?})", c.name);
        let options = t.options(c).with_cpu_path(path);
        let (out, lse) = scaled_dot_product_attention_with_lse(&t.q, &t.k, &t.v, &options)
            .unwrap_or_else(|e| panic!("{label}: {e}"));

        // The `_into` form overwrites every entry of a NaN-filled matrix, with the same bits.
        let mut into = nan_matrix::<T>(c.n_q, c.d_v);
        scaled_dot_product_attention_into(&t.q, &t.k, &t.v, &options, &mut into)
            .unwrap_or_else(|e| panic!("{label}: _into: {e}"));
        assert_bitwise(into.as_slice(), out.as_slice(), &format!("{label}: _into"));

        let out = widen(&out);
        let lse = lse_f64(&lse);
        assert!(
            out.iter().all(|x| x.is_finite()),
            "{label}: non-finite output"
        );
        assert_output_close(&out, want.output, want.v, &delta, eps, &label);
        assert_lse_close(&lse, want.lse, &delta, c.n_kv, eps, &label);

        let weights = want.weights.map(|want_w| {
            let w = attention_weights(&t.q, &t.k, &t.v, &options)
                .unwrap_or_else(|e| panic!("{label}: weights: {e}"));
            let w = widen(&w);
            assert_weights_close(&w, want_w, &delta, eps, &label);
            w
        });
        assert_fully_masked_rows(&out, weights.as_ref(), &lse, want.lse, &label);
    }
}

/// Core in f64 against PyTorch's f64 numbers.
#[test]
fn core_f64_matches_golden() {
    for c in cases() {
        let t = Typed::<f64>::new(&c);
        let want = Expected {
            output: &c.output,
            lse: &c.lse,
            weights: c.weights.as_ref(),
            v: &c.v,
        };
        check_core(&c, &t, &want, "f64 vs golden");
    }
}

/// Core in f32 against the reference on the same f32-rounded inputs and options.
#[test]
fn core_f32_matches_reference_on_rounded_golden_inputs() {
    for c in cases() {
        let t = Typed::<f32>::new(&c);
        let (q, k, v) = (widen(&t.q), widen(&t.k), widen(&t.v));
        let r = attention_reference::attention(&q, &k, &v, &t.reference_options(&c));
        let want = Expected {
            output: &r.output,
            lse: &r.lse,
            weights: Some(&r.weights),
            v: &v,
        };
        check_core(&c, &t, &want, "f32 vs reference");
    }
}

/// The oracle itself reproduces PyTorch's f64 numbers (within the f64 bound).
#[test]
fn reference_matches_golden() {
    let eps = f64::EPSILON;
    for c in cases() {
        let t = Typed::<f64>::new(&c);
        let delta = t.delta(&c);
        let label = format!("{} (reference vs golden)", c.name);
        let r = attention_reference::attention(&c.q, &c.k, &c.v, &t.reference_options(&c));
        assert_output_close(&r.output, &c.output, &c.v, &delta, eps, &label);
        assert_lse_close(&r.lse, &c.lse, &delta, c.n_kv, eps, &label);
        if let Some(w) = &c.weights {
            assert_weights_close(&r.weights, w, &delta, eps, &label);
        }
        assert_fully_masked_rows(&r.output, Some(&r.weights), &r.lse, &c.lse, &label);
    }
}

/// The golden file exercises what it claims to: every option, both causal alignments,
/// fully masked rows, and the block kernel (more keys than the direct path takes).
#[test]
fn golden_cases_cover_every_option() {
    let cases = cases();
    let any = |f: &dyn Fn(&GoldenCase) -> bool| cases.iter().any(f);
    assert!(any(&|c| c.causal == Some(CausalAlign::TopLeft)));
    assert!(any(
        &|c| c.causal == Some(CausalAlign::BottomRight) && c.n_q != c.n_kv
    ));
    assert!(any(&|c| c.mask.is_some()));
    assert!(any(&|c| c.key_mask.is_some()));
    assert!(any(&|c| c.bias.is_some()));
    assert!(any(&|c| c.window.is_some()));
    assert!(any(&|c| c.softcap.is_some()));
    assert!(any(&|c| c.alibi_slope.is_some()));
    assert!(any(&|c| c.scale == Some(0.0)));
    assert!(any(&|c| c.scale.is_some_and(|s| s < 0.0)));
    assert!(any(&|c| c.lse.contains(&f64::NEG_INFINITY)));
    assert!(any(&|c| c.n_kv > 64));
}
