//! Context-parallel decoding: one sequence's KV cache sharded over the workers, a partial
//! per worker for each new token, one all-gather and merge.

use attention_core::{
    AsMatRef, AttentionOptions, HeadLayout, KvCache, Operand, SeqId, cached_attention_with_lse,
};
use nalgebra::DMatrix;
use serde::{Deserialize, Serialize};

use crate::error::DistributedError;
use crate::exchange::{Channel, Peer};
use crate::handshake::check_finite;
use crate::merge::{Partial, empty, merge};
use crate::ring::{RingOptions, Shape};
use crate::wire::{Values, Wire};

/// The message of a decoder: a worker's partial result for the token of `step`
/// (column-major, one row).
#[derive(Clone, Serialize, Deserialize)]
#[serde(bound = "T: Wire")]
struct Message<T> {
    step: usize,
    from: usize,
    output: Values<T>,
    lse: Values<T>,
}

/// One worker's side of a sharded decoding loop; made by [`Peer::decoder`].
///
/// Which worker stores a new token: the one whose shard is shortest, the lowest index
/// among equals. Every worker keeps every shard's length (they change only by that rule),
/// so they agree without a message, and the shards stay within one token of each other
/// once they are (the zig-zag plan's shards differ by at most 2).
pub struct Decoder<'p, T: Wire> {
    channel: Channel<'p, Message<T>>,
    cache: KvCache<T>,
    seq: SeqId,
    lengths: Vec<usize>,
    shape: Shape,
    options: AttentionOptions<'static, T>,
    step: usize,
}

impl Peer<'_> {
    /// Starts sharded decoding of one sequence whose earlier tokens' keys and values are
    /// spread over the workers: this worker's shard is `key` (`m × h_kv·d_k`) and `value`
    /// (`m × h_kv·d_v`), any `m ≥ 0` (e.g. its rows of a [`Peer::ring_attention`] prefill,
    /// after RoPE). The shards are copied into an `attention_core::KvCache`.
    ///
    /// Every worker calls it with the same layout and options (causal is implied: a new
    /// token sees every earlier token and itself).
    ///
    /// # Errors
    /// [`DistributedError::Config`] for a packed layout or `h_q` not a multiple of
    /// `h_kv`; [`DistributedError::Shape`] for widths that do not fit the layout;
    /// [`DistributedError::Attention`] for NaN/∞ in the shard; [`DistributedError::Mismatch`]
    /// when workers disagree on the heads, widths, element type or options;
    /// [`DistributedError::Timeout`] / [`DistributedError::PeerLost`] from the watchdog.
    ///
    /// # Example
    /// ```
    /// use attention_core::{multi_head_attention, AttentionOptions, HeadLayout};
    /// use attention_distributed::{Cluster, RingOptions};
    /// use nalgebra::DMatrix;
    ///
    /// // 5 cached tokens over 2 workers (3 and 2), then 3 new ones; one head of width 2.
    /// let x = DMatrix::<f64>::from_fn(8, 2, |i, j| ((2 * i + j) as f64 * 0.3).sin());
    /// let shared = x.clone();
    /// let outs = Cluster::local(2)?.run(move |peer| {
    ///     let mine = if peer.index() == 0 { shared.rows(0, 3) } else { shared.rows(3, 2) };
    ///     let layout = HeadLayout::new(1, 1);
    ///     let mut decoder = peer.decoder(mine, mine, &layout, &RingOptions::new())?;
    ///     let mut outs = Vec::new();
    ///     for t in 5..8 {
    ///         let token = shared.rows(t, 1);
    ///         outs.push(decoder.step(token, token, token)?.0);
    ///     }
    ///     assert_eq!(decoder.shard_lengths(), [4, 4]); // 3+0+1, 2+1+1
    ///     decoder.finish()?;
    ///     Ok(outs)
    /// })?;
    /// let layout = HeadLayout::new(1, 1);
    /// for (i, t) in (5..8).enumerate() {
    ///     let keys = x.rows(0, t + 1);
    ///     let want = multi_head_attention(x.rows(t, 1), keys, keys, &layout, &AttentionOptions::new())?;
    ///     assert_eq!(outs[0][i], outs[1][i]); // every worker has the same bits
    ///     assert!((&outs[0][i] - want).amax() < 1e-15);
    /// }
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn decoder<'k, 'v, T: Wire>(
        &mut self,
        key: impl AsMatRef<'k, T>,
        value: impl AsMatRef<'v, T>,
        layout: &HeadLayout<'_>,
        options: &RingOptions<T>,
    ) -> Result<Decoder<'_, T>, DistributedError> {
        let (k, v) = (key.into_mat_ref(), value.into_mat_ref());
        let rows = k.nrows();
        let d_k = k.ncols().checked_div(layout.heads_kv()).unwrap_or(0);
        let query_shape = (rows, layout.heads_q() * d_k.max(1));
        // This worker's shard, checked and stored; a failure is reported to every worker
        // in the handshake.
        let checked =
            Shape::check(rows, query_shape, k.shape(), v.shape(), layout).and_then(|shape| {
                let mut cache = KvCache::new(shape.heads_kv, shape.d_k, shape.d_v)?;
                let seq = cache.add_sequence();
                cache.append(seq, k, v)?;
                Ok((shape, cache, seq))
            });
        let mut problem = vec![(
            "element type".to_owned(),
            std::any::type_name::<T>().to_owned(),
        )];
        if let Ok((shape, ..)) = &checked {
            problem.extend(shape.describe());
        }
        problem.extend(options.describe().map(|(f, v)| (f.to_owned(), v)));
        let failure = checked.as_ref().err().cloned();
        let lengths = self.handshake(&problem, rows, failure)?;
        let (shape, cache, seq) = checked?;
        let channel = self.channel::<Message<T>>();
        Ok(Decoder {
            channel,
            cache,
            seq,
            lengths,
            shape,
            options: options.local(),
            step: 0,
        })
    }
}

impl<T: Wire> Decoder<'_, T> {
    /// Every worker's shard length, in worker order.
    #[must_use]
    pub fn shard_lengths(&self) -> &[usize] {
        &self.lengths
    }

    /// The worker that will store the next token: the shortest shard, lowest index first.
    #[must_use]
    pub fn next_owner(&self) -> usize {
        (0..self.lengths.len())
            .min_by_key(|&w| (self.lengths[w], w))
            .unwrap_or(0)
    }

    /// Decodes one token: stores its key and value on [`next_owner`](Self::next_owner)'s
    /// shard, then attends `query` to the whole sequence (every earlier token and this
    /// one) and returns `(output 1 × h_q·d_v, lse 1 × h_q)`, the same bits on every worker.
    ///
    /// Every worker passes the same token: `query` `1 × h_q·d_k`, `key` `1 × h_kv·d_k`,
    /// `value` `1 × h_kv·d_v`. Each worker checks them before anything is stored, so a bad
    /// token is rejected by all and appended nowhere. The partials are merged in worker
    /// order.
    ///
    /// # Errors
    /// [`DistributedError::Shape`] for a query, key or value that is not one row of the
    /// layout's width; [`DistributedError::Attention`] for NaN/∞ in them;
    /// [`DistributedError::Timeout`] / [`DistributedError::PeerLost`] from the watchdog.
    pub fn step<'q, 'k, 'v>(
        &mut self,
        query: impl AsMatRef<'q, T>,
        key: impl AsMatRef<'k, T>,
        value: impl AsMatRef<'v, T>,
    ) -> Result<Partial<T>, DistributedError> {
        let (q, k, v) = (
            query.into_mat_ref(),
            key.into_mat_ref(),
            value.into_mat_ref(),
        );
        let s = self.shape;
        let layout = HeadLayout::new(s.heads_q, s.heads_kv);
        for (operand, found, columns) in [
            ("query", q.shape(), s.heads_q * s.d_k),
            ("key", k.shape(), s.heads_kv * s.d_k),
            ("value", v.shape(), s.heads_kv * s.d_v),
        ] {
            if found != (1, columns) {
                return Err(DistributedError::Shape {
                    operand,
                    rule: format!(
                        "a decoding step takes one token: 1 × {columns}; found {} × {}",
                        found.0, found.1
                    ),
                });
            }
        }
        check_finite(Operand::Query, q)?;
        check_finite(Operand::NewKeys, k)?;
        check_finite(Operand::NewValues, v)?;
        let me = self.channel.index();
        let owner = self.next_owner();
        if owner == me {
            self.cache.append(self.seq, k, v)?;
        }
        self.lengths[owner] += 1;

        let (output, lse) = if self.lengths[me] == 0 {
            empty(1, s.heads_q, s.d_v)
        } else {
            cached_attention_with_lse(q, &self.cache, self.seq, &layout, &self.options)?
        };
        let step = self.step;
        self.step += 1;
        let message = Message {
            step,
            from: me,
            output: Values(output.as_slice().to_vec()),
            lse: Values(lse.as_slice().to_vec()),
        };
        let all = self.channel.all_gather(
            message,
            |m, other| m.step == step && m.from == other,
            |other| format!("the partial result of decoding step {step} from worker {other}"),
        )?;
        let mut parts = Vec::with_capacity(all.len());
        for (other, m) in all.into_iter().enumerate() {
            let (Values(output), Values(lse)) = (m.output, m.lse);
            if (output.len(), lse.len()) != (s.heads_q * s.d_v, s.heads_q) {
                return Err(DistributedError::Shape {
                    operand: "partial result",
                    rule: format!(
                        "worker {other} sent {} output and {} lse values for {} and {}",
                        output.len(),
                        lse.len(),
                        s.heads_q * s.d_v,
                        s.heads_q
                    ),
                });
            }
            parts.push((
                DMatrix::from_vec(1, s.heads_q * s.d_v, output),
                DMatrix::from_vec(1, s.heads_q, lse),
            ));
        }
        Ok(merge(&parts, s.heads_q, s.d_v)?)
    }

    /// Ends decoding: waits until every worker has finished its last step.
    ///
    /// # Errors
    /// [`DistributedError::Timeout`] / [`DistributedError::PeerLost`] from the watchdog.
    pub fn finish(self) -> Result<(), DistributedError> {
        self.channel.close()
    }
}
