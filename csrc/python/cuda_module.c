/* cuda_module.c: llmint8._cuda, the CUDA backend's Python module.
 *
 * Loaded on first CUDA use (llmint8/cuda.py, or the first CUDA layer of llmint8._C),
 * never by `import llmint8`: this module links libcudart and libcublasLt, _C does not.
 * It holds the CUDA context (cuBLASLt handles, algorithm cache, current stream) in its
 * module state and exports:
 *   - the public functions: cuda_available, to_device, set_stream, synchronize, ...;
 *   - the helpers of tests and benchmarks: _fp16_linear, _int8_matmul_cuda, _cuda_time,
 *     _graph_capture, _stream_create / _stream_destroy, _copy_into;
 *   - `_api`, the capsule through which _C builds and runs CUDA layers (cuda_api.h).
 *
 * Streams: all work goes on the module's current stream (set_stream; 0 = the legacy
 * default stream; 2, the per-thread default stream, is refused). The protocols name the
 * legacy default stream 1, so 0 is exported as 1.
 */
#define LLMINT8_MODULE_C
#include "cuda_module.h"

#include <stdlib.h>

#include "cuda_api.h"
#include "gemm.h"

#ifndef LLMINT8_CUDA_ARCHS
#define LLMINT8_CUDA_ARCHS "unknown"
#endif

/* ================================================================== module functions */

PyDoc_STRVAR(cuda_available_doc,
"cuda_available() -> bool\n\nTrue when this build has the CUDA backend and a CUDA device and driver are usable.\n"
"Never raises.");

static PyObject *py_cuda_available(PyObject *mod, PyObject *unused) {
    (void)mod; (void)unused;
    int n;
    Py_BEGIN_ALLOW_THREADS
    n = l8_cuda_device_count(NULL);
    Py_END_ALLOW_THREADS
    return PyBool_FromLong(n > 0);
}

static PyObject *py_cuda_device_count(PyObject *mod, PyObject *unused) {
    (void)mod; (void)unused;
    int n;
    Py_BEGIN_ALLOW_THREADS
    n = l8_cuda_device_count(NULL);
    Py_END_ALLOW_THREADS
    return PyLong_FromLong(n);
}

static PyObject *py_cuda_unavailable_reason(PyObject *mod, PyObject *unused) {
    (void)mod; (void)unused;
    const char *why = NULL;
    int n;
    Py_BEGIN_ALLOW_THREADS
    n = l8_cuda_device_count(&why);
    Py_END_ALLOW_THREADS
    if (n > 0) Py_RETURN_NONE;
    return PyUnicode_FromString(why ? why : "unknown");
}

PyDoc_STRVAR(to_device_doc,
"to_device(a, device='cuda') -> DeviceArray\n\n"
"Copy a host array (float16, float32, int8 or int32, any shape up to 8-D) to the GPU,\n"
"on the current stream. A DeviceArray already on that device is returned as is.");

static PyObject *py_to_device(PyObject *mod, PyObject *args, PyObject *kw) {
    static char *kwlist[] = {"a", "device", NULL};
    PyObject *ao, *devo = NULL;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "O|O:to_device", kwlist, &ao, &devo)) return NULL;
    l8_cuda_state *st = PyModule_GetState(mod);
    int device;
    if (parse_cuda_device(devo, &device) < 0) return NULL;
    if (PyObject_TypeCheck(ao, st->DeviceArray_type)) {
        if (((l8_DeviceArrayObject *)ao)->device == device) return Py_NewRef(ao);
        return PyErr_Format(PyExc_ValueError, "the array is on cuda:%d; copy it to the host (.numpy()) first",
                            ((l8_DeviceArrayObject *)ao)->device);
    }
    PyArrayObject *a0 = (PyArrayObject *)PyArray_FromAny(ao, NULL, 0, 0, 0, NULL);
    if (!a0) return NULL;
    const int tn = PyArray_TYPE(a0);
    l8_dtype dt = tn == NPY_HALF ? L8_F16 : tn == NPY_FLOAT32 ? L8_F32 : tn == NPY_INT8 ? L8_I8 : L8_I32;
    if (tn != NPY_HALF && tn != NPY_FLOAT32 && tn != NPY_INT8 && tn != NPY_INT32) {
        PyErr_Format(PyExc_TypeError, "to_device takes float16, float32, int8 or int32 arrays, got %S",
                     (PyObject *)PyArray_DESCR(a0));
        Py_DECREF(a0);
        return NULL;
    }
    if (PyArray_NDIM(a0) > L8_DA_MAXDIM) {
        PyErr_Format(PyExc_ValueError, "at most %d dimensions, got %d", L8_DA_MAXDIM, PyArray_NDIM(a0));
        Py_DECREF(a0);
        return NULL;
    }
    PyArrayObject *a = (PyArrayObject *)PyArray_FromAny(
        (PyObject *)a0, PyArray_DescrFromType(tn), 0, 0,
        NPY_ARRAY_C_CONTIGUOUS | NPY_ARRAY_ALIGNED | NPY_ARRAY_NOTSWAPPED, NULL);
    Py_DECREF(a0);
    if (!a) return NULL;
    if (ready_device(st, device) < 0) { Py_DECREF(a); return NULL; }
    int64_t shape[L8_DA_MAXDIM];
    for (int i = 0; i < PyArray_NDIM(a); i++) shape[i] = PyArray_DIM(a, i);
    const cudaStream_t s = current_stream(st);
    l8_DeviceArrayObject *d = (l8_DeviceArrayObject *)device_array_alloc(st, PyArray_NDIM(a), shape, dt, device, s);
    if (!d) { Py_DECREF(a); return NULL; }
    const size_t bytes = (size_t)PyArray_NBYTES(a);
    l8_status e = {0};
    int rc = 0, prev = -1;
    if (bytes) {
        rc = -1;
        Py_BEGIN_ALLOW_THREADS
        if (l8_cuda_push_device(device, &prev, &e) == 0) {
            /* from pageable memory: returns once the host buffer has been staged */
            L8_CUDA_CHECK(&e, cudaMemcpyAsync(d->data, PyArray_DATA(a), bytes, cudaMemcpyHostToDevice, s));
            rc = 0;
        }
    fail:
        l8_cuda_pop_device(prev);
        Py_END_ALLOW_THREADS
    }
    Py_DECREF(a);
    if (rc < 0) {
        Py_DECREF(d);
        return l8_raise(&e);
    }
    return (PyObject *)d;
}

PyDoc_STRVAR(set_stream_doc,
"set_stream(handle)\n\n"
"Queue all following CUDA work on the stream `handle` (an int cudaStream_t, e.g.\n"
"torch.cuda.current_stream().cuda_stream or cupy.cuda.get_current_stream().ptr);\n"
"0 or 1: the legacy default stream. 2 (the per-thread default stream) is refused: the\n"
"same handle names a different stream in every thread, so arrays made on it could not\n"
"be ordered or freed on the right one; pass that thread's explicit stream instead.\n"
"The stream must belong to the device of the layers used, and outlive the arrays made\n"
"on it.");

static PyObject *py_set_stream(PyObject *mod, PyObject *arg) {
    l8_cuda_state *st = PyModule_GetState(mod);
    void *p = PyLong_AsVoidPtr(arg);
    if (!p && PyErr_Occurred()) return NULL;
    if (p == (void *)cudaStreamPerThread) {
        PyErr_SetString(PyExc_ValueError, "pass an explicit stream handle, not 2 (the per-thread default stream)");
        return NULL;
    }
    l8_cuda_ctx *ctx = get_ctx(st);
    if (!ctx) return NULL;
    l8_cuda_ctx_set_stream(ctx, p == (void *)cudaStreamLegacy ? NULL : (cudaStream_t)p);
    Py_RETURN_NONE;
}

PyDoc_STRVAR(set_fused_doc,
"_set_fused(mode) -> str\n\n"
"Select the fused forward paths for every CUDA layer: 'decode' (the one-launch forward\n"
"for m <= 16 rows), 'prefill' (the two-launch quantizer of longer inputs), 'gemm' (on\n"
"Hopper, when built: the sm90 GEMM with the dequantization in its epilogue), several\n"
"joined with '+' (e.g. 'prefill+gemm'), 'all' or 'none'. Returns the previous mode.\n"
"The environment variable LLMINT8_CUDA_FUSED sets the starting mode (tests, gpu_check).");

static PyObject *py_set_fused(PyObject *mod, PyObject *arg) {
    const char *mode = PyUnicode_AsUTF8(arg);
    if (!mode) return NULL;
    const int f = l8_cuda_fused_parse(mode);
    if (f < 0)
        return PyErr_Format(PyExc_ValueError,
                            "mode must be 'decode', 'prefill', 'gemm' (several joined with '+'), 'all' or 'none', "
                            "got %R", arg);
    l8_cuda_ctx *ctx = get_ctx(PyModule_GetState(mod));
    if (!ctx) return NULL;
    const int old = l8_cuda_ctx_fused(ctx);
    l8_cuda_ctx_set_fused(ctx, f);
    return PyUnicode_FromString(l8_cuda_fused_name(old));
}

PyDoc_STRVAR(sm90_calls_doc,
"_sm90_calls() -> int: forwards that ran the Hopper GEMM with the dequantization in its\n"
"epilogue in this process (tests check that the path was taken).");

static PyObject *py_sm90_calls(PyObject *mod, PyObject *unused) {
    (void)unused;
    l8_cuda_ctx *ctx = get_ctx(PyModule_GetState(mod));
    if (!ctx) return NULL;
    return PyLong_FromLongLong(l8_cuda_ctx_sm90_calls(ctx));
}

static PyObject *py_get_stream(PyObject *mod, PyObject *unused) {
    (void)unused;
    return stream_to_py(current_stream(PyModule_GetState(mod)));
}

static PyObject *py_synchronize(PyObject *mod, PyObject *unused) {
    (void)unused;
    l8_cuda_ctx *ctx = get_ctx(PyModule_GetState(mod));
    if (!ctx) return NULL;
    l8_status e = {0};
    int rc;
    Py_BEGIN_ALLOW_THREADS
    rc = l8_cuda_ctx_synchronize(ctx, &e);
    Py_END_ALLOW_THREADS
    if (rc < 0) return l8_raise(&e);
    Py_RETURN_NONE;
}

PyDoc_STRVAR(fp16_linear_doc,
"_fp16_linear(x, w, bias=None) -> DeviceArray\n\n"
"Baseline fp16 layer through cuBLASLt: y (m, n) = x (m, k) @ w (n, k).T + bias (n,),\n"
"all float16 device arrays, fp32 accumulation, bias as a cuBLASLt epilogue.");

static PyObject *py_fp16_linear(PyObject *mod, PyObject *args, PyObject *kw) {
    static char *kwlist[] = {"x", "w", "bias", NULL};
    PyObject *xo, *wo, *bo = Py_None;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "OO|O:_fp16_linear", kwlist, &xo, &wo, &bo)) return NULL;
    l8_cuda_state *st = PyModule_GetState(mod);
    if (!get_ctx(st)) return NULL;
    const cudaStream_t s = current_stream(st);
    dev_in x, w, b;
    memset(&x, 0, sizeof x); memset(&w, 0, sizeof w); memset(&b, 0, sizeof b);
    PyObject *y = NULL;
    int device;
    if (require_device_input(st, xo, s, &x, "x") < 0 || check_in(&x, "x", 2, L8_F16, -1) < 0) goto done;
    if (require_device_input(st, wo, s, &w, "w") < 0 || check_in(&w, "w", 2, L8_F16, x.device) < 0) goto done;
    device = x.device >= 0 ? x.device : w.device; /* -1: an empty CAI array */
    if (bo != Py_None &&
        (require_device_input(st, bo, s, &b, "bias") < 0 || check_in(&b, "bias", 1, L8_F16, device) < 0))
        goto done;
    if (device < 0) device = b.device;
    if (device < 0 && current_device(&device) < 0) goto done;
    const int64_t m = x.shape[0], k = x.shape[1], n = w.shape[0];
    if (w.shape[1] != k || (bo != Py_None && b.shape[0] != n)) {
        PyErr_Format(PyExc_ValueError, "shapes do not match: x (%lld, %lld), w (%lld, %lld), bias (%lld,)",
                     (long long)m, (long long)k, (long long)n, (long long)w.shape[1],
                     (long long)(bo != Py_None ? b.shape[0] : n));
        goto done;
    }
    if (ready_device(st, device) < 0) goto done;
    int64_t shp[2] = {m, n};
    if (!(y = device_array_alloc(st, 2, shp, L8_F16, device, s))) goto done;
    l8_status e = {0};
    int rc;
    Py_BEGIN_ALLOW_THREADS
    rc = l8_cuda_fp16_linear(ctx_of(st), device, x.ptr, w.ptr, bo != Py_None ? b.ptr : NULL,
                             ((l8_DeviceArrayObject *)y)->data, m, n, k, s, &e);
    rc = keep_inputs(rc, s, &e, &x, &w, bo != Py_None ? &b : NULL);
    Py_END_ALLOW_THREADS
    if (rc < 0) {
        Py_CLEAR(y);
        l8_raise(&e);
    }
done:
    dev_in_release(&x);
    dev_in_release(&w);
    dev_in_release(&b);
    return y;
}

PyDoc_STRVAR(int8_matmul_cuda_doc,
"_int8_matmul_cuda(a, b, path='auto') -> DeviceArray\n\n"
"Exact int8 GEMM on the GPU: a (m, k) int8 @ b (n, k).T -> (m, n) int32 (device arrays).\n"
"path: 'auto', 'gemv' (the m <= 8 kernel), 'cublaslt', or 'tiled' (the dp4a kernel used where\n"
"cuBLASLt offers no algorithm).");

static PyObject *py_int8_matmul_cuda(PyObject *mod, PyObject *args, PyObject *kw) {
    static char *kwlist[] = {"a", "b", "path", NULL};
    PyObject *ao, *bo;
    const char *path = "auto";
    if (!PyArg_ParseTupleAndKeywords(args, kw, "OO|s:_int8_matmul_cuda", kwlist, &ao, &bo, &path)) return NULL;
    const int p = !strcmp(path, "auto") ? 0 : !strcmp(path, "gemv") ? 1 : !strcmp(path, "cublaslt") ? 2
                : !strcmp(path, "tiled") ? 3 : -1;
    if (p < 0)
        return PyErr_Format(PyExc_ValueError, "path must be 'auto', 'gemv', 'cublaslt' or 'tiled', got '%s'", path);
    l8_cuda_state *st = PyModule_GetState(mod);
    if (!get_ctx(st)) return NULL;
    const cudaStream_t s = current_stream(st);
    dev_in a, b;
    memset(&a, 0, sizeof a); memset(&b, 0, sizeof b);
    PyObject *c = NULL;
    int device;
    if (require_device_input(st, ao, s, &a, "a") < 0 || check_in(&a, "a", 2, L8_I8, -1) < 0) goto done;
    if (require_device_input(st, bo, s, &b, "b") < 0 || check_in(&b, "b", 2, L8_I8, a.device) < 0) goto done;
    device = a.device >= 0 ? a.device : b.device; /* -1: an empty CAI array */
    if (device < 0 && current_device(&device) < 0) goto done;
    const int64_t m = a.shape[0], k = a.shape[1], n = b.shape[0];
    if (b.shape[1] != k) {
        PyErr_Format(PyExc_ValueError, "b must be (n, %lld) to match a, got (%lld, %lld)", (long long)k,
                     (long long)n, (long long)b.shape[1]);
        goto done;
    }
    if (k > L8_GEMM_MAX_K) {
        PyErr_Format(PyExc_ValueError, "k = %lld is too large for exact int32 accumulation; expected k <= %lld",
                     (long long)k, (long long)L8_GEMM_MAX_K);
        goto done;
    }
    if (ready_device(st, device) < 0) goto done;
    int64_t shp[2] = {m, n};
    if (!(c = device_array_alloc(st, 2, shp, L8_I32, device, s))) goto done;
    l8_status e = {0};
    int rc;
    Py_BEGIN_ALLOW_THREADS
    rc = l8_cuda_int8_matmul(ctx_of(st), device, a.ptr, b.ptr, m, n, k, ((l8_DeviceArrayObject *)c)->data, p, s, &e);
    rc = keep_inputs(rc, s, &e, &a, &b, NULL);
    Py_END_ALLOW_THREADS
    if (rc < 0) {
        Py_CLEAR(c);
        l8_raise(&e);
    }
done:
    dev_in_release(&a);
    dev_in_release(&b);
    return c;
}

PyDoc_STRVAR(cuda_time_doc,
"_cuda_time(fn, iters, flush_bytes=0, device=0) -> list of float\n\n"
"Milliseconds of GPU time of each of `iters` calls of fn(), measured with CUDA events\n"
"on the current stream. flush_bytes > 0 writes that many bytes before each call (outside\n"
"the timed region) to evict the L2 cache.");

static PyObject *py_cuda_time(PyObject *mod, PyObject *args, PyObject *kw) {
    static char *kwlist[] = {"fn", "iters", "flush_bytes", "device", NULL};
    PyObject *fn;
    int iters, device = 0;
    long long flush = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "Oi|Li:_cuda_time", kwlist, &fn, &iters, &flush, &device))
        return NULL;
    if (iters < 1 || iters > 100000 || flush < 0)
        return PyErr_Format(PyExc_ValueError, "iters must be in [1, 100000] and flush_bytes >= 0");
    l8_cuda_state *st = PyModule_GetState(mod);
    if (ready_device(st, device) < 0) return NULL;
    const cudaStream_t s = current_stream(st);
    cudaEvent_t *ev = calloc((size_t)iters * 2, sizeof(cudaEvent_t));
    void *buf = NULL;
    PyObject *out = NULL;
    l8_status e = {0};
    int prev = -1, made = 0, failed = 0;
    if (!ev) return PyErr_NoMemory();
    if (l8_cuda_push_device(device, &prev, &e) < 0) { failed = 1; goto cleanup; }
    for (; made < 2 * iters; made++)
        if (cudaEventCreate(&ev[made]) != cudaSuccess) {
            l8_cuda_fail(&e, cudaGetLastError(), "cudaEventCreate", __FILE__, __LINE__);
            failed = 1;
            goto cleanup;
        }
    if (flush && l8_cuda_alloc(&buf, (size_t)flush, s, &e) < 0) { failed = 1; goto cleanup; }
    for (int it = 0; it < iters; it++) {
        if (buf) L8_CUDA_CHECK(&e, cudaMemsetAsync(buf, it & 0xff, (size_t)flush, s));
        L8_CUDA_CHECK(&e, cudaEventRecord(ev[2 * it], s));
        PyObject *r = PyObject_CallNoArgs(fn);
        if (!r) goto cleanup; /* the Python exception stands */
        Py_DECREF(r);
        L8_CUDA_CHECK(&e, cudaEventRecord(ev[2 * it + 1], s));
    }
    {
        cudaError_t se;
        Py_BEGIN_ALLOW_THREADS
        se = cudaEventSynchronize(ev[2 * iters - 1]);
        Py_END_ALLOW_THREADS
        L8_CUDA_CHECK(&e, se);
    }
    if (!(out = PyList_New(iters))) goto cleanup;
    for (int it = 0; it < iters; it++) {
        float ms = 0.0f;
        L8_CUDA_CHECK(&e, cudaEventElapsedTime(&ms, ev[2 * it], ev[2 * it + 1]));
        PyList_SET_ITEM(out, it, PyFloat_FromDouble(ms));
    }
    goto cleanup;
fail:
    failed = 1;
    Py_CLEAR(out);
cleanup:
    l8_cuda_free(buf, s);
    for (int i = 0; i < made; i++) cudaEventDestroy(ev[i]);
    free(ev);
    l8_cuda_pop_device(prev);
    if (failed) {
        Py_CLEAR(out);
        if (!PyErr_Occurred()) l8_raise(&e);
    }
    return out;
}

/* A CUDA array of any producer (no import, no copy: a look at the type and attributes). */
static int is_device_input(l8_cuda_state *st, PyObject *x) {
    return PyObject_TypeCheck(x, st->DeviceArray_type) || l8_looks_like_device_array(x);
}

static PyObject *py_is_device_array(PyObject *mod, PyObject *x) {
    return PyBool_FromLong(is_device_input(PyModule_GetState(mod), x));
}

PyDoc_STRVAR(build_info_doc,
"build_info() -> dict: the CUDA toolkit this module was compiled with (cuda_version), the\n"
"GPU architectures it carries code for (cuda_archs), the CUDA runtime it loaded\n"
"(cuda_runtime_version), the driver's CUDA version (cuda_driver_version, (0, 0) when no\n"
"driver is installed: a driver older than the runtime cannot run it), and whether the Hopper\n"
"GEMM with the dequantization in its epilogue was built (sm90_gemm: an sm_90a build with\n"
"CUTLASS's headers).");

static PyObject *py_build_info(PyObject *mod, PyObject *unused) {
    (void)mod; (void)unused;
    int rt = 0, drv = 0;
    Py_BEGIN_ALLOW_THREADS
    if (cudaRuntimeGetVersion(&rt) != cudaSuccess) rt = 0;
    if (cudaDriverGetVersion(&drv) != cudaSuccess) drv = 0; /* 0: no driver (libcuda) found */
    (void)cudaGetLastError();
    Py_END_ALLOW_THREADS
#ifdef LLMINT8_SM90_GEMM
    const int sm90 = 1;
#else
    const int sm90 = 0;
#endif
    return Py_BuildValue("{s:(ii),s:s,s:(ii),s:(ii),s:N}", "cuda_version", CUDART_VERSION / 1000,
                         CUDART_VERSION % 1000 / 10, "cuda_archs", LLMINT8_CUDA_ARCHS, "cuda_runtime_version",
                         rt / 1000, rt % 1000 / 10, "cuda_driver_version", drv / 1000, drv % 1000 / 10, "sm90_gemm",
                         PyBool_FromLong(sm90));
}

/* ---------------------------------------------------------------- CUDA graphs (tests) */

typedef struct {
    PyObject_HEAD
    cudaGraphExec_t exec;
    cudaGraph_t graph;
    cudaStream_t stream;
    int device;
} l8_GraphObject;

PyDoc_STRVAR(graph_capture_doc,
"_graph_capture(fn) -> Graph\n\n"
"Capture the CUDA work fn() queues on the current stream into a CUDA graph (thread-local\n"
"capture mode: a call that is not allowed in a graph fails the capture) and instantiate\n"
"it; Graph.replay() launches it again on that stream. The current stream must be an\n"
"explicit stream (set_stream), not the legacy default stream, which cannot be captured.\n"
"Device arrays fn() creates stay valid across replays (their memory belongs to the graph\n"
"and is freed and re-made at the same address by each replay).");

static PyObject *py_graph_capture(PyObject *mod, PyObject *fn) {
    l8_cuda_state *st = PyModule_GetState(mod);
    const cudaStream_t s = current_stream(st);
    l8_status e = {0};
    cudaGraph_t g = NULL;
    cudaGraphExec_t x = NULL;
    int device = 0;
    if (!PyCallable_Check(fn)) return PyErr_Format(PyExc_TypeError, "fn must be callable, got %R", fn);
    if (s == NULL)
        return PyErr_Format(PyExc_ValueError, "the legacy default stream cannot be captured; "
                            "set_stream(handle) to an explicit stream first");
    if (current_device(&device) < 0 || ready_device(st, device) < 0) return NULL;
    L8_CUDA_CHECK(&e, cudaStreamBeginCapture(s, cudaStreamCaptureModeThreadLocal));
    PyObject *r = PyObject_CallNoArgs(fn);
    const cudaError_t end = cudaStreamEndCapture(s, &g); /* always end it, also after an error */
    if (!r) {
        if (g) cudaGraphDestroy(g);
        (void)cudaGetLastError();
        return NULL; /* fn's exception (a call refused during capture raises there) */
    }
    Py_DECREF(r);
    L8_CUDA_CHECK(&e, end);
    L8_CUDA_CHECK(&e, cudaGraphInstantiateWithFlags(&x, g, cudaGraphInstantiateFlagAutoFreeOnLaunch));
    l8_GraphObject *go = (l8_GraphObject *)st->Graph_type->tp_alloc(st->Graph_type, 0);
    if (!go) {
        cudaGraphExecDestroy(x);
        cudaGraphDestroy(g);
        return NULL;
    }
    go->exec = x;
    go->graph = g;
    go->stream = s;
    go->device = device;
    return (PyObject *)go;
fail:
    if (g) cudaGraphDestroy(g);
    return l8_raise(&e);
}

static PyObject *graph_replay(PyObject *op, PyObject *unused) {
    (void)unused;
    l8_GraphObject *g = (l8_GraphObject *)op;
    l8_status e = {0};
    int rc = -1, prev = -1;
    Py_BEGIN_ALLOW_THREADS
    if (l8_cuda_push_device(g->device, &prev, &e) == 0) {
        L8_CUDA_CHECK(&e, cudaGraphLaunch(g->exec, g->stream));
        rc = 0;
    }
fail:
    l8_cuda_pop_device(prev);
    Py_END_ALLOW_THREADS
    if (rc < 0) return l8_raise(&e);
    Py_RETURN_NONE;
}

static PyObject *graph_nodes(PyObject *op, void *c) {
    (void)c;
    size_t n = 0;
    if (cudaGraphGetNodes(((l8_GraphObject *)op)->graph, NULL, &n) != cudaSuccess) {
        (void)cudaGetLastError();
        Py_RETURN_NONE;
    }
    return PyLong_FromSize_t(n);
}

static void graph_dealloc(PyObject *op) {
    l8_GraphObject *g = (l8_GraphObject *)op;
    PyTypeObject *tp = Py_TYPE(op);
    int prev = -1;
    l8_status ignore = {0};
    if (l8_cuda_push_device(g->device, &prev, &ignore) == 0) {
        if (g->exec) cudaGraphExecDestroy(g->exec);
        if (g->graph) cudaGraphDestroy(g->graph);
        l8_cuda_pop_device(prev);
    }
    (void)cudaGetLastError();
    tp->tp_free(op);
    Py_DECREF(tp);
}

static PyMethodDef graph_methods[] = {
    {"replay", graph_replay, METH_NOARGS, "replay(): launch the graph on the stream it was captured on."},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef graph_getset[] = {
    {"nodes", graph_nodes, NULL, "Number of nodes in the captured graph.", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyType_Slot graph_slots[] = {
    {Py_tp_dealloc, graph_dealloc},
    {Py_tp_methods, graph_methods},
    {Py_tp_getset, graph_getset},
    {Py_tp_doc, (void *)"A captured CUDA graph (from _graph_capture)."},
    {0, NULL},
};

static PyType_Spec graph_spec = {
    .name = "llmint8._cuda.Graph",
    .basicsize = sizeof(l8_GraphObject),
    .flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_DISALLOW_INSTANTIATION,
    .slots = graph_slots,
};

PyDoc_STRVAR(stream_create_doc,
"_stream_create() -> int\n\nA new non-blocking CUDA stream on the current device (its handle, for set_stream).\n"
"Destroy it with _stream_destroy once the arrays made on it are gone.");

static PyObject *py_stream_create(PyObject *mod, PyObject *unused) {
    (void)unused;
    l8_cuda_state *st = PyModule_GetState(mod);
    int device = 0;
    cudaStream_t s = NULL;
    l8_status e = {0};
    if (current_device(&device) < 0 || ready_device(st, device) < 0) return NULL;
    L8_CUDA_CHECK(&e, cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));
    return PyLong_FromVoidPtr((void *)s);
fail:
    return l8_raise(&e);
}

static PyObject *py_stream_destroy(PyObject *mod, PyObject *arg) {
    l8_cuda_state *st = PyModule_GetState(mod);
    void *p = PyLong_AsVoidPtr(arg);
    l8_status e = {0};
    if (!p && PyErr_Occurred()) return NULL;
    if (p == NULL || p == (void *)cudaStreamLegacy || p == (void *)cudaStreamPerThread)
        return PyErr_Format(PyExc_ValueError, "not a stream made by _stream_create: %R", arg);
    if (st->ctx && l8_cuda_ctx_stream(st->ctx) == (cudaStream_t)p)
        return PyErr_Format(PyExc_ValueError, "the stream is the current stream; set_stream(0) first");
    L8_CUDA_CHECK(&e, cudaStreamDestroy((cudaStream_t)p));
    Py_RETURN_NONE;
fail:
    return l8_raise(&e);
}

PyDoc_STRVAR(copy_into_doc,
"_copy_into(dst, a)\n\nCopy the host array `a` into the DeviceArray `dst` (same dtype and number of\n"
"elements), on the current stream: new inputs for a captured graph.");

static PyObject *py_copy_into(PyObject *mod, PyObject *args) {
    l8_cuda_state *st = PyModule_GetState(mod);
    PyObject *dsto, *ao;
    if (!PyArg_ParseTuple(args, "O!O:_copy_into", st->DeviceArray_type, &dsto, &ao)) return NULL;
    l8_DeviceArrayObject *d = (l8_DeviceArrayObject *)dsto;
    PyArrayObject *a = (PyArrayObject *)PyArray_FromAny(ao, PyArray_DescrFromType(npy_type_of(d->dtype)), 0, 0,
                                                        NPY_ARRAY_C_CONTIGUOUS | NPY_ARRAY_ALIGNED | NPY_ARRAY_NOTSWAPPED |
                                                            NPY_ARRAY_FORCECAST, NULL);
    if (!a) return NULL;
    if (PyArray_SIZE(a) != numel(d->ndim, d->shape)) {
        PyErr_Format(PyExc_ValueError, "a has %zd elements, dst %lld", (Py_ssize_t)PyArray_SIZE(a),
                     (long long)numel(d->ndim, d->shape));
        Py_DECREF(a);
        return NULL;
    }
    const cudaStream_t s = current_stream(st);
    l8_status e = {0};
    int rc = 0, prev = -1;
    Py_BEGIN_ALLOW_THREADS
    if (l8_cuda_push_device(d->device, &prev, &e) < 0 ||
        order_after(d->device, s, d->stream, &e) < 0) {
        rc = -1;
    } else {
        cudaError_t ce = cudaMemcpyAsync(d->data, PyArray_DATA(a), (size_t)PyArray_NBYTES(a), cudaMemcpyHostToDevice, s);
        if (ce == cudaSuccess) ce = cudaStreamSynchronize(s); /* pageable source: done before it is freed */
        if (ce != cudaSuccess) rc = l8_cuda_fail(&e, ce, "cudaMemcpyAsync(dst, a)", __FILE__, __LINE__);
    }
    l8_cuda_pop_device(prev);
    Py_END_ALLOW_THREADS
    Py_DECREF(a);
    if (rc < 0) return l8_raise(&e);
    Py_RETURN_NONE;
}


static PyMethodDef module_methods[] = {
    {"cuda_available", py_cuda_available, METH_NOARGS, cuda_available_doc},
    {"cuda_device_count", py_cuda_device_count, METH_NOARGS, "cuda_device_count() -> int (0 without device or driver)."},
    {"cuda_unavailable_reason", py_cuda_unavailable_reason, METH_NOARGS,
     "cuda_unavailable_reason() -> str or None: why CUDA cannot be used (None when it can)."},
    {"build_info", py_build_info, METH_NOARGS, build_info_doc},
    {"to_device", (PyCFunction)(void (*)(void))py_to_device, METH_VARARGS | METH_KEYWORDS, to_device_doc},
    {"set_stream", py_set_stream, METH_O, set_stream_doc},
    {"get_stream", py_get_stream, METH_NOARGS, "get_stream() -> int: the current stream (1: legacy default)."},
    {"synchronize", py_synchronize, METH_NOARGS,
     "synchronize(): wait for the work queued on the current stream (for the legacy default stream:\n"
     "on every device used)."},
    {"is_device_array", py_is_device_array, METH_O,
     "is_device_array(x) -> bool: x is a DeviceArray, or exports CUDA memory by __dlpack__ or\n"
     "__cuda_array_interface__ (a layer on the GPU keeps such inputs on the device)."},
    {"_fp16_linear", (PyCFunction)(void (*)(void))py_fp16_linear, METH_VARARGS | METH_KEYWORDS, fp16_linear_doc},
    {"_int8_matmul_cuda", (PyCFunction)(void (*)(void))py_int8_matmul_cuda, METH_VARARGS | METH_KEYWORDS,
     int8_matmul_cuda_doc},
    {"_cuda_time", (PyCFunction)(void (*)(void))py_cuda_time, METH_VARARGS | METH_KEYWORDS, cuda_time_doc},
    {"_graph_capture", py_graph_capture, METH_O, graph_capture_doc},
    {"_stream_create", py_stream_create, METH_NOARGS, stream_create_doc},
    {"_stream_destroy", py_stream_destroy, METH_O, "_stream_destroy(handle): destroy a stream made by _stream_create."},
    {"_copy_into", (PyCFunction)(void (*)(void))py_copy_into, METH_VARARGS, copy_into_doc},
    {"_set_fused", py_set_fused, METH_O, set_fused_doc},
    {"_sm90_calls", py_sm90_calls, METH_NOARGS, sm90_calls_doc},
    {NULL, NULL, 0, NULL},
};

/* ================================================================== the capsule for _C */

static const l8_backend *api_backend_for(PyObject *module, int device, void **ctx) {
    l8_cuda_state *st = PyModule_GetState(module);
    *ctx = NULL;
    if (ready_device(st, device) < 0) return NULL;
    *ctx = st->ctx;
    return &l8_cuda_backend;
}

static int api_is_device_input(PyObject *module, PyObject *x) {
    return is_device_input(PyModule_GetState(module), x);
}

static PyObject *api_forward_device(PyObject *module, const l8_layer *L, PyObject *xo, int out_type) {
    l8_cuda_state *st = PyModule_GetState(module);
    const cudaStream_t s = current_stream(st);
    dev_in x;
    PyObject *y = NULL;
    if (require_device_input(st, xo, s, &x, "x") < 0) goto done;
    if (x.ndim != 2 || x.shape[1] != L->in_features) {
        PyErr_Format(PyExc_ValueError, "x must be (m, %lld) for this layer (in_features = %lld), got a %d-D array "
                     "with last dimension %lld", (long long)L->in_features, (long long)L->in_features, x.ndim,
                     (long long)(x.ndim ? x.shape[x.ndim - 1] : 0));
        goto done;
    }
    if (x.dtype != L8_F16 && x.dtype != L8_F32) {
        PyErr_Format(PyExc_TypeError, "x must be float16 or float32, got %s", dtype_str(x.dtype));
        goto done;
    }
    if (check_data(&x, "x") < 0) goto done;
    if (x.device != L->device && !(x.device < 0 && x.shape[0] == 0)) { /* -1: an empty CAI array */
        PyErr_Format(PyExc_ValueError, "x is on cuda:%d but the layer is on cuda:%d", x.device, L->device);
        goto done;
    }
    const l8_dtype yt = out_type < 0 ? x.dtype : out_type == NPY_HALF ? L8_F16 : L8_F32;
    const int64_t m = x.shape[0], shp[2] = {m, L->out_features};
    if (!(y = device_array_alloc(st, 2, shp, yt, L->device, s))) goto done;
    l8_status e = {0};
    int rc;
    Py_BEGIN_ALLOW_THREADS
    rc = l8_cuda_linear_forward(L, x.ptr, x.dtype, m, ((l8_DeviceArrayObject *)y)->data, yt, s, &e);
    rc = keep_inputs(rc, s, &e, &x, NULL, NULL);
    Py_END_ALLOW_THREADS
    if (rc < 0) {
        Py_CLEAR(y);
        l8_raise(&e);
    }
done:
    dev_in_release(&x);
    return y;
}

/* ================================================================== module */

static const l8_cuda_api cuda_api = {
    L8_CUDA_API_VERSION, sizeof(l8_layer), sizeof(l8_backend), api_backend_for, api_is_device_input,
    api_forward_device,
};

static int module_exec(PyObject *m) {
    if (_import_array() < 0) return -1;
    l8_cuda_state *st = PyModule_GetState(m);
    st->ctx = NULL; /* no CUDA call here: this module imports on machines without a GPU or driver */
    st->DeviceArray_type = (PyTypeObject *)PyType_FromModuleAndSpec(m, &l8_device_array_spec, NULL);
    if (!st->DeviceArray_type || PyModule_AddType(m, st->DeviceArray_type) < 0) return -1;
    st->Graph_type = (PyTypeObject *)PyType_FromModuleAndSpec(m, &graph_spec, NULL);
    if (!st->Graph_type || PyModule_AddType(m, st->Graph_type) < 0) return -1;
    PyObject *cap = PyCapsule_New((void *)&cuda_api, L8_CUDA_API_CAPSULE, NULL);
    if (!cap) return -1;
    if (PyModule_AddObject(m, "_api", cap) < 0) {
        Py_DECREF(cap);
        return -1;
    }
    return 0;
}

static int module_traverse(PyObject *m, visitproc visit, void *arg) {
    l8_cuda_state *st = PyModule_GetState(m);
    Py_VISIT(st->DeviceArray_type);
    Py_VISIT(st->Graph_type);
    return 0;
}

static int module_clear(PyObject *m) {
    l8_cuda_state *st = PyModule_GetState(m);
    Py_CLEAR(st->DeviceArray_type);
    Py_CLEAR(st->Graph_type);
    return 0;
}

static void module_free(void *m) {
    module_clear((PyObject *)m);
    l8_cuda_state *st = PyModule_GetState((PyObject *)m);
    l8_cuda_ctx_free(st->ctx); /* every layer and array using it is gone: they hold this module */
    st->ctx = NULL;
}

static PyModuleDef_Slot module_slots[] = {
    {Py_mod_exec, module_exec},
    {0, NULL},
};

static struct PyModuleDef cuda_module_def = {
    PyModuleDef_HEAD_INIT,
    .m_name = "llmint8._cuda",
    .m_doc = "llmint8's CUDA backend: device arrays, the CUDA Int8Linear, cuBLASLt. Loaded on first CUDA use.",
    .m_size = sizeof(l8_cuda_state),
    .m_methods = module_methods,
    .m_slots = module_slots,
    .m_traverse = module_traverse,
    .m_clear = module_clear,
    .m_free = module_free,
};

PyMODINIT_FUNC PyInit__cuda(void) { return PyModuleDef_Init(&cuda_module_def); }
