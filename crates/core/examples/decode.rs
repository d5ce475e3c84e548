//! A toy decoder-only model generating tokens through per-layer KV caches: random
//! weights, a few layers of `MultiHeadAttention` with RoPE and grouped-query heads (no
//! MLP: attention blocks with RMS normalisation and residuals), a prompt prefilled in one
//! call, then one token at a time, the next token being the argmax of the last hidden
//! state's logits (a random unembedding). Prints the tokens and tokens/s.
//!
//! Run with `cargo run --release --example decode [prompt] [new] [layers] [d_model]`
//! (defaults 16 32 2 128: 8 query heads of width 16 over 2 key/value heads; well under a
//! second even unoptimised). Heads are 64 wide from d_model 512 on:
//! `cargo run --release --example decode 512 256 8 1024` is closer to a real model's
//! shapes (16 query heads of 64 over 4 key/value heads).

use std::time::Instant;

use attention_core::{AttentionError, AttentionOptions, KvCache, MultiHeadAttention, Rope, SeqId};
use attention_testdata::gaussian;
use nalgebra::{DMatrix, RowDVector};

const VOCAB: usize = 256;

/// A random `rows × cols` matrix in f32, N(0, 1/rows) entries (unit-variance outputs).
fn weight(rows: usize, cols: usize, seed: u64) -> DMatrix<f32> {
    gaussian(rows, cols, 1.0 / (rows as f64).sqrt(), seed).map(|x| x as f32)
}

/// Each row scaled to unit root-mean-square (RMSNorm without a gain).
fn rms_norm(x: &DMatrix<f32>) -> DMatrix<f32> {
    let mut y = x.clone();
    for mut row in y.row_iter_mut() {
        let rms = (row.norm_squared() / row.len() as f32).sqrt().max(1e-6);
        row /= rms;
    }
    y
}

struct Model {
    embedding: DMatrix<f32>,
    layers: Vec<MultiHeadAttention<f32>>,
    unembedding: DMatrix<f32>,
}

impl Model {
    fn new(layers: usize, d_model: usize) -> Result<Model, AttentionError> {
        let d_head = if d_model >= 512 { 64 } else { 16.min(d_model) };
        let heads_q = (d_model / d_head).max(1);
        // Grouped-query: 4 query heads per key/value head where they divide.
        let heads_kv = if heads_q.is_multiple_of(4) {
            heads_q / 4
        } else {
            1
        };
        let layers = (0..layers as u64)
            .map(|l| {
                let s = 10 * l;
                MultiHeadAttention::new(
                    heads_q,
                    heads_kv,
                    weight(d_model, heads_q * d_head, s + 1),
                    weight(d_model, heads_kv * d_head, s + 2),
                    weight(d_model, heads_kv * d_head, s + 3),
                    weight(heads_q * d_head, d_model, s + 4),
                )?
                .with_rope(Rope::new(d_head).with_base(10_000.0))
            })
            .collect::<Result<_, _>>()?;
        Ok(Model {
            embedding: weight(VOCAB, d_model, 0) * (d_model as f32).sqrt(),
            layers,
            unembedding: weight(d_model, VOCAB, 5),
        })
    }

    /// One cache per layer, for the layer's key/value heads, each holding the sequence.
    fn caches(&self) -> Result<Vec<(KvCache<f32>, SeqId)>, AttentionError> {
        self.layers
            .iter()
            .map(|l| {
                let mut cache = KvCache::new(l.heads_kv(), l.d_head(), l.d_v())?;
                let seq = cache.add_sequence();
                Ok((cache, seq))
            })
            .collect()
    }

    /// Runs `tokens` (the sequence's next ones) through every layer, appending their
    /// keys and values to the caches; returns the next token.
    fn step(
        &self,
        tokens: &[usize],
        caches: &mut [(KvCache<f32>, SeqId)],
    ) -> Result<usize, AttentionError> {
        let rows: Vec<RowDVector<f32>> = tokens
            .iter()
            .map(|&t| self.embedding.row(t).into_owned())
            .collect();
        let mut h = DMatrix::from_rows(&rows);
        let options = AttentionOptions::new();
        for (layer, (cache, seq)) in self.layers.iter().zip(caches) {
            h += layer.forward_cached(&rms_norm(&h), cache, *seq, &options)?;
        }
        let last = rms_norm(&h.rows(h.nrows() - 1, 1).into_owned());
        let logits = last * &self.unembedding;
        // The first largest logit (logits are finite: every layer checked its output).
        let best = (0..VOCAB).fold(0, |b, t| if logits[t] > logits[b] { t } else { b });
        Ok(best)
    }
}

fn arg(args: &[String], i: usize, default: usize) -> usize {
    args.get(i).map_or(default, |a| {
        a.parse()
            .unwrap_or_else(|_| panic!("argument {i} ({a}) is not a count"))
    })
}

fn main() -> Result<(), AttentionError> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (prompt_len, new, layers, d_model) = (
        arg(&args, 0, 16).max(1),
        arg(&args, 1, 32),
        arg(&args, 2, 2).max(1),
        arg(&args, 3, 128),
    );
    let model = Model::new(layers, d_model)?;
    let l = &model.layers[0];
    println!(
        "{layers} layers, d_model {d_model}, {} query heads over {} key/value heads of width {}, RoPE; vocabulary {VOCAB}",
        l.heads_q(),
        l.heads_kv(),
        l.d_head()
    );
    let mut caches = model.caches()?;
    let prompt: Vec<usize> = (0..prompt_len).map(|i| (i * 37 + 11) % VOCAB).collect();

    let start = Instant::now();
    let mut next = model.step(&prompt, &mut caches)?;
    let prefill = start.elapsed();
    let mut generated = vec![next];
    let start = Instant::now();
    for _ in 1..new {
        next = model.step(&[next], &mut caches)?;
        generated.push(next);
    }
    let decode = start.elapsed();

    println!("prompt:    {prompt:?}");
    println!("generated: {generated:?}");
    println!(
        "prefill: {prompt_len} tokens in {:.2} ms ({:.0} tokens/s)",
        prefill.as_secs_f64() * 1e3,
        prompt_len as f64 / prefill.as_secs_f64()
    );
    let steps = new.saturating_sub(1);
    if steps > 0 {
        println!(
            "decode:  {steps} tokens in {:.2} ms ({:.0} tokens/s, {:.3} ms per token at up to {} cached tokens)",
            decode.as_secs_f64() * 1e3,
            steps as f64 / decode.as_secs_f64(),
            decode.as_secs_f64() * 1e3 / steps as f64,
            prompt_len + steps
        );
    }
    Ok(())
}
