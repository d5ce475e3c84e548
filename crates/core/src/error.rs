//! The typed error every fallible function of this crate returns.

use std::fmt;

/// Which argument of a call an error is about.
///
/// The `Display` form is the name used in error messages (`"query"`, `"key mask"`, …).
#[non_exhaustive]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Operand {
    /// The token matrix `X` given to [`compute_qkv`](crate::compute_qkv).
    Input,
    /// The query projection `W_q`.
    QueryWeight,
    /// The key projection `W_k`.
    KeyWeight,
    /// The value projection `W_v`.
    ValueWeight,
    /// The query matrix `Q` (n_q × d_k).
    Query,
    /// The key matrix `K` (n_kv × d_k).
    Key,
    /// The value matrix `V` (n_kv × d_v).
    Value,
    /// The boolean attention mask (n_q × n_kv).
    Mask,
    /// The per-key padding mask (n_kv).
    KeyMask,
    /// The additive bias (n_q × n_kv).
    Bias,
    /// A caller-provided output buffer.
    Output,
    /// The `index`-th partial result given to [`merge_partial_attention`](crate::merge_partial_attention).
    Partial(usize),
    /// The log-sum-exp vector of the `index`-th partial result.
    PartialLse(usize),
}

impl fmt::Display for Operand {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Operand::Input => f.write_str("input"),
            Operand::QueryWeight => f.write_str("query weight"),
            Operand::KeyWeight => f.write_str("key weight"),
            Operand::ValueWeight => f.write_str("value weight"),
            Operand::Query => f.write_str("query"),
            Operand::Key => f.write_str("key"),
            Operand::Value => f.write_str("value"),
            Operand::Mask => f.write_str("mask"),
            Operand::KeyMask => f.write_str("key mask"),
            Operand::Bias => f.write_str("bias"),
            Operand::Output => f.write_str("output"),
            Operand::Partial(i) => write!(f, "partial output {i}"),
            Operand::PartialLse(i) => write!(f, "partial log-sum-exp {i}"),
        }
    }
}

/// Which extent of a matrix a [`AttentionError::DimensionMismatch`] is about.
#[non_exhaustive]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Axis {
    /// The number of rows (tokens).
    Rows,
    /// The number of columns (features).
    Columns,
}

impl fmt::Display for Axis {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Axis::Rows => "rows",
            Axis::Columns => "columns",
        })
    }
}

/// Everything that can go wrong in a call; every message names the operand and the numbers.
///
/// No function of this crate panics on bad input or returns NaN silently: it returns one
/// of these instead.
///
/// # Example
/// ```
/// use attention_core::{self_attention, AttentionError, Axis, Operand};
/// use nalgebra::DMatrix;
///
/// let q = DMatrix::<f64>::zeros(3, 4);
/// let k = DMatrix::<f64>::zeros(2, 5);
/// let v = DMatrix::<f64>::zeros(2, 1);
/// let err = self_attention(&q, &k, &v).unwrap_err();
/// assert_eq!(
///     err,
///     AttentionError::DimensionMismatch {
///         operand: Operand::Key,
///         axis: Axis::Columns,
///         found: 5,
///         expected: 4,
///         against: Operand::Query,
///         rule: "d_k must match",
///     }
/// );
/// assert_eq!(err.to_string(), "key has 5 columns but query has 4 (d_k must match)");
/// ```
#[non_exhaustive]
#[derive(Clone, Debug, PartialEq)]
pub enum AttentionError {
    /// `operand` has `found` rows/columns where `against` requires `expected`.
    DimensionMismatch {
        /// The operand whose extent is wrong.
        operand: Operand,
        /// Which extent.
        axis: Axis,
        /// What `operand` has.
        found: usize,
        /// What it must have.
        expected: usize,
        /// The operand that fixes the expected extent.
        against: Operand,
        /// The rule in words, e.g. `"d_k must match"`.
        rule: &'static str,
    },
    /// A NaN or infinity in an input. `row`/`column` are 0-based (for a vector, `column` is 0).
    NonFinite {
        /// The operand that holds the value.
        operand: Operand,
        /// Row of the value.
        row: usize,
        /// Column of the value.
        column: usize,
        /// The value, widened to f64.
        value: f64,
    },
    /// `d_k = 0` with the default scale 1/√d_k, which is undefined. Pass an explicit scale.
    ZeroHeadDim,
    /// The scale is NaN or infinite.
    InvalidScale {
        /// The scale, widened to f64.
        value: f64,
    },
    /// The softcap must be finite and strictly positive.
    InvalidSoftcap {
        /// The softcap, widened to f64.
        value: f64,
    },
    /// The ALiBi slope must be finite.
    InvalidAlibiSlope {
        /// The slope, widened to f64.
        value: f64,
    },
    /// `scale · q_i · k_j` is not representable: the product overflowed the element type.
    ScoreOverflow {
        /// The query row.
        query: usize,
        /// The key row.
        key: usize,
    },
    /// A matrix product overflowed the element type (e.g. `X · W_q` in [`compute_qkv`](crate::compute_qkv)).
    ProductOverflow {
        /// The result that overflowed.
        operand: Operand,
        /// Row of the first non-finite entry.
        row: usize,
        /// Column of the first non-finite entry.
        column: usize,
    },
    /// [`merge_partial_attention`](crate::merge_partial_attention) was given no partial results.
    NoPartials,
    /// A [`CpuPath`](crate::CpuPath) was forced that this CPU cannot run.
    UnsupportedCpuPath {
        /// The requested path.
        path: crate::CpuPath,
    },
}

impl fmt::Display for AttentionError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AttentionError::DimensionMismatch {
                operand,
                axis,
                found,
                expected,
                against,
                rule,
            } => write!(
                f,
                "{operand} has {found} {axis} but {against} has {expected} ({rule})"
            ),
            AttentionError::NonFinite {
                operand,
                row,
                column,
                value,
            } => write!(
                f,
                "{operand}[{row}, {column}] is {value}: inputs must be finite"
            ),
            AttentionError::ZeroHeadDim => f.write_str(
                "d_k = 0: the default scale 1/sqrt(d_k) is undefined; pass an explicit scale",
            ),
            AttentionError::InvalidScale { value } => {
                write!(f, "scale is {value}: it must be finite")
            }
            AttentionError::InvalidSoftcap { value } => {
                write!(f, "softcap is {value}: it must be finite and > 0")
            }
            AttentionError::InvalidAlibiSlope { value } => {
                write!(f, "ALiBi slope is {value}: it must be finite")
            }
            AttentionError::ScoreOverflow { query, key } => write!(
                f,
                "the score of query {query} and key {key} (scale * q.k) overflows the element type"
            ),
            AttentionError::ProductOverflow {
                operand,
                row,
                column,
            } => write!(
                f,
                "computing the {operand} overflowed at [{row}, {column}]: the product exceeds the element type's range"
            ),
            AttentionError::NoPartials => {
                f.write_str("merge_partial_attention needs at least one partial result")
            }
            AttentionError::UnsupportedCpuPath { path } => {
                write!(
                    f,
                    "the {path:?} kernel path needs CPU features this machine lacks"
                )
            }
        }
    }
}

impl std::error::Error for AttentionError {}
