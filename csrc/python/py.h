/* py.h: what the Python-facing C files share: includes, module state, helpers.
 *
 * Include this (not Python.h / numpy headers directly) in any file that touches
 * Python objects. module.c owns the NumPy API table; other files see it through
 * PY_ARRAY_UNIQUE_SYMBOL with NO_IMPORT_ARRAY. llmint8._cuda (cuda_module.c) likewise owns its own. */
#ifndef LLMINT8_PY_H
#define LLMINT8_PY_H

#define PY_SSIZE_T_CLEAN
#include <Python.h>

#define PY_ARRAY_UNIQUE_SYMBOL llmint8_ARRAY_API
#ifndef LLMINT8_MODULE_C
#define NO_IMPORT_ARRAY
#endif
#include <numpy/arrayobject.h>

#include "common.h"
#include "linear.h"
#include "threadpool.h"

/* Everything the module holds; nothing lives in C globals. */
typedef struct {
    PyTypeObject *Int8Linear_type;
    int num_threads;   /* threads for CPU work (threadpool.h); 0 = the default */
    PyObject *cuda_module;    /* llmint8._cuda once a CUDA layer has loaded it (cuda_api.h), else NULL */
    const void *cuda_api;     /* its l8_cuda_api table */
    int cpu_kernel;    /* CPU GEMM kernel (l8_kernel) from LLMINT8_CPU_KERNEL or set_cpu_kernel; -1 = best */
} l8_state;

typedef struct {
    PyObject_HEAD
    PyObject *module;       /* strong: llmint8._C */
    PyObject *cuda_module;  /* strong, CUDA layers only: llmint8._cuda, whose state holds the layer's context */
    l8_layer layer;
} l8_Int8LinearObject;

/* Raise the Python exception for a failed status; returns NULL for `return l8_raise(&st);`
 * (shared.c, in both modules). */
PyObject *l8_raise(const l8_status *st);

/* Long CPU work without the GIL that Ctrl-C can stop (module.c). Between l8_nogil_begin
 * and l8_nogil_end the GIL is released, as Py_BEGIN/END_ALLOW_THREADS do, and the thread
 * pool's loops take it back briefly about every 50 ms to run PyErr_CheckSignals
 * (threadpool.h, "interruption"). l8_nogil_end returns -1 with the signal handler's
 * exception (KeyboardInterrupt) set when the work was stopped: its outputs are
 * incomplete and must be discarded; else 0. */
typedef struct {
    PyThreadState *ts;
    int checked; /* on the main thread: a scope is open (only it runs signal handlers) */
    l8_interrupt_scope scope;
} l8_nogil;
void l8_nogil_begin(l8_nogil *g);
int l8_nogil_end(l8_nogil *g);

/* 1 when x is a CUDA array of any producer: the CUDA Array Interface, or a DLPack device of
 * type CUDA (a look at the object only: no import, no GPU call). Never raises; shared.c. */
int l8_looks_like_device_array(PyObject *x);

/* The module (borrowed) that created tp or one of its bases, and its state (works for
 * Python subclasses too); module.c. */
PyObject *l8_module_of_type(PyTypeObject *tp);
l8_state *l8_state_from_type(PyTypeObject *tp);

#endif
