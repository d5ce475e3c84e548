//! The typed error every fallible function of this crate returns.

use std::fmt;

/// Which argument of a call an error is about.
///
/// The `Display` form is the name used in error messages (`"query"`, `"key mask"`, …).
#[non_exhaustive]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Operand {
    /// The token matrix `X` given to [`compute_qkv`](crate::compute_qkv) or to a
    /// [`MultiHeadAttention`](crate::MultiHeadAttention) layer (in cross-attention: the
    /// queries' tokens `X_q`).
    Input,
    /// The tokens `X_kv` that keys and values are projected from in
    /// [`MultiHeadAttention::forward_cross`](crate::MultiHeadAttention::forward_cross).
    KeyValueInput,
    /// The query projection `W_q`.
    QueryWeight,
    /// The key projection `W_k`.
    KeyWeight,
    /// The value projection `W_v`.
    ValueWeight,
    /// The output projection `W_o` of a [`MultiHeadAttention`](crate::MultiHeadAttention)
    /// layer (h_q·d_v × d_model).
    OutputWeight,
    /// The query bias `b_q` of a layer (h_q·d_head entries).
    QueryBias,
    /// The key bias `b_k` of a layer (h_kv·d_head entries).
    KeyBias,
    /// The value bias `b_v` of a layer (h_kv·d_v entries).
    ValueBias,
    /// The output bias `b_o` of a layer (d_model entries).
    OutputBias,
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
    /// The attention output (n_q × d_v), returned or caller-provided.
    Output,
    /// The log-sum-exp vector of a result (n_q).
    Lse,
    /// The gradient flowing into the output, `∂L/∂output` (n_q × d_v), given to
    /// [`scaled_dot_product_attention_backward`](crate::scaled_dot_product_attention_backward).
    OutputGradient,
    /// A caller's output for a gradient of
    /// [`scaled_dot_product_attention_backward_into`](crate::scaled_dot_product_attention_backward_into):
    /// `∂L/∂` the operand named inside (query, key, value or bias).
    Gradient(GradientOf),
    /// The attention-weight matrix of [`attention_weights`](crate::attention_weights)
    /// (n_q × n_kv).
    Weights,
    /// The `index`-th partial result given to [`merge_partial_attention`](crate::merge_partial_attention).
    Partial(usize),
    /// The log-sum-exp vector of the `index`-th partial result.
    PartialLse(usize),
    /// The per-query-head ALiBi slopes of [`AttentionOptions::with_alibi_slopes`](crate::AttentionOptions::with_alibi_slopes).
    AlibiSlopes,
    /// The query lengths of a packed batch ([`HeadLayout::with_seqlens`](crate::HeadLayout::with_seqlens)).
    QueryLengths,
    /// The key/value lengths of a packed batch.
    KeyLengths,
    /// The boolean mask of sequence `index` of a batch (its n_q × n_kv).
    SequenceMask(usize),
    /// The additive bias of sequence `index` of a batch (its n_q × n_kv).
    SequenceBias(usize),
    /// The matrix [`Rope::apply`](crate::Rope::apply) rotates (n × heads·d_head).
    RopeInput,
    /// The per-token positions given to [`Rope::apply`](crate::Rope::apply) (n).
    Positions,
    /// The key rows given to [`KvCache::append`](crate::KvCache::append)
    /// (n × heads_kv·d_k); rows are counted from the first new row.
    NewKeys,
    /// The value rows given to [`KvCache::append`](crate::KvCache::append)
    /// (n × heads_kv·d_v); rows are counted from the first new row.
    NewValues,
    /// A [`KvCache`](crate::KvCache): its head count and widths fix the shapes of what is
    /// appended to it and of the queries that attend through it.
    KvCache,
    /// The [`HeadLayout`](crate::HeadLayout) of a call.
    HeadLayout,
}

/// Which quantity a [`Operand::Gradient`] is the gradient of (a gradient given to a
/// backward function, or one it computes).
#[non_exhaustive]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum GradientOf {
    /// dQ (n_q × d_k).
    Query,
    /// dK (n_kv × d_k).
    Key,
    /// dV (n_kv × d_v).
    Value,
    /// d_bias (n_q × n_kv).
    Bias,
    /// dX of [`compute_qkv_backward`](crate::compute_qkv_backward) (n × d_model).
    Input,
    /// dW_q (d_model × d_k).
    QueryWeight,
    /// dW_k (d_model × d_k).
    KeyWeight,
    /// dW_v (d_model × d_v).
    ValueWeight,
    /// dW_o of a layer's output projection.
    OutputWeight,
    /// dA: a layer's heads' outputs side by side, before the output projection.
    HeadOutputs,
    /// db_q of a layer.
    QueryBias,
    /// db_k of a layer.
    KeyBias,
    /// db_v of a layer.
    ValueBias,
    /// db_o of a layer.
    OutputBias,
}

impl fmt::Display for Operand {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Operand::Input => f.write_str("input"),
            Operand::KeyValueInput => f.write_str("key/value input"),
            Operand::QueryWeight => f.write_str("query weight"),
            Operand::KeyWeight => f.write_str("key weight"),
            Operand::ValueWeight => f.write_str("value weight"),
            Operand::OutputWeight => f.write_str("output weight"),
            Operand::QueryBias => f.write_str("query bias"),
            Operand::KeyBias => f.write_str("key bias"),
            Operand::ValueBias => f.write_str("value bias"),
            Operand::OutputBias => f.write_str("output bias"),
            Operand::Query => f.write_str("query"),
            Operand::Key => f.write_str("key"),
            Operand::Value => f.write_str("value"),
            Operand::Mask => f.write_str("mask"),
            Operand::KeyMask => f.write_str("key mask"),
            Operand::Bias => f.write_str("bias"),
            Operand::Output => f.write_str("output"),
            Operand::Lse => f.write_str("log-sum-exp"),
            Operand::OutputGradient => f.write_str("output gradient"),
            Operand::Gradient(g) => write!(
                f,
                "{} gradient",
                match g {
                    GradientOf::Query => "query",
                    GradientOf::Key => "key",
                    GradientOf::Value => "value",
                    GradientOf::Bias => "bias",
                    GradientOf::Input => "input",
                    GradientOf::QueryWeight => "query weight",
                    GradientOf::KeyWeight => "key weight",
                    GradientOf::ValueWeight => "value weight",
                    GradientOf::OutputWeight => "output weight",
                    GradientOf::HeadOutputs => "heads' output",
                    GradientOf::QueryBias => "query bias",
                    GradientOf::KeyBias => "key bias",
                    GradientOf::ValueBias => "value bias",
                    GradientOf::OutputBias => "output bias",
                }
            ),
            Operand::Weights => f.write_str("attention weights"),
            Operand::Partial(i) => write!(f, "partial output {i}"),
            Operand::PartialLse(i) => write!(f, "partial log-sum-exp {i}"),
            Operand::AlibiSlopes => f.write_str("ALiBi slopes"),
            Operand::QueryLengths => f.write_str("query lengths"),
            Operand::KeyLengths => f.write_str("key lengths"),
            Operand::SequenceMask(s) => write!(f, "mask of sequence {s}"),
            Operand::SequenceBias(s) => write!(f, "bias of sequence {s}"),
            Operand::RopeInput => f.write_str("RoPE input"),
            Operand::Positions => f.write_str("positions"),
            Operand::NewKeys => f.write_str("new keys"),
            Operand::NewValues => f.write_str("new values"),
            Operand::KvCache => f.write_str("KV cache"),
            Operand::HeadLayout => f.write_str("head layout"),
        }
    }
}

impl Operand {
    /// Whether the operand is a vector (its entries are named by one index).
    fn is_vector(self) -> bool {
        matches!(
            self,
            Operand::KeyMask
                | Operand::Lse
                | Operand::PartialLse(_)
                | Operand::AlibiSlopes
                | Operand::QueryLengths
                | Operand::KeyLengths
                | Operand::Positions
                | Operand::QueryBias
                | Operand::KeyBias
                | Operand::ValueBias
                | Operand::OutputBias
        )
    }

    /// Whether −∞ is a meaningful entry (it masks), so only NaN and +∞ are rejected.
    fn allows_neg_infinity(self) -> bool {
        matches!(
            self,
            Operand::Bias | Operand::SequenceBias(_) | Operand::PartialLse(_)
        )
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
    /// The number of entries of a vector (a key mask, a log-sum-exp).
    Entries,
    /// The number of key/value heads (of a [`KvCache`](crate::KvCache) or a
    /// [`HeadLayout`](crate::HeadLayout)).
    Heads,
}

impl fmt::Display for Axis {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Axis::Rows => "rows",
            Axis::Columns => "columns",
            Axis::Entries => "entries",
            Axis::Heads => "key/value heads",
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
    /// A NaN or infinity in an input (for a bias or a partial log-sum-exp, where −∞ masks:
    /// a NaN or +∞). `row`/`column` are 0-based (for a vector, `row` is the entry and
    /// `column` is 0).
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
    /// A score that decides the result lies outside the element type's range: for an
    /// allowed pair, `scale · q_i · k_j` (computed without intermediate overflow) is, or
    /// the final score after softcap, ALiBi and bias is `+∞`; or every allowed score of
    /// the row falls below `−MAX` (then `key` is the row's first allowed key). The pair
    /// reported is the smallest `(query, key)` in lexicographic order, the same on every
    /// CPU path, thread count and function. An allowed score below `−MAX` in a row that has
    /// a finite score is not an error: its weight is exactly 0, as the true weight rounds.
    ScoreOverflow {
        /// The query row.
        query: usize,
        /// The key row.
        key: usize,
    },
    /// A projection `X · W` (plus its bias, if any) in [`compute_qkv`](crate::compute_qkv)
    /// or a [`MultiHeadAttention`](crate::MultiHeadAttention) layer overflowed the element
    /// type: `operand` is [`Operand::Query`], [`Operand::Key`] or [`Operand::Value`] for
    /// the input projections, [`Operand::Output`] for a layer's output projection. From
    /// [`scaled_dot_product_attention_backward`](crate::scaled_dot_product_attention_backward):
    /// the gradient of that operand (dQ, dK, dV) exceeds the type's range.
    /// (Attention outputs never overflow: they are convex combinations of values.)
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
    /// [`ScoreOverflow`](AttentionError::ScoreOverflow) in one head of a multi-head call
    /// ([`multi_head_attention`](crate::multi_head_attention)): `query` and `key` are rows
    /// of the packed Q and K. Reported for the smallest `(query, head, key)`.
    HeadScoreOverflow {
        /// The query head.
        head: usize,
        /// The query row (of the packed batch).
        query: usize,
        /// The key row (of the packed batch).
        key: usize,
    },
    /// The head counts of a [`HeadLayout`](crate::HeadLayout) are unusable: both must be
    /// ≥ 1 and `heads_q` a multiple of `heads_kv`.
    InvalidHeads {
        /// Query heads.
        heads_q: usize,
        /// Key/value heads.
        heads_kv: usize,
    },
    /// `operand`'s columns do not split into `heads` heads of one width (for K: of the
    /// query's head width `d_k`), or `heads` is 0.
    HeadSplit {
        /// The matrix whose columns do not split.
        operand: Operand,
        /// Its number of columns.
        columns: usize,
        /// The number of heads it must hold.
        heads: usize,
        /// The required width of a head, when another operand fixes it (K's `d_k`).
        head_width: Option<usize>,
    },
    /// The lengths of a packed batch do not add up to the rows of the matrix they split.
    SequenceLengths {
        /// The matrix split by the lengths (query, or key for keys and values).
        operand: Operand,
        /// The sum of the lengths.
        sum: usize,
        /// The matrix's rows.
        rows: usize,
    },
    /// Two options that exclude each other, or an option that does not fit the call.
    InvalidOption {
        /// The option, as its builder method is named (`"with_mask"`).
        option: &'static str,
        /// The rule in words.
        rule: &'static str,
    },
    /// A [`CpuPath`](crate::CpuPath) was forced that this CPU cannot run.
    UnsupportedCpuPath {
        /// The requested path.
        path: crate::CpuPath,
    },
    /// A result or working buffer of `rows × columns` elements cannot be allocated (more
    /// memory than the process can have, or more elements than `usize` counts). Nothing was
    /// computed.
    TooLarge {
        /// What needed the memory: the result ([`Operand::Output`], [`Operand::Weights`],
        /// [`Operand::Lse`]) or a working copy of an input.
        operand: Operand,
        /// Rows (or entries) of the buffer.
        rows: usize,
        /// Columns of the buffer (1 for a vector).
        columns: usize,
    },
    /// The rotary dimension of a [`Rope`](crate::Rope) breaks `rule`: it must be even,
    /// at least 2 and at most the head width.
    InvalidRotaryDim {
        /// The rotary dimension `r`.
        rotary_dim: usize,
        /// The width of each head (`columns / heads`).
        head_dim: usize,
        /// The rule in words, e.g. `"must be even"`.
        rule: &'static str,
    },
    /// The RoPE base θ must be finite and at least 1 (then every inverse frequency
    /// θ^(−2p/r) lies in (0, 1] and every angle is finite).
    InvalidRopeBase {
        /// The base.
        value: f64,
    },
    /// Rotating an entry whose magnitude is near the element type's maximum gave a value
    /// outside its range (the rotated pair's norm is preserved, but one coordinate can
    /// reach √2 times the larger input). Inputs with every |x| ≤ MAX/2 never cause it.
    /// `row`/`column` name the first such output, in (row, column) order. Nothing was
    /// written.
    RotationOverflow {
        /// Row of the output that overflowed.
        row: usize,
        /// Column of the output that overflowed.
        column: usize,
    },
    /// The [`SeqId`](crate::SeqId) is not a sequence of this [`KvCache`](crate::KvCache):
    /// it was removed (ids are never reused) or belongs to another cache.
    UnknownSequence {
        /// The id given.
        sequence: crate::SeqId,
    },
    /// A call on a sliding-window [`KvCache`](crate::KvCache) needs tokens the window has
    /// already evicted: [`KvCache::truncate`](crate::KvCache::truncate) to a length whose
    /// last `w − 1` tokens are no longer all kept, or
    /// [`cached_attention`](crate::cached_attention) with more queries than the newest
    /// appended chunk. Nothing was changed.
    Evicted {
        /// The first absolute position the call needs.
        needed_from: usize,
        /// The first absolute position the cache still holds.
        first_kept: usize,
    },
    /// [`KvCache::truncate`](crate::KvCache::truncate) to a length beyond the sequence's
    /// history: truncating only shortens.
    TruncateBeyond {
        /// The length asked for.
        len: usize,
        /// The sequence's length (tokens appended so far).
        history: usize,
    },
    /// The log-sum-exp given to
    /// [`scaled_dot_product_attention_backward`](crate::scaled_dot_product_attention_backward)
    /// cannot come from these inputs: row `row` has an allowed key but its lse is −∞, or a
    /// recomputed weight `exp(s_ij − lse_i)` of that row exceeds 1 by more than the
    /// forward's rounding allows (key `key`). For a multi-head call `row` and `key` are
    /// rows of the packed batch and `head` the query head (0 for a single head).
    InvalidLse {
        /// The query head.
        head: usize,
        /// The query row.
        row: usize,
        /// The key whose weight shows it.
        key: usize,
        /// The lse given, widened to f64.
        value: f64,
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
            } => {
                write!(f, "{operand}")?;
                if operand.is_vector() {
                    write!(f, "[{row}]")?;
                } else {
                    write!(f, "[{row}, {column}]")?;
                }
                let value = if *value == f64::INFINITY {
                    "+inf".to_string()
                } else {
                    value.to_string()
                };
                if operand.allows_neg_infinity() {
                    write!(f, " is {value}: its entries must be finite or -inf")
                } else {
                    write!(f, " is {value}: inputs must be finite")
                }
            }
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
                "the score of query {query} and key {key} lies outside the element type's range (see ScoreOverflow's documentation)"
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
            AttentionError::TooLarge {
                operand,
                rows,
                columns,
            } => write!(
                f,
                "the {operand} ({rows} x {columns} elements) needs more memory than can be allocated"
            ),
            AttentionError::HeadScoreOverflow { head, query, key } => write!(
                f,
                "in head {head}, the score of query {query} and key {key} lies outside the element type's range (see ScoreOverflow's documentation)"
            ),
            AttentionError::InvalidHeads { heads_q, heads_kv } => write!(
                f,
                "{heads_q} query heads and {heads_kv} key/value heads: both must be at least 1 and the query heads a multiple of the key/value heads"
            ),
            AttentionError::HeadSplit {
                operand,
                columns,
                heads,
                head_width,
            } => match head_width {
                Some(w) => write!(
                    f,
                    "{operand} has {columns} columns but {heads} heads of width {w} need {}",
                    heads.saturating_mul(*w)
                ),
                None => write!(
                    f,
                    "{operand} has {columns} columns, which do not split into {heads} heads of equal width"
                ),
            },
            AttentionError::SequenceLengths { operand, sum, rows } => write!(
                f,
                "the {operand} lengths sum to {sum} but {operand} has {rows} rows"
            ),
            AttentionError::InvalidOption { option, rule } => write!(f, "{option}: {rule}"),
            AttentionError::InvalidRotaryDim {
                rotary_dim,
                head_dim,
                rule,
            } => write!(
                f,
                "rotary dimension {rotary_dim} with heads of width {head_dim}: it {rule} (even, at least 2, at most the head width)"
            ),
            AttentionError::InvalidRopeBase { value } => {
                write!(f, "RoPE base is {value}: it must be finite and at least 1")
            }
            AttentionError::RotationOverflow { row, column } => write!(
                f,
                "rotating the RoPE input overflowed at [{row}, {column}]: the result exceeds the element type's range"
            ),
            AttentionError::UnknownSequence { sequence } => write!(
                f,
                "sequence {sequence} is not in this KV cache (removed, or never added to it)"
            ),
            AttentionError::Evicted {
                needed_from,
                first_kept,
            } => write!(
                f,
                "the call needs the tokens from position {needed_from}, but the sliding window has evicted those before {first_kept}"
            ),
            AttentionError::InvalidLse {
                head,
                row,
                key,
                value,
            } => write!(
                f,
                "log-sum-exp [{row}, head {head}] is {value}, which cannot come from these inputs: key {key}'s weight exp(s - lse) would exceed 1"
            ),
            AttentionError::TruncateBeyond { len, history } => write!(
                f,
                "cannot truncate a sequence of {history} tokens to {len}: truncate only shortens"
            ),
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

/// `Ok` if `found == expected`, else the [`AttentionError::DimensionMismatch`] saying so:
/// every shape check of the crate goes through here.
pub(crate) fn check_dim(
    operand: Operand,
    axis: Axis,
    found: usize,
    expected: usize,
    against: Operand,
    rule: &'static str,
) -> Result<(), AttentionError> {
    if found == expected {
        Ok(())
    } else {
        Err(AttentionError::DimensionMismatch {
            operand,
            axis,
            found,
            expected,
            against,
            rule,
        })
    }
}
