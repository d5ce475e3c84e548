//! The attention-layer golden cases, `data/layer_cases.json`: a multi-head (grouped-query)
//! attention layer with optional biases, computed by PyTorch in float64 (format in
//! `data/README.md`).

use std::path::Path;
use std::sync::OnceLock;

use nalgebra::DMatrix;
use serde_json::{Map, Value};

use crate::{CausalAlign, Reader, load_with};

const LAYER_PATH: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/data/layer_cases.json");

/// One layer golden case: `y = concat_h(attention_h(X·W_q + b_q, X·W_k + b_k,
/// X·W_v + b_v))·W_o + b_o` on one sequence, scale `1/√d_head`. Weights multiply from the
/// right (`X·W`); PyTorch's `nn.Linear` stores the transpose.
#[derive(Clone, Debug)]
pub struct LayerCase {
    /// What the case exercises; unique within the file.
    pub name: String,
    /// Who computed `output` (`"torch-2.15-f64"` or
    /// `"torch-2.15-nn.MultiheadAttention-f64"`).
    pub source: String,
    /// Tokens.
    pub n: usize,
    /// Width of the layer's input and output.
    pub d_model: usize,
    /// Query heads.
    pub h_q: usize,
    /// Key/value heads (divides `h_q`).
    pub h_kv: usize,
    /// Head width (queries, keys and values).
    pub d_head: usize,
    /// Causal alignment, if causal (these cases: top-left or none).
    pub causal: Option<CausalAlign>,
    /// The tokens, n × d_model.
    pub x: DMatrix<f64>,
    /// d_model × h_q·d_head.
    pub w_q: DMatrix<f64>,
    /// d_model × h_kv·d_head.
    pub w_k: DMatrix<f64>,
    /// d_model × h_kv·d_head.
    pub w_v: DMatrix<f64>,
    /// h_q·d_head × d_model.
    pub w_o: DMatrix<f64>,
    /// h_q·d_head entries, if any.
    pub b_q: Option<Vec<f64>>,
    /// h_kv·d_head entries, if any.
    pub b_k: Option<Vec<f64>>,
    /// h_kv·d_head entries, if any.
    pub b_v: Option<Vec<f64>>,
    /// d_model entries, if any.
    pub b_o: Option<Vec<f64>>,
    /// The layer's output, n × d_model.
    pub output: DMatrix<f64>,
}

/// Every case of `data/layer_cases.json`, parsed once per process, in file order.
///
/// # Panics
/// If the file is missing or malformed (the message names the case and field).
///
/// # Example
/// ```
/// let cases = attention_testdata::layer_cases();
/// assert_eq!(cases.len(), 15);
/// let c = &cases[0];
/// assert_eq!(c.w_q.shape(), (c.d_model, c.h_q * c.d_head));
/// assert_eq!(c.output.shape(), (c.n, c.d_model));
/// ```
#[must_use]
pub fn layer_cases() -> Vec<LayerCase> {
    static CASES: OnceLock<Vec<LayerCase>> = OnceLock::new();
    CASES
        .get_or_init(|| load_with(Path::new(LAYER_PATH), parse_layer_case))
        .clone()
}

fn parse_layer_case(obj: &Map<String, Value>, index: usize) -> LayerCase {
    let mut r = Reader {
        obj,
        case: format!("#{index}"),
    };
    let name = r.string("name");
    r.case = format!("#{index} ({name})");
    let (n, d_model) = (r.size("n"), r.size("d_model"));
    let (h_q, h_kv, d_head) = (r.size("h_q"), r.size("h_kv"), r.size("d_head"));
    let causal = r.absent_or_null("causal").map(|v| match v.as_str() {
        Some("top_left") => CausalAlign::TopLeft,
        Some("bottom_right") => CausalAlign::BottomRight,
        _ => r.fail(
            "causal",
            &format!("expected \"top_left\" or \"bottom_right\", got {v}"),
        ),
    });
    let bias = |field: &str, len: usize| r.absent_or_null(field).map(|v| r.f64_vec(field, v, len));
    LayerCase {
        source: r.string("source"),
        causal,
        x: r.matrix("x", n, d_model),
        w_q: r.matrix("w_q", d_model, h_q * d_head),
        w_k: r.matrix("w_k", d_model, h_kv * d_head),
        w_v: r.matrix("w_v", d_model, h_kv * d_head),
        w_o: r.matrix("w_o", h_q * d_head, d_model),
        b_q: bias("b_q", h_q * d_head),
        b_k: bias("b_k", h_kv * d_head),
        b_v: bias("b_v", h_kv * d_head),
        b_o: bias("b_o", d_model),
        output: r.matrix("output", n, d_model),
        name,
        n,
        d_model,
        h_q,
        h_kv,
        d_head,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn minimal() -> Value {
        json!({
            "name": "t", "source": "test", "n": 2, "d_model": 2, "h_q": 2, "h_kv": 1,
            "d_head": 1, "causal": "top_left",
            "x": [1, 2, 3, 4], "w_q": [1, 2, 3, 4], "w_k": [5, 6], "w_v": [7, 8],
            "w_o": [1, 0, 0, 1], "b_q": null, "b_v": [0.5],
            "output": [0, 0, 0, 0],
        })
    }

    fn parse(value: &Value) -> LayerCase {
        parse_layer_case(value.as_object().unwrap(), 0)
    }

    #[test]
    fn file_has_15_consistent_cases() {
        let cases = layer_cases();
        assert_eq!(cases.len(), 15);
        let mut names = std::collections::HashSet::new();
        for c in &cases {
            assert!(names.insert(c.name.clone()), "duplicate name {}", c.name);
            assert!(
                c.h_q > 0 && c.h_kv > 0 && c.h_q.is_multiple_of(c.h_kv),
                "{}",
                c.name
            );
            assert_eq!(c.output.shape(), (c.n, c.d_model), "{}", c.name);
            let biases = [&c.b_q, &c.b_k, &c.b_v, &c.b_o];
            // Either all four biases or none (the "nobias" cases).
            assert!(
                biases.iter().all(|b| b.is_some()) || biases.iter().all(|b| b.is_none()),
                "{}",
                c.name
            );
            assert_eq!(c.name.contains("nobias"), c.b_q.is_none(), "{}", c.name);
            assert_eq!(c.name.contains("causal"), c.causal.is_some(), "{}", c.name);
        }
        // Grouped-query and multi-query layers are present.
        assert!(cases.iter().any(|c| c.h_kv > 1 && c.h_kv < c.h_q));
        assert!(cases.iter().any(|c| c.h_kv == 1 && c.h_q > 1));
    }

    #[test]
    fn row_major_null_and_absent_fields() {
        let c = parse(&minimal());
        assert_eq!(c.causal, Some(CausalAlign::TopLeft));
        assert_eq!(c.x[(0, 1)], 2.0);
        assert_eq!(c.x[(1, 0)], 3.0);
        assert_eq!(c.w_k.shape(), (2, 1));
        assert_eq!(c.w_k[(1, 0)], 6.0);
        // null and absent read the same; present is read.
        assert_eq!(
            (c.b_q.clone(), c.b_k.clone(), c.b_o.clone()),
            (None, None, None)
        );
        assert_eq!(c.b_v, Some(vec![0.5]));
    }

    #[test]
    #[should_panic(expected = "field \"w_o\": expected 4 elements, found 3")]
    fn wrong_weight_length_panics_with_field_name() {
        let mut v = minimal();
        v["w_o"] = json!([1, 0, 0]);
        let _ = parse(&v);
    }

    #[test]
    #[should_panic(expected = "field \"b_v\": expected 1 elements, found 2")]
    fn wrong_bias_length_panics() {
        let mut v = minimal();
        v["b_v"] = json!([1, 2]);
        let _ = parse(&v);
    }
}
