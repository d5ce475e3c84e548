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

/// Folds `part` into the running result `state` (which starts empty).
pub(crate) fn fold<T: Element>(
    state: &mut Option<Partial<T>>,
    part: Partial<T>,
    heads: usize,
    d_v: usize,
) -> Result<(), AttentionError> {
    *state = Some(match state.take() {
        None => part,
        Some(running) => merge(&[running, part], heads, d_v)?,
    });
    Ok(())
}

/// The rows of `a` above the rows of `b`.
pub(crate) fn stack<T: Element>(a: Partial<T>, b: Partial<T>) -> Partial<T> {
    let stack = |x: DMatrix<T>, y: DMatrix<T>| {
        let (ra, rb, c) = (x.nrows(), y.nrows(), x.ncols().max(y.ncols()));
        DMatrix::from_fn(
            ra + rb,
            c,
            |i, j| if i < ra { x[(i, j)] } else { y[(i - ra, j)] },
        )
    };
    (stack(a.0, b.0), stack(a.1, b.1))
}
