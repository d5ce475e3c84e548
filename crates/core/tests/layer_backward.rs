//! `MultiHeadAttention::backward` / `backward_packed`: every gradient (input, four weights,
//! four biases) against central differences of the layer's own forward in f64, for
//! grouped-query heads with RoPE (both pairings), packed sequences, causal and other
//! options; f32 against f64; bad inputs typed.

use attention_core::{
    AttentionError, AttentionOptions, Axis, Causal, GradientOf, LayerGradients, MultiHeadAttention,
    Operand, Rope, RopeConvention,
};
use attention_testdata::gaussian;
use nalgebra::{DMatrix, DVector};

/// The layer's parameters (f64), so that each can be perturbed.
#[derive(Clone)]
struct Params {
    w: [DMatrix<f64>; 4],
    b: [Option<DVector<f64>>; 4],
    rope: Option<Rope>,
}

const HEADS: (usize, usize) = (4, 2);

impl Params {
    fn new(d_model: usize, d_head: usize, biases: bool, rope: Option<Rope>, seed: u64) -> Self {
        let (h_q, h_kv) = HEADS;
        let m = |r, c, s: u64| gaussian(r, c, 0.5, seed * 16 + s);
        let v = |n, s: u64| biases.then(|| DVector::from_iterator(n, m(n, 1, s).iter().copied()));
        Params {
            w: [
                m(d_model, h_q * d_head, 1),
                m(d_model, h_kv * d_head, 2),
                m(d_model, h_kv * d_head, 3),
                m(h_q * d_head, d_model, 4),
            ],
            b: [
                v(h_q * d_head, 5),
                v(h_kv * d_head, 6),
                v(h_kv * d_head, 7),
                v(d_model, 8),
            ],
            rope,
        }
    }

    fn layer(&self) -> MultiHeadAttention<f64> {
        let [w_q, w_k, w_v, w_o] = self.w.clone();
        let [b_q, b_k, b_v, b_o] = self.b.clone();
        let layer = MultiHeadAttention::new(HEADS.0, HEADS.1, w_q, w_k, w_v, w_o)
            .and_then(|l| l.with_biases(b_q, b_k, b_v, b_o))
            .expect("a valid layer");
        match self.rope {
            Some(r) => layer.with_rope(r).expect("a valid RoPE"),
            None => layer,
        }
    }
}

/// Checks every gradient of `L = Σ dY∘y(x)` (y the packed forward) against central
/// differences with step h = 1e-5: the truncation error is O(h²) (about 1e-10 here) and
/// the rounding error about `u·|L|/h` ≈ 1e-11, so 1e-7 of max(1, |g|) has a wide margin
/// and still fails for any wrong term.
fn check(p: &Params, x: &DMatrix<f64>, seqlens: &[usize], options: &AttentionOptions<'_, f64>) {
    let d_y = gaussian(x.nrows(), x.ncols(), 1.0, 99);
    let loss = |p: &Params, x: &DMatrix<f64>| -> f64 {
        let y = p
            .layer()
            .forward_packed(x, seqlens, options)
            .expect("forward");
        y.component_mul(&d_y).sum()
    };
    let g: LayerGradients<f64> = p
        .layer()
        .backward_packed(x, seqlens, &d_y, options)
        .expect("backward");
    let h = 1e-5;
    let close = |name: &str, fd: f64, got: f64| {
        assert!(
            (fd - got).abs() <= 1e-7 * got.abs().max(1.0),
            "{name}: central difference {fd} vs gradient {got}"
        );
    };
    for r in 0..x.nrows() {
        for c in 0..x.ncols() {
            let (mut a, mut b) = (x.clone(), x.clone());
            a[(r, c)] += h;
            b[(r, c)] -= h;
            close(
                &format!("dx[{r}][{c}]"),
                (loss(p, &a) - loss(p, &b)) / (2.0 * h),
                g.dx[(r, c)],
            );
        }
    }
    let dws = [&g.dw_q, &g.dw_k, &g.dw_v, &g.dw_o];
    for (which, dw) in dws.into_iter().enumerate() {
        for r in 0..dw.nrows() {
            for c in 0..dw.ncols() {
                let (mut a, mut b) = (p.clone(), p.clone());
                a.w[which][(r, c)] += h;
                b.w[which][(r, c)] -= h;
                let fd = (loss(&a, x) - loss(&b, x)) / (2.0 * h);
                close(&format!("dw[{which}][{r}][{c}]"), fd, dw[(r, c)]);
            }
        }
    }
    let dbs = [&g.db_q, &g.db_k, &g.db_v, &g.db_o];
    for (which, db) in dbs.into_iter().enumerate() {
        assert_eq!(
            db.is_some(),
            p.b[which].is_some(),
            "bias {which}: gradient iff bias"
        );
        let Some(db) = db else { continue };
        for e in 0..db.len() {
            let (mut a, mut b) = (p.clone(), p.clone());
            a.b[which].as_mut().expect("bias")[e] += h;
            b.b[which].as_mut().expect("bias")[e] -= h;
            let fd = (loss(&a, x) - loss(&b, x)) / (2.0 * h);
            close(&format!("db[{which}][{e}]"), fd, db[e]);
        }
    }
}

#[test]
fn gradients_match_central_differences_with_rope_gqa_and_biases() {
    let p = Params::new(6, 4, true, Some(Rope::new(4)), 1);
    let x = gaussian(7, 6, 1.0, 11);
    check(
        &p,
        &x,
        &[3, 4],
        &AttentionOptions::new().with_causal(Causal::BottomRight),
    );
}

#[test]
fn gradients_match_central_differences_interleaved_rope_softcap_window() {
    let rope = Rope::new(2)
        .with_convention(RopeConvention::Interleaved)
        .with_base(100.0);
    let p = Params::new(5, 4, true, Some(rope), 2);
    let x = gaussian(6, 5, 1.0, 12);
    let options = AttentionOptions::new()
        .with_softcap(3.0)
        .with_window(2, 0)
        .with_alibi_slope(0.3);
    check(&p, &x, &[6], &options);
}

#[test]
fn gradients_match_central_differences_without_biases_or_rope() {
    let p = Params::new(4, 3, false, None, 3);
    let x = gaussian(5, 4, 1.0, 13);
    check(&p, &x, &[2, 0, 3], &AttentionOptions::new());
}

/// `backward` is `backward_packed` with one sequence; f32 agrees with f64 within f32's
/// rounding (a loose check that the f32 instantiation computes the same thing).
#[test]
fn single_sequence_and_f32() {
    let p = Params::new(6, 4, true, Some(Rope::new(4)), 4);
    let x = gaussian(5, 6, 1.0, 14);
    let d_y = gaussian(5, 6, 1.0, 15);
    let options = AttentionOptions::new().with_causal(Causal::TopLeft);
    let layer = p.layer();
    let one = layer.backward(&x, &d_y, &options).expect("backward");
    let packed = layer
        .backward_packed(&x, &[5], &d_y, &options)
        .expect("backward");
    assert_eq!(one, packed);
    let narrow = |m: &DMatrix<f64>| m.map(|v| v as f32);
    let [w_q, w_k, w_v, w_o] = p.w.each_ref().map(narrow);
    let b =
        p.b.each_ref()
            .map(|b| b.as_ref().map(|b| b.map(|v| v as f32)));
    let [b_q, b_k, b_v, b_o] = b;
    let layer32 = MultiHeadAttention::new(HEADS.0, HEADS.1, w_q, w_k, w_v, w_o)
        .and_then(|l| l.with_biases(b_q, b_k, b_v, b_o))
        .and_then(|l| l.with_rope(Rope::new(4)))
        .expect("a valid layer");
    let g32 = layer32
        .backward(
            &narrow(&x),
            &narrow(&d_y),
            &AttentionOptions::new().with_causal(Causal::TopLeft),
        )
        .expect("backward");
    let err = (g32.dw_q.map(f64::from) - &one.dw_q).amax();
    assert!(
        err <= 1e-4 * one.dw_q.amax().max(1.0),
        "f32 dW_q off by {err}"
    );
    let err = (g32.dx.map(f64::from) - &one.dx).amax();
    assert!(err <= 1e-4 * one.dx.amax().max(1.0), "f32 dX off by {err}");
}

#[test]
fn bad_inputs_are_typed_errors() {
    let p = Params::new(4, 2, true, None, 5);
    let layer = p.layer();
    let x = gaussian(3, 4, 1.0, 16);
    let options = AttentionOptions::new();
    let wrong = DMatrix::zeros(3, 5);
    assert!(matches!(
        layer.backward(&x, &wrong, &options),
        Err(AttentionError::DimensionMismatch {
            operand: Operand::OutputGradient,
            axis: Axis::Columns,
            ..
        })
    ));
    let wrong = DMatrix::zeros(2, 4);
    assert!(matches!(
        layer.backward(&x, &wrong, &options),
        Err(AttentionError::DimensionMismatch {
            operand: Operand::OutputGradient,
            axis: Axis::Rows,
            ..
        })
    ));
    let mut nan = DMatrix::zeros(3, 4);
    nan[(1, 2)] = f64::INFINITY;
    assert!(matches!(
        layer.backward(&x, &nan, &options),
        Err(AttentionError::NonFinite {
            operand: Operand::OutputGradient,
            row: 1,
            column: 2,
            ..
        })
    ));
    assert!(matches!(
        layer.backward_packed(&x, &[1, 1], &DMatrix::zeros(3, 4), &options),
        Err(AttentionError::SequenceLengths {
            operand: Operand::Input,
            ..
        })
    ));
    // dA = dY·W_oᵀ past f32's range (3e38 + 3e38): named as the heads' output gradient,
    // at its first entry.
    let big = MultiHeadAttention::<f32>::new(
        1,
        1,
        DMatrix::from_element(2, 2, 1.0),
        DMatrix::from_element(2, 2, 1.0),
        DMatrix::from_element(2, 2, 1.0),
        DMatrix::from_element(2, 2, 1.0),
    )
    .expect("a layer");
    let x = DMatrix::<f32>::from_element(2, 2, 1.0);
    let d_y = DMatrix::<f32>::from_element(2, 2, 3e38);
    assert_eq!(
        big.backward(&x, &d_y, &AttentionOptions::new()),
        Err(AttentionError::ProductOverflow {
            operand: Operand::Gradient(GradientOf::HeadOutputs),
            row: 0,
            column: 0
        })
    );
}
