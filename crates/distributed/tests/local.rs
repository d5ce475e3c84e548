//! Ring attention and sharded decoding with the workers as threads of this process
//! (timely's in-process exchange), against the single-process call of `attention_core`.
//!
//! - every worker count 1–4, sequence lengths that do and do not divide into 2P chunks
//!   (and shorter than 2P, and empty), MHA/GQA/MQA layouts, causal or not, f32 and f64:
//!   within `ring_deviation_bound` of `multi_head_attention_with_lse` (output and lse);
//! - repeated runs give the same bits;
//! - the zig-zag plan balances causal work, and each worker computes exactly its share;
//! - decoding: every worker gets the same bits, within the bound of the single call, the
//!   shards stay balanced, a bad token is rejected by every worker and stored nowhere;
//! - bad inputs and mismatched workers are typed errors on every worker, before any work.

use attention_core::{
    AttentionError, AttentionOptions, Causal, HeadLayout, Operand, multi_head_attention_with_lse,
};
use attention_distributed::verify::{deviation, synthetic_qkv};
use attention_distributed::{Cluster, DistributedError, Plan, RingOptions, RingOutput, Wire};
use nalgebra::DMatrix;

/// An output and its lse.
type Pair<T> = (DMatrix<T>, DMatrix<T>);

#[derive(Clone, Copy, Debug)]
struct Case {
    workers: usize,
    n: usize,
    heads: (usize, usize),
    d: usize,
    causal: bool,
    softcap: Option<f64>,
    seed: u64,
}

impl Case {
    fn layout(&self) -> HeadLayout<'static> {
        HeadLayout::new(self.heads.0, self.heads.1)
    }

    fn options<T: Wire>(&self) -> RingOptions<T> {
        let mut o = RingOptions::new().with_causal(self.causal);
        if let Some(c) = self.softcap {
            o = o.with_softcap(T::from_f64_rounded(c));
        }
        o
    }

    /// Each worker's rows and ring result, in worker order.
    fn ring<T: Wire>(&self) -> Vec<(Vec<usize>, RingOutput<T>)> {
        let c = *self;
        Cluster::local(c.workers)
            .unwrap()
            .run(move |peer| {
                let plan = Plan::zigzag(c.n, peer.workers())?;
                let rows: Vec<usize> = plan.rows(peer.index()).into_iter().flatten().collect();
                let [q, k, v] = synthetic_qkv::<T>(c.seed, &rows, &c.layout(), c.d);
                let out = peer.ring_attention(&plan, &q, &k, &v, &c.layout(), &c.options())?;
                Ok((rows, out))
            })
            .unwrap_or_else(|e| panic!("{self:?}: {e}"))
    }

    /// The whole problem's inputs and the single-process result.
    fn single<T: Wire>(&self) -> ([DMatrix<T>; 3], Pair<T>) {
        let all: Vec<usize> = (0..self.n).collect();
        let qkv = synthetic_qkv::<T>(self.seed, &all, &self.layout(), self.d);
        let mut o = AttentionOptions::new();
        if self.causal {
            o = o.with_causal(Causal::TopLeft);
        }
        if let Some(c) = self.softcap {
            o = o.with_softcap(T::from_f64_rounded(c));
        }
        let want = multi_head_attention_with_lse(&qkv[0], &qkv[1], &qkv[2], &self.layout(), &o)
            .unwrap_or_else(|e| panic!("{self:?}: single: {e}"));
        (qkv, want)
    }

    fn check<T: Wire>(&self) {
        let parts = self.ring::<T>();
        let ([q, k, v], (want, want_lse)) = self.single::<T>();
        let mut seen = vec![false; self.n];
        for (w, (rows, part)) in parts.iter().enumerate() {
            for &r in rows {
                assert!(!seen[r], "{self:?}: row {r} on two workers");
                seen[r] = true;
            }
            let mine = (want.select_rows(rows), want_lse.select_rows(rows));
            let got = (&part.output, &part.lse);
            let ratio = deviation(
                self.workers,
                &self.layout(),
                (&q, &k, &v),
                got,
                (&mine.0, &mine.1),
            );
            assert!(ratio <= 1.0, "{self:?} worker {w}: {ratio} of the bound");
        }
        assert!(seen.iter().all(|&s| s), "{self:?}: a row on no worker");
    }
}

#[test]
fn ring_matches_the_single_process_call() {
    for workers in 1..=4 {
        for n in [0, 1, 5, 8, 67, 200] {
            for (i, heads) in [(1, 1), (4, 2), (3, 1)].into_iter().enumerate() {
                for causal in [false, true] {
                    let case = Case {
                        workers,
                        n,
                        heads,
                        d: [8, 16, 5][i],
                        causal,
                        softcap: (i == 1).then_some(4.0),
                        seed: (workers * 1000 + n) as u64,
                    };
                    case.check::<f32>();
                    case.check::<f64>();
                }
            }
        }
    }
}

#[test]
fn repeated_runs_give_the_same_bits() {
    let case = Case {
        workers: 3,
        n: 200,
        heads: (4, 2),
        d: 16,
        causal: true,
        softcap: None,
        seed: 9,
    };
    let bits = |parts: Vec<(Vec<usize>, RingOutput<f32>)>| -> Vec<u32> {
        parts
            .iter()
            .flat_map(|(_, p)| p.output.iter().chain(p.lse.iter()).map(|x| x.to_bits()))
            .collect()
    };
    let first = bits(case.ring());
    for _ in 0..3 {
        assert_eq!(bits(case.ring()), first);
    }
}

#[test]
fn causal_work_is_balanced_and_each_worker_does_its_share() {
    for workers in [2, 3, 4] {
        for n in [4096, 1001] {
            let plan = Plan::zigzag(n, workers).unwrap();
            let pairs: Vec<u64> = (0..workers).map(|w| plan.causal_pairs(w)).collect();
            assert_eq!(pairs.iter().sum::<u64>(), (n * (n + 1) / 2) as u64);
            let (lo, hi) = (*pairs.iter().min().unwrap(), *pairs.iter().max().unwrap());
            // Chunks differ by at most one row, so shares differ by O(n) of n²/(2P).
            let slack = if n % (2 * workers) == 0 { 1.0 } else { 1.01 };
            assert!(
                hi as f64 <= lo as f64 * slack,
                "P={workers} n={n}: {pairs:?}"
            );
            // What zig-zag avoids: contiguous blocks of n/P rows give the last worker
            // (2P − 1)/1 times the first one's pairs.
            let block = n / workers;
            let contiguous = |w: usize| {
                let (s, l) = ((w * block) as u64, block as u64);
                l * s + l * (l + 1) / 2
            };
            let skew = contiguous(workers - 1) as f64 / contiguous(0) as f64;
            assert!(skew > (2 * workers - 1) as f64 * 0.99, "{skew}");
        }
    }
    // The ring computes exactly the plan's pairs on each worker, causal or not.
    for causal in [true, false] {
        let case = Case {
            workers: 3,
            n: 1001,
            heads: (1, 1),
            d: 4,
            causal,
            softcap: None,
            seed: 3,
        };
        let plan = Plan::zigzag(case.n, case.workers).unwrap();
        for (w, (_, part)) in case.ring::<f64>().iter().enumerate() {
            let want = if causal {
                plan.causal_pairs(w)
            } else {
                plan.pairs(w)
            };
            assert_eq!(part.stats.pairs, want, "worker {w}, causal {causal}");
        }
    }
}

/// Decodes `steps` tokens after a prefill of `n0` zig-zag-sharded tokens; each worker's
/// outputs and final shard lengths.
fn decode<T: Wire>(
    workers: usize,
    n0: usize,
    steps: usize,
    bad_step: Option<usize>,
) -> Vec<(Vec<Pair<T>>, Vec<usize>)> {
    let layout = || HeadLayout::new(4, 2);
    Cluster::local(workers)
        .unwrap()
        .run(move |peer| {
            let plan = Plan::zigzag(n0, peer.workers())?;
            let rows: Vec<usize> = plan.rows(peer.index()).into_iter().flatten().collect();
            let [_, k, v] = synthetic_qkv::<T>(5, &rows, &layout(), 8);
            let mut decoder = peer.decoder(&k, &v, &layout(), &RingOptions::new())?;
            let mut outs = Vec::new();
            for t in n0..n0 + steps {
                if bad_step == Some(t) {
                    let [q, mut k, v] = synthetic_qkv::<T>(5, &[t], &layout(), 8);
                    k[(0, 3)] = T::from_f64_rounded(f64::NAN);
                    let before = decoder.shard_lengths().to_vec();
                    let err = decoder.step(&q, &k, &v).unwrap_err();
                    assert!(
                        matches!(
                            err,
                            DistributedError::Attention(AttentionError::NonFinite {
                                operand: Operand::NewKeys,
                                row: 0,
                                column: 3,
                                ..
                            })
                        ),
                        "{err}"
                    );
                    assert_eq!(decoder.shard_lengths(), before, "nothing stored");
                }
                let [q, k, v] = synthetic_qkv::<T>(5, &[t], &layout(), 8);
                outs.push(decoder.step(&q, &k, &v)?);
            }
            let lengths = decoder.shard_lengths().to_vec();
            decoder.finish()?;
            Ok((outs, lengths))
        })
        .unwrap()
}

#[test]
fn sharded_decoding_matches_the_single_process_call() {
    let layout = HeadLayout::new(4, 2);
    for workers in 1..=3 {
        for n0 in [0, 5, 40] {
            let steps = 7;
            let results = decode::<f64>(workers, n0, steps, None);
            for (w, (outs, lengths)) in results.iter().enumerate() {
                assert_eq!(lengths.iter().sum::<usize>(), n0 + steps);
                let (lo, hi) = (lengths.iter().min().unwrap(), lengths.iter().max().unwrap());
                assert!(hi - lo <= 1, "shards {lengths:?}");
                for (s, out) in outs.iter().enumerate() {
                    let bits = |(o, l): &Pair<f64>| {
                        o.iter()
                            .chain(l.iter())
                            .map(|x| x.to_bits())
                            .collect::<Vec<_>>()
                    };
                    assert_eq!(bits(out), bits(&results[0].0[s]), "worker {w} step {s}");
                    let t = n0 + s;
                    let all: Vec<usize> = (0..=t).collect();
                    let [_, k, v] = synthetic_qkv::<f64>(5, &all, &layout, 8);
                    let [q, _, _] = synthetic_qkv::<f64>(5, &[t], &layout, 8);
                    let (want, want_lse) = multi_head_attention_with_lse(
                        &q,
                        &k,
                        &v,
                        &layout,
                        &AttentionOptions::new(),
                    )
                    .unwrap();
                    let got = (&out.0, &out.1);
                    let ratio = deviation(workers, &layout, (&q, &k, &v), got, (&want, &want_lse));
                    assert!(ratio <= 1.0, "P={workers} n0={n0} step {s}: {ratio}");
                }
            }
        }
    }
}

#[test]
fn a_bad_token_is_rejected_by_every_worker_and_stored_nowhere() {
    let clean = decode::<f32>(3, 10, 4, None);
    let with_bad = decode::<f32>(3, 10, 4, Some(12));
    for (a, b) in clean.iter().zip(&with_bad) {
        assert_eq!(a.1, b.1, "shard lengths");
        for (x, y) in a.0.iter().zip(&b.0) {
            let bits = |m: &DMatrix<f32>| m.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
            assert_eq!((bits(&x.0), bits(&x.1)), (bits(&y.0), bits(&y.1)));
        }
    }
}

/// Runs a two-worker ring where worker 1's call is made by `odd` instead; returns each
/// worker's result.
fn two_workers(
    odd: fn(usize) -> (usize, usize, usize, bool),
) -> Vec<Result<RingOutput<f64>, DistributedError>> {
    Cluster::local(2)
        .unwrap()
        .run(move |peer| {
            let me = peer.index();
            // (sequence length, query heads, rows given, NaN in K)
            let (n, heads_q, rows_given, nan) = if me == 1 { odd(me) } else { (16, 2, 8, false) };
            let plan = Plan::zigzag(n, 2)?;
            let layout = HeadLayout::new(heads_q, 1);
            let rows: Vec<usize> = (0..rows_given).collect();
            let [q, mut k, v] = synthetic_qkv::<f64>(1, &rows, &layout, 4);
            if nan && rows_given > 0 {
                k[(2, 1)] = f64::INFINITY;
            }
            Ok(peer.ring_attention(&plan, &q, &k, &v, &layout, &RingOptions::new()))
        })
        .unwrap()
}

#[test]
fn mismatched_workers_fail_before_any_work() {
    let results = two_workers(|_| (16, 4, 8, false));
    for (w, r) in results.iter().enumerate() {
        match r {
            Err(DistributedError::Mismatch {
                field,
                other_worker,
                ours,
                theirs,
            }) => {
                assert_eq!(field, "heads_q");
                assert_eq!(*other_worker, 1 - w);
                assert_ne!(ours, theirs);
            }
            other => panic!("worker {w}: {other:?}"),
        }
    }
    let results = two_workers(|_| (18, 2, 9, false));
    let err = results[0].as_ref().unwrap_err();
    assert!(
        matches!(err, DistributedError::Mismatch { field, .. } if field == "sequence length"),
        "{err}"
    );
}

#[test]
fn a_bad_input_fails_its_worker_and_every_other() {
    let results = two_workers(|_| (16, 2, 8, true));
    let own = results[1].as_ref().unwrap_err();
    assert!(
        matches!(
            own,
            DistributedError::Attention(AttentionError::NonFinite {
                operand: Operand::Key,
                row: 2,
                column: 1,
                ..
            })
        ),
        "{own}"
    );
    let other = results[0].as_ref().unwrap_err();
    assert!(
        matches!(other, DistributedError::PeerFailed { worker: 1, message } if message.contains("key")),
        "{other}"
    );

    // Rows that are not the plan's: a shape error there, the other worker told.
    let results = two_workers(|_| (16, 2, 7, false));
    let own = results[1].as_ref().unwrap_err();
    assert!(
        matches!(
            own,
            DistributedError::Shape {
                operand: "query",
                ..
            }
        ),
        "{own}"
    );
    assert!(matches!(
        results[0],
        Err(DistributedError::PeerFailed { worker: 1, .. })
    ));

    // A plan for another worker count.
    let err = Cluster::local(2)
        .unwrap()
        .run(|peer| {
            let plan = Plan::zigzag(8, 3)?;
            let q = DMatrix::<f64>::zeros(0, 4);
            peer.ring_attention(
                &plan,
                &q,
                &q,
                &q,
                &HeadLayout::new(1, 1),
                &RingOptions::new(),
            )
        })
        .unwrap_err();
    assert!(
        matches!(&err, DistributedError::Config { setting, .. } if setting == "plan"),
        "{err}"
    );
}

#[test]
fn cluster_flags_are_checked() {
    let parse = |a: &[&str]| Cluster::from_args(a.iter().map(|s| s.to_string()));
    let (c, rest) = parse(&["-n", "3", "-p", "2", "--hosts", "a:1,b:2,c:3", "--x"]).unwrap();
    assert_eq!(
        (c.workers(), c.process(), rest),
        (3, 2, vec!["--x".to_owned()])
    );
    for (args, flag) in [
        (&["-n", "2", "-p", "2"][..], "-p"),
        (&["-n", "3", "--hosts", "a:1,b:2"], "hosts"),
        (&["-n", "2", "--hosts", "a:1,b"], "hosts"),
        (&["-w", "0"], "-w"),
        (&["-n", "0"], "-n"),
        (&["-n", "two"], "-n"),
        (&["--timeout", "-1"], "--timeout"),
        (&["-p"], "-p"),
    ] {
        match parse(args) {
            Err(DistributedError::Config { setting, .. }) => assert_eq!(setting, flag, "{args:?}"),
            other => panic!("{args:?}: {other:?}"),
        }
    }
}
