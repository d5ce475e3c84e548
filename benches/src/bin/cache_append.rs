//! KV-cache appends are O(1) per token: 65536 single-token appends (8 KV heads × d 128,
//! f32, pages of 256 tokens, the default), timed in blocks of 4096, printed as nanoseconds
//! per append per block. Two passes: into a fresh cache (pages allocated as it grows) and
//! into a new sequence after the first was removed (pages reused from the pool).
//!
//! ```text
//! cargo run --release -p attention-benches --bin cache_append
//! ```
//! Flat means the last block costs about what the first does: no append copies old
//! tokens (the table's `max/min` column is the largest block time over the smallest).

use std::hint::black_box;
use std::time::Instant;

use attention_benches::normal_matrix;
use attention_core::KvCache;
use nalgebra::DMatrix;

const TOKENS: usize = 65536;
const BLOCK: usize = 4096;
const HEADS: usize = 8;
const D: usize = 128;

/// Nanoseconds per append of each block of `BLOCK` appends of the `tokens` (cycled).
fn pass(cache: &mut KvCache<f32>, tokens: &[(DMatrix<f32>, DMatrix<f32>)]) -> Vec<f64> {
    let seq = cache.add_sequence();
    let mut times = Vec::new();
    for block in 0..TOKENS / BLOCK {
        let start = Instant::now();
        for t in 0..BLOCK {
            let (k, v) = &tokens[(block * BLOCK + t) % tokens.len()];
            cache
                .append(seq, k, v)
                .expect("finite rows of the right shape");
        }
        times.push(start.elapsed().as_nanos() as f64 / BLOCK as f64);
    }
    black_box(cache.len(seq).expect("the sequence exists"));
    times
}

fn main() {
    // Each token's K and V as its own 1-row matrix, as a decoding step produces them
    // (a row of a bigger column-major matrix would be strided).
    let keys = normal_matrix(256, HEADS * D, 1);
    let values = normal_matrix(256, HEADS * D, 2);
    let tokens: Vec<_> = (0..256)
        .map(|r| {
            let k: DMatrix<f32> = keys.rows(r, 1).map(|x| x as f32);
            let v: DMatrix<f32> = values.rows(r, 1).map(|x| x as f32);
            (k, v)
        })
        .collect();
    let mut cache = KvCache::<f32>::new(HEADS, D, D).expect("a valid cache");
    let fresh = pass(&mut cache, &tokens);
    let first = cache.sequences().next().expect("one sequence");
    let memory = cache.memory_bytes();
    cache.remove(first).expect("the sequence exists");
    let reused = pass(&mut cache, &tokens);
    assert_eq!(
        cache.memory_bytes(),
        memory,
        "the second pass reuses the pool"
    );

    println!(
        "KvCache<f32>: {TOKENS} single-token appends, {HEADS} KV heads x d {D}, pages of {}",
        cache.page_size()
    );
    println!(
        "{:>14} {:>14} {:>14}",
        "tokens before", "fresh ns/app", "reused ns/app"
    );
    for (b, (f, r)) in fresh.iter().zip(&reused).enumerate() {
        println!("{:>14} {f:>14.1} {r:>14.1}", b * BLOCK);
    }
    let ratio = |t: &[f64]| {
        t.iter().copied().fold(0.0, f64::max) / t.iter().copied().fold(f64::INFINITY, f64::min)
    };
    println!(
        "max/min over blocks: fresh {:.2}, reused {:.2}; memory {} bytes for {} bytes of K and V",
        ratio(&fresh),
        ratio(&reused),
        memory,
        TOKENS * 2 * HEADS * D * 4
    );
}
