//! Combining attention results computed over disjoint blocks of keys.

use nalgebra::DMatrix;

use crate::{dot2, neumaier_sum};

/// Merges `(output, lse)` pairs computed over disjoint blocks of keys into the result over
/// all keys, the identity behind split-KV ("flash-decoding") attention.
///
/// If part `p` attended over key block `B_p` with `lse_p,i = ln Σ_{j∈B_p} exp(s_ij)` and
/// `out_p,i = Σ_{j∈B_p} exp(s_ij − lse_p,i)·v_j`, then for every row `i`:
///
/// ```text
/// m     = max_p lse_p,i
/// w_p   = exp(lse_p,i − m)
/// out_i = Σ_p w_p · out_p,i / Σ_p w_p      (compensated dot product / Neumaier sum)
/// lse_i = m + ln Σ_p w_p
/// ```
///
/// Parts whose `lse` is −∞ for a row (no allowed key in that block) carry no weight and
/// their output row is ignored; if every part has `lse = −∞`, the merged row is 0 with
/// `lse = −∞`, as [`attention()`](crate::attention()) gives for a fully masked row.
///
/// # Shapes
///
/// Every part's output is n_q × d_v and its `lse` has length n_q; so do the results.
///
/// # Panics
///
/// If `parts` is empty (the shape would be unknown), or the parts' shapes disagree.
///
/// # Example
///
/// ```
/// use attention_reference::{Options, attention, merge};
/// use nalgebra::DMatrix;
///
/// let q = DMatrix::from_row_slice(2, 2, &[1.0, 0.5, -0.5, 2.0]);
/// let k = DMatrix::from_row_slice(3, 2, &[1.0, 0.0, 0.0, 1.0, 1.0, 1.0]);
/// let v = DMatrix::from_row_slice(3, 1, &[1.0, 2.0, 3.0]);
/// let all = attention(&q, &k, &v, &Options::default());
///
/// // Keys {0} and {1, 2}, attended separately, then merged.
/// let first = attention(&q, &k.rows(0, 1).into_owned(), &v.rows(0, 1).into_owned(), &Options::default());
/// let rest = attention(&q, &k.rows(1, 2).into_owned(), &v.rows(1, 2).into_owned(), &Options::default());
/// let (out, lse) = merge(&[(first.output, first.lse), (rest.output, rest.lse)]);
///
/// assert!((out - all.output).amax() < 1e-15);
/// assert!(lse.iter().zip(&all.lse).all(|(a, b)| (a - b).abs() < 1e-15));
/// ```
#[must_use]
pub fn merge(parts: &[(DMatrix<f64>, Vec<f64>)]) -> (DMatrix<f64>, Vec<f64>) {
    assert!(
        !parts.is_empty(),
        "merge: no parts given; at least one (output, lse) pair is needed"
    );
    let (n_q, d_v) = parts[0].0.shape();
    for (p, (out, lse)) in parts.iter().enumerate() {
        assert_eq!(
            out.shape(),
            (n_q, d_v),
            "merge: part {p}'s output is {}×{} but part 0's is {n_q}×{d_v}",
            out.nrows(),
            out.ncols()
        );
        assert_eq!(
            lse.len(),
            n_q,
            "merge: part {p}'s lse has {} entries but the outputs have n_q = {n_q} rows",
            lse.len()
        );
    }

    let mut output = DMatrix::<f64>::zeros(n_q, d_v);
    let mut lse = vec![f64::NEG_INFINITY; n_q];
    for i in 0..n_q {
        let m = parts
            .iter()
            .map(|(_, lse_p)| lse_p[i])
            .fold(f64::NEG_INFINITY, f64::max);
        if m == f64::NEG_INFINITY {
            // No part saw an allowed key: the row stays 0 with lse −∞.
            continue;
        }
        // Skip empty parts rather than multiplying their (ignored) outputs by 0.
        let live: Vec<&(DMatrix<f64>, Vec<f64>)> = parts
            .iter()
            .filter(|(_, lse_p)| lse_p[i] != f64::NEG_INFINITY)
            .collect();
        let w: Vec<f64> = live.iter().map(|(_, lse_p)| (lse_p[i] - m).exp()).collect();
        let total = neumaier_sum(w.iter().copied());
        for c in 0..d_v {
            let column: Vec<f64> = live.iter().map(|(out_p, _)| out_p[(i, c)]).collect();
            output[(i, c)] = dot2(&w, &column) / total;
        }
        lse[i] = m + total.ln();
    }
    (output, lse)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Causal, Options, attention};

    fn inputs() -> (DMatrix<f64>, DMatrix<f64>, DMatrix<f64>) {
        let q = DMatrix::from_fn(4, 3, |i, j| ((i * 7 + j * 3) % 5) as f64 * 0.7 - 1.3);
        let k = DMatrix::from_fn(7, 3, |i, j| ((i * 5 + j * 2) % 7) as f64 * 0.4 - 1.1);
        let v = DMatrix::from_fn(7, 2, |i, j| ((i * 3 + j) % 4) as f64 - 1.5);
        (q, k, v)
    }

    /// Attention restricted to keys `start..start + len`, with the options sliced to match.
    fn block(
        q: &DMatrix<f64>,
        k: &DMatrix<f64>,
        v: &DMatrix<f64>,
        mask: &DMatrix<bool>,
        start: usize,
        len: usize,
    ) -> (DMatrix<f64>, Vec<f64>) {
        let options = Options {
            mask: Some(mask.columns(start, len).into_owned()),
            ..Options::default()
        };
        let att = attention(
            q,
            &k.rows(start, len).into_owned(),
            &v.rows(start, len).into_owned(),
            &options,
        );
        (att.output, att.lse)
    }

    #[test]
    fn two_block_split_equals_full_attention() {
        let (q, k, v) = inputs();
        // A causal (top-left) pattern as an explicit mask, so that it slices with the keys;
        // row 0 sees only key 0, so its second block is fully masked.
        let mask = DMatrix::from_fn(4, 7, |i, j| j <= i);
        let full = attention(
            &q,
            &k,
            &v,
            &Options {
                causal: Some(Causal::TopLeft),
                ..Options::default()
            },
        );
        for split in 1..7 {
            let a = block(&q, &k, &v, &mask, 0, split);
            let b = block(&q, &k, &v, &mask, split, 7 - split);
            let (out, lse) = merge(&[a, b]);
            assert!(
                (&out - &full.output).amax() < 1e-15,
                "split at {split}: {out} vs {}",
                full.output
            );
            for (x, y) in lse.iter().zip(&full.lse) {
                assert!((x - y).abs() < 1e-15 * (1.0 + y.abs()), "split {split}");
            }
        }
    }

    #[test]
    fn three_blocks_and_single_part() {
        let (q, k, v) = inputs();
        let mask = DMatrix::from_element(4, 7, true);
        let full = attention(&q, &k, &v, &Options::default());
        let parts = [
            block(&q, &k, &v, &mask, 0, 2),
            block(&q, &k, &v, &mask, 2, 3),
            block(&q, &k, &v, &mask, 5, 2),
        ];
        let (out, lse) = merge(&parts);
        assert!((&out - &full.output).amax() < 1e-15);
        for (x, y) in lse.iter().zip(&full.lse) {
            assert!((x - y).abs() < 1e-15 * (1.0 + y.abs()));
        }
        // Merging one part is the identity.
        let (out, lse) = merge(&[(full.output.clone(), full.lse.clone())]);
        assert_eq!(out, full.output);
        assert_eq!(lse, full.lse);
    }

    #[test]
    fn all_parts_empty_gives_zero_and_neg_inf() {
        let out = DMatrix::from_element(1, 2, f64::NAN); // ignored: lse is −∞
        let parts = [
            (out.clone(), vec![f64::NEG_INFINITY]),
            (out, vec![f64::NEG_INFINITY]),
        ];
        let (merged, lse) = merge(&parts);
        assert_eq!(merged, DMatrix::zeros(1, 2));
        assert_eq!(lse, vec![f64::NEG_INFINITY]);

        // One live part among empty ones passes through unchanged.
        let live = DMatrix::from_row_slice(1, 2, &[0.5, -2.0]);
        let (merged, lse) = merge(&[
            (
                DMatrix::from_element(1, 2, f64::NAN),
                vec![f64::NEG_INFINITY],
            ),
            (live.clone(), vec![3.0]),
        ]);
        assert_eq!(merged, live);
        assert_eq!(lse, vec![3.0]);
    }

    #[test]
    fn empty_shapes() {
        let (out, lse) = merge(&[
            (DMatrix::zeros(0, 3), vec![]),
            (DMatrix::zeros(0, 3), vec![]),
        ]);
        assert_eq!(out.shape(), (0, 3));
        assert!(lse.is_empty());
    }

    #[test]
    #[should_panic(expected = "merge: no parts given")]
    fn no_parts_panics() {
        let _ = merge(&[]);
    }

    #[test]
    #[should_panic(expected = "merge: part 1's output is 2×2 but part 0's is 2×3")]
    fn mismatched_parts_panic() {
        let _ = merge(&[
            (DMatrix::zeros(2, 3), vec![0.0; 2]),
            (DMatrix::zeros(2, 2), vec![0.0; 2]),
        ]);
    }
}
