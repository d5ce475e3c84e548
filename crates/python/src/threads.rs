//! The thread pool every call runs in (`set_num_threads` / `get_num_threads`).

use std::sync::{Arc, Mutex, PoisonError};

use attention_core::Parallelism;
use pyo3::exceptions::{PyRuntimeError, PyValueError};
use pyo3::prelude::*;
use rayon::{ThreadPool, ThreadPoolBuilder};

/// The pool of the calls; built on first use with rayon's default size (the number of
/// CPUs, or `RAYON_NUM_THREADS`), replaced by [`set_num_threads`].
static POOL: Mutex<Option<Arc<ThreadPool>>> = Mutex::new(None);

/// Below this many multiply-adds a call runs on the calling thread: the core would not
/// split it over threads anyway (its kernels start threads from 2^20 to 2^22
/// multiply-adds), and handing it to a pool thread costs microseconds.
const SEQUENTIAL_BELOW: usize = 1 << 20;

/// A pool of `n` threads, or the default size for `None`.
fn build(n: Option<usize>) -> PyResult<Arc<ThreadPool>> {
    let mut builder = ThreadPoolBuilder::new().thread_name(|i| format!("attention-{i}"));
    if let Some(n) = n {
        builder = builder.num_threads(n);
    }
    builder
        .build()
        .map(Arc::new)
        .map_err(|e| PyRuntimeError::new_err(format!("cannot start the thread pool: {e}")))
}

/// The current pool, built with the default size if there is none yet.
fn pool() -> PyResult<Arc<ThreadPool>> {
    let mut guard = POOL.lock().unwrap_or_else(PoisonError::into_inner);
    if let Some(pool) = guard.as_ref() {
        return Ok(Arc::clone(pool));
    }
    let pool = build(None)?;
    *guard = Some(Arc::clone(&pool));
    Ok(pool)
}

/// The most threads [`set_num_threads`] accepts: more than any machine this runs on has
/// cores, and few enough to start at once (rayon starts every thread of a pool when it is
/// built: a count like 2^62 would start threads until the process ran out of them).
const MAX_THREADS: usize = 1024;

/// Replaces the pool by one of `n` threads, `1 ≤ n ≤ MAX_THREADS` (calls already running finish on the old
/// one).
pub fn set_num_threads(n: usize) -> PyResult<()> {
    if n == 0 || n > MAX_THREADS {
        return Err(PyValueError::new_err(format!(
            "set_num_threads takes 1 to {MAX_THREADS} threads, not {n}"
        )));
    }
    let pool = build(Some(n))?;
    *POOL.lock().unwrap_or_else(PoisonError::into_inner) = Some(pool);
    Ok(())
}

/// The number of threads of the pool.
pub fn get_num_threads() -> PyResult<usize> {
    Ok(pool()?.current_num_threads())
}

/// Runs `f` without the GIL: for `work` (multiply-adds, roughly) below
/// [`SEQUENTIAL_BELOW`] on the calling thread with [`Parallelism::Sequential`], otherwise
/// inside the pool with [`Parallelism::Rayon`]. The core's results are the same bits
/// either way and for any number of threads.
pub fn run<R, F>(py: Python<'_>, work: usize, f: F) -> PyResult<R>
where
    R: Send,
    F: FnOnce(Parallelism) -> R + Send,
{
    if work < SEQUENTIAL_BELOW {
        return Ok(py.detach(|| f(Parallelism::Sequential)));
    }
    let pool = pool()?;
    Ok(py.detach(|| pool.install(|| f(Parallelism::Rayon))))
}

/// Runs `f` inside the pool without the GIL, whatever the size (for timing the core as
/// the large calls run it).
pub fn run_in_pool<R, F>(py: Python<'_>, f: F) -> PyResult<R>
where
    R: Send,
    F: FnOnce() -> R + Send,
{
    let pool = pool()?;
    Ok(py.detach(|| pool.install(f)))
}
