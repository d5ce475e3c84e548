//! Multi-head partial results and their exact merge, head by head, with the core's
//! `merge_partial_attention`.

use attention_core::{AttentionError, Element, merge_partial_attention};
use nalgebra::DMatrix;

/// A partial multi-head result: output `rows × h_q·d_v` and lse `rows × h_q`.
pub(crate) type Partial<T> = (DMatrix<T>, DMatrix<T>);

/// A partial with `rows` rows and no allowed key: output 0, lse −∞.
pub(crate) fn empty<T: Element>(rows: usize, heads: usize, d_v: usize) -> Partial<T> {
    (
        DMatrix::zeros(rows, heads * d_v),
        DMatrix::from_element(rows, heads, T::NEG_INFINITY),
    )
}

/// Merges the partials `parts` (same rows, over disjoint keys) in their order, head by
/// head: what `merge_partial_attention` gives for each head's columns.
pub(crate) fn merge<T: Element>(
    parts: &[Partial<T>],
    heads: usize,
    d_v: usize,
) -> Result<Partial<T>, AttentionError> {
    let rows = parts.first().map_or(0, |p| p.0.nrows());
    let (mut out, mut lse) = empty(rows, heads, d_v);
    for h in 0..heads {
        let (o, l) = merge_partial_attention(parts.iter().map(|(o, l)| {
            (
                o.columns(h * d_v, d_v),
                &l.as_slice()[h * l.nrows()..(h + 1) * l.nrows()],
            )
        }))?;
        out.columns_mut(h * d_v, d_v).copy_from(&o);
        lse.column_mut(h).copy_from(&l);
    }
    Ok((out, lse))
}

/// Folds `part` into rows `first .. first + part rows` of the running result
/// `(out, lse)`: the merge of the two, head by head, written in place.
pub(crate) fn fold_into<T: Element>(
    (out, lse): (&mut DMatrix<T>, &mut DMatrix<T>),
    first: usize,
    part: &Partial<T>,
    (heads, d_v): (usize, usize),
) -> Result<(), AttentionError> {
    let (rows, n) = (part.0.nrows(), out.nrows());
    for h in 0..heads {
        let span = h * n + first..h * n + first + rows;
        let part_lse = &part.1.as_slice()[h * rows..(h + 1) * rows];
        let (o, l) = merge_partial_attention([
            (
                out.view((first, h * d_v), (rows, d_v)),
                &lse.as_slice()[span.clone()],
            ),
            (part.0.columns(h * d_v, d_v), part_lse),
        ])?;
        out.view_mut((first, h * d_v), (rows, d_v)).copy_from(&o);
        lse.as_mut_slice()[span].copy_from_slice(l.as_slice());
    }
    Ok(())
}
