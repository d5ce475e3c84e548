//! Attention throughput as a table and as JSON, against the machine's FMA peak measured in
//! the same run.
//!
//! ```text
//! cargo run --release -p attention-benches --bin throughput                # full table
//! cargo run --release -p attention-benches --bin throughput -- --quick     # n ∈ {512, 2048}
//! cargo run --release -p attention-benches --bin throughput -- --n 4096 --d 128 --types f32 --threads 1,2 --json out.json
//! cargo run --release -p attention-benches --bin throughput -- --repeat 3  # median of 3 passes
//! ```
//! Each figure is the median of several timed calls (at least 3, and at least ~0.5 s of
//! calls); GFLOP/s counts `4·n²·d`, halved for causal. With `--repeat R` each row is the
//! median over the R passes and the FMA peak the maximum over them (a median peak can sit
//! below a row measured in a quiet moment), every fraction taken against that peak (none
//! on the portable path, which has no FMA loop: its fractions are blank, `null` in JSON).
//! Peak memory (max RSS) for n = 65536, d = 64, f32 is measured in a child process
//! (`--rss`, on by default in the full run) and compared with the inputs plus the output.
//! `--options bias,mask,key-mask,alibi,softcap` adds a row per option (non-causal), and
//! `--decode` a row of one query against the n keys (`4·n·d` FLOPs). `--help` lists the
//! arguments; an unknown or malformed one is an error (exit status 2).

use std::time::Instant;

use attention_benches::{attention_flops, nalgebra_attention, normal_matrix, peak::fma_peak};
use attention_core::{
    AttentionOptions, Causal, Element, Parallelism, scaled_dot_product_attention,
};
use nalgebra::DMatrix;
use serde::Serialize;

struct Args {
    sizes: Vec<usize>,
    dims: Vec<usize>,
    types: Vec<String>,
    threads: Vec<usize>,
    causal: Vec<bool>,
    baselines: bool,
    rss: bool,
    json: Option<String>,
    repeat: usize,
    options: Vec<String>,
    decode: bool,
}

const USAGE: &str = "usage: throughput [--quick] [--n LIST] [--d LIST] [--types f32,f64] \
[--threads LIST] [--causal false,true] [--options bias,mask,key-mask,alibi,softcap] [--decode] \
[--repeat R] [--json FILE] [--no-baselines] [--rss | --no-rss] [--help]";

/// Exits with status 2 after saying what is wrong with the arguments.
fn bad_argument(what: &str) -> ! {
    eprintln!("throughput: {what}\n{USAGE}");
    std::process::exit(2);
}

/// A comma-separated list for `flag`, every entry parsed, at least one.
fn list<T: std::str::FromStr>(flag: &str, s: &str) -> Vec<T> {
    let items: Result<Vec<T>, _> = s.split(',').map(|x| x.trim().parse()).collect();
    match items {
        Ok(items) if !items.is_empty() => items,
        _ => bad_argument(&format!("{flag}: cannot read the list {s:?}")),
    }
}

fn parse_args() -> Args {
    let max_threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut a = Args {
        sizes: vec![128, 512, 2048, 4096, 16384],
        dims: vec![64, 128],
        types: vec!["f32".into(), "f64".into()],
        threads: if max_threads > 1 {
            vec![1, max_threads]
        } else {
            vec![1]
        },
        causal: vec![false, true],
        baselines: true,
        rss: true,
        json: None,
        repeat: 1,
        options: Vec::new(),
        decode: false,
    };
    let argv: Vec<String> = std::env::args().skip(1).collect();
    let mut i = 0;
    while i < argv.len() {
        let flag = argv[i].as_str();
        let takes_value = [
            "--n",
            "--d",
            "--types",
            "--threads",
            "--causal",
            "--json",
            "--repeat",
            "--options",
        ]
        .contains(&flag);
        let next = if takes_value {
            i += 1;
            match argv.get(i) {
                Some(v) => v.clone(),
                None => bad_argument(&format!("{flag} needs a value")),
            }
        } else {
            String::new()
        };
        match flag {
            "--help" | "-h" => {
                println!("{USAGE}");
                std::process::exit(0);
            }
            "--quick" => {
                a.sizes = vec![512, 2048];
                a.rss = false;
            }
            "--n" => a.sizes = list(flag, &next),
            "--d" => a.dims = list(flag, &next),
            "--types" => {
                a.types = list(flag, &next);
                if let Some(t) = a.types.iter().find(|t| *t != "f32" && *t != "f64") {
                    bad_argument(&format!("--types: unknown type {t} (f32, f64)"));
                }
            }
            "--threads" => a.threads = list(flag, &next),
            "--causal" => a.causal = list(flag, &next),
            "--json" => a.json = Some(next),
            "--repeat" => match next.parse::<usize>() {
                Ok(r) if r >= 1 => a.repeat = r,
                _ => bad_argument(&format!("--repeat: {next:?} is not a count ≥ 1")),
            },
            "--options" => {
                a.options = list(flag, &next);
                if let Some(o) = a.options.iter().find(|o| !OPTIONS.contains(&o.as_str())) {
                    bad_argument(&format!("--options: unknown option {o} ({OPTIONS:?})"));
                }
            }
            "--decode" => a.decode = true,
            "--no-baselines" => a.baselines = false,
            "--no-rss" => a.rss = false,
            "--rss" => a.rss = true,
            other => bad_argument(&format!("unknown argument {other}")),
        }
        i += 1;
    }
    if a.threads.contains(&0) || a.sizes.contains(&0) || a.dims.contains(&0) {
        bad_argument("--n, --d and --threads must be positive");
    }
    a
}

/// The score options `--options` accepts.
const OPTIONS: [&str; 5] = ["bias", "mask", "key-mask", "alibi", "softcap"];

/// Median seconds per call of `f`.
fn time(mut f: impl FnMut()) -> f64 {
    f(); // warm-up (page faults, rayon start-up)
    let mut samples = Vec::new();
    let start = Instant::now();
    while samples.len() < 3 || (start.elapsed().as_secs_f64() < 0.5 && samples.len() < 50) {
        let t = Instant::now();
        f();
        samples.push(t.elapsed().as_secs_f64());
    }
    samples.sort_by(f64::total_cmp);
    samples[samples.len() / 2]
}

struct Row {
    ty: String,
    d: usize,
    n: usize,
    causal: bool,
    threads: usize,
    what: &'static str,
    gflops: f64,
    peak: f64,
}

fn bench_type<T: Element + Into<f64>>(
    ty: &str,
    args: &Args,
    peaks: &[(usize, f64)],
    rows: &mut Vec<Row>,
) {
    for &d in &args.dims {
        for &n in &args.sizes {
            let q: DMatrix<T> = normal_matrix(n, d, 1).map(T::from_f64_rounded);
            let k: DMatrix<T> = normal_matrix(n, d, 2).map(T::from_f64_rounded);
            let v: DMatrix<T> = normal_matrix(n, d, 3).map(T::from_f64_rounded);
            for &(threads, peak) in peaks {
                let pool = rayon::ThreadPoolBuilder::new()
                    .num_threads(threads)
                    .build()
                    .expect("thread pool");
                let parallelism = if threads == 1 {
                    Parallelism::Sequential
                } else {
                    Parallelism::Rayon
                };
                // Seconds per library call of `q` against K and V on this pool.
                let core = |q: &DMatrix<T>, opts: &AttentionOptions<'_, T>| {
                    pool.install(|| {
                        time(|| {
                            std::hint::black_box(
                                scaled_dot_product_attention(q, &k, &v, opts).expect("attention"),
                            );
                        })
                    })
                };
                // Records and prints one row of this type, d, n and thread count.
                let mut record = |causal: bool, what: &'static str, flops: f64, secs: f64| {
                    rows.push(Row {
                        ty: ty.into(),
                        d,
                        n,
                        causal,
                        threads,
                        what,
                        gflops: flops / secs / 1e9,
                        peak,
                    });
                    print_row(rows.last().expect("just pushed"));
                };
                for &causal in &args.causal {
                    let mut opts = AttentionOptions::new().with_parallelism(parallelism);
                    if causal {
                        opts = opts.with_causal(Causal::TopLeft);
                    }
                    let secs = core(&q, &opts);
                    record(causal, "core", attention_flops(n, n, d, causal), secs);
                }
                // The score options, each on its own (n ≤ 4096: an n × n bias or mask
                // beyond that is gigabytes).
                if n <= 4096 && !args.options.is_empty() {
                    let bias: DMatrix<T> = normal_matrix(n, n, 4).map(T::from_f64_rounded);
                    let mask = DMatrix::from_fn(n, n, |i, j| (i * 7 + j * 3) % 10 != 0);
                    let key_mask: Vec<bool> = (0..n).map(|j| j % 9 != 4).collect();
                    for o in &args.options {
                        let plain = AttentionOptions::new().with_parallelism(parallelism);
                        let (what, opts) = match o.as_str() {
                            "bias" => ("core+bias", plain.with_bias(&bias)),
                            "mask" => ("core+mask", plain.with_mask(&mask)),
                            "key-mask" => ("core+kmask", plain.with_key_mask(&key_mask)),
                            "alibi" => (
                                "core+alibi",
                                plain.with_alibi_slope(T::from_f64_rounded(0.0625)),
                            ),
                            _ => ("core+cap", plain.with_softcap(T::from_f64_rounded(30.0))),
                        };
                        let secs = core(&q, &opts);
                        record(false, what, attention_flops(n, n, d, false), secs);
                    }
                }
                // One query against the n keys (a decoding step without a cache).
                if args.decode {
                    let q1 = q.rows(0, 1).into_owned();
                    let opts = AttentionOptions::new().with_parallelism(parallelism);
                    let secs = core(&q1, &opts);
                    record(false, "decode", attention_flops(1, n, d, false), secs);
                }
                if args.baselines && threads == 1 {
                    let flops = attention_flops(n, n, d, false);
                    if n <= 4096 {
                        let secs = time(|| {
                            std::hint::black_box(nalgebra_attention(&q, &k, &v));
                        });
                        record(false, "nalgebra", flops, secs);
                    }
                    if n <= 512 {
                        let secs = time(|| {
                            std::hint::black_box(attention_reference::self_attention(&q, &k, &v));
                        });
                        record(false, "reference", flops, secs);
                    }
                }
            }
        }
    }
}

fn print_row(r: &Row) {
    // The portable path has no FMA loop, so no peak (NaN): its fraction is left blank.
    let fraction = if r.peak.is_nan() {
        "—".to_string()
    } else {
        format!("{:.1}%", 100.0 * r.gflops / r.peak)
    };
    println!(
        "| {:<3} | {:>3} | {:>5} | {:<10} | {:>2} | {:<9} | {:>7.1} | {:>6} |",
        r.ty,
        r.d,
        r.n,
        if r.causal { "causal" } else { "non-causal" },
        r.threads,
        r.what,
        r.gflops,
        fraction
    );
}

/// Max RSS of this process in KiB (Linux), `None` elsewhere.
fn max_rss_kib() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// Child mode: one n×64 f32 attention, then print the max RSS.
fn rss_child(n: usize) {
    let d = 64;
    let q: DMatrix<f32> = normal_matrix(n, d, 1).map(|x| x as f32);
    let k: DMatrix<f32> = normal_matrix(n, d, 2).map(|x| x as f32);
    let v: DMatrix<f32> = normal_matrix(n, d, 3).map(|x| x as f32);
    let before = max_rss_kib().unwrap_or(0);
    let out =
        scaled_dot_product_attention(&q, &k, &v, &AttentionOptions::new()).expect("attention");
    std::hint::black_box(&out);
    println!("{before} {}", max_rss_kib().unwrap_or(0));
}

fn main() {
    let argv: Vec<String> = std::env::args().collect();
    if argv.get(1).map(String::as_str) == Some("--rss-child") {
        rss_child(argv.get(2).and_then(|s| s.parse().ok()).unwrap_or(65536));
        return;
    }
    let args = parse_args();
    println!("attention throughput, {}", chrono_free_date());
    println!(
        "cpu paths supported: {:?}, default {:?}",
        attention_core::CpuPath::supported(),
        attention_core::CpuPath::detect()
    );
    // Each pass measures every row; with --repeat R the table reports, per row, the median
    // over the R passes (each pass's fraction uses the peak measured in that pass), so a
    // burst of noise on the shared machine moves one pass, not the result.
    let mut passes: Vec<Vec<Row>> = Vec::new();
    let mut peaks_all: Vec<(String, usize, f64)> = Vec::new();
    for pass in 0..args.repeat {
        let mut rows = Vec::new();
        for ty in &args.types {
            let is_f64 = ty == "f64";
            let peaks: Vec<(usize, f64)> = args
                .threads
                .iter()
                .map(|&t| (t, fma_peak(is_f64, t, 5).unwrap_or(f64::NAN) / 1e9))
                .collect();
            for (t, p) in &peaks {
                if p.is_nan() {
                    println!(
                        "pass {pass}: FMA peak {ty}, {t} thread(s): none (no FMA loop on the portable path)"
                    );
                } else {
                    println!("pass {pass}: FMA peak {ty}, {t} thread(s): {p:.1} GFLOP/s");
                }
                peaks_all.push((ty.clone(), *t, *p));
            }
            println!("| type | d | n | mask | threads | impl | GFLOP/s | of peak |");
            println!("|---|---|---|---|---|---|---|---|");
            match ty.as_str() {
                "f32" => bench_type::<f32>(ty, &args, &peaks, &mut rows),
                "f64" => bench_type::<f64>(ty, &args, &peaks, &mut rows),
                other => unreachable!("--types was checked: {other}"),
            }
        }
        passes.push(rows);
    }
    let median = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    // The peak of a type and thread count: the largest measured in any pass (noise only
    // ever lowers a measurement); every row's fraction is its median against it.
    let max_peak = |ty: &str, t: usize| {
        peaks_all
            .iter()
            .filter(|x| x.0 == ty && x.1 == t)
            .map(|x| x.2)
            .fold(f64::NAN, f64::max)
    };
    let mut rows: Vec<Row> = Vec::new();
    for i in 0..passes[0].len() {
        let first = &passes[0][i];
        rows.push(Row {
            ty: first.ty.clone(),
            d: first.d,
            n: first.n,
            causal: first.causal,
            threads: first.threads,
            what: first.what,
            gflops: median(passes.iter().map(|p| p[i].gflops).collect()),
            peak: max_peak(&first.ty, first.threads),
        });
    }
    let mut peak_records = Vec::new();
    for ty in &args.types {
        for &t in &args.threads {
            let p = max_peak(ty, t);
            peak_records.push(PeakJson {
                ty: ty.clone(),
                threads: t,
                gflops: rounded(p, 3),
            });
            if args.repeat > 1 && !p.is_nan() {
                println!("highest FMA peak {ty}, {t} thread(s): {p:.1} GFLOP/s");
            }
        }
    }
    if args.repeat > 1 {
        println!("\nmedian over {} passes:", args.repeat);
        println!("| type | d | n | mask | threads | impl | GFLOP/s | of peak |");
        println!("|---|---|---|---|---|---|---|---|");
        for r in &rows {
            print_row(r);
        }
    }
    let mut max_rss = None;
    if args.rss {
        let n = 65536;
        let exe = std::env::current_exe().expect("own path");
        let out = std::process::Command::new(exe)
            .args(["--rss-child", &n.to_string()])
            .output();
        if let Ok(out) = out {
            let text = String::from_utf8_lossy(&out.stdout);
            let nums: Vec<u64> = text
                .split_whitespace()
                .filter_map(|s| s.parse().ok())
                .collect();
            if let [before, after] = nums[..] {
                let io_mib = 4.0 * (n * 64 * 4) as f64 / (1 << 20) as f64; // Q, K, V, output
                println!(
                    "max RSS, n = {n}, d = 64, f32: {:.1} MiB in all; {:.1} MiB before the call (inputs built); inputs + output = {io_mib:.1} MiB; overhead beyond them {:.1} MiB",
                    after as f64 / 1024.0,
                    before as f64 / 1024.0,
                    after as f64 / 1024.0 - io_mib
                );
                max_rss = Some(RssJson {
                    n,
                    d: 64,
                    max_rss_mib: rounded(after as f64 / 1024.0, 1),
                    inputs_plus_output_mib: rounded(io_mib, 1),
                });
            }
        }
    }
    if let Some(path) = &args.json {
        let results = rows
            .iter()
            .map(|r| ResultJson {
                ty: r.ty.clone(),
                d: r.d,
                n: r.n,
                causal: r.causal,
                threads: r.threads,
                what: r.what,
                gflops: rounded(r.gflops, 3),
                fraction_of_peak: rounded(r.gflops / r.peak, 4),
            })
            .collect();
        let report = ReportJson {
            peaks: peak_records,
            results,
            max_rss,
        };
        let s = serde_json::to_string(&report).expect("serialise JSON");
        std::fs::write(path, s).expect("write JSON");
        println!("wrote {path}");
    }
}

/// The `--json` report: the FMA peaks, one result a table row, and the max RSS (`null`
/// without `--rss`). Numbers keep the table's precision.
#[derive(Serialize)]
struct ReportJson {
    peaks: Vec<PeakJson>,
    results: Vec<ResultJson>,
    max_rss: Option<RssJson>,
}

#[derive(Serialize)]
struct PeakJson {
    #[serde(rename = "type")]
    ty: String,
    threads: usize,
    gflops: f64,
}

#[derive(Serialize)]
struct ResultJson {
    #[serde(rename = "type")]
    ty: String,
    d: usize,
    n: usize,
    causal: bool,
    threads: usize,
    #[serde(rename = "impl")]
    what: &'static str,
    gflops: f64,
    fraction_of_peak: f64,
}

#[derive(Serialize)]
struct RssJson {
    n: usize,
    d: usize,
    max_rss_mib: f64,
    inputs_plus_output_mib: f64,
}

/// `x` rounded to `decimals` places, as `format!("{x:.decimals$}")` rounds it (so the JSON
/// holds the numbers the hand-written output held).
fn rounded(x: f64, decimals: usize) -> f64 {
    format!("{x:.decimals$}").parse().unwrap_or(x)
}

/// Seconds since the epoch, so results can be dated without a date library.
fn chrono_free_date() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    format!("unix time {secs}")
}
