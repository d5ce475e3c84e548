//! Criterion benches of `attention-core`, reported as FLOP/s.
//!
//! # Units
//! Every group sets [`Throughput::Elements`] to the FLOP count of one call, so the
//! `thrpt` column that criterion prints as `elem/s` (`Kelem/s`, `Melem/s`, `Gelem/s`) is
//! **FLOP/s**; group names start with `flop/` as a reminder. The count is the usual one
//! for attention: `4·n_q·n_kv·d` for dense attention (`2·n_q·n_kv·d_k` for `Q·Kᵀ` plus
//! `2·n_q·n_kv·d_v` for `P·V`, with `d_k = d_v = d`), halved for causal attention. Softmax
//! work (`exp`, max, sums) is not counted, as in FlashAttention's and candle's figures.
//!
//! # Groups and names
//! Every benchmark is named `flop/<group>/<function>/<n>`, so criterion's filter picks a
//! subset, e.g. `cargo bench -p attention-benches --bench attention -- 'dense_f32_d64/core_seq/2048'`
//! or `-- 'dense_f64_d128/'`.
//!
//! - `flop/seed/{f32,f64}/2`: the 2×2 example of the original numpy code through
//!   `self_attention` (well under 1 µs).
//! - `flop/dense_{f32,f64}_d{64,128}/<function>/<n>` with `n_q = n_kv = n` ∈
//!   {64, 128, 256, 512, 1024, 2048, 4096, 16384} (and 1000, an odd size, for `f32`,
//!   `d = 64`):
//!   - `core`: `scaled_dot_product_attention`, non-causal, all threads (the default);
//!   - `core_seq`: the same with `Parallelism::Sequential`;
//!   - `core_causal`: causal (`Causal::TopLeft`), all threads; FLOPs halved;
//!   - `core_causal_seq`: the same on one thread;
//!   - `nalgebra`: the plain expression `softmax(&q * k.transpose() * scale) * &v` that
//!     builds the `n × n` score matrix (n ≤ 4096);
//!   - `reference`: `attention_reference::self_attention`, the naive f64 oracle
//!     (n ≤ 512; it is slow).
//!
//! # Timing
//! Warm-up and measurement times are set once for the whole run (1 s and 2 s) and can be
//! overridden on the command line (`-- --warm-up-time 0.2 --measurement-time 0.5`). Groups
//! only lower the sample count for the expensive sizes; criterion then samples "flat" (the
//! same number of iterations per sample), so the largest sizes cost about 11 calls each
//! (one warm-up, ten samples) and print criterion's "Unable to complete 10 samples"
//! warning, which is expected there.

use std::hint::black_box;
use std::time::Duration;

use attention_benches::{attention_flops, nalgebra_attention, normal_matrix};
use attention_core::{
    AttentionOptions, Causal, Element, Parallelism, scaled_dot_product_attention, self_attention,
};
use criterion::{BenchmarkGroup, BenchmarkId, Criterion, Throughput, measurement::WallTime};
use criterion::{criterion_group, criterion_main};
use nalgebra::DMatrix;

/// Sequence lengths (`n_q = n_kv = n`) of the dense groups.
const SIZES: [usize; 8] = [64, 128, 256, 512, 1024, 2048, 4096, 16384];
/// Head dimensions (`d_k = d_v = d`) of the dense groups.
const HEAD_DIMS: [usize; 2] = [64, 128];
/// The plain nalgebra expression materialises `n × n` scores: run it up to this `n`.
const NALGEBRA_MAX_N: usize = 4096;
/// The naive f64 reference is O(n²·d) with compensated sums: run it up to this `n`.
const REFERENCE_MAX_N: usize = 512;

/// FLOPs of one attention call as criterion's element count (see `attention_flops`).
fn flops(n: usize, d: usize, causal: bool) -> u64 {
    attention_flops(n, n, d, causal) as u64
}

/// Random `Q`, `K`, `V` of shape `n × d` (N(0, 1), reproducible), the same for every
/// function of a size.
fn random_qkv<T: Element>(n: usize, d: usize) -> (DMatrix<T>, DMatrix<T>, DMatrix<T>) {
    let seed = 0x5EED_0000 ^ ((n as u64) << 16) ^ d as u64;
    let m = |s: u64| normal_matrix(n, d, seed + s).map(T::from_f64_rounded);
    (m(1), m(2), m(3))
}

/// Group settings for size `n`: fewer samples where one call takes long.
fn configure_for_size(group: &mut BenchmarkGroup<'_, WallTime>, n: usize) {
    group.sample_size(if n <= 512 { 30 } else { 10 });
}

/// `flop/seed/{f32,f64}/2`: the 2×2 seed example through `self_attention`.
fn bench_seed(c: &mut Criterion) {
    let mut group = c.benchmark_group("flop/seed");
    group.throughput(Throughput::Elements(attention_flops(2, 2, 2, false) as u64));
    let q64 = DMatrix::<f64>::from_row_slice(2, 2, &[1.0, 0.0, 0.0, 1.0]);
    let v64 = DMatrix::<f64>::from_row_slice(2, 2, &[1.0, 2.0, 3.0, 4.0]);
    let q32: DMatrix<f32> = q64.map(|x| x as f32);
    let v32: DMatrix<f32> = v64.map(|x| x as f32);
    group.bench_function(BenchmarkId::new("f32", 2), |b| {
        b.iter(|| {
            black_box(self_attention(black_box(&q32), black_box(&q32), black_box(&v32)).unwrap())
        });
    });
    group.bench_function(BenchmarkId::new("f64", 2), |b| {
        b.iter(|| {
            black_box(self_attention(black_box(&q64), black_box(&q64), black_box(&v64)).unwrap())
        });
    });
    group.finish();
}

/// One `flop/dense_<type>_d<d>` group over `sizes`.
fn bench_dense_group<T: Element + Into<f64>>(
    c: &mut Criterion,
    type_name: &str,
    d: usize,
    sizes: &[usize],
) {
    let mut group = c.benchmark_group(format!("flop/dense_{type_name}_d{d}"));
    let all_threads = AttentionOptions::<T>::new();
    let sequential = AttentionOptions::<T>::new().with_parallelism(Parallelism::Sequential);
    let causal = AttentionOptions::<T>::new().with_causal(Causal::TopLeft);
    let causal_seq = causal.clone().with_parallelism(Parallelism::Sequential);
    for &n in sizes {
        let (q, k, v) = random_qkv::<T>(n, d);
        configure_for_size(&mut group, n);

        let dense_flops = Throughput::Elements(flops(n, d, false));
        let causal_flops = Throughput::Elements(flops(n, d, true));
        // `iter` black-boxes what the closure returns too; the explicit `black_box` on
        // the results only makes that visible.
        for (name, options, flops) in [
            ("core", &all_threads, &dense_flops),
            ("core_seq", &sequential, &dense_flops),
            ("core_causal", &causal, &causal_flops),
            ("core_causal_seq", &causal_seq, &causal_flops),
        ] {
            group.throughput(flops.clone());
            group.bench_with_input(BenchmarkId::new(name, n), &n, |b, _| {
                b.iter(|| {
                    black_box(
                        scaled_dot_product_attention(
                            black_box(&q),
                            black_box(&k),
                            black_box(&v),
                            options,
                        )
                        .unwrap(),
                    )
                });
            });
        }
        group.throughput(dense_flops);
        if n <= NALGEBRA_MAX_N {
            group.bench_with_input(BenchmarkId::new("nalgebra", n), &n, |b, _| {
                b.iter(|| {
                    black_box(nalgebra_attention(
                        black_box(&q),
                        black_box(&k),
                        black_box(&v),
                    ))
                });
            });
        }
        if n <= REFERENCE_MAX_N {
            // About 0.25 s per call at n = 512, d = 128: ten (flat) samples are plenty.
            group.sample_size(10);
            group.bench_with_input(BenchmarkId::new("reference", n), &n, |b, _| {
                b.iter(|| {
                    black_box(attention_reference::self_attention(
                        black_box(&q),
                        black_box(&k),
                        black_box(&v),
                    ))
                });
            });
        }
    }
    group.finish();
}

/// All dense groups: f32 and f64, d ∈ {64, 128}, plus n = 1000 for f32, d = 64.
fn bench_dense(c: &mut Criterion) {
    for d in HEAD_DIMS {
        let mut f32_sizes = SIZES.to_vec();
        if d == 64 {
            f32_sizes.push(1000); // an odd size, off every block boundary
            f32_sizes.sort_unstable();
        }
        bench_dense_group::<f32>(c, "f32", d, &f32_sizes);
        bench_dense_group::<f64>(c, "f64", d, &SIZES);
    }
}

/// Whole-run defaults, which the command line (`--warm-up-time`, `--measurement-time`)
/// overrides.
fn config() -> Criterion {
    Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(2))
}

criterion_group! {
    name = benches;
    config = config();
    targets = bench_seed, bench_dense
}
criterion_main!(benches);
