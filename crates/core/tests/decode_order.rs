//! The decoding kernel reads a part's keys and values in one of two orders (`decode.rs`,
//! `part`): as streams (each column of K and V from start to end: a group of at most 4
//! rows whose K and V are stored by columns, in place) or chunk by chunk (more rows, or K
//! and V that must be copied first). The claim is that both compute the same sums in the
//! same order, so that the bits do not depend on which one ran. These tests compare them
//! on every CPU path, across part (2048), chunk (64), lane (16) and column-block (4) edges,
//! with every option:
//!
//! - the same call with K and V stored by columns (streams) and as row-strided views of
//!   the same numbers (copied chunk by chunk): equal bit for bit, output and lse;
//! - a grouped-query call with 8 query heads on one key/value head (8 rows or more: chunk
//!   by chunk, in place) against one single-head call per query head (streams): equal bit
//!   for bit, head by head.

mod common;

use attention_core::{
    CpuPath, Element, HeadLayout, KernelRun, last_kernel_run, multi_head_attention_with_lse,
    scaled_dot_product_attention_with_lse,
};
use attention_testdata::gaussian;
use common::{assert_same_bits, option_cases, option_inputs};
use nalgebra::{DMatrix, DMatrixView, Dyn};

/// Sizes `(n_q, n_kv, d_k, d_v)`: one part and several, keys ending inside a chunk and
/// inside a lane, head widths that are not a multiple of the 4 columns read together.
const SIZES: &[(usize, usize, usize, usize)] = &[
    (1, 1, 4, 3),
    (1, 63, 5, 8),
    (2, 64, 16, 16),
    (1, 129, 7, 9),
    (3, 1000, 32, 33),
    (4, 2047, 64, 64),
    (1, 2048, 13, 16),
    (2, 2049, 24, 17),
    (1, 4100, 128, 128),
];

/// `m`'s numbers every other element of a buffer (the rest NaN, which must never be
/// read), and a view of them with row stride 2: no contiguous column, so the kernel
/// copies every chunk before reading it.
fn strided<T: Element>(m: &DMatrix<T>) -> Vec<T> {
    let mut data = vec![T::from_f64_rounded(f64::NAN); 2 * m.len()];
    for (i, &x) in m.iter().enumerate() {
        data[2 * i] = x;
    }
    data
}

fn view<T: Element>(data: &[T], rows: usize, cols: usize) -> DMatrixView<'_, T, Dyn, Dyn> {
    DMatrixView::from_slice_with_strides_generic(data, Dyn(rows), Dyn(cols), Dyn(2), Dyn(2 * rows))
}

fn streams_equal_chunks<T: Element>() {
    for &(n_q, n_kv, d_k, d_v) in SIZES {
        let q = gaussian(n_q, d_k, 1.0, 1).map(T::from_f64_rounded);
        let k = gaussian(n_kv, d_k, 1.0, 2).map(T::from_f64_rounded);
        let v = gaussian(n_kv, d_v, 1.0, 3).map(T::from_f64_rounded);
        let (ks, vs) = (strided(&k), strided(&v));
        let x = option_inputs::<T>(n_q, n_kv);
        for (name, options) in option_cases(&x) {
            for path in CpuPath::supported() {
                let o = options.clone().with_cpu_path(path);
                let label = format!("{n_q}x{n_kv} d {d_k}/{d_v} {name} {path:?}");
                let (out, lse) = scaled_dot_product_attention_with_lse(&q, &k, &v, &o).unwrap();
                assert_eq!(last_kernel_run(), Some(KernelRun::Decode(path)), "{label}");
                let (k, v) = (view(&ks, n_kv, d_k), view(&vs, n_kv, d_v));
                let (want, want_lse) = scaled_dot_product_attention_with_lse(&q, k, v, &o).unwrap();
                assert_eq!(last_kernel_run(), Some(KernelRun::Decode(path)), "{label}");
                assert_same_bits(out.iter(), want.iter(), &label);
                assert_same_bits(lse.iter(), want_lse.iter(), &format!("{label}: lse"));
            }
        }
    }
}

#[test]
fn streams_and_copied_chunks_give_the_same_bits() {
    streams_equal_chunks::<f32>();
    streams_equal_chunks::<f64>();
}

fn groups_equal_single_heads<T: Element>() {
    let g = 8;
    let one = HeadLayout::new(1, 1);
    let gqa = HeadLayout::new(g, 1);
    for &(n_q, n_kv, d_k, d_v) in SIZES {
        let q = gaussian(n_q, g * d_k, 1.0, 4).map(T::from_f64_rounded);
        let k = gaussian(n_kv, d_k, 1.0, 5).map(T::from_f64_rounded);
        let v = gaussian(n_kv, d_v, 1.0, 6).map(T::from_f64_rounded);
        let x = option_inputs::<T>(n_q, n_kv);
        for (name, options) in option_cases(&x) {
            for path in CpuPath::supported() {
                let o = options.clone().with_cpu_path(path);
                let label = format!("{n_q}x{n_kv} d {d_k}/{d_v} {name} {path:?}");
                let (out, lse) = multi_head_attention_with_lse(&q, &k, &v, &gqa, &o).unwrap();
                assert_eq!(last_kernel_run(), Some(KernelRun::Decode(path)), "{label}");
                for h in 0..g {
                    let qh = q.columns(h * d_k, d_k).into_owned();
                    let (want, want_lse) =
                        multi_head_attention_with_lse(&qh, &k, &v, &one, &o).unwrap();
                    let got = out.columns(h * d_v, d_v);
                    let got_lse = lse.column(h);
                    assert_same_bits(got.iter(), want.iter(), &format!("{label}: head {h}"));
                    assert_same_bits(
                        got_lse.iter(),
                        want_lse.iter(),
                        &format!("{label}: head {h} lse"),
                    );
                }
            }
        }
    }
}

#[test]
fn query_heads_grouped_or_alone_give_the_same_bits() {
    groups_equal_single_heads::<f32>();
    groups_equal_single_heads::<f64>();
}

/// `m` stored by columns starting `offset` elements into a buffer (NaN before and after),
/// and a view of it.
fn shifted<T: Element>(m: &DMatrix<T>, offset: usize) -> Vec<T> {
    let mut data = vec![T::from_f64_rounded(f64::NAN); offset + m.len() + 16];
    data[offset..offset + m.len()].copy_from_slice(m.as_slice());
    data
}

fn streams_at_every_alignment<T: Element>() {
    // The streamed score loop reads whole cache lines from the first line boundary of
    // each run and the keys before it one at a time: a run may start anywhere in a line.
    let per_line = 64 / size_of::<T>();
    for &(n_q, n_kv, d_k, d_v) in &[(1, 100, 8, 9), (2, 2100, 12, 8), (4, 75, 5, 4)] {
        let q = gaussian(n_q, d_k, 1.0, 7).map(T::from_f64_rounded);
        let k = gaussian(n_kv, d_k, 1.0, 8).map(T::from_f64_rounded);
        let v = gaussian(n_kv, d_v, 1.0, 9).map(T::from_f64_rounded);
        for path in CpuPath::supported() {
            let o = attention_core::AttentionOptions::new().with_cpu_path(path);
            let (want, want_lse) = scaled_dot_product_attention_with_lse(&q, &k, &v, &o).unwrap();
            for offset in 0..per_line {
                let label = format!("{n_q}x{n_kv} d {d_k}/{d_v} offset {offset} {path:?}");
                let (ks, vs) = (shifted(&k, offset), shifted(&v, offset));
                let kv = DMatrixView::from_slice(&ks[offset..offset + k.len()], n_kv, d_k);
                let vv = DMatrixView::from_slice(&vs[offset..offset + v.len()], n_kv, d_v);
                let (out, lse) = scaled_dot_product_attention_with_lse(&q, kv, vv, &o).unwrap();
                assert_eq!(last_kernel_run(), Some(KernelRun::Decode(path)), "{label}");
                assert_same_bits(out.iter(), want.iter(), &label);
                assert_same_bits(lse.iter(), want_lse.iter(), &format!("{label}: lse"));
            }
        }
    }
}

#[test]
fn streams_give_the_same_bits_wherever_the_columns_start() {
    streams_at_every_alignment::<f32>();
    streams_at_every_alignment::<f64>();
}
