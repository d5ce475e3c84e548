//! A multi-head attention layer, by definition: [`compute_qkv`], biases, [`rope()`] per
//! sequence, [`multi_head_attention`], and the output projection ([`project`]), in f64.

use nalgebra::DMatrix;

use crate::{
    HeadOptions, Layout, RopeConvention, compute_qkv, multi_head_attention, project, rope,
};

/// Rotary embedding parameters of a [`Layer`] (see [`rope()`]).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LayerRope {
    /// Rotary dimension `r` (even, ≤ d_head).
    pub rotary_dim: usize,
    /// Base θ.
    pub base: f64,
    /// Which dimensions pair up.
    pub convention: RopeConvention,
}

/// The weights of a multi-head attention layer; rows are tokens, weights multiply from the
/// right (`X·W`; PyTorch's `nn.Linear` stores `Wᵀ`).
///
/// ```text
/// y = concat_h(attention_h(X·W_q + b_q, X·W_k + b_k, X·W_v + b_v))·W_o + b_o
/// ```
/// with RoPE on Q and K (positions from 0 in each sequence) when `rope` is set and the
/// call is self-attention.
#[derive(Clone, Debug)]
pub struct Layer {
    /// Query heads `h_q`.
    pub heads_q: usize,
    /// Key/value heads `h_kv` (divides `h_q`).
    pub heads_kv: usize,
    /// d_model × h_q·d_head.
    pub w_q: DMatrix<f64>,
    /// d_model × h_kv·d_head.
    pub w_k: DMatrix<f64>,
    /// d_model × h_kv·d_v.
    pub w_v: DMatrix<f64>,
    /// h_q·d_v × d_model.
    pub w_o: DMatrix<f64>,
    /// h_q·d_head entries, if any.
    pub b_q: Option<Vec<f64>>,
    /// h_kv·d_head entries, if any.
    pub b_k: Option<Vec<f64>>,
    /// h_kv·d_v entries, if any.
    pub b_v: Option<Vec<f64>>,
    /// d_model entries, if any.
    pub b_o: Option<Vec<f64>>,
    /// Rotary embedding of Q and K in self-attention, if any.
    pub rope: Option<LayerRope>,
}

impl Layer {
    /// Self-attention of a packed batch: `x`'s rows are the tokens of the sequences of
    /// `seqlens` one after the other (`&[n]` for one sequence); each sequence attends to
    /// itself, RoPE positions start at 0 in each. `options` as in
    /// [`multi_head_attention`] (the layout is `seqlens` for queries and keys).
    ///
    /// # Panics
    /// If the shapes disagree (the oracle asserts).
    ///
    /// # Example
    /// ```
    /// use attention_reference::{HeadOptions, Layer};
    /// use nalgebra::DMatrix;
    ///
    /// let eye = DMatrix::<f64>::identity(2, 2);
    /// let layer = Layer {
    ///     heads_q: 1, heads_kv: 1,
    ///     w_q: eye.clone(), w_k: eye.clone(), w_v: eye.clone(), w_o: eye.clone(),
    ///     b_q: None, b_k: None, b_v: None, b_o: Some(vec![1.0, -1.0]),
    ///     rope: None,
    /// };
    /// // One token attends to itself only: y = x + b_o.
    /// let x = DMatrix::from_row_slice(1, 2, &[0.5, 2.0]);
    /// let y = layer.forward(&x, &[1], &HeadOptions::default());
    /// assert_eq!(y, DMatrix::from_row_slice(1, 2, &[1.5, 1.0]));
    /// ```
    #[must_use]
    pub fn forward(
        &self,
        x: &DMatrix<f64>,
        seqlens: &[usize],
        options: &HeadOptions,
    ) -> DMatrix<f64> {
        let (q, k, v) = compute_qkv(x, &self.w_q, &self.w_k, &self.w_v);
        let (mut q, mut k, v) = (
            add_bias(q, self.b_q.as_deref()),
            add_bias(k, self.b_k.as_deref()),
            add_bias(v, self.b_v.as_deref()),
        );
        if let Some(r) = &self.rope {
            let mut start = 0;
            for &len in seqlens {
                let positions: Vec<usize> = (0..len).collect();
                for (m, heads) in [(&mut q, self.heads_q), (&mut k, self.heads_kv)] {
                    let rows = m.rows(start, len).into_owned();
                    let rotated =
                        rope(&rows, heads, &positions, r.rotary_dim, r.base, r.convention);
                    m.rows_mut(start, len).copy_from(&rotated);
                }
                start += len;
            }
        }
        self.attend(&q, &k, &v, seqlens, seqlens, options)
    }

    /// Cross-attention: queries from `x_q`, keys and values from `x_kv`, one sequence, no
    /// RoPE.
    ///
    /// # Panics
    /// If the shapes disagree.
    #[must_use]
    pub fn forward_cross(
        &self,
        x_q: &DMatrix<f64>,
        x_kv: &DMatrix<f64>,
        options: &HeadOptions,
    ) -> DMatrix<f64> {
        let q = add_bias(project(x_q, &self.w_q), self.b_q.as_deref());
        let k = add_bias(project(x_kv, &self.w_k), self.b_k.as_deref());
        let v = add_bias(project(x_kv, &self.w_v), self.b_v.as_deref());
        self.attend(&q, &k, &v, &[x_q.nrows()], &[x_kv.nrows()], options)
    }

    /// `concat_h attention_h(Q, K, V)·W_o + b_o`.
    fn attend(
        &self,
        q: &DMatrix<f64>,
        k: &DMatrix<f64>,
        v: &DMatrix<f64>,
        seqlens_q: &[usize],
        seqlens_kv: &[usize],
        options: &HeadOptions,
    ) -> DMatrix<f64> {
        let layout = Layout {
            heads_q: self.heads_q,
            heads_kv: self.heads_kv,
            seqlens_q: seqlens_q.to_vec(),
            seqlens_kv: seqlens_kv.to_vec(),
        };
        let a = multi_head_attention(q, k, v, &layout, options).output;
        add_bias(project(&a, &self.w_o), self.b_o.as_deref())
    }
}

/// `m + 1·bᵀ` (the bias added to every row), one rounding per entry.
fn add_bias(mut m: DMatrix<f64>, b: Option<&[f64]>) -> DMatrix<f64> {
    if let Some(b) = b {
        assert_eq!(b.len(), m.ncols(), "a bias has one entry per column");
        for (mut column, &b) in m.column_iter_mut().zip(b) {
            column.add_scalar_mut(b);
        }
    }
    m
}
