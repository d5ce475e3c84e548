//! Attention on whole matrices, in row chunks so that a progress bar can advance.
//!
//! Query rows are independent, so `run` may compute them a chunk at a time: each chunk is
//! one call on `q.rows(r0, len)` with [`AttentionOptions::with_query_rows`]`(r0, n_q)`
//! (so causal, window and ALiBi see each row at its place in the whole call) and the
//! matching rows of the mask and bias, written straight into the rows of the output. The
//! chunk rule ([`chunk_ranges`]) keeps the result bitwise equal to one call.

use std::io::IsTerminal;
use std::ops::Range;

use attention_core::{
    AsMatRef, AttentionError, AttentionOptions, Causal, MatRef, Operand,
    scaled_dot_product_attention_into, scaled_dot_product_attention_with_lse,
};
use indicatif::{ProgressBar, ProgressStyle};
use nalgebra::{DMatrix, DVector};

use crate::npy::NpyFloat;
use crate::{Error, Result};

/// Rows per chunk unless `--chunk-rows` says otherwise.
pub const DEFAULT_CHUNK_ROWS: usize = 1024;

/// Chunks start at multiples of this many rows: the kernels' query blocks are 64 rows,
/// and the core gives the same bits as one call only for chunks that start on a block
/// boundary (see `AttentionOptions::with_query_rows`).
pub const CHUNK_ALIGN: usize = 64;

/// Keys up to this many may take the core's row-at-a-time route for a small chunk and the
/// block kernel for the whole call; such calls are not chunked.
const MIN_CHUNKED_KEYS: usize = 64;

/// The attention options of the command line, before the data's float type is known.
///
/// Numbers are kept as typed and parsed in the data's type when a call is made (so that
/// `--scale 0.1` is the float32 or float64 nearest to 0.1, as in numpy).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct OptionArgs {
    /// `--causal top-left|bottom-right`.
    pub causal: Option<Causal>,
    /// `--scale S`.
    pub scale: Option<String>,
    /// `--window L,R` (`-1` for an unbounded side, stored as `usize::MAX`).
    pub window: Option<(usize, usize)>,
    /// `--softcap C`.
    pub softcap: Option<String>,
    /// `--alibi M`.
    pub alibi: Option<String>,
    /// Whether `--mask` was given (for [`describe`](Self::describe)).
    pub mask: bool,
    /// Whether `--bias` was given (for [`describe`](Self::describe)).
    pub bias: bool,
}

impl OptionArgs {
    /// The core's options for these arguments, with the given mask and bias.
    ///
    /// # Errors
    /// A number that does not parse as `T` (the command line checks them as f64 first, so
    /// this does not happen in practice).
    pub fn options<'a, T: NpyFloat>(
        &self,
        mask: Option<MatRef<'a, bool>>,
        bias: Option<MatRef<'a, T>>,
    ) -> Result<AttentionOptions<'a, T>> {
        let mut options = AttentionOptions::new();
        if let Some(causal) = self.causal {
            options = options.with_causal(causal);
        }
        if let Some(s) = &self.scale {
            options = options.with_scale(parse_number("--scale", s)?);
        }
        if let Some((left, right)) = self.window {
            options = options.with_window(left, right);
        }
        if let Some(c) = &self.softcap {
            options = options.with_softcap(parse_number("--softcap", c)?);
        }
        if let Some(m) = &self.alibi {
            options = options.with_alibi_slope(parse_number("--alibi", m)?);
        }
        if let Some(mask) = mask {
            options = options.with_mask(mask);
        }
        if let Some(bias) = bias {
            options = options.with_bias(bias);
        }
        Ok(options)
    }

    /// The options in words for a heatmap's title, e.g. `causal top-left, ALiBi 0.5`
    /// (empty when there are none).
    pub fn describe(&self) -> String {
        let side = |n: usize| {
            if n == usize::MAX {
                "∞".to_string()
            } else {
                n.to_string()
            }
        };
        let mut parts = Vec::new();
        match self.causal {
            Some(Causal::TopLeft) => parts.push("causal top-left".to_string()),
            Some(Causal::BottomRight) => parts.push("causal bottom-right".to_string()),
            _ => {}
        }
        if let Some(s) = &self.scale {
            parts.push(format!("scale {s}"));
        }
        if let Some((l, r)) = self.window {
            parts.push(format!("window {},{}", side(l), side(r)));
        }
        if let Some(c) = &self.softcap {
            parts.push(format!("softcap {c}"));
        }
        if let Some(m) = &self.alibi {
            parts.push(format!("ALiBi {m}"));
        }
        if self.mask {
            parts.push("mask".to_string());
        }
        if self.bias {
            parts.push("bias".to_string());
        }
        parts.join(", ")
    }
}

/// `text` as a `T`, or an error naming the option.
fn parse_number<T: NpyFloat>(option: &str, text: &str) -> Result<T> {
    text.parse()
        .map_err(|_| Error(format!("{option}: '{text}' is not a number")))
}

/// The row ranges `run` computes one call each: one range for the whole matrix, or, when
/// `n_q ≥ 2·chunk_rows` and `n_kv > 64`, chunks of `chunk_rows` rows of which the last
/// takes the remainder (so it has between `chunk_rows` and `2·chunk_rows − 1` rows).
///
/// Every chunk then starts at a multiple of `chunk_rows` (a multiple of
/// [`CHUNK_ALIGN`]) and is at least as large as the smallest block-kernel call, so each
/// takes the same kernel route as the whole call and the rows come out bitwise equal.
///
/// # Panics
/// If `chunk_rows` is not a positive multiple of [`CHUNK_ALIGN`] (the command line checks).
pub fn chunk_ranges(n_q: usize, n_kv: usize, chunk_rows: usize) -> Vec<Range<usize>> {
    assert!(chunk_rows >= CHUNK_ALIGN && chunk_rows.is_multiple_of(CHUNK_ALIGN));
    if n_q < 2 * chunk_rows || n_kv <= MIN_CHUNKED_KEYS {
        return std::iter::once(0..n_q).collect();
    }
    let count = n_q / chunk_rows;
    (0..count)
        .map(|c| {
            let end = if c + 1 == count {
                n_q
            } else {
                (c + 1) * chunk_rows
            };
            c * chunk_rows..end
        })
        .collect()
}

/// The output of `run`: `n_q × d_v`, and the log-sum-exp (`n_q`) when asked for.
#[derive(Clone, Debug, PartialEq)]
pub struct Attended<T: NpyFloat> {
    /// `softmax(s)·V`.
    pub output: DMatrix<T>,
    /// Each query's log-sum-exp, when asked for.
    pub lse: Option<DVector<T>>,
}

/// The inputs of one attention call as read from files.
#[derive(Clone, Copy, Debug)]
pub struct Inputs<'a, T: NpyFloat> {
    /// Q, `n_q × d_k`.
    pub q: &'a DMatrix<T>,
    /// K, `n_kv × d_k`.
    pub k: &'a DMatrix<T>,
    /// V, `n_kv × d_v`.
    pub v: &'a DMatrix<T>,
    /// The boolean mask (`true` = may attend), `n_q × n_kv`.
    pub mask: Option<&'a DMatrix<bool>>,
    /// The additive bias, `n_q × n_kv`.
    pub bias: Option<&'a DMatrix<T>>,
}

/// Scaled dot-product attention, in the row chunks of [`chunk_ranges`] of `chunk_rows`
/// rows, with a [`progress_bar`] when `show_progress` (and stderr is a terminal). The
/// result is bitwise that of one call.
///
/// # Errors
/// The core's errors, with row numbers counted in the whole query matrix. A mask or bias
/// whose row count is not `n_q` is given to one whole call, so that the core's message
/// reports the real sizes.
pub fn attend<T: NpyFloat>(
    inputs: Inputs<'_, T>,
    args: &OptionArgs,
    with_lse: bool,
    chunk_rows: usize,
    show_progress: bool,
) -> Result<Attended<T>> {
    let Inputs {
        q,
        k,
        v,
        mask,
        bias,
    } = inputs;
    let n_q = q.nrows();
    let rows_match = mask.is_none_or(|m| m.nrows() == n_q) && bias.is_none_or(|b| b.nrows() == n_q);
    let ranges = if rows_match {
        chunk_ranges(n_q, k.nrows(), chunk_rows)
    } else {
        std::iter::once(0..n_q).collect()
    };
    let progress = if show_progress {
        progress_bar(n_q, ranges.len())
    } else {
        ProgressBar::hidden()
    };
    let mut output = DMatrix::zeros(n_q, v.ncols());
    let mut lse = with_lse.then(|| DVector::zeros(n_q));
    for rows in ranges {
        let (r0, len) = (rows.start, rows.len());
        let whole = len == n_q;
        let options = if whole {
            // Unsliced, so that a mask or bias of the wrong size reaches the core as it is.
            args.options(
                mask.map(|m| m.into_mat_ref()),
                bias.map(|b| b.into_mat_ref()),
            )?
        } else {
            args.options(
                mask.map(|m| m.rows(r0, len).into_mat_ref()),
                bias.map(|b| b.rows(r0, len).into_mat_ref()),
            )?
            .with_query_rows(r0, n_q)
        };
        let q_rows = q.rows(r0, len);
        let result = match &mut lse {
            None => {
                scaled_dot_product_attention_into(q_rows, k, v, &options, output.rows_mut(r0, len))
            }
            // The core has no `_into` form with the log-sum-exp: copy the chunk's result.
            Some(lse) => {
                scaled_dot_product_attention_with_lse(q_rows, k, v, &options).map(|(o, l)| {
                    output.rows_mut(r0, len).copy_from(&o);
                    lse.rows_mut(r0, len).copy_from(&l);
                })
            }
        };
        result.map_err(|e| in_whole_call(e, r0))?;
        progress.inc(len as u64);
    }
    progress.finish_and_clear();
    Ok(Attended { output, lse })
}

/// An error of the chunk starting at row `r0`, with its query rows counted in the whole
/// query matrix (as one call would have reported them).
fn in_whole_call(e: AttentionError, r0: usize) -> AttentionError {
    match e {
        AttentionError::NonFinite {
            operand: operand @ (Operand::Query | Operand::Bias),
            row,
            column,
            value,
        } => AttentionError::NonFinite {
            operand,
            row: row + r0,
            column,
            value,
        },
        AttentionError::ScoreOverflow { query, key } => AttentionError::ScoreOverflow {
            query: query + r0,
            key,
        },
        e => e,
    }
}

/// A progress bar on stderr over `n_q` rows when stderr is a terminal and the work comes
/// in more than one chunk; a hidden one otherwise.
pub fn progress_bar(n_q: usize, chunks: usize) -> ProgressBar {
    if chunks < 2 || !std::io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(n_q as u64);
    let style =
        ProgressStyle::with_template("{bar:40} {pos}/{len} query rows, {elapsed} (ETA {eta})")
            .expect("a valid template");
    bar.set_style(style);
    bar
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_have_chunk_rows_rows_but_the_last_which_takes_the_rest() {
        assert_eq!(chunk_ranges(127, 100, 64), vec![0..127]);
        assert_eq!(chunk_ranges(128, 100, 64), vec![0..64, 64..128]);
        assert_eq!(
            chunk_ranges(300, 100, 64),
            vec![0..64, 64..128, 128..192, 192..300]
        );
        assert_eq!(chunk_ranges(5000, 100, 1024).last(), Some(&(3072..5000)));
        // Few keys: one call.
        assert_eq!(chunk_ranges(300, 64, 64), vec![0..300]);
        assert_eq!(chunk_ranges(0, 100, 64), vec![0..0]);
    }
}
