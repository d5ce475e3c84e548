//! The fused kernel at its block edges, on every CPU path: sizes of 1, a block − 1, a
//! block, a block + 1 and 1000+ keys, with and without the positional masks that make the
//! kernel skip or cut tiles. Compared with the reference under the bound of `common`.
//!
//! Block sizes (see `kernel/simd.rs`): 64 queries × 60 keys (AVX-512 f32 and AVX2 f32),
//! 32 × 60 (AVX-512 f64 and AVX2 f64), 32 × 64 and 16 × 64 (portable); register tiles of
//! 4 or 6 keys and 4 value columns. The sizes below straddle all of them.

mod common;

use attention_core::{
    AttentionOptions, Causal, CpuPath, Element, Parallelism, scaled_dot_product_attention_with_lse,
};
use attention_reference::{Causal as RefCausal, Options as RefOptions};
use common::*;

#[derive(Clone, Copy, Debug)]
enum Positional {
    None,
    Causal(Causal),
    Window(usize, usize),
    CausalWindow(Causal, usize),
}

fn check<T: Element>(n_q: usize, n_kv: usize, d_k: usize, d_v: usize, pos: Positional, seed: u64) {
    let p = Problem {
        q: gaussian(n_q, d_k, 1.0, seed),
        k: gaussian(n_kv, d_k, 1.5, seed + 1),
        v: gaussian(n_kv, d_v, 1.0, seed + 2),
    }
    .rounded::<T>();
    let (q, k, v) = p.cast::<T>();
    let mut ref_opts = RefOptions::default();
    let mut opts = AttentionOptions::<T>::new();
    let to_ref = |c| match c {
        Causal::TopLeft => RefCausal::TopLeft,
        _ => RefCausal::BottomRight,
    };
    match pos {
        Positional::None => {}
        Positional::Causal(c) => {
            opts = opts.with_causal(c);
            ref_opts.causal = Some(to_ref(c));
        }
        Positional::Window(l, r) => {
            opts = opts.with_window(l, r);
            ref_opts.window = Some((l, r));
        }
        Positional::CausalWindow(c, l) => {
            opts = opts.with_causal(c).with_window(l, 0);
            ref_opts.causal = Some(to_ref(c));
            ref_opts.window = Some((l, 0));
        }
    }
    let want = attention_reference::attention(&p.q, &p.k, &p.v, &ref_opts);
    let eps = T::EPSILON.to_f64();
    let delta = score_error(&p.q, &p.k, 1.0 / (d_k as f64).sqrt(), &[], eps);
    for path in CpuPath::supported() {
        let mut first = None;
        for par in [Parallelism::Sequential, Parallelism::Rayon] {
            let o = opts.clone().with_cpu_path(path).with_parallelism(par);
            let (out, lse) = scaled_dot_product_attention_with_lse(&q, &k, &v, &o).unwrap();
            // Threads change how query blocks are grouped, never a bit of the result.
            match &first {
                None => first = Some((out.clone(), lse.clone())),
                Some((o0, l0)) => {
                    assert!(o0 == &out && l0 == &lse, "{path:?}: threads changed bits")
                }
            }
            let label = format!("{path:?}/{par:?} {n_q}x{n_kv} d_k={d_k} d_v={d_v} {pos:?}");
            assert_output_close(&widen(&out), &want.output, &p.v, &delta, eps, &label);
            let lse: Vec<f64> = lse.iter().map(|x| x.to_f64()).collect();
            assert_lse_close(&lse, &want.lse, &delta, n_kv, eps, &label);
        }
    }
}

const POSITIONAL: [Positional; 6] = [
    Positional::None,
    Positional::Causal(Causal::TopLeft),
    Positional::Causal(Causal::BottomRight),
    Positional::Window(70, 3),
    Positional::CausalWindow(Causal::TopLeft, 61),
    Positional::CausalWindow(Causal::BottomRight, 5),
];

fn sweep<T: Element>() {
    let sizes = [
        (1, 1),
        (1, 1030),
        (15, 17),
        (31, 33),
        (63, 65),
        (64, 64),
        (65, 63),
        (127, 129),
        (129, 59),
        (33, 60),
        (32, 61),
        (60, 121),
        (200, 1031),
    ];
    let dims = [(1, 1), (7, 5), (9, 6), (16, 17), (33, 64)];
    let mut seed = 1;
    for &(n_q, n_kv) in &sizes {
        for &(d_k, d_v) in &dims {
            for pos in POSITIONAL {
                check::<T>(n_q, n_kv, d_k, d_v, pos, seed);
                seed += 3;
            }
        }
    }
}

#[test]
fn block_edges_f32() {
    sweep::<f32>();
}

#[test]
fn block_edges_f64() {
    sweep::<f64>();
}

/// Long query sequences: several query blocks per group (sequential) against one per group
/// (threaded), with bands that start each block at a different key.
#[test]
fn grouped_query_blocks() {
    for pos in POSITIONAL {
        check::<f32>(520, 700, 16, 17, pos, 11);
        check::<f64>(300, 390, 9, 8, pos, 12);
    }
}

#[test]
fn wide_heads_f32_and_f64() {
    for (n, d) in [(130, 128), (70, 256)] {
        check::<f32>(n, n, d, d, Positional::None, 7);
        check::<f64>(n, n, d, d, Positional::Causal(Causal::TopLeft), 8);
    }
}

/// Key counts just below a multiple of 256 whose padding to whole panels of 6 keys (the
/// AVX2 kernels) reaches past it: 253–255, 511, 1021–1023. The value packing works in
/// chunks of 256 keys and used to start a chunk past the last key (a panic on AVX2, the
/// default path of AVX2-only CPUs; found by the long-key options properties).
#[test]
fn key_counts_whose_avx2_padding_crosses_a_packing_chunk() {
    for n_kv in [253, 254, 255, 511, 1021, 1022, 1023] {
        check::<f32>(16, n_kv, 8, 5, Positional::None, n_kv as u64);
        check::<f64>(40, n_kv, 3, 7, Positional::Causal(Causal::BottomRight), 1);
    }
}
