/* py.h: what the Python-facing C files share: includes, module state, helpers.
 *
 * Include this (not Python.h / numpy headers directly) in any file that touches
 * Python objects. module.c owns the NumPy API table; other files see it through
 * PY_ARRAY_UNIQUE_SYMBOL with NO_IMPORT_ARRAY. */
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

/* Everything the module holds; nothing lives in C globals. */
typedef struct {
    PyTypeObject *Int8Linear_type;
    int num_threads;   /* OpenMP threads for CPU work; 0 = OpenMP's default */
    void *cuda;        /* the CUDA backend's context (handles, workspace, pools); NULL when absent */
    int cpu_kernel;    /* CPU GEMM kernel (l8_kernel) from LLMINT8_CPU_KERNEL or set_cpu_kernel; -1 = best */
#ifdef LLMINT8_CUDA
    PyTypeObject *DeviceArray_type;
#endif
} l8_state;

typedef struct {
    PyObject_HEAD
    PyObject *module;  /* strong: its state holds the backend contexts the layer uses */
    l8_layer layer;
} l8_Int8LinearObject;

/* Raise the Python exception for a failed status; returns NULL for `return l8_raise(&st);`. */
PyObject *l8_raise(const l8_status *st);

/* The module state reached from an object's type (works for Python subclasses too). */
l8_state *l8_state_from_type(PyTypeObject *tp);

#ifdef LLMINT8_CUDA
/* The CUDA side of the module (device_array.c). */
extern PyMethodDef l8_cuda_methods[];   /* cuda_available, to_device, set_stream, ... */
int l8_cuda_module_exec(PyObject *m, l8_state *st);   /* adds DeviceArray and l8_cuda_methods */
void l8_cuda_module_free(l8_state *st);                /* the CUDA context */
/* The CUDA backend for `device`, its context in *ctx; raises (NULL) when unusable. */
const l8_backend *l8_cuda_backend_for(l8_state *st, int device, void **ctx);
/* 1 when x is a device array (DeviceArray, CUDA __dlpack__, __cuda_array_interface__). */
int l8_cuda_is_device_input(l8_state *st, PyObject *x);
/* Forward of a CUDA layer on a device array: a DeviceArray out, no host round trip.
 * out_type: NPY_HALF, NPY_FLOAT or -1 for x's dtype. */
PyObject *l8_cuda_forward_device(PyObject *module, const l8_layer *L, PyObject *x, int out_type);
#endif

#endif
