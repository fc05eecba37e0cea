/* cuda_module.h: what the files of llmint8._cuda share (cuda_array.c, cuda_module.c).
 *
 * Built only with the CUDA toolkit; compiled into llmint8._cuda, never into _C.
 */
#ifndef LLMINT8_CUDA_MODULE_H
#define LLMINT8_CUDA_MODULE_H

#include "py.h"

#include "cuda_common.h"
#include "dlpack.h"

#define L8_DA_MAXDIM 8

/* Set a pending exception aside and put it back (PyErr_Fetch is superseded in 3.12). */
#if PY_VERSION_HEX >= 0x030C0000
#define L8_ERR_SAVE PyObject *l8_exc_ = PyErr_GetRaisedException()
#define L8_ERR_RESTORE PyErr_SetRaisedException(l8_exc_)
#else
#define L8_ERR_SAVE PyObject *l8_et_, *l8_ev_, *l8_tb_; PyErr_Fetch(&l8_et_, &l8_ev_, &l8_tb_)
#define L8_ERR_RESTORE PyErr_Restore(l8_et_, l8_ev_, l8_tb_)
#endif

/* Everything llmint8._cuda holds; nothing lives in C globals. */
typedef struct {
    PyTypeObject *DeviceArray_type;
    PyTypeObject *Graph_type;
    l8_cuda_ctx *ctx;   /* handles, algorithm cache, current stream; created on first use */
} l8_cuda_state;

typedef struct {
    PyObject_HEAD
    void *data;
    int ndim;
    int64_t shape[L8_DA_MAXDIM];
    l8_dtype dtype;
    int device;
    cudaStream_t stream;   /* the stream its contents are written on */
    PyObject *base;        /* the owner of the memory for views; NULL when this array owns it */
} l8_DeviceArrayObject;

/* A borrowed view of a device array from any producer. */
typedef struct {
    void *ptr;
    int ndim;
    int64_t shape[L8_DA_MAXDIM];
    l8_dtype dtype;
    int device;
    PyObject *capsule;   /* a consumed DLPack capsule ("used_dltensor..."), kept until release */
    void *mt;            /* its managed tensor: the consumer deletes it on release */
    int versioned;
    int owned;           /* a DeviceArray (or a view of one): its memory is freed on own_stream */
    int own_device;
    cudaStream_t own_stream;
} dev_in;

extern PyType_Spec l8_device_array_spec;

/* ---------------------------------------------------------------- state and devices */
l8_cuda_ctx *ctx_of(l8_cuda_state *st);
/* The module's CUDA context, created on first use (MemoryError: NULL). */
l8_cuda_ctx *get_ctx(l8_cuda_state *st);
cudaStream_t current_stream(l8_cuda_state *st);
/* The protocols' integer for a stream: 1 for the legacy default stream. */
PyObject *stream_to_py(cudaStream_t s);
/* Queue `consumer` after the work queued so far on `producer` (an event, no host wait). */
int order_after(int device, cudaStream_t consumer, cudaStream_t producer, l8_status *st);
/* A usable device: the context knows it (handles, pool). Raises on failure. */
int ready_device(l8_cuda_state *st, int device);
int current_device(int *device);
/* "cuda" -> 0, "cuda:N" -> N (raises otherwise). */
int parse_cuda_device(PyObject *obj, int *device);

/* ---------------------------------------------------------------- arrays */
int npy_type_of(l8_dtype t);
const char *dtype_str(l8_dtype t);
int64_t numel(int ndim, const int64_t *shape);
int64_t nbytes_of(int ndim, const int64_t *shape, size_t esize);
/* A new DeviceArray from the device's pool, on stream s (raises on failure). */
PyObject *device_array_alloc(l8_cuda_state *st, int ndim, const int64_t *shape, l8_dtype dt, int device,
                             cudaStream_t s);

/* ---------------------------------------------------------------- device inputs */
void dev_in_release(dev_in *in);
int keep_until_read(const dev_in *in, cudaStream_t s, l8_status *st);
int keep_inputs(int rc, cudaStream_t s, l8_status *e, const dev_in *a, const dev_in *b, const dev_in *c);
/* 1 with *in filled when obj is a device array, 0 when not (no error), -1 on error. */
int device_input(l8_cuda_state *st, PyObject *obj, cudaStream_t consumer, dev_in *in, const char *what);
/* A device input that must exist: TypeError for host objects. */
int require_device_input(l8_cuda_state *st, PyObject *obj, cudaStream_t consumer, dev_in *in, const char *what);
int check_data(const dev_in *in, const char *what);
int check_in(const dev_in *in, const char *what, int ndim, l8_dtype dt, int device);

#endif
