//! The `attention-ring` binary as 2 and 3 worker processes talking over TCP on the
//! loopback address (127.0.0.1 only), on free ports chosen at run time, one such run at a
//! time, each bounded in time:
//!
//! - results within `ring_deviation_bound` of the single-process call (computed here),
//!   and bit for bit the same across repeated runs with the same process count;
//! - a worker process that exits ends the run on the others with an error, not a hang;
//! - a peer that never comes up is a timeout error;
//! - processes given different problems fail before any work; a bad `-p` is a usage error.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use attention_core::{AttentionOptions, Causal, HeadLayout, multi_head_attention_with_lse};
use attention_distributed::verify::{deviation, synthetic_qkv};
use attention_distributed::{Plan, free_loopback_ports};
use nalgebra::DMatrix;

/// One multi-process run at a time (each test starts several processes).
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

const BINARY: &str = env!("CARGO_BIN_EXE_attention-ring");

/// What a process ended with.
struct Ended {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

/// Starts `processes` processes of the binary on 127.0.0.1, process `p` with the shared
/// `args` and `extra(p)`, and waits for all of them, killing any still running after
/// `limit` (the test then fails).
fn run(
    processes: usize,
    args: &[&str],
    extra: impl Fn(usize) -> Vec<String>,
    limit: Duration,
) -> Vec<Ended> {
    let ports = free_loopback_ports(processes).expect("loopback ports");
    let hosts: Vec<String> = ports.iter().map(|p| format!("127.0.0.1:{p}")).collect();
    let hosts = hosts.join(",");
    let mut children: Vec<Child> = (0..processes)
        .map(|p| {
            Command::new(BINARY)
                .args([
                    "-n",
                    &processes.to_string(),
                    "-p",
                    &p.to_string(),
                    "--hosts",
                    &hosts,
                ])
                .args(args)
                .args(extra(p))
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .expect("start attention-ring")
        })
        .collect();
    let start = Instant::now();
    loop {
        let mut running = 0;
        for c in &mut children {
            running += usize::from(c.try_wait().expect("wait").is_none());
        }
        if running == 0 {
            break;
        }
        if start.elapsed() > limit {
            for c in &mut children {
                let _ = c.kill();
            }
            panic!("{running} of {processes} processes still running after {limit:?}: a hang");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    children
        .into_iter()
        .map(|c| {
            let out = c.wait_with_output().expect("output");
            Ended {
                code: out.status.code(),
                stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
                stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
            }
        })
        .collect()
}

/// Reads `worker-W.bin`: (output, lse, decoded outputs).
fn read(dir: &Path, w: usize) -> (DMatrix<f32>, DMatrix<f32>, Vec<DMatrix<f32>>) {
    let bytes = std::fs::read(dir.join(format!("worker-{w}.bin"))).expect("worker file");
    let word = |i: usize| u64::from_le_bytes(bytes[8 * i..8 * i + 8].try_into().unwrap()) as usize;
    let (rows, out_cols, lse_cols, steps) = (word(0), word(1), word(2), word(3));
    let mut at = 4;
    let mut matrix = |r: usize, c: usize| {
        let m = DMatrix::from_fn(r, c, |i, j| {
            let k = at + i * c + j;
            f64::from_le_bytes(bytes[8 * k..8 * k + 8].try_into().unwrap()) as f32
        });
        at += r * c;
        m
    };
    let out = matrix(rows, out_cols);
    let lse = matrix(rows, lse_cols);
    let decoded = (0..steps).map(|_| matrix(1, out_cols)).collect();
    (out, lse, decoded)
}

fn bits(m: &DMatrix<f32>) -> Vec<u32> {
    m.iter().map(|x| x.to_bits()).collect()
}

#[test]
fn two_and_three_processes_match_the_single_process_call_and_repeat_bit_for_bit() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    // Blocks of 800–1200 rows × (2 + 2)·32 columns: 2 or 3 pieces each across processes.
    let (n, d, seed) = (2400, 32, 1);
    let layout = HeadLayout::new(4, 2);
    let all: Vec<usize> = (0..n).collect();
    let [q, k, v] = synthetic_qkv::<f32>(seed, &all, &layout, d);
    let causal = AttentionOptions::new().with_causal(Causal::TopLeft);
    let (want, want_lse) = multi_head_attention_with_lse(&q, &k, &v, &layout, &causal).unwrap();
    for processes in [2, 3] {
        let dirs: Vec<_> = (0..2).map(|_| tempfile::tempdir().unwrap()).collect();
        for dir in &dirs {
            let out = dir.path().to_str().unwrap().to_owned();
            let ended = run(
                processes,
                &[
                    "--tokens",
                    "2400",
                    "--heads",
                    "4",
                    "--kv-heads",
                    "2",
                    "--d",
                    "32",
                    "--causal",
                ],
                |_| {
                    ["--check", "--decode", "3", "--timeout", "20", "--out", &out]
                        .map(String::from)
                        .to_vec()
                },
                Duration::from_secs(60),
            );
            for (p, e) in ended.iter().enumerate() {
                assert_eq!(e.code, Some(0), "process {p}:\n{}\n{}", e.stdout, e.stderr);
                assert!(e.stdout.contains("of the bound (ok)"), "{}", e.stdout);
            }
        }
        let plan = Plan::zigzag(n, processes).unwrap();
        for w in 0..processes {
            let (out, lse, decoded) = read(dirs[0].path(), w);
            let rows: Vec<usize> = plan.rows(w).into_iter().flatten().collect();
            let mine = (want.select_rows(&rows), want_lse.select_rows(&rows));
            let ratio = deviation(
                processes,
                &layout,
                (&q, &k, &v),
                (&out, &lse),
                (&mine.0, &mine.1),
            );
            assert!(
                ratio <= 1.0,
                "{processes} processes, worker {w}: {ratio} of the bound"
            );
            let (out2, lse2, decoded2) = read(dirs[1].path(), w);
            assert_eq!(
                (bits(&out), bits(&lse)),
                (bits(&out2), bits(&lse2)),
                "worker {w}: run to run"
            );
            assert_eq!(decoded.len(), 3);
            let (_, _, decoded0) = read(dirs[0].path(), 0);
            for (s, m) in decoded.iter().enumerate() {
                assert_eq!(bits(m), bits(&decoded2[s]), "decoded step {s}: run to run");
                assert_eq!(
                    bits(m),
                    bits(&decoded0[s]),
                    "decoded step {s}: worker to worker"
                );
            }
        }
    }
}

#[test]
fn a_worker_that_exits_ends_the_run_on_the_others() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let start = Instant::now();
    let ended = run(
        3,
        &[
            "--tokens",
            "64",
            "--heads",
            "1",
            "--d",
            "8",
            "--exit-worker",
            "1",
            "--timeout",
            "10",
        ],
        |_| Vec::new(),
        Duration::from_secs(40),
    );
    assert_eq!(ended[1].code, Some(4), "{}", ended[1].stderr);
    for p in [0, 2] {
        assert_eq!(ended[p].code, Some(3), "process {p}: {}", ended[p].stderr);
        let e = &ended[p].stderr;
        assert!(
            e.contains("lost a peer") || e.contains("no progress"),
            "process {p} says: {e}"
        );
    }
    assert!(start.elapsed() < Duration::from_secs(30));
}

#[test]
fn a_peer_that_never_comes_is_a_timeout() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    // Process 0 of a run of 2, alone: it waits for process 1 to connect.
    let ports = free_loopback_ports(2).unwrap();
    let hosts = format!("127.0.0.1:{},127.0.0.1:{}", ports[0], ports[1]);
    let start = Instant::now();
    let out = Command::new(BINARY)
        .args([
            "-n",
            "2",
            "-p",
            "0",
            "--hosts",
            &hosts,
            "--timeout",
            "2",
            "--tokens",
            "8",
        ])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "{stderr}");
    assert!(
        stderr.contains("no progress") && stderr.contains("connections"),
        "{stderr}"
    );
    assert!(start.elapsed() < Duration::from_secs(20));
}

#[test]
fn processes_given_different_problems_fail_before_any_work() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let ended = run(
        2,
        &[
            "--tokens",
            "64",
            "--d",
            "8",
            "--kv-heads",
            "1",
            "--timeout",
            "20",
        ],
        |p| {
            vec![
                "--heads".into(),
                if p == 0 { "2".into() } else { "4".into() },
            ]
        },
        Duration::from_secs(40),
    );
    for (p, e) in ended.iter().enumerate() {
        assert_eq!(e.code, Some(3), "process {p}: {}", e.stderr);
        assert!(
            e.stderr.contains("workers disagree on heads_q"),
            "{}",
            e.stderr
        );
        assert!(!e.stdout.contains("rows"), "no work was done: {}", e.stdout);
    }
}

#[test]
fn a_process_index_out_of_range_is_a_usage_error() {
    let out = Command::new(BINARY)
        .args(["-n", "2", "-p", "2"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("-p") && stderr.contains("below the number of processes"),
        "{stderr}"
    );
}
