//! A single-head call of a few queries (the decoding kernel's route) checks K and V for
//! NaN/∞, and finds their largest magnitudes, while the kernel reads them, instead of in a
//! scan before it (`Spec::deferred`, `kernel::attention_deferred`). The claim is that the
//! outcome is exactly that of scanning first; these tests compare the two on every CPU
//! path:
//!
//! - results: the single-head call against the same call through `multi_head_attention`
//!   with one head (which scans first and runs the same kernel on the same views): equal
//!   bit for bit, output and lse, across part (2048) and chunk (64) edges, with every
//!   option, V by columns and by rows;
//! - errors: NaN/±∞ anywhere in K or V — including keys that no query may see (causal,
//!   window, key mask), so that their weight is never used — gives the error of the first
//!   such entry in column-major order, K before V, and leaves `_into`'s output untouched;
//! - magnitudes that move the call off the decoding kernel (scores that may overflow: the
//!   careful path; values near the type's maximum: the row path) give that route's result.

mod common;

use attention_core::{
    AttentionError, AttentionOptions, Causal, CpuPath, Element, HeadLayout, KernelRun, Operand,
    last_kernel_run, multi_head_attention_with_lse, scaled_dot_product_attention_into,
    scaled_dot_product_attention_with_lse,
};
use attention_testdata::gaussian;
use common::{assert_same_bits, bits, nan_matrix, option_cases, option_inputs};
use nalgebra::{DMatrix, DMatrixView, Dyn};

/// Row-major storage of `m` and a view of it (V "by rows").
fn row_major<T: Element>(m: &DMatrix<T>) -> Vec<T> {
    m.transpose().as_slice().to_vec()
}

fn equal_to_scan_first<T: Element>() {
    let one = HeadLayout::new(1, 1);
    for &(n_q, n_kv, d_k, d_v) in &[
        (1, 65, 16, 8),
        (3, 130, 17, 5),
        (8, 2047, 32, 33),
        (1, 2048, 64, 64),
        (2, 2049, 24, 64),
        (1, 4100, 128, 128),
    ] {
        let q = gaussian(n_q, d_k, 1.0, 1).map(T::from_f64_rounded);
        let k = gaussian(n_kv, d_k, 1.0, 2).map(T::from_f64_rounded);
        let v = gaussian(n_kv, d_v, 1.0, 3).map(T::from_f64_rounded);
        let v_rows = row_major(&v);
        let v_by_rows = DMatrixView::from_slice_with_strides_generic(
            &v_rows,
            Dyn(n_kv),
            Dyn(d_v),
            Dyn(d_v),
            Dyn(1),
        );
        let x = option_inputs::<T>(n_q, n_kv);
        for (name, options) in option_cases(&x) {
            for path in CpuPath::supported() {
                let o = options.clone().with_cpu_path(path);
                for (layout, v) in [("V by columns", v.as_view()), ("V by rows", v_by_rows)] {
                    let label = format!("{n_q}x{n_kv} d {d_k}/{d_v} {name} {path:?} {layout}");
                    let (out, lse) = scaled_dot_product_attention_with_lse(&q, &k, v, &o).unwrap();
                    assert_eq!(last_kernel_run(), Some(KernelRun::Decode(path)), "{label}");
                    let (want, want_lse) =
                        multi_head_attention_with_lse(&q, &k, v, &one, &o).unwrap();
                    assert_same_bits(out.iter(), want.iter(), &label);
                    assert_same_bits(lse.iter(), want_lse.iter(), &format!("{label}: lse"));
                }
            }
        }
    }
}

#[test]
fn results_equal_those_of_scanning_first() {
    equal_to_scan_first::<f32>();
    equal_to_scan_first::<f64>();
}

fn non_finite_found<T: Element>() {
    let (n_q, n_kv, d) = (2, 2100, 24);
    let q = gaussian(n_q, d, 1.0, 4).map(T::from_f64_rounded);
    let k0 = gaussian(n_kv, d, 1.0, 5).map(T::from_f64_rounded);
    let v0 = gaussian(n_kv, d, 1.0, 6).map(T::from_f64_rounded);
    let key_mask: Vec<bool> = (0..n_kv).map(|j| j != 2050 && j != 7).collect();
    let bad = [
        T::from_f64_rounded(f64::NAN),
        T::from_f64_rounded(f64::INFINITY),
        T::NEG_INFINITY,
    ];
    // (operand, entries set to a bad value: the first in column-major order is reported)
    let cases: &[(Operand, &[(usize, usize)])] = &[
        (Operand::Key, &[(0, 0)]),
        (Operand::Key, &[(2099, 23)]),
        (Operand::Key, &[(2050, 3), (7, 4)]), // hidden by the key mask; (2050, 3) first
        (Operand::Value, &[(1000, 0), (5, 1)]),
        (Operand::Value, &[(2050, 23)]),
        (Operand::Value, &[(63, 5), (64, 5), (2047, 5), (2048, 5)]),
        // Alone in the first chunk of a part, and in a middle one: each chunk is scanned.
        (Operand::Key, &[(5, 2)]),
        (Operand::Value, &[(5, 2)]),
        (Operand::Value, &[(700, 9)]),
    ];
    let options = [
        AttentionOptions::new(),
        AttentionOptions::new().with_key_mask(&key_mask),
        // Top-left causal: the two queries see keys 0 and 0..=1 only.
        AttentionOptions::new().with_causal(Causal::TopLeft),
        AttentionOptions::new().with_window(3, 0),
    ];
    for &(operand, entries) in cases {
        for &x in &bad {
            let (mut k, mut v) = (k0.clone(), v0.clone());
            let m = if operand == Operand::Key {
                &mut k
            } else {
                &mut v
            };
            for &e in entries {
                m[e] = x;
            }
            let first = entries.iter().min_by_key(|(r, c)| (c, r)).copied().unwrap();
            let v_rows = row_major(&v);
            let v_by_rows = DMatrixView::from_slice_with_strides_generic(
                &v_rows,
                Dyn(n_kv),
                Dyn(d),
                Dyn(d),
                Dyn(1),
            );
            for (o, (layout, v)) in options.iter().flat_map(|o| {
                [
                    (o, ("by columns", v.as_view())),
                    (o, ("by rows", v_by_rows)),
                ]
            }) {
                for path in CpuPath::supported() {
                    let o = o.clone().with_cpu_path(path);
                    let mut out = nan_matrix::<T>(n_q, d);
                    let before = bits(out.iter().copied());
                    let err =
                        scaled_dot_product_attention_into(&q, &k, v, &o, &mut out).unwrap_err();
                    let label = format!(
                        "{operand:?} {entries:?} {:?} {path:?} V {layout}",
                        x.to_f64()
                    );
                    match err {
                        AttentionError::NonFinite {
                            operand: op,
                            row,
                            column,
                            value,
                        } => {
                            assert_eq!((op, row, column), (operand, first.0, first.1), "{label}");
                            assert_eq!(value.to_bits(), x.to_f64().to_bits(), "{label}");
                        }
                        e => panic!("{label}: {e}"),
                    }
                    assert_eq!(bits(out.iter().copied()), before, "{label}: output written");
                }
            }
        }
    }
    // K and V both bad: K is reported.
    let (mut k, mut v) = (k0.clone(), v0.clone());
    v[(0, 0)] = bad[0];
    k[(2000, 20)] = bad[1];
    let err = scaled_dot_product_attention_into(
        &q,
        &k,
        &v,
        &AttentionOptions::new(),
        &mut nan_matrix::<T>(n_q, d),
    )
    .unwrap_err();
    assert!(
        matches!(
            err,
            AttentionError::NonFinite {
                operand: Operand::Key,
                row: 2000,
                column: 20,
                ..
            }
        ),
        "{err}"
    );
}

#[test]
fn non_finite_keys_and_values_are_found_wherever_they_are() {
    non_finite_found::<f32>();
    non_finite_found::<f64>();
}

/// Magnitudes that send the call elsewhere: that route's result, as when scanning first.
#[test]
fn large_magnitudes_take_the_route_of_scanning_first() {
    let (n_q, n_kv, d) = (1, 300, 8);
    let one = HeadLayout::new(1, 1);
    let q = gaussian(n_q, d, 1.0, 8).map(|x| x as f32);
    let k = gaussian(n_kv, d, 1.0, 9).map(|x| x as f32);
    let v = gaussian(n_kv, d, 1.0, 10).map(|x| x as f32);
    // Keys whose scores may overflow (the careful path); values near f32::MAX (the kernels
    // that scale them: the row path, or the block kernel when a path is forced).
    let mut k_big = k.clone();
    k_big[(17, 2)] = 3e37;
    let mut v_big = v.clone();
    v_big[(250, 7)] = 3e38;
    // The same in the first chunk (64 keys) of the keys and values.
    let mut k_big0 = k.clone();
    k_big0[(3, 2)] = 3e37;
    let mut v_big0 = v.clone();
    v_big0[(3, 7)] = 3e38;
    for (name, k, v) in [
        ("keys", &k_big, &v),
        ("values", &k, &v_big),
        ("keys, first chunk", &k_big0, &v),
        ("values, first chunk", &k, &v_big0),
    ] {
        let route = |path| match name {
            "keys" | "keys, first chunk" => KernelRun::Careful,
            _ => KernelRun::Block(path),
        };
        for path in CpuPath::supported() {
            let o = AttentionOptions::new().with_cpu_path(path);
            let got = scaled_dot_product_attention_with_lse(&q, k, v, &o);
            let run = last_kernel_run();
            let want = multi_head_attention_with_lse(&q, k, v, &one, &o);
            match (got, want) {
                (Ok((out, lse)), Ok((w, wl))) => {
                    assert_eq!(run, Some(route(path)), "{name} {path:?}");
                    assert_same_bits(out.iter(), w.iter(), name);
                    assert_same_bits(lse.iter(), wl.iter(), name);
                }
                (got, want) => assert_eq!(
                    got.map(|_| ()).map_err(|e| e.to_string()),
                    want.map(|_| ()).map_err(|e| e.to_string()),
                    "{name} {path:?}"
                ),
            }
        }
    }
}
