//! Decoding and multi-head rows of `docs/PERFORMANCE.md`: time per generated token, against
//! the machine's read bandwidth measured in the same run.
//!
//! ```text
//! cargo run --release -p attention-benches --bin decode                 # every row
//! cargo run --release -p attention-benches --bin decode -- --threads 2 --tokens 4096,32768
//! ```
//!
//! Rows:
//! - `bandwidth`: read bandwidth from memory (GB/s): the sum of a 2 GiB f32 buffer, split
//!   over the threads, median of 7 (what `../shared/anchors/bandwidth.py` measures);
//! - `decode gqa`: one new token, 32 query heads over 8 KV heads, d = 128, f32, against
//!   `n` cached tokens (`cached_attention` on a `KvCache`, pages of 256, the default); `L`
//!   layers' caches in rotation so that no step finds its keys warm in cache from the
//!   previous one (L chosen so that L layers exceed 512 MiB); reported as µs per token per
//!   layer and as the ratio to `bytes(K, V) / bandwidth`, the floor;
//! - `decode 1 head` (`one`): one query, 4096 keys (`--one-keys LIST` for others), d = 128,
//!   f32 and f64, one head, `DMatrix` inputs (K and V stored by columns).
//! - `prefill`: 16 heads, n = 1024, d = 64, causal, f32 (GFLOP/s per useful FLOP,
//!   `2·n²·d` per head).
//! - `varlen`: 64 causal sequences with lengths uniform in 16..2048 (seed printed), 8 heads,
//!   d = 64, f32, against one sequence with the same total FLOPs; each with a new output
//!   per call (`multi_head_attention`: the batch's 122 MB output comes fresh from the
//!   operating system every call, the one sequence's 18 MB is reused by the allocator)
//!   and into one output reused (`multi_head_attention_into`).

use std::time::Instant;

use attention_core::{
    AttentionOptions, Causal, HeadLayout, KvCache, SeqId, cached_attention, multi_head_attention,
    multi_head_attention_into, scaled_dot_product_attention_into,
};
use attention_testdata::{gaussian, seeded_rng};
use nalgebra::DMatrix;
use rand::RngExt;
use rayon::prelude::*;

struct Args {
    threads: usize,
    tokens: Vec<usize>,
    rows: Vec<String>,
    one_keys: Vec<usize>,
}

const USAGE: &str = "usage: decode [--threads N] [--tokens LIST] [--one-keys LIST] \
[--rows decode,one,prefill,varlen] [--help]";

/// The rows `--rows` accepts.
const ROWS: [&str; 4] = ["decode", "one", "prefill", "varlen"];

/// Exits with status 2 after saying what is wrong with the arguments.
fn bad_argument(what: &str) -> ! {
    eprintln!("decode: {what}\n{USAGE}");
    std::process::exit(2);
}

/// A comma-separated list of positive counts for `flag`, at least one.
fn counts(flag: &str, s: &str) -> Vec<usize> {
    let items: Result<Vec<usize>, _> = s.split(',').map(|x| x.trim().parse()).collect();
    match items {
        Ok(items) if !items.is_empty() && !items.contains(&0) => items,
        _ => bad_argument(&format!("{flag}: cannot read {s:?} as positive counts")),
    }
}

/// The arguments; an unknown or malformed one is an error (exit status 2), as in
/// `throughput`, so that a mistyped flag is not silently measured with the defaults.
fn parse_args() -> Args {
    let mut a = Args {
        threads: 2,
        tokens: vec![4096, 32768, 131072],
        rows: vec![],
        one_keys: vec![4096],
    };
    let argv: Vec<String> = std::env::args().skip(1).collect();
    let mut i = 0;
    while i < argv.len() {
        let flag = argv[i].as_str();
        if flag == "--help" || flag == "-h" {
            println!("{USAGE}");
            std::process::exit(0);
        }
        let Some(next) = argv.get(i + 1) else {
            bad_argument(&format!("{flag}: needs a value, or is unknown"));
        };
        match flag {
            "--threads" => match next.parse::<usize>() {
                Ok(t) if t >= 1 => a.threads = t,
                _ => bad_argument(&format!("--threads: {next:?} is not a count ≥ 1")),
            },
            "--tokens" => a.tokens = counts(flag, next),
            "--one-keys" => a.one_keys = counts(flag, next),
            "--rows" => {
                a.rows = next.split(',').map(str::to_owned).collect();
                if let Some(r) = a.rows.iter().find(|r| !ROWS.contains(&r.as_str())) {
                    bad_argument(&format!("--rows: unknown row {r} ({ROWS:?})"));
                }
            }
            other => bad_argument(&format!("unknown argument {other}")),
        }
        i += 2;
    }
    a
}

fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(f64::total_cmp);
    xs[xs.len() / 2]
}

/// Read bandwidth in GB/s over a 2 GiB buffer.
fn bandwidth() -> f64 {
    let x: Vec<f32> = (0..512 << 20)
        .into_par_iter()
        .map(|i| (i % 7) as f32)
        .collect();
    let chunk = x.len() / rayon::current_num_threads();
    // 16 independent lanes per thread, so the adds vectorise and the loads limit the speed.
    let lanes = |c: &[f32]| -> f32 {
        let mut acc = [0f32; 16];
        for block in c.chunks_exact(16) {
            for t in 0..16 {
                acc[t] += block[t];
            }
        }
        acc.iter().sum()
    };
    let sum = || -> f32 { x.par_chunks(chunk).map(lanes).sum() };
    std::hint::black_box(sum());
    let times = (0..7)
        .map(|_| {
            let t = Instant::now();
            std::hint::black_box(sum());
            t.elapsed().as_secs_f64()
        })
        .collect();
    (x.len() * 4) as f64 / median(times) / 1e9
}

fn decode_gqa(n: usize, bw: f64) {
    let (h_q, h_kv, d) = (32, 8, 128);
    let bytes = 2 * n * h_kv * d * 4;
    let layers = ((512usize << 20) / bytes).clamp(1, 64) + 1;
    let caches: Vec<(KvCache<f32>, SeqId)> = (0..layers)
        .map(|l| {
            let k = gaussian(n, h_kv * d, 1.0, 100 + l as u64).map(|x| x as f32);
            let v = gaussian(n, h_kv * d, 1.0, 200 + l as u64).map(|x| x as f32);
            let mut cache = KvCache::new(h_kv, d, d).expect("a cache");
            let seq = cache.add_sequence();
            cache.append(seq, &k, &v).expect("append");
            (cache, seq)
        })
        .collect();
    let q = gaussian(1, h_q * d, 1.0, 7).map(|x| x as f32);
    let layout = HeadLayout::new(h_q, h_kv);
    let options = AttentionOptions::new();
    let steps = (layers * 4).max(16);
    let mut times = Vec::with_capacity(steps);
    for s in 0..steps {
        let (cache, seq) = &caches[s % layers];
        let t = Instant::now();
        std::hint::black_box(cached_attention(&q, cache, *seq, &layout, &options).unwrap());
        times.push(t.elapsed().as_secs_f64());
    }
    let t = median(times);
    let floor = bytes as f64 / (bw * 1e9);
    println!(
        "decode gqa 32/8 d=128 f32 n={n}: {:.1} us/token/layer ({layers} layers in rotation), K+V {:.1} MB, floor {:.1} us, ratio {:.2}",
        t * 1e6,
        bytes as f64 / 1e6,
        floor * 1e6,
        t / floor
    );
}

fn decode_one_head<T: attention_core::Element>(n: usize, name: &str) {
    let q = gaussian(1, 128, 1.0, 1).map(T::from_f64_rounded);
    let k = gaussian(n, 128, 1.0, 2).map(T::from_f64_rounded);
    let v = gaussian(n, 128, 1.0, 3).map(T::from_f64_rounded);
    let options = AttentionOptions::new();
    let mut out = DMatrix::<T>::zeros(1, 128);
    let mut times = vec![];
    for _ in 0..200 {
        let t = Instant::now();
        scaled_dot_product_attention_into(&q, &k, &v, &options, &mut out).unwrap();
        times.push(t.elapsed().as_secs_f64());
    }
    println!(
        "decode 1 head, 1 query, {n} keys, d=128 {name} (scaled_dot_product_attention_into): {:.1} us",
        median(times) * 1e6
    );
}

fn prefill() {
    let (h, n, d) = (16, 1024, 64);
    let q = gaussian(n, h * d, 1.0, 1).map(|x| x as f32);
    let k = gaussian(n, h * d, 1.0, 2).map(|x| x as f32);
    let v = gaussian(n, h * d, 1.0, 3).map(|x| x as f32);
    let options = AttentionOptions::new().with_causal(Causal::TopLeft);
    let layout = HeadLayout::new(h, h);
    let mut times = vec![];
    for _ in 0..7 {
        let t = Instant::now();
        std::hint::black_box(multi_head_attention(&q, &k, &v, &layout, &options).unwrap());
        times.push(t.elapsed().as_secs_f64());
    }
    let flops = h as f64 * 2.0 * (n * n * d) as f64;
    println!(
        "prefill 16 heads n=1024 d=64 causal f32: {:.2} ms, {:.1} GFLOP/s",
        median(times.clone()) * 1e3,
        flops / median(times) / 1e9
    );
}

fn varlen() {
    let seed = 2026;
    let mut rng = seeded_rng(seed);
    let lens: Vec<usize> = (0..64).map(|_| rng.random_range(16..2048)).collect();
    let total: usize = lens.iter().sum();
    let (h, d) = (8, 64);
    let flops: f64 = lens
        .iter()
        .map(|&n| h as f64 * 2.0 * (n * n * d) as f64)
        .sum();
    // One sequence with the same causal FLOPs: n² = Σ n_s².
    let n1 = (lens.iter().map(|&n| (n * n) as f64).sum::<f64>())
        .sqrt()
        .round() as usize;
    // Median seconds of `multi_head_attention` (a new output each call) and of
    // `multi_head_attention_into` (one output reused, as a model's layers reuse theirs).
    let run = |lens: &[usize]| -> (f64, f64) {
        let rows: usize = lens.iter().sum();
        let q = gaussian(rows, h * d, 1.0, 1).map(|x| x as f32);
        let k = gaussian(rows, h * d, 1.0, 2).map(|x| x as f32);
        let v = gaussian(rows, h * d, 1.0, 3).map(|x| x as f32);
        let layout = HeadLayout::new(h, h).with_seqlens(lens, lens);
        let options = AttentionOptions::new().with_causal(Causal::BottomRight);
        let (mut fresh, mut reused) = (vec![], vec![]);
        let mut out = DMatrix::<f32>::zeros(rows, h * d);
        for _ in 0..5 {
            let t = Instant::now();
            std::hint::black_box(multi_head_attention(&q, &k, &v, &layout, &options).unwrap());
            fresh.push(t.elapsed().as_secs_f64());
            let t = Instant::now();
            multi_head_attention_into(&q, &k, &v, &layout, &options, &mut out).unwrap();
            std::hint::black_box(&out);
            reused.push(t.elapsed().as_secs_f64());
        }
        (median(fresh), median(reused))
    };
    let (t_var, t_var_into) = run(&lens);
    let (t_one, t_one_into) = run(&[n1]);
    let one_flops = h as f64 * 2.0 * (n1 * n1 * d) as f64;
    println!(
        "varlen 64 seqs (seed {seed}, {total} tokens) 8 heads d=64 causal f32: {:.1} GFLOP/s; one sequence n={n1}: {:.1} GFLOP/s; ratio {:.2}",
        flops / t_var / 1e9,
        one_flops / t_one / 1e9,
        (flops / t_var) / (one_flops / t_one)
    );
    println!(
        "varlen, the same into a reused output (multi_head_attention_into): {:.1} GFLOP/s; one sequence: {:.1} GFLOP/s; ratio {:.2}",
        flops / t_var_into / 1e9,
        one_flops / t_one_into / 1e9,
        (flops / t_var_into) / (one_flops / t_one_into)
    );
}

fn main() {
    let args = parse_args();
    rayon::ThreadPoolBuilder::new()
        .num_threads(args.threads)
        .build_global()
        .expect("the global pool");
    let want = |r: &str| args.rows.is_empty() || args.rows.iter().any(|x| x == r);
    println!("threads: {}", args.threads);
    if want("decode") {
        let bw = bandwidth();
        println!("bandwidth: {bw:.1} GB/s (2 GiB f32 sum, median of 7)");
        for &n in &args.tokens {
            decode_gqa(n, bw);
        }
    }
    if want("one") {
        for &n in &args.one_keys {
            decode_one_head::<f32>(n, "f32");
        }
        for &n in &args.one_keys {
            decode_one_head::<f64>(n, "f64");
        }
    }
    if want("prefill") {
        prefill();
    }
    if want("varlen") {
        varlen();
    }
}
