//! `scaled_dot_product_attention_into` writing one head's column block of a wider output
//! (a mutable view by value), on every CPU path and through every route of the kernel
//! (row path, block kernel, careful path): the block must equal the separate call's result
//! bit for bit, and every element outside it must stay as it was (NaN). A row-major
//! output view (row stride ≠ 1) must get the same numbers. On error the output keeps its
//! old contents.

mod common;

use attention_core::{
    AttentionError, AttentionOptions, CpuPath, Element, KernelRun, last_kernel_run,
    scaled_dot_product_attention, scaled_dot_product_attention_into,
};
use common::*;
use nalgebra::{DMatrix, DMatrixViewMut};

const HEADS: usize = 3;

/// Q, K, V of `HEADS` heads side by side; head `h` takes columns `h·d ..`.
fn heads<T: Element>(n_q: usize, n_kv: usize, d: usize, scale: f64, seed: u64) -> [DMatrix<T>; 3] {
    [
        narrow(&gaussian(n_q, HEADS * d, scale, seed)),
        narrow(&gaussian(n_kv, HEADS * d, scale, seed + 1)),
        narrow(&gaussian(n_kv, HEADS * d, 1.0, seed + 2)),
    ]
}

fn check<T: Element>(
    n_q: usize,
    n_kv: usize,
    d: usize,
    scale: f64,
    opts: &AttentionOptions<'_, T>,
) {
    let [q, k, v] = heads::<T>(n_q, n_kv, d, scale, (n_q * 1000 + n_kv) as u64);
    for h in 0..HEADS {
        let cols = |m: &DMatrix<T>| m.columns(h * d, d).into_owned();
        let want = scaled_dot_product_attention(&cols(&q), &cols(&k), &cols(&v), opts).unwrap();

        // A column block of a wider, NaN-filled output, passed as a view by value.
        let mut out = nan_matrix::<T>(n_q, HEADS * d);
        let (qh, kh, vh) = (
            q.columns(h * d, d),
            k.columns(h * d, d),
            v.columns(h * d, d),
        );
        scaled_dot_product_attention_into(qh, kh, vh, opts, out.columns_mut(h * d, d)).unwrap();
        let ctx = format!("{n_q}×{n_kv}, d {d}, head {h}, {:?}", opts.cpu_path());
        assert_eq!(out.columns(h * d, d), want, "{ctx}");
        for (c, col) in out.column_iter().enumerate() {
            if !(h * d..(h + 1) * d).contains(&c) {
                assert!(
                    col.iter().all(|x| x.to_f64().is_nan()),
                    "{ctx}: column {c} was written"
                );
            }
        }

        // A row-major output (row stride HEADS·d, column stride 1).
        let mut buf = vec![T::from_f64_rounded(f64::NAN); n_q * HEADS * d];
        let view =
            DMatrixViewMut::from_slice_with_strides_mut(&mut buf[h * d..], n_q, d, HEADS * d, 1);
        scaled_dot_product_attention_into(q.columns(h * d, d), kh, vh, opts, view).unwrap();
        for i in 0..n_q {
            for c in 0..HEADS * d {
                let x = buf[i * HEADS * d + c];
                if (h * d..(h + 1) * d).contains(&c) {
                    assert_eq!(x, want[(i, c - h * d)], "{ctx}: row-major ({i}, {c})");
                } else {
                    assert!(
                        x.to_f64().is_nan(),
                        "{ctx}: row-major ({i}, {c}) was written"
                    );
                }
            }
        }
    }
}

fn every_route<T: Element>() {
    for path in CpuPath::supported() {
        for (forced, opts) in [
            (false, AttentionOptions::<T>::new()),
            (true, AttentionOptions::new().with_cpu_path(path)),
        ] {
            if !forced && path != CpuPath::detect() {
                continue;
            }
            // Row path (tiny, few queries), block kernel (block edges), careful path
            // (scores near the type's range).
            for (n_q, n_kv, d) in [(2, 2, 2), (5, 300, 8), (70, 130, 16), (33, 64, 5)] {
                check::<T>(n_q, n_kv, d, 1.0, &opts);
            }
            let huge = T::MAX.to_f64().sqrt() * 0.3;
            check::<T>(20, 40, 4, huge, &opts);
            assert_eq!(last_kernel_run(), Some(KernelRun::Careful));
        }
    }
}

#[test]
fn head_blocks_of_a_wider_output_f32() {
    every_route::<f32>();
}

#[test]
fn head_blocks_of_a_wider_output_f64() {
    every_route::<f64>();
}

/// A call that fails (score overflow found by the kernel, or a NaN input) leaves the
/// output view and the rest of the matrix as they were.
#[test]
fn errors_leave_the_output_untouched() {
    let (q, k, v) = overflow_reproducer(128);
    let before = DMatrix::<f32>::from_fn(512, 192, |i, j| (i * 192 + j) as f32);
    for path in CpuPath::supported() {
        let opts = AttentionOptions::new().with_cpu_path(path);
        let mut out = before.clone();
        let err = scaled_dot_product_attention_into(
            &q,
            &k,
            v.columns(64, 64),
            &opts,
            out.columns_mut(64, 64),
        );
        assert_eq!(
            err,
            Err(AttentionError::ScoreOverflow { query: 0, key: 600 }),
            "{path:?}"
        );
        assert_eq!(out, before, "{path:?}");
        let mut q_nan = q.clone();
        q_nan[(3, 3)] = f32::NAN;
        let err = scaled_dot_product_attention_into(
            &q_nan,
            &k,
            v.columns(0, 64),
            &opts,
            out.columns_mut(0, 64),
        );
        assert!(
            matches!(err, Err(AttentionError::NonFinite { .. })),
            "{path:?}"
        );
        assert_eq!(out, before, "{path:?}");
    }
}
