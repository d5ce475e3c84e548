//! The backward golden cases, `data/backward_cases.json`: gradients of multi-head,
//! grouped-query and packed attention (and of single-head attention with a bias)
//! computed by PyTorch autograd in float64 (format in `data/README.md`).

use std::sync::OnceLock;

use nalgebra::DMatrix;
use serde_json::Value;

use crate::{MhaCase, Reader};

const BACKWARD_PATH: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/data/backward_cases.json");

/// One backward golden case: the forward problem (in [`MhaCase`]'s layout, with its
/// `output` and `lse`), the gradient flowing into the output, and the expected gradients.
#[derive(Clone, Debug)]
pub struct BackwardCase {
    /// The forward problem and its output and lse.
    pub forward: MhaCase,
    /// `∂L/∂output`, `Σn_q × h_q·d_v`.
    pub d_out: DMatrix<f64>,
    /// `∂L/∂Q`, shape of `q`.
    pub dq: DMatrix<f64>,
    /// `∂L/∂K`, shape of `k` (summed over the query heads of each key/value head).
    pub dk: DMatrix<f64>,
    /// `∂L/∂V`, shape of `v`.
    pub dv: DMatrix<f64>,
    /// The `bwd_bias_*` cases (single head, one sequence): `n_q × n_kv` booleans, if any
    /// (`true` = may attend).
    pub mask: Option<DMatrix<bool>>,
    /// The `bwd_bias_*` cases: the `n_q × n_kv` additive bias.
    pub bias: Option<DMatrix<f64>>,
    /// The `bwd_bias_*` cases: `∂L/∂bias`, `n_q × n_kv`.
    pub d_bias: Option<DMatrix<f64>>,
}

/// Every case of `data/backward_cases.json`, parsed once per process.
///
/// # Panics
/// If the file is missing or malformed (naming the case and field).
///
/// # Example
/// ```
/// let cases = attention_testdata::backward_cases();
/// assert_eq!(cases.len(), 40);
/// let c = &cases[0];
/// assert_eq!(c.dq.shape(), c.forward.q.shape());
/// assert_eq!(cases.iter().filter(|c| c.d_bias.is_some()).count(), 12);
/// ```
#[must_use]
pub fn backward_cases() -> Vec<BackwardCase> {
    static CASES: OnceLock<Vec<BackwardCase>> = OnceLock::new();
    CASES
        .get_or_init(|| crate::load_with(std::path::Path::new(BACKWARD_PATH), parse))
        .clone()
}

fn parse(obj: &serde_json::Map<String, Value>, index: usize) -> BackwardCase {
    let forward = crate::mha::parse(obj, index);
    let r = Reader {
        obj,
        case: format!("#{index} ({})", forward.name),
    };
    let (n_q, n_kv) = (forward.q.nrows(), forward.k.nrows());
    let matrix = |field: &str| {
        r.absent_or_null(field)
            .map(|v| r.matrix_of(field, v, n_q, n_kv))
    };
    let bias = matrix("bias");
    let single = |field: &str| {
        if forward.h_q != 1 || forward.seqlens_q.len() != 1 {
            r.fail(
                field,
                "is given for a case that is not single-head, single-sequence",
            );
        }
    };
    if bias.is_some() {
        single("bias");
    }
    let mask = r.absent_or_null("mask").map(|v| {
        single("mask");
        let data = r.bool_vec("mask", v, n_q * n_kv);
        DMatrix::from_row_slice(n_q, n_kv, &data)
    });
    BackwardCase {
        d_out: r.matrix("d_out", n_q, forward.output.ncols()),
        dq: r.matrix("dq", n_q, forward.q.ncols()),
        dk: r.matrix("dk", n_kv, forward.k.ncols()),
        dv: r.matrix("dv", n_kv, forward.v.ncols()),
        d_bias: matrix("d_bias"),
        mask,
        bias,
        forward,
    }
}
