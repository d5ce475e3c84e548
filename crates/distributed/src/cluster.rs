//! The cluster: which processes take part, how to reach them, and the launcher that runs
//! one closure per worker on timely dataflow with a watchdog around it.

use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::path::Path;
use std::sync::mpsc;
use std::sync::{Mutex, Once};
use std::thread;
use std::time::Duration;

use crate::error::{DistributedError, config};
use crate::exchange::Peer;

/// Where the workers of a run are and how long a worker waits for a peer.
///
/// A run has `processes × threads` workers, numbered process by process: process `p`'s
/// threads are workers `p·threads .. (p + 1)·threads`. The flags are timely's own launcher
/// arguments, with the same meaning: `-w` threads per process, `-n` processes, `-p` this
/// process's index, `-h` a host file (one `host:port` per line, in process order). One
/// process (`-n 1`, the default) needs no network at all.
///
/// **The engine's transport is plain TCP with no authentication and no encryption**: run
/// it on trusted networks only.
///
/// # Example
/// ```
/// use attention_distributed::Cluster;
///
/// let (cluster, rest) = Cluster::from_args(["-w", "2", "--tokens", "64"].map(String::from))?;
/// assert_eq!(cluster.workers(), 2);
/// assert_eq!(rest, ["--tokens", "64"]); // the application's own flags
/// let err = Cluster::from_args(["-n", "2", "-p", "2"].map(String::from)).unwrap_err();
/// assert!(err.to_string().contains("-p"));
/// # Ok::<(), attention_distributed::DistributedError>(())
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Cluster {
    threads: usize,
    process: usize,
    addresses: Vec<String>,
    timeout: Duration,
}

/// The watchdog's default: a peer silent this long has failed.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(60);

impl Cluster {
    /// One process with `threads` workers (no network).
    ///
    /// # Errors
    /// [`DistributedError::Config`] when `threads` is 0.
    pub fn local(threads: usize) -> Result<Self, DistributedError> {
        if threads == 0 {
            return Err(config("-w", "at least one worker thread"));
        }
        Ok(Self {
            threads,
            process: 0,
            addresses: Vec::new(),
            timeout: DEFAULT_TIMEOUT,
        })
    }

    /// Processes at `addresses` (`host:port`, in process order), this one being `process`,
    /// each with `threads` workers.
    ///
    /// # Errors
    /// [`DistributedError::Config`] for no address, `process` out of range, an address
    /// without a port, or `threads` 0.
    pub fn new(
        threads: usize,
        process: usize,
        addresses: Vec<String>,
    ) -> Result<Self, DistributedError> {
        if threads == 0 {
            return Err(config("-w", "at least one worker thread"));
        }
        if addresses.is_empty() {
            return Err(config("hosts", "at least one process address"));
        }
        if process >= addresses.len() {
            return Err(config(
                "-p",
                format!(
                    "the process index must be below the number of processes, {}; found {process}",
                    addresses.len()
                ),
            ));
        }
        for (i, a) in addresses.iter().enumerate() {
            let port = a.rsplit_once(':').map(|(_, p)| p.parse::<u16>());
            if !matches!(port, Some(Ok(_))) {
                return Err(config(
                    "hosts",
                    format!("address {i} must be host:port, found {a:?}"),
                ));
            }
        }
        let addresses = if addresses.len() == 1 {
            Vec::new()
        } else {
            addresses
        };
        Ok(Self {
            threads,
            process,
            addresses,
            timeout: DEFAULT_TIMEOUT,
        })
    }

    /// `processes` processes on the loopback address at `ports`.
    ///
    /// # Errors
    /// Those of [`Cluster::new`].
    pub fn loopback(
        threads: usize,
        process: usize,
        ports: &[u16],
    ) -> Result<Self, DistributedError> {
        let addresses = ports.iter().map(|p| format!("127.0.0.1:{p}")).collect();
        Self::new(threads, process, addresses)
    }

    /// The same cluster with the watchdog's timeout: a worker that hears nothing from the
    /// peer it waits for in this long ends the run with [`DistributedError::Timeout`].
    #[must_use]
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Reads timely's launcher flags from `args` and returns the cluster and the
    /// arguments it did not take, in order.
    ///
    /// `-w`/`--threads N`, `-n`/`--processes N`, `-p`/`--process I`, `-h`/`--hostfile F`
    /// (as timely), `--hosts a:1,b:2` (the same list inline), `--timeout SECONDS`. Without
    /// a host list, `n` processes use `localhost:2101` onwards, as timely does.
    ///
    /// # Errors
    /// [`DistributedError::Config`] naming the flag: a missing or malformed value, `-p`
    /// not below `-n`, a host list shorter than `-n`, an unreadable host file, zero threads
    /// or processes.
    pub fn from_args<I: IntoIterator<Item = String>>(
        args: I,
    ) -> Result<(Self, Vec<String>), DistributedError> {
        let (mut threads, mut processes, mut process) = (1usize, 1usize, 0usize);
        let mut hosts: Option<Vec<String>> = None;
        let mut timeout = DEFAULT_TIMEOUT;
        let mut rest = Vec::new();
        let mut args = args.into_iter();
        while let Some(arg) = args.next() {
            let mut value = |flag: &str| args.next().ok_or_else(|| config(flag, "needs a value"));
            match arg.as_str() {
                "-w" | "--threads" => threads = number(&arg, &value(&arg)?)?,
                "-n" | "--processes" => processes = number(&arg, &value(&arg)?)?,
                "-p" | "--process" => process = number(&arg, &value(&arg)?)?,
                "-h" | "--hostfile" => hosts = Some(read_hostfile(Path::new(&value(&arg)?))?),
                "--hosts" => {
                    hosts = Some(value(&arg)?.split(',').map(str::to_owned).collect());
                }
                "--timeout" => {
                    let v = value(&arg)?;
                    let s: f64 = v
                        .parse()
                        .ok()
                        .filter(|s: &f64| s.is_finite() && *s > 0.0 && *s < 1e9)
                        .ok_or_else(|| config("--timeout", format!("seconds > 0, found {v:?}")))?;
                    timeout = Duration::from_secs_f64(s);
                }
                _ => rest.push(arg),
            }
        }
        if processes == 0 {
            return Err(config("-n", "at least one process"));
        }
        let addresses = match hosts {
            Some(h) if h.len() < processes => {
                return Err(config(
                    "hosts",
                    format!("{} addresses for {processes} processes", h.len()),
                ));
            }
            Some(mut h) => {
                h.truncate(processes);
                h
            }
            None => (0..processes)
                .map(|i| format!("localhost:{}", 2101 + i))
                .collect(),
        };
        if process >= processes {
            return Err(config(
                "-p",
                format!(
                    "the process index must be below the number of processes (-n {processes}); \
                     found {process}"
                ),
            ));
        }
        Ok((
            Self::new(threads, process, addresses)?.with_timeout(timeout),
            rest,
        ))
    }

    /// The number of workers in the whole run: processes × threads.
    #[must_use]
    pub fn workers(&self) -> usize {
        self.threads * self.addresses.len().max(1)
    }

    /// This process's index.
    #[must_use]
    pub fn process(&self) -> usize {
        self.process
    }

    /// Worker threads per process.
    #[must_use]
    pub fn threads(&self) -> usize {
        self.threads
    }

    /// The watchdog's timeout.
    #[must_use]
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    fn timely_config(&self) -> timely::Config {
        let communication = if self.addresses.is_empty() {
            timely::CommunicationConfig::Process(self.threads)
        } else {
            timely::CommunicationConfig::Cluster {
                threads: self.threads,
                process: self.process,
                addresses: self.addresses.clone(),
                report: false,
                zerocopy: false,
            }
        };
        timely::Config {
            communication,
            worker: timely::WorkerConfig::default(),
        }
    }

    /// Runs `work` on each of this process's workers and returns their results in worker
    /// order, or the first error.
    ///
    /// Every process of the run calls this with the same `work`. The closure gets a
    /// [`Peer`]: its index, the number of workers, and the distributed calls
    /// ([`Peer::ring_attention`], [`Peer::decoder`]).
    ///
    /// The watchdog: connecting to the other processes must finish within the timeout
    /// (timely itself retries a connection forever and blocks in `accept`), and every wait
    /// for a peer's message inside `work` ends with [`DistributedError::Timeout`] after the
    /// timeout, or at once with [`DistributedError::PeerLost`] when timely's network thread
    /// reports a broken connection. On an error the engine's threads are left behind
    /// (they may be blocked on the network): return from `main` to end the process.
    ///
    /// # Errors
    /// The error of the first of this process's workers (in worker order) that failed;
    /// [`DistributedError::Timeout`] when the peers cannot be
    /// reached; [`DistributedError::Engine`] when timely cannot start (e.g. the address
    /// is taken) or a worker panicked.
    pub fn run<R, F>(&self, work: F) -> Result<Vec<R>, DistributedError>
    where
        R: Send + 'static,
        F: Fn(&mut Peer<'_>) -> Result<R, DistributedError> + Send + Sync + 'static,
    {
        watch_network_panics();
        let config = self.timely_config();
        let timeout = self.timeout;
        let threads = self.threads;
        let (tx, rx) = mpsc::channel::<Event<R>>();
        let engine_tx = tx.clone();
        thread::Builder::new()
            .name("attention-distributed".into())
            .spawn(move || {
                let guards = timely::execute(config, move |worker| {
                    let index = worker.index();
                    let _ = tx.send(Event::Started);
                    let mut peer = Peer::new(worker, timeout, threads);
                    let result = work(&mut peer);
                    let _ = tx.send(Event::Done(index, result));
                });
                match guards {
                    Err(message) => {
                        let _ = engine_tx.send(Event::Failed(message));
                    }
                    Ok(guards) => {
                        for r in guards.join() {
                            if let Err(message) = r {
                                let _ = engine_tx.send(Event::Failed(message));
                            }
                        }
                        let _ = engine_tx.send(Event::Finished);
                    }
                }
            })
            .map_err(|e| DistributedError::Engine {
                message: format!("could not start a thread: {e}"),
            })?;

        // Connecting: timely calls the workers only once every process is connected.
        match rx.recv_timeout(timeout) {
            Ok(Event::Started) => {}
            Ok(Event::Failed(message)) => return Err(DistributedError::Engine { message }),
            Ok(_) => unreachable!("a worker reports Started first"),
            Err(_) => {
                return Err(DistributedError::Timeout {
                    waiting_for: format!(
                        "connections to the other processes ({})",
                        self.addresses.join(", ")
                    ),
                    waited: timeout,
                });
            }
        }
        let mut results: Vec<Option<Result<R, DistributedError>>> =
            (0..threads).map(|_| None).collect();
        let first = self.process * threads;
        let mut done = 0;
        while done < threads {
            // Each worker bounds its own waits; this only guards against a panic.
            match rx.recv() {
                Ok(Event::Started) => {}
                Ok(Event::Done(index, result)) => {
                    results[index - first] = Some(result);
                    done += 1;
                }
                // A worker thread panicked: timely's own worker panics when a network
                // thread has (a peer vanished) and the worker steps before its watchdog
                // looks. Report the network failure if there was one.
                Ok(Event::Failed(message)) => {
                    return Err(match network_failure() {
                        Some(message) => DistributedError::PeerLost { message },
                        None => DistributedError::Engine { message },
                    });
                }
                Ok(Event::Finished) | Err(_) => {
                    return Err(match network_failure() {
                        Some(message) => DistributedError::PeerLost { message },
                        None => DistributedError::Engine {
                            message: "a worker ended without a result (it panicked)".into(),
                        },
                    });
                }
            }
        }
        // Let the engine shut down in order, on success and on error alike: it flushes and
        // closes the connections, so that a peer still reading sees a clean end, not a
        // broken connection (bounded: a peer that vanished cannot hold this up for long).
        let _ = rx.recv_timeout(timeout);
        // The first error in worker order, so that the outcome does not depend on timing.
        results
            .into_iter()
            .map(|r| r.expect("every worker reported"))
            .collect()
    }
}

/// What the engine's thread reports to [`Cluster::run`].
enum Event<R> {
    Started,
    Done(usize, Result<R, DistributedError>),
    Failed(String),
    Finished,
}

fn number(flag: &str, value: &str) -> Result<usize, DistributedError> {
    value
        .parse()
        .map_err(|_| config(flag, format!("a whole number, found {value:?}")))
}

fn read_hostfile(path: &Path) -> Result<Vec<String>, DistributedError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| config("-h", format!("cannot read {}: {e}", path.display())))?;
    Ok(text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(str::to_owned)
        .collect())
}

/// `count` TCP ports on 127.0.0.1 that were free a moment ago (bound to port 0, then
/// released): for starting a run's processes on this machine. Another program may take
/// one in between; the run then fails to start with [`DistributedError::Engine`].
///
/// # Errors
/// [`DistributedError::Engine`] if the loopback address cannot be bound.
pub fn free_loopback_ports(count: usize) -> Result<Vec<u16>, DistributedError> {
    let listeners: Vec<TcpListener> = (0..count)
        .map(|_| TcpListener::bind(SocketAddr::from((Ipv4Addr::LOCALHOST, 0))))
        .collect::<Result<_, _>>()
        .map_err(|e| DistributedError::Engine {
            message: format!("cannot bind 127.0.0.1: {e}"),
        })?;
    listeners
        .iter()
        .map(|l| l.local_addr().map(|a| a.port()))
        .collect::<Result<_, _>>()
        .map_err(|e| DistributedError::Engine {
            message: e.to_string(),
        })
}

/// The last report of timely's network threads, which panic with a message starting
/// "timely communication error" when a connection breaks.
static NETWORK_FAILURE: Mutex<Option<String>> = Mutex::new(None);

/// Installs (once per process) a panic hook that records timely's network failures for
/// the workers' waits, then calls the hook that was there before.
fn watch_network_panics() {
    static INSTALL: Once = Once::new();
    INSTALL.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            let message = info
                .payload()
                .downcast_ref::<String>()
                .map(String::as_str)
                .or_else(|| info.payload().downcast_ref::<&str>().copied());
            if let Some(m) = message.filter(|m| m.starts_with("timely communication error"))
                && let Ok(mut slot) = NETWORK_FAILURE.lock()
            {
                // timely names its network threads after the peer process they serve.
                let peer = std::thread::current()
                    .name()
                    .and_then(|n| n.rsplit_once('-'))
                    .map_or(String::new(), |(_, p)| {
                        format!("the connection to process {p}: ")
                    });
                slot.get_or_insert_with(|| format!("{peer}{m}"));
            }
            previous(info);
        }));
    });
}

/// The network failure recorded since the process started, if any.
pub(crate) fn network_failure() -> Option<String> {
    NETWORK_FAILURE.lock().ok().and_then(|s| s.clone())
}
