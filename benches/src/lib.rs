//! Shared pieces of the attention benchmarks: the machine's measured FMA peak (the
//! roofline every result is compared with), the plain-nalgebra baseline, and the timing
//! of the bench binaries.

pub mod peak;

use nalgebra::{DMatrix, RealField};

/// Seconds per call of `call`: the median of 5 calls after one warm-up call (the bench
/// binaries `backward`, `options` and `peers`).
pub fn median_time<R>(mut call: impl FnMut() -> R) -> f64 {
    std::hint::black_box(call());
    let mut times: Vec<f64> = (0..5)
        .map(|_| {
            let t = std::time::Instant::now();
            std::hint::black_box(call());
            t.elapsed().as_secs_f64()
        })
        .collect();
    times.sort_by(f64::total_cmp);
    times[2]
}

/// FLOPs of dense attention as the benches count them: `4·n_q·n_kv·d` (two products of
/// `2·n_q·n_kv·d` each), halved for causal attention (only about half the scores count).
#[must_use]
pub fn attention_flops(n_q: usize, n_kv: usize, d: usize, causal: bool) -> f64 {
    let full = 4.0 * n_q as f64 * n_kv as f64 * d as f64;
    if causal { full / 2.0 } else { full }
}

/// The textbook computation with plain nalgebra: `S = Q·Kᵀ·scale`, a stable softmax over
/// each row, `S·V`. Materialises the `n_q × n_kv` matrix.
#[must_use]
pub fn nalgebra_attention<T: RealField + Copy>(
    q: &DMatrix<T>,
    k: &DMatrix<T>,
    v: &DMatrix<T>,
) -> DMatrix<T> {
    let scale = T::one() / nalgebra::convert::<f64, T>(q.ncols() as f64).sqrt();
    let mut s = q * k.transpose() * scale;
    let n_q = s.nrows();
    // Column sweeps over the column-major matrix: per-row maxima and sums in vectors.
    let mut m = vec![T::min_value().unwrap(); n_q];
    for col in s.column_iter() {
        for (mi, &x) in m.iter_mut().zip(col.iter()) {
            *mi = (*mi).max(x);
        }
    }
    let mut l = vec![T::zero(); n_q];
    for mut col in s.column_iter_mut() {
        for ((x, &mi), li) in col.iter_mut().zip(&m).zip(l.iter_mut()) {
            *x = (*x - mi).exp();
            *li += *x;
        }
    }
    for mut col in s.column_iter_mut() {
        for (x, &li) in col.iter_mut().zip(&l) {
            *x /= li;
        }
    }
    s * v
}

/// Deterministic N(0,1) matrix: benches need fresh-looking, reproducible inputs
/// (`attention_testdata::gaussian`, a seeded `StdRng`).
#[must_use]
pub fn normal_matrix(rows: usize, cols: usize, seed: u64) -> DMatrix<f64> {
    attention_testdata::gaussian(rows, cols, 1.0, seed)
}
