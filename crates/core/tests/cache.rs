//! The paged KV cache (`KvCache`) and attention through it (`cached_attention`):
//!
//! - appending a history in random chunk sizes (empty chunks, single tokens, chunks across
//!   the row-path/block-kernel threshold and the 64-key tile edge; pages of 1–8 and 64
//!   tokens; GQA/MQA; ALiBi per head and softcap) and attending with each chunk's queries
//!   gives the same bits as `multi_head_attention` over the whole history, causal
//!   bottom-right (the same kernel on the same numbers: gather + call);
//! - sliding window `w`: after each chunk, the kept tokens are at least the last
//!   `w − 1 + n`, and attention equals windowed attention `(w − 1, 0)` over the whole
//!   history: bit for bit against `multi_head_attention` over the kept suffix, and within
//!   the reference bound (`tests/common`) against the reference oracle over the whole
//!   history;
//! - a model-based property: several sequences interleaved, with truncation (rollback),
//!   removal and re-appending, each checked against its own history; the pool is reused
//!   (memory after each step is max(memory before, pages in use));
//! - a rejected append (wrong shape, NaN/∞ in any new row, unknown id) or truncate leaves
//!   every bit of the cache unchanged; every error of the API, typed;
//! - memory: 8 KV heads × d 128, f32, one token at a time to 65536 tokens: at every length
//!   of ≥ 10 pages `memory_bytes ≤ 1.1 × bytes of K and V`, and the numbers at 40000 and
//!   65536; remove + re-append of the same length does not grow memory.

mod common;

use attention_core::{
    AttentionError, AttentionOptions, Axis, Causal, Element, HeadLayout, KvCache, Operand, SeqId,
    cached_attention, cached_attention_with_lse, multi_head_attention,
    multi_head_attention_with_lse,
};
use common::{assert_output_close, extra, magnitude, narrow, normal_matrix, score_error, widen};
use nalgebra::{DMatrix, Dyn};
use proptest::prelude::*;

/// A cache configuration and the options of its attention calls.
#[derive(Clone, Debug)]
struct Setup {
    heads_kv: usize,
    group: usize,
    d_k: usize,
    d_v: usize,
    page_size: usize,
    window: Option<usize>,
    alibi: bool,
    softcap: Option<f64>,
}

impl Setup {
    fn heads_q(&self) -> usize {
        self.heads_kv * self.group
    }

    fn cache<T: Element>(&self) -> KvCache<T> {
        let cache = KvCache::new(self.heads_kv, self.d_k, self.d_v)
            .unwrap()
            .with_page_size(self.page_size)
            .unwrap();
        match self.window {
            Some(w) => cache.with_window(w).unwrap(),
            None => cache,
        }
    }

    fn layout(&self) -> HeadLayout<'static> {
        HeadLayout::new(self.heads_q(), self.heads_kv)
    }

    fn slopes(&self) -> Vec<f64> {
        (0..self.heads_q())
            .map(|h| 0.05 * (h as f64 + 1.0))
            .collect()
    }

    /// The options of a cached call (no causal, no window: the cache adds them).
    fn options<'a, T: Element>(&self, slopes: &'a [T]) -> AttentionOptions<'a, T> {
        let mut o = AttentionOptions::new();
        if self.alibi {
            o = o.with_alibi_slopes(slopes);
        }
        if let Some(c) = self.softcap {
            o = o.with_softcap(T::from_f64_rounded(c));
        }
        o
    }

    /// The options of the equivalent call over contiguous keys.
    fn full_options<'a, T: Element>(&self, slopes: &'a [T]) -> AttentionOptions<'a, T> {
        let o = self.options(slopes).with_causal(Causal::BottomRight);
        match self.window {
            Some(w) => o.with_window(w - 1, 0),
            None => o,
        }
    }
}

fn setup(window: impl Strategy<Value = Option<usize>>) -> impl Strategy<Value = Setup> {
    (
        1..=3usize,
        1..=3usize,
        1..=6usize,
        1..=6usize,
        prop_oneof![4 => 1..=8usize, 1 => Just(64usize), 1 => Just(100usize)],
        window,
        any::<bool>(),
        prop::option::weighted(0.3, prop::sample::select(vec![1.0, 5.0, 30.0])),
    )
        .prop_map(
            |(heads_kv, group, d_k, d_v, page_size, window, alibi, softcap)| Setup {
                heads_kv,
                group,
                d_k,
                d_v,
                page_size,
                window,
                alibi,
                softcap,
            },
        )
}

/// A history appended in `chunks`, with every token's query, key and value (f64 values
/// that the tests round to `T`).
#[derive(Clone, Debug)]
struct Chunked {
    setup: Setup,
    chunks: Vec<usize>,
    q: DMatrix<f64>,
    k: DMatrix<f64>,
    v: DMatrix<f64>,
}

fn chunked(
    window: impl Strategy<Value = Option<usize>>,
    chunk: impl Strategy<Value = usize>,
    max_chunks: usize,
) -> impl Strategy<Value = Chunked> {
    (
        setup(window),
        prop::collection::vec(chunk, 1..=max_chunks),
        magnitude(),
    )
        .prop_flat_map(|(setup, chunks, sk)| {
            let t: usize = chunks.iter().sum();
            let (hq, hkv) = (setup.heads_q(), setup.heads_kv);
            (
                Just(setup.clone()),
                Just(chunks),
                normal_matrix(t, hq * setup.d_k, 1.0),
                normal_matrix(t, hkv * setup.d_k, sk),
                normal_matrix(t, hkv * setup.d_v, 1.0),
            )
        })
        .prop_map(|(setup, chunks, q, k, v)| Chunked {
            setup,
            chunks,
            q,
            k,
            v,
        })
}

/// Chunk sizes: mostly decoding-sized (0–9: the row path, empty appends), sometimes a
/// prefill chunk across the 64-key tile edge.
fn chunk_size() -> impl Strategy<Value = usize> {
    prop_oneof![4 => 0..=9usize, 1 => 10..=70usize]
}

fn rows<T: Element>(m: &DMatrix<T>, start: usize, n: usize) -> DMatrix<T> {
    m.rows(start, n).into_owned()
}

/// Appends `c.chunks` one after the other; after each, checks what the cache holds and
/// that `cached_attention` with the chunk's queries gives the bits of
/// `multi_head_attention` over the kept suffix of the history (the whole history without
/// a window), and, with `reference`, that it is within the bound of the reference oracle
/// over the whole history.
fn check_chunked<T: Element>(c: &Chunked, reference: bool) {
    let s = &c.setup;
    let (q, k, v) = (narrow::<T>(&c.q), narrow::<T>(&c.k), narrow::<T>(&c.v));
    let slopes: Vec<T> = s.slopes().into_iter().map(T::from_f64_rounded).collect();
    let layout = s.layout();
    let mut cache = s.cache::<T>();
    let seq = cache.add_sequence();
    let mut len = 0;
    for (step, &n) in c.chunks.iter().enumerate() {
        cache.append(seq, k.rows(len, n), v.rows(len, n)).unwrap();
        len += n;
        let label = format!("step {step} (chunk {n}, history {len})");
        let kept = cache.kept(seq).unwrap();
        assert_eq!(cache.len(seq).unwrap(), len, "{label}");
        assert_eq!(kept.end, len, "{label}");
        assert_eq!(
            kept.start % s.page_size,
            0,
            "{label}: whole pages are evicted"
        );
        match s.window {
            None => assert_eq!(kept.start, 0, "{label}"),
            Some(w) if n > 0 => {
                // Keeps the last w − 1 + n (the chunk's queries need them) and evicts
                // every page that lies wholly before them.
                let need = len.saturating_sub(w - 1 + n);
                assert!(kept.start <= need, "{label}: evicted a needed token");
                assert!(
                    need - kept.start < s.page_size,
                    "{label}: kept a stale page"
                );
            }
            Some(_) => {}
        }
        let (gk, gv) = cache.gather(seq).unwrap();
        assert_eq!(gk, k.rows(kept.start, kept.len()), "{label}: kept keys");
        assert_eq!(gv, v.rows(kept.start, kept.len()), "{label}: kept values");
        let pages = kept.len().div_ceil(s.page_size);
        let page_bytes = s.page_size * s.heads_kv * (s.d_k + s.d_v) * size_of::<T>();
        assert_eq!(
            cache.used_bytes(),
            pages * page_bytes,
            "{label}: pages used"
        );

        let qn = rows(&q, len - n, n);
        let options = s.options(&slopes);
        let (out, lse) = cached_attention_with_lse(&qn, &cache, seq, &layout, &options).unwrap();
        assert_eq!(
            out,
            cached_attention(&qn, &cache, seq, &layout, &options).unwrap(),
            "{label}: _with_lse"
        );
        let full = s.full_options(&slopes);
        let kept_values = token_major(v.rows(kept.start, kept.len()));
        let (want, want_lse) = multi_head_attention_with_lse(
            &qn,
            k.rows(kept.start, kept.len()),
            by_rows(&kept_values),
            &layout,
            &full,
        )
        .unwrap();
        assert_eq!(out, want, "{label}: output bits");
        assert_eq!(lse, want_lse, "{label}: lse bits");
        // V stored by columns sums the weighted values in another order (within the
        // reference bound, checked below); the lse does not involve V.
        let (_, lse_by_columns) = multi_head_attention_with_lse(
            &qn,
            k.rows(kept.start, kept.len()),
            v.rows(kept.start, kept.len()),
            &layout,
            &full,
        )
        .unwrap();
        assert_eq!(lse, lse_by_columns, "{label}: lse bits, V by columns");
        if s.window.is_none() {
            // Without a window that is literally the call over the whole history.
            let values = token_major(v.rows(0, len));
            assert_eq!(
                out,
                multi_head_attention(&qn, k.rows(0, len), by_rows(&values), &layout, &full)
                    .unwrap()
            );
        }
        if reference {
            assert_matches_reference(
                &out,
                &widen(&qn),
                &c.k.rows(0, len).into_owned(),
                &c.v.rows(0, len).into_owned(),
                s,
                &label,
                T::EPSILON.to_f64(),
            );
        }
    }
}

/// `v` stored token by token, as the cache stores values: `vᵀ`, whose columns are `v`'s
/// rows; [`by_rows`] views it as `v` again.
fn token_major<T: Element>(v: nalgebra::DMatrixView<'_, T>) -> DMatrix<T> {
    v.transpose()
}

/// The `n × d` matrix whose row-major storage is `vt` (`d × n`, from [`token_major`]): a
/// call given it reads values the way cached calls do, so the two give the same bits.
fn by_rows<T: Element>(vt: &DMatrix<T>) -> nalgebra::DMatrixView<'_, T, Dyn, Dyn> {
    nalgebra::DMatrixView::from_slice_with_strides(
        vt.as_slice(),
        vt.ncols(),
        vt.nrows(),
        vt.nrows(),
        1,
    )
}

/// `got` (n_q × h_q·d_v) against the reference's multi-head attention over the whole
/// history (`k`, `v` already rounded to T), causal bottom-right, with the setup's window,
/// ALiBi and softcap, within the bound of `tests/common` head by head.
fn assert_matches_reference<T: Element>(
    got: &DMatrix<T>,
    q: &DMatrix<f64>,
    k: &DMatrix<f64>,
    v: &DMatrix<f64>,
    s: &Setup,
    label: &str,
    eps: f64,
) {
    let (k, v) = (widen(&narrow::<T>(k)), widen(&narrow::<T>(v)));
    let slopes: Vec<f64> = s
        .slopes()
        .into_iter()
        .map(|x| T::from_f64_rounded(x).to_f64())
        .collect();
    let options = attention_reference::HeadOptions {
        base: attention_reference::Options {
            causal: Some(attention_reference::Causal::BottomRight),
            window: s.window.map(|w| (w - 1, 0)),
            softcap: s.softcap,
            ..Default::default()
        },
        alibi_slopes: s.alibi.then(|| slopes.clone()),
        ..Default::default()
    };
    let layout = attention_reference::Layout {
        heads_q: s.heads_q(),
        heads_kv: s.heads_kv,
        seqlens_q: vec![q.nrows()],
        seqlens_kv: vec![k.nrows()],
    };
    let want = attention_reference::multi_head_attention(q, &k, &v, &layout, &options).output;
    let got = widen(got);
    let (n_q, n_kv) = (q.nrows(), k.nrows());
    for (h, &slope) in slopes.iter().enumerate() {
        let kh = h / s.group;
        let qh = q.columns(h * s.d_k, s.d_k).into_owned();
        let kh_m = k.columns(kh * s.d_k, s.d_k).into_owned();
        let vh = v.columns(kh * s.d_v, s.d_v).into_owned();
        let alibi = s.alibi.then_some(slope);
        let b = extra((n_q, n_kv), false, None, s.softcap, alibi);
        let delta = score_error(&qh, &kh_m, 1.0 / (s.d_k as f64).sqrt(), &b, eps);
        assert_output_close(
            &got.columns(h * s.d_v, s.d_v).into_owned(),
            &want.columns(h * s.d_v, s.d_v).into_owned(),
            &vh,
            &delta,
            eps,
            &format!("{label}, head {h}"),
        );
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(96))]

    #[test]
    fn chunked_appends_equal_full_attention_f32(c in chunked(Just(None), chunk_size(), 8)) {
        check_chunked::<f32>(&c, false);
    }

    #[test]
    fn chunked_appends_equal_full_attention_f64(c in chunked(Just(None), chunk_size(), 8)) {
        check_chunked::<f64>(&c, false);
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn sliding_window_equals_windowed_attention_f32(
        c in chunked((1..=12usize).prop_map(Some), prop_oneof![3 => 0..=4usize, 1 => 5..=20usize], 10)
    ) {
        check_chunked::<f32>(&c, true);
    }

    #[test]
    fn sliding_window_equals_windowed_attention_f64(
        c in chunked((1..=12usize).prop_map(Some), prop_oneof![3 => 0..=4usize, 1 => 5..=20usize], 10)
    ) {
        check_chunked::<f64>(&c, true);
    }
}

/// A fixed chunked prefill through a window of 5, pages of 2: the numbers worked out.
#[test]
fn chunked_prefill_through_a_window() {
    let s = Setup {
        heads_kv: 2,
        group: 2,
        d_k: 3,
        d_v: 2,
        page_size: 2,
        window: Some(5),
        alibi: true,
        softcap: None,
    };
    let t = 40;
    let c = Chunked {
        setup: s,
        chunks: vec![7, 1, 1, 12, 3, 1, 15],
        q: attention_testdata::gaussian(t, 12, 1.0, 1),
        k: attention_testdata::gaussian(t, 6, 2.0, 2),
        v: attention_testdata::gaussian(t, 4, 1.0, 3),
    };
    check_chunked::<f32>(&c, true);
    check_chunked::<f64>(&c, true);
    // After the last chunk of 15 (history 40) the cache keeps positions ≥ 40 − 19 = 21,
    // from the page that holds 21: 20..40.
    let mut cache = c.setup.cache::<f64>();
    let seq = cache.add_sequence();
    let mut len = 0;
    for &n in &c.chunks {
        cache
            .append(seq, c.k.rows(len, n), c.v.rows(len, n))
            .unwrap();
        len += n;
    }
    assert_eq!(cache.kept(seq).unwrap(), 20..40);
}

/// One step of the model-based property.
#[derive(Clone, Debug)]
enum Op {
    /// Append `n` tokens to sequence `seq` (an index into the live sequences).
    Append { seq: usize, n: usize },
    /// Roll sequence `seq` back by `back` tokens (clamped to its length).
    Truncate { seq: usize, back: usize },
    /// Remove sequence `seq` and add a fresh one in its place.
    Replace { seq: usize },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (0..3usize, prop_oneof![3 => 0..=4usize, 1 => 5..=24usize]).prop_map(|(seq, n)| Op::Append { seq, n }),
        2 => (0..3usize, 0..=8usize).prop_map(|(seq, back)| Op::Truncate { seq, back }),
        1 => (0..3usize).prop_map(|seq| Op::Replace { seq }),
    ]
}

/// Three sequences under random appends, rollbacks and replacements, each checked
/// against a model of its history (rows of one pool of tokens): kept tokens, attention of
/// the newest chunk (bits of the call over the kept suffix), errors of truncations into
/// evicted tokens with the cache unchanged, and page reuse.
fn check_model<T: Element>(
    s: &Setup,
    ops: &[Op],
    pool: (&DMatrix<f64>, &DMatrix<f64>, &DMatrix<f64>),
) {
    let (q, k, v) = (
        narrow::<T>(pool.0),
        narrow::<T>(pool.1),
        narrow::<T>(pool.2),
    );
    let slopes: Vec<T> = s.slopes().into_iter().map(T::from_f64_rounded).collect();
    let layout = s.layout();
    let mut cache = s.cache::<T>();
    let mut ids: Vec<SeqId> = (0..3).map(|_| cache.add_sequence()).collect();
    // Each sequence's history: rows of the pool.
    let mut history: Vec<Vec<usize>> = vec![Vec::new(); 3];
    let mut next_row = 0;
    let pick = |m: &DMatrix<T>, rows: &[usize]| {
        DMatrix::from_fn(rows.len(), m.ncols(), |i, j| m[(rows[i], j)])
    };
    for (step, op) in ops.iter().enumerate() {
        let memory_before = cache.memory_bytes();
        let label = format!("step {step} ({op:?})");
        match *op {
            Op::Append { seq, n } => {
                let rows: Vec<usize> = (0..n).map(|i| (next_row + i) % k.nrows()).collect();
                next_row += n;
                cache
                    .append(ids[seq], &pick(&k, &rows), &pick(&v, &rows))
                    .unwrap();
                history[seq].extend(&rows);
                let kept = cache.kept(ids[seq]).unwrap();
                let hk = pick(&k, &history[seq][kept.clone()]);
                let hv = token_major(pick(&v, &history[seq][kept.clone()]).as_view());
                let qn = pick(&q, &rows);
                let out =
                    cached_attention(&qn, &cache, ids[seq], &layout, &s.options(&slopes)).unwrap();
                let full = s.full_options(&slopes);
                let want = multi_head_attention(&qn, &hk, by_rows(&hv), &layout, &full).unwrap();
                assert_eq!(out, want, "{label}");
            }
            Op::Truncate { seq, back } => {
                let len = history[seq].len();
                let to = len.saturating_sub(back);
                let first = cache.kept(ids[seq]).unwrap().start;
                let needed = to.saturating_sub(s.window.map_or(usize::MAX, |w| w - 1));
                let before = cache.snapshot();
                match cache.truncate(ids[seq], to) {
                    Ok(()) => {
                        assert!(
                            to == 0 || needed >= first,
                            "{label}: truncated into evicted tokens"
                        );
                        history[seq].truncate(to);
                    }
                    Err(e) => {
                        assert_eq!(
                            e,
                            AttentionError::Evicted {
                                needed_from: needed,
                                first_kept: first
                            },
                            "{label}"
                        );
                        assert!(
                            cache.snapshot() == before,
                            "{label}: a refused truncate changed the cache"
                        );
                    }
                }
            }
            Op::Replace { seq } => {
                cache.remove(ids[seq]).unwrap();
                assert_eq!(
                    cache.len(ids[seq]),
                    Err(AttentionError::UnknownSequence { sequence: ids[seq] })
                );
                ids[seq] = cache.add_sequence();
                history[seq].clear();
            }
        }
        // Every sequence holds its history's kept suffix; pages are reused before new
        // ones are allocated.
        let mut pages = 0;
        for (id, h) in ids.iter().zip(&history) {
            let kept = cache.kept(*id).unwrap();
            assert_eq!(kept.end, h.len(), "{label}");
            let (gk, gv) = cache.gather(*id).unwrap();
            assert_eq!(gk, pick(&k, &h[kept.clone()]), "{label}: keys");
            assert_eq!(gv, pick(&v, &h[kept.clone()]), "{label}: values");
            pages += kept.len().div_ceil(s.page_size);
        }
        let page_bytes = s.page_size * s.heads_kv * (s.d_k + s.d_v) * size_of::<T>();
        assert_eq!(
            cache.used_bytes(),
            pages * page_bytes,
            "{label}: pages in use"
        );
        assert_eq!(
            cache.memory_bytes(),
            memory_before.max(cache.used_bytes()),
            "{label}: pool reuse"
        );
    }
}

/// Query, key and value rows the model's appends draw from.
type Pool = (DMatrix<f64>, DMatrix<f64>, DMatrix<f64>);

fn model_case() -> impl Strategy<Value = (Setup, Vec<Op>, Pool)> {
    (
        setup(prop::option::of(1..=10usize)),
        prop::collection::vec(op(), 1..=30),
    )
        .prop_flat_map(|(s, ops)| {
            let pool = 60;
            (
                Just(s.clone()),
                Just(ops),
                (
                    normal_matrix(pool, s.heads_q() * s.d_k, 1.0),
                    normal_matrix(pool, s.heads_kv * s.d_k, 1.0),
                    normal_matrix(pool, s.heads_kv * s.d_v, 1.0),
                ),
            )
        })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(128))]

    #[test]
    fn interleaved_sequences_with_rollback_and_removal_f32((s, ops, pool) in model_case()) {
        check_model::<f32>(&s, &ops, (&pool.0, &pool.1, &pool.2));
    }

    #[test]
    fn interleaved_sequences_with_rollback_and_removal_f64((s, ops, pool) in model_case()) {
        check_model::<f64>(&s, &ops, (&pool.0, &pool.1, &pool.2));
    }
}

/// Truncating (speculative decoding) and re-appending other tokens gives the attention of
/// the new history; removing a sequence and appending the same length again to a new one
/// reuses its pages.
#[test]
fn truncate_and_remove_then_reappend() {
    let (hkv, d) = (2, 4);
    let layout = HeadLayout::new(4, hkv);
    let k = narrow::<f32>(&attention_testdata::gaussian(80, hkv * d, 1.0, 11));
    let v = narrow::<f32>(&attention_testdata::gaussian(80, hkv * d, 1.0, 12));
    let q = narrow::<f32>(&attention_testdata::gaussian(80, 4 * d, 1.0, 13));
    let mut cache = KvCache::<f32>::new(hkv, d, d)
        .unwrap()
        .with_page_size(8)
        .unwrap();
    let seq = cache.add_sequence();
    cache.append(seq, k.rows(0, 50), v.rows(0, 50)).unwrap();
    let memory = cache.memory_bytes();
    assert_eq!(memory, 7 * 8 * 2 * hkv * d * 4);
    // Reject the last 20 (draft) tokens, accept 20 others: rows 50..70 of the pool.
    cache.truncate(seq, 30).unwrap();
    assert_eq!(
        (cache.len(seq).unwrap(), cache.used_bytes()),
        (30, 4 * 8 * 2 * hkv * d * 4)
    );
    assert_eq!(
        cache.memory_bytes(),
        memory,
        "truncated pages stay in the pool"
    );
    cache.append(seq, k.rows(50, 20), v.rows(50, 20)).unwrap();
    assert_eq!(cache.memory_bytes(), memory, "re-appending reuses the pool");
    let hk = DMatrix::from_fn(
        50,
        hkv * d,
        |i, j| if i < 30 { k[(i, j)] } else { k[(i + 20, j)] },
    );
    let hv = DMatrix::from_fn(
        50,
        hkv * d,
        |i, j| if i < 30 { v[(i, j)] } else { v[(i + 20, j)] },
    );
    let options = AttentionOptions::new();
    let qn = q.rows(50, 20);
    assert_eq!(
        cached_attention(qn, &cache, seq, &layout, &options).unwrap(),
        multi_head_attention(
            qn,
            &hk,
            &hv,
            &layout,
            &options.clone().with_causal(Causal::BottomRight)
        )
        .unwrap()
    );
    // Truncate to the same length: nothing; beyond: an error; to 0: all pages back.
    let before = cache.snapshot();
    cache.truncate(seq, 50).unwrap();
    assert!(cache.snapshot() == before);
    assert_eq!(
        cache.truncate(seq, 51),
        Err(AttentionError::TruncateBeyond {
            len: 51,
            history: 50
        })
    );
    assert!(cache.snapshot() == before);
    cache.truncate(seq, 0).unwrap();
    assert_eq!((cache.len(seq).unwrap(), cache.used_bytes()), (0, 0));
    // Remove and re-append the same length to a new sequence: no new memory.
    cache.append(seq, k.rows(0, 50), v.rows(0, 50)).unwrap();
    cache.remove(seq).unwrap();
    assert_eq!((cache.used_bytes(), cache.memory_bytes()), (0, memory));
    let other = cache.add_sequence();
    assert_ne!(other, seq, "ids are not reused");
    cache.append(other, k.rows(0, 50), v.rows(0, 50)).unwrap();
    assert_eq!(cache.memory_bytes(), memory);
    assert_eq!(
        cache.gather(other).unwrap(),
        (k.rows(0, 50).into_owned(), v.rows(0, 50).into_owned())
    );
    cache.release_free_pages();
    assert_eq!(cache.memory_bytes(), memory);
    cache.remove(other).unwrap();
    cache.release_free_pages();
    assert_eq!(cache.memory_bytes(), 0);
}

/// In a window, rolling back at most the newest chunk is allowed; further back needs
/// evicted tokens and is refused with the cache unchanged; to 0 is always allowed.
#[test]
fn truncate_in_a_window() {
    let k = DMatrix::<f64>::from_fn(40, 2, |i, j| (i * 2 + j) as f64);
    let mut cache = KvCache::<f64>::new(1, 2, 2)
        .unwrap()
        .with_page_size(4)
        .unwrap()
        .with_window(6)
        .unwrap();
    let seq = cache.add_sequence();
    cache.append(seq, k.rows(0, 20), k.rows(0, 20)).unwrap();
    for t in 20..30 {
        cache.append(seq, k.rows(t, 1), k.rows(t, 1)).unwrap();
    }
    // Keeps ≥ the last 6 of 30 (24..30): from page 24.
    assert_eq!(cache.kept(seq).unwrap(), 24..30);
    cache.append(seq, k.rows(30, 4), k.rows(30, 4)).unwrap(); // keeps ≥ 34 − 9 = 25
    assert_eq!(cache.kept(seq).unwrap(), 24..34);
    cache.truncate(seq, 30).unwrap(); // needs 25..30: kept
    let before = cache.snapshot();
    assert_eq!(
        cache.truncate(seq, 28),
        Err(AttentionError::Evicted {
            needed_from: 23,
            first_kept: 24
        })
    );
    assert!(cache.snapshot() == before);
    cache.truncate(seq, 29).unwrap(); // needs 24..29
    assert_eq!(cache.kept(seq).unwrap(), 24..29);
    cache.truncate(seq, 0).unwrap();
    assert_eq!(cache.kept(seq).unwrap(), 0..0);
    cache.append(seq, k.rows(0, 3), k.rows(0, 3)).unwrap();
    assert_eq!(cache.gather(seq).unwrap().0, k.rows(0, 3));
}

/// Every rejected append leaves every bit of the cache (pages, pool, lengths) unchanged,
/// and says which operand, row and column.
#[test]
fn rejected_appends_change_nothing() {
    for window in [None, Some(3)] {
        let mut cache = KvCache::<f32>::new(2, 3, 2)
            .unwrap()
            .with_page_size(4)
            .unwrap();
        if let Some(w) = window {
            cache = cache.with_window(w).unwrap();
        }
        let a = cache.add_sequence();
        let b = cache.add_sequence();
        let gone = cache.add_sequence();
        let k = narrow::<f32>(&attention_testdata::gaussian(11, 6, 1.0, 5));
        let v = narrow::<f32>(&attention_testdata::gaussian(11, 4, 1.0, 6));
        cache.append(a, k.rows(0, 6), v.rows(0, 6)).unwrap();
        cache.append(b, k.rows(0, 9), v.rows(0, 9)).unwrap();
        cache.append(gone, k.rows(0, 5), v.rows(0, 5)).unwrap();
        cache.remove(gone).unwrap();
        let before = cache.snapshot();
        let check = |cache: &mut KvCache<f32>,
                     kn: &DMatrix<f32>,
                     vn: &DMatrix<f32>,
                     seq,
                     want: AttentionError| {
            assert_eq!(cache.append(seq, kn, vn), Err(want.clone()));
            assert!(cache.snapshot() == before, "{want:?} changed the cache");
        };
        let (kn, vn) = (k.rows(6, 5).into_owned(), v.rows(6, 5).into_owned());
        check(
            &mut cache,
            &kn,
            &vn,
            gone,
            AttentionError::UnknownSequence { sequence: gone },
        );
        let mismatch =
            |operand, axis, found, expected, against, rule| AttentionError::DimensionMismatch {
                operand,
                axis,
                found,
                expected,
                against,
                rule,
            };
        check(
            &mut cache,
            &k.columns(0, 5).rows(0, 5).into_owned(),
            &vn,
            a,
            mismatch(
                Operand::NewKeys,
                Axis::Columns,
                5,
                6,
                Operand::KvCache,
                "new keys are n x heads_kv*d_k",
            ),
        );
        check(
            &mut cache,
            &kn,
            &v.rows(0, 4).into_owned(),
            a,
            mismatch(
                Operand::NewValues,
                Axis::Rows,
                4,
                5,
                Operand::NewKeys,
                "one value row per key row",
            ),
        );
        check(
            &mut cache,
            &kn,
            &DMatrix::zeros(5, 3),
            a,
            mismatch(
                Operand::NewValues,
                Axis::Columns,
                3,
                4,
                Operand::KvCache,
                "new values are n x heads_kv*d_v",
            ),
        );
        for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
            for row in 0..5 {
                for (is_key, cols) in [(true, 6), (false, 4)] {
                    let column = (row * 7 + 1) % cols;
                    let (mut kb, mut vb) = (kn.clone(), vn.clone());
                    let m = if is_key { &mut kb } else { &mut vb };
                    m[(row, column)] = bad;
                    let operand = if is_key {
                        Operand::NewKeys
                    } else {
                        Operand::NewValues
                    };
                    let err = cache.append(b, &kb, &vb).unwrap_err();
                    match err {
                        AttentionError::NonFinite {
                            operand: o,
                            row: r,
                            column: c,
                            value,
                        } => {
                            assert_eq!((o, r, c), (operand, row, column));
                            assert_eq!(value.to_bits(), (bad as f64).to_bits());
                        }
                        other => panic!("{other:?}"),
                    }
                    assert!(
                        cache.snapshot() == before,
                        "NaN/inf in row {row} changed the cache"
                    );
                }
            }
        }
        // The same rows, finite, are accepted.
        cache.append(b, &kn, &vn).unwrap();
        assert_eq!(cache.len(b).unwrap(), 14);
    }
}

/// The errors of construction and of `cached_attention`, typed, with nothing changed.
#[test]
fn every_error_is_typed() {
    let invalid = |option, rule| AttentionError::InvalidOption { option, rule };
    assert_eq!(
        KvCache::<f32>::new(0, 4, 4).unwrap_err(),
        invalid(
            "KvCache::new",
            "a KV cache holds at least one key/value head"
        )
    );
    assert!(matches!(
        KvCache::<f32>::new(usize::MAX, 2, 1),
        Err(AttentionError::TooLarge {
            operand: Operand::KvCache,
            ..
        })
    ));
    assert!(matches!(
        KvCache::<f32>::new(1, 1 << 40, 0)
            .unwrap()
            .with_page_size(1 << 30),
        Err(AttentionError::TooLarge {
            operand: Operand::KvCache,
            ..
        })
    ));
    assert_eq!(
        KvCache::<f32>::new(1, 4, 4)
            .unwrap()
            .with_page_size(0)
            .unwrap_err(),
        invalid("with_page_size", "a page holds at least one token")
    );
    assert_eq!(
        KvCache::<f32>::new(1, 4, 4)
            .unwrap()
            .with_window(0)
            .unwrap_err(),
        invalid(
            "with_window",
            "the window holds at least one token (the query's own)"
        )
    );
    let mut busy = KvCache::<f32>::new(1, 4, 4).unwrap();
    let _ = busy.add_sequence();
    assert_eq!(
        busy.with_window(4).unwrap_err(),
        invalid("with_window", "set it before adding sequences")
    );

    // A page of 2^40 floats (4 TiB) cannot be allocated: TooLarge, nothing appended.
    let mut huge = KvCache::<f32>::new(1, 1 << 20, 0)
        .unwrap()
        .with_page_size(1 << 20)
        .unwrap();
    let s = huge.add_sequence();
    let before = huge.snapshot();
    let err = huge
        .append(
            s,
            &DMatrix::<f32>::zeros(1, 1 << 20),
            &DMatrix::<f32>::zeros(1, 0),
        )
        .unwrap_err();
    assert_eq!(
        err,
        AttentionError::TooLarge {
            operand: Operand::KvCache,
            rows: 1 << 20,
            columns: 1 << 20
        }
    );
    assert!(huge.snapshot() == before);

    let mut cache = KvCache::<f64>::new(2, 3, 2)
        .unwrap()
        .with_page_size(4)
        .unwrap();
    let seq = cache.add_sequence();
    let gone = cache.add_sequence();
    cache.remove(gone).unwrap();
    let x = DMatrix::<f64>::from_fn(10, 6, |i, j| ((i * 6 + j) as f64).sin());
    cache.append(seq, &x, x.columns(0, 4)).unwrap();
    let q = DMatrix::<f64>::zeros(2, 12);
    let layout = HeadLayout::new(4, 2);
    let o = AttentionOptions::<f64>::new();
    let call = |q: &DMatrix<f64>, seq, layout: &HeadLayout<'_>, o: &AttentionOptions<'_, f64>| {
        cached_attention(q, &cache, seq, layout, o).unwrap_err()
    };
    assert_eq!(
        call(&q, gone, &layout, &o),
        AttentionError::UnknownSequence { sequence: gone }
    );
    assert_eq!(gone.to_string(), "1");
    assert_eq!(
        call(&q, gone, &layout, &o).to_string(),
        "sequence 1 is not in this KV cache (removed, or never added to it)"
    );
    for remove_op in [cache.len(gone), cache.kept(gone).map(|r| r.len())] {
        assert_eq!(
            remove_op,
            Err(AttentionError::UnknownSequence { sequence: gone })
        );
    }
    let mask = DMatrix::from_element(2, 10, true);
    let bias = DMatrix::<f64>::zeros(2, 10);
    let keys = [true; 10];
    let no_mask = "cached attention takes no mask or bias: truncate the cache instead";
    assert_eq!(
        call(&q, seq, &layout, &o.clone().with_mask(&mask)),
        invalid("with_mask", no_mask)
    );
    assert_eq!(
        call(&q, seq, &layout, &o.clone().with_bias(&bias)),
        invalid("with_bias", no_mask)
    );
    assert_eq!(
        call(&q, seq, &layout, &o.clone().with_key_mask(&keys)),
        invalid("with_key_mask", no_mask)
    );
    assert_eq!(
        call(&q, seq, &layout, &o.clone().with_causal(Causal::TopLeft)),
        invalid(
            "with_causal",
            "cached attention is causal bottom-right: the last query is the newest token"
        )
    );
    assert_eq!(
        call(&q, seq, &layout.with_seqlens(&[2], &[10]), &o),
        invalid(
            "with_seqlens",
            "cached attention attends one sequence; call it once per sequence"
        )
    );
    assert_eq!(
        call(&q, seq, &HeadLayout::new(3, 2), &o),
        AttentionError::InvalidHeads {
            heads_q: 3,
            heads_kv: 2
        }
    );
    let heads = call(&q, seq, &HeadLayout::new(4, 4), &o);
    assert_eq!(
        heads,
        AttentionError::DimensionMismatch {
            operand: Operand::HeadLayout,
            axis: Axis::Heads,
            found: 4,
            expected: 2,
            against: Operand::KvCache,
            rule: "the layout's key/value heads are the cache's"
        }
    );
    assert_eq!(
        heads.to_string(),
        "head layout has 4 key/value heads but KV cache has 2 (the layout's key/value heads are the cache's)"
    );
    assert_eq!(
        call(&DMatrix::zeros(2, 8), seq, &layout, &o),
        AttentionError::HeadSplit {
            operand: Operand::Query,
            columns: 8,
            heads: 4,
            head_width: Some(3)
        }
    );
    let mut nan = q.clone();
    nan[(1, 5)] = f64::NAN;
    assert!(matches!(
        call(&nan, seq, &layout, &o),
        AttentionError::NonFinite {
            operand: Operand::Query,
            row: 1,
            column: 5,
            ..
        }
    ));
    // Explicit bottom-right causal, and a window on a cache without one, are accepted.
    let br = o.clone().with_causal(Causal::BottomRight).with_window(3, 0);
    let got = cached_attention(&q, &cache, seq, &layout, &br).unwrap();
    let (k, v) = cache.gather(seq).unwrap();
    let values = token_major(v.as_view());
    let want = multi_head_attention(&q, &k, by_rows(&values), &layout, &br).unwrap();
    assert_eq!(got, want);

    // A window cache: its own window only, and no more queries than the kept keys allow.
    let mut w = KvCache::<f64>::new(2, 3, 2)
        .unwrap()
        .with_page_size(2)
        .unwrap()
        .with_window(3)
        .unwrap();
    let seq = w.add_sequence();
    w.append(seq, &x, x.columns(0, 4)).unwrap();
    w.append(seq, x.rows(0, 1), x.rows(0, 1).columns(0, 4))
        .unwrap(); // keeps ≥ 11 − 3 = 8
    assert_eq!(w.kept(seq).unwrap(), 8..11);
    let wcall =
        |q: &DMatrix<f64>, o: &AttentionOptions<'_, f64>| cached_attention(q, &w, seq, &layout, o);
    assert_eq!(
        wcall(&q.rows(0, 1).into_owned(), &o.clone().with_window(2, 0)).unwrap_err(),
        invalid(
            "with_window",
            "a sliding-window KV cache applies its own window (w - 1, 0)"
        )
    );
    assert!(wcall(&q.rows(0, 1).into_owned(), &o).is_ok());
    let err = wcall(&q, &o).unwrap_err(); // query 9 needs 7..
    assert_eq!(
        err,
        AttentionError::Evicted {
            needed_from: 7,
            first_kept: 8
        }
    );
    assert_eq!(
        err.to_string(),
        "the call needs the tokens from position 7, but the sliding window has evicted those before 8"
    );
}

/// The memory row: 8 KV heads × d 128 in f32 (8 KiB of K and V per token), pages
/// of the default 256 tokens, one token at a time to 65536: at every length of ≥ 10 pages the cache holds
/// ≤ 1.1 × the bytes of its K and V; remove + re-append of the same length allocates
/// nothing new. About 0.5 GB at the end.
#[test]
fn memory_stays_within_ten_percent() {
    let (heads, d) = (8, 128);
    let mut cache = KvCache::<f32>::new(heads, d, d).unwrap();
    let token_bytes = 2 * heads * d * size_of::<f32>();
    let row = DMatrix::<f32>::from_fn(1, heads * d, |_, j| j as f32 * 1e-3);
    let seq = cache.add_sequence();
    let mut report = Vec::new();
    for len in 1..=65536usize {
        cache.append(seq, &row, &row).unwrap();
        let (memory, kv) = (cache.memory_bytes(), len * token_bytes);
        assert_eq!(cache.used_bytes(), memory);
        if len >= 10 * cache.page_size() {
            assert!(
                memory as f64 <= 1.1 * kv as f64,
                "{len} tokens: {memory} bytes for {kv} of K and V"
            );
        }
        if len == 40000 || len == 65536 {
            report.push((len, memory, kv, memory as f64 / kv as f64));
        }
    }
    assert_eq!(cache.page_size(), 256);
    assert_eq!(report[0].1, 157 * 256 * token_bytes); // 40000 tokens: 156.25 pages
    assert_eq!(report[1].1, 65536 * token_bytes);
    for (len, memory, kv, ratio) in &report {
        println!(
            "{len} tokens: memory_bytes {memory} for {kv} bytes of K and V (ratio {ratio:.4})"
        );
    }
    let memory = cache.memory_bytes();
    cache.remove(seq).unwrap();
    let seq = cache.add_sequence();
    let chunk = DMatrix::<f32>::from_fn(1000, heads * d, |i, j| (i + j) as f32 * 1e-3);
    let mut len = 0;
    while len < 65536 {
        let n = (65536 - len).min(1000);
        cache
            .append(seq, chunk.rows(0, n), chunk.rows(0, n))
            .unwrap();
        len += n;
        assert_eq!(
            cache.memory_bytes(),
            memory,
            "re-append at {len} allocated new pages"
        );
    }
}

/// Memory within 10% at every length of ≥ 10 pages, for other page sizes and widths.
#[test]
fn memory_bound_for_every_page_size() {
    for page_size in [1, 3, 16, 64, 100] {
        let mut cache = KvCache::<f64>::new(2, 3, 5)
            .unwrap()
            .with_page_size(page_size)
            .unwrap();
        let seq = cache.add_sequence();
        let token_bytes = 2 * (3 + 5) * size_of::<f64>();
        let x = DMatrix::<f64>::zeros(7, 16);
        let mut len = 0;
        while len < 40 * page_size {
            let n = 1 + len % 7;
            cache
                .append(seq, x.rows(0, n).columns(0, 6), x.rows(0, n).columns(6, 10))
                .unwrap();
            len += n;
            if len >= 10 * page_size {
                assert!(
                    cache.memory_bytes() as f64 <= 1.1 * (len * token_bytes) as f64,
                    "page {page_size}, {len} tokens"
                );
            }
        }
    }
}

/// Decoding steps read the pages in place with each path's decoding kernel (not a copy:
/// `last_kernel_run`), and give the bits of `multi_head_attention` on the contiguous
/// history: for pages that hold whole 64-key chunks, for pages smaller than a chunk
/// (chunks spanning pages), for a sliding window, sequential and threaded.
#[test]
fn decoding_reads_the_pages_in_place_on_every_path() {
    use attention_core::{CpuPath, KernelRun, Parallelism, alibi_slopes, last_kernel_run};
    let (heads_kv, group, d) = (2, 3, 16);
    let heads_q = heads_kv * group;
    let n = 2300; // two 2048-key parts
    let k: DMatrix<f32> = narrow(&attention_testdata::gaussian(n, heads_kv * d, 1.0, 1));
    let v: DMatrix<f32> = narrow(&attention_testdata::gaussian(n, heads_kv * d, 1.0, 2));
    let q: DMatrix<f32> = narrow(&attention_testdata::gaussian(3, heads_q * d, 1.0, 3));
    let layout = HeadLayout::new(heads_q, heads_kv);
    let slopes = alibi_slopes::<f32>(heads_q);
    for (page_size, window) in [
        (64, None),
        (128, None),
        (16, None),
        (7, None),
        (64, Some(700)),
        (100, None),
        (256, Some(700)),
    ] {
        let mut cache = KvCache::<f32>::new(heads_kv, d, d)
            .unwrap()
            .with_page_size(page_size)
            .unwrap();
        if let Some(w) = window {
            cache = cache.with_window(w).unwrap();
        }
        let seq = cache.add_sequence();
        cache
            .append(seq, k.rows(0, n - 3), v.rows(0, n - 3))
            .unwrap();
        cache
            .append(seq, k.rows(n - 3, 3), v.rows(n - 3, 3))
            .unwrap();
        let kept = cache.kept(seq).unwrap();
        let kk = k.rows(kept.start, kept.len());
        let kept_values = token_major(v.rows(kept.start, kept.len()));
        let vk = by_rows(&kept_values);
        for path in CpuPath::supported() {
            for par in [Parallelism::Sequential, Parallelism::Rayon] {
                let options = AttentionOptions::new()
                    .with_cpu_path(path)
                    .with_parallelism(par)
                    .with_alibi_slopes(&slopes);
                let (out, lse) =
                    cached_attention_with_lse(&q, &cache, seq, &layout, &options).unwrap();
                let label = format!("pages of {page_size}, window {window:?}, {path:?} {par:?}");
                assert_eq!(last_kernel_run(), Some(KernelRun::Decode(path)), "{label}");
                let mut full = options.clone().with_causal(Causal::BottomRight);
                if let Some(w) = window {
                    full = full.with_window(w - 1, 0);
                }
                let (want, want_lse) =
                    multi_head_attention_with_lse(&q, kk, vk, &layout, &full).unwrap();
                let bits = |m: &DMatrix<f32>| m.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                assert_eq!(bits(&out), bits(&want), "{label}: output");
                assert_eq!(bits(&lse), bits(&want_lse), "{label}: lse");
            }
        }
    }
}

/// Values stored by rows (the cache's pages) take the decoding kernel's column-tiled
/// weighted sums: every tile shape (d_v across the 64 (f32) / 32 (f64), 8 and 1 column
/// tiles), row blocks (g·n_q rows across multiples of 4, up to the 64-row limit), rows with
/// nothing allowed in some chunks (a window), partial chunks, pages that hold whole chunks
/// or split them, and two 2048-key parts: on every path, each run on the decoding kernel,
/// within the reference bound, and with the same bits as the contiguous call on row-major
/// values.
#[test]
fn values_by_rows_in_every_tile_shape_match_the_reference() {
    use attention_core::{CpuPath, KernelRun, last_kernel_run};
    // (heads_kv, group, n_q, d_v, history, window, page size)
    let cases = [
        (1, 1, 1, 1, 70, None, 16),
        (1, 3, 1, 7, 65, None, 64),
        (2, 2, 1, 8, 200, Some(50), 64),
        (1, 5, 1, 9, 129, None, 7),
        (1, 1, 3, 31, 64, None, 64),
        (2, 4, 2, 32, 300, Some(100), 16),
        (1, 2, 3, 33, 130, None, 64),
        (1, 8, 8, 63, 90, Some(20), 64),
        (1, 1, 2, 64, 2100, None, 64),
        (2, 3, 1, 65, 150, None, 5),
        (1, 4, 1, 72, 257, Some(70), 64),
        (1, 2, 1, 128, 2300, None, 128),
        (2, 1, 5, 140, 100, None, 64),
        (1, 2, 1, 16, 600, Some(150), 100),
    ];
    for (i, &(heads_kv, group, n_q, d_v, n, window, page_size)) in cases.iter().enumerate() {
        let s = Setup {
            heads_kv,
            group,
            d_k: 8,
            d_v,
            page_size,
            window,
            alibi: i % 2 == 0,
            softcap: (i % 3 == 0).then_some(5.0),
        };
        let seed = 100 + 3 * i as u64;
        let q = attention_testdata::gaussian(n_q, s.heads_q() * s.d_k, 1.0, seed);
        let k = attention_testdata::gaussian(n, heads_kv * s.d_k, 1.0, seed + 1);
        let v = attention_testdata::gaussian(n, heads_kv * d_v, 1.0, seed + 2);
        check_by_rows::<f32>(&s, (&q, &k, &v), &format!("case {i} f32"));
        check_by_rows::<f64>(&s, (&q, &k, &v), &format!("case {i} f64"));
    }

    fn check_by_rows<T: Element>(
        s: &Setup,
        (q, k, v): (&DMatrix<f64>, &DMatrix<f64>, &DMatrix<f64>),
        label: &str,
    ) {
        let (qt, kt, vt) = (narrow::<T>(q), narrow::<T>(k), narrow::<T>(v));
        let n = k.nrows();
        let mut cache = s.cache::<T>();
        let seq = cache.add_sequence();
        cache
            .append(seq, kt.rows(0, n - qt.nrows()), vt.rows(0, n - qt.nrows()))
            .unwrap();
        cache
            .append(
                seq,
                kt.rows(n - qt.nrows(), qt.nrows()),
                vt.rows(n - qt.nrows(), qt.nrows()),
            )
            .unwrap();
        let kept = cache.kept(seq).unwrap();
        let slopes: Vec<T> = s.slopes().into_iter().map(T::from_f64_rounded).collect();
        let layout = s.layout();
        for path in CpuPath::supported() {
            let label = format!("{label}, {path:?}");
            let options = s.options(&slopes).with_cpu_path(path);
            let out = cached_attention(&qt, &cache, seq, &layout, &options).unwrap();
            assert_eq!(last_kernel_run(), Some(KernelRun::Decode(path)), "{label}");
            assert!(out.iter().all(|x| x.is_finite()), "{label}: finite");
            assert_matches_reference(&out, q, k, v, s, &label, T::EPSILON.to_f64());
            let values = token_major(vt.rows(kept.start, kept.len()));
            let full = s.full_options(&slopes).with_cpu_path(path);
            let want = multi_head_attention(
                &qt,
                kt.rows(kept.start, kept.len()),
                by_rows(&values),
                &layout,
                &full,
            )
            .unwrap();
            assert_eq!(out, want, "{label}: bits of the contiguous row-major call");
        }
    }
}
