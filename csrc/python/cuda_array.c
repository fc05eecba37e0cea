/* cuda_array.c: arrays in GPU memory, as llmint8._cuda sees them.
 *
 * - DeviceArray, a C heap type: a C-contiguous float16/float32/int8/int32 array in GPU
 *   memory, allocated from the device's memory pool, with shape, dtype, device,
 *   .numpy(), reshape() views, and the two exchange protocols: __dlpack__ /
 *   __dlpack_device__ and __cuda_array_interface__ (version 3). An array remembers the
 *   stream that produced it; consumers are ordered after that stream on the device
 *   (an event, never a host wait).
 * - Reading device inputs (dev_in): a DeviceArray, or any object with __dlpack__ (CUDA
 *   device) or __cuda_array_interface__ (CuPy, JAX, PyTorch, Numba), without copies.
 *
 * Lifetimes: work is queued asynchronously, so an input must stay alive (and its memory
 * unreused) until the work on the stream is done, as with any stream-ordered API; an
 * array's memory is returned to the pool on its stream when the array is freed, so that
 * stream must outlive it. When a DeviceArray is read on another stream (a layer, the
 * helpers, a DLPack consumer), its stream is ordered after the reader's, so the free
 * cannot overtake the reads.
 */
#include "cuda_module.h"

#include <stdlib.h>

/* ================================================================== helpers */

l8_cuda_ctx *ctx_of(l8_cuda_state *st) { return st->ctx; }

/* The module's CUDA context, created on first use. */
l8_cuda_ctx *get_ctx(l8_cuda_state *st) {
    if (!st->ctx && !(st->ctx = l8_cuda_ctx_new())) PyErr_NoMemory();
    return ctx_of(st);
}

cudaStream_t current_stream(l8_cuda_state *st) { return st->ctx ? l8_cuda_ctx_stream(ctx_of(st)) : NULL; }

/* The protocols' integer for a stream: 1 for the legacy default stream. */
PyObject *stream_to_py(cudaStream_t s) {
    return PyLong_FromVoidPtr(s == NULL ? (void *)cudaStreamLegacy : (void *)s);
}

/* Queue `consumer` after the work queued so far on `producer`, streams of `device`
 * (device-side only: an event, no host wait). */
int order_after(int device, cudaStream_t consumer, cudaStream_t producer, l8_status *st) {
    cudaEvent_t ev = NULL;
    int prev = -1;
    if (consumer == NULL) consumer = cudaStreamLegacy;
    if (producer == NULL) producer = cudaStreamLegacy;
    if (consumer == producer) return 0;
    if (l8_cuda_push_device(device, &prev, st) < 0) return -1;
    L8_CUDA_CHECK(st, cudaEventCreateWithFlags(&ev, cudaEventDisableTiming));
    L8_CUDA_CHECK(st, cudaEventRecord(ev, producer));
    L8_CUDA_CHECK(st, cudaStreamWaitEvent(consumer, ev, 0));
    cudaEventDestroy(ev); /* released once the record completes */
    l8_cuda_pop_device(prev);
    return 0;
fail:
    if (ev) cudaEventDestroy(ev);
    l8_cuda_pop_device(prev);
    return -1;
}

/* A usable device: the context knows it (handles, pool). Raises on failure. */
int ready_device(l8_cuda_state *st, int device) {
    l8_cuda_ctx *ctx = get_ctx(st);
    if (!ctx) return -1;
    l8_status s = {0};
    int rc;
    Py_BEGIN_ALLOW_THREADS
    rc = l8_cuda_ctx_device(ctx, device, &s);
    Py_END_ALLOW_THREADS
    if (rc < 0) l8_raise(&s);
    return rc;
}

/* The calling thread's current device (for calls whose inputs are all empty, on no device). */
int current_device(int *device) {
    l8_status s = {0};
    const cudaError_t err = cudaGetDevice(device);
    if (err != cudaSuccess) {
        l8_cuda_fail(&s, err, "cudaGetDevice(device)", __FILE__, __LINE__);
        l8_raise(&s);
        return -1;
    }
    return 0;
}

int npy_type_of(l8_dtype t) {
    return t == L8_F16 ? NPY_HALF : t == L8_F32 ? NPY_FLOAT32 : t == L8_I8 ? NPY_INT8 : NPY_INT32;
}

const char *dtype_str(l8_dtype t) {
    return t == L8_F16 ? "float16" : t == L8_F32 ? "float32" : t == L8_I8 ? "int8" : "int32";
}

/* Elements of a shape whose byte size nbytes_of has accepted (or that is empty). */
int64_t numel(int ndim, const int64_t *shape) {
    int64_t n = 1;
    for (int i = 0; i < ndim; i++)
        if (shape[i] == 0) return 0;
    for (int i = 0; i < ndim; i++) n *= shape[i];
    return n;
}

/* Bytes of a shape (dimensions >= 0) of `esize`-byte elements; -1 when that does not fit
 * in an int64_t (shapes from producers and from reshape are not to be trusted). */
int64_t nbytes_of(int ndim, const int64_t *shape, size_t esize) {
    int64_t n = (int64_t)esize;
    for (int i = 0; i < ndim; i++)
        if (shape[i] == 0) return 0;
    for (int i = 0; i < ndim; i++) {
        if (n > INT64_MAX / shape[i]) return -1;
        n *= shape[i];
    }
    return n;
}

/* "cuda" -> 0, "cuda:N" -> N (raises otherwise). */
int parse_cuda_device(PyObject *obj, int *device) {
    if (!obj || obj == Py_None) { *device = 0; return 0; }
    const char *s = PyUnicode_Check(obj) ? PyUnicode_AsUTF8(obj) : NULL;
    if (s && !strcmp(s, "cuda")) { *device = 0; return 0; }
    if (s && !strncmp(s, "cuda:", 5) && s[5]) {
        char *end;
        long v = strtol(s + 5, &end, 10);
        if (!*end && v >= 0 && v < 1024) { *device = (int)v; return 0; }
    }
    if (!PyErr_Occurred()) PyErr_Format(PyExc_ValueError, "device must be 'cuda' or 'cuda:N', got %R", obj);
    return -1;
}

/* ================================================================== DeviceArray */

PyObject *device_array_alloc(l8_cuda_state *st, int ndim, const int64_t *shape, l8_dtype dt, int device,
                                    cudaStream_t s) {
    const int64_t nb = nbytes_of(ndim, shape, l8_dtype_size(dt));
    if (nb < 0)
        return PyErr_Format(PyExc_MemoryError, "a %d-D %s array of this shape is too large", ndim, dtype_str(dt));
    l8_DeviceArrayObject *a = (l8_DeviceArrayObject *)st->DeviceArray_type->tp_alloc(st->DeviceArray_type, 0);
    if (!a) return NULL;
    a->ndim = ndim;
    memcpy(a->shape, shape, (size_t)ndim * sizeof(int64_t));
    a->dtype = dt;
    a->device = device;
    a->stream = s;
    const size_t bytes = (size_t)nb;
    l8_status e = {0};
    int prev = -1;
    if (l8_cuda_push_device(device, &prev, &e) < 0 || l8_cuda_alloc(&a->data, bytes, s, &e) < 0) {
        l8_cuda_pop_device(prev);
        a->data = NULL;
        Py_DECREF(a);
        return l8_raise(&e);
    }
    l8_cuda_pop_device(prev);
    return (PyObject *)a;
}

static void device_array_dealloc(PyObject *op) {
    l8_DeviceArrayObject *a = (l8_DeviceArrayObject *)op;
    PyTypeObject *tp = Py_TYPE(op);
    if (a->base) {
        Py_CLEAR(a->base);
    } else if (a->data) {
        l8_status ignore = {0};
        int prev = -1;
        if (l8_cuda_push_device(a->device, &prev, &ignore) == 0) {
            l8_cuda_free(a->data, a->stream);
            l8_cuda_pop_device(prev);
        }
    }
    a->data = NULL;
    tp->tp_free(op);
    Py_DECREF(tp);
}

static PyObject *shape_tuple(int ndim, const int64_t *shape) {
    PyObject *t = PyTuple_New(ndim);
    for (int i = 0; t && i < ndim; i++) {
        PyObject *v = PyLong_FromLongLong(shape[i]);
        if (!v) { Py_DECREF(t); return NULL; }
        PyTuple_SET_ITEM(t, i, v);
    }
    return t;
}

static PyObject *da_get_shape(PyObject *op, void *c) {
    (void)c;
    l8_DeviceArrayObject *a = (l8_DeviceArrayObject *)op;
    return shape_tuple(a->ndim, a->shape);
}
static PyObject *da_get_dtype(PyObject *op, void *c) {
    (void)c;
    return (PyObject *)PyArray_DescrFromType(npy_type_of(((l8_DeviceArrayObject *)op)->dtype));
}
static PyObject *da_get_device(PyObject *op, void *c) {
    (void)c;
    return PyUnicode_FromFormat("cuda:%d", ((l8_DeviceArrayObject *)op)->device);
}
static PyObject *da_get_ndim(PyObject *op, void *c) {
    (void)c;
    return PyLong_FromLong(((l8_DeviceArrayObject *)op)->ndim);
}
static PyObject *da_get_size(PyObject *op, void *c) {
    (void)c;
    l8_DeviceArrayObject *a = (l8_DeviceArrayObject *)op;
    return PyLong_FromLongLong(numel(a->ndim, a->shape));
}
static PyObject *da_get_nbytes(PyObject *op, void *c) {
    (void)c;
    l8_DeviceArrayObject *a = (l8_DeviceArrayObject *)op;
    return PyLong_FromLongLong(numel(a->ndim, a->shape) * (int64_t)l8_dtype_size(a->dtype));
}
static PyObject *da_get_ptr(PyObject *op, void *c) {
    (void)c;
    return PyLong_FromVoidPtr(((l8_DeviceArrayObject *)op)->data);
}
static PyObject *da_get_stream(PyObject *op, void *c) {
    (void)c;
    return stream_to_py(((l8_DeviceArrayObject *)op)->stream);
}

static PyObject *da_get_cai(PyObject *op, void *c) {
    (void)c;
    l8_DeviceArrayObject *a = (l8_DeviceArrayObject *)op;
    static const char *typestr[] = {"<f4", "<f2", "|i1", "<i4"}; /* by l8_dtype */
    const int empty = numel(a->ndim, a->shape) == 0;
    PyObject *shape = shape_tuple(a->ndim, a->shape);
    if (!shape) return NULL;
    return Py_BuildValue("{s:N,s:s,s:(N,O),s:O,s:i,s:N}", "shape", shape, "typestr", typestr[a->dtype], "data",
                         PyLong_FromVoidPtr(empty ? NULL : a->data), Py_False, "strides", Py_None, "version", 3,
                         "stream", stream_to_py(a->stream));
}

static PyObject *da_repr(PyObject *op) {
    l8_DeviceArrayObject *a = (l8_DeviceArrayObject *)op;
    PyObject *shape = shape_tuple(a->ndim, a->shape);
    if (!shape) return NULL;
    PyObject *r = PyUnicode_FromFormat("DeviceArray(shape=%R, dtype=%s, device='cuda:%d')", shape,
                                       dtype_str(a->dtype), a->device);
    Py_DECREF(shape);
    return r;
}

PyDoc_STRVAR(da_numpy_doc, "numpy() -> numpy.ndarray\n\nA host copy (waits for the array's stream).");

static PyObject *da_numpy(PyObject *op, PyObject *unused) {
    (void)unused;
    l8_DeviceArrayObject *a = (l8_DeviceArrayObject *)op;
    npy_intp dims[L8_DA_MAXDIM];
    for (int i = 0; i < a->ndim; i++) dims[i] = (npy_intp)a->shape[i];
    PyArrayObject *h = (PyArrayObject *)PyArray_SimpleNew(a->ndim, dims, npy_type_of(a->dtype));
    if (!h) return NULL;
    const size_t bytes = (size_t)PyArray_NBYTES(h);
    if (bytes == 0) return (PyObject *)h;
    l8_status s = {0};
    int prev = -1, rc = -1;
    Py_BEGIN_ALLOW_THREADS
    if (l8_cuda_push_device(a->device, &prev, &s) == 0) {
        L8_CUDA_CHECK(&s, cudaMemcpyAsync(PyArray_DATA(h), a->data, bytes, cudaMemcpyDeviceToHost, a->stream));
        L8_CUDA_CHECK(&s, cudaStreamSynchronize(a->stream));
        rc = 0;
    }
fail:
    l8_cuda_pop_device(prev);
    Py_END_ALLOW_THREADS
    if (rc < 0) {
        Py_DECREF(h);
        return l8_raise(&s);
    }
    return (PyObject *)h;
}

PyDoc_STRVAR(da_reshape_doc,
"reshape(*shape) -> DeviceArray\n\nA view with a new shape and the same elements (one dimension may be -1).");

static PyObject *da_reshape(PyObject *op, PyObject *args) {
    l8_DeviceArrayObject *a = (l8_DeviceArrayObject *)op;
    PyObject *seq = args;
    if (PyTuple_GET_SIZE(args) == 1 && PySequence_Check(PyTuple_GET_ITEM(args, 0))) seq = PyTuple_GET_ITEM(args, 0);
    PyObject *fast = PySequence_Fast(seq, "reshape takes integers or one sequence of integers");
    if (!fast) return NULL;
    Py_ssize_t nd = PySequence_Fast_GET_SIZE(fast);
    int64_t shape[L8_DA_MAXDIM], known = 1;
    int infer = -1;
    if (nd > L8_DA_MAXDIM) {
        Py_DECREF(fast);
        return PyErr_Format(PyExc_ValueError, "at most %d dimensions, got %zd", L8_DA_MAXDIM, nd);
    }
    for (Py_ssize_t i = 0; i < nd; i++) {
        long long v = PyLong_AsLongLong(PySequence_Fast_GET_ITEM(fast, i));
        if (v == -1 && PyErr_Occurred()) { Py_DECREF(fast); return NULL; }
        if (v == -1 && infer < 0) { infer = (int)i; shape[i] = 1; continue; }
        if (v < 0) { Py_DECREF(fast); return PyErr_Format(PyExc_ValueError, "invalid dimension %lld", v); }
        shape[i] = v;
        if (v && known > INT64_MAX / v) {
            Py_DECREF(fast);
            return PyErr_Format(PyExc_ValueError, "shape is too large");
        }
        known *= v;
    }
    Py_DECREF(fast);
    const int64_t total = numel(a->ndim, a->shape);
    if (infer >= 0) {
        if (known == 0 || total % known)
            return PyErr_Format(PyExc_ValueError, "cannot reshape %lld elements with -1", (long long)total);
        shape[infer] = total / known;
        known = total;
    }
    if (known != total)
        return PyErr_Format(PyExc_ValueError, "cannot reshape an array of %lld elements into %lld", (long long)total,
                            (long long)known);
    l8_DeviceArrayObject *v = (l8_DeviceArrayObject *)Py_TYPE(op)->tp_alloc(Py_TYPE(op), 0);
    if (!v) return NULL;
    v->data = a->data;
    v->ndim = (int)nd;
    memcpy(v->shape, shape, (size_t)nd * sizeof(int64_t));
    v->dtype = a->dtype;
    v->device = a->device;
    v->stream = a->stream;
    v->base = a->base ? a->base : op;
    Py_INCREF(v->base);
    return (PyObject *)v;
}

/* ---------------------------------------------------------------- DLPack export */

typedef struct {
    DLManagedTensor mt;
    DLManagedTensorVersioned mtv;
    int64_t shape[L8_DA_MAXDIM], strides[L8_DA_MAXDIM];
    PyObject *owner;
    int has_consumer;          /* the consumer named its stream (not -1) */
    cudaStream_t consumer;     /* that stream; the legacy default stream stands for 2 */
} dl_export;

static void dl_release(dl_export *c) {
    PyGILState_STATE g = PyGILState_Ensure(); /* consumers may call deleters from any thread */
    if (c->owner && c->has_consumer) {
        /* The memory goes back to the pool on the owner's stream once the owner is freed:
         * order that stream after what the consumer queued on its stream so far (which the
         * consumer must have done by the time it lets go of the tensor). */
        const l8_DeviceArrayObject *a = (const l8_DeviceArrayObject *)c->owner;
        const l8_DeviceArrayObject *o = a->base ? (const l8_DeviceArrayObject *)a->base : a;
        l8_status ignore = {0};
        (void)order_after(o->device, o->stream, c->consumer, &ignore);
    }
    Py_XDECREF(c->owner);
    PyGILState_Release(g);
    free(c);
}
static void dl_deleter(DLManagedTensor *mt) { dl_release((dl_export *)mt->manager_ctx); }
static void dl_deleter_v(DLManagedTensorVersioned *mt) { dl_release((dl_export *)mt->manager_ctx); }

static void dl_capsule_destructor(PyObject *cap) {
    L8_ERR_SAVE;
    if (PyCapsule_IsValid(cap, "dltensor")) {
        DLManagedTensor *mt = PyCapsule_GetPointer(cap, "dltensor");
        if (mt && mt->deleter) mt->deleter(mt);
    } else if (PyCapsule_IsValid(cap, "dltensor_versioned")) {
        DLManagedTensorVersioned *mt = PyCapsule_GetPointer(cap, "dltensor_versioned");
        if (mt && mt->deleter) mt->deleter(mt);
    }
    L8_ERR_RESTORE;
}

PyDoc_STRVAR(da_dlpack_doc,
"__dlpack__(*, stream=None, max_version=None, dl_device=None, copy=None) -> PyCapsule\n\n"
"Export for DLPack consumers. stream: the consumer's stream (None or 1: legacy default,\n"
"2: per-thread default, -1: no ordering); the consumer's stream is ordered after this\n"
"array's stream on the device, and when the consumer releases the tensor, the stream\n"
"the array's memory is freed on is ordered after the consumer's stream (after the\n"
"legacy default stream for 2, which the per-thread default streams of all threads\n"
"synchronize with); so that stream must still exist when the consumer releases the\n"
"tensor, as set_stream's streams must outlive their arrays. max_version >= (1, 0)\n"
"gives a versioned capsule.");

static PyObject *da_dlpack(PyObject *op, PyObject *args, PyObject *kw) {
    static char *kwlist[] = {"stream", "max_version", "dl_device", "copy", NULL};
    l8_DeviceArrayObject *a = (l8_DeviceArrayObject *)op;
    PyObject *so = Py_None, *mv = Py_None, *dd = Py_None, *cp = Py_None;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "|O$OOO:__dlpack__", kwlist, &so, &mv, &dd, &cp)) return NULL;
    if (cp == Py_True) {
        PyErr_SetString(PyExc_BufferError, "DeviceArray.__dlpack__ does not copy (copy=True)");
        return NULL;
    }
    if (dd != Py_None) {
        int t, id;
        if (!PyArg_ParseTuple(dd, "ii", &t, &id)) return NULL;
        if (t != kDLCUDA || id != a->device) {
            PyErr_Format(PyExc_BufferError, "DeviceArray is on (%d, %d); cannot export to (%d, %d)", kDLCUDA,
                         a->device, t, id);
            return NULL;
        }
    }
    int versioned = 0;
    if (mv != Py_None) {
        unsigned major, minor;
        if (!PyArg_ParseTuple(mv, "II", &major, &minor)) return NULL;
        versioned = major >= 1;
    }
    int has_consumer = 1;
    cudaStream_t consumer = cudaStreamLegacy;
    if (so != Py_None) {
        long long sv = PyLong_AsLongLong(so);
        if (sv == -1 && PyErr_Occurred()) return NULL;
        if (sv == 0) {
            PyErr_SetString(PyExc_ValueError, "stream 0 is ambiguous for CUDA; pass 1 (legacy default) or 2 (per-thread)");
            return NULL;
        }
        if (sv != -1) {
            l8_status s = {0};
            if (order_after(a->device, (cudaStream_t)(intptr_t)sv, a->stream, &s) < 0) return l8_raise(&s);
            /* 2 names the per-thread default stream of whichever thread the deleter runs on:
             * remember the legacy stream instead, which waits for all of them */
            if (sv != 2) consumer = (cudaStream_t)(intptr_t)sv;
        } else {
            has_consumer = 0;
        }
    } else {
        l8_status s = {0};
        if (order_after(a->device, cudaStreamLegacy, a->stream, &s) < 0) return l8_raise(&s);
    }
    dl_export *c = calloc(1, sizeof *c);
    if (!c) return PyErr_NoMemory();
    c->has_consumer = has_consumer;
    c->consumer = consumer;
    int64_t stride = 1;
    for (int i = a->ndim - 1; i >= 0; i--) {
        c->shape[i] = a->shape[i];
        c->strides[i] = stride;
        stride *= a->shape[i];
    }
    const uint8_t code = a->dtype == L8_F16 || a->dtype == L8_F32 ? kDLFloat : kDLInt;
    DLTensor t = {a->data, {kDLCUDA, a->device}, a->ndim, {code, (uint8_t)(8 * l8_dtype_size(a->dtype)), 1},
                  c->shape, c->strides, 0};
    c->owner = op;
    Py_INCREF(op);
    PyObject *cap;
    if (versioned) {
        c->mtv.version.major = L8_DLPACK_MAJOR;
        c->mtv.version.minor = L8_DLPACK_MINOR;
        c->mtv.manager_ctx = c;
        c->mtv.deleter = dl_deleter_v;
        c->mtv.flags = 0;
        c->mtv.dl_tensor = t;
        cap = PyCapsule_New(&c->mtv, "dltensor_versioned", dl_capsule_destructor);
    } else {
        c->mt.dl_tensor = t;
        c->mt.manager_ctx = c;
        c->mt.deleter = dl_deleter;
        cap = PyCapsule_New(&c->mt, "dltensor", dl_capsule_destructor);
    }
    if (!cap) {
        Py_DECREF(op);
        free(c);
    }
    return cap;
}

static PyObject *da_dlpack_device(PyObject *op, PyObject *unused) {
    (void)unused;
    return Py_BuildValue("(ii)", kDLCUDA, ((l8_DeviceArrayObject *)op)->device);
}

static PyGetSetDef da_getset[] = {
    {"shape", da_get_shape, NULL, "Shape (tuple of ints).", NULL},
    {"dtype", da_get_dtype, NULL, "NumPy dtype: float16, float32, int8 or int32.", NULL},
    {"device", da_get_device, NULL, "'cuda:N'.", NULL},
    {"ndim", da_get_ndim, NULL, "Number of dimensions.", NULL},
    {"size", da_get_size, NULL, "Number of elements.", NULL},
    {"nbytes", da_get_nbytes, NULL, "Bytes of data.", NULL},
    {"ptr", da_get_ptr, NULL, "Device address of the first element (int).", NULL},
    {"stream", da_get_stream, NULL, "The stream the contents are written on (1: legacy default).", NULL},
    {"__cuda_array_interface__", da_get_cai, NULL, "CUDA Array Interface, version 3.", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyMethodDef da_methods[] = {
    {"numpy", da_numpy, METH_NOARGS, da_numpy_doc},
    {"reshape", da_reshape, METH_VARARGS, da_reshape_doc},
    {"__dlpack__", (PyCFunction)(void (*)(void))da_dlpack, METH_VARARGS | METH_KEYWORDS, da_dlpack_doc},
    {"__dlpack_device__", da_dlpack_device, METH_NOARGS, "__dlpack_device__() -> (2, device): kDLCUDA."},
    {NULL, NULL, 0, NULL},
};

PyDoc_STRVAR(da_doc,
"A C-contiguous array in GPU memory (float16, float32, int8 or int32), made by\n"
"llmint8.to_device or returned by a CUDA layer. Shares memory with CuPy, JAX and\n"
"PyTorch through __dlpack__ and __cuda_array_interface__; .numpy() copies to the host.");

static PyType_Slot da_slots[] = {
    {Py_tp_dealloc, device_array_dealloc},
    {Py_tp_repr, da_repr},
    {Py_tp_methods, da_methods},
    {Py_tp_getset, da_getset},
    {Py_tp_doc, (void *)da_doc},
    {0, NULL},
};

PyType_Spec l8_device_array_spec = {
    .name = "llmint8._cuda.DeviceArray",
    .basicsize = sizeof(l8_DeviceArrayObject),
    .flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_DISALLOW_INSTANTIATION,
    .slots = da_slots,
};

/* ================================================================== device inputs */


/* Hand a consumed DLPack tensor back to its producer. Touches no exception state, so it
 * is safe on error paths. */
void dev_in_release(dev_in *in) {
    if (in->mt) {
        /* the deleter may run Python code (the producer's dealloc): keep a pending error aside */
        L8_ERR_SAVE;
        if (in->versioned) {
            DLManagedTensorVersioned *mt = in->mt;
            if (mt->deleter) mt->deleter(mt);
        } else {
            DLManagedTensor *mt = in->mt;
            if (mt->deleter) mt->deleter(mt);
        }
        in->mt = NULL;
        L8_ERR_RESTORE;
    }
    Py_CLEAR(in->capsule);
}

/* After work queued on `s` that reads `in`: a DeviceArray's memory goes back to the pool
 * on its own stream when the array is freed, and that free must not run ahead of reads
 * queued on another stream, so the owner's stream is ordered after `s` (an event, no host
 * wait). Imports through __dlpack__ are covered by the deleter (dl_release); those through
 * __cuda_array_interface__ leave lifetimes to the producer, as that protocol does. No GIL
 * needed. */
int keep_until_read(const dev_in *in, cudaStream_t s, l8_status *st) {
    return in->owned ? order_after(in->own_device, in->own_stream, s, st) : 0;
}

/* keep_until_read for the inputs of a call whose work was queued with result rc: errors
 * become the call's error on success and are ignored after a failure (best effort). */
int keep_inputs(int rc, cudaStream_t s, l8_status *e, const dev_in *a, const dev_in *b, const dev_in *c) {
    const dev_in *ins[3] = {a, b, c};
    for (int i = 0; i < 3; i++) {
        if (!ins[i]) continue;
        l8_status ignore = {0};
        if (keep_until_read(ins[i], s, rc == 0 ? e : &ignore) < 0 && rc == 0) rc = -1;
    }
    return rc;
}

static int set_dtype(dev_in *in, int is_float, int is_int, int bits) {
    if (is_float && bits == 16) in->dtype = L8_F16;
    else if (is_float && bits == 32) in->dtype = L8_F32;
    else if (is_int && bits == 8) in->dtype = L8_I8;
    else if (is_int && bits == 32) in->dtype = L8_I32;
    else return -1;
    return 0;
}

static int check_row_major(const dev_in *in, const int64_t *strides, int64_t unit, const char *what) {
    if (!strides) return 0;
    int64_t expect = unit;
    for (int i = in->ndim - 1; i >= 0; i--) {
        if (in->shape[i] != 1 && strides[i] != expect) {
            PyErr_Format(PyExc_ValueError, "%s must be C-contiguous (row-major); make a contiguous copy first", what);
            return -1;
        }
        expect *= in->shape[i];
    }
    return 0;
}

/* obj.__dlpack__(stream=consumer): the producer orders its work before `consumer`. */
static int from_dlpack(PyObject *obj, cudaStream_t consumer, dev_in *in, const char *what) {
    PyObject *meth = NULL, *noargs = NULL, *kw = NULL, *cap = NULL;
    DLTensor *t = NULL;
    int rc = -1;
    if (!(meth = PyObject_GetAttrString(obj, "__dlpack__"))) goto done;
    if (!(noargs = PyTuple_New(0))) goto done;
    if (!(kw = Py_BuildValue("{s:N}", "stream", stream_to_py(consumer)))) goto done;
    if (!(cap = PyObject_Call(meth, noargs, kw))) goto done;
    if (PyCapsule_IsValid(cap, "dltensor")) {
        DLManagedTensor *mt = PyCapsule_GetPointer(cap, "dltensor");
        if (!mt || PyCapsule_SetName(cap, "used_dltensor") < 0) goto done;
        t = &mt->dl_tensor;
        in->mt = mt;
        in->versioned = 0;
    } else if (PyCapsule_IsValid(cap, "dltensor_versioned")) {
        DLManagedTensorVersioned *mt = PyCapsule_GetPointer(cap, "dltensor_versioned");
        if (!mt || PyCapsule_SetName(cap, "used_dltensor_versioned") < 0) goto done;
        in->mt = mt;
        in->versioned = 1;
        if (mt->version.major > L8_DLPACK_MAJOR) {
            /* the rest of the struct may differ: touch nothing but the deleter, which
             * dev_in_release calls as the specification requires */
            in->capsule = cap;
            cap = NULL;
            PyErr_Format(PyExc_BufferError, "%s is a DLPack %u.%u tensor; llmint8 supports DLPack %d.x", what,
                         (unsigned)mt->version.major, (unsigned)mt->version.minor, L8_DLPACK_MAJOR);
            goto done;
        }
        t = &mt->dl_tensor;
    } else {
        PyErr_Format(PyExc_TypeError, "%s.__dlpack__() did not return a DLPack capsule", what);
        goto done;
    }
    in->capsule = cap; /* consumed: released (deleter called) by dev_in_release */
    cap = NULL;
    if (t->ndim > L8_DA_MAXDIM) {
        PyErr_Format(PyExc_ValueError, "%s has %d dimensions; at most %d are supported", what, (int)t->ndim,
                     L8_DA_MAXDIM);
        goto done;
    }
    in->ndim = t->ndim;
    for (int i = 0; i < t->ndim; i++) {
        in->shape[i] = t->shape[i];
        if (in->shape[i] < 0) {
            PyErr_Format(PyExc_ValueError, "%s has a negative dimension", what);
            goto done;
        }
    }
    if (t->dtype.lanes != 1 ||
        set_dtype(in, t->dtype.code == kDLFloat, t->dtype.code == kDLInt, t->dtype.bits) < 0) {
        PyErr_Format(PyExc_TypeError, "%s has DLPack dtype (code %d, %d bits, %d lanes); expected float16, float32, "
                     "int8 or int32", what, t->dtype.code, t->dtype.bits, t->dtype.lanes);
        goto done;
    }
    if (nbytes_of(in->ndim, in->shape, l8_dtype_size(in->dtype)) < 0) {
        PyErr_Format(PyExc_ValueError, "%s is too large (its size in bytes overflows 64 bits)", what);
        goto done;
    }
    if (check_row_major(in, t->strides, 1, what) < 0) goto done;
    in->ptr = (char *)t->data + t->byte_offset;
    if ((uintptr_t)in->ptr % l8_dtype_size(in->dtype)) {
        PyErr_Format(PyExc_ValueError, "%s: device pointer is not %d-byte aligned", what,
                     (int)l8_dtype_size(in->dtype));
        goto done;
    }
    in->device = t->device.device_id;
    rc = 0;
done:
    Py_XDECREF(cap);
    Py_XDECREF(kw);
    Py_XDECREF(noargs);
    Py_XDECREF(meth);
    return rc;
}

/* __cuda_array_interface__ (version >= 2); its stream, when given, is ordered before
 * `consumer`. */
static int from_cai(PyObject *obj, PyObject *cai, cudaStream_t consumer, dev_in *in, const char *what) {
    (void)obj;
    if (!PyDict_Check(cai)) {
        PyErr_Format(PyExc_TypeError, "%s.__cuda_array_interface__ is not a dict", what);
        return -1;
    }
    PyObject *shape = PyDict_GetItemString(cai, "shape"), *typestr = PyDict_GetItemString(cai, "typestr"),
             *data = PyDict_GetItemString(cai, "data"), *strides = PyDict_GetItemString(cai, "strides"),
             *stream = PyDict_GetItemString(cai, "stream"), *mask = PyDict_GetItemString(cai, "mask");
    if (!shape || !typestr || !data || !PyTuple_Check(shape) || !PyUnicode_Check(typestr) || !PyTuple_Check(data) ||
        PyTuple_GET_SIZE(data) < 1) {
        PyErr_Format(PyExc_TypeError, "%s.__cuda_array_interface__ lacks shape, typestr or data", what);
        return -1;
    }
    if (mask && mask != Py_None) {
        PyErr_Format(PyExc_TypeError, "%s is a masked array; not supported", what);
        return -1;
    }
    const Py_ssize_t nd = PyTuple_GET_SIZE(shape);
    if (nd > L8_DA_MAXDIM) {
        PyErr_Format(PyExc_ValueError, "%s has %zd dimensions; at most %d are supported", what, nd, L8_DA_MAXDIM);
        return -1;
    }
    in->ndim = (int)nd;
    for (Py_ssize_t i = 0; i < nd; i++) {
        in->shape[i] = PyLong_AsLongLong(PyTuple_GET_ITEM(shape, i));
        if (in->shape[i] == -1 && PyErr_Occurred()) return -1;
        if (in->shape[i] < 0) {
            PyErr_Format(PyExc_ValueError, "%s has a negative dimension", what);
            return -1;
        }
    }
    const char *ts = PyUnicode_AsUTF8(typestr);
    if (!ts) return -1;
    const int little = ts[0] == '<' || ts[0] == '|';
    const int bits = ts[1] && ts[2] ? 8 * atoi(ts + 2) : 0;
    if (!little || set_dtype(in, ts[1] == 'f', ts[1] == 'i', bits) < 0) {
        PyErr_Format(PyExc_TypeError, "%s has typestr %s; expected float16, float32, int8 or int32 (<f2, <f4, |i1, "
                     "<i4)", what, ts);
        return -1;
    }
    if (nbytes_of(in->ndim, in->shape, l8_dtype_size(in->dtype)) < 0) {
        PyErr_Format(PyExc_ValueError, "%s is too large (its size in bytes overflows 64 bits)", what);
        return -1;
    }
    if (strides && strides != Py_None) {
        int64_t st[L8_DA_MAXDIM];
        if (!PyTuple_Check(strides) || PyTuple_GET_SIZE(strides) != nd) {
            PyErr_Format(PyExc_TypeError, "%s has malformed strides", what);
            return -1;
        }
        for (Py_ssize_t i = 0; i < nd; i++) {
            st[i] = PyLong_AsLongLong(PyTuple_GET_ITEM(strides, i));
            if (st[i] == -1 && PyErr_Occurred()) return -1;
        }
        if (check_row_major(in, st, (int64_t)l8_dtype_size(in->dtype), what) < 0) return -1;
    }
    in->ptr = PyLong_AsVoidPtr(PyTuple_GET_ITEM(data, 0));
    if (!in->ptr && PyErr_Occurred()) return -1;
    /* data 0 is how version 3 spells an empty array; it has no device (-1 below). The
     * callers accept device -1 for empty inputs and reject data 0 otherwise (check_data),
     * after their shape and dtype checks. */
    if ((uintptr_t)in->ptr % l8_dtype_size(in->dtype)) {
        PyErr_Format(PyExc_ValueError, "%s: device pointer is not %d-byte aligned", what,
                     (int)l8_dtype_size(in->dtype));
        return -1;
    }
    in->device = -1;
    if (in->ptr) {
        struct cudaPointerAttributes pa;
        cudaError_t e = cudaPointerGetAttributes(&pa, in->ptr);
        if (e != cudaSuccess || pa.type == cudaMemoryTypeUnregistered || pa.type == cudaMemoryTypeHost) {
            (void)cudaGetLastError();
            PyErr_Format(PyExc_ValueError, "%s.__cuda_array_interface__ does not point to device memory", what);
            return -1;
        }
        in->device = pa.device;
    }
    if (stream && stream != Py_None && in->device >= 0) {
        void *sp = PyLong_AsVoidPtr(stream);
        if (!sp && PyErr_Occurred()) return -1;
        l8_status s = {0};
        if (order_after(in->device, consumer, (cudaStream_t)sp, &s) < 0) {
            l8_raise(&s);
            return -1;
        }
    }
    return 0;
}

/* 1 with *in filled when obj is a device array, 0 when it is not one (no error), -1 on
 * error. `consumer` is the stream that will read it. */
int device_input(l8_cuda_state *st, PyObject *obj, cudaStream_t consumer, dev_in *in, const char *what) {
    memset(in, 0, sizeof *in);
    if (PyObject_TypeCheck(obj, st->DeviceArray_type)) {
        l8_DeviceArrayObject *a = (l8_DeviceArrayObject *)obj;
        in->ptr = a->data;
        in->ndim = a->ndim;
        memcpy(in->shape, a->shape, sizeof a->shape);
        in->dtype = a->dtype;
        in->device = a->device;
        const l8_DeviceArrayObject *o = a->base ? (const l8_DeviceArrayObject *)a->base : a;
        in->owned = 1;
        in->own_device = o->device;
        in->own_stream = o->stream;
        l8_status s = {0};
        if (order_after(a->device, consumer, a->stream, &s) < 0) {
            l8_raise(&s);
            return -1;
        }
        return 1;
    }
    if (PyArray_Check(obj)) return 0;
    if (PyObject_HasAttrString(obj, "__dlpack__") && PyObject_HasAttrString(obj, "__dlpack_device__")) {
        PyObject *dev = PyObject_CallMethod(obj, "__dlpack_device__", NULL);
        int type = 0, id = 0;
        if (!dev) return -1;
        int ok = PyArg_ParseTuple(dev, "ii", &type, &id);
        Py_DECREF(dev);
        if (!ok) return -1;
        if (type == kDLCUDA || type == kDLCUDAManaged) {
            if (from_dlpack(obj, consumer, in, what) < 0) {
                dev_in_release(in);
                return -1;
            }
            return 1;
        }
        if (type == kDLCPU || type == kDLCUDAHost) return 0;
        PyErr_Format(PyExc_ValueError, "%s is on DLPack device type %d; expected CUDA (2) or CPU (1)", what, type);
        return -1;
    }
    PyObject *cai = PyObject_GetAttrString(obj, "__cuda_array_interface__");
    if (!cai) {
        PyErr_Clear();
        return 0;
    }
    int rc = from_cai(obj, cai, consumer, in, what);
    Py_DECREF(cai);
    return rc < 0 ? -1 : 1;
}

/* A device input that must exist: TypeError for host objects. */
int require_device_input(l8_cuda_state *st, PyObject *obj, cudaStream_t consumer, dev_in *in, const char *what) {
    int r = device_input(st, obj, consumer, in, what);
    if (r == 0)
        PyErr_Format(PyExc_TypeError, "%s must be a device array (DeviceArray, or an object with __dlpack__ or "
                     "__cuda_array_interface__ on a CUDA device), got %.200s", what, Py_TYPE(obj)->tp_name);
    return r == 1 ? 0 : -1;
}

/* Data pointer 0 (a CAI array on no device, device -1) is only valid for an empty array. */
int check_data(const dev_in *in, const char *what) {
    const int64_t n = numel(in->ndim, in->shape);
    if (!in->ptr && n != 0) {
        PyErr_Format(PyExc_ValueError, "%s has data pointer 0 but %lld elements", what, (long long)n);
        return -1;
    }
    return 0;
}

int check_in(const dev_in *in, const char *what, int ndim, l8_dtype dt, int device) {
    if (in->ndim != ndim) {
        PyErr_Format(PyExc_ValueError, "%s must be %d-D, got %d-D", what, ndim, in->ndim);
        return -1;
    }
    if (in->dtype != dt) {
        PyErr_Format(PyExc_TypeError, "%s must be %s, got %s", what, dtype_str(dt), dtype_str(in->dtype));
        return -1;
    }
    if (check_data(in, what) < 0) return -1;
    if (device >= 0 && in->device >= 0 && in->device != device) { /* -1: an empty CAI array, on no device */
        PyErr_Format(PyExc_ValueError, "%s is on cuda:%d; expected cuda:%d", what, in->device, device);
        return -1;
    }
    return 0;
}

