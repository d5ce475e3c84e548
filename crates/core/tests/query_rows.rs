//! `AttentionOptions::with_query_rows`: a call on rows `first .. first + len` of Q (and of
//! the mask and bias) returns those rows of the call on all of Q.
//!
//! For every CPU path this machine has, f32 and f64, every option that depends on a row's
//! position (causal both ways, windows, ALiBi, dropout) and the row-wise ones (mask,
//! bias), Q cut into chunks of several sizes:
//! - each chunk against the reference's call on all rows, with the bound of
//!   `common/mod.rs` (any chunk size, so every kernel route);
//! - chunks that start at a multiple of 64 rows and have more than 8 rows against
//!   core's call on all rows, bit for bit, when that call also has more than 8 rows and
//!   more than 64 keys: the same kernel route, the same query blocks (every path's block
//!   height divides 64), so the same key tiles (a block's tiles start at its first
//!   allowed key) — what the command-line tool's progress chunks rely on. A chunk that
//!   starts inside a block may start its key tiles elsewhere: equal within the bound,
//!   not in every bit;
//! - the typed errors: rows beyond `total`, a packed batch of several sequences, cached
//!   attention.

mod common;

use attention_core::{
    AttentionError, AttentionOptions, Causal, CpuPath, Element, HeadLayout, KvCache,
    cached_attention, multi_head_attention, scaled_dot_product_attention_with_lse,
};
use common::{
    assert_lse_close, assert_output_close, assert_same_bits, extra, gaussian, lse_f64, narrow,
    score_error, widen,
};
use nalgebra::DMatrix;

/// `(n_q, n_kv, d)`: few keys (one tile), and several tiles with a partial last one;
/// n_q below and above n_kv.
const SIZES: [(usize, usize, usize); 4] =
    [(13, 40, 8), (150, 70, 16), (130, 301, 24), (40, 150, 8)];

/// Chunk lengths: single rows and short chunks (the decoding route), 9 rows (the block
/// kernel), whole 64-row query blocks, and chunks that start inside a block.
const CHUNKS: [usize; 6] = [1, 5, 9, 64, 70, 128];

/// A row-dependent option of one case.
#[derive(Clone, Copy, Debug)]
enum Case {
    Plain,
    Causal(Causal),
    Window(usize, usize),
    /// A window with top-left causal: both bounds measured from `first + i`.
    CausalWindow,
    Alibi,
    Mask,
    Bias,
    Dropout,
}

const CASES: [Case; 9] = [
    Case::Plain,
    Case::Causal(Causal::TopLeft),
    Case::Causal(Causal::BottomRight),
    Case::Window(20, 3),
    Case::CausalWindow,
    Case::Alibi,
    Case::Mask,
    Case::Bias,
    Case::Dropout,
];

/// The mask and bias of all rows (both sized `n_q × n_kv`).
struct Inputs<T> {
    mask: DMatrix<bool>,
    bias: DMatrix<T>,
}

/// Core's options of `case` for rows `rows` (`None`: all rows, no `with_query_rows`), and
/// the reference's for all rows.
fn options<'a, T: Element>(
    case: Case,
    x: &'a Inputs<T>,
    rows: Option<(usize, usize, usize)>,
) -> (AttentionOptions<'a, T>, attention_reference::Options) {
    let mut core = AttentionOptions::new();
    let mut reference = attention_reference::Options::default();
    let slope = T::from_f64_rounded(0.07);
    match case {
        Case::Plain => {}
        Case::Causal(c) => {
            core = core.with_causal(c);
            reference.causal = Some(match c {
                Causal::TopLeft => attention_reference::Causal::TopLeft,
                Causal::BottomRight => attention_reference::Causal::BottomRight,
            });
        }
        Case::Window(left, right) => {
            core = core.with_window(left, right);
            reference.window = Some((left, right));
        }
        Case::CausalWindow => {
            core = core.with_causal(Causal::TopLeft).with_window(7, 0);
            reference.causal = Some(attention_reference::Causal::TopLeft);
            reference.window = Some((7, 0));
        }
        Case::Alibi => {
            core = core.with_alibi_slope(slope);
            reference.alibi_slope = Some(slope.to_f64());
        }
        Case::Mask => {
            core = match rows {
                Some((first, len, _)) => core.with_mask(x.mask.rows(first, len)),
                None => core.with_mask(&x.mask),
            };
            reference.mask = Some(x.mask.clone());
        }
        Case::Bias => {
            core = match rows {
                Some((first, len, _)) => core.with_bias(x.bias.rows(first, len)),
                None => core.with_bias(&x.bias),
            };
            reference.bias = Some(widen(&x.bias));
        }
        Case::Dropout => {
            core = core.with_dropout(0.3, 99);
            reference.dropout = Some(attention_reference::Dropout {
                p: 0.3,
                seed: 99,
                head: 0,
                sequence: 0,
            });
        }
    }
    if let Some((first, _, total)) = rows {
        core = core.with_query_rows(first, total);
    }
    (core, reference)
}

fn check<T: Element>(path: CpuPath) {
    let eps = T::EPSILON.to_f64();
    for (s, &(n_q, n_kv, d)) in SIZES.iter().enumerate() {
        let seed = 10 * s as u64;
        let q: DMatrix<T> = narrow(&gaussian(n_q, d, 1.0, seed));
        let k: DMatrix<T> = narrow(&gaussian(n_kv, d, 1.0, seed + 1));
        let v: DMatrix<T> = narrow(&gaussian(n_kv, d, 1.0, seed + 2));
        let x = Inputs {
            mask: DMatrix::from_fn(n_q, n_kv, |i, j| (i + 3 * j) % 5 != 2),
            bias: narrow(&gaussian(n_q, n_kv, 0.5, seed + 3)),
        };
        for case in CASES {
            let label = format!("{path:?} {n_q}x{n_kv}x{d} {case:?}");
            let (all_options, reference_options) = options(case, &x, None);
            let (all, all_lse) =
                scaled_dot_product_attention_with_lse(&q, &k, &v, &all_options.with_cpu_path(path))
                    .unwrap_or_else(|e| panic!("{label}: {e}"));
            let want = attention_reference::attention(
                &widen(&q),
                &widen(&k),
                &widen(&v),
                &reference_options,
            );
            let top_left = matches!(case, Case::Causal(Causal::TopLeft) | Case::CausalWindow);
            let scale = 1.0 / (d as f64).sqrt();
            let bias = matches!(case, Case::Bias).then(|| widen(&x.bias));
            let alibi = matches!(case, Case::Alibi).then_some(T::from_f64_rounded(0.07).to_f64());
            let b = extra((n_q, n_kv), top_left, bias.as_ref(), None, alibi);
            let delta = score_error(&widen(&q), &widen(&k), scale, &b, eps);
            for chunk in CHUNKS {
                let mut first = 0;
                while first < n_q {
                    let len = chunk.min(n_q - first);
                    let label = format!("{label}, rows {first}..{}", first + len);
                    let (o, _) = options(case, &x, Some((first, len, n_q)));
                    let (got, lse) = scaled_dot_product_attention_with_lse(
                        q.rows(first, len),
                        &k,
                        &v,
                        &o.with_cpu_path(path),
                    )
                    .unwrap_or_else(|e| panic!("{label}: {e}"));
                    let rows = |m: &DMatrix<f64>| m.rows(first, len).into_owned();
                    let vmax = if matches!(case, Case::Dropout) {
                        // Kept weights are scaled by 1/(1 − p).
                        widen(&v) / 0.7
                    } else {
                        widen(&v)
                    };
                    assert_output_close(
                        &widen(&got),
                        &rows(&want.output),
                        &vmax,
                        &delta[first..first + len],
                        eps,
                        &label,
                    );
                    assert_lse_close(
                        &lse_f64(&lse),
                        &want.lse[first..first + len],
                        &delta[first..first + len],
                        n_kv,
                        eps,
                        &label,
                    );
                    if first % 64 == 0 && len > 8 && n_q > 8 && n_kv > 64 {
                        assert_same_bits(
                            got.iter(),
                            all.rows(first, len).into_owned().iter(),
                            &format!("{label}: output bits"),
                        );
                        assert_same_bits(
                            lse.iter(),
                            all_lse.rows(first, len).into_owned().iter(),
                            &format!("{label}: lse bits"),
                        );
                    }
                    first += len;
                }
            }
        }
    }
}

#[test]
fn chunks_are_the_rows_of_the_whole_call() {
    for path in CpuPath::supported() {
        check::<f32>(path);
        check::<f64>(path);
    }
}

#[test]
fn invalid_query_rows_are_typed_errors() {
    let q = DMatrix::<f64>::from_fn(6, 4, |i, j| ((i * 4 + j) as f64).sin());
    let invalid = |e: AttentionError| {
        assert!(
            matches!(
                e,
                AttentionError::InvalidOption {
                    option: "with_query_rows",
                    ..
                }
            ),
            "{e:?}"
        );
    };
    // Rows 3..9 of 8 do not exist; usize overflow neither.
    for (first, total) in [(3, 8), (usize::MAX, usize::MAX), (0, 5)] {
        let o = AttentionOptions::new().with_query_rows(first, total);
        invalid(scaled_dot_product_attention_with_lse(&q, &q, &q, &o).unwrap_err());
    }
    // The rows of one sequence of a packed batch are counted from its start.
    let layout = HeadLayout::new(1, 1).with_seqlens(&[2, 4], &[2, 4]);
    let o = AttentionOptions::new().with_query_rows(0, 6);
    invalid(multi_head_attention(&q, &q, &q, &layout, &o).unwrap_err());
    // One sequence is fine: rows 0..6 of 6 is the plain call.
    let one = HeadLayout::new(2, 2);
    let plain = multi_head_attention(&q, &q, &q, &one, &AttentionOptions::new()).unwrap();
    assert_eq!(multi_head_attention(&q, &q, &q, &one, &o).unwrap(), plain);
    // The cache places its own queries.
    let mut cache = KvCache::<f64>::new(1, 4, 4).unwrap();
    let seq = cache.add_sequence();
    cache.append(seq, &q, &q).unwrap();
    let o = AttentionOptions::new().with_query_rows(5, 6);
    let layout = HeadLayout::new(1, 1);
    invalid(cached_attention(q.rows(5, 1), &cache, seq, &layout, &o).unwrap_err());
}
