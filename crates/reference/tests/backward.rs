//! The reference's gradients (`attention_backward`, `multi_head_backward`) against the
//! 40 PyTorch autograd cases of `backward_cases.json` (f64): GQA, MQA, packed sequences
//! with an empty one, causal both ways, window + softcap + per-head ALiBi, key masks with a
//! negative scale, and single-head cases with a mask and a bias and their `d_bias`.
//! Gradients within 1e-12 of `max(1, max|g|)` over the case (the README's rule: some
//! tensors are entirely 0); the forward output within 1e-12 as well.

use attention_reference::{Causal, HeadOptions, Layout, Options, multi_head_backward};
use attention_testdata::{BackwardCase, CausalAlign, backward_cases};
use nalgebra::DMatrix;

fn layout(c: &BackwardCase) -> Layout {
    let f = &c.forward;
    Layout {
        heads_q: f.h_q,
        heads_kv: f.h_kv,
        seqlens_q: f.seqlens_q.clone(),
        seqlens_kv: f.seqlens_kv.clone(),
    }
}

fn options(c: &BackwardCase) -> HeadOptions {
    let f = &c.forward;
    HeadOptions {
        base: Options {
            scale: f.scale,
            causal: f.causal.map(|a| match a {
                CausalAlign::TopLeft => Causal::TopLeft,
                CausalAlign::BottomRight => Causal::BottomRight,
            }),
            window: f.window,
            softcap: f.softcap,
            ..Options::default()
        },
        alibi_slopes: f.alibi_slopes.clone(),
        key_mask: f.key_mask.clone(),
        masks: c.mask.clone().map(|m| vec![m]),
        biases: c.bias.clone().map(|b| vec![b]),
    }
}

/// The largest `|got − want|` relative to `scale`.
fn error(got: &DMatrix<f64>, want: &DMatrix<f64>, scale: f64, label: &str) -> f64 {
    assert_eq!(got.shape(), want.shape(), "{label}: shape");
    got.iter()
        .zip(want.iter())
        .map(|(a, b)| (a - b).abs() / scale)
        .fold(0.0, f64::max)
}

#[test]
fn gradients_match_pytorch_autograd() {
    let cases = backward_cases();
    assert_eq!(cases.len(), 40);
    let mut worst = 0.0f64;
    for c in &cases {
        let f = &c.forward;
        let g = multi_head_backward(&f.q, &f.k, &f.v, &c.d_out, &layout(c), &options(c));
        let want = [&c.dq, &c.dk, &c.dv];
        let magnitude = want
            .iter()
            .chain(c.d_bias.as_ref().iter())
            .fold(1.0f64, |m, x| m.max(x.amax()));
        let mut errors = vec![
            error(&g.dq, &c.dq, magnitude, "dq"),
            error(&g.dk, &c.dk, magnitude, "dk"),
            error(&g.dv, &c.dv, magnitude, "dv"),
        ];
        if let Some(d_bias) = &c.d_bias {
            assert_eq!(g.d_biases.len(), 1, "{}", f.name);
            errors.push(error(&g.d_biases[0], d_bias, magnitude, "d_bias"));
        }
        for (name, e) in ["dq", "dk", "dv", "d_bias"].iter().zip(&errors) {
            assert!(
                *e <= 1e-12,
                "{}: {name} off by {e:e} of max(1, max|g|)",
                f.name
            );
            worst = worst.max(*e);
        }
        let out =
            attention_reference::multi_head_attention(&f.q, &f.k, &f.v, &layout(c), &options(c));
        let vmax = f.v.amax().max(1.0);
        assert!(
            error(&out.output, &f.output, vmax, "output") <= 1e-12,
            "{}: output",
            f.name
        );
    }
    // The oracle is far inside the bound: record how far (printed with --nocapture).
    println!("worst gradient error: {worst:e} of max(1, max|g|)");
}

/// Masked positions and fully masked rows get gradient exactly 0: the key-masked keys of
/// every `keymask` case have `dk = dv = 0`, bit for bit.
#[test]
fn masked_keys_get_no_gradient() {
    let mut checked = 0;
    for c in backward_cases()
        .iter()
        .filter(|c| c.forward.key_mask.is_some())
    {
        let f = &c.forward;
        let g = multi_head_backward(&f.q, &f.k, &f.v, &c.d_out, &layout(c), &options(c));
        for (j, &real) in f.key_mask.as_ref().unwrap().iter().enumerate() {
            if !real {
                assert!(
                    g.dk.row(j)
                        .iter()
                        .chain(g.dv.row(j).iter())
                        .all(|&x| x == 0.0),
                    "{}: key {j}",
                    f.name
                );
                checked += 1;
            }
        }
    }
    assert!(checked > 0);
}
