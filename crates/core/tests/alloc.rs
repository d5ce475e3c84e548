//! Allocation counts: a loop of `_into` calls allocates nothing once warm, and small calls
//! allocate only their output (on a forced path, where the decoding kernel runs them, a
//! fixed number of small buffers). Counted with a wrapping global allocator, in its own test
//! binary so no other test disturbs the count.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::sync::atomic::{AtomicUsize, Ordering};

use attention_core::{
    AttentionOptions, Causal, KernelRun, Parallelism, last_kernel_run,
    scaled_dot_product_attention, scaled_dot_product_attention_into,
};
use nalgebra::DMatrix;

struct Counting;

static ALLOCATIONS: AtomicUsize = AtomicUsize::new(0);

thread_local! {
    /// Whether this thread's allocations count: the test's own thread and the workers of
    /// its pool. The test harness's main thread is not counted: it may still be
    /// allocating (after spawning the test's thread) while a count runs, which made the
    /// count flaky on a loaded machine.
    static COUNTED: Cell<bool> = const { Cell::new(false) };
}

fn count_this_thread() {
    COUNTED.with(|c| c.set(true));
}

fn counted() -> bool {
    // A const-initialised `Cell<bool>` has no destructor: readable at any time.
    COUNTED.try_with(Cell::get).unwrap_or(false)
}

// SAFETY: forwards every call to the system allocator unchanged; only counts.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if counted() {
            ALLOCATIONS.fetch_add(1, Ordering::SeqCst);
        }
        // SAFETY: same contract as the caller's.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: same contract as the caller's.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if counted() {
            ALLOCATIONS.fetch_add(1, Ordering::SeqCst);
        }
        // SAFETY: same contract as the caller's.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

fn allocations_during(f: impl FnOnce()) -> usize {
    let before = ALLOCATIONS.load(Ordering::SeqCst);
    f();
    ALLOCATIONS.load(Ordering::SeqCst) - before
}

fn matrix(rows: usize, cols: usize, salt: usize) -> DMatrix<f32> {
    DMatrix::from_fn(rows, cols, |i, j| {
        (((i * 31 + j * 17 + salt * 7) % 23) as f32 - 11.0) * 0.1
    })
}

/// One test function: the counter is process-wide, so the checks must not run in parallel.
#[test]
fn allocation_counts() {
    count_this_thread();
    // The seed-sized call allocates exactly its output matrix.
    let q = DMatrix::<f32>::from_row_slice(2, 2, &[1.0, 0.0, 0.0, 1.0]);
    let v = DMatrix::<f32>::from_row_slice(2, 2, &[1.0, 2.0, 3.0, 4.0]);
    let opts = AttentionOptions::new();
    // The first call of a process detects the CPU (and reads ATTENTION_CPU_PATH) once.
    std::hint::black_box(scaled_dot_product_attention(&q, &q, &v, &opts).unwrap());
    let n = allocations_during(|| {
        std::hint::black_box(scaled_dot_product_attention(&q, &q, &v, &opts).unwrap());
    });
    let run = last_kernel_run();
    if run == Some(KernelRun::Row) {
        // The default route: the row path, scores on the stack.
        assert_eq!(n, 1, "seed call: only the output");
    } else {
        assert!(matches!(run, Some(KernelRun::Decode(_))), "{run:?}");
        // A forced path runs its decoding kernel for a few queries, which allocates its
        // per-call state (gathered queries, scores of one chunk, running sums, the list of
        // parts): a fixed number of buffers, not growing with the keys.
        let (q1, k1) = (matrix(2, 2, 4), matrix(1000, 2, 5));
        let n_long = allocations_during(|| {
            std::hint::black_box(scaled_dot_product_attention(&q1, &k1, &k1, &opts).unwrap());
        });
        assert!(n <= 12, "seed call on a forced path: {n} allocations");
        assert_eq!(n_long, n, "1000 keys allocate as often as 2");
    }

    // A loop of `_into` calls on the fused path allocates nothing after the first.
    for (n_q, n_kv, d, causal) in [
        (64, 64, 64, false),
        (300, 500, 32, false),
        (300, 500, 32, true),
    ] {
        let (q, k, v) = (matrix(n_q, d, 1), matrix(n_kv, d, 2), matrix(n_kv, d, 3));
        let mut out = DMatrix::<f32>::zeros(n_q, d);
        let mut opts = AttentionOptions::new().with_parallelism(Parallelism::Sequential);
        if causal {
            opts = opts.with_causal(Causal::BottomRight);
        }
        scaled_dot_product_attention_into(&q, &k, &v, &opts, &mut out).unwrap();
        let n = allocations_during(|| {
            for _ in 0..5 {
                scaled_dot_product_attention_into(&q, &k, &v, &opts, &mut out).unwrap();
            }
        });
        assert_eq!(
            n, 0,
            "{n_q}x{n_kv} d={d}: a warm loop of _into calls allocates nothing"
        );
    }

    // Threaded calls allocate nothing once warm either. In a pool of our own, every worker
    // first runs one sequential call: its cached workspace and scratch then fit the
    // largest group of query blocks any threaded call gives it (fewer threads, larger
    // groups). Then a loop of threaded calls runs inside the pool (one job enters the
    // pool from outside; the calls' own tasks stay on the workers' deques).
    let (n_q, n_kv, d) = (600, 600, 64);
    // Enough work to run threaded (PARALLEL_MIN_WORK in kernel/mod.rs: 4·2^20).
    assert!(n_q * n_kv * 2 * d >= 4 << 20);
    let (q, k, v) = (matrix(n_q, d, 1), matrix(n_kv, d, 2), matrix(n_kv, d, 3));
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(4)
        .start_handler(|_| count_this_thread())
        .build()
        .unwrap();
    let sequential = AttentionOptions::new().with_parallelism(Parallelism::Sequential);
    let threaded = AttentionOptions::new().with_parallelism(Parallelism::Rayon);
    pool.broadcast(|_| {
        let mut out = DMatrix::<f32>::zeros(n_q, d);
        scaled_dot_product_attention_into(&q, &k, &v, &sequential, &mut out).unwrap();
    });
    let mut out = DMatrix::<f32>::zeros(n_q, d);
    pool.install(|| scaled_dot_product_attention_into(&q, &k, &v, &threaded, &mut out).unwrap());
    let n = allocations_during(|| {
        pool.install(|| {
            for _ in 0..10 {
                scaled_dot_product_attention_into(&q, &k, &v, &threaded, &mut out).unwrap();
            }
        })
    });
    assert_eq!(n, 0, "10 warm threaded _into calls in a 4-thread pool");
}
