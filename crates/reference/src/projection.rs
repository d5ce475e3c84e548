//! The query, key and value projections `X·W`.

use nalgebra::DMatrix;

use crate::dot2;

/// The projections `Q = X·W_q`, `K = X·W_k`, `V = X·W_v`, each entry a compensated dot
/// product ([`dot2`]) computed in `f64`:
///
/// `Q_ic = Σ_m x_im · (W_q)_mc`, and likewise for K and V.
///
/// # Shapes
///
/// `x` is n × d_model (one token per row); `w_q` and `w_k` are d_model × d_k, `w_v` is
/// d_model × d_v. Returns Q (n × d_k), K (n × d_k) and V (n × d_v), ready for
/// [`attention()`](crate::attention()). The column counts of the weights are not checked against
/// each other; `attention` checks them.
///
/// # Panics
///
/// If a weight matrix does not have d_model rows.
///
/// # Example
///
/// ```
/// use attention_reference::{compute_qkv, self_attention};
/// use nalgebra::DMatrix;
///
/// let x = DMatrix::from_row_slice(2, 3, &[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]);
/// let w_q = DMatrix::from_row_slice(3, 2, &[1.0, 0.0, 0.0, 1.0, 0.0, 0.0]);
/// let w_k = DMatrix::from_row_slice(3, 2, &[0.0, 0.0, 1.0, 0.0, 0.0, 1.0]);
/// let w_v = DMatrix::from_row_slice(3, 1, &[1.0, 1.0, 1.0]);
/// let (q, k, v) = compute_qkv(&x, &w_q, &w_k, &w_v);
/// assert_eq!(q, DMatrix::from_row_slice(2, 2, &[1.0, 2.0, 4.0, 5.0]));
/// assert_eq!(k, DMatrix::from_row_slice(2, 2, &[2.0, 3.0, 5.0, 6.0]));
/// assert_eq!(v, DMatrix::from_row_slice(2, 1, &[6.0, 15.0]));
/// let out = self_attention(&q, &k, &v);
/// assert_eq!(out.shape(), (2, 1));
/// ```
#[must_use]
pub fn compute_qkv<T: Copy + Into<f64>>(
    x: &DMatrix<T>,
    w_q: &DMatrix<T>,
    w_k: &DMatrix<T>,
    w_v: &DMatrix<T>,
) -> (DMatrix<f64>, DMatrix<f64>, DMatrix<f64>) {
    (
        project_named(x, w_q, "w_q"),
        project_named(x, w_k, "w_k"),
        project_named(x, w_v, "w_v"),
    )
}

/// `X·W`, each entry a compensated dot product ([`dot2`]) in `f64`: the one projection of
/// [`compute_qkv`] and of the layer's output projection.
///
/// # Panics
/// If `w` does not have `x`'s columns as rows.
///
/// # Example
/// ```
/// use attention_reference::project;
/// use nalgebra::DMatrix;
/// let x = DMatrix::from_row_slice(1, 2, &[1.0, 2.0]);
/// let w = DMatrix::from_row_slice(2, 1, &[3.0, 4.0]);
/// assert_eq!(project(&x, &w)[(0, 0)], 11.0);
/// ```
#[must_use]
pub fn project<T: Copy + Into<f64>>(x: &DMatrix<T>, w: &DMatrix<T>) -> DMatrix<f64> {
    project_named(x, w, "w")
}

/// `X·W` with every entry a [`dot2`] of a row of X and a column of W.
fn project_named<T: Copy + Into<f64>>(x: &DMatrix<T>, w: &DMatrix<T>, name: &str) -> DMatrix<f64> {
    let (n, d_model) = x.shape();
    let (w_rows, d_out) = w.shape();
    assert_eq!(
        w_rows, d_model,
        "compute_qkv: x is {n}×{d_model} but {name} is {w_rows}×{d_out}; {name} needs d_model = {d_model} rows"
    );
    let x_rows: Vec<Vec<f64>> = (0..n)
        .map(|i| (0..d_model).map(|m| x[(i, m)].into()).collect())
        .collect();
    let w_cols: Vec<Vec<f64>> = (0..d_out)
        .map(|c| (0..d_model).map(|m| w[(m, c)].into()).collect())
        .collect();
    DMatrix::from_fn(n, d_out, |i, c| dot2(&x_rows[i], &w_cols[c]))
}

/// The gradients of [`compute_qkv`] for a scalar loss `L` with `dQ = ∂L/∂Q`, `dK`, `dV`,
/// by definition, each entry one compensated dot product ([`dot2`]) in f64:
/// ```text
/// dW_q = Xᵀ·dQ      dW_k = Xᵀ·dK      dW_v = Xᵀ·dV
/// dX   = dQ·W_qᵀ + dK·W_kᵀ + dV·W_vᵀ   (one dot product over d_k + d_k + d_v terms)
/// ```
/// Returns `(dX, dW_q, dW_k, dW_v)`.
///
/// # Panics
/// If the shapes do not match those of [`compute_qkv`] and its results.
///
/// # Example
/// ```
/// use attention_reference::compute_qkv_backward;
/// use nalgebra::DMatrix;
/// let x = DMatrix::from_row_slice(1, 2, &[1.0, 2.0]);
/// let w = DMatrix::from_row_slice(2, 1, &[3.0, 4.0]);
/// let g = DMatrix::from_element(1, 1, 1.0);
/// let (dx, dw_q, _, _) = compute_qkv_backward(&x, &w, &w, &w, &g, &g, &g);
/// assert_eq!(dx, DMatrix::from_row_slice(1, 2, &[9.0, 12.0]));
/// assert_eq!(dw_q, DMatrix::from_row_slice(2, 1, &[1.0, 2.0]));
/// ```
#[must_use]
#[allow(clippy::type_complexity, clippy::too_many_arguments)]
pub fn compute_qkv_backward<T: Copy + Into<f64>>(
    x: &DMatrix<T>,
    w_q: &DMatrix<T>,
    w_k: &DMatrix<T>,
    w_v: &DMatrix<T>,
    d_q: &DMatrix<T>,
    d_k: &DMatrix<T>,
    d_v: &DMatrix<T>,
) -> (DMatrix<f64>, DMatrix<f64>, DMatrix<f64>, DMatrix<f64>) {
    let (n, d_model) = x.shape();
    let wide = |m: &DMatrix<T>| DMatrix::from_fn(m.nrows(), m.ncols(), |r, c| m[(r, c)].into());
    let (x, w_q, w_k, w_v) = (wide(x), wide(w_q), wide(w_k), wide(w_v));
    let (d_q, d_k, d_v) = (wide(d_q), wide(d_k), wide(d_v));
    for (w, g, name) in [(&w_q, &d_q, "q"), (&w_k, &d_k, "k"), (&w_v, &d_v, "v")] {
        assert_eq!(
            w.nrows(),
            d_model,
            "compute_qkv_backward: w_{name} needs d_model rows"
        );
        assert_eq!(
            g.shape(),
            (n, w.ncols()),
            "compute_qkv_backward: d_{name} is n × its width"
        );
    }
    let column = |m: &DMatrix<f64>, c: usize| m.column(c).iter().copied().collect::<Vec<f64>>();
    // dW = Xᵀ·G: entry (m, c) is column m of X against column c of G.
    let dw = |g: &DMatrix<f64>, width: usize| {
        DMatrix::from_fn(d_model, width, |m, c| dot2(&column(&x, m), &column(g, c)))
    };
    // dX row i: [dQ_i, dK_i, dV_i] against [W_q row m, W_k row m, W_v row m].
    let row = |m: &DMatrix<f64>, r: usize| m.row(r).iter().copied().collect::<Vec<f64>>();
    let dx = DMatrix::from_fn(n, d_model, |i, m| {
        let g: Vec<f64> = [&d_q, &d_k, &d_v].iter().flat_map(|g| row(g, i)).collect();
        let w: Vec<f64> = [&w_q, &w_k, &w_v].iter().flat_map(|w| row(w, m)).collect();
        dot2(&g, &w)
    });
    (
        dx,
        dw(&d_q, w_q.ncols()),
        dw(&d_k, w_k.ncols()),
        dw(&d_v, w_v.ncols()),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identity_weights_and_f32() {
        let x = DMatrix::from_row_slice(3, 2, &[1.5_f32, -2.0, 0.25, 4.0, 0.0, 1.0]);
        let eye = DMatrix::<f32>::identity(2, 2);
        let (q, k, v) = compute_qkv(&x, &eye, &eye, &eye);
        let x64 = x.map(f64::from);
        assert_eq!(q, x64);
        assert_eq!(k, x64);
        assert_eq!(v, x64);
    }

    #[test]
    fn compensated_entries() {
        // Row · column = 1e16 + 1 − 1e16 = 1, which a naive product gets wrong.
        let x = DMatrix::from_row_slice(1, 3, &[1e16, 1.0, -1e16]);
        let w = DMatrix::from_row_slice(3, 1, &[1.0, 1.0, 1.0]);
        let (q, _, _) = compute_qkv(&x, &w, &w, &w);
        assert_eq!(q[(0, 0)], 1.0);
    }

    #[test]
    fn empty() {
        let x = DMatrix::<f64>::zeros(0, 3);
        let w = DMatrix::<f64>::zeros(3, 2);
        let (q, _, _) = compute_qkv(&x, &w, &w, &w);
        assert_eq!(q.shape(), (0, 2));
        let x = DMatrix::<f64>::zeros(2, 0);
        let w = DMatrix::<f64>::zeros(0, 2);
        let (q, _, _) = compute_qkv(&x, &w, &w, &w);
        assert_eq!(q, DMatrix::zeros(2, 2));
    }

    #[test]
    #[should_panic(expected = "compute_qkv: x is 2×3 but w_k is 2×2; w_k needs d_model = 3 rows")]
    fn mismatched_weight_panics() {
        let x = DMatrix::<f64>::zeros(2, 3);
        let good = DMatrix::<f64>::zeros(3, 2);
        let bad = DMatrix::<f64>::zeros(2, 2);
        let _ = compute_qkv(&x, &good, &bad, &good);
    }
}
