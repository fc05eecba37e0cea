/* threadpool.c: the CPU backend's worker threads (design and contract: threadpool.h).
 *
 * One pool per process. It is process state, not module state, on purpose: like the
 * cores it shares out, there is one of it, and every module instance (and every
 * sub-interpreter) that runs CPU work uses the same workers instead of multiplying them.
 *
 * Protocol. A loop is a "job" with a generation number. The caller (holding job_lock,
 * so one job at a time) publishes it under `m` and wakes sleeping workers. A worker
 * joins under `m` only while the job is open and not full, and counts itself in `busy`;
 * everyone (caller included) takes chunks with an atomic fetch-add on `next`. When no
 * chunk is left the caller closes the job under `m` (no one can join after that) and
 * waits for busy == 0: a short spin, then the condition variable. */
#if defined(__linux__) && !defined(_GNU_SOURCE)
#define _GNU_SOURCE /* sched_getaffinity, CPU_COUNT */
#endif
#include "threadpool.h"

#include <stdlib.h>
#include <time.h>

#if defined(__unix__) || defined(__APPLE__)
#define L8_HAVE_PTHREADS 1
#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <stdatomic.h>
#include <time.h>
#include <unistd.h>
#endif

static int read_default_threads(void) {
    const char *env = getenv("OMP_NUM_THREADS"); /* first entry of a list such as "4,2" */
    if (env) {
        char *end;
        const long v = strtol(env, &end, 10);
        if (end != env && v > 0) return v < L8_POOL_MAX_THREADS ? (int)v : L8_POOL_MAX_THREADS;
    }
#if defined(__linux__)
    cpu_set_t set;
    if (sched_getaffinity(0, sizeof set, &set) == 0) {
        const int c = CPU_COUNT(&set);
        if (c > 0) return c < L8_POOL_MAX_THREADS ? c : L8_POOL_MAX_THREADS;
    }
#endif
#if defined(L8_HAVE_PTHREADS) && defined(_SC_NPROCESSORS_ONLN)
    const long c = sysconf(_SC_NPROCESSORS_ONLN);
    if (c > 0) return c < L8_POOL_MAX_THREADS ? (int)c : L8_POOL_MAX_THREADS;
#endif
    return 1;
}

/* ------------------------------------------------------------------ interruption */
static _Thread_local l8_interrupt_scope *current_scope;

static int64_t now_ns(void) {
#if defined(L8_HAVE_PTHREADS)
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (int64_t)t.tv_sec * 1000000000 + t.tv_nsec;
#else
    return (int64_t)((double)clock() * (1e9 / CLOCKS_PER_SEC));
#endif
}

void l8_interrupt_push(l8_interrupt_scope *s, l8_interrupt_fn check, void *arg) {
    s->check = check;
    s->arg = arg;
    s->next_ns = now_ns() + L8_INTERRUPT_INTERVAL_NS;
    s->stopped = 0;
    s->prev = current_scope;
    current_scope = s;
}

int l8_interrupt_pop(l8_interrupt_scope *s) {
    current_scope = s->prev;
    return s->stopped;
}

/* How often a loop reads the clock: after every chunk at first; while chunks take
 * less than TICK_MIN_NS, after twice as many, so that tiny chunks (a short row) do not
 * pay a clock read each. */
#define TICK_MIN_NS 200000
typedef struct {
    int64_t every, left, last_ns;
} ticker;

static ticker ticker_start(void) { return (ticker){1, 1, now_ns()}; }

/* After a chunk: 1 when the scope is (now) interrupted. */
static int tick(l8_interrupt_scope *s, ticker *tk) {
    if (s->stopped) return 1;
    if (--tk->left > 0) return 0;
    const int64_t t = now_ns();
    if (t - tk->last_ns < TICK_MIN_NS && tk->every < ((int64_t)1 << 20)) tk->every *= 2;
    tk->left = tk->every;
    tk->last_ns = t;
    if (t < s->next_ns) return 0;
    if (s->check(s->arg)) s->stopped = 1;
    s->next_ns = now_ns() + L8_INTERRUPT_INTERVAL_NS; /* after the check: it may have waited for a lock */
    return s->stopped;
}

/* The loop on the calling thread alone, in chunks when a scope is open. */
static void run_alone(int64_t n, int64_t grain, l8_range_fn fn, void *ctx, l8_interrupt_scope *s) {
    if (!s) {
        fn(ctx, 0, n);
        return;
    }
    ticker tk = ticker_start();
    for (int64_t b = 0; b < n; b += grain) {
        fn(ctx, b, b + grain < n ? b + grain : n);
        if (tick(s, &tk)) return;
    }
}

#ifndef L8_HAVE_PTHREADS
int l8_default_threads(void) { return read_default_threads(); }

void l8_parallel_for(int64_t n, int64_t grain, int nthreads, l8_range_fn fn, void *ctx) {
    (void)nthreads;
    l8_interrupt_scope *const s = current_scope;
    if (n <= 0 || (s && s->stopped)) return;
    run_alone(n, grain < 1 ? 1 : grain, fn, ctx, s);
}
#else

/* How long a thread spins before it sleeps. Idle workers: long enough to catch the next
 * loop of the same forward (the serial steps between them take a few microseconds),
 * short enough that between calls a busy machine loses little. The caller: a worker
 * that holds a chunk finishes within about a chunk's time unless the OS has preempted
 * it, and then the caller's core is what it needs. Measured in
 * benchmarks/bench_contention.py (RESULTS.md). */
#define WORKER_SPIN_NS 50000
#define CALLER_SPIN_NS 20000

typedef struct {
    pthread_mutex_t job_lock; /* held by the one caller whose job runs */
    pthread_mutex_t m;        /* guards everything below except `next`, `gen`, `busy` reads */
    pthread_cond_t wake;      /* a new job was published */
    pthread_cond_t done;      /* busy dropped to 0 */
    int nworkers;             /* threads started */
    int create_failed;        /* the OS refused a thread: do not ask again on every call */
    int sleepers;             /* workers waiting on `wake` */
    int caller_waits;         /* the caller waits on `done` */
    atomic_uint_fast64_t gen; /* job number, bumped on publish */
    atomic_int busy;          /* workers inside the current job */
    int joined, max_join, closed;
    l8_range_fn fn;
    void *ctx;
    int64_t n, grain;
    atomic_int_fast64_t next; /* first item not yet claimed */
} pool_t;

static pool_t P = {
    .job_lock = PTHREAD_MUTEX_INITIALIZER,
    .m = PTHREAD_MUTEX_INITIALIZER,
    .wake = PTHREAD_COND_INITIALIZER,
    .done = PTHREAD_COND_INITIALIZER,
};
static pthread_once_t atfork_once = PTHREAD_ONCE_INIT;

static int default_threads;
static void init_default_threads(void) { default_threads = read_default_threads(); }
int l8_default_threads(void) {
    static pthread_once_t once = PTHREAD_ONCE_INIT;
    pthread_once(&once, init_default_threads);
    return default_threads;
}

static inline void cpu_relax(void) {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#elif defined(__aarch64__)
    __asm__ __volatile__("yield");
#endif
}

/* Take and run chunks of the current job until none is left. The caller passes its
 * interruption scope (workers NULL): once it is interrupted, no one takes a chunk more. */
static void run_chunks(l8_range_fn fn, void *ctx, int64_t n, int64_t grain, l8_interrupt_scope *s) {
    ticker tk = ticker_start();
    for (;;) {
        const int64_t b = atomic_fetch_add_explicit(&P.next, grain, memory_order_relaxed);
        if (b >= n) return;
        fn(ctx, b, b + grain < n ? b + grain : n);
        if (s && tick(s, &tk)) {
            atomic_store_explicit(&P.next, n, memory_order_relaxed); /* every later claim finds none */
            return;
        }
    }
}

static void *worker_main(void *arg) {
    (void)arg;
    uint64_t seen = atomic_load_explicit(&P.gen, memory_order_acquire);
    for (;;) {
        /* bounded spin, then sleep until a job newer than `seen` is published */
        int64_t deadline = 0;
        for (unsigned i = 0; atomic_load_explicit(&P.gen, memory_order_acquire) == seen; i++) {
            if ((i & 63) == 0) {
                const int64_t t = now_ns();
                if (!deadline) deadline = t + WORKER_SPIN_NS;
                else if (t > deadline) break;
            }
            cpu_relax();
        }
        pthread_mutex_lock(&P.m);
        while (atomic_load_explicit(&P.gen, memory_order_relaxed) == seen) {
            P.sleepers++;
            pthread_cond_wait(&P.wake, &P.m);
            P.sleepers--;
        }
        seen = atomic_load_explicit(&P.gen, memory_order_relaxed);
        if (P.closed || P.joined >= P.max_join) { /* too late or not needed: wait for the next one */
            pthread_mutex_unlock(&P.m);
            continue;
        }
        P.joined++;
        atomic_fetch_add_explicit(&P.busy, 1, memory_order_relaxed);
        const l8_range_fn fn = P.fn;
        void *const ctx = P.ctx;
        const int64_t n = P.n, grain = P.grain;
        pthread_mutex_unlock(&P.m);

        run_chunks(fn, ctx, n, grain, NULL);

        pthread_mutex_lock(&P.m);
        /* release: the caller that sees busy == 0 also sees this worker's outputs */
        if (atomic_fetch_sub_explicit(&P.busy, 1, memory_order_release) == 1 && P.caller_waits)
            pthread_cond_signal(&P.done);
        pthread_mutex_unlock(&P.m);
    }
    return NULL;
}

/* fork(): the child has none of the workers, and a lock may have been held by a thread
 * that does not exist there. Take `m` around the fork so the pool state is consistent,
 * and give the child a fresh, empty pool (it starts its own workers on first use). */
static void atfork_prepare(void) { pthread_mutex_lock(&P.m); }
static void atfork_parent(void) { pthread_mutex_unlock(&P.m); }
static void atfork_child(void) {
    pthread_mutex_init(&P.job_lock, NULL);
    pthread_mutex_init(&P.m, NULL);
    pthread_cond_init(&P.wake, NULL);
    pthread_cond_init(&P.done, NULL);
    P.nworkers = P.sleepers = P.caller_waits = P.create_failed = 0;
    P.joined = P.max_join = 0;
    P.closed = 1;
    atomic_store(&P.busy, 0);
}
static void register_atfork(void) { (void)pthread_atfork(atfork_prepare, atfork_parent, atfork_child); }

/* Start workers until there are `want` (called with job_lock held). Workers block every
 * signal: signals are for the interpreter's main thread. */
static void grow(int want) {
    if (P.nworkers >= want || P.create_failed) return;
    pthread_once(&atfork_once, register_atfork);
    sigset_t all, old;
    sigfillset(&all);
    pthread_sigmask(SIG_SETMASK, &all, &old);
    pthread_attr_t attr;
    const int attr_ok = pthread_attr_init(&attr) == 0;
    if (attr_ok) pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
    while (P.nworkers < want) {
        pthread_t t;
        if (pthread_create(&t, attr_ok ? &attr : NULL, worker_main, NULL) != 0) {
            P.create_failed = 1;
            break;
        }
        if (!attr_ok) pthread_detach(t);
        pthread_mutex_lock(&P.m);
        P.nworkers++;
        pthread_mutex_unlock(&P.m);
    }
    if (attr_ok) pthread_attr_destroy(&attr);
    pthread_sigmask(SIG_SETMASK, &old, NULL);
}

void l8_parallel_for(int64_t n, int64_t grain, int nthreads, l8_range_fn fn, void *ctx) {
    l8_interrupt_scope *const s = current_scope;
    if (n <= 0 || (s && s->stopped)) return;
    if (grain < 1) grain = 1;
    if (nthreads > L8_POOL_MAX_THREADS) nthreads = L8_POOL_MAX_THREADS;
    if (nthreads <= 1 || n <= grain || pthread_mutex_trylock(&P.job_lock) != 0) {
        run_alone(n, grain, fn, ctx, s);
        return;
    }
    const int64_t chunks = (n + grain - 1) / grain;
    int helpers = nthreads - 1;
    if (helpers > chunks - 1) helpers = (int)(chunks - 1);
    grow(helpers);

    pthread_mutex_lock(&P.m);
    if (helpers > P.nworkers) helpers = P.nworkers;
    P.fn = fn;
    P.ctx = ctx;
    P.n = n;
    P.grain = grain;
    atomic_store_explicit(&P.next, 0, memory_order_relaxed);
    P.joined = 0;
    P.max_join = helpers;
    P.closed = 0;
    atomic_fetch_add_explicit(&P.gen, 1, memory_order_release);
    for (int i = 0; i < helpers && i < P.sleepers; i++) pthread_cond_signal(&P.wake);
    pthread_mutex_unlock(&P.m);

    run_chunks(fn, ctx, n, grain, s);

    pthread_mutex_lock(&P.m);
    P.closed = 1;
    pthread_mutex_unlock(&P.m);
    /* the workers still inside hold claimed chunks; spin briefly, then sleep */
    const int64_t deadline = now_ns() + CALLER_SPIN_NS;
    for (unsigned i = 0; atomic_load_explicit(&P.busy, memory_order_acquire) != 0; i++) {
        if ((i & 63) == 0 && now_ns() > deadline) {
            pthread_mutex_lock(&P.m);
            P.caller_waits = 1;
            while (atomic_load_explicit(&P.busy, memory_order_acquire) != 0) pthread_cond_wait(&P.done, &P.m);
            P.caller_waits = 0;
            pthread_mutex_unlock(&P.m);
            break;
        }
        cpu_relax();
    }
    pthread_mutex_unlock(&P.job_lock);
}
#endif
