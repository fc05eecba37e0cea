/* module.c: llmint8._C, the validating entry points.
 *
 * Every function here checks dtypes, shapes and values, converts inputs to
 * C-contiguous native arrays (copying only when needed, never writing to them),
 * releases the GIL around compute, and turns an l8_status into an exception:
 * TypeError for dtypes, ValueError for shapes and values, MemoryError, RuntimeError.
 *
 * Sections: helpers / quantization primitives / int8 GEMM / Int8Linear / module.
 */
#define LLMINT8_MODULE_C
#include "py.h"

#include <math.h>
#include <stdlib.h>
#ifdef LLMINT8_OPENMP
#include <omp.h>
#endif

#include "cpu_features.h"
#include "gemm.h"
#include "quantize.h"
#include "threadpool.h"
#ifdef LLMINT8_CUDA
#include "cuda_common.h"
#ifndef LLMINT8_CUDA_ARCHS
#define LLMINT8_CUDA_ARCHS "unknown"
#endif
#endif

static struct PyModuleDef l8_module_def;

/* ================================================================== helpers */

PyObject *l8_raise(const l8_status *st) {
    PyObject *type = st->code == L8_ERR_TYPE    ? PyExc_TypeError
                     : st->code == L8_ERR_VALUE ? PyExc_ValueError
                     : st->code == L8_ERR_NOMEM ? PyExc_MemoryError
                                                : PyExc_RuntimeError;
    PyErr_SetString(type, st->msg[0] ? st->msg : "llmint8: unknown error");
    return NULL;
}

/* The module (borrowed) that created tp or one of its bases (Python subclasses). */
static PyObject *module_of_type(PyTypeObject *tp) {
#if PY_VERSION_HEX >= 0x030B0000
    return PyType_GetModuleByDef(tp, &l8_module_def);
#else
    /* 3.10: walk the MRO for the heap type this module created */
    PyObject *mro = tp->tp_mro;
    for (Py_ssize_t i = 0; mro && i < PyTuple_GET_SIZE(mro); i++) {
        PyTypeObject *b = (PyTypeObject *)PyTuple_GET_ITEM(mro, i);
        if (!PyType_HasFeature(b, Py_TPFLAGS_HEAPTYPE)) continue;
        PyObject *m = PyType_GetModule(b);
        if (m && PyModule_GetDef(m) == &l8_module_def) return m;
        PyErr_Clear();
    }
    PyErr_SetString(PyExc_TypeError, "llmint8: type does not belong to llmint8._C");
    return NULL;
#endif
}

l8_state *l8_state_from_type(PyTypeObject *tp) {
    PyObject *m = module_of_type(tp);
    return m ? PyModule_GetState(m) : NULL;
}

static int num_threads(const l8_state *s) {
    return s && s->num_threads > 0 ? s->num_threads : l8_default_threads();
}

/* The CPU GEMM kernel to use: `name` (a str) when given, else the module's choice
 * (LLMINT8_CPU_KERNEL at import, or set_cpu_kernel), else the best the CPU supports.
 * ValueError for a name that is no kernel, RuntimeError for one this CPU cannot run. */
static int resolve_cpu_kernel(const l8_state *st, PyObject *name, l8_kernel *out) {
    int k;
    if (name && name != Py_None) {
        if (!PyUnicode_Check(name)) {
            PyErr_Format(PyExc_TypeError, "kernel must be a str or None, got %R", name);
            return -1;
        }
        const char *s = PyUnicode_AsUTF8(name);
        if (!s) return -1;
        if ((k = l8_kernel_from_name(s)) < 0) {
            PyErr_Format(PyExc_ValueError,
                         "unknown CPU kernel %R; expected one of 'portable', 'avx2', 'avxvnni', 'avx512vnni'", name);
            return -1;
        }
    } else if (st->cpu_kernel_bad[0]) {
        PyErr_Format(PyExc_ValueError,
                     "LLMINT8_CPU_KERNEL=%s names no CPU kernel; expected portable, avx2, avxvnni or avx512vnni",
                     st->cpu_kernel_bad);
        return -1;
    } else {
        k = st->cpu_kernel >= 0 ? st->cpu_kernel : (int)l8_kernel_best();
    }
    if (!(l8_kernels_supported() & (1u << k))) {
        PyErr_Format(PyExc_RuntimeError, "CPU kernel '%s' is not supported by this CPU (or this build); "
                     "supported: see llmint8._C.cpu_kernels()", l8_kernel_name((l8_kernel)k));
        return -1;
    }
    *out = (l8_kernel)k;
    return 0;
}

static void shape_str(PyArrayObject *a, char *buf, size_t n) {
    int nd = PyArray_NDIM(a), off = snprintf(buf, n, "(");
    for (int i = 0; i < nd && off < (int)n; i++)
        off += snprintf(buf + off, n - (size_t)off, i + 1 < nd || nd == 1 ? "%lld," : "%lld",
                        (long long)PyArray_DIM(a, i));
    if (off < (int)n) snprintf(buf + off, n - (size_t)off, ")");
}

static PyObject *dtype_name(PyArrayObject *a) { return PyObject_Str((PyObject *)PyArray_DESCR(a)); }

/* obj as a C-contiguous, aligned, native-order array of one of the allowed types
 * (new reference; a copy only where obj is not one already). `allowed` lists type
 * numbers ending with -1; `want` is the type to convert to, or -1 to keep obj's. */
static PyArrayObject *as_array(PyObject *obj, const char *name, const int *allowed, const char *expected,
                               int want, int min_nd, int max_nd) {
    PyArrayObject *a0 = (PyArrayObject *)PyArray_FromAny(obj, NULL, 0, 0, 0, NULL);
    if (!a0) return NULL;
    int tn = PyArray_TYPE(a0), ok = 0;
    for (const int *t = allowed; *t >= 0; t++) ok |= *t == tn;
    if (!ok) {
        PyObject *d = dtype_name(a0);
        PyErr_Format(PyExc_TypeError, "%s must be %s, got %S", name, expected, d);
        Py_XDECREF(d);
        Py_DECREF(a0);
        return NULL;
    }
    int nd = PyArray_NDIM(a0);
    if (nd < min_nd || nd > max_nd) {
        char s[128];
        shape_str(a0, s, sizeof s);
        if (min_nd == max_nd)
            PyErr_Format(PyExc_ValueError, "%s must be %d-D, got shape %s", name, min_nd, s);
        else
            PyErr_Format(PyExc_ValueError, "%s must be %d-D to %d-D, got shape %s", name, min_nd, max_nd, s);
        Py_DECREF(a0);
        return NULL;
    }
    PyArrayObject *a = (PyArrayObject *)PyArray_FromAny(
        (PyObject *)a0, PyArray_DescrFromType(want >= 0 ? want : tn), 0, 0,
        NPY_ARRAY_C_CONTIGUOUS | NPY_ARRAY_ALIGNED | NPY_ARRAY_NOTSWAPPED | NPY_ARRAY_FORCECAST, NULL);
    Py_DECREF(a0);
    return a;
}

static const int FLOAT_TYPES[] = {NPY_HALF, NPY_FLOAT, -1};
static const int INT8_TYPES[] = {NPY_INT8, -1};

static PyArrayObject *as_float(PyObject *obj, const char *name, int min_nd, int max_nd) {
    return as_array(obj, name, FLOAT_TYPES, "float16 or float32", -1, min_nd, max_nd);
}

static l8_dtype l8_type_of(PyArrayObject *a) { return PyArray_TYPE(a) == NPY_HALF ? L8_F16 : L8_F32; }

/* ValueError naming the array and the first bad element, or 0 when all are finite. */
static int check_finite(PyArrayObject *a, const char *name) {
    int64_t n = PyArray_SIZE(a), bad;
    Py_BEGIN_ALLOW_THREADS
    bad = l8_find_nonfinite(PyArray_DATA(a), l8_type_of(a), n);
    Py_END_ALLOW_THREADS
    if (bad < 0) return 0;
    if (PyArray_NDIM(a) == 2) {
        int64_t k = PyArray_DIM(a, 1);
        PyErr_Format(PyExc_ValueError, "%s contains NaN or Inf at [%lld, %lld]; expected finite values", name,
                     (long long)(bad / k), (long long)(bad % k));
    } else {
        PyErr_Format(PyExc_ValueError, "%s contains NaN or Inf at flat index %lld; expected finite values", name,
                     (long long)bad);
    }
    return -1;
}

static int parse_threshold(PyObject *obj, float *out) {
    double t = PyFloat_AsDouble(obj);
    if (t == -1.0 && PyErr_Occurred()) return -1;
    if (!isfinite(t) || t < 0.0 || t > 3.0e38) {
        PyErr_Format(PyExc_ValueError, "threshold must be a finite number >= 0 (0 turns decomposition off), got %R",
                     obj);
        return -1;
    }
    *out = (float)t;
    return 0;
}

/* Sorted, unique int32 column indices in [0, k) from any integer sequence (new ref). */
static PyArrayObject *as_columns(PyObject *obj, int64_t k, const char *name) {
    PyArrayObject *a0 = (PyArrayObject *)PyArray_FromAny(obj, NULL, 0, 0, 0, NULL);
    if (!a0) return NULL;
    if (PyArray_NDIM(a0) > 1) {
        char s[128];
        shape_str(a0, s, sizeof s);
        PyErr_Format(PyExc_ValueError, "%s must be a 1-D sequence of column indices, got shape %s", name, s);
        Py_DECREF(a0);
        return NULL;
    }
    /* an empty list arrives as float64: accept any empty input */
    if (PyArray_SIZE(a0) > 0 && !PyArray_ISINTEGER(a0)) {
        PyObject *d = dtype_name(a0);
        PyErr_Format(PyExc_TypeError, "%s must hold integers, got dtype %S", name, d);
        Py_XDECREF(d);
        Py_DECREF(a0);
        return NULL;
    }
    PyArrayObject *a64 = (PyArrayObject *)PyArray_FromAny((PyObject *)a0, PyArray_DescrFromType(NPY_INT64), 0, 1,
                                                          NPY_ARRAY_C_CONTIGUOUS | NPY_ARRAY_ALIGNED |
                                                              NPY_ARRAY_FORCECAST | NPY_ARRAY_ENSURECOPY,
                                                          NULL);
    Py_DECREF(a0);
    if (!a64) return NULL;
    npy_intp n = PyArray_SIZE(a64);
    int64_t *v = PyArray_DATA(a64);
    for (npy_intp i = 0; i < n; i++)
        if (v[i] < 0 || v[i] >= k) {
            PyErr_Format(PyExc_ValueError, "%s holds column %lld; expected indices in [0, %lld)", name,
                         (long long)v[i], (long long)k);
            Py_DECREF(a64);
            return NULL;
        }
    npy_intp dims[1] = {0};
    for (npy_intp i = 1; i < n; i++) /* insertion sort: the list is short and often sorted */
        for (npy_intp j = i; j > 0 && v[j - 1] > v[j]; j--) {
            int64_t t = v[j]; v[j] = v[j - 1]; v[j - 1] = t;
        }
    for (npy_intp i = 0; i < n; i++)
        if (dims[0] == 0 || v[dims[0] - 1] != v[i]) v[dims[0]++] = v[i];
    PyArrayObject *out = (PyArrayObject *)PyArray_SimpleNew(1, dims, NPY_INT32);
    if (out)
        for (npy_intp i = 0; i < dims[0]; i++) ((int32_t *)PyArray_DATA(out))[i] = (int32_t)v[i];
    Py_DECREF(a64);
    return out;
}

/* ================================================================== quantization primitives */

PyDoc_STRVAR(quantize_absmax_doc,
"quantize_absmax(x) -> (q, absmax)\n\n"
"Per-tensor absmax quantization: q = round(127 * x / absmax), int8 in [-127, 127],\n"
"same shape as x. absmax = max |x| (a Python float; 0 for an all-zero x).");

static PyObject *py_quantize_absmax(PyObject *mod, PyObject *arg) {
    (void)mod;
    PyArrayObject *x = as_float(arg, "x", 1, 32);
    if (!x) return NULL;
    PyArrayObject *q = NULL;
    if (check_finite(x, "x") < 0) goto fail;
    if (!(q = (PyArrayObject *)PyArray_SimpleNew(PyArray_NDIM(x), PyArray_DIMS(x), NPY_INT8))) goto fail;
    float amax;
    Py_BEGIN_ALLOW_THREADS
    amax = l8_absmax(PyArray_DATA(x), l8_type_of(x), PyArray_SIZE(x));
    l8_quantize_absmax(PyArray_DATA(x), l8_type_of(x), PyArray_SIZE(x), amax, PyArray_DATA(q));
    Py_END_ALLOW_THREADS
    Py_DECREF(x);
    return Py_BuildValue("(Nd)", q, (double)amax);
fail:
    Py_DECREF(x);
    Py_XDECREF(q);
    return NULL;
}

PyDoc_STRVAR(quantize_rowwise_doc,
"quantize_rowwise(x, skip_columns=None) -> (q, scales)\n\n"
"Vector-wise quantization: each row of x (m, k) gets its own absmax scale.\n"
"q (m, k) int8; scales (m,) float32 absmax per row. A 1-D x is one row (scales (1,)).\n"
"skip_columns: column indices left out of the scales and quantized as 0.");

static PyObject *py_quantize_rowwise(PyObject *mod, PyObject *args, PyObject *kw) {
    static char *kwlist[] = {"x", "skip_columns", NULL};
    PyObject *xo, *skipo = Py_None;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "O|O:quantize_rowwise", kwlist, &xo, &skipo)) return NULL;
    l8_state *st = PyModule_GetState(mod);
    PyArrayObject *x = as_float(xo, "x", 1, 2), *q = NULL, *s = NULL, *cols = NULL;
    uint8_t *skip = NULL;
    if (!x) return NULL;
    if (check_finite(x, "x") < 0) goto fail;
    const int64_t m = PyArray_NDIM(x) == 2 ? PyArray_DIM(x, 0) : 1;
    const int64_t k = PyArray_DIM(x, PyArray_NDIM(x) - 1);
    if (skipo != Py_None) {
        if (!(cols = as_columns(skipo, k, "skip_columns"))) goto fail;
        if (!(skip = calloc((size_t)k + 1, 1))) { PyErr_NoMemory(); goto fail; }
        for (npy_intp i = 0; i < PyArray_SIZE(cols); i++) skip[((int32_t *)PyArray_DATA(cols))[i]] = 1;
    }
    npy_intp sd[1] = {m};
    if (!(q = (PyArrayObject *)PyArray_SimpleNew(PyArray_NDIM(x), PyArray_DIMS(x), NPY_INT8))) goto fail;
    if (!(s = (PyArrayObject *)PyArray_SimpleNew(1, sd, NPY_FLOAT32))) goto fail;
    const int nt = num_threads(st);
    Py_BEGIN_ALLOW_THREADS
    l8_quantize_rows(PyArray_DATA(x), l8_type_of(x), m, k, skip, PyArray_DATA(q), PyArray_DATA(s), nt);
    Py_END_ALLOW_THREADS
    free(skip);
    Py_XDECREF(cols);
    Py_DECREF(x);
    return Py_BuildValue("(NN)", q, s);
fail:
    free(skip);
    Py_XDECREF(cols);
    Py_DECREF(x);
    Py_XDECREF(q);
    Py_XDECREF(s);
    return NULL;
}

PyDoc_STRVAR(quantize_zeropoint_doc,
"quantize_zeropoint(x) -> (q, scale, zeropoint)\n\n"
"Asymmetric per-tensor quantization over the full int8 range [-128, 127]:\n"
"x ~= (q - zeropoint) * scale. The range [min, max] is widened to include 0,\n"
"so 0 is exact and zeropoint fits int8. scale is the step (max - min) / 255.");

static PyObject *py_quantize_zeropoint(PyObject *mod, PyObject *arg) {
    (void)mod;
    PyArrayObject *x = as_float(arg, "x", 1, 32), *q = NULL;
    if (!x) return NULL;
    if (check_finite(x, "x") < 0) goto fail;
    if (!(q = (PyArrayObject *)PyArray_SimpleNew(PyArray_NDIM(x), PyArray_DIMS(x), NPY_INT8))) goto fail;
    float scale;
    int32_t zp;
    Py_BEGIN_ALLOW_THREADS
    l8_quantize_zeropoint(PyArray_DATA(x), l8_type_of(x), PyArray_SIZE(x), PyArray_DATA(q), &scale, &zp);
    Py_END_ALLOW_THREADS
    Py_DECREF(x);
    return Py_BuildValue("(Ndi)", q, (double)scale, (int)zp);
fail:
    Py_DECREF(x);
    Py_XDECREF(q);
    return NULL;
}

PyDoc_STRVAR(find_outlier_columns_doc,
"find_outlier_columns(x, threshold=6.0) -> int32 array\n\n"
"Sorted indices of the columns of x (m, k) with any |x| >= threshold (a 1-D x is\n"
"one row). threshold 0 means no decomposition and returns an empty array.");

static PyObject *py_find_outlier_columns(PyObject *mod, PyObject *args, PyObject *kw) {
    static char *kwlist[] = {"x", "threshold", NULL};
    PyObject *xo, *to = NULL;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "O|O:find_outlier_columns", kwlist, &xo, &to)) return NULL;
    float thr = 6.0f;
    if (to && parse_threshold(to, &thr) < 0) return NULL;
    l8_state *st = PyModule_GetState(mod);
    PyArrayObject *x = as_float(xo, "x", 1, 2), *out = NULL;
    if (!x) return NULL;
    float *colmax = NULL;
    if (check_finite(x, "x") < 0) goto fail;
    const int64_t m = PyArray_NDIM(x) == 2 ? PyArray_DIM(x, 0) : 1;
    const int64_t k = PyArray_DIM(x, PyArray_NDIM(x) - 1);
    if (!(colmax = l8_malloc_array((size_t)k, sizeof(float)))) { PyErr_NoMemory(); goto fail; }
    const int nt = num_threads(st);
    Py_BEGIN_ALLOW_THREADS
    l8_column_absmax(PyArray_DATA(x), l8_type_of(x), m, k, colmax, nt);
    Py_END_ALLOW_THREADS
    npy_intp n = 0;
    for (int64_t j = 0; j < k; j++) n += thr > 0.0f && colmax[j] >= thr;
    if (!(out = (PyArrayObject *)PyArray_SimpleNew(1, &n, NPY_INT32))) goto fail;
    for (int64_t j = 0, o = 0; j < k; j++)
        if (thr > 0.0f && colmax[j] >= thr) ((int32_t *)PyArray_DATA(out))[o++] = (int32_t)j;
    free(colmax);
    Py_DECREF(x);
    return (PyObject *)out;
fail:
    free(colmax);
    Py_DECREF(x);
    return NULL;
}

/* ================================================================== int8 GEMM */

PyDoc_STRVAR(int8_matmul_doc,
"int8_matmul(a, b, reference=False, kernel=None) -> int32 array\n\n"
"Exact int8 GEMM: a (m, k) int8, b (n, k) int8 -> a @ b.T as int32 (m, n), with\n"
"int32 accumulation, for every int8 value (-128 included). reference=True runs the\n"
"plain triple loop (the oracle). kernel: 'portable', 'avx2', 'avxvnni' or 'avx512vnni'\n"
"(see cpu_kernels()); None uses LLMINT8_CPU_KERNEL, else the fastest the CPU has.\n"
"ValueError for an unknown name, RuntimeError for a kernel this CPU lacks.");

static PyObject *py_int8_matmul(PyObject *mod, PyObject *args, PyObject *kw) {
    static char *kwlist[] = {"a", "b", "reference", "kernel", NULL};
    PyObject *ao, *bo, *kerno = Py_None;
    int ref = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "OO|pO:int8_matmul", kwlist, &ao, &bo, &ref, &kerno)) return NULL;
    l8_state *st = PyModule_GetState(mod);
    l8_kernel kern = L8_KERNEL_PORTABLE;
    if (!ref && resolve_cpu_kernel(st, kerno, &kern) < 0) return NULL;
    PyArrayObject *a = as_array(ao, "a", INT8_TYPES, "int8", NPY_INT8, 2, 2), *b = NULL, *c = NULL;
    if (!a) return NULL;
    if (!(b = as_array(bo, "b", INT8_TYPES, "int8", NPY_INT8, 2, 2))) goto fail;
    const int64_t m = PyArray_DIM(a, 0), k = PyArray_DIM(a, 1), n = PyArray_DIM(b, 0);
    if (PyArray_DIM(b, 1) != k) {
        PyErr_Format(PyExc_ValueError, "b must be (n, %lld) to match a (%lld, %lld), got (%lld, %lld)",
                     (long long)k, (long long)m, (long long)k, (long long)n, (long long)PyArray_DIM(b, 1));
        goto fail;
    }
    if (k > L8_GEMM_MAX_K) {
        PyErr_Format(PyExc_ValueError, "k = %lld is too large for exact int32 accumulation; expected k <= %lld",
                     (long long)k, (long long)L8_GEMM_MAX_K);
        goto fail;
    }
    npy_intp dims[2] = {m, n};
    if (!(c = (PyArrayObject *)PyArray_SimpleNew(2, dims, NPY_INT32))) goto fail;
    const int nt = num_threads(st);
    int grc = 0;
    Py_BEGIN_ALLOW_THREADS
    if (ref) {
        l8_gemm_s8_ref(PyArray_DATA(a), PyArray_DATA(b), m, n, k, PyArray_DATA(c));
    } else if (kern == L8_KERNEL_PORTABLE) {
        l8_store_ctx sc = {PyArray_DATA(c), n};
        l8_gemm_s8(PyArray_DATA(a), PyArray_DATA(b), m, n, k, l8_epilogue_store, &sc, nt);
    } else { /* pack b for the kernel, as a layer does once at creation */
        l8_store_ctx sc = {PyArray_DATA(c), n};
        l8_packed_b pb;
        grc = l8_pack_b(kern, PyArray_DATA(b), n, k, &pb);
        if (grc == 0) grc = l8_gemm_s8_packed(PyArray_DATA(a), m, &pb, l8_epilogue_store, &sc, nt);
        l8_packed_b_free(&pb);
    }
    Py_END_ALLOW_THREADS
    if (grc < 0) {
        PyErr_NoMemory();
        Py_DECREF(c);
        goto fail;
    }
    Py_DECREF(a);
    Py_DECREF(b);
    return (PyObject *)c;
fail:
    Py_DECREF(a);
    Py_XDECREF(b);
    return NULL;
}

/* ================================================================== weights */

PyDoc_STRVAR(quantize_weight_doc,
"quantize_weight(weight, outlier_columns=None) -> (weight_int8, weight_scale, outlier_weight)\n\n"
"Quantize a layer weight (out, in) float16/float32 the way Int8Linear holds it:\n"
"weight_int8 (out, in) int8 with the outlier columns set to 0; weight_scale (out,)\n"
"float32 absmax of each row over the other columns; outlier_weight (out, n_outliers)\n"
"float16, the original weight's outlier columns (outlier_columns sorted, unique).");

static PyObject *py_quantize_weight(PyObject *mod, PyObject *args, PyObject *kw) {
    static char *kwlist[] = {"weight", "outlier_columns", NULL};
    PyObject *wo, *co = Py_None;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "O|O:quantize_weight", kwlist, &wo, &co)) return NULL;
    l8_state *st = PyModule_GetState(mod);
    PyArrayObject *w = as_float(wo, "weight", 2, 2), *cols = NULL, *wq = NULL, *ws = NULL, *wf = NULL;
    if (!w) return NULL;
    if (check_finite(w, "weight") < 0) goto fail;
    const int64_t n = PyArray_DIM(w, 0), k = PyArray_DIM(w, 1);
    if (co == Py_None) {
        npy_intp z = 0;
        cols = (PyArrayObject *)PyArray_SimpleNew(1, &z, NPY_INT32);
    } else {
        cols = as_columns(co, k, "outlier_columns");
    }
    if (!cols) goto fail;
    const int64_t no = PyArray_SIZE(cols);
    npy_intp d2[2] = {n, k}, d1[1] = {n}, dout[2] = {n, no};
    if (!(wq = (PyArrayObject *)PyArray_SimpleNew(2, d2, NPY_INT8)) ||
        !(ws = (PyArrayObject *)PyArray_SimpleNew(1, d1, NPY_FLOAT32)) ||
        !(wf = (PyArrayObject *)PyArray_SimpleNew(2, dout, NPY_FLOAT16)))
        goto fail;
    l8_weights dst = {PyArray_DATA(wq), PyArray_DATA(ws), PyArray_DATA(wf), NULL};
    l8_status s = {0};
    int rc;
    const int nt = num_threads(st);
    Py_BEGIN_ALLOW_THREADS
    rc = l8_quantize_weight(PyArray_DATA(w), l8_type_of(w), n, k, PyArray_DATA(cols), no, &dst, nt, &s);
    Py_END_ALLOW_THREADS
    if (rc < 0) {
        l8_raise(&s);
        goto fail;
    }
    Py_DECREF(w);
    Py_DECREF(cols);
    return Py_BuildValue("(NNN)", wq, ws, wf);
fail:
    Py_DECREF(w);
    Py_XDECREF(cols);
    Py_XDECREF(wq);
    Py_XDECREF(ws);
    Py_XDECREF(wf);
    return NULL;
}

/* ================================================================== Int8Linear */

/* "cpu" -> -1, "cuda" -> 0, "cuda:N" -> N; anything else is a ValueError. */
static int parse_device(PyObject *obj, int *device) {
    if (!PyUnicode_Check(obj)) {
        PyErr_Format(PyExc_TypeError, "device must be a str such as 'cpu', 'cuda' or 'cuda:0', got %R", obj);
        return -1;
    }
    const char *s = PyUnicode_AsUTF8(obj);
    if (!s) return -1;
    if (!strcmp(s, "cpu")) { *device = -1; return 0; }
    if (!strcmp(s, "cuda")) { *device = 0; return 0; }
    if (!strncmp(s, "cuda:", 5) && s[5]) {
        char *end;
        long v = strtol(s + 5, &end, 10);
        if (!*end && v >= 0 && v < 1024) { *device = (int)v; return 0; }
    }
    PyErr_Format(PyExc_ValueError, "device must be 'cpu', 'cuda' or 'cuda:N', got %R", obj);
    return -1;
}

static const l8_backend *backend_for(l8_state *st, int device, void **ctx) {
    (void)st;
    *ctx = NULL;
    if (device < 0) return &l8_cpu_backend;
#ifdef LLMINT8_CUDA
    return l8_cuda_backend_for(st, device, ctx);
#else
    PyErr_SetString(PyExc_RuntimeError,
                    "device 'cuda' requested but this build of llmint8 has no CUDA backend; "
                    "use device='cpu' or rebuild with the CUDA toolkit (nvcc) on PATH");
    return NULL;
#endif
}

static PyObject *linear_new(PyTypeObject *tp, PyObject *args, PyObject *kw) {
    static char *kwlist[] = {"weight_int8", "weight_scale", "outlier_columns", "outlier_weight",
                             "bias", "threshold", "device", NULL};
    PyObject *wqo, *wso, *co = Py_None, *woo = Py_None, *bo = Py_None, *to = NULL, *devo = NULL;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "OO|OOOOO:Int8Linear", kwlist, &wqo, &wso, &co, &woo, &bo, &to,
                                     &devo))
        return NULL;
    PyObject *module = module_of_type(tp);
    if (!module) return NULL;
    l8_state *st = PyModule_GetState(module);
    float thr = 6.0f;
    int device = -1;
    if (to && parse_threshold(to, &thr) < 0) return NULL;
    if (devo && parse_device(devo, &device) < 0) return NULL;

    PyArrayObject *wq = NULL, *ws = NULL, *cols = NULL, *wout = NULL, *bias = NULL;
    l8_Int8LinearObject *self = NULL;
    if (!(wq = as_array(wqo, "weight_int8", INT8_TYPES, "int8", NPY_INT8, 2, 2))) goto fail;
    const int64_t n = PyArray_DIM(wq, 0), k = PyArray_DIM(wq, 1);
    if (n < 1 || k < 1) {
        PyErr_Format(PyExc_ValueError, "weight_int8 must have at least one row and column, got (%lld, %lld)",
                     (long long)n, (long long)k);
        goto fail;
    }
    if (k > L8_GEMM_MAX_K) {
        PyErr_Format(PyExc_ValueError, "in_features = %lld is too large for exact int32 accumulation; expected <= %lld",
                     (long long)k, (long long)L8_GEMM_MAX_K);
        goto fail;
    }
    if (!(ws = as_array(wso, "weight_scale", FLOAT_TYPES, "float16 or float32", NPY_FLOAT32, 1, 1))) goto fail;
    if (PyArray_DIM(ws, 0) != n) {
        PyErr_Format(PyExc_ValueError, "weight_scale must be (%lld,) to match weight_int8, got (%lld,)",
                     (long long)n, (long long)PyArray_DIM(ws, 0));
        goto fail;
    }
    if (check_finite(ws, "weight_scale") < 0) goto fail;
    for (int64_t i = 0; i < n; i++)
        if (((float *)PyArray_DATA(ws))[i] < 0.0f) {
            PyErr_Format(PyExc_ValueError, "weight_scale[%lld] is negative; expected absmax values >= 0", (long long)i);
            goto fail;
        }
    if (co == Py_None) {
        npy_intp z = 0;
        cols = (PyArrayObject *)PyArray_SimpleNew(1, &z, NPY_INT32);
    } else {
        cols = as_columns(co, k, "outlier_columns");
    }
    if (!cols) goto fail;
    const int64_t no = PyArray_SIZE(cols);
    if (woo == Py_None) {
        if (no) {
            PyErr_SetString(PyExc_ValueError, "outlier_weight is required when outlier_columns is given");
            goto fail;
        }
        npy_intp d[2] = {n, 0};
        wout = (PyArrayObject *)PyArray_SimpleNew(2, d, NPY_FLOAT16);
    } else {
        wout = as_array(woo, "outlier_weight", FLOAT_TYPES, "float16 or float32", NPY_FLOAT16, 2, 2);
    }
    if (!wout) goto fail;
    if (PyArray_DIM(wout, 0) != n || PyArray_DIM(wout, 1) != no) {
        PyErr_Format(PyExc_ValueError, "outlier_weight must be (%lld, %lld) (out_features, len(outlier_columns)), "
                     "got (%lld, %lld)", (long long)n, (long long)no, (long long)PyArray_DIM(wout, 0),
                     (long long)PyArray_DIM(wout, 1));
        goto fail;
    }
    if (check_finite(wout, "outlier_weight") < 0) goto fail;
    if (bo != Py_None) {
        if (!(bias = as_array(bo, "bias", FLOAT_TYPES, "float16 or float32", NPY_FLOAT32, 1, 1))) goto fail;
        if (PyArray_DIM(bias, 0) != n) {
            PyErr_Format(PyExc_ValueError, "bias must be (%lld,) to match the weight, got (%lld,)", (long long)n,
                         (long long)PyArray_DIM(bias, 0));
            goto fail;
        }
        if (check_finite(bias, "bias") < 0) goto fail;
    }

    if (!(self = (l8_Int8LinearObject *)tp->tp_alloc(tp, 0))) goto fail;
    l8_layer *L = &self->layer;
    L->device = device;
    L->in_features = k;
    L->out_features = n;
    L->n_outliers = no;
    L->has_bias = bias != NULL;
    L->threshold = thr;
    if (!(L->outlier_cols = l8_malloc_array((size_t)no, sizeof(int32_t)))) { PyErr_NoMemory(); goto fail; }
    if (no) memcpy(L->outlier_cols, PyArray_DATA(cols), (size_t)no * sizeof(int32_t));
    const l8_backend *be = backend_for(st, device, &L->backend_ctx);
    if (!be) goto fail;
    if (device < 0) {
        l8_kernel kern;
        if (resolve_cpu_kernel(st, NULL, &kern) < 0) goto fail;
        L->cpu_kernel = (int)kern;
    }
    l8_weights w = {PyArray_DATA(wq), PyArray_DATA(ws), PyArray_DATA(wout), bias ? PyArray_DATA(bias) : NULL};
    l8_status s = {0};
    int rc;
    Py_BEGIN_ALLOW_THREADS
    rc = be->create(L, &w, &s);
    Py_END_ALLOW_THREADS
    if (rc < 0) {
        l8_raise(&s);
        goto fail;
    }
    L->backend = be;
    Py_INCREF(module);
    self->module = module;
    Py_DECREF(wq); Py_DECREF(ws); Py_DECREF(cols); Py_DECREF(wout); Py_XDECREF(bias);
    return (PyObject *)self;
fail:
    Py_XDECREF(wq); Py_XDECREF(ws); Py_XDECREF(cols); Py_XDECREF(wout); Py_XDECREF(bias);
    Py_XDECREF(self);
    return NULL;
}

static void linear_dealloc(PyObject *op) {
    l8_Int8LinearObject *self = (l8_Int8LinearObject *)op;
    PyTypeObject *tp = Py_TYPE(op);
    l8_layer_release(&self->layer);
    Py_CLEAR(self->module);
    tp->tp_free(op);
    Py_DECREF(tp);
}

PyDoc_STRVAR(linear_forward_doc,
"forward(x, out_dtype=None) -> array\n\n"
"y = x @ weight.T + bias by LLM.int8() for x (m, in_features) float16/float32.\n"
"Returns (m, out_features) in out_dtype (float16 or float32; default x's dtype).\n"
"On a CUDA layer x may also be a device array (a DeviceArray, or any object with\n"
"__dlpack__ or __cuda_array_interface__ on the layer's GPU): the result is then a\n"
"DeviceArray, queued on the current stream with no host round trip.");

static PyObject *linear_forward(PyObject *op, PyObject *args, PyObject *kw) {
    static char *kwlist[] = {"x", "out_dtype", NULL};
    l8_Int8LinearObject *self = (l8_Int8LinearObject *)op;
    const l8_layer *L = &self->layer;
    PyObject *xo;
    PyArray_Descr *od = NULL;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "O|O&:forward", kwlist, &xo, PyArray_DescrConverter2, &od))
        return NULL;
#ifdef LLMINT8_CUDA
    /* device arrays stay on the device: no host round trip */
    if (l8_cuda_is_device_input(PyModule_GetState(self->module), xo)) {
        PyObject *r = NULL;
        if (L->device < 0)
            PyErr_SetString(PyExc_TypeError, "x is a CUDA device array but this layer is on the cpu; pass a NumPy "
                                             "array (DeviceArray.numpy()) or build the layer with device='cuda'");
        else if (od && od->type_num != NPY_HALF && od->type_num != NPY_FLOAT)
            PyErr_Format(PyExc_TypeError, "out_dtype must be float16 or float32, got %S", (PyObject *)od);
        else
            r = l8_cuda_forward_device(self->module, L, xo, od ? od->type_num : -1);
        Py_XDECREF(od);
        return r;
    }
#endif
    PyArrayObject *x = as_float(xo, "x", 2, 2), *y = NULL;
    if (!x) goto fail;
    if (PyArray_DIM(x, 1) != L->in_features) {
        PyErr_Format(PyExc_ValueError, "x must be (m, %lld) for this layer (in_features = %lld), got (%lld, %lld)",
                     (long long)L->in_features, (long long)L->in_features, (long long)PyArray_DIM(x, 0),
                     (long long)PyArray_DIM(x, 1));
        goto fail;
    }
    int yt = od ? od->type_num : PyArray_TYPE(x);
    if (yt != NPY_HALF && yt != NPY_FLOAT) {
        PyErr_Format(PyExc_TypeError, "out_dtype must be float16 or float32, got %S", (PyObject *)od);
        goto fail;
    }
    const int64_t m = PyArray_DIM(x, 0);
    npy_intp dims[2] = {m, L->out_features};
    if (!(y = (PyArrayObject *)PyArray_SimpleNew(2, dims, yt))) goto fail;
    const int nt = num_threads(PyModule_GetState(self->module));
    l8_status s = {0};
    int rc;
    Py_BEGIN_ALLOW_THREADS
    rc = L->backend->forward_host(L, PyArray_DATA(x), l8_type_of(x), m, PyArray_DATA(y),
                                  yt == NPY_HALF ? L8_F16 : L8_F32, nt, &s);
    Py_END_ALLOW_THREADS
    if (rc < 0) {
        l8_raise(&s);
        goto fail;
    }
    Py_XDECREF(od);
    Py_DECREF(x);
    return (PyObject *)y;
fail:
    Py_XDECREF(od);
    Py_XDECREF(x);
    Py_XDECREF(y);
    return NULL;
}

/* Copies of the weights in the canonical layout: (weight_int8, weight_scale, outlier_weight, bias|None). */
static PyObject *linear_export(PyObject *op, PyObject *unused) {
    (void)unused;
    const l8_layer *L = &((l8_Int8LinearObject *)op)->layer;
    npy_intp d2[2] = {L->out_features, L->in_features}, d1[1] = {L->out_features},
             dout[2] = {L->out_features, L->n_outliers};
    PyArrayObject *wq = (PyArrayObject *)PyArray_SimpleNew(2, d2, NPY_INT8);
    PyArrayObject *ws = (PyArrayObject *)PyArray_SimpleNew(1, d1, NPY_FLOAT32);
    PyArrayObject *wf = (PyArrayObject *)PyArray_SimpleNew(2, dout, NPY_FLOAT16);
    PyArrayObject *b = L->has_bias ? (PyArrayObject *)PyArray_SimpleNew(1, d1, NPY_FLOAT32) : NULL;
    if (!wq || !ws || !wf || (L->has_bias && !b)) goto fail;
    l8_weights w = {PyArray_DATA(wq), PyArray_DATA(ws), PyArray_DATA(wf), b ? PyArray_DATA(b) : NULL};
    l8_status s = {0};
    int rc;
    Py_BEGIN_ALLOW_THREADS
    rc = L->backend->export_weights(L, &w, &s);
    Py_END_ALLOW_THREADS
    if (rc < 0) {
        l8_raise(&s);
        goto fail;
    }
    if (!b) {
        Py_INCREF(Py_None);
        return Py_BuildValue("(NNNN)", wq, ws, wf, Py_None);
    }
    return Py_BuildValue("(NNNN)", wq, ws, wf, b);
fail:
    Py_XDECREF(wq); Py_XDECREF(ws); Py_XDECREF(wf); Py_XDECREF(b);
    return NULL;
}

static PyObject *get_in_features(PyObject *op, void *c) {
    (void)c;
    return PyLong_FromLongLong(((l8_Int8LinearObject *)op)->layer.in_features);
}
static PyObject *get_out_features(PyObject *op, void *c) {
    (void)c;
    return PyLong_FromLongLong(((l8_Int8LinearObject *)op)->layer.out_features);
}
static PyObject *get_threshold(PyObject *op, void *c) {
    (void)c;
    return PyFloat_FromDouble(((l8_Int8LinearObject *)op)->layer.threshold);
}
static PyObject *get_device(PyObject *op, void *c) {
    (void)c;
    int d = ((l8_Int8LinearObject *)op)->layer.device;
    return d < 0 ? PyUnicode_FromString("cpu") : PyUnicode_FromFormat("cuda:%d", d);
}
static PyObject *get_has_bias(PyObject *op, void *c) {
    (void)c;
    return PyBool_FromLong(((l8_Int8LinearObject *)op)->layer.has_bias);
}
static PyObject *get_nbytes(PyObject *op, void *c) {
    (void)c;
    return PyLong_FromSize_t(((l8_Int8LinearObject *)op)->layer.nbytes);
}
static PyObject *get_outlier_columns(PyObject *op, void *c) {
    (void)c;
    const l8_layer *L = &((l8_Int8LinearObject *)op)->layer;
    npy_intp n = L->n_outliers;
    PyArrayObject *a = (PyArrayObject *)PyArray_SimpleNew(1, &n, NPY_INT32);
    if (a && n) memcpy(PyArray_DATA(a), L->outlier_cols, (size_t)n * sizeof(int32_t));
    return (PyObject *)a;
}

static PyGetSetDef linear_getset[] = {
    {"in_features", get_in_features, NULL, "Input features (columns of x).", NULL},
    {"out_features", get_out_features, NULL, "Output features (rows of the weight).", NULL},
    {"threshold", get_threshold, NULL, "Dynamic outlier threshold (0 = no dynamic decomposition).", NULL},
    {"device", get_device, NULL, "'cpu' or 'cuda:N'.", NULL},
    {"has_bias", get_has_bias, NULL, "True when the layer adds a bias.", NULL},
    {"nbytes", get_nbytes, NULL, "Bytes held for weights, scales, bias and fp16 outlier columns.", NULL},
    {"outlier_columns", get_outlier_columns, NULL, "Known outlier columns, int32, sorted (a copy).", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyMethodDef linear_methods[] = {
    {"forward", (PyCFunction)(void (*)(void))linear_forward, METH_VARARGS | METH_KEYWORDS, linear_forward_doc},
    {"_export", linear_export, METH_NOARGS,
     "_export() -> (weight_int8, weight_scale, outlier_weight, bias or None): copies of the weights."},
    {NULL, NULL, 0, NULL},
};

PyDoc_STRVAR(linear_doc,
"Int8Linear(weight_int8, weight_scale, outlier_columns=None, outlier_weight=None, bias=None,\n"
"           threshold=6.0, device='cpu')\n\n"
"The C layer behind llmint8.Int8Linear, built from already quantized weights\n"
"(see quantize_weight). Use llmint8.Int8Linear.from_float instead.");

static PyType_Slot linear_slots[] = {
    {Py_tp_new, linear_new},
    {Py_tp_dealloc, linear_dealloc},
    {Py_tp_methods, linear_methods},
    {Py_tp_getset, linear_getset},
    {Py_tp_doc, (void *)linear_doc},
    {0, NULL},
};

static PyType_Spec linear_spec = {
    .name = "llmint8._C.Int8Linear",
    .basicsize = sizeof(l8_Int8LinearObject),
    .flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE,
    .slots = linear_slots,
};

/* ================================================================== module */

static PyObject *py_set_num_threads(PyObject *mod, PyObject *arg) {
    long n = PyLong_AsLong(arg);
    if (n == -1 && PyErr_Occurred()) return NULL;
    if (n < 0 || n > 4096) {
        PyErr_Format(PyExc_ValueError, "number of threads must be in [0, 4096] (0 = the default: OMP_NUM_THREADS or the CPU count), got %ld", n);
        return NULL;
    }
    ((l8_state *)PyModule_GetState(mod))->num_threads = (int)n;
    Py_RETURN_NONE;
}

static PyObject *py_get_num_threads(PyObject *mod, PyObject *unused) {
    (void)unused;
    return PyLong_FromLong(num_threads(PyModule_GetState(mod)));
}

static PyObject *py_cpu_kernels(PyObject *mod, PyObject *unused) {
    (void)mod; (void)unused;
    const unsigned sup = l8_kernels_supported();
    PyObject *list = PyList_New(0);
    for (int k = 0; list && k < L8_KERNEL_COUNT; k++) {
        if (!(sup & (1u << k))) continue;
        PyObject *name = PyUnicode_FromString(l8_kernel_name((l8_kernel)k));
        if (!name || PyList_Append(list, name) < 0) Py_CLEAR(list);
        Py_XDECREF(name);
    }
    return list;
}

static PyObject *py_set_cpu_kernel(PyObject *mod, PyObject *arg) {
    l8_state *st = PyModule_GetState(mod);
    if (arg == Py_None) {
        st->cpu_kernel = -1;
        st->cpu_kernel_bad[0] = 0;
        Py_RETURN_NONE;
    }
    l8_kernel kern;
    if (resolve_cpu_kernel(st, arg, &kern) < 0) return NULL;
    st->cpu_kernel = (int)kern;
    st->cpu_kernel_bad[0] = 0;
    Py_RETURN_NONE;
}

static PyObject *py_build_info(PyObject *mod, PyObject *unused) {
    (void)unused;
#ifdef LLMINT8_OPENMP
    PyObject *omp = Py_True;
#else
    PyObject *omp = Py_False;
#endif
#ifdef LLMINT8_CUDA
    PyObject *cuda = Py_True;
#else
    PyObject *cuda = Py_False;
#endif
    l8_kernel kern;
    PyObject *kname, *kerr = NULL;
    if (resolve_cpu_kernel(PyModule_GetState(mod), NULL, &kern) == 0) {
        kname = PyUnicode_FromString(l8_kernel_name(kern));
    } else { /* diagnostics must not raise: report the problem instead */
#if PY_VERSION_HEX >= 0x030C0000
        PyObject *ev = PyErr_GetRaisedException();
#else
        PyObject *et, *ev, *tb;
        PyErr_Fetch(&et, &ev, &tb);
        PyErr_NormalizeException(&et, &ev, &tb);
        Py_XDECREF(et);
        Py_XDECREF(tb);
#endif
        kerr = ev ? PyObject_Str(ev) : NULL;
        Py_XDECREF(ev);
        if (!kerr) PyErr_Clear();
        Py_INCREF(Py_None);
        kname = Py_None;
    }
    PyObject *kernels = py_cpu_kernels(mod, NULL);
    PyObject *d = kname && kernels ? Py_BuildValue("{s:O,s:O,s:s,s:O,s:O}", "openmp", omp, "cuda", cuda, "compiler",
#ifdef __VERSION__
                         __VERSION__,
#else
                         "unknown",
#endif
                         "cpu_kernel", kname, "cpu_kernels", kernels) : NULL;
    Py_XDECREF(kname);
    Py_XDECREF(kernels);
    if (d && kerr && PyDict_SetItemString(d, "cpu_kernel_error", kerr) < 0) Py_CLEAR(d);
#ifdef LLMINT8_CUDA
    if (d) { /* the toolkit it was compiled with and the GPU architectures it carries code for */
        PyObject *v = Py_BuildValue("(ii)", CUDART_VERSION / 1000, CUDART_VERSION % 1000 / 10);
        PyObject *a = PyUnicode_FromString(LLMINT8_CUDA_ARCHS);
        if (!v || !a || PyDict_SetItemString(d, "cuda_version", v) < 0 || PyDict_SetItemString(d, "cuda_archs", a) < 0)
            Py_CLEAR(d);
        Py_XDECREF(v);
        Py_XDECREF(a);
    }
#else
    if (d) { /* why this build has no CUDA backend */
#ifndef LLMINT8_CUDA_OFF
#define LLMINT8_CUDA_OFF "not configured"
#endif
        PyObject *r = PyUnicode_FromString(LLMINT8_CUDA_OFF);
        if (!r || PyDict_SetItemString(d, "cuda_off", r) < 0) Py_CLEAR(d);
        Py_XDECREF(r);
    }
#endif
    Py_XDECREF(kerr);
    return d;
}

#ifndef LLMINT8_CUDA
static PyObject *py_cuda_available(PyObject *mod, PyObject *unused) {
    (void)mod; (void)unused;
    Py_RETURN_FALSE; /* built without the CUDA backend */
}
#endif

static PyMethodDef module_methods[] = {
    {"quantize_absmax", py_quantize_absmax, METH_O, quantize_absmax_doc},
    {"quantize_rowwise", (PyCFunction)(void (*)(void))py_quantize_rowwise, METH_VARARGS | METH_KEYWORDS,
     quantize_rowwise_doc},
    {"quantize_zeropoint", py_quantize_zeropoint, METH_O, quantize_zeropoint_doc},
    {"find_outlier_columns", (PyCFunction)(void (*)(void))py_find_outlier_columns, METH_VARARGS | METH_KEYWORDS,
     find_outlier_columns_doc},
    {"int8_matmul", (PyCFunction)(void (*)(void))py_int8_matmul, METH_VARARGS | METH_KEYWORDS, int8_matmul_doc},
    {"quantize_weight", (PyCFunction)(void (*)(void))py_quantize_weight, METH_VARARGS | METH_KEYWORDS,
     quantize_weight_doc},
    {"set_num_threads", py_set_num_threads, METH_O, "set_num_threads(n): threads for CPU work (0 = default)."},
    {"get_num_threads", py_get_num_threads, METH_NOARGS, "get_num_threads() -> threads used for CPU work."},
    {"build_info", py_build_info, METH_NOARGS, "build_info() -> dict: how this extension was built."},
#ifndef LLMINT8_CUDA
    {"cuda_available", py_cuda_available, METH_NOARGS,
     "cuda_available() -> bool: False, this build has no CUDA backend (never raises)."},
#endif
    {"cpu_kernels", py_cpu_kernels, METH_NOARGS,
     "cpu_kernels() -> list of str: the CPU GEMM kernels this CPU and build can run, slowest first."},
    {"set_cpu_kernel", py_set_cpu_kernel, METH_O,
     "set_cpu_kernel(name or None): the CPU kernel for int8_matmul and for CPU layers created\n"
     "afterwards (a layer keeps the kernel its weights were packed for); None = the fastest.\n"
     "Overrides LLMINT8_CPU_KERNEL. ValueError for an unknown name, RuntimeError if unsupported."},
    {NULL, NULL, 0, NULL},
};

static int module_exec(PyObject *m) {
    if (_import_array() < 0) return -1;
    l8_state *st = PyModule_GetState(m);
    st->num_threads = 0;
    st->cuda = NULL;
    /* LLMINT8_CPU_KERNEL is read once, here; a bad value raises when a kernel is needed */
    st->cpu_kernel = -1;
    st->cpu_kernel_bad[0] = 0;
    const char *env = getenv("LLMINT8_CPU_KERNEL");
    if (env && env[0]) {
        const int k = l8_kernel_from_name(env);
        if (k >= 0)
            st->cpu_kernel = k;
        else
            snprintf(st->cpu_kernel_bad, sizeof st->cpu_kernel_bad, "%.24s%s", env, strlen(env) > 24 ? "..." : "");
    }
    st->Int8Linear_type = (PyTypeObject *)PyType_FromModuleAndSpec(m, &linear_spec, NULL);
    if (!st->Int8Linear_type) return -1;
    if (PyModule_AddType(m, st->Int8Linear_type) < 0) return -1;
#ifdef LLMINT8_CUDA
    /* no CUDA call here: a build with CUDA imports on machines without a GPU or driver */
    if (l8_cuda_module_exec(m, st) < 0) return -1;
#endif
    return 0;
}

static int module_traverse(PyObject *m, visitproc visit, void *arg) {
    l8_state *st = PyModule_GetState(m);
    Py_VISIT(st->Int8Linear_type);
#ifdef LLMINT8_CUDA
    Py_VISIT(st->DeviceArray_type);
#endif
    return 0;
}

static int module_clear(PyObject *m) {
    l8_state *st = PyModule_GetState(m);
    Py_CLEAR(st->Int8Linear_type);
#ifdef LLMINT8_CUDA
    Py_CLEAR(st->DeviceArray_type);
#endif
    return 0;
}

static void module_free(void *m) {
    module_clear((PyObject *)m);
#ifdef LLMINT8_CUDA
    l8_cuda_module_free(PyModule_GetState((PyObject *)m)); /* every layer using it is gone */
#endif
}

static PyModuleDef_Slot module_slots[] = {
    {Py_mod_exec, module_exec},
    {0, NULL},
};

static struct PyModuleDef l8_module_def = {
    PyModuleDef_HEAD_INIT,
    .m_name = "llmint8._C",
    .m_doc = "llmint8's C extension: LLM.int8() quantization, int8 GEMM and the Int8Linear layer.",
    .m_size = sizeof(l8_state),
    .m_methods = module_methods,
    .m_slots = module_slots,
    .m_traverse = module_traverse,
    .m_clear = module_clear,
    .m_free = module_free,
};

PyMODINIT_FUNC PyInit__C(void) { return PyModuleDef_Init(&l8_module_def); }
