//! The backward pass's rows of `docs/PERFORMANCE.md`: `scaled_dot_product_attention_backward`
//! on the shapes of `../shared/anchors/backward_bench.py` (one head; f32 and f64; n = 1024,
//! d = 64 and n = 4096, d = 128, plain and causal), on 1 and 2 threads, GFLOP/s counting
//! `10·n²·d` per call (half for causal), median of 5 after one warm-up call.
//!
//! ```text
//! cargo run --release -p attention-benches --bin backward
//! ```

use std::hint::black_box;
use std::time::Instant;

use attention_benches::normal_matrix;
use attention_core::{
    AttentionOptions, Causal, Element, scaled_dot_product_attention_backward,
    scaled_dot_product_attention_with_lse,
};

fn row<T: Element>(name: &str, n: usize, d: usize, causal: bool, threads: usize) {
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .expect("a thread pool");
    let m = |seed| normal_matrix(n, d, seed).map(T::from_f64_rounded);
    let (q, k, v, d_out) = (m(1), m(2), m(3), m(4));
    let mut options = AttentionOptions::new();
    if causal {
        options = options.with_causal(Causal::TopLeft);
    }
    let (out, lse) =
        scaled_dot_product_attention_with_lse(&q, &k, &v, &options).expect("the forward");
    let call = || {
        pool.install(|| {
            scaled_dot_product_attention_backward(
                &q,
                &k,
                &v,
                &out,
                lse.as_slice(),
                &d_out,
                &options,
            )
            .expect("the backward")
        })
    };
    black_box(call());
    let mut times: Vec<f64> = (0..5)
        .map(|_| {
            let t = Instant::now();
            black_box(call());
            t.elapsed().as_secs_f64()
        })
        .collect();
    times.sort_by(f64::total_cmp);
    let flops = 10.0 * (n * n * d) as f64 / if causal { 2.0 } else { 1.0 };
    println!(
        "backward {name} n={n} d={d}{} threads={threads}: {:.1} ms, {:.1} GFLOP/s",
        if causal { " causal" } else { "" },
        times[2] * 1e3,
        flops / times[2] / 1e9
    );
}

fn main() {
    for threads in [1, 2] {
        for (n, d, causal) in [(1024, 64, false), (4096, 128, false), (4096, 128, true)] {
            row::<f32>("f32", n, d, causal, threads);
        }
        row::<f64>("f64", 4096, 128, false, threads);
    }
}
