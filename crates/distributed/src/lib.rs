//! Attention across processes and hosts, on [timely dataflow](https://docs.rs/timely).
//!
//! - [`Peer::ring_attention`]: one long sequence spread over `P` workers. Each holds `n/P`
//!   query, key and value rows (the zig-zag [`Plan`], which balances causal work); the
//!   K/V blocks travel around the ring in `P − 1` steps and every worker folds each block
//!   into its running (output, lse) with the exact merge of `attention_core`.
//! - [`Peer::decoder`]: context-parallel decoding. The KV cache of one sequence is sharded
//!   over the workers (each shard an `attention_core::KvCache`); each new token's K/V goes
//!   to the shortest shard, every worker attends the new query to its shard, and one
//!   all-gather and merge gives every worker the same output.
//!
//! [`Cluster`] says where the workers are (timely's `-w`, `-n`, `-p`, `-h` flags) and
//! [`Cluster::run`] runs a closure on each worker under a watchdog. The same binary runs as
//! threads of one process (tests) or as processes on several hosts; the
//! `attention-ring` binary of this crate is the example. **The engine's transport is
//! plain TCP, without authentication or encryption: trusted networks only.**
//!
//! # Example
//! ```
//! use attention_core::{multi_head_attention, AttentionOptions, HeadLayout};
//! use attention_distributed::{Cluster, Plan, RingOptions};
//! use nalgebra::DMatrix;
//!
//! let n = 12;
//! let x = DMatrix::<f64>::from_fn(n, 4, |i, j| ((5 * i + j) as f64 * 0.21).cos());
//! let shared = x.clone();
//! // Two workers as threads of this process; the same closure runs in every process.
//! let parts = Cluster::local(2)?.run(move |peer| {
//!     let plan = Plan::zigzag(n, peer.workers())?;
//!     let rows: Vec<usize> = plan.rows(peer.index()).into_iter().flatten().collect();
//!     let mine = shared.select_rows(&rows);
//!     let out = peer.ring_attention(&plan, &mine, &mine, &mine, &HeadLayout::new(1, 1),
//!         &RingOptions::new())?;
//!     Ok((rows, out.output))
//! })?;
//! let full = multi_head_attention(&x, &x, &x, &HeadLayout::new(1, 1), &AttentionOptions::new())?;
//! for (rows, out) in parts {
//!     for (r, &i) in rows.iter().enumerate() {
//!         assert!((out.row(r) - full.row(i)).amax() < 1e-14);
//!     }
//! }
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

mod cluster;
mod decode;
mod error;
mod exchange;
mod handshake;
mod merge;
mod plan;
mod ring;
pub mod verify;
mod wire;

pub use cluster::{Cluster, DEFAULT_TIMEOUT, free_loopback_ports};
pub use decode::Decoder;
pub use error::DistributedError;
pub use exchange::Peer;
pub use plan::Plan;
pub use ring::{RingOptions, RingOutput, RingStats, ring_deviation_bound};
pub use wire::Wire;
