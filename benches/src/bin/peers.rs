//! A Rust peer beside this library, same shapes, same run: candle on the CPU, composed as
//! its models compose attention (candle has no fused CPU attention): `Q·Kᵀ·scale` →
//! `candle_nn::ops::softmax_last_dim` → `·V`, f32, one head; and
//! `scaled_dot_product_attention` on the same data. GFLOP/s count `4·n²·d`; median of 5
//! calls after one warm-up. Behind the `candle` feature, so that CI does not build candle.
//!
//! ```text
//! RAYON_NUM_THREADS=2 cargo run --release -p attention-benches --features candle --bin peers
//! ```
//! Both libraries take their thread count from `RAYON_NUM_THREADS` (candle's matrix
//! products read it once; rayon's global pool, which this library uses, too): run the
//! binary once per thread count.

use attention_benches::{median_time, normal_matrix};
use attention_core::{AttentionOptions, scaled_dot_product_attention};
use candle_core::{Device, Tensor};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    if std::env::args().len() > 1 {
        eprintln!("usage: RAYON_NUM_THREADS=N peers (no arguments)");
        std::process::exit(2);
    }
    println!("threads: {}", rayon::current_num_threads());
    println!("| n | d | candle (matmul, softmax_last_dim, matmul) | attention-core | ratio |");
    println!("|---|---|---|---|---|");
    for (n, d) in [(1024, 64), (4096, 128)] {
        let m = |seed| normal_matrix(n, d, seed).map(|x| x as f32);
        let (q, k, v) = (m(1), m(2), m(3));
        let device = Device::Cpu;
        // nalgebra is column-major: its transpose's storage is the row-major n × d tensor.
        let tensor = |x: &nalgebra::DMatrix<f32>| {
            Tensor::from_slice(x.transpose().as_slice(), (n, d), &device)
        };
        let (tq, tk, tv) = (tensor(&q)?, tensor(&k)?, tensor(&v)?);
        let scale = 1.0 / (d as f64).sqrt();
        let candle = || -> candle_core::Result<Tensor> {
            let scores = (tq.matmul(&tk.t()?)? * scale)?;
            let weights = candle_nn::ops::softmax_last_dim(&scores)?;
            weights.matmul(&tv)
        };
        // Same numbers (within f32 rounding) before timing either.
        let ours = scaled_dot_product_attention(&q, &k, &v, &AttentionOptions::new())?;
        let theirs: Vec<Vec<f32>> = candle()?.to_vec2()?;
        let worst = (0..n)
            .flat_map(|i| (0..d).map(move |c| (i, c)))
            .map(|(i, c)| (ours[(i, c)] - theirs[i][c]).abs())
            .fold(0.0f32, f32::max);
        assert!(worst < 1e-3, "candle and attention-core differ by {worst}");
        let t_candle = median_time(|| candle().expect("candle"));
        let t_ours = median_time(|| {
            scaled_dot_product_attention(&q, &k, &v, &AttentionOptions::new()).expect("ours")
        });
        let flops = 4.0 * (n * n * d) as f64;
        println!(
            "| {n} | {d} | {:.1} GFLOP/s | {:.1} GFLOP/s | {:.2} |",
            flops / t_candle / 1e9,
            flops / t_ours / 1e9,
            t_candle / t_ours
        );
    }
    Ok(())
}
