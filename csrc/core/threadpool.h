/* threadpool.h: the CPU backend's own worker threads.
 *
 * Every parallel loop of the CPU backend (GEMM tiles, row quantization, column absmax)
 * runs through l8_parallel_for. Why not OpenMP: its workers spin-wait, and its implicit
 * barrier waits for every thread of the team, also for one the OS has not yet
 * scheduled. On a machine where other processes (or NumPy's own BLAS threads) keep the
 * cores busy, each call then waits for a time slice of every thread: calls took 15-30x
 * longer than alone. This pool is built so that contention costs at most the lost cores:
 *
 *   - the calling thread works too, and takes chunks from a shared atomic counter;
 *     a worker that wakes late finds no work left and the caller never waits for it;
 *   - the caller waits only for workers that have claimed a chunk, and only after a
 *     short spin does it sleep (so its core is free for the worker it waits for);
 *   - idle workers spin for a short bounded time (for back-to-back calls), then sleep
 *     on a condition variable;
 *   - a second thread calling while the pool is busy runs its loop alone rather than
 *     oversubscribing the cores.
 *
 * Results never depend on the number of threads: every chunk writes its own outputs. */
#ifndef LLMINT8_THREADPOOL_H
#define LLMINT8_THREADPOOL_H

#include <stdint.h>

/* Body of a parallel loop: handles the items [begin, end). */
typedef void (*l8_range_fn)(void *ctx, int64_t begin, int64_t end);

/* Most threads a loop uses (the caller included); more requested are capped here. */
#define L8_POOL_MAX_THREADS 256

/* Run fn over [0, n) in chunks of `grain` items on up to `nthreads` threads, the caller
 * being one of them; returns when every item is done. nthreads <= 1, n <= grain, or a
 * pool already in use by another thread: fn(ctx, 0, n) on the caller alone. Workers
 * are started on first use; if the OS refuses a thread, the loop uses fewer. */
void l8_parallel_for(int64_t n, int64_t grain, int nthreads, l8_range_fn fn, void *ctx);

/* ---- interruption
 * Long work started from Python must notice Ctrl-C. The caller of that work (the Python
 * binding, which alone knows how to look for a pending signal) opens a scope on its
 * thread with a check function; the core stays free of Python. While the scope is open,
 * every l8_parallel_for on that thread runs in chunks (on the caller alone too), and
 * between its own chunks the calling thread calls check(arg) about every
 * L8_INTERRUPT_INTERVAL_NS. When check returns nonzero no further chunk is started (the
 * workers finish the chunk they hold), and every later loop in the scope returns at
 * once: the outputs are then incomplete and the caller must discard them. Chunks write
 * disjoint outputs, so an uninterrupted call computes exactly what it did before.
 * Scopes nest (a signal handler may call back into llmint8). */
typedef int (*l8_interrupt_fn)(void *arg);

typedef struct l8_interrupt_scope {
    l8_interrupt_fn check;
    void *arg;
    int64_t next_ns;                  /* when the next check is due (monotonic clock) */
    int stopped;                      /* check returned nonzero */
    struct l8_interrupt_scope *prev;  /* the enclosing scope of this thread */
} l8_interrupt_scope;

#ifndef L8_INTERRUPT_INTERVAL_NS
#define L8_INTERRUPT_INTERVAL_NS 50000000 /* 50 ms: Ctrl-C felt at once, a negligible cost */
#endif

/* Open a scope on the calling thread (s lives until the matching pop). */
void l8_interrupt_push(l8_interrupt_scope *s, l8_interrupt_fn check, void *arg);
/* Close it; returns 1 when the work in it was interrupted. */
int l8_interrupt_pop(l8_interrupt_scope *s);

/* Threads worth using for `work` units when each thread should get at least
 * `min_work` of them (the break-even of a parallel region, measured per loop in
 * benchmarks/bench_contention.py): min(nthreads, work / min_work), at least 1. */
static inline int l8_threads_for(int64_t work, int64_t min_work, int nthreads) {
    const int64_t t = min_work > 0 ? work / min_work : nthreads;
    return t < 1 ? 1 : t < nthreads ? (int)t : nthreads;
}

/* Elements per thread below which the elementwise passes over x (column absmax, row
 * quantization) run on one thread. */
#ifndef L8_PASS_MIN_PER_THREAD
#define L8_PASS_MIN_PER_THREAD ((int64_t)1 << 16)
#endif

/* The default thread count: OMP_NUM_THREADS when set to a positive number (the usual
 * convention, kept from when the loops were OpenMP's), else the CPUs this process may run
 * on; read once, on first use. */
int l8_default_threads(void);

#endif
