//! Multi-head, grouped-query and packed variable-length attention
//! (`multi_head_attention` and its `_into` / `_with_lse` forms):
//!
//! - the golden cases (`mha_cases.json`, PyTorch f64) on every CPU path: output within
//!   1e-12·max|V| and lse within 1e-12·max(1, |lse|), fully masked rows exactly 0 / −∞;
//!   the reference's multi-head oracle against the same numbers;
//! - properties on random layouts (GQA/MQA, empty sequences, every option, per-head
//!   slopes, per-sequence masks and biases): each (sequence, head) block equals the
//!   single-head call on its blocks bit for bit (which the single-head suites check against
//!   the reference), on every path, at sizes across the row-path / block-kernel threshold
//!   and the tile edges; the thread count changes no bit;
//! - every layout error, typed and naming the operand, with `_into`'s output unchanged.

mod common;

use attention_core::{
    AttentionError, AttentionOptions, Axis, Causal, CpuPath, Element, HeadLayout, MatRef, Operand,
    Parallelism, alibi_slopes, multi_head_attention, multi_head_attention_into,
    multi_head_attention_with_lse, multi_head_attention_with_lse_into,
    scaled_dot_product_attention_with_lse,
};
use attention_testdata::{CausalAlign, MhaCase, gaussian, mha_cases, seeded_rng};
use common::{narrow, pools};
use nalgebra::DMatrix;
use proptest::prelude::*;
use rand::RngExt;

const N_CASES: usize = 42;

fn causal_of(c: Option<CausalAlign>) -> Option<Causal> {
    c.map(|c| match c {
        CausalAlign::TopLeft => Causal::TopLeft,
        CausalAlign::BottomRight => Causal::BottomRight,
    })
}

/// Core's options for a golden case (f64).
fn golden_options<'a>(c: &'a MhaCase) -> AttentionOptions<'a, f64> {
    let mut o = AttentionOptions::new();
    if let Some(s) = c.scale {
        o = o.with_scale(s);
    }
    if let Some(causal) = causal_of(c.causal) {
        o = o.with_causal(causal);
    }
    if let Some((l, r)) = c.window {
        o = o.with_window(l, r);
    }
    if let Some(cap) = c.softcap {
        o = o.with_softcap(cap);
    }
    if let Some(s) = &c.alibi_slopes {
        o = o.with_alibi_slopes(s);
    }
    if let Some(m) = &c.key_mask {
        o = o.with_key_mask(m);
    }
    o
}

/// `|got − want| ≤ 1e-12·scale` entry by entry; −∞ must match exactly.
fn assert_close(got: &DMatrix<f64>, want: &DMatrix<f64>, scale: impl Fn(f64) -> f64, label: &str) {
    assert_eq!(got.shape(), want.shape(), "{label}: shape");
    for (i, (g, w)) in got.iter().zip(want.iter()).enumerate() {
        if *w == f64::NEG_INFINITY {
            assert_eq!(*g, f64::NEG_INFINITY, "{label}: entry {i} must be -inf");
            continue;
        }
        let tol = 1e-12 * scale(*w);
        assert!(
            (g - w).abs() <= tol,
            "{label}: entry {i} is {g}, golden {w} (tolerance {tol:e})"
        );
    }
}

#[test]
fn golden_cases_on_every_path() {
    let cases = mha_cases();
    assert_eq!(cases.len(), N_CASES, "mha golden file: number of cases");
    for c in &cases {
        let layout = HeadLayout::new(c.h_q, c.h_kv).with_seqlens(&c.seqlens_q, &c.seqlens_kv);
        let vmax = c.v.amax().max(f64::MIN_POSITIVE);
        for path in CpuPath::supported() {
            let label = format!("{} {path:?}", c.name);
            let options = golden_options(c).with_cpu_path(path);
            let (out, lse) = multi_head_attention_with_lse(&c.q, &c.k, &c.v, &layout, &options)
                .unwrap_or_else(|e| panic!("{label}: {e}"));
            assert_close(&out, &c.output, |_| vmax, &format!("{label} output"));
            assert_close(&lse, &c.lse, |w| w.abs().max(1.0), &format!("{label} lse"));
            // Fully masked rows (lse −∞) are exactly 0.
            for r in 0..lse.nrows() {
                for h in 0..c.h_q {
                    if lse[(r, h)] == f64::NEG_INFINITY {
                        assert!(
                            out.view((r, h * c.d_v), (1, c.d_v))
                                .iter()
                                .all(|&x| x == 0.0),
                            "{label}: masked row {r} head {h}"
                        );
                    }
                }
            }
            let mut into = DMatrix::from_element(out.nrows(), out.ncols(), f64::NAN);
            multi_head_attention_into(&c.q, &c.k, &c.v, &layout, &options, &mut into).unwrap();
            assert_eq!(into, out, "{label}: _into and _with_lse differ");
            let mut into_lse = DMatrix::from_element(lse.nrows(), lse.ncols(), f64::NAN);
            into.fill(f64::NAN);
            multi_head_attention_with_lse_into(
                &c.q,
                &c.k,
                &c.v,
                &layout,
                &options,
                &mut into,
                &mut into_lse,
            )
            .unwrap();
            assert_eq!(
                (&into, &into_lse),
                (&out, &lse),
                "{label}: _with_lse_into differs"
            );
        }
    }
}

#[test]
fn reference_oracle_matches_golden() {
    for c in &mha_cases() {
        let layout = attention_reference::Layout {
            heads_q: c.h_q,
            heads_kv: c.h_kv,
            seqlens_q: c.seqlens_q.clone(),
            seqlens_kv: c.seqlens_kv.clone(),
        };
        let options = attention_reference::HeadOptions {
            base: attention_reference::Options {
                scale: c.scale,
                causal: causal_of(c.causal).map(|c| match c {
                    Causal::TopLeft => attention_reference::Causal::TopLeft,
                    _ => attention_reference::Causal::BottomRight,
                }),
                window: c.window,
                softcap: c.softcap,
                ..Default::default()
            },
            alibi_slopes: c.alibi_slopes.clone(),
            key_mask: c.key_mask.clone(),
            ..Default::default()
        };
        let got = attention_reference::multi_head_attention(&c.q, &c.k, &c.v, &layout, &options);
        let vmax = c.v.amax().max(f64::MIN_POSITIVE);
        assert_close(&got.output, &c.output, |_| vmax, &c.name);
        assert_close(&got.lse, &c.lse, |w| w.abs().max(1.0), &c.name);
    }
}

#[test]
fn alibi_slopes_match_the_reference_and_the_golden_rule() {
    for heads in 0..=40 {
        let ours = alibi_slopes::<f64>(heads);
        let oracle = attention_reference::alibi_slopes(heads);
        assert_eq!(ours.len(), heads);
        for (a, b) in ours.iter().zip(&oracle) {
            assert!(
                (a - b).abs() <= 2.0 * f64::EPSILON * b,
                "{heads} heads: {a} vs {b}"
            );
        }
    }
    // The golden cases with slopes use 2^(−8(h+1)/h_q), the power-of-two rule.
    for c in mha_cases()
        .iter()
        .filter(|c| c.alibi_slopes.is_some() && c.h_q.is_power_of_two())
    {
        assert_eq!(
            c.alibi_slopes.as_deref().unwrap(),
            alibi_slopes::<f64>(c.h_q),
            "{}",
            c.name
        );
    }
}

/// A random multi-head problem: layout, inputs, options.
#[derive(Clone, Debug)]
struct Problem {
    h_kv: usize,
    group: usize,
    d_k: usize,
    d_v: usize,
    seqlens_q: Vec<usize>,
    seqlens_kv: Vec<usize>,
    causal: Option<Causal>,
    window: Option<(usize, usize)>,
    softcap: Option<f64>,
    slopes: bool,
    key_mask: bool,
    masks: bool,
    biases: bool,
    seed: u64,
}

fn problem(max_len: usize) -> impl Strategy<Value = Problem> {
    let lens = prop::collection::vec((0..=max_len, 0..=max_len), 1..4);
    (
        (1usize..=3, 1usize..=3, 1usize..=9, 1usize..=9),
        lens,
        (
            prop::option::of(prop::bool::ANY.prop_map(|t| {
                if t {
                    Causal::TopLeft
                } else {
                    Causal::BottomRight
                }
            })),
            prop::option::of((0usize..6, 0usize..6)),
            prop::option::of(1.0f64..20.0),
        ),
        (any::<bool>(), any::<bool>(), any::<bool>(), any::<bool>()),
        any::<u64>(),
    )
        .prop_map(
            |(
                (h_kv, group, d_k, d_v),
                lens,
                (causal, window, softcap),
                (slopes, key_mask, masks, biases),
                seed,
            )| Problem {
                h_kv,
                group,
                d_k,
                d_v,
                seqlens_q: lens.iter().map(|l| l.0).collect(),
                seqlens_kv: lens.iter().map(|l| l.1).collect(),
                causal,
                window,
                softcap,
                slopes,
                key_mask,
                masks,
                biases,
                seed,
            },
        )
}

/// The problem's data in `T`.
struct Data<T: Element> {
    q: DMatrix<T>,
    k: DMatrix<T>,
    v: DMatrix<T>,
    slopes: Vec<T>,
    key_mask: Vec<bool>,
    masks: Vec<DMatrix<bool>>,
    biases: Vec<DMatrix<T>>,
}

impl Problem {
    fn h_q(&self) -> usize {
        self.h_kv * self.group
    }

    fn data<T: Element>(&self) -> Data<T> {
        let (rows_q, rows_kv) = (self.seqlens_q.iter().sum(), self.seqlens_kv.iter().sum());
        let mut rng = seeded_rng(self.seed);
        let masks = self
            .seqlens_q
            .iter()
            .zip(&self.seqlens_kv)
            .map(|(&n_q, &n_kv)| DMatrix::from_fn(n_q, n_kv, |_, _| rng.random_bool(0.8)))
            .collect();
        let key_mask = (0..rows_kv).map(|_| rng.random_bool(0.85)).collect();
        let biases = self
            .seqlens_q
            .iter()
            .zip(&self.seqlens_kv)
            .enumerate()
            .map(|(s, (&n_q, &n_kv))| {
                narrow(&gaussian(n_q, n_kv, 2.0, self.seed ^ (s as u64 + 17)))
            })
            .collect();
        Data {
            q: narrow(&gaussian(rows_q, self.h_q() * self.d_k, 1.0, self.seed ^ 1)),
            k: narrow(&gaussian(rows_kv, self.h_kv * self.d_k, 1.0, self.seed ^ 2)),
            v: narrow(&gaussian(rows_kv, self.h_kv * self.d_v, 1.0, self.seed ^ 3)),
            slopes: alibi_slopes(self.h_q()),
            key_mask,
            masks,
            biases,
        }
    }

    /// The options every head shares, for a multi-head call.
    fn shared<'a, T: Element>(&self) -> AttentionOptions<'a, T> {
        let mut o = AttentionOptions::new();
        if let Some(c) = self.causal {
            o = o.with_causal(c);
        }
        if let Some((l, r)) = self.window {
            o = o.with_window(l, r);
        }
        if let Some(cap) = self.softcap {
            o = o.with_softcap(T::from_f64_rounded(cap));
        }
        o
    }
}

/// Checks every (sequence, head) block of the multi-head result against the single-head
/// call on its blocks, bit for bit, on every path; and that threads change no bit.
fn check_blocks<T: Element>(p: &Problem) -> Result<(), TestCaseError> {
    let data = p.data::<T>();
    let (h_q, g) = (p.h_q(), p.group);
    let masks: Vec<MatRef<'_, bool>> = data.masks.iter().map(Into::into).collect();
    let biases: Vec<MatRef<'_, T>> = data.biases.iter().map(Into::into).collect();
    let mut options = p.shared::<T>();
    if p.slopes {
        options = options.with_alibi_slopes(&data.slopes);
    }
    if p.key_mask {
        options = options.with_key_mask(&data.key_mask);
    }
    if p.masks {
        options = options.with_sequence_masks(&masks);
    }
    if p.biases {
        options = options.with_sequence_biases(&biases);
    }
    let layout = HeadLayout::new(h_q, p.h_kv).with_seqlens(&p.seqlens_q, &p.seqlens_kv);
    for path in CpuPath::supported() {
        let opts = options.clone().with_cpu_path(path);
        let (out, lse) = multi_head_attention_with_lse(&data.q, &data.k, &data.v, &layout, &opts)
            .map_err(|e| TestCaseError::fail(format!("{path:?}: {e}")))?;
        let (mut r0, mut k0) = (0, 0);
        for (s, (&n_q, &n_kv)) in p.seqlens_q.iter().zip(&p.seqlens_kv).enumerate() {
            for h in 0..h_q {
                let j = h / g;
                let mut single = p.shared::<T>().with_cpu_path(path);
                if p.slopes {
                    single = single.with_alibi_slope(data.slopes[h]);
                }
                if p.key_mask {
                    single = single.with_key_mask(&data.key_mask[k0..k0 + n_kv]);
                }
                if p.masks {
                    single = single.with_mask(&data.masks[s]);
                }
                if p.biases {
                    single = single.with_bias(&data.biases[s]);
                }
                let (o, l) = scaled_dot_product_attention_with_lse(
                    data.q.view((r0, h * p.d_k), (n_q, p.d_k)),
                    data.k.view((k0, j * p.d_k), (n_kv, p.d_k)),
                    data.v.view((k0, j * p.d_v), (n_kv, p.d_v)),
                    &single,
                )
                .map_err(|e| TestCaseError::fail(format!("{path:?} s{s} h{h}: {e}")))?;
                let block = out.view((r0, h * p.d_v), (n_q, p.d_v));
                for (a, b) in block.iter().zip(o.iter()) {
                    prop_assert_eq!(
                        a.to_f64().to_bits(),
                        b.to_f64().to_bits(),
                        "{:?} s{} h{}: output",
                        path,
                        s,
                        h
                    );
                }
                for (i, b) in l.iter().enumerate() {
                    prop_assert_eq!(
                        lse[(r0 + i, h)].to_f64().to_bits(),
                        b.to_f64().to_bits(),
                        "{:?} s{} h{}: lse",
                        path,
                        s,
                        h
                    );
                }
            }
            r0 += n_q;
            k0 += n_kv;
        }
        for (threads, pool) in pools() {
            for par in [Parallelism::Sequential, Parallelism::Rayon] {
                let o2 = pool
                    .install(|| {
                        multi_head_attention(
                            &data.q,
                            &data.k,
                            &data.v,
                            &layout,
                            &opts.clone().with_parallelism(par),
                        )
                    })
                    .map_err(|e| TestCaseError::fail(format!("{e}")))?;
                prop_assert!(
                    o2.iter()
                        .zip(out.iter())
                        .all(|(a, b)| a.to_f64().to_bits() == b.to_f64().to_bits()),
                    "{:?}: {} threads ({:?}) change the output",
                    path,
                    threads,
                    par
                );
            }
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    /// Short sequences: the row path and the trivial routes.
    #[test]
    fn blocks_equal_single_head_calls_short(p in problem(12)) {
        check_blocks::<f32>(&p)?;
        check_blocks::<f64>(&p)?;
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(10))]

    /// Sequences up to 140 rows: the block kernel, across its query-block (32/64) and key
    /// tile (60/64) edges.
    #[test]
    fn blocks_equal_single_head_calls_long(p in problem(140)) {
        check_blocks::<f32>(&p)?;
        check_blocks::<f64>(&p)?;
    }
}

/// Many sequences and heads, large enough that the kernel runs threads inside a block as
/// well as across blocks: the result is the same for 1, 2 and 7 threads.
#[test]
fn threads_change_no_bit_on_a_large_batch() {
    let p = Problem {
        h_kv: 2,
        group: 2,
        d_k: 64,
        d_v: 64,
        seqlens_q: vec![300, 7, 0, 129, 600],
        seqlens_kv: vec![300, 9, 4, 200, 600],
        causal: Some(Causal::BottomRight),
        window: None,
        softcap: None,
        slopes: true,
        key_mask: true,
        masks: false,
        biases: false,
        seed: 7,
    };
    check_blocks::<f32>(&p).unwrap();
}

#[test]
fn layout_errors_are_typed_and_leave_the_output_alone() {
    let q = DMatrix::<f64>::from_fn(6, 8, |i, j| (i as f64 - j as f64) * 0.1);
    let kv = DMatrix::<f64>::from_fn(6, 4, |i, j| (i * j) as f64 * 0.1);
    let none = AttentionOptions::new();
    let err = |layout: HeadLayout<'_>,
               options: &AttentionOptions<'_, f64>,
               k: &DMatrix<f64>,
               v: &DMatrix<f64>| {
        let mut out = DMatrix::from_element(6, 8, f64::NAN);
        let e = multi_head_attention_into(&q, k, v, &layout, options, &mut out).unwrap_err();
        assert!(
            out.iter().all(|x| x.is_nan()),
            "{e}: the output was written"
        );
        let again = multi_head_attention(&q, k, v, &layout, options).unwrap_err();
        assert_eq!(again.to_string(), e.to_string());
        e
    };
    let hl = HeadLayout::new;
    assert_eq!(
        err(hl(4, 3), &none, &kv, &kv),
        AttentionError::InvalidHeads {
            heads_q: 4,
            heads_kv: 3
        }
    );
    assert_eq!(
        err(hl(0, 1), &none, &kv, &kv),
        AttentionError::InvalidHeads {
            heads_q: 0,
            heads_kv: 1
        }
    );
    assert_eq!(
        err(hl(3, 1), &none, &kv, &kv),
        AttentionError::HeadSplit {
            operand: Operand::Query,
            columns: 8,
            heads: 3,
            head_width: None
        }
    );
    assert_eq!(
        err(hl(4, 1), &none, &kv, &kv),
        AttentionError::HeadSplit {
            operand: Operand::Key,
            columns: 4,
            heads: 1,
            head_width: Some(2)
        }
    );
    let v3 = DMatrix::<f64>::zeros(6, 3);
    assert_eq!(
        err(hl(4, 2), &none, &kv, &v3),
        AttentionError::HeadSplit {
            operand: Operand::Value,
            columns: 3,
            heads: 2,
            head_width: None
        }
    );
    let e = err(hl(4, 2).with_seqlens(&[2, 4], &[6]), &none, &kv, &kv);
    assert!(
        matches!(
            e,
            AttentionError::DimensionMismatch {
                operand: Operand::KeyLengths,
                found: 1,
                expected: 2,
                ..
            }
        ),
        "{e}"
    );
    assert_eq!(
        err(hl(4, 2).with_seqlens(&[2, 3], &[3, 3]), &none, &kv, &kv),
        AttentionError::SequenceLengths {
            operand: Operand::Query,
            sum: 5,
            rows: 6
        }
    );
    assert_eq!(
        err(hl(4, 2).with_seqlens(&[3, 3], &[3, 2]), &none, &kv, &kv),
        AttentionError::SequenceLengths {
            operand: Operand::Key,
            sum: 5,
            rows: 6
        }
    );
    assert_eq!(
        err(
            hl(4, 2).with_seqlens(&[3, 3], &[usize::MAX, 7]),
            &none,
            &kv,
            &kv
        ),
        AttentionError::SequenceLengths {
            operand: Operand::Key,
            sum: usize::MAX,
            rows: 6
        }
    );
    let slopes = [0.5, 0.25, 0.125];
    let e = err(hl(4, 2), &none.clone().with_alibi_slopes(&slopes), &kv, &kv);
    assert!(
        matches!(
            e,
            AttentionError::DimensionMismatch {
                operand: Operand::AlibiSlopes,
                found: 3,
                expected: 4,
                ..
            }
        ),
        "{e}"
    );
    let slopes4 = [0.5, 0.25, 0.125, f64::NAN];
    assert!(matches!(
        err(
            hl(4, 2),
            &none.clone().with_alibi_slopes(&slopes4),
            &kv,
            &kv
        ),
        AttentionError::InvalidAlibiSlope { .. }
    ));
    let e = err(
        hl(4, 2),
        &none
            .clone()
            .with_alibi_slopes(&[0.5, 0.25, 0.125, 0.0625])
            .with_alibi_slope(0.5),
        &kv,
        &kv,
    );
    assert!(
        matches!(
            e,
            AttentionError::InvalidOption {
                option: "with_alibi_slopes",
                ..
            }
        ),
        "{e}"
    );
    let mask = DMatrix::from_element(3, 3, true);
    let e = err(
        hl(4, 2).with_seqlens(&[3, 3], &[3, 3]),
        &none.clone().with_mask(&mask),
        &kv,
        &kv,
    );
    assert!(
        matches!(
            e,
            AttentionError::InvalidOption {
                option: "with_mask",
                ..
            }
        ),
        "{e}"
    );
    let masks: [MatRef<'_, bool>; 1] = [(&mask).into()];
    let e = err(
        hl(4, 2).with_seqlens(&[3, 3], &[3, 3]),
        &none.clone().with_sequence_masks(&masks),
        &kv,
        &kv,
    );
    assert!(
        matches!(
            e,
            AttentionError::DimensionMismatch {
                operand: Operand::SequenceMask(0),
                found: 1,
                expected: 2,
                ..
            }
        ),
        "{e}"
    );
    let wrong = DMatrix::from_element(3, 2, true);
    let masks2: [MatRef<'_, bool>; 2] = [(&mask).into(), (&wrong).into()];
    let e = err(
        hl(4, 2).with_seqlens(&[3, 3], &[3, 3]),
        &none.clone().with_sequence_masks(&masks2),
        &kv,
        &kv,
    );
    assert!(
        matches!(
            e,
            AttentionError::DimensionMismatch {
                operand: Operand::SequenceMask(1),
                axis: Axis::Columns,
                found: 2,
                expected: 3,
                ..
            }
        ),
        "{e}"
    );
    let mut bad_bias = DMatrix::<f64>::zeros(3, 3);
    bad_bias[(1, 2)] = f64::INFINITY;
    let biases: [MatRef<'_, f64>; 2] = [(&bad_bias).into(), (&bad_bias).into()];
    let e = err(
        hl(4, 2).with_seqlens(&[3, 3], &[3, 3]),
        &none.clone().with_sequence_biases(&biases),
        &kv,
        &kv,
    );
    assert!(
        matches!(
            e,
            AttentionError::NonFinite {
                operand: Operand::SequenceBias(0),
                row: 1,
                column: 2,
                ..
            }
        ),
        "{e}"
    );
    let key_mask = [true; 5];
    let e = err(hl(4, 2), &none.clone().with_key_mask(&key_mask), &kv, &kv);
    assert!(
        matches!(
            e,
            AttentionError::DimensionMismatch {
                operand: Operand::KeyMask,
                found: 5,
                expected: 6,
                ..
            }
        ),
        "{e}"
    );
    // NaN in K: reported at its position in the packed matrix.
    let mut k_nan = kv.clone();
    k_nan[(4, 3)] = f64::NAN;
    let e = err(hl(4, 2).with_seqlens(&[3, 3], &[3, 3]), &none, &k_nan, &kv);
    assert!(
        matches!(
            e,
            AttentionError::NonFinite {
                operand: Operand::Key,
                row: 4,
                column: 3,
                ..
            }
        ),
        "{e}"
    );
    // The lse's shape, and nothing written on an error of the inputs.
    let mut out = DMatrix::from_element(6, 8, 7.0);
    for (shape, axis, found, expected) in
        [((5, 4), Axis::Rows, 5, 6), ((6, 2), Axis::Columns, 2, 4)]
    {
        let mut lse = DMatrix::from_element(shape.0, shape.1, 7.0);
        let e =
            multi_head_attention_with_lse_into(&q, &kv, &kv, &hl(4, 2), &none, &mut out, &mut lse)
                .unwrap_err();
        assert!(
            matches!(e, AttentionError::DimensionMismatch { operand: Operand::Lse, axis: a, found: f, expected: x, .. }
                if a == axis && f == found && x == expected),
            "{e}"
        );
    }
    let mut bad = kv.clone();
    bad[(3, 1)] = f64::NAN;
    let mut lse = DMatrix::from_element(6, 4, 7.0);
    let e = multi_head_attention_with_lse_into(&q, &bad, &kv, &hl(4, 2), &none, &mut out, &mut lse)
        .unwrap_err();
    assert!(
        matches!(
            e,
            AttentionError::NonFinite {
                operand: Operand::Key,
                ..
            }
        ),
        "{e}"
    );
    assert!(
        out.iter().chain(lse.iter()).all(|&x| x == 7.0),
        "written on an error"
    );
    // The output's shape.
    let mut small = DMatrix::<f64>::zeros(6, 7);
    let e = multi_head_attention_into(&q, &kv, &kv, &hl(4, 2), &none, &mut small).unwrap_err();
    assert!(
        matches!(
            e,
            AttentionError::DimensionMismatch {
                operand: Operand::Output,
                axis: Axis::Columns,
                found: 7,
                expected: 8,
                ..
            }
        ),
        "{e}"
    );
}

/// A score out of range in one head of one sequence: the error names the head and packed
/// rows; the output is untouched even though other heads could be computed.
#[test]
fn score_overflow_names_head_and_packed_rows() {
    let mut q = DMatrix::<f32>::from_fn(5, 4, |i, j| (i + j) as f32 * 0.1);
    let k = DMatrix::<f32>::from_fn(5, 2, |i, j| (i * j) as f32 * 0.1 + 0.5);
    // Sequence 1 (rows 2..5), head 1 (columns 2..4): a huge query.
    q[(3, 2)] = 3e38;
    q[(3, 3)] = 3e38;
    let layout = HeadLayout::new(2, 1).with_seqlens(&[2, 3], &[2, 3]);
    for path in CpuPath::supported() {
        let options = AttentionOptions::new().with_scale(1e30).with_cpu_path(path);
        let mut out = DMatrix::from_element(5, 4, f32::NAN);
        let e = multi_head_attention_into(&q, &k, &k, &layout, &options, &mut out).unwrap_err();
        assert_eq!(
            e,
            AttentionError::HeadScoreOverflow {
                head: 1,
                query: 3,
                key: 2
            },
            "{path:?}"
        );
        assert!(out.iter().all(|x| x.is_nan()), "{path:?}: output written");
        // The single-head call on that block reports the same pair, in block coordinates.
        let single = scaled_dot_product_attention_with_lse(
            q.view((2, 2), (3, 2)),
            k.view((2, 0), (3, 2)),
            k.view((2, 0), (3, 2)),
            &options,
        );
        assert_eq!(
            single.unwrap_err(),
            AttentionError::ScoreOverflow { query: 1, key: 0 }
        );
    }
}

/// Multi-query attention with more query rows per key/value head than the decoding
/// kernel holds at once (72 heads × 8 queries): split into sub-groups, each head still
/// equal to its single-head call bit for bit.
#[test]
fn many_query_heads_per_kv_head() {
    let p = Problem {
        h_kv: 1,
        group: 72,
        d_k: 8,
        d_v: 5,
        seqlens_q: vec![8, 1],
        seqlens_kv: vec![300, 70],
        causal: Some(Causal::BottomRight),
        window: None,
        softcap: Some(7.0),
        slopes: true,
        key_mask: true,
        masks: false,
        biases: false,
        seed: 11,
    };
    check_blocks::<f32>(&p).unwrap();
}

/// Q, K and V of 2^18 entries or more are scanned block by block over the threads
/// (`spec::block_max_abs`): the error is still the first NaN/∞ of the whole packed matrix
/// in column-major order, whichever blocks hold one and whatever the threads, and the
/// result without one equals the sequential call's bit for bit.
#[test]
fn large_batches_scanned_in_parallel_report_the_first_non_finite_entry() {
    let (n, heads, d) = (1024, 8, 32); // 1024 × 256 = 2^18 entries per matrix
    let layout = HeadLayout::new(heads, heads).with_seqlens(&[600, 424], &[600, 424]);
    let q = gaussian(n, heads * d, 1.0, 1);
    let k = gaussian(n, heads * d, 1.0, 2);
    let v = gaussian(n, heads * d, 1.0, 3);
    let rayon = AttentionOptions::new().with_parallelism(Parallelism::Rayon);
    let sequential = AttentionOptions::new().with_parallelism(Parallelism::Sequential);
    let want = multi_head_attention(&q, &k, &v, &layout, &sequential).unwrap();
    let got = multi_head_attention(&q, &k, &v, &layout, &rayon).unwrap();
    assert!(got == want, "threads changed bits");
    // (row, column) entries set to NaN/∞; the first in column-major order is reported
    // (a later head's block, or the second sequence's rows, may hold the other one).
    let cases: &[&[(usize, usize)]] = &[
        &[(900, 3), (5, 200)],
        &[(5, 200), (1000, 199)],
        &[(700, 255)],
        &[(0, 0), (1023, 255)],
    ];
    for (which, operand) in [(0, Operand::Query), (1, Operand::Key), (2, Operand::Value)] {
        for &entries in cases {
            for bad in [f64::NAN, f64::INFINITY] {
                let mut m = [q.clone(), k.clone(), v.clone()];
                for &e in entries {
                    m[which][e] = bad;
                }
                let first = entries.iter().min_by_key(|(r, c)| (c, r)).copied().unwrap();
                for options in [&rayon, &sequential] {
                    let e =
                        multi_head_attention(&m[0], &m[1], &m[2], &layout, options).unwrap_err();
                    match e {
                        AttentionError::NonFinite {
                            operand: op,
                            row,
                            column,
                            ..
                        } => assert_eq!((op, row, column), (operand, first.0, first.1)),
                        e => panic!("{operand:?} {entries:?}: {e}"),
                    }
                }
            }
        }
    }
}
