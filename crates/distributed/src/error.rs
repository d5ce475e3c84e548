//! The errors of a distributed run: each names what was wrong or whom it waited for.

use std::fmt;
use std::time::Duration;

use attention_core::AttentionError;

/// Why a distributed run failed.
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub enum DistributedError {
    /// The cluster's configuration breaks a rule before anything started: `setting` is the
    /// flag or field (`"-p"`, `"hostfile"`, `"workers"`, …) and `rule` what it must obey.
    Config {
        /// The flag or field.
        setting: String,
        /// The rule it breaks, with the values found.
        rule: String,
    },
    /// Two workers were given different problems (checked before any work): `field` of
    /// worker `theirs_worker` is `theirs`, this worker's is `ours`.
    Mismatch {
        /// The field that differs: `"heads_q"`, `"d_k"`, `"sequence length"`, ….
        field: String,
        /// This worker's value.
        ours: String,
        /// The other worker.
        other_worker: usize,
        /// The other worker's value.
        theirs: String,
    },
    /// Another worker could not take part: its inputs broke a rule (checked by every
    /// worker before any work). `message` is that worker's own error.
    PeerFailed {
        /// The worker that failed.
        worker: usize,
        /// Its error.
        message: String,
    },
    /// A worker's input breaks a shape rule of the distributed call (its rows are not those
    /// the plan gives it, a decoding step is not one row, …).
    Shape {
        /// The operand.
        operand: &'static str,
        /// The rule, with the values found.
        rule: String,
    },
    /// Nothing arrived from a peer within the watchdog's timeout: it exited, hangs, or is
    /// unreachable. `waiting_for` says what this worker was waiting for, from whom.
    Timeout {
        /// What was awaited, e.g. "the K/V block of step 1 from worker 2".
        waiting_for: String,
        /// How long this worker waited.
        waited: Duration,
    },
    /// The engine's connection to a peer failed while running (the peer's process exited
    /// or the network dropped): timely's network thread reported `message`.
    PeerLost {
        /// The engine's report.
        message: String,
    },
    /// The engine could not start (e.g. an address it could not listen on).
    Engine {
        /// The engine's report.
        message: String,
    },
    /// A local attention call or merge failed (non-finite inputs, sizes too large, …).
    Attention(AttentionError),
}

impl fmt::Display for DistributedError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Config { setting, rule } => write!(f, "configuration: {setting}: {rule}"),
            Self::Mismatch {
                field,
                ours,
                other_worker,
                theirs,
            } => write!(
                f,
                "workers disagree on {field}: this worker has {ours}, worker {other_worker} has \
                 {theirs} (every worker must be given the same problem)"
            ),
            Self::PeerFailed { worker, message } => write!(f, "worker {worker} failed: {message}"),
            Self::Shape { operand, rule } => write!(f, "{operand}: {rule}"),
            Self::Timeout {
                waiting_for,
                waited,
            } => write!(
                f,
                "no progress for {:.1} s while waiting for {waiting_for}: a peer exited, hangs \
                 or is unreachable",
                waited.as_secs_f64()
            ),
            Self::PeerLost { message } => write!(f, "lost a peer: {message}"),
            Self::Engine { message } => write!(f, "the engine failed to start: {message}"),
            Self::Attention(e) => write!(f, "attention: {e}"),
        }
    }
}

impl std::error::Error for DistributedError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Self::Attention(e) => Some(e),
            _ => None,
        }
    }
}

impl From<AttentionError> for DistributedError {
    fn from(e: AttentionError) -> Self {
        Self::Attention(e)
    }
}

/// A [`DistributedError::Config`].
pub(crate) fn config(setting: &str, rule: impl Into<String>) -> DistributedError {
    DistributedError::Config {
        setting: setting.to_owned(),
        rule: rule.into(),
    }
}
