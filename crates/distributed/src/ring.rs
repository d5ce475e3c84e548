//! Ring attention: each worker keeps its query rows, the K/V blocks travel around the
//! ring, and each worker folds every block into its running (output, lse) with the exact
//! merge.

use std::sync::Arc;
use std::time::{Duration, Instant};

use std::ops::Range;

use attention_core::{
    AsMatRef, AttentionError, AttentionOptions, Causal, Element, HeadLayout, MatRef, Operand,
    multi_head_attention_with_lse_into,
};
use nalgebra::{DMatrix, DMatrixView, Dyn, U1};
use serde::{Deserialize, Serialize};

use crate::error::{DistributedError, config};
use crate::exchange::{Channel, Peer};
use crate::handshake::check_finite;
use crate::merge::{Partial, fold_into};
use crate::plan::Plan;
use crate::wire::{Values, Wire};

/// The options of a distributed attention call: the score rules that do not depend on a
/// token's position, and causal masking (handled by the plan's chunk order).
///
/// Masks, biases, windows and ALiBi are not offered: they need each block's key
/// positions, which the single-machine calls take only for queries
/// (`AttentionOptions::with_query_rows`).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct RingOptions<T> {
    causal: bool,
    scale: Option<T>,
    softcap: Option<T>,
}

impl<T: Element> RingOptions<T> {
    /// No causal mask, scale `1/√d_k`, no softcap.
    #[must_use]
    pub fn new() -> Self {
        Self {
            causal: false,
            scale: None,
            softcap: None,
        }
    }

    /// Causal self-attention over the whole sequence: token `i` sees tokens `0..=i`.
    #[must_use]
    pub fn with_causal(mut self, causal: bool) -> Self {
        self.causal = causal;
        self
    }

    /// The score scale (default `1/√d_k`), as `AttentionOptions::with_scale`.
    #[must_use]
    pub fn with_scale(mut self, scale: T) -> Self {
        self.scale = Some(scale);
        self
    }

    /// The softcap `c·tanh(s/c)`, as `AttentionOptions::with_softcap`.
    #[must_use]
    pub fn with_softcap(mut self, cap: T) -> Self {
        self.softcap = Some(cap);
        self
    }

    /// Whether the call is causal.
    #[must_use]
    pub fn causal(&self) -> bool {
        self.causal
    }

    /// The single-machine options of one block (causal added per block).
    pub(crate) fn local(&self) -> AttentionOptions<'static, T> {
        let mut o = AttentionOptions::new();
        if let Some(s) = self.scale {
            o = o.with_scale(s);
        }
        if let Some(c) = self.softcap {
            o = o.with_softcap(c);
        }
        o
    }

    /// What every worker must agree on, as text for the handshake.
    pub(crate) fn describe(&self) -> [(&'static str, String); 3] {
        let bits = |x: Option<T>| x.map_or("default".to_owned(), |x| format!("{:e}", x.to_f64()));
        [
            ("causal", self.causal.to_string()),
            ("scale", bits(self.scale)),
            ("softcap", bits(self.softcap)),
        ]
    }
}

/// A worker's result of [`Peer::ring_attention`]: the output and log-sum-exp of its rows
/// (those [`Plan::rows`] gives it, in that order), and what it did.
#[derive(Clone, Debug)]
pub struct RingOutput<T: Element> {
    /// `rows × h_q·d_v`.
    pub output: DMatrix<T>,
    /// `rows × h_q` (−∞ for a row with no allowed key, which causal self-attention never has).
    pub lse: DMatrix<T>,
    /// Counters of this worker's part.
    pub stats: RingStats,
}

/// What one worker did in a ring call.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct RingStats {
    /// The allowed (query, key) pairs whose scores it computed, per head: its share of the
    /// work ([`Plan::causal_pairs`] or [`Plan::pairs`]).
    pub pairs: u64,
    /// Time in local attention calls.
    pub compute: Duration,
    /// Time folding partials into the running result (the exact merge).
    pub merge: Duration,
    /// Time handing blocks to the engine (encoding them for the network, if any), on
    /// timely's worker thread while another thread computes.
    pub send: Duration,
    /// Time receiving the next block (waiting, decoding), likewise beside the compute.
    pub receive: Duration,
    /// Time the ring spent beyond the compute and merges: the communication that did
    /// not hide behind them.
    pub stalled: Duration,
    /// Bytes of K and V it sent.
    pub bytes_sent: u64,
}

/// A block of keys and values on its way around the ring: the rows of worker `origin`'s
/// two chunks, K (`rows × h_kv·d_k`) then V (`rows × h_kv·d_v`), each column-major, in
/// one vector.
#[derive(Serialize, Deserialize)]
#[serde(bound = "T: Wire")]
struct KvBlock<T> {
    origin: usize,
    rows: usize,
    data: Values<T>,
}

/// The K and V rows a worker folds in one step: its own (the caller's matrices) or a
/// block received from its neighbour.
#[derive(Clone, Copy)]
struct BlockRef<'a, T: Element> {
    origin: usize,
    key: MatRef<'a, T>,
    value: MatRef<'a, T>,
}

/// The values in one piece of a block sent to another process: 256 KiB, well within the
/// 1 MiB buffers timely's receiving thread starts with (a whole 128 MiB block in one
/// message made it grow its buffer by doubling, page-faulting and copying 512 MiB).
fn piece_len<T>() -> usize {
    (256 << 10) / size_of::<T>()
}

/// The message of a ring call, for the next worker: the block a worker holds at `step`,
/// whole (shared, to a worker of the same process) or one piece of it (to another
/// process: values `index·piece_len ..` of the block's K-then-V vector).
#[derive(Clone, Serialize, Deserialize)]
#[serde(bound = "T: Wire")]
enum Message<T> {
    Whole {
        step: usize,
        block: Arc<KvBlock<T>>,
    },
    Piece {
        step: usize,
        origin: usize,
        index: usize,
        values: Values<T>,
    },
}

impl<T> Message<T> {
    fn step(&self) -> usize {
        match self {
            Self::Whole { step, .. } | Self::Piece { step, .. } => *step,
        }
    }
}

impl Peer<'_> {
    /// Ring attention over one sequence of `plan.len()` tokens spread over all workers:
    /// `out = softmax(scale·Q·Kᵀ [+ causal mask])·V` per head, for this worker's rows.
    ///
    /// Every worker calls it with the same plan, layout and options, and its own rows:
    /// `query` is `rows × h_q·d_k`, `key` `rows × h_kv·d_k`, `value` `rows × h_kv·d_v`,
    /// holding the tokens of [`Plan::rows`] for [`Peer::index`] in that order (heads side
    /// by side in columns, as `multi_head_attention`; grouped-query when `h_q = g·h_kv`).
    ///
    /// The algorithm, on `P` workers: worker `w` starts with its own K/V block; at step
    /// `s = 0 .. P − 1` it holds the block of worker `(w − s) mod P`, first sends it on to
    /// worker `w + 1` (so the engine's network threads move it while this worker computes),
    /// then attends its two query chunks to the block's chunks they may see, and folds each
    /// partial `(O_b, lse_b)` into its running result:
    ///
    /// ```text
    /// M = max(lse, lse_b),  lse' = M + ln(e^(lse − M) + e^(lse_b − M)),
    /// O' = (e^(lse − M)·O + e^(lse_b − M)·O_b) / e^(lse' − M)
    /// ```
    ///
    /// Under a causal mask a key chunk `j` is wholly visible to a query chunk `i > j`,
    /// invisible to `i < j`, and causal within itself for `i = j`; the two visible chunks of
    /// a block are contiguous, so each (query chunk, block) is one call, bottom-right
    /// aligned when it includes the diagonal chunk. The order of every sum depends only on
    /// the plan, so a run gives the same bits every time with the same worker count.
    ///
    /// # Errors
    /// [`DistributedError::Config`] when the plan is not for this run's worker count or
    /// the layout is packed (several sequences); [`DistributedError::Shape`] when this
    /// worker's matrices do not have its rows and the layout's columns;
    /// [`DistributedError::Mismatch`] when workers disagree on the problem (checked before
    /// any work); [`DistributedError::Timeout`] / [`DistributedError::PeerLost`] from the
    /// watchdog; [`DistributedError::Attention`] from a local call or merge (NaN in an
    /// input, …).
    ///
    /// # Example
    /// ```
    /// use attention_core::{multi_head_attention, AttentionOptions, Causal, HeadLayout};
    /// use attention_distributed::{Cluster, Plan, RingOptions};
    /// use nalgebra::DMatrix;
    ///
    /// // 10 tokens, 2 query heads sharing 1 K/V head of width 4; 3 workers in this process.
    /// let x = DMatrix::<f64>::from_fn(10, 8, |i, j| ((3 * i + j) as f64 * 0.37).sin());
    /// let (q, kv) = (x.clone(), x.columns(0, 4).into_owned());
    /// let layout = HeadLayout::new(2, 1);
    /// let (q2, kv2) = (q.clone(), kv.clone());
    /// let parts = Cluster::local(3)?.run(move |peer| {
    ///     let plan = Plan::zigzag(10, peer.workers())?;
    ///     let mine = |m: &DMatrix<f64>| {
    ///         let [a, b] = plan.rows(peer.index());
    ///         let rows: Vec<usize> = a.chain(b).collect();
    ///         m.select_rows(&rows)
    ///     };
    ///     let (q, k) = (mine(&q2), mine(&kv2));
    ///     let layout = HeadLayout::new(2, 1);
    ///     let opts = RingOptions::new().with_causal(true);
    ///     Ok((plan.rows(peer.index()), peer.ring_attention(&plan, &q, &k, &k, &layout, &opts)?))
    /// })?;
    /// let full = multi_head_attention(&q, &kv, &kv, &layout,
    ///     &AttentionOptions::new().with_causal(Causal::TopLeft))?;
    /// for (rows, part) in parts {
    ///     for (r, i) in rows.into_iter().flatten().enumerate() {
    ///         assert!((part.output.row(r) - full.row(i)).amax() < 1e-14);
    ///     }
    /// }
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn ring_attention<'q, 'k, 'v, T: Wire>(
        &mut self,
        plan: &Plan,
        query: impl AsMatRef<'q, T>,
        key: impl AsMatRef<'k, T>,
        value: impl AsMatRef<'v, T>,
        layout: &HeadLayout<'_>,
        options: &RingOptions<T>,
    ) -> Result<RingOutput<T>, DistributedError> {
        let (q, k, v) = (
            query.into_mat_ref(),
            key.into_mat_ref(),
            value.into_mat_ref(),
        );
        let me = self.index();
        let workers = self.workers();
        // This worker's rule checks; a failure is reported to every worker in the
        // handshake, so that none waits for a block that will never come.
        let checked = if plan.workers() == workers {
            Shape::check(plan.row_count(me), q.shape(), k.shape(), v.shape(), layout)
        } else {
            Err(config(
                "plan",
                format!(
                    "a plan for {} workers in a run of {workers}",
                    plan.workers()
                ),
            ))
        }
        .and_then(|shape| {
            check_finite(Operand::Query, q)?;
            check_finite(Operand::Key, k)?;
            check_finite(Operand::Value, v)?;
            Ok(shape)
        });
        let mut problem = vec![
            (
                "element type".to_owned(),
                std::any::type_name::<T>().to_owned(),
            ),
            ("sequence length".to_owned(), plan.len().to_string()),
            ("workers in the plan".to_owned(), plan.workers().to_string()),
        ];
        if let Ok(shape) = &checked {
            problem.extend(shape.describe());
        }
        problem.extend(options.describe().map(|(f, v)| (f.to_owned(), v)));
        let failure = checked.as_ref().err().cloned();
        self.handshake(&problem, q.nrows(), failure)?;
        let shape = checked?;

        let rows = q.nrows();
        let columns = layout.heads_q() * shape.d_v;
        let [a, b] = plan.chunks(me).map(|c| plan.chunk(c).len());
        let [a, b] = [a, b].map(|len| -> Result<Partial<T>, DistributedError> {
            Ok((try_zeros(len, columns)?, try_zeros(len, layout.heads_q())?))
        });
        let (a, b) = (a?, b?);
        let mut fold = Fold {
            plan,
            me,
            q,
            causal: options.causal,
            local: options.local(),
            heads: HeadLayout::new(layout.heads_q(), layout.heads_kv()),
            dims: (layout.heads_q(), shape.d_v),
            output: try_zeros(rows, columns)?,
            lse: try_zeros(rows, layout.heads_q())?,
            parts: [a, b],
            started: [false; 2],
            stats: RingStats::default(),
        };
        let to = (me + 1) % workers;
        let from = (me + workers - 1) % workers;
        let shared = self.same_process(to);
        let columns = (k.ncols(), v.ncols());
        let mut channel = self.channel::<Message<T>>();
        // The block folded at each step: first this worker's own rows, read in place.
        let own = BlockRef {
            origin: me,
            key: k,
            value: v,
        };
        let mut held: Option<Arc<KvBlock<T>>> = None;
        let mut stalled = Duration::ZERO;
        let (mut sent, mut send, mut receive) = (0, Duration::ZERO, Duration::ZERO);
        for step in 0..workers {
            let start = Instant::now();
            let block = held.as_ref().map_or(own, |b| b.view(columns));
            if step + 1 == workers {
                let busy = fold.block(block)?;
                stalled += start.elapsed().saturating_sub(busy);
                break;
            }
            // This block is folded on another thread while this one (timely's worker,
            // which must drive the engine) sends it on and receives the next.
            let (computed, next) = std::thread::scope(|scope| {
                let compute = scope.spawn(|| fold.block(block));
                let next = (|| {
                    let t = Instant::now();
                    if shared {
                        let whole = held.clone().map_or_else(|| KvBlock::copy(own), Ok)?;
                        channel.send_alone(to, Message::Whole { step, block: whole });
                    } else {
                        send_pieces(&mut channel, to, step, block);
                    }
                    sent += block.bytes();
                    send += t.elapsed();
                    let t = Instant::now();
                    let origin = (me + 2 * workers - step - 1) % workers;
                    let expected = (origin, plan.row_count(origin));
                    let block = receive_block(&mut channel, step, from, expected, columns)?;
                    receive += t.elapsed();
                    Ok::<_, DistributedError>(block)
                })();
                let computed = compute
                    .join()
                    .unwrap_or_else(|panic| std::panic::resume_unwind(panic));
                (computed, next)
            });
            let busy = computed?;
            held = Some(next?);
            stalled += start.elapsed().saturating_sub(busy);
        }
        drop(held);
        channel.close()?;
        let Fold {
            output,
            lse,
            mut stats,
            ..
        } = fold;
        stats.bytes_sent = sent;
        stats.send = send;
        stats.receive = receive;
        stats.stalled = stalled;
        Ok(RingOutput { output, lse, stats })
    }
}

/// One worker's running result and how it folds a block into it.
struct Fold<'a, T: Wire> {
    plan: &'a Plan,
    me: usize,
    q: attention_core::MatRef<'a, T>,
    causal: bool,
    local: AttentionOptions<'static, T>,
    heads: HeadLayout<'static>,
    /// (h_q, d_v).
    dims: (usize, usize),
    output: DMatrix<T>,
    lse: DMatrix<T>,
    /// Each query chunk's partial, computed into the same buffers every step.
    parts: [Partial<T>; 2],
    /// Whether a query chunk's rows of the result hold a partial yet.
    started: [bool; 2],
    stats: RingStats,
}

impl<T: Wire> Fold<'_, T> {
    /// Attends each query chunk to the chunks of `block` it may see and folds the partial
    /// into the result. Returns the time it took.
    fn block(&mut self, block: BlockRef<'_, T>) -> Result<Duration, DistributedError> {
        let begin = Instant::now();
        let (plan, me) = (self.plan, self.me);
        let block_chunks = plan.chunks(block.origin);
        let mut first = 0;
        for (slot, qc) in plan.chunks(me).into_iter().enumerate() {
            let q_rows = plan.chunk(qc).len();
            let q_chunk = self.q.rows(first, q_rows);
            let chunk_first = first;
            first += q_rows;
            // The block's chunks this query chunk may see: a prefix (chunk ids rise).
            let visible: Vec<usize> = block_chunks
                .into_iter()
                .filter(|&kc| !self.causal || kc <= qc)
                .collect();
            let keys: usize = visible.iter().map(|&kc| plan.chunk(kc).len()).sum();
            if q_rows == 0 || keys == 0 {
                continue;
            }
            let diagonal = self.causal && visible.last() == Some(&qc);
            let opts = if diagonal {
                self.local.clone().with_causal(Causal::BottomRight)
            } else {
                self.local.clone()
            };
            let start = Instant::now();
            let part = &mut self.parts[slot];
            // A query chunk's first partial is its result so far: computed in place.
            let started = self.started[slot];
            let output = if started {
                part.0.rows_mut(0, q_rows)
            } else {
                self.output.rows_mut(chunk_first, q_rows)
            };
            multi_head_attention_with_lse_into(
                q_chunk,
                block.key.rows(0, keys),
                block.value.rows(0, keys),
                &self.heads,
                &opts,
                output,
                &mut part.1,
            )?;
            self.stats.pairs += if diagonal {
                let (q_rows, keys) = (q_rows as u64, keys as u64);
                q_rows * (keys - q_rows) + q_rows * (q_rows + 1) / 2
            } else {
                (q_rows * keys) as u64
            };
            self.stats.compute += start.elapsed();
            let start = Instant::now();
            if started {
                fold_into(
                    (&mut self.output, &mut self.lse),
                    chunk_first,
                    part,
                    self.dims,
                )?;
            } else {
                self.lse.rows_mut(chunk_first, q_rows).copy_from(&part.1);
                self.started[slot] = true;
            }
            self.stats.merge += start.elapsed();
        }
        Ok(begin.elapsed())
    }
}

impl<T: Element> BlockRef<'_, T> {
    /// The bytes of K and V it holds.
    fn bytes(&self) -> u64 {
        ((self.key.len() + self.value.len()) * size_of::<T>()) as u64
    }

    /// Values `range` of its K-then-V vector (each matrix column-major), appended to `out`.
    fn values_into(&self, range: Range<usize>, out: &mut Vec<T>) {
        let mut offset = 0;
        for m in [self.key, self.value] {
            let rows = m.nrows();
            let (from, to) = (range.start.max(offset), range.end.min(offset + m.len()));
            let mut at = from;
            while at < to {
                let (c, r) = ((at - offset) / rows, (at - offset) % rows);
                let take = (rows - r).min(to - at);
                if m.strides().0 == 1 {
                    let unit = m.as_view::<Dyn, Dyn, U1, Dyn>();
                    out.extend_from_slice(&unit.column(c).as_slice()[r..r + take]);
                } else {
                    out.extend(m.column(c).rows(r, take).iter().copied());
                }
                at += take;
            }
            offset += m.len();
        }
    }
}

impl<T: Wire> KvBlock<T> {
    /// A shared copy of `block`, or a typed error if it cannot be allocated.
    fn copy(block: BlockRef<'_, T>) -> Result<Arc<Self>, DistributedError> {
        let len = block.key.len() + block.value.len();
        let mut data = Vec::new();
        data.try_reserve_exact(len)
            .map_err(|_| too_large(block.key.nrows(), len))?;
        block.values_into(0..len, &mut data);
        Ok(Arc::new(Self {
            origin: block.origin,
            rows: block.key.nrows(),
            data: Values(data),
        }))
    }

    /// Its K and V as matrices of `(h_kv·d_k, h_kv·d_v)` columns.
    fn view(&self, (key_columns, value_columns): (usize, usize)) -> BlockRef<'_, T> {
        let (key, value) = self.data.0.split_at(self.rows * key_columns);
        BlockRef {
            origin: self.origin,
            key: DMatrixView::from_slice(key, self.rows, key_columns).into_mat_ref(),
            value: DMatrixView::from_slice(value, self.rows, value_columns).into_mat_ref(),
        }
    }
}

/// Sends `block` to worker `to` (in another process) in pieces of [`piece_len`] values,
/// each a network message of its own; an empty block is one empty piece.
fn send_pieces<T: Wire>(
    channel: &mut Channel<'_, Message<T>>,
    to: usize,
    step: usize,
    block: BlockRef<'_, T>,
) {
    let len = block.key.len() + block.value.len();
    let piece = piece_len::<T>();
    for index in 0..len.div_ceil(piece).max(1) {
        let range = index * piece..len.min((index + 1) * piece);
        let mut values = Vec::with_capacity(range.len());
        block.values_into(range, &mut values);
        let origin = block.origin;
        let values = Values(values);
        channel.send_alone(
            to,
            Message::Piece {
                step,
                origin,
                index,
                values,
            },
        );
    }
}

/// Receives the block of ring step `step` from worker `from`: `expected` is its (origin,
/// rows), `columns` its (K, V) widths. Whole, or in pieces in any order; each piece is
/// checked against the plan before it is placed, and the block is complete when every
/// piece has arrived once.
fn receive_block<T: Wire>(
    channel: &mut Channel<'_, Message<T>>,
    step: usize,
    from: usize,
    (origin, rows): (usize, usize),
    (key_columns, value_columns): (usize, usize),
) -> Result<Arc<KvBlock<T>>, DistributedError> {
    let what = || format!("the K/V block of ring step {step} from worker {from}");
    let len = rows * (key_columns + value_columns);
    let piece = piece_len::<T>();
    let count = len.div_ceil(piece).max(1);
    let bad = |found: String| DistributedError::Shape {
        operand: "K/V block",
        rule: format!(
            "at ring step {step} worker {from} sends worker {origin}'s {rows} rows of \
             {key_columns} + {value_columns} columns, whole or in {count} pieces of {piece} \
             values; it sent {found}"
        ),
    };
    let mut data: Option<Vec<T>> = None;
    let mut seen = vec![false; count];
    let start = Instant::now();
    for _ in 0..count {
        match channel.receive(start, |m| m.step() == step, what)? {
            Message::Whole { block, .. } => {
                let fits = block.origin == origin && block.rows == rows;
                if data.is_some() || !fits || block.data.0.len() != len {
                    return Err(bad(format!(
                        "a whole block of worker {}'s {} rows ({} values){}",
                        block.origin,
                        block.rows,
                        block.data.0.len(),
                        if data.is_some() { " after pieces" } else { "" }
                    )));
                }
                return Ok(block);
            }
            Message::Piece {
                origin: o,
                index,
                values,
                ..
            } => {
                let start = index.saturating_mul(piece).min(len);
                let range = start..len.min(start.saturating_add(piece));
                let twice = seen.get(index) == Some(&true);
                if o != origin || index >= count || twice || values.0.len() != range.len() {
                    return Err(bad(format!(
                        "piece {index} of worker {o}'s block with {} values{}",
                        values.0.len(),
                        if twice { ", twice" } else { "" }
                    )));
                }
                seen[index] = true;
                let data = match &mut data {
                    Some(data) => data,
                    None => data.insert(try_zeroed(len).ok_or_else(|| too_large(rows, len))?),
                };
                data[range].copy_from_slice(&values.0);
            }
        }
    }
    Ok(Arc::new(KvBlock {
        origin,
        rows,
        data: Values(data.unwrap_or_default()),
    }))
}

/// `len` zeros from the allocator's zeroed memory (pages the system zeroes when they are
/// first touched, not a pass here), or `None` if they cannot be allocated.
fn try_zeroed<T: Wire>(len: usize) -> Option<Vec<T>> {
    bytemuck::allocation::try_zeroed_vec(len).ok()
}

/// A `rows × columns` matrix of zeros, or a typed error if it cannot be allocated (from
/// zeroed memory: a buffer the call never uses costs nothing).
fn try_zeros<T: Wire>(rows: usize, columns: usize) -> Result<DMatrix<T>, DistributedError> {
    let len = rows
        .checked_mul(columns)
        .ok_or_else(|| too_large(rows, columns))?;
    let data = try_zeroed(len).ok_or_else(|| too_large(rows, columns))?;
    Ok(DMatrix::from_vec(rows, columns, data))
}

fn too_large(rows: usize, columns: usize) -> DistributedError {
    DistributedError::Attention(AttentionError::TooLarge {
        operand: Operand::Output,
        rows,
        columns,
    })
}

/// The widths of a multi-head call, checked against one worker's matrices.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Shape {
    pub(crate) heads_q: usize,
    pub(crate) heads_kv: usize,
    pub(crate) d_k: usize,
    pub(crate) d_v: usize,
}

impl Shape {
    /// Checks `q`, `k`, `v` (`(rows, columns)`) against `rows` and the layout.
    pub(crate) fn check(
        rows: usize,
        q: (usize, usize),
        k: (usize, usize),
        v: (usize, usize),
        layout: &HeadLayout<'_>,
    ) -> Result<Self, DistributedError> {
        let (heads_q, heads_kv) = (layout.heads_q(), layout.heads_kv());
        if layout.seqlens().is_some() {
            return Err(config(
                "layout",
                "one sequence per call (a packed batch is not supported)",
            ));
        }
        if heads_q == 0 || heads_kv == 0 || !heads_q.is_multiple_of(heads_kv) {
            return Err(config(
                "layout",
                format!(
                    "h_q must be a positive multiple of h_kv; found h_q = {heads_q}, h_kv = {heads_kv}"
                ),
            ));
        }
        let shape = |operand, found: (usize, usize), heads: usize, name| {
            if found.0 != rows || !found.1.is_multiple_of(heads) || found.1 == 0 {
                return Err(DistributedError::Shape {
                    operand,
                    rule: format!(
                        "this worker's part is {rows} rows × a positive multiple of {heads} \
                         columns ({name} heads); found {} × {}",
                        found.0, found.1
                    ),
                });
            }
            Ok(found.1 / heads)
        };
        let d_k = shape("query", q, heads_q, "h_q")?;
        let d_v = shape("value", v, heads_kv, "h_kv")?;
        if shape("key", k, heads_kv, "h_kv")? != d_k {
            return Err(DistributedError::Shape {
                operand: "key",
                rule: format!(
                    "h_kv·d_k = {heads_kv}·{d_k} columns, as the query's head width; found {}",
                    k.1
                ),
            });
        }
        Ok(Self {
            heads_q,
            heads_kv,
            d_k,
            d_v,
        })
    }

    pub(crate) fn describe(&self) -> [(String, String); 4] {
        [
            ("heads_q".to_owned(), self.heads_q.to_string()),
            ("heads_kv".to_owned(), self.heads_kv.to_string()),
            ("d_k".to_owned(), self.d_k.to_string()),
            ("d_v".to_owned(), self.d_v.to_string()),
        ]
    }
}

/// A bound on how far [`Peer::ring_attention`]'s output may lie from the single-machine
/// `multi_head_attention` over the whole sequence, relative to the largest `|v_jc|` of the
/// output column's value column: `|ring − single| ≤ bound · max_j |v_jc|`.
///
/// Both approximate the exact result. With `ε = T::EPSILON`, `A` a bound on the scaled
/// scores' magnitude (`score_bound`, e.g. `scale · max_i ‖q_i‖ · max_j ‖k_j‖` per head),
/// `L` a bound on `|lse|` (`lse_bound`), and `n` keys:
/// - a single-machine call is within `(2Δ + S)` of the exact output, with
///   `Δ = (d_k + 4)·ε·A` (the scores' rounding) and `S = 111ε + 6⌈n/480 + 1⌉·2⁻⁵²`
///   (the softmax sums; the worst case of the core's blocked summation);
/// - each block's partial is within the same, and its lse within `δ = Δ + S + ε·L`;
/// - each of the at most `P` merges adds at most `2δ' + 7ε`: its weights' relative error
///   is twice the lse error `δ' = δ + P·(2εL + 2ε)` (the running lse picks up rounding
///   with every merge), and its exp, division and sums round a few times.
///
/// So `bound = 1.01·(2·(2Δ + S) + P·(2δ' + 7ε))`, the factor 1.01 covering second-order
/// terms.
///
/// # Example
/// ```
/// use attention_distributed::ring_deviation_bound;
///
/// // f32, 2 workers, 4096 keys of width 128, |scores| ≤ 10, |lse| ≤ 20: 0.14% of max |v|.
/// let b = ring_deviation_bound::<f32>(2, 4096, 128, 10.0, 20.0);
/// assert!((b - 1.4e-3).abs() < 1e-4, "{b}");
/// ```
#[must_use]
pub fn ring_deviation_bound<T: Element>(
    workers: usize,
    n: usize,
    d_k: usize,
    score_bound: f64,
    lse_bound: f64,
) -> f64 {
    let eps = T::EPSILON.to_f64();
    let p = workers as f64;
    let delta = (d_k as f64 + 4.0) * eps * score_bound;
    let sums = 111.0 * eps + 6.0 * ((n / 480) as f64 + 1.0) * f64::EPSILON;
    let lse_error = delta + sums + eps * lse_bound + p * (2.0 * eps * lse_bound + 2.0 * eps);
    1.01 * (2.0 * (2.0 * delta + sums) + p * (2.0 * lse_error + 7.0 * eps))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Cluster;

    /// A block of 1000 rows × (80 + 60) columns: 140 000 f32 values, three pieces.
    const ROWS: usize = 1000;
    const COLUMNS: (usize, usize) = (80, 60);
    const LEN: usize = ROWS * (COLUMNS.0 + COLUMNS.1);

    fn values() -> Vec<f32> {
        (0..LEN).map(|i| (i as f32 * 0.37).sin()).collect()
    }

    /// Piece `index` of worker `origin`'s block, its last `short` values left out.
    fn piece(index: usize, origin: usize, short: usize) -> Message<f32> {
        let p = piece_len::<f32>();
        let all = values();
        let range = (index * p).min(LEN)..LEN.min((index + 1) * p);
        let end = range.end - short.min(range.len());
        Message::Piece {
            step: 0,
            origin,
            index,
            values: Values(all[range.start..end].to_vec()),
        }
    }

    /// What worker 0 sends in one case.
    type Sends = fn() -> Vec<Message<f32>>;

    fn whole() -> Message<f32> {
        Message::Whole {
            step: 0,
            block: Arc::new(KvBlock {
                origin: 0,
                rows: ROWS,
                data: Values(values()),
            }),
        }
    }

    /// Worker 0 sends `messages()`, each alone; worker 1 receives worker 0's block of
    /// ring step 0 and returns its values or the error's text.
    fn deliver(messages: Sends) -> Result<Vec<f32>, String> {
        let cluster = Cluster::local(2)
            .unwrap()
            .with_timeout(Duration::from_secs(20));
        let mut results = cluster
            .run(move |peer| {
                let me = peer.index();
                let mut channel = peer.channel::<Message<f32>>();
                let got = if me == 0 {
                    for m in messages() {
                        channel.send_alone(1, m);
                    }
                    None
                } else {
                    let block = receive_block(&mut channel, 0, 0, (0, ROWS), COLUMNS);
                    Some(block.map(|b| b.data.0.clone()).map_err(|e| e.to_string()))
                };
                channel.close()?;
                Ok(got)
            })
            .unwrap();
        results.pop().unwrap().unwrap()
    }

    #[test]
    fn a_block_arrives_whole_or_in_pieces_in_any_order() {
        assert_eq!(LEN.div_ceil(piece_len::<f32>()), 3);
        let want = values();
        assert_eq!(
            deliver(|| (0..3).map(|i| piece(i, 0, 0)).collect()),
            Ok(want.clone())
        );
        assert_eq!(
            deliver(|| [2, 0, 1].map(|i| piece(i, 0, 0)).to_vec()),
            Ok(want.clone())
        );
        assert_eq!(deliver(|| vec![whole()]), Ok(want));
    }

    #[test]
    fn a_wrong_piece_is_a_typed_error() {
        let cases: [(Sends, &str); 5] = [
            (
                || vec![piece(0, 0, 0), piece(0, 0, 0)],
                "piece 0 of worker 0's block with 65536 values, twice",
            ),
            (|| vec![piece(1, 1, 0)], "piece 1 of worker 1's block"),
            (
                || vec![piece(2, 0, 1)],
                "piece 2 of worker 0's block with 8927 values",
            ),
            (
                || vec![piece(3, 0, 0)],
                "piece 3 of worker 0's block with 0 values",
            ),
            (
                || vec![piece(0, 0, 0), whole()],
                "a whole block of worker 0's 1000 rows (140000 values) after pieces",
            ),
        ];
        for (messages, found) in cases {
            let error = deliver(messages).unwrap_err();
            assert!(
                error.contains("K/V block") && error.contains(found),
                "{error}\nshould say: {found}"
            );
        }
    }

    #[test]
    fn values_into_reads_any_range_of_a_strided_block() {
        // K and V as row blocks of larger matrices: column strides differ from the rows.
        let big = DMatrix::<f32>::from_fn(1200, 80, |i, j| (i * 80 + j) as f32);
        let (k, v) = (big.rows(7, 1000), big.view((100, 10), (1000, 60)));
        let block = BlockRef {
            origin: 0,
            key: k.into_mat_ref(),
            value: v.into_mat_ref(),
        };
        let mut want: Vec<f32> = k.iter().copied().collect();
        want.extend(v.iter().copied());
        for range in [
            0..LEN,
            0..1,
            999..1001,
            79_990..80_010,
            65_536..131_072,
            LEN..LEN,
        ] {
            let mut got = Vec::new();
            block.values_into(range.clone(), &mut got);
            assert_eq!(got, want[range]);
        }
        // K whose rows are not adjacent in memory (row stride 2): the general path.
        let every_other = DMatrix::<f32>::from_fn(2000, 80, |i, j| (i * 80 + j) as f32);
        let k = MatRef::from_slice_with_strides(every_other.as_slice(), 1000, 80, 2, 2000);
        let block = BlockRef { key: k, ..block };
        let mut want: Vec<f32> = k.iter().copied().collect();
        want.extend(v.iter().copied());
        for range in [0..LEN, 3..2500, 79_990..80_010, 65_536..131_072] {
            let mut got = Vec::new();
            block.values_into(range.clone(), &mut got);
            assert_eq!(got, want[range]);
        }
    }
}
