//! Which rows each worker holds: the zig-zag split of one sequence over `P` workers.

use std::ops::Range;

use crate::error::{DistributedError, config};

/// The zig-zag (striped) assignment of a sequence of `n` tokens to `P` workers.
///
/// The sequence is cut into `2P` contiguous chunks; the first `n mod 2P` chunks have
/// `⌊n/2P⌋ + 1` tokens and the others `⌊n/2P⌋`, so any `n ≥ 0` is accepted. Worker `w`
/// holds chunks `w` and `2P − 1 − w`: the same rows of Q, K and V (and of the output).
///
/// Why: under a causal mask, query row `i` sees `i + 1` keys, so the work of a row grows
/// with its position. A contiguous split gives worker `P − 1` about `2P − 1` times the
/// work of worker 0; pairing an early chunk with a late one gives every worker about
/// `n²/(2P)` allowed (query, key) pairs ([`Plan::causal_pairs`]).
///
/// # Example
/// ```
/// use attention_distributed::Plan;
///
/// let plan = Plan::zigzag(10, 2)?; // chunks of 3, 3, 2, 2 rows
/// assert_eq!(plan.rows(0), [0..3, 8..10]);
/// assert_eq!(plan.rows(1), [3..6, 6..8]);
/// // Causal work: worker 0 has (1+2+3) + (9+10) = 25 pairs, worker 1 (4+5+6) + (7+8) = 30.
/// assert_eq!((plan.causal_pairs(0), plan.causal_pairs(1)), (25, 30));
/// # Ok::<(), attention_distributed::DistributedError>(())
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Plan {
    n: usize,
    workers: usize,
    /// The `2P` chunks, in sequence order.
    chunks: Vec<Range<usize>>,
}

impl Plan {
    /// The zig-zag plan of `n` tokens over `workers` workers.
    ///
    /// # Errors
    /// [`DistributedError::Config`] when `workers` is 0.
    pub fn zigzag(n: usize, workers: usize) -> Result<Self, DistributedError> {
        if workers == 0 {
            return Err(config("workers", "at least one worker"));
        }
        let count = 2 * workers;
        let (base, extra) = (n / count, n % count);
        let mut start = 0;
        let chunks = (0..count)
            .map(|c| {
                let len = base + usize::from(c < extra);
                let r = start..start + len;
                start += len;
                r
            })
            .collect();
        Ok(Self { n, workers, chunks })
    }

    /// The sequence length `n`.
    #[must_use]
    pub fn len(&self) -> usize {
        self.n
    }

    /// Whether the sequence is empty.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.n == 0
    }

    /// The number of workers `P`.
    #[must_use]
    pub fn workers(&self) -> usize {
        self.workers
    }

    /// The two chunk numbers of worker `w`: `w` and `2P − 1 − w`.
    ///
    /// # Panics
    /// If `w ≥ P`.
    #[must_use]
    pub fn chunks(&self, w: usize) -> [usize; 2] {
        assert!(w < self.workers, "worker {w} of {}", self.workers);
        [w, 2 * self.workers - 1 - w]
    }

    /// The token range of chunk `c` (`c < 2P`).
    ///
    /// # Panics
    /// If `c ≥ 2P`.
    #[must_use]
    pub fn chunk(&self, c: usize) -> Range<usize> {
        self.chunks[c].clone()
    }

    /// The two token ranges worker `w` holds, in this order in its shard.
    ///
    /// # Panics
    /// If `w ≥ P`.
    #[must_use]
    pub fn rows(&self, w: usize) -> [Range<usize>; 2] {
        self.chunks(w).map(|c| self.chunk(c))
    }

    /// How many tokens worker `w` holds.
    ///
    /// # Panics
    /// If `w ≥ P`.
    #[must_use]
    pub fn row_count(&self, w: usize) -> usize {
        self.rows(w).iter().map(ExactSizeIterator::len).sum()
    }

    /// The (query, key) pairs worker `w` computes without a mask: its rows × `n`.
    ///
    /// # Panics
    /// If `w ≥ P`.
    #[must_use]
    pub fn pairs(&self, w: usize) -> u64 {
        self.row_count(w) as u64 * self.n as u64
    }

    /// The allowed (query, key) pairs of worker `w` under a causal mask: a row at position
    /// `i` sees keys `0..=i`, so a chunk `s..s + L` has `L·s + L(L + 1)/2`.
    ///
    /// # Panics
    /// If `w ≥ P`.
    #[must_use]
    pub fn causal_pairs(&self, w: usize) -> u64 {
        self.rows(w)
            .iter()
            .map(|r| {
                let (s, l) = (r.start as u64, r.len() as u64);
                l * s + l * (l + 1) / 2
            })
            .sum()
    }
}
