//! Trains a tiny one-layer attention model with the backward pass.
//!
//! The task: each sequence is `LEN` random tokens from a vocabulary of `VOCAB`; at every
//! position the model must output the token one position earlier (a "previous token"
//! head, the building block of induction heads). Token `t` at position `i` enters as
//! `x = [onehot(t), onehot(i)]`; the model is
//!
//! ```text
//! Q = X·W_q   K = X·W_k   V = X·W_v        (d_head columns)
//! A = causal attention(Q, K, V)            one head, a packed batch of sequences
//! Y = A·W_o                                (VOCAB columns)
//! L = mean over positions of |Y_i − onehot(token_{i−1})|²   (position 0: target 0)
//! ```
//!
//! Gradients: `dY = 2(Y − target)/N`, `dW_o = Aᵀ·dY`, `dA = dY·W_oᵀ`, then
//! `multi_head_attention_backward` gives dQ, dK, dV, and `compute_qkv_backward` turns them
//! into `dW_q = Xᵀ·dQ` (likewise K, V).
//! Adam updates the four matrices. Fixed seed; the loss is printed every few steps; the
//! program exits with an error unless the final loss is below a fifth of the first.
//!
//! ```text
//! cargo run --release --example train [steps]
//! ```

use attention_core::{
    AttentionOptions, Causal, HeadLayout, compute_qkv, compute_qkv_backward,
    multi_head_attention_backward, multi_head_attention_with_lse,
};
use nalgebra::DMatrix;

const VOCAB: usize = 8;
const LEN: usize = 12;
const D_HEAD: usize = 16;
const BATCH: usize = 16;
const FEATURES: usize = VOCAB + LEN;

/// A small deterministic generator (xorshift64*), so the example needs nothing else.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    /// Uniform in [−1, 1).
    fn uniform(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 52) as f64 - 1.0
    }
}

/// A weight matrix with Adam's moments.
struct Param {
    w: DMatrix<f64>,
    m: DMatrix<f64>,
    v: DMatrix<f64>,
}

impl Param {
    fn new(rows: usize, cols: usize, rng: &mut Rng) -> Self {
        let scale = 1.0 / (rows as f64).sqrt();
        Param {
            w: DMatrix::from_fn(rows, cols, |_, _| rng.uniform() * scale),
            m: DMatrix::zeros(rows, cols),
            v: DMatrix::zeros(rows, cols),
        }
    }

    /// One Adam step (β₁ 0.9, β₂ 0.999) with learning rate `lr` at step `t` (from 1).
    fn adam(&mut self, grad: &DMatrix<f64>, lr: f64, t: i32) {
        let (b1, b2, eps) = (0.9, 0.999, 1e-8);
        self.m = &self.m * b1 + grad * (1.0 - b1);
        self.v = &self.v * b2 + grad.component_mul(grad) * (1.0 - b2);
        let (c1, c2) = (1.0 - b1.powi(t), 1.0 - b2.powi(t));
        for ((w, m), v) in self.w.iter_mut().zip(self.m.iter()).zip(self.v.iter()) {
            *w -= lr * (m / c1) / ((v / c2).sqrt() + eps);
        }
    }
}

/// A batch: inputs `X` (BATCH·LEN × FEATURES) and targets (BATCH·LEN × VOCAB).
fn batch(rng: &mut Rng) -> (DMatrix<f64>, DMatrix<f64>) {
    let mut x = DMatrix::zeros(BATCH * LEN, FEATURES);
    let mut y = DMatrix::zeros(BATCH * LEN, VOCAB);
    for s in 0..BATCH {
        let tokens: Vec<usize> = (0..LEN)
            .map(|_| (rng.next() % VOCAB as u64) as usize)
            .collect();
        for (i, &t) in tokens.iter().enumerate() {
            let r = s * LEN + i;
            x[(r, t)] = 1.0;
            x[(r, VOCAB + i)] = 1.0;
            if i > 0 {
                y[(r, tokens[i - 1])] = 1.0;
            }
        }
    }
    (x, y)
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let steps: i32 = std::env::args().nth(1).map_or(Ok(300), |s| s.parse())?;
    let mut rng = Rng(0x5eed_1234_abcd_0001);
    let mut params = [
        Param::new(FEATURES, D_HEAD, &mut rng), // W_q
        Param::new(FEATURES, D_HEAD, &mut rng), // W_k
        Param::new(FEATURES, D_HEAD, &mut rng), // W_v
        Param::new(D_HEAD, VOCAB, &mut rng),    // W_o
    ];
    let lens = [LEN; BATCH];
    let layout = HeadLayout::new(1, 1).with_seqlens(&lens, &lens);
    let options = AttentionOptions::new().with_causal(Causal::TopLeft);
    let n = (BATCH * LEN) as f64;
    let (mut first, mut last) = (None, 0.0);
    for t in 1..=steps {
        let (x, target) = batch(&mut rng);
        let [w_q, w_k, w_v, w_o] = &params;
        let (q, k, v) = compute_qkv(&x, &w_q.w, &w_k.w, &w_v.w)?;
        let (a, lse) = multi_head_attention_with_lse(&q, &k, &v, &layout, &options)?;
        let y = &a * &w_o.w;
        let diff = &y - &target;
        let loss = diff.norm_squared() / n;
        let d_y = diff * (2.0 / n);
        let d_w_o = a.transpose() * &d_y;
        let d_a = &d_y * w_o.w.transpose();
        let g = multi_head_attention_backward(&q, &k, &v, &a, &lse, &d_a, &layout, &options)?;
        let qkv = compute_qkv_backward(&x, &w_q.w, &w_k.w, &w_v.w, &g.dq, &g.dk, &g.dv)?;
        let grads = [qkv.dw_q, qkv.dw_k, qkv.dw_v, d_w_o];
        for (p, grad) in params.iter_mut().zip(&grads) {
            p.adam(grad, 0.03, t);
        }
        first.get_or_insert(loss);
        last = loss;
        if t == 1 || t % 25 == 0 || t == steps {
            println!("step {t:4}: loss {loss:.5}");
        }
    }
    let first = first.unwrap_or(0.0);
    println!("first loss {first:.5}, final {last:.5}");
    // A NaN loss fails too.
    let fell = last < first / 5.0;
    if steps > 0 && !fell {
        return Err(
            format!("the loss did not fall enough: first {first:.5}, final {last:.5}").into(),
        );
    }
    Ok(())
}
