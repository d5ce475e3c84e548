//! Threads never change a bit (the promise of [`Parallelism::Rayon`]): for every CPU path
//! this machine has, f32 and f64, with no options and with each positional and
//! element-wise option, a sequential call and threaded calls in pools of 1, 2 and 7
//! threads give identical output and log-sum-exp bits.
//!
//! The problems are large enough for the kernel to split them over threads (at least
//! `PARALLEL_MIN_WORK` = 4·2^20 multiply-adds `n_q·n_kv·(d_k + d_v)`, and more than 8
//! queries), which `common::assert_thread_count_irrelevant` checks: smaller ones run the
//! same single-threaded code whatever the parallelism, so comparing them cannot fail.
//! Random large problems without options are in `properties.rs` (`*_threads_bitwise`).
//!
//! [`Parallelism::Rayon`]: attention_core::Parallelism::Rayon

mod common;

use attention_core::{AttentionOptions, Causal, Element};
use common::{assert_thread_count_irrelevant, gaussian, narrow};
use nalgebra::DMatrix;

/// `(n_q, n_kv, d_k, d_v)`: from 4 query blocks (of 64) to 38 (of 16), whole and partial
/// key tiles, d_k ≠ d_v. Work: 7.7M, 16M and 22M multiply-adds.
const SIZES: [(usize, usize, usize, usize); 3] =
    [(200, 300, 64, 64), (600, 257, 64, 40), (333, 600, 48, 64)];

/// The options of one case, owned (core borrows the matrices).
struct Owned<T: Element> {
    bias: DMatrix<T>,
    mask: DMatrix<bool>,
    key_mask: Vec<bool>,
}

impl<T: Element> Owned<T> {
    fn new(n_q: usize, n_kv: usize, seed: u64) -> Self {
        // Bias N(0, 4) with every 7th entry −∞.
        let mut bias = gaussian(n_q, n_kv, 2.0, seed);
        for (idx, b) in bias.iter_mut().enumerate() {
            if idx % 7 == 3 {
                *b = f64::NEG_INFINITY;
            }
        }
        // About a quarter of the positions masked, and every 13th row entirely.
        let noise = gaussian(n_q, n_kv, 1.0, seed + 1);
        let mask = DMatrix::from_fn(n_q, n_kv, |i, j| i % 13 != 5 && noise[(i, j)] > -0.67);
        let key_mask = (0..n_kv).map(|j| j % 11 != 4).collect();
        Owned {
            bias: narrow(&bias),
            mask,
            key_mask,
        }
    }

    /// Each option alone (the ones that cut tiles by position, and those that act on each
    /// score), then all of them together.
    fn variants(&self) -> Vec<(&'static str, AttentionOptions<'_, T>)> {
        let o = AttentionOptions::<T>::new;
        let f = T::from_f64_rounded;
        vec![
            ("no options", o()),
            ("causal top-left", o().with_causal(Causal::TopLeft)),
            (
                "causal bottom-right, window (37, 5)",
                o().with_causal(Causal::BottomRight).with_window(37, 5),
            ),
            ("window (100, 20)", o().with_window(100, 20)),
            ("bias with -inf", o().with_bias(&self.bias)),
            ("mask", o().with_mask(&self.mask)),
            (
                "everything",
                o().with_scale(f(0.1))
                    .with_causal(Causal::BottomRight)
                    .with_window(150, 0)
                    .with_bias(&self.bias)
                    .with_mask(&self.mask)
                    .with_key_mask(&self.key_mask)
                    .with_softcap(f(20.0))
                    .with_alibi_slope(f(0.05)),
            ),
        ]
    }
}

fn every_option<T: Element>() {
    for (n, &(n_q, n_kv, d_k, d_v)) in SIZES.iter().enumerate() {
        let seed = 10 * n as u64;
        let q = narrow::<T>(&gaussian(n_q, d_k, 1.0, seed));
        let k = narrow::<T>(&gaussian(n_kv, d_k, 1.0, seed + 1));
        let v = narrow::<T>(&gaussian(n_kv, d_v, 1.0, seed + 2));
        let owned = Owned::<T>::new(n_q, n_kv, seed + 3);
        for (what, options) in owned.variants() {
            let label = format!(
                "{} {n_q}x{n_kv} d_k={d_k} d_v={d_v} {what}",
                std::any::type_name::<T>()
            );
            assert_thread_count_irrelevant(&q, &k, &v, &options, &label);
        }
    }
}

#[test]
fn threads_change_no_bit_f32() {
    every_option::<f32>();
}

#[test]
fn threads_change_no_bit_f64() {
    every_option::<f64>();
}
