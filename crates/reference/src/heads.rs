//! Multi-head, grouped-query and packed variable-length attention, by definition: a loop
//! over sequences and query heads, each a call of the single-head [`attention()`] on copies
//! of its rows and columns.

use nalgebra::DMatrix;

use crate::{Dropout, Options, attention, attention_backward};

/// How a packed batch splits into heads (columns) and sequences (rows).
///
/// Head `h` of Q occupies columns `h·d_k .. (h+1)·d_k` (PyTorch's `x.view(n, heads, d)`),
/// and likewise for K, V and the output. With `heads_q = g·heads_kv`, query head `h` reads
/// key/value head `h / g`. Sequence `s` occupies query rows `Σ_{t<s} seqlens_q[t] ..` and
/// key rows `Σ_{t<s} seqlens_kv[t] ..`; lengths may be 0.
#[derive(Clone, Debug)]
pub struct Layout {
    /// Number of query heads `h_q`.
    pub heads_q: usize,
    /// Number of key/value heads `h_kv` (divides `h_q`).
    pub heads_kv: usize,
    /// Query rows of each sequence.
    pub seqlens_q: Vec<usize>,
    /// Key/value rows of each sequence (as many entries as `seqlens_q`).
    pub seqlens_kv: Vec<usize>,
}

/// Options of [`multi_head_attention`]: the single-head [`Options`] apply within each
/// sequence and head, with these differences.
#[derive(Clone, Debug, Default)]
pub struct HeadOptions {
    /// Scale (default `1/√d_k`, `d_k` the head width), causal, window and softcap, the
    /// same for every head and sequence. Its `mask`, `bias` and `key_mask` must be `None`
    /// (use the fields below), and so must its `alibi_slope` when `alibi_slopes` is set.
    /// A single `alibi_slope` applies to every head.
    pub base: Options,
    /// One ALiBi slope per query head.
    pub alibi_slopes: Option<Vec<f64>>,
    /// Σn_kv entries over the packed keys; `false` = padding.
    pub key_mask: Option<Vec<bool>>,
    /// One `n_q × n_kv` mask per sequence, shared by its heads.
    pub masks: Option<Vec<DMatrix<bool>>>,
    /// One `n_q × n_kv` additive bias per sequence, shared by its heads.
    pub biases: Option<Vec<DMatrix<f64>>>,
}

/// Result of [`multi_head_attention`].
#[derive(Clone, Debug)]
pub struct HeadAttention {
    /// `Σn_q × h_q·d_v`: head `h` of row `r` in columns `h·d_v ..`.
    pub output: DMatrix<f64>,
    /// `Σn_q × h_q`: row = token, column = head; −∞ for a row with no allowed key.
    pub lse: DMatrix<f64>,
}

/// Attention of every sequence and query head of a packed batch (see [`Layout`]).
///
/// # Shapes
/// `query` Σn_q × h_q·d_k, `key` Σn_kv × h_kv·d_k, `value` Σn_kv × h_kv·d_v.
///
/// # Panics
/// If the shapes, lengths or head counts disagree (the oracle asserts its preconditions).
///
/// # Example
/// ```
/// use attention_reference::{attention, multi_head_attention, HeadOptions, Layout, Options};
/// use nalgebra::DMatrix;
///
/// // Two query heads sharing one key/value head (multi-query), one sequence of 3 tokens.
/// let q = DMatrix::from_fn(3, 4, |i, j| (i + 2 * j) as f64 * 0.1);
/// let k = DMatrix::from_fn(3, 2, |i, j| (i * j) as f64 * 0.2);
/// let v = DMatrix::from_fn(3, 2, |i, j| (i + j) as f64);
/// let layout = Layout { heads_q: 2, heads_kv: 1, seqlens_q: vec![3], seqlens_kv: vec![3] };
/// let got = multi_head_attention(&q, &k, &v, &layout, &HeadOptions::default());
/// let head1 = attention(&q.columns(2, 2).into_owned(), &k, &v, &Options::default());
/// assert_eq!(got.output.columns(2, 2), head1.output);
/// ```
#[must_use]
pub fn multi_head_attention<T: Copy + Into<f64>>(
    query: &DMatrix<T>,
    key: &DMatrix<T>,
    value: &DMatrix<T>,
    layout: &Layout,
    options: &HeadOptions,
) -> HeadAttention {
    let (g, d_k, d_v) = check(query, key, value, layout, options);
    let h_q = layout.heads_q;
    let mut output = DMatrix::zeros(query.nrows(), h_q * d_v);
    let mut lse = DMatrix::from_element(query.nrows(), h_q, f64::NEG_INFINITY);
    let (mut row_q, mut row_kv) = (0, 0);
    for s in 0..layout.seqlens_q.len() {
        let (n_q, n_kv) = (layout.seqlens_q[s], layout.seqlens_kv[s]);
        for h in 0..h_q {
            let q = block(query, row_q, n_q, h * d_k, d_k);
            let k = block(key, row_kv, n_kv, (h / g) * d_k, d_k);
            let v = block(value, row_kv, n_kv, (h / g) * d_v, d_v);
            let opts = head_options(options, (s, h), row_kv..row_kv + n_kv);
            let att = attention(&q, &k, &v, &opts);
            for i in 0..n_q {
                for c in 0..d_v {
                    output[(row_q + i, h * d_v + c)] = att.output[(i, c)];
                }
                lse[(row_q + i, h)] = att.lse[i];
            }
        }
        row_q += n_q;
        row_kv += n_kv;
    }
    HeadAttention { output, lse }
}

/// Checks the shapes, lengths and head counts of a multi-head call and returns
/// `(g, d_k, d_v)`: query heads per key/value head and the head widths.
fn check<T>(
    query: &DMatrix<T>,
    key: &DMatrix<T>,
    value: &DMatrix<T>,
    layout: &Layout,
    options: &HeadOptions,
) -> (usize, usize, usize) {
    let (h_q, h_kv) = (layout.heads_q, layout.heads_kv);
    assert!(
        h_q > 0 && h_kv > 0 && h_q % h_kv == 0,
        "heads: h_q = {h_q} must be a positive multiple of h_kv = {h_kv}"
    );
    let g = h_q / h_kv;
    assert_eq!(
        query.ncols() % h_q,
        0,
        "query columns do not split into {h_q} heads"
    );
    let d_k = query.ncols() / h_q;
    assert_eq!(key.ncols(), h_kv * d_k, "key must have h_kv·d_k columns");
    assert_eq!(
        value.ncols() % h_kv,
        0,
        "value columns do not split into {h_kv} heads"
    );
    let d_v = value.ncols() / h_kv;
    assert_eq!(
        layout.seqlens_q.len(),
        layout.seqlens_kv.len(),
        "one key length per sequence"
    );
    assert_eq!(
        layout.seqlens_q.iter().sum::<usize>(),
        query.nrows(),
        "query lengths must sum to the query rows"
    );
    assert_eq!(
        layout.seqlens_kv.iter().sum::<usize>(),
        key.nrows(),
        "key lengths must sum to the key rows"
    );
    assert_eq!(value.nrows(), key.nrows(), "one value row per key");
    let base = &options.base;
    assert!(
        base.mask.is_none() && base.bias.is_none() && base.key_mask.is_none(),
        "per-sequence masks and biases and the packed key mask go in HeadOptions"
    );
    if let Some(slopes) = &options.alibi_slopes {
        assert!(
            base.alibi_slope.is_none(),
            "alibi_slope and alibi_slopes are exclusive"
        );
        assert_eq!(slopes.len(), h_q, "one ALiBi slope per query head");
    }
    let n_seq = layout.seqlens_q.len();
    if let Some(key_mask) = &options.key_mask {
        assert_eq!(
            key_mask.len(),
            key.nrows(),
            "one key-mask entry per packed key"
        );
    }
    for list in [
        options.masks.as_ref().map(Vec::len),
        options.biases.as_ref().map(Vec::len),
    ]
    .into_iter()
    .flatten()
    {
        assert_eq!(list, n_seq, "one mask or bias per sequence");
    }

    (g, d_k, d_v)
}

/// Rows `r0 .. r0 + n`, columns `c0 .. c0 + d` of `m`, in f64.
fn block<T: Copy + Into<f64>>(
    m: &DMatrix<T>,
    r0: usize,
    n: usize,
    c0: usize,
    d: usize,
) -> DMatrix<f64> {
    DMatrix::from_fn(n, d, |i, j| m[(r0 + i, c0 + j)].into())
}

/// The single-head options of sequence `s`, query head `h`, whose keys are the packed
/// rows `keys`.
fn head_options(
    options: &HeadOptions,
    (s, h): (usize, usize),
    keys: std::ops::Range<usize>,
) -> Options {
    let mut opts = options.base.clone();
    if let Some(slopes) = &options.alibi_slopes {
        opts.alibi_slope = Some(slopes[h]);
    }
    opts.key_mask = options.key_mask.as_ref().map(|m| m[keys].to_vec());
    opts.mask = options.masks.as_ref().map(|m| m[s].clone());
    opts.bias = options.biases.as_ref().map(|b| b[s].clone());
    opts.dropout = opts.dropout.map(|d| Dropout {
        head: h as u32,
        sequence: s as u32,
        ..d
    });
    opts
}

/// Result of [`multi_head_backward`].
#[derive(Clone, Debug)]
pub struct HeadGradients {
    /// `∂L/∂Q`, `Σn_q × h_q·d_k`.
    pub dq: DMatrix<f64>,
    /// `∂L/∂K`, `Σn_kv × h_kv·d_k`: key/value head `j`'s gradient sums over the `g` query
    /// heads that read it.
    pub dk: DMatrix<f64>,
    /// `∂L/∂V`, `Σn_kv × h_kv·d_v`, summed likewise.
    pub dv: DMatrix<f64>,
    /// Per sequence, `∂L/∂bias` of a bias shared by its heads (`n_q × n_kv`): the sum over
    /// the heads of each head's score gradient (see [`Gradients::d_bias`](crate::Gradients)).
    pub d_biases: Vec<DMatrix<f64>>,
}

/// The gradients of [`multi_head_attention`] given `d_out = ∂L/∂output`
/// (`Σn_q × h_q·d_v`), by definition: [`attention_backward`] per sequence and query head
/// on copies of its blocks, the key/value heads' gradients summed over the query heads of
/// their group, and each sequence's bias gradient summed over its heads.
///
/// # Panics
/// As [`multi_head_attention`], and if `d_out` is not `Σn_q × h_q·d_v`.
///
/// # Example
/// ```
/// use attention_reference::{attention_backward, multi_head_backward, HeadOptions, Layout, Options};
/// use nalgebra::DMatrix;
///
/// // Two query heads reading one key/value head: dK is the sum of both heads' dK.
/// let q = DMatrix::from_fn(3, 4, |i, j| ((i + 2 * j) as f64 * 0.7).sin());
/// let k = DMatrix::from_fn(3, 2, |i, j| ((i * j) as f64 * 0.3).cos());
/// let v = DMatrix::from_fn(3, 2, |i, j| (i + j) as f64);
/// let d_out = DMatrix::from_fn(3, 4, |i, j| (i * 4 + j) as f64 * 0.1);
/// let layout = Layout { heads_q: 2, heads_kv: 1, seqlens_q: vec![3], seqlens_kv: vec![3] };
/// let g = multi_head_backward(&q, &k, &v, &d_out, &layout, &HeadOptions::default());
/// let head = |h: usize| attention_backward(
///     &q.columns(2 * h, 2).into_owned(), &k, &v, &d_out.columns(2 * h, 2).into_owned(),
///     &Options::default());
/// assert!((&g.dk - (head(0).dk + head(1).dk)).amax() < 1e-15);
/// ```
#[must_use]
pub fn multi_head_backward<T: Copy + Into<f64>>(
    query: &DMatrix<T>,
    key: &DMatrix<T>,
    value: &DMatrix<T>,
    d_out: &DMatrix<T>,
    layout: &Layout,
    options: &HeadOptions,
) -> HeadGradients {
    let (g, d_k, d_v) = check(query, key, value, layout, options);
    let h_q = layout.heads_q;
    assert_eq!(
        d_out.shape(),
        (query.nrows(), h_q * d_v),
        "d_out must be Σn_q × h_q·d_v"
    );
    let mut dq = DMatrix::zeros(query.nrows(), h_q * d_k);
    let mut dk = DMatrix::zeros(key.nrows(), key.ncols());
    let mut dv = DMatrix::zeros(value.nrows(), value.ncols());
    let mut d_biases = Vec::with_capacity(layout.seqlens_q.len());
    let (mut row_q, mut row_kv) = (0, 0);
    for s in 0..layout.seqlens_q.len() {
        let (n_q, n_kv) = (layout.seqlens_q[s], layout.seqlens_kv[s]);
        let mut d_bias = DMatrix::zeros(n_q, n_kv);
        for h in 0..h_q {
            let j = h / g;
            let grads = attention_backward(
                &block(query, row_q, n_q, h * d_k, d_k),
                &block(key, row_kv, n_kv, j * d_k, d_k),
                &block(value, row_kv, n_kv, j * d_v, d_v),
                &block(d_out, row_q, n_q, h * d_v, d_v),
                &head_options(options, (s, h), row_kv..row_kv + n_kv),
            );
            dq.view_mut((row_q, h * d_k), (n_q, d_k))
                .copy_from(&grads.dq);
            // Sums over the group's heads in head order (g terms: exact enough for f64).
            let mut dk_j = dk.view_mut((row_kv, j * d_k), (n_kv, d_k));
            dk_j += &grads.dk;
            let mut dv_j = dv.view_mut((row_kv, j * d_v), (n_kv, d_v));
            dv_j += &grads.dv;
            d_bias += &grads.d_bias;
        }
        d_biases.push(d_bias);
        row_q += n_q;
        row_kv += n_kv;
    }
    HeadGradients {
        dq,
        dk,
        dv,
        d_biases,
    }
}

/// The ALiBi slopes of `heads` heads, as the ALiBi paper defines them and Hugging Face
/// implements them (`get_alibi_slopes`): for `n` a power of two, head `h` (0-based) gets
/// `2^(−8(h+1)/n)`; otherwise the slopes of the largest power of two `p < heads`, followed
/// by every other slope of `2p` heads (`2^(−8(2i+1)/(2p))`, `i = 0, 1, …`) until there are
/// `heads` of them.
///
/// # Example
/// ```
/// let s = attention_reference::alibi_slopes(8);
/// assert_eq!(s[0], 0.5);
/// assert_eq!(s[7], 1.0 / 256.0);
/// ```
#[must_use]
pub fn alibi_slopes(heads: usize) -> Vec<f64> {
    let powers = |n: usize| -> Vec<f64> {
        (1..=n)
            .map(|h| 2f64.powf(-8.0 * h as f64 / n as f64))
            .collect()
    };
    if heads == 0 {
        return Vec::new();
    }
    let p = if heads.is_power_of_two() {
        heads
    } else {
        heads.next_power_of_two() / 2
    };
    let mut slopes = powers(p);
    if p < heads {
        slopes.extend(powers(2 * p).into_iter().step_by(2).take(heads - p));
    }
    slopes
}
