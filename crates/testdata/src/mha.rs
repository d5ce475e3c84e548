//! The multi-head golden cases, `data/mha_cases.json`: grouped-query, multi-query and
//! packed variable-length attention computed by PyTorch in float64 (format in
//! `data/README.md`).

use std::sync::OnceLock;

use nalgebra::DMatrix;
use serde_json::Value;

use crate::{CausalAlign, Reader};

const MHA_PATH: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/data/mha_cases.json");

/// One multi-head golden case. Matrices are in the library's layout: rows are tokens of
/// the packed batch, head `h` occupies columns `h·d ..`.
#[derive(Clone, Debug)]
pub struct MhaCase {
    /// What the case exercises; unique within the file.
    pub name: String,
    /// Who computed `output` (`"torch-2.15-sdpa-f64"` or `"torch-2.15-f64"`).
    pub source: String,
    /// Query heads.
    pub h_q: usize,
    /// Key/value heads (divides `h_q`).
    pub h_kv: usize,
    /// Query/key head width.
    pub d_k: usize,
    /// Value head width.
    pub d_v: usize,
    /// Query rows of each sequence.
    pub seqlens_q: Vec<usize>,
    /// Key rows of each sequence.
    pub seqlens_kv: Vec<usize>,
    /// `Σn_q × h_q·d_k`.
    pub q: DMatrix<f64>,
    /// `Σn_kv × h_kv·d_k`.
    pub k: DMatrix<f64>,
    /// `Σn_kv × h_kv·d_v`.
    pub v: DMatrix<f64>,
    /// `None` means `1/√d_k`.
    pub scale: Option<f64>,
    /// Causal alignment, if causal.
    pub causal: Option<CausalAlign>,
    /// `(left, right)` window, if any.
    pub window: Option<(usize, usize)>,
    /// Softcap, if any.
    pub softcap: Option<f64>,
    /// One ALiBi slope per query head, if any.
    pub alibi_slopes: Option<Vec<f64>>,
    /// `Σn_kv` booleans (true = real key), if any.
    pub key_mask: Option<Vec<bool>>,
    /// `Σn_q × h_q·d_v`.
    pub output: DMatrix<f64>,
    /// `Σn_q × h_q` (row = token, column = head); −∞ for fully masked rows.
    pub lse: DMatrix<f64>,
}

/// Every case of `data/mha_cases.json`, parsed once per process.
///
/// # Panics
/// If the file is missing or malformed (naming the case and field).
///
/// # Example
/// ```
/// let cases = attention_testdata::mha_cases();
/// assert_eq!(cases.len(), 42);
/// let c = &cases[0];
/// assert_eq!(c.q.shape(), (c.seqlens_q.iter().sum(), c.h_q * c.d_k));
/// ```
#[must_use]
pub fn mha_cases() -> Vec<MhaCase> {
    static CASES: OnceLock<Vec<MhaCase>> = OnceLock::new();
    CASES
        .get_or_init(|| crate::load_with(std::path::Path::new(MHA_PATH), parse))
        .clone()
}

pub(crate) fn parse(obj: &serde_json::Map<String, Value>, index: usize) -> MhaCase {
    let mut r = Reader {
        obj,
        case: format!("#{index}"),
    };
    let name = r.string("name");
    r.case = format!("#{index} ({name})");
    let (h_q, h_kv, d_k, d_v) = (r.size("h_q"), r.size("h_kv"), r.size("d_k"), r.size("d_v"));
    let lens = |field: &str| -> Vec<usize> {
        let v = r.field(field);
        let n = v.as_array().map_or(0, Vec::len);
        r.array(field, v, n)
            .iter()
            .map(|x| r.usize_of(field, x))
            .collect()
    };
    let (seqlens_q, seqlens_kv) = (lens("seqlens_q"), lens("seqlens_kv"));
    let (rows_q, rows_kv) = (seqlens_q.iter().sum(), seqlens_kv.iter().sum());
    let causal = r.absent_or_null("causal").map(|v| match v.as_str() {
        Some("top_left") => CausalAlign::TopLeft,
        Some("bottom_right") => CausalAlign::BottomRight,
        _ => r.fail("causal", &format!("unexpected {v}")),
    });
    let window = r.absent_or_null("window").map(|v| {
        let pair = r.array("window", v, 2);
        (
            r.usize_of("window", &pair[0]),
            r.usize_of("window", &pair[1]),
        )
    });
    MhaCase {
        source: r.string("source"),
        q: r.matrix("q", rows_q, h_q * d_k),
        k: r.matrix("k", rows_kv, h_kv * d_k),
        v: r.matrix("v", rows_kv, h_kv * d_v),
        scale: r.absent_or_null("scale").map(|v| r.f64_of("scale", v)),
        causal,
        window,
        softcap: r.absent_or_null("softcap").map(|v| r.f64_of("softcap", v)),
        alibi_slopes: r
            .absent_or_null("alibi_slopes")
            .map(|v| r.f64_vec("alibi_slopes", v, h_q)),
        key_mask: r
            .absent_or_null("key_mask")
            .map(|v| r.bool_vec("key_mask", v, rows_kv)),
        output: r.matrix("output", rows_q, h_q * d_v),
        lse: r.matrix("lse", rows_q, h_q),
        name,
        h_q,
        h_kv,
        d_k,
        d_v,
        seqlens_q,
        seqlens_kv,
    }
}
