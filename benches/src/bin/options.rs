//! The cost of each score option against the plain call in the same run (the options rows
//! of `docs/PERFORMANCE.md`): `scaled_dot_product_attention` with an additive bias, a bool
//! mask, a key mask, an ALiBi slope and a softcap, at n = 1024, d = 64 and n = 4096,
//! d = 128, f32 and f64, on 1 and 2 threads; GFLOP/s counting `4·n²·d` per call, median of
//! 5 after one warm-up call, and each option's rate as a fraction of the plain rate (the
//! faster of two plain timings, one before the options and one after).
//!
//! ```text
//! cargo run --release -p attention-benches --bin options [-- --n 1024 --types f32 --threads 2 --only bias,alibi]
//! cargo run --release -p attention-benches --bin options -- --help
//! ```

use attention_benches::{median_time, normal_matrix};
use attention_core::{AttentionOptions, Element, scaled_dot_product_attention};
use nalgebra::DMatrix;

fn rows<T: Element>(ty: &str, n: usize, d: usize, threads: usize, only: &[String]) {
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .expect("a thread pool");
    let m = |rows, seed| normal_matrix(rows, d, seed).map(T::from_f64_rounded);
    let (q, k, v) = (m(n, 1), m(n, 2), m(n, 3));
    let bias = normal_matrix(n, n, 4).map(T::from_f64_rounded);
    let mask = DMatrix::from_fn(n, n, |i, j| (i * 7 + j * 3) % 10 != 0);
    let key_mask: Vec<bool> = (0..n).map(|j| j % 9 != 4).collect();
    let plain = AttentionOptions::new();
    let cases: Vec<(&str, AttentionOptions<'_, T>)> = vec![
        ("bias", plain.clone().with_bias(&bias)),
        ("bool mask", plain.clone().with_mask(&mask)),
        ("key mask", plain.clone().with_key_mask(&key_mask)),
        (
            "alibi",
            plain.clone().with_alibi_slope(T::from_f64_rounded(0.0625)),
        ),
        (
            "softcap",
            plain.clone().with_softcap(T::from_f64_rounded(30.0)),
        ),
    ];
    let flops = 4.0 * (n * n * d) as f64;
    let rate_of = |options: &AttentionOptions<'_, T>| {
        let t = median_time(|| {
            pool.install(|| scaled_dot_product_attention(&q, &k, &v, options).expect("a call"))
        });
        flops / t / 1e9
    };
    // The plain call is timed before and after the options, and the faster of the two is
    // the reference: a slow pass of the plain call (the pool's first calls, the VM's
    // noise) would otherwise inflate every ratio of the row.
    let plain_before = rate_of(&plain);
    let rates: Vec<(&str, f64)> = cases
        .iter()
        .filter(|(name, _)| only.is_empty() || only.iter().any(|o| o == name))
        .map(|(name, options)| (*name, rate_of(options)))
        .collect();
    let plain_after = rate_of(&plain);
    let plain_rate = plain_before.max(plain_after);
    println!(
        "| {ty} | {n} | {d} | {threads} | plain (before, after) | {plain_before:.1}, {plain_after:.1} | 1.00 |"
    );
    for (name, rate) in rates {
        println!(
            "| {ty} | {n} | {d} | {threads} | {name} | {rate:.1} | {:.2} |",
            rate / plain_rate
        );
    }
}

const USAGE: &str = "usage: options [--n LIST] [--types f32,f64] [--threads LIST] \
[--only bias,bool mask,key mask,alibi,softcap] [--help]
  --n        sizes n (d = 128 from n = 4096, else 64); default 1024,4096
  --types    element types; default f32,f64
  --threads  thread counts; default 1,2
  --only     the options to time (the plain call is always timed); default all";

/// Prints `message` and the usage to stderr and exits with status 2.
fn bad_argument(message: &str) -> ! {
    eprintln!("options: {message}\n{USAGE}");
    std::process::exit(2);
}

/// A comma-separated list of positive counts, or a usage error naming `flag`.
fn counts(flag: &str, list: &str) -> Vec<usize> {
    list.split(',')
        .map(|x| match x.parse::<usize>() {
            Ok(c) if c >= 1 => c,
            _ => bad_argument(&format!("{flag}: {x:?} is not a count ≥ 1")),
        })
        .collect()
}

fn main() {
    let argv: Vec<String> = std::env::args().skip(1).collect();
    let mut sizes = vec![(1024, 64), (4096, 128)];
    let mut types = vec!["f32".to_string(), "f64".to_string()];
    let mut threads = vec![1, 2];
    let mut only = Vec::new();
    let mut i = 0;
    while i < argv.len() {
        let flag = argv[i].as_str();
        if flag == "--help" || flag == "-h" {
            println!("{USAGE}");
            return;
        }
        let Some(next) = argv.get(i + 1) else {
            bad_argument(&format!("{flag}: needs a value, or is unknown"));
        };
        let list = |s: &str| -> Vec<String> { s.split(',').map(str::to_string).collect() };
        match flag {
            "--n" => {
                sizes = counts(flag, next)
                    .into_iter()
                    .map(|n| (n, if n >= 4096 { 128 } else { 64 }))
                    .collect();
            }
            "--types" => {
                types = list(next);
                if let Some(t) = types.iter().find(|t| !["f32", "f64"].contains(&t.as_str())) {
                    bad_argument(&format!("--types: unknown type {t:?}"));
                }
            }
            "--only" => {
                only = list(next);
                let known = ["bias", "bool mask", "key mask", "alibi", "softcap"];
                if let Some(o) = only.iter().find(|o| !known.contains(&o.as_str())) {
                    bad_argument(&format!("--only: unknown option {o:?}"));
                }
            }
            "--threads" => threads = counts(flag, next),
            other => bad_argument(&format!("unknown argument {other}")),
        }
        i += 2;
    }
    println!("| type | n | d | threads | option | GFLOP/s | of plain |");
    println!("|---|---|---|---|---|---|---|");
    for ty in &types {
        for &(n, d) in &sizes {
            for &t in &threads {
                match ty.as_str() {
                    "f32" => rows::<f32>(ty, n, d, t, &only),
                    "f64" => rows::<f64>(ty, n, d, t, &only),
                    other => unreachable!("--types was checked: {other}"),
                }
            }
        }
    }
}
