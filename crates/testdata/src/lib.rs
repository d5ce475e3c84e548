//! Golden cases for single-head scaled dot-product attention, and the seeded random
//! matrices ([`gaussian`], [`seeded_rng`]), for the workspace's tests and benches.
//!
//! The cases live in this crate, in `data/sdpa_cases.json` (`crates/testdata/data/` in the
//! repository): 113 cases computed in float64 by PyTorch's `scaled_dot_product_attention`,
//! or by an explicit float64 formula where PyTorch cannot express the option (softcap).
//! `data/README.md` beside it describes every field; in short, the top level is
//! `{"format": ..., "cases": [...]}`, matrices are flat row-major lists (row = token),
//! `null` means "option not set", and numbers that are not finite are written as the
//! strings `"-inf"`, `"inf"` or `"nan"`.
//!
//! [`golden_cases`] reads and parses the file at run time and hands back nalgebra matrices
//! in the library's conventions:
//!
//! | field | shape |
//! | --- | --- |
//! | `q` | n_q × d_k |
//! | `k` | n_kv × d_k |
//! | `v` | n_kv × d_v |
//! | `mask`, `bias`, `weights` | n_q × n_kv |
//! | `key_mask` | n_kv |
//! | `output` | n_q × d_v |
//! | `lse` | n_q |
//!
//! This is a test helper: it panics, with the case and field named, when the file is
//! missing or malformed.
//!
//! [`rope_cases`] reads `data/rope_cases.json` the same way (rotary position embeddings,
//! 60 cases; see [`RopeCase`]), [`mha_cases`] `data/mha_cases.json` (multi-head, 42 cases)
//! [`backward_cases`] `data/backward_cases.json` (gradients by PyTorch autograd, 40 cases)
//! and [`layer_cases`] `data/layer_cases.json` (an attention layer, 15 cases; see
//! [`LayerCase`]).
//!
//! # Example
//!
//! ```
//! let cases = attention_testdata::golden_cases();
//! let seed = cases.iter().find(|c| c.name == "seed_example").unwrap();
//! assert_eq!(seed.q.shape(), (2, 2));
//! assert!((seed.output[(0, 0)] - 1.660476901346686).abs() < 1e-15);
//! ```
#![deny(missing_docs)]

use std::path::Path;
use std::sync::OnceLock;

use nalgebra::DMatrix;
use rand::SeedableRng;
use rand::rngs::StdRng;
use rand_distr::{Distribution, StandardNormal};
use serde_json::{Map, Value};

mod backward;
pub use backward::{BackwardCase, backward_cases};
mod layer;
pub use layer::{LayerCase, layer_cases};
mod mha;
pub use mha::{MhaCase, mha_cases};
mod rope;
pub use rope::{RopeCase, RopePairing, rope_cases};

/// Path of the golden file, resolved when this crate is compiled.
const GOLDEN_PATH: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/data/sdpa_cases.json");

/// Where the causal diagonal sits when `n_q ≠ n_kv`.
///
/// Query `i` may attend to key `j` when
/// - [`TopLeft`](CausalAlign::TopLeft): `j ≤ i`;
/// - [`BottomRight`](CausalAlign::BottomRight): `j ≤ i + n_kv − n_q` (the last query sees
///   every key, as in incremental decoding).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CausalAlign {
    /// Query `i` sees keys `j ≤ i` (JSON `"top_left"`).
    TopLeft,
    /// Query `i` sees keys `j ≤ i + n_kv − n_q` (JSON `"bottom_right"`).
    BottomRight,
}

/// One golden case: the inputs and options of an attention call and its float64 result.
///
/// Scores are computed as `s = scale·q_i·k_j` → softcap → − ALiBi → + bias → disallowed
/// entries (mask, key mask, causal, window) set to −∞ → softmax over the row.
#[derive(Clone, Debug)]
pub struct GoldenCase {
    /// What the case exercises, e.g. `"causal_br_16x9_0"`; unique within the file.
    pub name: String,
    /// Who computed `output`: `"torch-2.15-sdpa-f64"` or `"explicit-f64"`.
    pub source: String,
    /// Number of queries.
    pub n_q: usize,
    /// Number of keys and values.
    pub n_kv: usize,
    /// Query/key width.
    pub d_k: usize,
    /// Value width.
    pub d_v: usize,
    /// Queries, n_q × d_k.
    pub q: DMatrix<f64>,
    /// Keys, n_kv × d_k.
    pub k: DMatrix<f64>,
    /// Values, n_kv × d_v.
    pub v: DMatrix<f64>,
    /// Score scale; `None` means 1/√d_k.
    pub scale: Option<f64>,
    /// Causal masking and its alignment, if any.
    pub causal: Option<CausalAlign>,
    /// n_q × n_kv; `true` = query i may attend to key j.
    pub mask: Option<DMatrix<bool>>,
    /// n_kv; `true` = a real key, `false` = padding.
    pub key_mask: Option<Vec<bool>>,
    /// n_q × n_kv additive bias; may contain −∞.
    pub bias: Option<DMatrix<f64>>,
    /// `(left, right)`: query i sees keys in `[diag − left, diag + right]`, where
    /// `diag = i` for top-left causal and `diag = i + n_kv − n_q` otherwise.
    pub window: Option<(usize, usize)>,
    /// Softcap `c`: `s ← c·tanh(s/c)`.
    pub softcap: Option<f64>,
    /// ALiBi slope `m`: `s ← s − m·|diag − j|`.
    pub alibi_slope: Option<f64>,
    /// Expected attention output, n_q × d_v; fully masked rows are 0.
    pub output: DMatrix<f64>,
    /// Expected log-sum-exp of each row's final scores, n_q; −∞ for fully masked rows.
    pub lse: Vec<f64>,
    /// Expected attention weights, n_q × n_kv (only stored for small cases).
    pub weights: Option<DMatrix<f64>>,
}

/// Loads every golden case from `data/sdpa_cases.json`, in file order.
///
/// # Panics
///
/// If the file cannot be read or parsed, or a case is malformed (missing field, wrong
/// type, matrix length not matching its shape); the message names the case and field.
/// This is a test helper, so failing loudly is the point.
#[must_use]
pub fn golden_cases() -> Vec<GoldenCase> {
    // Parsed once per test binary (the file is 7 MB); each caller gets its own copy.
    static CASES: OnceLock<Vec<GoldenCase>> = OnceLock::new();
    CASES.get_or_init(|| load(Path::new(GOLDEN_PATH))).clone()
}

fn load(path: &Path) -> Vec<GoldenCase> {
    load_with(path, parse_case)
}

/// Reads a golden file `{"cases": [...]}` and parses each case with `parse(case, index)`.
pub(crate) fn load_with<C>(path: &Path, parse: fn(&Map<String, Value>, usize) -> C) -> Vec<C> {
    let text = std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("cannot read golden file {}: {e}", path.display()));
    let root: Value = serde_json::from_str(&text)
        .unwrap_or_else(|e| panic!("golden file {} is not valid JSON: {e}", path.display()));
    let cases = root
        .get("cases")
        .and_then(Value::as_array)
        .unwrap_or_else(|| panic!("golden file {}: no \"cases\" array", path.display()));
    cases
        .iter()
        .enumerate()
        .map(|(index, case)| {
            let obj = case
                .as_object()
                .unwrap_or_else(|| panic!("golden case #{index} is not a JSON object"));
            parse(obj, index)
        })
        .collect()
}

/// Field accessor that knows which case it reads, for error messages.
pub(crate) struct Reader<'a> {
    pub(crate) obj: &'a Map<String, Value>,
    pub(crate) case: String,
}

impl Reader<'_> {
    pub(crate) fn fail(&self, field: &str, what: &str) -> ! {
        panic!("golden case {}: field {field:?}: {what}", self.case)
    }

    pub(crate) fn field(&self, field: &str) -> &Value {
        self.obj
            .get(field)
            .unwrap_or_else(|| self.fail(field, "missing"))
    }

    /// The field, or `None` when it is JSON `null` or absent (the multi-head files leave
    /// out fields that do not apply).
    pub(crate) fn absent_or_null(&self, field: &str) -> Option<&Value> {
        self.obj.get(field).filter(|v| !v.is_null())
    }

    /// The field, or `None` when it is JSON `null`.
    pub(crate) fn optional(&self, field: &str) -> Option<&Value> {
        match self.field(field) {
            Value::Null => None,
            value => Some(value),
        }
    }

    pub(crate) fn string(&self, field: &str) -> String {
        self.field(field)
            .as_str()
            .unwrap_or_else(|| self.fail(field, "expected a string"))
            .to_owned()
    }

    pub(crate) fn usize_of(&self, field: &str, value: &Value) -> usize {
        value
            .as_u64()
            .and_then(|n| usize::try_from(n).ok())
            .unwrap_or_else(|| self.fail(field, &format!("expected a size, got {value}")))
    }

    pub(crate) fn size(&self, field: &str) -> usize {
        self.usize_of(field, self.field(field))
    }

    pub(crate) fn f64_of(&self, field: &str, value: &Value) -> f64 {
        match value {
            Value::Number(n) => n
                .as_f64()
                .unwrap_or_else(|| self.fail(field, &format!("number {n} is not an f64"))),
            Value::String(s) => match s.as_str() {
                "-inf" => f64::NEG_INFINITY,
                "inf" => f64::INFINITY,
                "nan" => f64::NAN,
                other => self.fail(field, &format!("unexpected string {other:?} for a number")),
            },
            other => self.fail(field, &format!("expected a number, got {other}")),
        }
    }

    pub(crate) fn optional_f64(&self, field: &str) -> Option<f64> {
        self.optional(field).map(|v| self.f64_of(field, v))
    }

    pub(crate) fn array<'v>(&self, field: &str, value: &'v Value, len: usize) -> &'v [Value] {
        let items = value
            .as_array()
            .unwrap_or_else(|| self.fail(field, "expected an array"));
        if items.len() != len {
            self.fail(
                field,
                &format!("expected {len} elements, found {}", items.len()),
            );
        }
        items
    }

    pub(crate) fn f64_vec(&self, field: &str, value: &Value, len: usize) -> Vec<f64> {
        self.array(field, value, len)
            .iter()
            .map(|x| self.f64_of(field, x))
            .collect()
    }

    pub(crate) fn bool_vec(&self, field: &str, value: &Value, len: usize) -> Vec<bool> {
        self.array(field, value, len)
            .iter()
            .map(|x| {
                x.as_bool()
                    .unwrap_or_else(|| self.fail(field, &format!("expected a bool, got {x}")))
            })
            .collect()
    }

    /// A row-major `rows × cols` matrix of numbers.
    pub(crate) fn matrix(&self, field: &str, rows: usize, cols: usize) -> DMatrix<f64> {
        self.matrix_of(field, self.field(field), rows, cols)
    }

    pub(crate) fn matrix_of(
        &self,
        field: &str,
        value: &Value,
        rows: usize,
        cols: usize,
    ) -> DMatrix<f64> {
        let data = self.f64_vec(field, value, rows * cols);
        DMatrix::from_row_slice(rows, cols, &data)
    }

    pub(crate) fn optional_matrix(
        &self,
        field: &str,
        rows: usize,
        cols: usize,
    ) -> Option<DMatrix<f64>> {
        self.optional(field)
            .map(|v| self.matrix_of(field, v, rows, cols))
    }
}

fn parse_case(obj: &Map<String, Value>, index: usize) -> GoldenCase {
    let mut r = Reader {
        obj,
        case: format!("#{index}"),
    };
    let name = r.string("name");
    r.case = format!("#{index} ({name})");

    let source = r.string("source");
    let n_q = r.size("n_q");
    let n_kv = r.size("n_kv");
    let d_k = r.size("d_k");
    let d_v = r.size("d_v");

    let causal = r.optional("causal").map(|v| match v.as_str() {
        Some("top_left") => CausalAlign::TopLeft,
        Some("bottom_right") => CausalAlign::BottomRight,
        _ => r.fail(
            "causal",
            &format!("expected \"top_left\" or \"bottom_right\", got {v}"),
        ),
    });
    let mask = r.optional("mask").map(|v| {
        let data = r.bool_vec("mask", v, n_q * n_kv);
        DMatrix::from_row_slice(n_q, n_kv, &data)
    });
    let key_mask = r
        .optional("key_mask")
        .map(|v| r.bool_vec("key_mask", v, n_kv));
    let window = r.optional("window").map(|v| {
        let pair = r.array("window", v, 2);
        (
            r.usize_of("window", &pair[0]),
            r.usize_of("window", &pair[1]),
        )
    });
    let lse = {
        let v = r.field("lse");
        r.f64_vec("lse", v, n_q)
    };

    GoldenCase {
        q: r.matrix("q", n_q, d_k),
        k: r.matrix("k", n_kv, d_k),
        v: r.matrix("v", n_kv, d_v),
        scale: r.optional_f64("scale"),
        causal,
        mask,
        key_mask,
        bias: r.optional_matrix("bias", n_q, n_kv),
        window,
        softcap: r.optional_f64("softcap"),
        alibi_slope: r.optional_f64("alibi_slope"),
        output: r.matrix("output", n_q, d_v),
        lse,
        weights: r.optional_matrix("weights", n_q, n_kv),
        name,
        source,
        n_q,
        n_kv,
        d_k,
        d_v,
    }
}

/// The workspace's one generator of reproducible test and bench data: a [`StdRng`]
/// seeded with `seed` (same stream for the same seed on every run).
pub fn seeded_rng(seed: u64) -> StdRng {
    StdRng::seed_from_u64(seed)
}

/// A `rows × cols` matrix of N(0, σ²) entries drawn from [`seeded_rng`]`(seed)` with `seed`:
/// the same numbers for the same arguments on every run, different seeds independent. The
/// one generator of random inputs for the workspace's fixed test grids and benches (the
/// property tests draw theirs from proptest).
///
/// ```
/// let a = attention_testdata::gaussian(3, 2, 1.5, 7);
/// assert_eq!(a, attention_testdata::gaussian(3, 2, 1.5, 7));
/// assert_ne!(a, attention_testdata::gaussian(3, 2, 1.5, 8));
/// ```
pub fn gaussian(rows: usize, cols: usize, sigma: f64, seed: u64) -> DMatrix<f64> {
    let mut rng = seeded_rng(seed);
    DMatrix::from_fn(rows, cols, |_, _| {
        sigma * <StandardNormal as Distribution<f64>>::sample(&StandardNormal, &mut rng)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn parse(value: &Value) -> GoldenCase {
        parse_case(value.as_object().unwrap(), 0)
    }

    fn minimal(n_q: usize, n_kv: usize, d_k: usize, d_v: usize) -> Value {
        json!({
            "name": "t", "source": "test",
            "n_q": n_q, "n_kv": n_kv, "d_k": d_k, "d_v": d_v,
            "q": vec![0.0; n_q * d_k], "k": vec![0.0; n_kv * d_k], "v": vec![0.0; n_kv * d_v],
            "scale": null, "causal": null, "mask": null, "key_mask": null, "bias": null,
            "window": null, "softcap": null, "alibi_slope": null,
            "output": vec![0.0; n_q * d_v], "lse": vec!["-inf"; n_q], "weights": null,
        })
    }

    #[test]
    fn file_has_113_consistent_cases() {
        let cases = golden_cases();
        assert_eq!(cases.len(), 113);
        let mut names = std::collections::HashSet::new();
        for c in &cases {
            assert!(names.insert(c.name.clone()), "duplicate name {}", c.name);
            assert!(
                c.source == "torch-2.15-sdpa-f64" || c.source == "explicit-f64",
                "{}: unexpected source {}",
                c.name,
                c.source
            );
            assert_eq!(c.q.shape(), (c.n_q, c.d_k), "{}: q", c.name);
            assert_eq!(c.k.shape(), (c.n_kv, c.d_k), "{}: k", c.name);
            assert_eq!(c.v.shape(), (c.n_kv, c.d_v), "{}: v", c.name);
            assert_eq!(c.output.shape(), (c.n_q, c.d_v), "{}: output", c.name);
            assert_eq!(c.lse.len(), c.n_q, "{}: lse", c.name);
            if let Some(m) = &c.mask {
                assert_eq!(m.shape(), (c.n_q, c.n_kv), "{}: mask", c.name);
            }
            if let Some(m) = &c.key_mask {
                assert_eq!(m.len(), c.n_kv, "{}: key_mask", c.name);
            }
            if let Some(b) = &c.bias {
                assert_eq!(b.shape(), (c.n_q, c.n_kv), "{}: bias", c.name);
            }
            if let Some(w) = &c.weights {
                assert_eq!(w.shape(), (c.n_q, c.n_kv), "{}: weights", c.name);
            }
            // Inputs and outputs are finite; only lse may be -inf (fully masked rows,
            // whose output row is then 0).
            for m in [&c.q, &c.k, &c.v, &c.output] {
                assert!(m.iter().all(|x| x.is_finite()), "{}", c.name);
            }
            for (i, &l) in c.lse.iter().enumerate() {
                assert!(l.is_finite() || l == f64::NEG_INFINITY, "{}: lse", c.name);
                if l == f64::NEG_INFINITY {
                    assert!(c.output.row(i).iter().all(|&x| x == 0.0), "{}", c.name);
                }
            }
        }
    }

    #[test]
    fn seed_example_is_row_major() {
        let cases = golden_cases();
        let seed = cases.iter().find(|c| c.name == "seed_example").unwrap();
        assert_eq!(seed.v, DMatrix::from_row_slice(2, 2, &[1.0, 2.0, 3.0, 4.0]));
        assert_eq!(seed.v[(0, 1)], 2.0);
        assert_eq!(seed.output[(0, 1)], 2.660476901346686);
        assert_eq!(seed.output[(1, 0)], 2.3395230986533138);
    }

    #[test]
    fn options_parse() {
        let cases = golden_cases();
        let combo = cases.iter().find(|c| c.name == "combo_3x5_0").unwrap();
        assert_eq!(combo.causal, Some(CausalAlign::TopLeft));
        assert_eq!(combo.window, Some((4, 2)));
        assert_eq!(combo.scale, Some(0.3));
        assert_eq!(combo.alibi_slope, Some(0.1));
        assert!(combo.mask.is_some() && combo.key_mask.is_some() && combo.bias.is_some());
        let br = cases.iter().find(|c| c.name == "causal_br_3x5_0").unwrap();
        assert_eq!(br.causal, Some(CausalAlign::BottomRight));
        let cap = cases.iter().find(|c| c.name == "softcap_3x5_0").unwrap();
        assert_eq!(cap.softcap, Some(5.0));
        assert_eq!(cap.source, "explicit-f64");
    }

    #[test]
    fn zero_sized_and_non_finite() {
        let c = parse(&minimal(0, 0, 0, 0));
        assert_eq!(c.q.shape(), (0, 0));
        assert_eq!(c.output.shape(), (0, 0));
        assert!(c.lse.is_empty());

        let c = parse(&minimal(2, 0, 3, 1));
        assert_eq!(c.k.shape(), (0, 3));
        assert_eq!(c.v.shape(), (0, 1));
        assert_eq!(c.lse, vec![f64::NEG_INFINITY; 2]);

        let mut v = minimal(1, 2, 1, 1);
        v["bias"] = json!(["-inf", "inf"]);
        v["weights"] = json!(["nan", 1]);
        let c = parse(&v);
        let bias = c.bias.unwrap();
        assert_eq!(bias[(0, 0)], f64::NEG_INFINITY);
        assert_eq!(bias[(0, 1)], f64::INFINITY);
        let weights = c.weights.unwrap();
        assert!(weights[(0, 0)].is_nan());
        assert_eq!(weights[(0, 1)], 1.0);
    }

    #[test]
    #[should_panic(expected = "field \"k\": expected 4 elements, found 3")]
    fn wrong_length_panics_with_field_name() {
        let mut v = minimal(1, 2, 2, 1);
        v["k"] = json!([1.0, 2.0, 3.0]);
        let _ = parse(&v);
    }

    #[test]
    #[should_panic(expected = "cannot read golden file")]
    fn missing_file_panics() {
        let _ = load(Path::new("/nonexistent/sdpa_cases.json"));
    }
}
