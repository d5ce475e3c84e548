//! A worker's view of the run ([`Peer`]) and the one exchange pattern every distributed
//! call uses ([`Channel`]): messages addressed to workers, routed by timely's `Exchange`
//! pact, kept in an inbox until the worker asks for them, every wait under the watchdog.

use std::cell::RefCell;
use std::rc::Rc;
use std::time::{Duration, Instant};

use timely::ExchangeData;
use timely::dataflow::channels::pact::Pipeline;
use timely::dataflow::operators::generic::operator::Operator;
use timely::dataflow::operators::{Exchange, Input, Probe};
use timely::dataflow::{InputHandleVec, ProbeHandle};
use timely::worker::Worker;

use crate::cluster::network_failure;
use crate::error::DistributedError;

/// One worker of a run, as [`Cluster::run`](crate::Cluster::run) hands it to the closure:
/// its index among all workers, their number, and the distributed calls.
pub struct Peer<'w> {
    worker: &'w mut Worker,
    timeout: Duration,
    /// Workers per process: process `p` runs workers `p·threads .. (p + 1)·threads`.
    threads: usize,
}

impl<'w> Peer<'w> {
    pub(crate) fn new(worker: &'w mut Worker, timeout: Duration, threads: usize) -> Self {
        Self {
            worker,
            timeout,
            threads: threads.max(1),
        }
    }

    /// Whether worker `other` runs in this process (its messages then move between
    /// threads as they are, without being encoded).
    pub(crate) fn same_process(&self, other: usize) -> bool {
        other / self.threads == self.index() / self.threads
    }

    /// This worker's index, `0 .. workers()`.
    #[must_use]
    pub fn index(&self) -> usize {
        self.worker.index()
    }

    /// The number of workers in the run (all processes).
    #[must_use]
    pub fn workers(&self) -> usize {
        self.worker.peers()
    }

    /// Waits until every worker has reached its own call of `barrier` (e.g. to start a
    /// timing together: processes connect and start at different moments).
    ///
    /// # Errors
    /// [`DistributedError::Timeout`] / [`DistributedError::PeerLost`] from the watchdog.
    pub fn barrier(&mut self) -> Result<(), DistributedError> {
        let mut channel = self.channel::<usize>();
        let me = channel.index();
        channel.all_gather(
            me,
            |&from, other| from == other,
            |other| format!("worker {other} at the barrier"),
        )?;
        channel.close()
    }

    /// A new exchange of messages of type `M` among all workers. Every worker must open
    /// its channels in the same order (timely builds one dataflow per channel).
    pub(crate) fn channel<M: ExchangeData + Clone>(&mut self) -> Channel<'_, M> {
        let mut input = InputHandleVec::<u64, (u64, M)>::new();
        let probe = ProbeHandle::new();
        let inbox = Rc::new(RefCell::new(Vec::new()));
        let sink = Rc::clone(&inbox);
        self.worker.dataflow::<u64, _, _>(|scope| {
            scope
                .input_from(&mut input)
                .exchange(|(to, _): &(u64, M)| *to)
                .probe_with(&probe)
                .sink(Pipeline, "Inbox", move |(input, _)| {
                    input.for_each(|_, data: &mut Vec<(u64, M)>| {
                        sink.borrow_mut().extend(data.drain(..).map(|(_, m)| m));
                    });
                });
        });
        Channel {
            worker: self.worker,
            input: Some(input),
            probe,
            inbox,
            round: 0,
            timeout: self.timeout,
        }
    }
}

/// Messages of type `M` to any worker; see [`Peer::channel`].
pub(crate) struct Channel<'a, M: ExchangeData + Clone> {
    worker: &'a mut Worker,
    input: Option<InputHandleVec<u64, (u64, M)>>,
    probe: ProbeHandle<u64>,
    inbox: Rc<RefCell<Vec<M>>>,
    round: u64,
    timeout: Duration,
}

impl<M: ExchangeData + Clone> Channel<'_, M> {
    /// This worker's index.
    pub(crate) fn index(&self) -> usize {
        self.worker.index()
    }

    /// The number of workers.
    pub(crate) fn workers(&self) -> usize {
        self.worker.peers()
    }

    /// Queues `message` for worker `to` (sent at the next [`flush`](Self::flush)).
    pub(crate) fn send(&mut self, to: usize, message: M) {
        if let Some(input) = &mut self.input {
            input.send((to as u64, message));
        }
    }

    /// Sends `message` to worker `to` as a network message of its own (the engine batches
    /// the records of one round into one message, and its receiving side grows a buffer
    /// to the size of the largest message: large payloads go in pieces, each alone), and
    /// lets the engine start moving it.
    pub(crate) fn send_alone(&mut self, to: usize, message: M) {
        self.send(to, message);
        self.flush();
    }

    /// Hands every queued message to the engine and lets it start sending them: the
    /// network threads then move the bytes while this worker computes.
    pub(crate) fn flush(&mut self) {
        self.round += 1;
        if let Some(input) = &mut self.input {
            input.advance_to(self.round);
        }
        self.worker.step();
    }

    /// Waits for the first message in the inbox that `wanted` accepts, removes and returns
    /// it. `what` describes it for the watchdog's error, whose timeout counts from this
    /// call. `waiting_since` is when the caller began to wait for what it needs (the
    /// pieces of one block share it): the worker spins only in the millisecond after it,
    /// then parks between steps.
    pub(crate) fn receive(
        &mut self,
        waiting_since: Instant,
        mut wanted: impl FnMut(&M) -> bool,
        what: impl Fn() -> String,
    ) -> Result<M, DistributedError> {
        let start = Instant::now();
        loop {
            {
                let mut inbox = self.inbox.borrow_mut();
                if let Some(i) = inbox.iter().position(&mut wanted) {
                    return Ok(inbox.remove(i));
                }
            }
            self.check(start, &what)?;
            self.worker.step_or_park(Some(pause(waiting_since)));
        }
    }

    /// Sends `message` to every worker (this one included) and returns what every worker
    /// sent, in worker order: the message `is_from(m, w)` accepts for each worker `w`.
    /// `what(w)` describes worker `w`'s message for the watchdog's error.
    pub(crate) fn all_gather(
        &mut self,
        message: M,
        is_from: impl Fn(&M, usize) -> bool,
        what: impl Fn(usize) -> String,
    ) -> Result<Vec<M>, DistributedError> {
        for to in 0..self.workers() {
            self.send(to, message.clone());
        }
        self.flush();
        let start = Instant::now();
        (0..self.workers())
            .map(|other| self.receive(start, |m| is_from(m, other), || what(other)))
            .collect()
    }

    /// Closes this worker's side and waits until every worker has closed theirs and every
    /// message has been delivered: after this, no peer needs anything from this worker.
    pub(crate) fn close(mut self) -> Result<(), DistributedError> {
        self.input = None;
        let start = Instant::now();
        while !self.probe.done() {
            self.check(start, &|| "the other workers to finish".to_owned())?;
            self.worker.step_or_park(Some(pause(start)));
        }
        Ok(())
    }

    /// The watchdog: a broken connection, or nothing for longer than the timeout.
    fn check(&self, start: Instant, what: &dyn Fn() -> String) -> Result<(), DistributedError> {
        if let Some(message) = network_failure() {
            return Err(DistributedError::PeerLost { message });
        }
        let waited = start.elapsed();
        if waited > self.timeout {
            return Err(DistributedError::Timeout {
                waiting_for: what(),
                waited,
            });
        }
        Ok(())
    }
}

/// How long a waiting worker may park between steps: not at all for the first
/// millisecond (a decoding step's round trip is a fraction of one), then 1 ms.
fn pause(since: Instant) -> Duration {
    if since.elapsed() < Duration::from_millis(1) {
        Duration::ZERO
    } else {
        Duration::from_millis(1)
    }
}
