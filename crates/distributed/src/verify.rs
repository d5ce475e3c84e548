//! Checking a distributed result: synthetic inputs any worker can make alone, and the
//! deviation from the single-machine call measured against [`ring_deviation_bound`].

use attention_core::{Element, HeadLayout};
use nalgebra::DMatrix;

use crate::ring::ring_deviation_bound;

/// Entry `(row, column)` of synthetic input `which` (0 = Q, 1 = K, 2 = V) for `seed`:
/// uniform in [−1, 1), from a counter-based hash (SplitMix64's finaliser, twice), so any
/// worker can make any token's rows without the others.
#[must_use]
pub fn synthetic_entry(seed: u64, which: u64, row: usize, column: usize) -> f64 {
    let mut z = seed
        ^ which.wrapping_mul(0x9E37_79B9_7F4A_7C15)
        ^ (row as u64).wrapping_mul(0xD1B5_4A32_D192_ED03)
        ^ (column as u64).wrapping_mul(0xAEF1_7502_108E_F2D9);
    for _ in 0..2 {
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
    }
    (z >> 11) as f64 / (1u64 << 52) as f64 - 1.0
}

/// The synthetic Q (`rows × h_q·d`), K and V (`rows × h_kv·d`) of the tokens `rows`.
///
/// # Example
/// ```
/// use attention_core::HeadLayout;
/// use attention_distributed::verify::synthetic_qkv;
///
/// let [q, k, _] = synthetic_qkv::<f64>(7, &[3, 9], &HeadLayout::new(4, 2), 8);
/// assert_eq!((q.shape(), k.shape()), ((2, 32), (2, 16)));
/// let [q9, _, _] = synthetic_qkv::<f64>(7, &[9], &HeadLayout::new(4, 2), 8);
/// assert_eq!(q.row(1), q9.row(0)); // a token's rows do not depend on the others
/// ```
#[must_use]
pub fn synthetic_qkv<T: Element>(
    seed: u64,
    rows: &[usize],
    layout: &HeadLayout<'_>,
    d: usize,
) -> [DMatrix<T>; 3] {
    let make = |which: u64, heads: usize| {
        DMatrix::from_fn(rows.len(), heads * d, |i, j| {
            T::from_f64_rounded(synthetic_entry(seed, which, rows[i], j))
        })
    };
    [
        make(0, layout.heads_q()),
        make(1, layout.heads_kv()),
        make(2, layout.heads_kv()),
    ]
}

/// The largest deviation of `got` (output, lse) from `want`, the single-machine result
/// for the same rows, as a fraction of [`ring_deviation_bound`] (≤ 1 passes): outputs
/// relative to their value column's `max |v|`. `q`, `k`, `v` are the whole problem's
/// inputs (all tokens), which give the bound's score and lse magnitudes; `workers` is the
/// number of merged parts.
///
/// # Panics
/// If the shapes do not fit the layout.
#[must_use]
#[allow(clippy::type_complexity)]
pub fn deviation<T: Element>(
    workers: usize,
    layout: &HeadLayout<'_>,
    (q, k, v): (&DMatrix<T>, &DMatrix<T>, &DMatrix<T>),
    got: (&DMatrix<T>, &DMatrix<T>),
    want: (&DMatrix<T>, &DMatrix<T>),
) -> f64 {
    let (heads, group) = (layout.heads_q(), layout.heads_q() / layout.heads_kv());
    let (d_k, d_v) = (q.ncols() / heads, v.ncols() / layout.heads_kv());
    assert_eq!(got.0.shape(), want.0.shape(), "output shapes");
    assert_eq!(got.1.shape(), want.1.shape(), "lse shapes");
    // max_i ‖row i of head h's columns‖₂ bounds |q_i·k_j| with Cauchy–Schwarz.
    let norm = |m: &DMatrix<T>, h: usize, d: usize| {
        m.columns(h * d, d)
            .row_iter()
            .map(|r| r.iter().map(|x| x.to_f64().powi(2)).sum::<f64>().sqrt())
            .fold(0.0, f64::max)
    };
    let scale = 1.0 / (d_k as f64).sqrt();
    let mut worst: f64 = 0.0;
    for h in 0..heads {
        let kv = h / group;
        let score = scale * norm(q, h, d_k) * norm(k, kv, d_k);
        let lse_max = want
            .1
            .column(h)
            .iter()
            .map(|x| x.to_f64().abs())
            .fold(0.0, f64::max);
        let bound = ring_deviation_bound::<T>(workers, k.nrows(), d_k, score, lse_max);
        for c in 0..d_v {
            let vmax = v.column(kv * d_v + c).amax().to_f64();
            for i in 0..got.0.nrows() {
                let err = (got.0[(i, h * d_v + c)] - want.0[(i, h * d_v + c)])
                    .to_f64()
                    .abs();
                worst = worst.max(err / (bound * vmax).max(f64::MIN_POSITIVE));
            }
        }
        for i in 0..got.1.nrows() {
            let (a, b) = (got.1[(i, h)].to_f64(), want.1[(i, h)].to_f64());
            let err = if a == b { 0.0 } else { (a - b).abs() };
            worst = worst.max(err / bound);
        }
    }
    worst
}
