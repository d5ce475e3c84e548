//! The handshake every distributed call starts with: each worker tells every other what
//! problem it was given (or why it cannot take part) before any work.

use attention_core::{AttentionError, Element, MatRef, Operand};
use serde::{Deserialize, Serialize};

use crate::error::DistributedError;
use crate::exchange::Peer;

/// A worker's description of its call, to every worker.
#[derive(Clone, Serialize, Deserialize)]
struct Hello {
    from: usize,
    /// (field, value) pairs every worker must agree on.
    problem: Vec<(String, String)>,
    /// How many rows (tokens) this worker holds.
    rows: usize,
    /// Why this worker cannot take part (its inputs broke a rule), if so.
    failure: Option<String>,
}

impl Peer<'_> {
    /// Exchanges every worker's problem, row count and failure. Returns every worker's row
    /// count in worker order once all agree; otherwise this worker's own error, or
    /// [`DistributedError::PeerFailed`] for the first worker that failed, or
    /// [`DistributedError::Mismatch`] for the first field that differs. Every worker takes
    /// the same decision, so none is left waiting.
    pub(crate) fn handshake(
        &mut self,
        problem: &[(String, String)],
        rows: usize,
        failure: Option<DistributedError>,
    ) -> Result<Vec<usize>, DistributedError> {
        let mut channel = self.channel::<Hello>();
        let me = channel.index();
        let hello = Hello {
            from: me,
            problem: problem.to_vec(),
            rows,
            failure: failure.as_ref().map(ToString::to_string),
        };
        let all = channel.all_gather(
            hello,
            |h, other| h.from == other,
            |other| format!("the problem description of worker {other}"),
        )?;
        channel.close()?;
        if let Some(e) = failure {
            return Err(e);
        }
        if let Some(h) = all.iter().find(|h| h.failure.is_some()) {
            return Err(DistributedError::PeerFailed {
                worker: h.from,
                message: h.failure.clone().unwrap_or_default(),
            });
        }
        for h in &all {
            check_same(problem, &h.problem, h.from)?;
        }
        Ok(all.iter().map(|h| h.rows).collect())
    }
}

/// The first field where `theirs` (worker `other`'s) differs from `ours`.
fn check_same(
    ours: &[(String, String)],
    theirs: &[(String, String)],
    other: usize,
) -> Result<(), DistributedError> {
    for (i, (field, value)) in ours.iter().enumerate() {
        let found = theirs.get(i).filter(|(f, _)| f == field).map(|(_, v)| v);
        if found != Some(value) {
            return Err(DistributedError::Mismatch {
                field: field.clone(),
                ours: value.clone(),
                other_worker: other,
                theirs: found.cloned().unwrap_or_else(|| "nothing".to_owned()),
            });
        }
    }
    Ok(())
}

/// [`AttentionError::NonFinite`] for the first NaN or ±∞ of `m` in column-major order
/// (`row` counts the rows of `m`, this worker's part).
pub(crate) fn check_finite<T: Element>(
    operand: Operand,
    m: MatRef<'_, T>,
) -> Result<(), AttentionError> {
    for (column, c) in m.column_iter().enumerate() {
        if let Some(row) = c.iter().position(|x| !x.finite()) {
            return Err(AttentionError::NonFinite {
                operand,
                row,
                column,
                value: c[row].to_f64(),
            });
        }
    }
    Ok(())
}
