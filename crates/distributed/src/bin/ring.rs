//! `attention-ring`: ring attention over one long sequence on several workers (threads,
//! processes or hosts), checked against the single-process call; then, optionally,
//! sharded decoding of more tokens. Run `attention-ring --help`.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use attention_core::{AttentionOptions, Causal, HeadLayout, multi_head_attention_with_lse};
use attention_distributed::verify::{deviation, synthetic_qkv};
use attention_distributed::{Cluster, DistributedError, Peer, Plan, RingOptions, Wire};
use nalgebra::DMatrix;

const HELP: &str = "\
attention-ring: ring attention over one sequence spread over workers, on timely dataflow.

USAGE:
  attention-ring [ENGINE FLAGS] [PROBLEM FLAGS]

ENGINE FLAGS (timely's launcher arguments):
  -w, --threads N      worker threads per process (default 1)
  -n, --processes N    processes in the run (default 1)
  -p, --process I      this process's index, 0 .. N-1 (default 0)
  -h, --hostfile FILE  one host:port per line, in process order
      --hosts LIST     the same, comma-separated (default localhost:2101, 2102, ...)
      --timeout S      seconds a worker waits for a peer before failing (default 60)

PROBLEM FLAGS:
  --tokens N           sequence length (default 4096)
  --heads H            query heads (default 8)
  --kv-heads G         key/value heads, dividing H (default H)
  --d D                head width d_k = d_v (default 64)
  --dtype f32|f64      element type (default f32)
  --causal             causal attention (zig-zag balanced)
  --seed S             input seed (default 1); every worker generates its own rows
  --compute-threads T  threads of each process's compute pool (default: all cores)
  --repeat R           run the ring R times and report the median time (default 1)
  --check              compare with the single-process call (each worker builds all of K, V)
  --decode STEPS       then decode STEPS more tokens with a sharded KV cache
  --out DIR            write each worker's results to DIR/worker-W.bin (tests)
  --single             time the single-process multi_head_attention call instead
  --help               this text

Every process of a run gets the same flags except -p. The engine's transport is plain
TCP, without authentication or encryption: use it on trusted networks only.

EXIT: 0 ok; 1 a check failed; 2 bad flags; 3 the distributed run failed.
";

#[derive(Clone, Debug)]
struct Args {
    tokens: usize,
    heads: usize,
    kv_heads: usize,
    d: usize,
    f64: bool,
    causal: bool,
    seed: u64,
    compute_threads: Option<usize>,
    repeat: usize,
    check: bool,
    decode: usize,
    out: Option<PathBuf>,
    single: bool,
    exit_worker: Option<usize>,
}

fn parse(rest: Vec<String>) -> Result<Args, String> {
    let mut a = Args {
        tokens: 4096,
        heads: 8,
        kv_heads: 0,
        d: 64,
        f64: false,
        causal: false,
        seed: 1,
        compute_threads: None,
        repeat: 1,
        check: false,
        decode: 0,
        out: None,
        single: false,
        exit_worker: None,
    };
    let mut it = rest.into_iter();
    while let Some(flag) = it.next() {
        let mut value = || it.next().ok_or_else(|| format!("{flag} needs a value"));
        let number = |v: String| {
            v.parse::<usize>()
                .map_err(|_| format!("{flag}: a whole number, found {v:?}"))
        };
        match flag.as_str() {
            "--tokens" => a.tokens = number(value()?)?,
            "--heads" => a.heads = number(value()?)?,
            "--kv-heads" => a.kv_heads = number(value()?)?,
            "--d" => a.d = number(value()?)?,
            "--dtype" => {
                a.f64 = match value()?.as_str() {
                    "f32" => false,
                    "f64" => true,
                    other => return Err(format!("--dtype: f32 or f64, found {other:?}")),
                }
            }
            "--causal" => a.causal = true,
            "--seed" => a.seed = number(value()?)? as u64,
            "--compute-threads" => a.compute_threads = Some(number(value()?)?),
            "--repeat" => a.repeat = number(value()?)?.max(1),
            "--check" => a.check = true,
            "--decode" => a.decode = number(value()?)?,
            "--out" => a.out = Some(PathBuf::from(value()?)),
            "--single" => a.single = true,
            // For the tests of a worker that dies: this worker's process exits at once.
            "--exit-worker" => a.exit_worker = Some(number(value()?)?),
            other => return Err(format!("unknown flag {other:?} (see --help)")),
        }
    }
    if a.kv_heads == 0 {
        a.kv_heads = a.heads;
    }
    if a.heads == 0 || a.d == 0 || !a.heads.is_multiple_of(a.kv_heads) {
        return Err(format!(
            "--heads must be a positive multiple of --kv-heads and --d positive; found {}, {}, {}",
            a.heads, a.kv_heads, a.d
        ));
    }
    Ok(a)
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.iter().any(|a| a == "--help") {
        print!("{HELP}");
        return ExitCode::SUCCESS;
    }
    let (cluster, rest) = match Cluster::from_args(args) {
        Ok(x) => x,
        Err(e) => return usage(&e.to_string()),
    };
    let args = match parse(rest) {
        Ok(a) => a,
        Err(e) => return usage(&e),
    };
    if let Some(t) = args.compute_threads
        && let Err(e) = rayon::ThreadPoolBuilder::new()
            .num_threads(t)
            .build_global()
    {
        return usage(&format!("--compute-threads: {e}"));
    }
    if args.single {
        return if args.f64 {
            single::<f64>(&args)
        } else {
            single::<f32>(&args)
        };
    }
    let result = if args.f64 {
        distributed::<f64>(&cluster, args)
    } else {
        distributed::<f32>(&cluster, args)
    };
    match result {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(e) => {
            eprintln!("attention-ring: process {}: {e}", cluster.process());
            ExitCode::from(3)
        }
    }
}

fn usage(message: &str) -> ExitCode {
    eprintln!("attention-ring: {message}");
    ExitCode::from(2)
}

fn layout(a: &Args) -> HeadLayout<'static> {
    HeadLayout::new(a.heads, a.kv_heads)
}

/// Q, K, V of the tokens `rows`.
fn qkv<T: Wire>(a: &Args, rows: &[usize]) -> [DMatrix<T>; 3] {
    synthetic_qkv(a.seed, rows, &layout(a), a.d)
}

/// Useful FLOPs of the whole problem: 4·d per allowed (query, key) pair and query head.
fn flops(a: &Args) -> f64 {
    let n = a.tokens as f64;
    let pairs = if a.causal { n * (n + 1.0) / 2.0 } else { n * n };
    4.0 * a.d as f64 * a.heads as f64 * pairs
}

fn single<T: Wire>(a: &Args) -> ExitCode {
    let rows: Vec<usize> = (0..a.tokens).collect();
    let [q, k, v] = qkv::<T>(a, &rows);
    let mut opts = AttentionOptions::new();
    if a.causal {
        opts = opts.with_causal(Causal::TopLeft);
    }
    let mut times = Vec::new();
    for _ in 0..a.repeat {
        let start = Instant::now();
        if let Err(e) = multi_head_attention_with_lse(&q, &k, &v, &layout(a), &opts) {
            eprintln!("attention-ring: {e}");
            return ExitCode::from(3);
        }
        times.push(start.elapsed().as_secs_f64());
    }
    let t = median(&mut times);
    println!(
        "single process: {} tokens, {} threads: {t:.4} s (median of {}), {:.1} GFLOP/s",
        a.tokens,
        rayon::current_num_threads(),
        a.repeat,
        flops(a) / t / 1e9
    );
    ExitCode::SUCCESS
}

fn median(times: &mut [f64]) -> f64 {
    times.sort_by(f64::total_cmp);
    times[times.len() / 2]
}

/// Runs the ring (and decoding) on this process's workers; false if a check failed.
fn distributed<T: Wire>(cluster: &Cluster, a: Args) -> Result<bool, DistributedError> {
    let results = cluster.run(move |peer| worker::<T>(peer, &a))?;
    Ok(results.into_iter().all(|ok| ok))
}

fn worker<T: Wire>(peer: &mut Peer<'_>, a: &Args) -> Result<bool, DistributedError> {
    let (me, workers) = (peer.index(), peer.workers());
    if a.exit_worker == Some(me) {
        eprintln!("worker {me}: exiting on purpose (--exit-worker)");
        std::process::exit(4);
    }
    let plan = Plan::zigzag(a.tokens, workers)?;
    let rows: Vec<usize> = plan.rows(me).into_iter().flatten().collect();
    let [q, k, v] = qkv::<T>(a, &rows);
    let mut options = RingOptions::new().with_causal(a.causal);
    let layout = layout(a);

    let mut times = Vec::new();
    let mut result = None;
    peer.barrier()?; // processes start at different moments
    for _ in 0..a.repeat {
        let start = Instant::now();
        result = Some(peer.ring_attention(&plan, &q, &k, &v, &layout, &options)?);
        times.push(start.elapsed().as_secs_f64());
    }
    let ring = result.expect("repeat ≥ 1");
    let t = median(&mut times);
    let s = &ring.stats;
    println!(
        "worker {me}/{workers}: {} rows, {} pairs per head; compute {:.4} s, merge {:.4} s, \
         send {:.4} s, receive {:.4} s (beside the compute), stalled {:.4} s, sent {:.1} MiB; ring {t:.4} s (median of {}), \
         {:.1} GFLOP/s for the whole problem",
        rows.len(),
        s.pairs,
        s.compute.as_secs_f64(),
        s.merge.as_secs_f64(),
        s.send.as_secs_f64(),
        s.receive.as_secs_f64(),
        s.stalled.as_secs_f64(),
        s.bytes_sent as f64 / (1 << 20) as f64,
        a.repeat,
        flops(a) / t / 1e9
    );

    let mut ok = true;
    if a.check {
        ok &= check(a, me, workers, &rows, &ring.output, &ring.lse);
    }

    let mut decoded = Vec::new();
    if a.decode > 0 {
        options = options.with_causal(true);
        let mut decoder = peer.decoder(&k, &v, &layout, &options)?;
        let start = Instant::now();
        for t in a.tokens..a.tokens + a.decode {
            let [tq, tk, tv] = qkv::<T>(a, &[t]);
            decoded.push(decoder.step(&tq, &tk, &tv)?);
        }
        let elapsed = start.elapsed().as_secs_f64();
        println!(
            "worker {me}/{workers}: decoded {} tokens, {:.1} µs per token; shards {:?}",
            a.decode,
            elapsed / a.decode as f64 * 1e6,
            decoder.shard_lengths()
        );
        decoder.finish()?;
        if a.check {
            ok &= check_decoded(a, me, workers, &decoded);
        }
    }
    if let Some(dir) = &a.out {
        write_results(dir, me, &ring.output, &ring.lse, &decoded).map_err(|e| {
            DistributedError::Engine {
                message: format!("writing {}: {e}", dir.display()),
            }
        })?;
    }
    Ok(ok)
}

/// The largest `|ring − single|` of this worker's rows, as a multiple of the bound.
fn check<T: Wire>(
    a: &Args,
    me: usize,
    workers: usize,
    rows: &[usize],
    out: &DMatrix<T>,
    lse: &DMatrix<T>,
) -> bool {
    let all: Vec<usize> = (0..a.tokens).collect();
    let [q, k, v] = qkv::<T>(a, &all);
    let mut opts = AttentionOptions::new();
    if a.causal {
        opts = opts.with_causal(Causal::TopLeft);
    }
    let (want, want_lse) = match multi_head_attention_with_lse(&q, &k, &v, &layout(a), &opts) {
        Ok(x) => x,
        Err(e) => {
            eprintln!("worker {me}: the single-process call failed: {e}");
            return false;
        }
    };
    let mine = (want.select_rows(rows), want_lse.select_rows(rows));
    let ratio = deviation(
        workers,
        &layout(a),
        (&q, &k, &v),
        (out, lse),
        (&mine.0, &mine.1),
    );
    println!(
        "worker {me}/{workers}: max |ring − single| = {ratio:.3} of the bound ({})",
        if ratio <= 1.0 { "ok" } else { "FAILED" }
    );
    ratio <= 1.0
}

/// Each decoded token against the single-process call over all tokens up to it.
fn check_decoded<T: Wire>(
    a: &Args,
    me: usize,
    workers: usize,
    decoded: &[(DMatrix<T>, DMatrix<T>)],
) -> bool {
    let mut worst: f64 = 0.0;
    for (s, (out, lse)) in decoded.iter().enumerate() {
        let t = a.tokens + s;
        let all: Vec<usize> = (0..=t).collect();
        let [_, k, v] = qkv::<T>(a, &all);
        let [q, _, _] = qkv::<T>(a, &[t]);
        let single =
            multi_head_attention_with_lse(&q, &k, &v, &layout(a), &AttentionOptions::new());
        let Ok((want, want_lse)) = single else {
            eprintln!("worker {me}: the single-process call failed");
            return false;
        };
        worst = worst.max(deviation(
            workers,
            &layout(a),
            (&q, &k, &v),
            (out, lse),
            (&want, &want_lse),
        ));
    }
    println!(
        "worker {me}: max |decoded − single| = {worst:.3} of the bound ({})",
        if worst <= 1.0 { "ok" } else { "FAILED" }
    );
    worst <= 1.0
}

/// `DIR/worker-W.bin`: little-endian u64 rows, output columns, lse columns, decoded
/// steps; then the output, the lse and each decoded output row by row, as f64.
fn write_results<T: Wire>(
    dir: &std::path::Path,
    me: usize,
    out: &DMatrix<T>,
    lse: &DMatrix<T>,
    decoded: &[(DMatrix<T>, DMatrix<T>)],
) -> std::io::Result<()> {
    let mut bytes = Vec::new();
    for x in [out.nrows(), out.ncols(), lse.ncols(), decoded.len()] {
        bytes.extend((x as u64).to_le_bytes());
    }
    let mut put = |m: &DMatrix<T>| {
        for i in 0..m.nrows() {
            for j in 0..m.ncols() {
                bytes.extend(m[(i, j)].to_f64().to_le_bytes());
            }
        }
    };
    put(out);
    put(lse);
    for (o, _) in decoded {
        put(o);
    }
    let mut f = std::fs::File::create(dir.join(format!("worker-{me}.bin")))?;
    f.write_all(&bytes)
}
