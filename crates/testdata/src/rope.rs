//! The rotary position embedding (RoPE) golden cases, `data/rope_cases.json`.

use std::path::Path;
use std::sync::OnceLock;

use nalgebra::DMatrix;
use serde_json::{Map, Value};

use crate::{Reader, load_with};

/// Path of the RoPE golden file, resolved when this crate is compiled.
const ROPE_PATH: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/data/rope_cases.json");

/// Which dimensions of a head rotate together (JSON `convention`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RopePairing {
    /// `"half"` (GPT-NeoX / Llama, PyTorch's `rotate_half`): dimension `p` with `p + r/2`.
    Half,
    /// `"interleaved"` (GPT-J): dimension `2p` with `2p + 1`.
    Interleaved,
}

/// One RoPE golden case: `x`, the parameters, and the rotated `output` computed by torch
/// in float64.
///
/// Pair `p` (0 ≤ p < r/2) of each head turns by `positions[t] · base^(−2p/r)`:
/// `(a, b) ← (a·cos − b·sin, b·cos + a·sin)`; dimensions `r .. d_head` pass through.
#[derive(Clone, Debug)]
pub struct RopeCase {
    /// What the case exercises, e.g. `"rope_half_n7_h3_d16_r8_b10000_offset"`; unique.
    pub name: String,
    /// Who computed `output`: `"explicit-torch-f64"`.
    pub source: String,
    /// Which dimensions pair up.
    pub pairing: RopePairing,
    /// Number of tokens (rows).
    pub n: usize,
    /// Number of heads.
    pub heads: usize,
    /// Width of each head.
    pub d_head: usize,
    /// Rotary dimension r (even, ≤ d_head).
    pub rotary_dim: usize,
    /// The base θ.
    pub base: f64,
    /// One position per token.
    pub positions: Vec<usize>,
    /// The input, n × heads·d_head (head h in columns h·d_head .. (h+1)·d_head).
    pub x: DMatrix<f64>,
    /// The expected result, n × heads·d_head.
    pub output: DMatrix<f64>,
}

/// Loads every RoPE golden case from `data/rope_cases.json`, in file order.
///
/// # Panics
///
/// If the file cannot be read or parsed, or a case is malformed (missing field, wrong
/// type, unknown convention, list length not matching the shape); the message names the
/// case and field.
///
/// # Example
///
/// ```
/// let cases = attention_testdata::rope_cases();
/// assert_eq!(cases.len(), 60);
/// let c = &cases[0];
/// assert_eq!(c.x.shape(), (c.n, c.heads * c.d_head));
/// ```
#[must_use]
pub fn rope_cases() -> Vec<RopeCase> {
    static CASES: OnceLock<Vec<RopeCase>> = OnceLock::new();
    CASES
        .get_or_init(|| load_with(Path::new(ROPE_PATH), parse_rope_case))
        .clone()
}

fn parse_rope_case(obj: &Map<String, Value>, index: usize) -> RopeCase {
    let mut r = Reader {
        obj,
        case: format!("#{index}"),
    };
    let name = r.string("name");
    r.case = format!("#{index} ({name})");

    let pairing = match r.string("convention").as_str() {
        "half" => RopePairing::Half,
        "interleaved" => RopePairing::Interleaved,
        other => r.fail(
            "convention",
            &format!("expected \"half\" or \"interleaved\", got {other:?}"),
        ),
    };
    let n = r.size("n");
    let heads = r.size("heads");
    let d_head = r.size("d_head");
    let columns = heads * d_head;
    let positions = r
        .array("positions", r.field("positions"), n)
        .iter()
        .map(|p| r.usize_of("positions", p))
        .collect();
    let base = {
        let v = r.field("base");
        r.f64_of("base", v)
    };

    RopeCase {
        source: r.string("source"),
        pairing,
        n,
        heads,
        d_head,
        rotary_dim: r.size("rotary_dim"),
        base,
        positions,
        x: r.matrix("x", n, columns),
        output: r.matrix("output", n, columns),
        name,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn minimal() -> Value {
        json!({
            "name": "t", "source": "test", "convention": "interleaved",
            "n": 2, "heads": 2, "d_head": 2, "rotary_dim": 2, "base": 10000.0,
            "positions": [0, 7],
            "x": [1, 2, 3, 4, 5, 6, 7, 8], "output": [1, 2, 3, 4, 5, 6, 7, 8],
        })
    }

    fn parse(value: &Value) -> RopeCase {
        parse_rope_case(value.as_object().unwrap(), 0)
    }

    #[test]
    fn file_has_60_consistent_cases() {
        let cases = rope_cases();
        assert_eq!(cases.len(), 60);
        let mut names = std::collections::HashSet::new();
        for c in &cases {
            assert!(names.insert(c.name.clone()), "duplicate name {}", c.name);
            assert_eq!(c.source, "explicit-torch-f64", "{}", c.name);
            assert_eq!(c.x.shape(), (c.n, c.heads * c.d_head), "{}: x", c.name);
            assert_eq!(c.output.shape(), c.x.shape(), "{}: output", c.name);
            assert_eq!(c.positions.len(), c.n, "{}: positions", c.name);
            assert!(
                c.rotary_dim > 0 && c.rotary_dim.is_multiple_of(2) && c.rotary_dim <= c.d_head,
                "{}: rotary_dim",
                c.name
            );
            assert!(c.base.is_finite() && c.base >= 1.0, "{}: base", c.name);
            assert!(c.x.iter().chain(c.output.iter()).all(|v| v.is_finite()));
        }
        // Both conventions, partial rotary dimensions and both bases are present.
        assert!(cases.iter().any(|c| c.pairing == RopePairing::Half));
        assert!(cases.iter().any(|c| c.pairing == RopePairing::Interleaved));
        assert!(cases.iter().any(|c| c.rotary_dim < c.d_head));
        assert!(cases.iter().any(|c| c.base == 500_000.0));
    }

    #[test]
    fn row_major_and_fields() {
        let c = parse(&minimal());
        assert_eq!(c.pairing, RopePairing::Interleaved);
        assert_eq!(c.positions, vec![0, 7]);
        assert_eq!(c.x.shape(), (2, 4));
        assert_eq!(c.x[(0, 3)], 4.0);
        assert_eq!(c.x[(1, 0)], 5.0);
        let first = &rope_cases()[0];
        assert_eq!(first.name, "rope_half_n1_h1_d2_r2_b10000_from0");
        assert_eq!(first.x[(0, 1)], 0.33043707618338714);
    }

    #[test]
    #[should_panic(expected = "field \"convention\": expected \"half\" or \"interleaved\"")]
    fn unknown_convention_panics_with_field_name() {
        let mut v = minimal();
        v["convention"] = json!("neox");
        let _ = parse(&v);
    }

    #[test]
    #[should_panic(expected = "field \"positions\": expected 2 elements, found 1")]
    fn wrong_positions_length_panics() {
        let mut v = minimal();
        v["positions"] = json!([3]);
        let _ = parse(&v);
    }

    #[test]
    #[should_panic(expected = "field \"positions\": expected a size, got -1")]
    fn negative_position_panics() {
        let mut v = minimal();
        v["positions"] = json!([0, -1]);
        let _ = parse(&v);
    }
}
