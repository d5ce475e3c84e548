//! Scaled dot-product attention, one score at a time.

use nalgebra::DMatrix;

use crate::{Attention, Causal, Options, dot2, neumaier_sum};

/// Scaled dot-product attention over `n_kv` keys for `n_q` queries, in `f64`, with every dot
/// product and sum compensated.
///
/// For query `i` and key `j`, in this order (see [`Options`] for `diag_i`):
///
/// 1. `s = scale · dot2(q_i, k_j)`, `scale` defaulting to `1/√d_k`;
/// 2. softcap `c`: `s ← c·tanh(s/c)`;
/// 3. ALiBi slope `m`: `s ← s − m·|diag_i − j|`;
/// 4. bias: `s ← s + bias_ij`;
/// 5. `s ← −∞` if `(i, j)` is disallowed: `mask_ij == false`, `key_mask_j == false`,
///    causal and `j > diag_i`, window `(left, right)` and `j ∉ [diag_i − left,
///    diag_i + right]`, or a score that is −∞ (a −∞ bias).
///
/// Then, over the allowed keys of row `i`, with `M = max_j s_ij` and `e_j = exp(s_ij − M)`:
///
/// ```text
/// Z         = Σ_j e_j                       (Neumaier sum)
/// weights_ij = e_j / Z
/// lse_i     = M + ln Z
/// output_ic = (Σ_j e_j · v_jc) / Z          (compensated dot product)
/// ```
///
/// A row with no allowed key — including every row when `n_kv = 0` — has output 0, weights
/// 0 and `lse = −∞`. With `n_q = 0` the output is 0 × d_v. Non-finite inputs (NaN, ±∞ in
/// `q`, `k`, `v`, or +∞/NaN in `bias`) are not special-cased and generally give NaN.
///
/// The input type only needs to convert losslessly to `f64` (`f32`, `f64`, small
/// integers); the computation is always in `f64`.
///
/// # Shapes
///
/// `query` n_q × d_k, `key` n_kv × d_k, `value` n_kv × d_v (rows are tokens). Returns
/// `output` n_q × d_v, `weights` n_q × n_kv and `lse` of length n_q.
///
/// # Panics
///
/// - `key` does not have d_k columns, or `value` does not have n_kv rows;
/// - `options.mask` or `options.bias` is not n_q × n_kv, or `options.key_mask` does not
///   have n_kv entries;
/// - `options.scale` is `None` and d_k = 0 (1/√0 is not a scale), or `options.scale` is
///   not finite;
/// - `options.softcap` is not finite and positive, or `options.alibi_slope` is not finite.
///
/// # Example
///
/// ```
/// use attention_reference::{Causal, Options, attention};
/// use nalgebra::DMatrix;
///
/// let q = DMatrix::from_row_slice(2, 2, &[1.0, 0.0, 0.0, 1.0]);
/// let k = q.clone();
/// let v = DMatrix::from_row_slice(2, 3, &[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]);
/// let options = Options { causal: Some(Causal::TopLeft), ..Options::default() };
/// let att = attention(&q, &k, &v, &options);
///
/// // The first query sees only the first key, so it copies the first value row.
/// assert_eq!(att.weights.row(0).iter().copied().collect::<Vec<_>>(), [1.0, 0.0]);
/// assert_eq!(att.output.row(0).iter().copied().collect::<Vec<_>>(), [1.0, 2.0, 3.0]);
/// assert!((att.lse[0] - 1.0 / 2f64.sqrt()).abs() < 1e-15);
///
/// // The second query's weights are a softmax of its scaled scores (0, 1/√2).
/// let p = 1.0 / (1.0 + (-1.0 / 2f64.sqrt()).exp());
/// assert!((att.weights[(1, 1)] - p).abs() < 1e-15);
/// ```
#[must_use]
pub fn attention<T: Copy + Into<f64>>(
    query: &DMatrix<T>,
    key: &DMatrix<T>,
    value: &DMatrix<T>,
    options: &Options,
) -> Attention {
    let (n_q, d_k) = query.shape();
    let (n_kv, key_cols) = key.shape();
    let (value_rows, d_v) = value.shape();
    assert_eq!(
        key_cols, d_k,
        "attention: query is {n_q}×{d_k} but key is {n_kv}×{key_cols}; both need d_k columns"
    );
    assert_eq!(
        value_rows, n_kv,
        "attention: key is {n_kv}×{d_k} but value is {value_rows}×{d_v}; both need n_kv rows"
    );
    let scale = match options.scale {
        Some(scale) => {
            assert!(scale.is_finite(), "attention: scale {scale} is not finite");
            scale
        }
        None => {
            assert!(
                d_k > 0,
                "attention: d_k = 0 and no scale given; the default scale 1/√d_k is undefined"
            );
            // As PyTorch computes it: 1.0 / math.sqrt(d_k).
            1.0 / (d_k as f64).sqrt()
        }
    };
    if let Some(mask) = &options.mask {
        assert_eq!(
            mask.shape(),
            (n_q, n_kv),
            "attention: mask is {}×{} but must be n_q×n_kv = {n_q}×{n_kv}",
            mask.nrows(),
            mask.ncols()
        );
    }
    if let Some(key_mask) = &options.key_mask {
        assert_eq!(
            key_mask.len(),
            n_kv,
            "attention: key_mask has {} entries but must have n_kv = {n_kv}",
            key_mask.len()
        );
    }
    if let Some(bias) = &options.bias {
        assert_eq!(
            bias.shape(),
            (n_q, n_kv),
            "attention: bias is {}×{} but must be n_q×n_kv = {n_q}×{n_kv}",
            bias.nrows(),
            bias.ncols()
        );
    }
    if let Some(c) = options.softcap {
        assert!(
            c.is_finite() && c > 0.0,
            "attention: softcap {c} must be finite and positive"
        );
    }
    if let Some(m) = options.alibi_slope {
        assert!(m.is_finite(), "attention: alibi_slope {m} is not finite");
    }

    let q = rows_f64(query);
    let k = rows_f64(key);
    let v = columns_f64(value);
    let scores = Scores {
        options,
        scale,
        n_q,
        n_kv,
    };

    let mut output = DMatrix::<f64>::zeros(n_q, d_v);
    let mut weights = DMatrix::<f64>::zeros(n_q, n_kv);
    let mut lse = vec![f64::NEG_INFINITY; n_q];
    for i in 0..n_q {
        // Steps 1–5: the row's final scores, −∞ where disallowed.
        let s: Vec<f64> = (0..n_kv)
            .map(|j| scores.score(i, j, &q[i], &k[j]))
            .collect();

        // Step 6: softmax. `f64::max` starts from −∞, so `m` stays −∞ iff no key is allowed.
        let m = s.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        if m == f64::NEG_INFINITY {
            // Step 7: fully masked row (or n_kv = 0): output 0, weights 0, lse −∞.
            continue;
        }
        // exp(−∞ − m) = 0 for the disallowed keys, since m is finite here.
        let e: Vec<f64> = s.iter().map(|&s_ij| (s_ij - m).exp()).collect();
        let z = neumaier_sum(e.iter().copied());
        for (j, &e_j) in e.iter().enumerate() {
            weights[(i, j)] = e_j / z;
        }
        // Dropout acts on the weights that multiply the values only.
        let kept: Vec<f64> = match &options.dropout {
            Some(d) => e
                .iter()
                .enumerate()
                .map(|(j, &e_j)| e_j * d.factor(i, j))
                .collect(),
            None => e.clone(),
        };
        for (c, v_c) in v.iter().enumerate() {
            output[(i, c)] = dot2(&kept, v_c) / z;
        }
        lse[i] = m + z.ln();
    }
    Attention {
        output,
        weights,
        lse,
    }
}

/// Plain softmax attention `softmax(Q·Kᵀ/√d_k)·V`: [`attention()`] with
/// [`Options::default()`], returning only the output.
///
/// # Shapes
///
/// `query` n_q × d_k, `key` n_kv × d_k, `value` n_kv × d_v; returns n_q × d_v.
///
/// # Panics
///
/// On mismatched shapes, or if d_k = 0 (see [`attention()`]).
///
/// # Example
///
/// ```
/// use attention_reference::self_attention;
/// use nalgebra::DMatrix;
///
/// // f32 input works too; the result is computed and returned in f64.
/// let q = DMatrix::from_row_slice(1, 2, &[0.5_f32, -1.0]);
/// let k = DMatrix::from_row_slice(3, 2, &[1.0_f32, 0.0, 0.0, 1.0, 1.0, 1.0]);
/// let v = DMatrix::from_row_slice(3, 1, &[1.0_f32, 1.0, 1.0]);
/// // Every weight row sums to 1, so equal values come back unchanged.
/// let out = self_attention(&q, &k, &v);
/// assert!((out[(0, 0)] - 1.0).abs() < 1e-15);
/// ```
#[must_use]
pub fn self_attention<T: Copy + Into<f64>>(
    query: &DMatrix<T>,
    key: &DMatrix<T>,
    value: &DMatrix<T>,
) -> DMatrix<f64> {
    attention(query, key, value, &Options::default()).output
}

/// The validated options, with the shapes needed to place the diagonal.
struct Scores<'a> {
    options: &'a Options,
    scale: f64,
    n_q: usize,
    n_kv: usize,
}

impl Scores<'_> {
    /// `diag_i`: `i` for top-left causal, `i + n_kv − n_q` otherwise (may be negative).
    /// `i128` holds any difference of two `usize`s and any `usize` window bound.
    fn diag(&self, i: usize) -> i128 {
        match self.options.causal {
            Some(Causal::TopLeft) => i as i128,
            Some(Causal::BottomRight) | None => i as i128 + self.n_kv as i128 - self.n_q as i128,
        }
    }

    /// Whether query `i` may attend to key `j` under the mask, key mask, causal and window
    /// options (a −∞ bias is handled in [`Scores::score`]).
    fn allowed(&self, i: usize, j: usize) -> bool {
        let o = self.options;
        let diag = self.diag(i);
        let j_signed = j as i128;
        if o.mask.as_ref().is_some_and(|mask| !mask[(i, j)]) {
            return false;
        }
        if o.key_mask.as_ref().is_some_and(|key_mask| !key_mask[j]) {
            return false;
        }
        // Both alignments disallow exactly j > diag_i.
        if o.causal.is_some() && j_signed > diag {
            return false;
        }
        o.window.is_none_or(|(left, right)| {
            diag - left as i128 <= j_signed && j_signed <= diag + right as i128
        })
    }

    /// The final score `s_ij` (steps 1–5), −∞ if disallowed.
    fn score(&self, i: usize, j: usize, q_i: &[f64], k_j: &[f64]) -> f64 {
        if !self.allowed(i, j) {
            return f64::NEG_INFINITY;
        }
        let o = self.options;
        let mut s = self.scale * dot2(q_i, k_j);
        if let Some(c) = o.softcap {
            s = c * (s / c).tanh();
        }
        if let Some(m) = o.alibi_slope {
            // |diag_i − j| is an integer far below 2⁵³, so the conversion is exact.
            let distance = (self.diag(i) - j as i128).unsigned_abs() as f64;
            s -= m * distance;
        }
        if let Some(bias) = &o.bias {
            // A −∞ bias makes s −∞, which the softmax treats as disallowed.
            s += bias[(i, j)];
        }
        s
    }
}

/// The rows of `m` as `f64` vectors (rows are tokens, so these are q_i / k_j).
fn rows_f64<T: Copy + Into<f64>>(m: &DMatrix<T>) -> Vec<Vec<f64>> {
    (0..m.nrows())
        .map(|r| (0..m.ncols()).map(|c| m[(r, c)].into()).collect())
        .collect()
}

/// The columns of `m` as `f64` vectors (column c of V holds v_jc for every key j).
fn columns_f64<T: Copy + Into<f64>>(m: &DMatrix<T>) -> Vec<Vec<f64>> {
    (0..m.ncols())
        .map(|c| (0..m.nrows()).map(|r| m[(r, c)].into()).collect())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seed() -> (DMatrix<f64>, DMatrix<f64>) {
        (
            DMatrix::from_row_slice(2, 2, &[1.0, 0.0, 0.0, 1.0]),
            DMatrix::from_row_slice(2, 2, &[1.0, 2.0, 3.0, 4.0]),
        )
    }

    #[test]
    fn f32_input_matches_f64_input() {
        let q32 = DMatrix::from_row_slice(2, 3, &[0.5_f32, -1.25, 2.0, 0.1, 0.2, -0.3]);
        let k32 = DMatrix::from_row_slice(
            4,
            3,
            &[
                1.0_f32, 0.0, -1.0, 0.5, 0.5, 0.5, -2.0, 1.0, 0.0, 0.3, -0.7, 1.1,
            ],
        );
        let v32 = DMatrix::from_row_slice(4, 2, &[1.0_f32, -1.0, 2.0, 0.5, 0.0, 3.0, -1.5, 1.0]);
        let widen = |m: &DMatrix<f32>| m.map(f64::from);
        let options = Options {
            causal: Some(Causal::BottomRight),
            ..Options::default()
        };
        let a32 = attention(&q32, &k32, &v32, &options);
        let a64 = attention(&widen(&q32), &widen(&k32), &widen(&v32), &options);
        // The f32 values convert exactly, so the computation is identical.
        assert_eq!(a32.output, a64.output);
        assert_eq!(a32.weights, a64.weights);
        assert_eq!(a32.lse, a64.lse);
        assert_eq!(a32.output.shape(), (2, 2));
        // Bottom-right: query 0 sees keys 0..=2, query 1 sees all 4.
        assert_eq!(a32.weights[(0, 3)], 0.0);
        assert!(a32.weights[(1, 3)] > 0.0);
    }

    #[test]
    fn fully_masked_row_is_zero_with_neg_inf_lse() {
        let (q, v) = seed();
        let mask = DMatrix::from_row_slice(2, 2, &[false, false, true, false]);
        let att = attention(
            &q,
            &q,
            &v,
            &Options {
                mask: Some(mask),
                ..Options::default()
            },
        );
        assert_eq!(att.lse[0], f64::NEG_INFINITY);
        assert!(att.output.row(0).iter().all(|&x| x == 0.0));
        assert!(att.weights.row(0).iter().all(|&x| x == 0.0));
        // Row 1 attends only to key 0: weight 1, output = v_0, lse = its score.
        assert_eq!(att.weights[(1, 0)], 1.0);
        assert_eq!(att.output[(1, 0)], 1.0);
        assert_eq!(att.output[(1, 1)], 2.0);
        assert_eq!(att.lse[1], 0.0);

        // A −∞ bias masks too; a key mask masks whole columns.
        let mut bias = DMatrix::from_element(2, 2, 0.0);
        bias[(1, 0)] = f64::NEG_INFINITY;
        bias[(1, 1)] = f64::NEG_INFINITY;
        let att = attention(
            &q,
            &q,
            &v,
            &Options {
                bias: Some(bias),
                key_mask: Some(vec![false, true]),
                ..Options::default()
            },
        );
        assert_eq!(att.lse[1], f64::NEG_INFINITY);
        assert!(att.output.row(1).iter().all(|&x| x == 0.0));
        assert_eq!(att.weights[(0, 1)], 1.0);
        assert!(att.output.iter().all(|x| !x.is_nan()));
    }

    #[test]
    fn empty_shapes() {
        // n_kv = 0: every row fully masked.
        let q = DMatrix::<f64>::from_element(3, 2, 1.0);
        let k = DMatrix::<f64>::zeros(0, 2);
        let v = DMatrix::<f64>::zeros(0, 4);
        let att = attention(&q, &k, &v, &Options::default());
        assert_eq!(att.output, DMatrix::zeros(3, 4));
        assert_eq!(att.weights.shape(), (3, 0));
        assert_eq!(att.lse, vec![f64::NEG_INFINITY; 3]);

        // n_q = 0.
        let q = DMatrix::<f64>::zeros(0, 2);
        let k = DMatrix::<f64>::from_element(5, 2, 1.0);
        let v = DMatrix::<f64>::from_element(5, 4, 1.0);
        let att = attention(&q, &k, &v, &Options::default());
        assert_eq!(att.output.shape(), (0, 4));
        assert!(att.lse.is_empty());

        // d_v = 0.
        let v = DMatrix::<f64>::zeros(5, 0);
        let q = DMatrix::<f64>::from_element(2, 2, 1.0);
        let att = attention(&q, &k, &v, &Options::default());
        assert_eq!(att.output.shape(), (2, 0));
        assert!((att.lse[0] - (2.0 / 2f64.sqrt() + 5f64.ln())).abs() < 1e-15);

        // d_k = 0 with an explicit scale: all scores 0, uniform weights.
        let q = DMatrix::<f64>::zeros(2, 0);
        let k = DMatrix::<f64>::zeros(4, 0);
        let v = DMatrix::from_row_slice(4, 1, &[1.0, 2.0, 3.0, 4.0]);
        let att = attention(
            &q,
            &k,
            &v,
            &Options {
                scale: Some(1.0),
                ..Options::default()
            },
        );
        assert_eq!(att.output[(0, 0)], 2.5);
        assert_eq!(att.lse[0], 4f64.ln());
    }

    #[test]
    fn diagonal_alignment_and_window() {
        // n_q = 2, n_kv = 4, bottom-right diagonal: diag = (2, 3).
        let q = DMatrix::<f64>::zeros(2, 1);
        let k = DMatrix::<f64>::zeros(4, 1);
        let v = DMatrix::from_row_slice(4, 1, &[1.0, 2.0, 3.0, 4.0]);
        let allowed = |options: Options| {
            let w = attention(&q, &k, &v, &options).weights;
            w.map(|x| x > 0.0)
        };
        let bools = |rows: [[bool; 4]; 2]| DMatrix::from_row_slice(2, 4, &rows.concat());
        let (t, f) = (true, false);
        assert_eq!(
            allowed(Options {
                causal: Some(Causal::TopLeft),
                ..Options::default()
            }),
            bools([[t, f, f, f], [t, t, f, f]])
        );
        assert_eq!(
            allowed(Options {
                causal: Some(Causal::BottomRight),
                ..Options::default()
            }),
            bools([[t, t, t, f], [t, t, t, t]])
        );
        // Window without causal uses the bottom-right diagonal.
        assert_eq!(
            allowed(Options {
                window: Some((1, 0)),
                ..Options::default()
            }),
            bools([[f, t, t, f], [f, f, t, t]])
        );
        assert_eq!(
            allowed(Options {
                causal: Some(Causal::TopLeft),
                window: Some((0, 5)),
                ..Options::default()
            }),
            bools([[t, f, f, f], [f, t, f, f]])
        );
        // Huge windows do not overflow.
        assert_eq!(
            allowed(Options {
                window: Some((usize::MAX, usize::MAX)),
                ..Options::default()
            }),
            bools([[t, t, t, t], [t, t, t, t]])
        );
    }

    #[test]
    fn alibi_softcap_bias_order() {
        // One query, two keys, n_q < n_kv so diag_0 = 1 (bottom-right).
        let q = DMatrix::from_row_slice(1, 1, &[2.0]);
        let k = DMatrix::from_row_slice(2, 1, &[3.0, -1.0]);
        let v = DMatrix::from_row_slice(2, 1, &[1.0, 0.0]);
        let bias = DMatrix::from_row_slice(1, 2, &[0.25, -0.5]);
        let options = Options {
            scale: Some(0.5),
            softcap: Some(2.0),
            alibi_slope: Some(0.75),
            bias: Some(bias),
            ..Options::default()
        };
        let att = attention(&q, &k, &v, &options);
        let s0 = 2.0 * (0.5 * 6.0 / 2.0_f64).tanh() - 0.75 * 1.0 + 0.25;
        let s1 = 2.0 * (0.5 * -2.0 / 2.0_f64).tanh() - 0.75 * 0.0 - 0.5;
        let lse = (s0.exp() + s1.exp()).ln();
        assert!((att.lse[0] - lse).abs() < 1e-15);
        assert!((att.output[(0, 0)] - (s0 - lse).exp()).abs() < 1e-15);

        // Top-left: diag_0 = 0, so the ALiBi distances swap.
        let att = attention(
            &q,
            &k,
            &v,
            &Options {
                alibi_slope: Some(1.0),
                causal: Some(Causal::TopLeft),
                scale: Some(1.0),
                ..Options::default()
            },
        );
        // Key 1 is masked (j > i), key 0 at distance 0: lse = q·k_0 = 6.
        assert_eq!(att.lse[0], 6.0);
    }

    #[test]
    fn weights_rows_sum_to_one() {
        let q = DMatrix::from_fn(5, 3, |i, j| ((i * 7 + j * 3) % 5) as f64 - 2.0);
        let k = DMatrix::from_fn(6, 3, |i, j| ((i * 5 + j * 2) % 7) as f64 * 0.5 - 1.0);
        let v = DMatrix::from_fn(6, 2, |i, j| (i + j) as f64);
        let att = attention(&q, &k, &v, &Options::default());
        for i in 0..5 {
            let sum = neumaier_sum(att.weights.row(i).iter().copied());
            assert!((sum - 1.0).abs() < 4e-16, "row {i}: {sum}");
            let direct: f64 = (0..6).map(|j| att.weights[(i, j)] * v[(j, 1)]).sum();
            assert!((att.output[(i, 1)] - direct).abs() < 1e-14);
        }
    }

    #[test]
    #[should_panic(expected = "attention: query is 2×3 but key is 2×2; both need d_k columns")]
    fn mismatched_d_k_panics() {
        let q = DMatrix::<f64>::zeros(2, 3);
        let k = DMatrix::<f64>::zeros(2, 2);
        let _ = self_attention(&q, &k, &k);
    }

    #[test]
    #[should_panic(expected = "attention: key is 2×2 but value is 3×1; both need n_kv rows")]
    fn mismatched_n_kv_panics() {
        let q = DMatrix::<f64>::zeros(2, 2);
        let v = DMatrix::<f64>::zeros(3, 1);
        let _ = self_attention(&q, &q, &v);
    }

    #[test]
    #[should_panic(expected = "mask is 2×3 but must be n_q×n_kv = 2×2")]
    fn mismatched_mask_panics() {
        let q = DMatrix::<f64>::zeros(2, 2);
        let options = Options {
            mask: Some(DMatrix::from_element(2, 3, true)),
            ..Options::default()
        };
        let _ = attention(&q, &q, &q, &options);
    }

    #[test]
    #[should_panic(expected = "d_k = 0 and no scale given")]
    fn zero_d_k_without_scale_panics() {
        let q = DMatrix::<f64>::zeros(2, 0);
        let _ = self_attention(&q, &q, &q);
    }

    #[test]
    #[should_panic(expected = "softcap 0 must be finite and positive")]
    fn zero_softcap_panics() {
        let q = DMatrix::<f64>::zeros(2, 2);
        let options = Options {
            softcap: Some(0.0),
            ..Options::default()
        };
        let _ = attention(&q, &q, &q, &options);
    }
}
