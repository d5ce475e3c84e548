//! Attention dropout (`AttentionOptions::with_dropout`):
//!
//! - the forward against the reference's dropout by definition (its own Philox), f32 and
//!   f64, sizes across the block kernel's tiles, with and without the causal band and
//!   softcap, within the output bound scaled by `1/(1 − p)`; lse is the softmax's; thread
//!   counts change no bit;
//! - statistics: the kept fraction is `1 − p` and the mean output over seeds is the output
//!   without dropout;
//! - multi-head streams (sequence, head) and the packed backward against the reference;
//! - bad options typed. (The single-head backward with dropout is in `tests/backward.rs`,
//!   whose random cases draw it.)

mod common;

use attention_core::{
    AttentionError, AttentionOptions, Causal, HeadLayout, KvCache, Parallelism, attention_weights,
    cached_attention, multi_head_attention_backward, multi_head_attention_with_lse,
    scaled_dot_product_attention, scaled_dot_product_attention_with_lse,
};
use attention_testdata::gaussian;
use common::{
    OptionParts, assert_lse_close, assert_output_close, extra, narrow, pools, score_error, widen,
};
use nalgebra::DMatrix;
use proptest::prelude::*;

fn check<T: attention_core::Element>(
    (q, k, v): (&DMatrix<f64>, &DMatrix<f64>, &DMatrix<f64>),
    causal: Option<Causal>,
    softcap: Option<f64>,
    (p, seed): (f64, u64),
) -> Result<(), TestCaseError> {
    let (q, k, v) = (narrow::<T>(q), narrow::<T>(k), narrow::<T>(v));
    let parts = OptionParts {
        scale: None,
        causal,
        mask: None,
        key_mask: None,
        bias: None,
        window: None,
        softcap: softcap.map(T::from_f64_rounded),
        alibi: None,
        dropout: Some((p, seed)),
    };
    let options = parts.core();
    let (out, lse) = scaled_dot_product_attention_with_lse(&q, &k, &v, &options)
        .map_err(|e| TestCaseError::fail(format!("{e}")))?;
    let (qw, kw, vw) = (widen(&q), widen(&k), widen(&v));
    let want = attention_reference::attention(&qw, &kw, &vw, &parts.reference());
    let eps = T::EPSILON.to_f64();
    let (n_q, n_kv) = (q.nrows(), k.nrows());
    let top_left = causal == Some(Causal::TopLeft);
    let b = extra(
        (n_q, n_kv),
        top_left,
        None,
        parts.softcap.map(|c| c.to_f64()),
        None,
    );
    let scale = 1.0 / (q.ncols() as f64).sqrt();
    let delta = score_error(&qw, &kw, scale, &b, eps);
    // The output is a sum of kept weights times 1/(1 − p): the bound of the values
    // scaled by it.
    let scaled_v = &vw * (1.0 / (1.0 - p));
    assert_output_close(
        &widen(&out),
        &want.output,
        &scaled_v,
        &delta,
        eps,
        "dropout output",
    );
    let lse: Vec<f64> = lse.iter().map(|x| x.to_f64()).collect();
    assert_lse_close(&lse, &want.lse, &delta, n_kv, eps, "dropout lse");
    for (threads, pool) in pools() {
        let again = pool
            .install(|| {
                scaled_dot_product_attention(
                    &q,
                    &k,
                    &v,
                    &options.clone().with_parallelism(Parallelism::Rayon),
                )
            })
            .map_err(|e| TestCaseError::fail(format!("{e}")))?;
        prop_assert!(again == out, "{} threads change the output", threads);
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    /// Sizes across the block kernel's 64-row blocks and 60-key tiles.
    #[test]
    fn forward_matches_the_reference(
        n_q in 1..150usize,
        n_kv in 1..150usize,
        d in 1..12usize,
        p in prop::sample::select(vec![0.1, 0.5, 0.9]),
        seed in any::<u64>(),
        causal in prop::option::of(prop::sample::select(vec![Causal::TopLeft, Causal::BottomRight])),
        softcap in prop::option::of(Just(2.0)),
    ) {
        let g = |r, c, s: u64| gaussian(r, c, 1.0, seed.wrapping_add(s));
        let (q, k, v) = (g(n_q, d, 1), g(n_kv, d, 2), g(n_kv, 3, 3));
        check::<f64>((&q, &k, &v), causal, softcap, (p, seed))?;
        check::<f32>((&q, &k, &v), causal, softcap, (p, seed))?;
    }
}

/// With V the identity, output `(i, j)` is `P_ij·M_ij/(1 − p)`: the mask itself. Over
/// 400 seeds the kept fraction is `1 − p` (within 5 standard deviations of a binomial
/// count), and the mean output is `P` (within 5 standard errors of the mean, entry by
/// entry: the variance of one draw is `P_ij²·p/(1 − p)`).
#[test]
fn kept_fraction_and_expectation() {
    let (n_q, n_kv, p) = (6, 40, 0.3);
    let q = gaussian(n_q, 4, 1.0, 1);
    let k = gaussian(n_kv, 4, 1.0, 2);
    let v = DMatrix::<f64>::identity(n_kv, n_kv);
    let plain = scaled_dot_product_attention(&q, &k, &v, &AttentionOptions::new()).unwrap();
    let seeds = 400;
    let mut sum = DMatrix::zeros(n_q, n_kv);
    let mut kept = 0usize;
    for seed in 0..seeds {
        let out = scaled_dot_product_attention(
            &q,
            &k,
            &v,
            &AttentionOptions::new().with_dropout(p, seed),
        )
        .unwrap();
        for (o, w) in out.iter().zip(plain.iter()) {
            assert!(
                *o == 0.0 || (o - w / (1.0 - p)).abs() <= 1e-15,
                "{o} vs {w}"
            );
            kept += usize::from(*o != 0.0);
        }
        sum += out;
    }
    let trials = (seeds as usize * n_q * n_kv) as f64;
    let sd = (trials * p * (1.0 - p)).sqrt();
    assert!(
        (kept as f64 - trials * (1.0 - p)).abs() <= 5.0 * sd,
        "kept {kept} of {trials}, expected {}",
        trials * (1.0 - p)
    );
    let mean = sum / seeds as f64;
    for (m, w) in mean.iter().zip(plain.iter()) {
        let se = (w * w * p / (1.0 - p) / seeds as f64).sqrt();
        assert!(
            (m - w).abs() <= 5.0 * se + 1e-15,
            "mean {m} vs {w} (se {se:e})"
        );
    }
}

/// A packed batch with grouped-query heads: each (sequence, head) block draws its own
/// stream, as the reference's `head_options` does; the forward and the backward match the
/// reference's.
#[test]
fn packed_heads_match_the_reference() {
    let (lens, h_q, h_kv, d) = ([37usize, 70, 5], 4, 2, 6);
    let rows: usize = lens.iter().sum();
    let q = gaussian(rows, h_q * d, 1.0, 3);
    let k = gaussian(rows, h_kv * d, 1.0, 4);
    let v = gaussian(rows, h_kv * d, 1.0, 5);
    let d_out = gaussian(rows, h_q * d, 1.0, 6);
    let layout = HeadLayout::new(h_q, h_kv).with_seqlens(&lens, &lens);
    let options = AttentionOptions::new()
        .with_causal(Causal::BottomRight)
        .with_dropout(0.4, 77);
    let (out, lse) = multi_head_attention_with_lse(&q, &k, &v, &layout, &options).unwrap();
    let g =
        multi_head_attention_backward(&q, &k, &v, &out, &lse, &d_out, &layout, &options).unwrap();
    let ref_layout = attention_reference::Layout {
        heads_q: h_q,
        heads_kv: h_kv,
        seqlens_q: lens.to_vec(),
        seqlens_kv: lens.to_vec(),
    };
    let ref_options = attention_reference::HeadOptions {
        base: attention_reference::Options {
            causal: Some(attention_reference::Causal::BottomRight),
            dropout: Some(attention_reference::Dropout {
                p: 0.4,
                seed: 77,
                head: 0,
                sequence: 0,
            }),
            ..Default::default()
        },
        ..Default::default()
    };
    let want = attention_reference::multi_head_attention(&q, &k, &v, &ref_layout, &ref_options);
    let want_g =
        attention_reference::multi_head_backward(&q, &k, &v, &d_out, &ref_layout, &ref_options);
    // f64 throughout: errors of a few ulps of the largest terms.
    let close = |name: &str, got: &DMatrix<f64>, want: &DMatrix<f64>| {
        let err = (got - want).amax();
        assert!(err <= 1e-12 * want.amax().max(1.0), "{name} off by {err:e}");
    };
    close("output", &out, &want.output);
    close("dq", &g.dq, &want_g.dq);
    close("dk", &g.dk, &want_g.dk);
    close("dv", &g.dv, &want_g.dv);
    // Sequence 0 alone draws the same stream: the same bits. Sequence 1 alone draws
    // sequence 0's stream, not its own: other outputs.
    let alone = |r: std::ops::Range<usize>| {
        let n = r.len();
        let l = HeadLayout::new(h_q, h_kv);
        let block = |m: &DMatrix<f64>| m.rows(r.start, n).into_owned();
        multi_head_attention_with_lse(&block(&q), &block(&k), &block(&v), &l, &options)
            .unwrap()
            .0
    };
    assert_eq!(alone(0..37), out.rows(0, 37));
    assert_ne!(alone(37..107), out.rows(37, 70));
}

#[test]
fn bad_options_are_typed_errors() {
    let q = gaussian(3, 2, 1.0, 7);
    let invalid = |r: &Result<DMatrix<f64>, AttentionError>| {
        matches!(
            r,
            Err(AttentionError::InvalidOption {
                option: "dropout",
                ..
            })
        )
    };
    for p in [1.0, -0.1, f64::NAN, 2.0] {
        let o = AttentionOptions::new().with_dropout(p, 1);
        assert!(
            invalid(&scaled_dot_product_attention(&q, &q, &q, &o)),
            "p = {p}"
        );
    }
    let o = AttentionOptions::new().with_dropout(0.5, 1);
    assert!(invalid(&attention_weights(&q, &q, &q, &o)));
    // Values whose sums, scaled by 1/(1 − p), could overflow.
    let big = DMatrix::<f32>::from_element(3, 2, 1e38);
    let o32 = AttentionOptions::new().with_dropout(0.9, 1);
    assert!(matches!(
        scaled_dot_product_attention(&big, &big, &big, &o32),
        Err(AttentionError::InvalidOption {
            option: "dropout",
            ..
        })
    ));
    // The cache is for inference.
    let mut cache = KvCache::<f64>::new(1, 2, 2).unwrap();
    let seq = cache.add_sequence();
    cache.append(seq, &q, &q).unwrap();
    let r = cached_attention(&q, &cache, seq, &HeadLayout::new(1, 1), &o);
    assert!(matches!(
        r,
        Err(AttentionError::InvalidOption {
            option: "dropout",
            ..
        })
    ));
}
