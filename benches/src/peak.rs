//! The machine's FMA peak, measured: an unrolled loop of independent fused multiply-adds
//! on the vectors of the library's CPU path (`CpuPath::detect()`: the widest the CPU has,
//! or the path `ATTENTION_CPU_PATH` forces, so that a forced AVX2 run is measured against
//! the AVX2 peak), timed on 1..n threads at once. Attention throughput is reported as a
//! fraction of it. This is the benches' only `unsafe` (calling the
//! `#[target_feature]` loops after run-time detection).

use std::hint::black_box;
use std::time::Instant;

/// Independent accumulators: enough to cover FMA latency × throughput on current x86
/// (4 cycles × 2 pipes) with room to spare, few enough to stay in registers.
const ACC: usize = 12;

/// An FMA loop over `ACC` independent vector accumulators, written with intrinsics so the
/// accumulators stay in registers.
macro_rules! fma_loop {
    ($name:ident, $t:ty, $features:literal, $set1:ident, $fmadd:ident, $store:ident, $lanes:literal) => {
        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = $features)]
        fn $name(iters: usize, x: $t, y: $t) -> $t {
            use std::arch::x86_64::*;
            let (xv, yv) = ($set1(x), $set1(y));
            let mut acc = [$set1(1.0); ACC];
            for _ in 0..iters {
                for a in acc.iter_mut() {
                    *a = $fmadd(*a, xv, yv);
                }
            }
            let mut out = [0.0 as $t; $lanes];
            let mut total = 0.0;
            for a in acc {
                // SAFETY: `out` holds exactly one vector of lanes.
                unsafe { $store(out.as_mut_ptr(), a) };
                total += out.iter().sum::<$t>();
            }
            total
        }
    };
}

fma_loop!(
    fma_avx512_f32,
    f32,
    "avx512f,fma",
    _mm512_set1_ps,
    _mm512_fmadd_ps,
    _mm512_storeu_ps,
    16
);
fma_loop!(
    fma_avx512_f64,
    f64,
    "avx512f,fma",
    _mm512_set1_pd,
    _mm512_fmadd_pd,
    _mm512_storeu_pd,
    8
);
fma_loop!(
    fma_avx2_f32,
    f32,
    "avx2,fma",
    _mm256_set1_ps,
    _mm256_fmadd_ps,
    _mm256_storeu_ps,
    8
);
fma_loop!(
    fma_avx2_f64,
    f64,
    "avx2,fma",
    _mm256_set1_pd,
    _mm256_fmadd_pd,
    _mm256_storeu_pd,
    4
);

/// Runs `iters` iterations of the FMA loop of the library's CPU path for the element
/// type; returns the FLOPs done (2 per lane per FMA) or `None` if that path has no FMA
/// (the portable path).
fn run(f64_type: bool, iters: usize) -> Option<f64> {
    #[cfg(target_arch = "x86_64")]
    {
        let (x, y) = (black_box(0.999_9), black_box(1e-4));
        // The path the library runs (detection, or a forced path the CPU has).
        let path = attention_core::CpuPath::detect();
        let avx512 = path == attention_core::CpuPath::Avx512
            && std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("fma");
        let avx2 = path != attention_core::CpuPath::Portable
            && std::arch::is_x86_feature_detected!("avx2")
            && std::arch::is_x86_feature_detected!("fma");
        let lanes = match (f64_type, avx512, avx2) {
            (false, true, _) => {
                // SAFETY: avx512f and fma were detected on this CPU just above.
                black_box(unsafe { fma_avx512_f32(iters, x as f32, y as f32) });
                16
            }
            (true, true, _) => {
                // SAFETY: avx512f and fma were detected on this CPU just above.
                black_box(unsafe { fma_avx512_f64(iters, x, y) });
                8
            }
            (false, false, true) => {
                // SAFETY: avx2 and fma were detected on this CPU just above.
                black_box(unsafe { fma_avx2_f32(iters, x as f32, y as f32) });
                8
            }
            (true, false, true) => {
                // SAFETY: avx2 and fma were detected on this CPU just above.
                black_box(unsafe { fma_avx2_f64(iters, x, y) });
                4
            }
            _ => return None,
        };
        Some(2.0 * (iters * ACC * lanes) as f64)
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (f64_type, iters);
        None
    }
}

/// The FMA peak in FLOP/s for `threads` threads running the loop at once (median of
/// `repeats` runs of ~50 ms each), for f32 (`f64_type = false`) or f64.
#[must_use]
pub fn fma_peak(f64_type: bool, threads: usize, repeats: usize) -> Option<f64> {
    let iters = 4_000_000;
    run(f64_type, 1000)?; // warm up, and check support
    let mut rates: Vec<f64> = (0..repeats)
        .map(|_| {
            let start = Instant::now();
            let flops: f64 = std::thread::scope(|s| {
                let handles: Vec<_> = (0..threads)
                    .map(|_| s.spawn(|| run(f64_type, iters).unwrap_or(0.0)))
                    .collect();
                handles.into_iter().map(|h| h.join().unwrap_or(0.0)).sum()
            });
            flops / start.elapsed().as_secs_f64()
        })
        .collect();
    rates.sort_by(f64::total_cmp);
    Some(rates[rates.len() / 2])
}
