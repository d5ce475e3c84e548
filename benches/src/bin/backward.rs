//! The backward pass's rows of `docs/PERFORMANCE.md`: `scaled_dot_product_attention_backward`
//! on the shapes of `../shared/anchors/backward_bench.py` (one head; f32 and f64; n = 1024,
//! d = 64 and n = 4096, d = 128, plain and causal), on 1 and 2 threads, GFLOP/s counting
//! `10·n²·d` per call (half for causal), median of 5 after one warm-up call, and the share
//! of the FMA peak measured at the start (per type and thread count, on the library's
//! CPU path); and a packed batch of 64 causal sequences through
//! `multi_head_attention_backward`.
//!
//! ```text
//! cargo run --release -p attention-benches --bin backward
//! ```

use attention_benches::{median_time, normal_matrix, peak::fma_peak};
use attention_core::{
    AttentionOptions, Causal, Element, scaled_dot_product_attention_backward,
    scaled_dot_product_attention_with_lse,
};

fn row<T: Element>(name: &str, n: usize, d: usize, causal: bool, threads: usize, peak: f64) {
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
    let time = median_time(call);
    let flops = 10.0 * (n * n * d) as f64 / if causal { 2.0 } else { 1.0 };
    let rate = flops / time / 1e9;
    println!(
        "backward {name} n={n} d={d}{} threads={threads}: {:.1} ms, {rate:.1} GFLOP/s, {:.0}% of the FMA peak",
        if causal { " causal" } else { "" },
        time * 1e3,
        100.0 * rate / peak
    );
}

/// `multi_head_attention_backward` on 64 causal sequences of 16..512 tokens (a fixed
/// pattern), 8 heads, d = 64, f32: many small blocks, threads across them.
fn varlen(threads: usize) {
    use attention_core::{
        HeadLayout, multi_head_attention_backward, multi_head_attention_with_lse,
    };
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .expect("a thread pool");
    let lens: Vec<usize> = (0..64).map(|s| 16 + (s * 389) % 497).collect();
    let rows: usize = lens.iter().sum();
    let (h, d) = (8, 64);
    let m = |c, seed| normal_matrix(rows, c, seed).map(|x| x as f32);
    let (q, k, v, d_out) = (m(h * d, 1), m(h * d, 2), m(h * d, 3), m(h * d, 4));
    let layout = HeadLayout::new(h, h).with_seqlens(&lens, &lens);
    let options = AttentionOptions::new().with_causal(Causal::TopLeft);
    let (out, lse) =
        multi_head_attention_with_lse(&q, &k, &v, &layout, &options).expect("the forward");
    let call = || {
        pool.install(|| {
            multi_head_attention_backward(&q, &k, &v, &out, &lse, &d_out, &layout, &options)
                .expect("the backward")
        })
    };
    let time = median_time(call);
    let flops: f64 = lens.iter().map(|&n| 5.0 * (n * n * d * h) as f64).sum();
    println!(
        "backward varlen 64 seqs ({rows} tokens) 8 heads d=64 causal f32 threads={threads}: {:.1} ms, {:.1} GFLOP/s",
        time * 1e3,
        flops / time / 1e9
    );
}

fn main() {
    // No arguments: `--help` says so, anything else is an error rather than ignored.
    if let Some(arg) = std::env::args().nth(1) {
        let usage = "usage: backward (no arguments)";
        if arg == "--help" || arg == "-h" {
            println!("{usage}");
            std::process::exit(0);
        }
        eprintln!("backward: unknown argument {arg}\n{usage}");
        std::process::exit(2);
    }
    let peaks: Vec<(bool, usize, f64)> = [false, true]
        .into_iter()
        .flat_map(|is_f64| [1, 2].map(|t| (is_f64, t)))
        .map(|(is_f64, t)| (is_f64, t, fma_peak(is_f64, t, 5).unwrap_or(f64::NAN) / 1e9))
        .collect();
    for &(is_f64, t, p) in &peaks {
        let ty = if is_f64 { "f64" } else { "f32" };
        println!("FMA peak {ty}, {t} thread(s): {p:.1} GFLOP/s");
    }
    let peak = |is_f64: bool, threads: usize| {
        peaks
            .iter()
            .find(|&&(f, t, _)| f == is_f64 && t == threads)
            .map_or(f64::NAN, |p| p.2)
    };
    for threads in [1, 2] {
        for (n, d, causal) in [(1024, 64, false), (4096, 128, false), (4096, 128, true)] {
            row::<f32>("f32", n, d, causal, threads, peak(false, threads));
        }
        row::<f64>("f64", 4096, 128, false, threads, peak(true, threads));
        varlen(threads);
    }
}
