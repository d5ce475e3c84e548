//! Gradients of attention by definition: the vector–Jacobian products of each step of
//! [`attention()`](crate::attention()) written out, in `f64`, every dot product and sum
//! compensated. The oracle of the backward pass.

use nalgebra::DMatrix;

use crate::{Options, attention, dot2, neumaier_sum};

/// Result of [`attention_backward`]: the gradients of a scalar loss `L` with respect to
/// the inputs of [`attention()`](crate::attention()), given `dO = ∂L/∂O`.
#[derive(Clone, Debug)]
pub struct Gradients {
    /// `∂L/∂Q`, n_q × d_k.
    pub dq: DMatrix<f64>,
    /// `∂L/∂K`, n_kv × d_k.
    pub dk: DMatrix<f64>,
    /// `∂L/∂V`, n_kv × d_v.
    pub dv: DMatrix<f64>,
    /// `∂L/∂bias`, n_q × n_kv: the gradient of the final scores (a bias is added to them
    /// last, so its gradient is theirs whether or not a bias was given); 0 where a key is
    /// disallowed and on rows with no allowed key.
    pub d_bias: DMatrix<f64>,
}

/// The gradients of attention (see [`Gradients`]), by definition.
///
/// With `P` the weights and `O` the output of [`attention()`](crate::attention()) on the
/// same inputs, `t_ij = scale·q_i·k_j` the raw score and `z_ij` the final one (after
/// softcap `c`, ALiBi and bias; −∞ where disallowed):
///
/// ```text
/// dV_j   = Σ_i P_ij·dO_i                      (n_kv × d_v)
/// dP_ij  = dO_i · v_j
/// D_i    = Σ_j P_ij·dP_ij                     (= dO_i · O_i)
/// dZ_ij  = P_ij·(dP_ij − D_i)                 the softmax's vector–Jacobian product; = ∂L/∂bias_ij
/// dT_ij  = dZ_ij · (1 − tanh²(t_ij/c))         through softcap (dZ_ij without one);
///                                             ALiBi adds a constant: no factor
/// dQ_i   = scale · Σ_j dT_ij·k_j
/// dK_j   = scale · Σ_i dT_ij·q_i
/// ```
///
/// Disallowed entries have `P_ij = 0`, so they contribute nothing and get `dZ_ij = 0`; a
/// row with no allowed key has `P_i = 0` and gets 0 everywhere. The ALiBi slope and the
/// scale get no gradient here (the slope is a constant of the model; PyTorch does not
/// differentiate it either).
///
/// # Shapes
/// `query` n_q × d_k, `key` n_kv × d_k, `value` n_kv × d_v, `d_out` n_q × d_v.
///
/// # Panics
/// As [`attention()`](crate::attention()), and if `d_out` is not n_q × d_v.
///
/// # Example
/// ```
/// use attention_reference::{attention, attention_backward, Options};
/// use nalgebra::DMatrix;
///
/// // L = Σ O: with equal value rows the output does not depend on the scores, so Q and
/// // K get no gradient, and each value row gets the total weight its key receives.
/// let q = DMatrix::from_row_slice(2, 2, &[1.0, 0.0, 0.0, 1.0]);
/// let v = DMatrix::from_row_slice(2, 1, &[3.0, 3.0]);
/// let ones = DMatrix::from_element(2, 1, 1.0);
/// let g = attention_backward(&q, &q, &v, &ones, &Options::default());
/// assert!(g.dq.amax() < 1e-15 && g.dk.amax() < 1e-15);
/// let p = attention(&q, &q, &v, &Options::default()).weights;
/// assert!((g.dv[(0, 0)] - (p[(0, 0)] + p[(1, 0)])).abs() < 1e-15);
/// ```
#[must_use]
pub fn attention_backward<T: Copy + Into<f64>>(
    query: &DMatrix<T>,
    key: &DMatrix<T>,
    value: &DMatrix<T>,
    d_out: &DMatrix<T>,
    options: &Options,
) -> Gradients {
    let forward = attention(query, key, value, options); // checks every other shape
    let (n_q, d_k) = query.shape();
    let (n_kv, d_v) = value.shape();
    assert_eq!(
        d_out.shape(),
        (n_q, d_v),
        "attention_backward: d_out is {}×{} but must be n_q×d_v = {n_q}×{d_v}",
        d_out.nrows(),
        d_out.ncols()
    );
    let scale = options.scale.unwrap_or(1.0 / (d_k as f64).sqrt());
    let f64_of = |m: &DMatrix<T>| DMatrix::from_fn(m.nrows(), m.ncols(), |r, c| m[(r, c)].into());
    let (q, k, v, d_o) = (f64_of(query), f64_of(key), f64_of(value), f64_of(d_out));
    let p = &forward.weights;
    let row = |m: &DMatrix<f64>, r: usize| m.row(r).iter().copied().collect::<Vec<f64>>();
    let col = |m: &DMatrix<f64>, c: usize| m.column(c).iter().copied().collect::<Vec<f64>>();

    // With dropout, the output takes the kept weights P'_ij = P_ij·f_ij (f the dropout
    // factor, 1 without): dV = P'ᵀ·dO, and ∂L/∂P_ij = f_ij·(dO_i·v_j).
    let f = |i: usize, j: usize| options.dropout.map_or(1.0, |d| d.factor(i, j));
    let kept = DMatrix::from_fn(n_q, n_kv, |i, j| p[(i, j)] * f(i, j));
    let dv = DMatrix::from_fn(n_kv, d_v, |j, c| dot2(&col(&kept, j), &col(&d_o, c)));

    // dZ (= ∂L/∂bias), then dT through softcap.
    let mut d_bias = DMatrix::zeros(n_q, n_kv);
    let mut d_t = DMatrix::zeros(n_q, n_kv);
    for i in 0..n_q {
        let d_o_i = row(&d_o, i);
        let d_p: Vec<f64> = (0..n_kv)
            .map(|j| f(i, j) * dot2(&d_o_i, &row(&v, j)))
            .collect();
        let d_i = neumaier_sum((0..n_kv).map(|j| p[(i, j)] * d_p[j]));
        for j in 0..n_kv {
            if p[(i, j)] == 0.0 {
                continue; // disallowed (or underflowed): no gradient flows
            }
            let dz = p[(i, j)] * (d_p[j] - d_i);
            d_bias[(i, j)] = dz;
            d_t[(i, j)] = match options.softcap {
                Some(c) => {
                    let t = scale * dot2(&row(&q, i), &row(&k, j));
                    let th = (t / c).tanh();
                    dz * (1.0 - th * th)
                }
                None => dz,
            };
        }
    }

    // dQ = scale·dT·K, dK = scale·dTᵀ·Q.
    let dq = DMatrix::from_fn(n_q, d_k, |i, c| scale * dot2(&row(&d_t, i), &col(&k, c)));
    let dk = DMatrix::from_fn(n_kv, d_k, |j, c| scale * dot2(&col(&d_t, j), &col(&q, c)));
    Gradients { dq, dk, dv, d_bias }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Causal;

    /// `L = Σ dO ∘ O` as a function of the inputs, through the forward oracle.
    fn loss(
        q: &DMatrix<f64>,
        k: &DMatrix<f64>,
        v: &DMatrix<f64>,
        d_o: &DMatrix<f64>,
        o: &Options,
    ) -> f64 {
        let out = attention(q, k, v, o).output;
        neumaier_sum(out.iter().zip(d_o.iter()).map(|(a, b)| a * b))
    }

    /// A deterministic, irregular matrix.
    fn m(r: usize, c: usize, seed: f64) -> DMatrix<f64> {
        DMatrix::from_fn(r, c, |i, j| {
            ((i * 31 + j * 17) as f64 * 0.37 + seed).sin() * 1.3
        })
    }

    /// Central differences `(L(x + h) − L(x − h)) / 2h` for every entry of Q, K, V and the
    /// bias, against the oracle's gradients, for every option: the error of a central
    /// difference is O(h²·|L'''|) plus rounding O(ε·|L|/h); with h = 1e-5 both are far
    /// below the 1e-7 allowed (relative to max(1, |g|)).
    #[test]
    fn gradients_match_finite_differences() {
        let (n_q, n_kv, d_k, d_v) = (4, 6, 3, 2);
        let bias = m(n_q, n_kv, 0.9).map(|x| 0.5 * x);
        let mut mask = DMatrix::from_element(n_q, n_kv, true);
        mask[(1, 2)] = false;
        mask[(3, 0)] = false;
        let option_sets = [
            Options::default(),
            Options {
                causal: Some(Causal::TopLeft),
                ..Options::default()
            },
            Options {
                causal: Some(Causal::BottomRight),
                window: Some((2, 0)),
                ..Options::default()
            },
            Options {
                softcap: Some(1.5),
                alibi_slope: Some(0.3),
                scale: Some(-0.8),
                ..Options::default()
            },
            Options {
                mask: Some(mask),
                key_mask: Some(vec![true, true, false, true, true, true]),
                ..Options::default()
            },
            Options {
                bias: Some(bias.clone()),
                softcap: Some(2.0),
                ..Options::default()
            },
            // Every key of row 0 disallowed: its gradients must be exactly 0.
            Options {
                causal: Some(Causal::BottomRight),
                window: Some((0, 0)),
                key_mask: Some(vec![true, true, false, true, true, true]),
                ..Options::default()
            },
        ];
        let (q, k, v, d_o) = (
            m(n_q, d_k, 0.1),
            m(n_kv, d_k, 0.2),
            m(n_kv, d_v, 0.3),
            m(n_q, d_v, 0.4),
        );
        let h = 1e-5;
        for (case, o) in option_sets.iter().enumerate() {
            let g = attention_backward(&q, &k, &v, &d_o, o);
            let scale = [&g.dq, &g.dk, &g.dv, &g.d_bias]
                .iter()
                .fold(1.0f64, |a, m| a.max(m.amax()));
            let check = |name: &str,
                         x: &DMatrix<f64>,
                         grad: &DMatrix<f64>,
                         f: &dyn Fn(&DMatrix<f64>) -> f64| {
                for r in 0..x.nrows() {
                    for c in 0..x.ncols() {
                        let (mut plus, mut minus) = (x.clone(), x.clone());
                        plus[(r, c)] += h;
                        minus[(r, c)] -= h;
                        let fd = (f(&plus) - f(&minus)) / (2.0 * h);
                        let err = (fd - grad[(r, c)]).abs();
                        assert!(
                            err <= 1e-7 * scale,
                            "case {case}: d{name}[{r}, {c}] = {} but finite difference {fd}",
                            grad[(r, c)]
                        );
                    }
                }
            };
            check("q", &q, &g.dq, &|x| loss(x, &k, &v, &d_o, o));
            check("k", &k, &g.dk, &|x| loss(&q, x, &v, &d_o, o));
            check("v", &v, &g.dv, &|x| loss(&q, &k, x, &d_o, o));
            let with_bias = |b: &DMatrix<f64>| {
                let base = o.bias.clone().unwrap_or_else(|| DMatrix::zeros(n_q, n_kv));
                Options {
                    bias: Some(&base + b),
                    ..o.clone()
                }
            };
            let zero = DMatrix::zeros(n_q, n_kv);
            check("bias", &zero, &g.d_bias, &|b| {
                loss(&q, &k, &v, &d_o, &with_bias(b))
            });
            if case == 6 {
                // Row 0 (diag −2 + 0 … bottom-right, window 0) sees key 2 only, which the
                // key mask removes: a fully masked row.
                assert!(g.dq.row(0).iter().all(|&x| x == 0.0));
                assert!(g.d_bias.row(0).iter().all(|&x| x == 0.0));
            }
        }
    }
}
