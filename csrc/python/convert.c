/* convert.c: the argument checks shared by llmint8._C's entry points (convert.h). */
#include "convert.h"

#include <math.h>
#include <stdlib.h>

#include "quantize.h"
#include "threadpool.h"


int num_threads(const l8_state *s) {
    return s && s->num_threads > 0 ? s->num_threads : l8_default_threads();
}

/* The CPU GEMM kernel to use: `name` (a str) when given, else the module's choice
 * (LLMINT8_CPU_KERNEL at import, or set_cpu_kernel), else the best the CPU supports.
 * ValueError for a name that is no kernel, RuntimeError for one this CPU cannot run. */
int resolve_cpu_kernel(const l8_state *st, PyObject *name, l8_kernel *out) {
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
                         "unknown CPU kernel %R; expected one of 'portable', 'avx2', 'avxvnni', 'avx512vnni' "
                         "(any case)", name);
            return -1;
        }
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

void shape_str(PyArrayObject *a, char *buf, size_t n) {
    int nd = PyArray_NDIM(a), off = snprintf(buf, n, "(");
    for (int i = 0; i < nd && off < (int)n; i++)
        off += snprintf(buf + off, n - (size_t)off, i + 1 < nd || nd == 1 ? "%lld," : "%lld",
                        (long long)PyArray_DIM(a, i));
    if (off < (int)n) snprintf(buf + off, n - (size_t)off, ")");
}

PyObject *dtype_name(PyArrayObject *a) { return PyObject_Str((PyObject *)PyArray_DESCR(a)); }

const int FLOAT_TYPES[] = {NPY_HALF, NPY_FLOAT, -1};
const int INT8_TYPES[] = {NPY_INT8, -1};

/* obj as a C-contiguous, aligned, native-order array of one of the allowed types
 * (new reference; a copy only where obj is not one already). `allowed` lists type
 * numbers ending with -1; `want` is the type to convert to, or -1 to keep obj's. */
PyArrayObject *as_array(PyObject *obj, const char *name, const int *allowed, const char *expected,
                               int want, int min_nd, int max_nd) {
    PyArrayObject *a0 = (PyArrayObject *)PyArray_FromAny(obj, NULL, 0, 0, 0, NULL);
    if (!a0) return NULL;
    int tn = PyArray_TYPE(a0), ok = 0;
    for (const int *t = allowed; *t >= 0; t++) ok |= *t == tn;
    if (!ok) {
        PyObject *d = dtype_name(a0);
        if (want < 0 && allowed == FLOAT_TYPES && (PyArray_ISFLOAT(a0) || PyArray_ISINTEGER(a0)))
            /* float64 is NumPy's default: say how to convert, and why there is no silent cast */
            PyErr_Format(PyExc_TypeError,
                         "%s must be %s, got %S; convert it with %s.astype(np.float32) (llmint8 computes in "
                         "float16/float32 and never casts silently)", name, expected, d, name);
        else
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


PyArrayObject *as_float(PyObject *obj, const char *name, int min_nd, int max_nd) {
    return as_array(obj, name, FLOAT_TYPES, "float16 or float32", -1, min_nd, max_nd);
}

l8_dtype l8_type_of(PyArrayObject *a) { return PyArray_TYPE(a) == NPY_HALF ? L8_F16 : L8_F32; }

/* ValueError naming the array and the first bad element, or 0 when all are finite. */
int check_finite(PyArrayObject *a, const char *name) {
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

int parse_threshold(PyObject *obj, float *out) {
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

/* Column indices from any 1-D integer sequence as a fresh int64 array (new ref), every
 * value checked against [0, k) before any narrowing: a uint64 2**63 or a Python int
 * beyond int64 is reported as given, never wrapped. A scalar is a TypeError. */
PyArrayObject *columns_int64(PyObject *obj, int64_t k, const char *name) {
    PyArrayObject *a0 = (PyArrayObject *)PyArray_FromAny(obj, NULL, 0, 0, 0, NULL);
    if (!a0) return NULL;
    if (PyArray_NDIM(a0) != 1) {
        char s[128];
        shape_str(a0, s, sizeof s);
        if (PyArray_NDIM(a0) == 0)
            PyErr_Format(PyExc_TypeError, "%s must be a 1-D sequence of column indices, got a scalar %R", name, obj);
        else
            PyErr_Format(PyExc_ValueError, "%s must be a 1-D sequence of column indices, got shape %s", name, s);
        Py_DECREF(a0);
        return NULL;
    }
    const npy_intp n = PyArray_SIZE(a0);
    /* an empty list arrives as float64: accept any empty input */
    if (n > 0 && !PyArray_ISINTEGER(a0) && !PyArray_ISOBJECT(a0)) {
        PyObject *d = dtype_name(a0);
        PyErr_Format(PyExc_TypeError, "%s must hold integers, got dtype %S", name, d);
        Py_XDECREF(d);
        Py_DECREF(a0);
        return NULL;
    }
    npy_intp dims[1] = {n};
    PyArrayObject *out = (PyArrayObject *)PyArray_SimpleNew(1, dims, NPY_INT64);
    if (!out) { Py_DECREF(a0); return NULL; }
    int64_t *v = PyArray_DATA(out);
    /* Python ints too large for any NumPy integer type arrive as objects */
    const int as_object = n > 0 && PyArray_ISOBJECT(a0), as_unsigned = n > 0 && PyArray_ISUNSIGNED(a0);
    PyArrayObject *src = as_object ? (Py_INCREF(a0), a0)
                                   : (PyArrayObject *)PyArray_FromAny((PyObject *)a0,
                                         PyArray_DescrFromType(as_unsigned ? NPY_UINT64 : NPY_INT64), 1, 1,
                                         NPY_ARRAY_C_CONTIGUOUS | NPY_ARRAY_ALIGNED | NPY_ARRAY_FORCECAST, NULL);
    Py_DECREF(a0);
    if (!src) { Py_DECREF(out); return NULL; }
    for (npy_intp i = 0; i < n; i++) {
        if (as_object) {
            PyObject *item = ((PyObject **)PyArray_DATA(src))[i];
            if (!PyLong_Check(item)) {
                PyErr_Format(PyExc_TypeError, "%s must hold integers, got %R at position %zd", name, item,
                             (Py_ssize_t)i);
                goto fail;
            }
            int overflow = 0;
            long long x = PyLong_AsLongLongAndOverflow(item, &overflow);
            if (x == -1 && PyErr_Occurred()) goto fail;
            if (overflow || x < 0 || x >= k) {
                PyErr_Format(PyExc_ValueError, "%s holds column %R; expected indices in [0, %lld)", name, item,
                             (long long)k);
                goto fail;
            }
            v[i] = x;
        } else if (as_unsigned) {
            const uint64_t x = ((const uint64_t *)PyArray_DATA(src))[i];
            if (x >= (uint64_t)k) {
                PyErr_Format(PyExc_ValueError, "%s holds column %llu; expected indices in [0, %lld)", name,
                             (unsigned long long)x, (long long)k);
                goto fail;
            }
            v[i] = (int64_t)x;
        } else {
            const int64_t x = ((const int64_t *)PyArray_DATA(src))[i];
            if (x < 0 || x >= k) {
                PyErr_Format(PyExc_ValueError, "%s holds column %lld; expected indices in [0, %lld)", name,
                             (long long)x, (long long)k);
                goto fail;
            }
            v[i] = x;
        }
    }
    Py_DECREF(src);
    return out;
fail:
    Py_DECREF(src);
    Py_DECREF(out);
    return NULL;
}

/* Sorted, unique int32 column indices in [0, k) from any integer sequence (new ref).
 * A k-sized bitmap sorts and deduplicates in O(n + k), whatever the list's length. */
PyArrayObject *as_columns(PyObject *obj, int64_t k, const char *name) {
    PyArrayObject *a64 = columns_int64(obj, k, name), *out = NULL;
    if (!a64) return NULL;
    const npy_intp n = PyArray_SIZE(a64);
    const int64_t *v = PyArray_DATA(a64);
    uint8_t *seen = calloc((size_t)k + 1, 1);
    if (!seen) { PyErr_NoMemory(); goto done; }
    npy_intp dims[1] = {0};
    for (npy_intp i = 0; i < n; i++) {
        dims[0] += !seen[v[i]];
        seen[v[i]] = 1;
    }
    if (!(out = (PyArrayObject *)PyArray_SimpleNew(1, dims, NPY_INT32))) goto done;
    int32_t *o = PyArray_DATA(out);
    for (int64_t j = 0, c = 0; j < k && c < dims[0]; j++)
        if (seen[j]) o[c++] = (int32_t)j;
done:
    free(seen);
    Py_DECREF(a64);
    return out;
}

/* The raw constructor's outlier_columns, paired one to one with the columns of
 * outlier_weight: the columns sorted (int32, new ref) and order[i], the position in
 * the given list of the i-th sorted column (malloc'ed, the caller frees it). A column
 * given twice is a ValueError: it would pair with two weight columns. */
PyArrayObject *paired_columns(PyObject *obj, int64_t k, int32_t **order) {
    PyArrayObject *a64 = columns_int64(obj, k, "outlier_columns"), *out = NULL;
    if (!a64) return NULL;
    const npy_intp n = PyArray_SIZE(a64);
    const int64_t *v = PyArray_DATA(a64);
    int32_t *pos = l8_malloc_array((size_t)k, sizeof(int32_t));
    *order = l8_malloc_array((size_t)n + 1, sizeof(int32_t));
    if (!pos || !*order) { PyErr_NoMemory(); goto fail; }
    for (int64_t j = 0; j < k; j++) pos[j] = -1;
    for (npy_intp i = 0; i < n; i++) {
        if (pos[v[i]] >= 0) {
            PyErr_Format(PyExc_ValueError, "outlier_columns holds column %lld twice (positions %d and %lld); "
                         "expected each column once, paired with one column of outlier_weight",
                         (long long)v[i], (int)pos[v[i]], (long long)i);
            goto fail;
        }
        pos[v[i]] = (int32_t)i;
    }
    npy_intp dims[1] = {n};
    if (!(out = (PyArrayObject *)PyArray_SimpleNew(1, dims, NPY_INT32))) goto fail;
    int32_t *o = PyArray_DATA(out);
    for (int64_t j = 0, c = 0; j < k && c < n; j++)
        if (pos[j] >= 0) {
            o[c] = (int32_t)j;
            (*order)[c++] = pos[j];
        }
    free(pos);
    Py_DECREF(a64);
    return out;
fail:
    free(pos);
    free(*order);
    *order = NULL;
    Py_DECREF(a64);
    return NULL;
}

/* outlier_weight (n, no) fp16 with its columns reordered: out[:, c] = w[:, order[c]]
 * (new ref; w itself, with a new reference, when order is the identity). */
PyArrayObject *reorder_columns(PyArrayObject *w, const int32_t *order) {
    const npy_intp n = PyArray_DIM(w, 0), no = PyArray_DIM(w, 1);
    int identity = 1;
    for (npy_intp c = 0; c < no; c++) identity &= order[c] == c;
    if (identity) {
        Py_INCREF(w);
        return w;
    }
    PyArrayObject *out = (PyArrayObject *)PyArray_SimpleNew(2, PyArray_DIMS(w), NPY_FLOAT16);
    if (!out) return NULL;
    const uint16_t *src = PyArray_DATA(w);
    uint16_t *dst = PyArray_DATA(out);
    for (npy_intp i = 0; i < n; i++)
        for (npy_intp c = 0; c < no; c++) dst[i * no + c] = src[i * no + order[c]];
    return out;
}

