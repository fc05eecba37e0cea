/* ops.c: llmint8._C's primitives: quantization (absmax, row-wise, zeropoint), outlier
 * columns, the exact int8 GEMM, weight quantization for a layer, and the decoding attention
 * of the model runner. Each entry point
 * validates its arguments (convert.h), releases the GIL around the compute of csrc/core,
 * and turns an l8_status into an exception. */
#include "convert.h"
#include "ops.h"

#include <math.h>
#include <stdlib.h>

#include "attention.h"
#include "gemm.h"
#include "quantize.h"

/* ================================================================== quantization primitives */

PyDoc_STRVAR(quantize_absmax_doc,
"quantize_absmax($module, x, /)\n--\n\n-> (q, absmax). "
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
"quantize_rowwise($module, x, skip_columns=None)\n--\n\n-> (q, scales). "
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
    l8_nogil g;
    l8_nogil_begin(&g);
    l8_quantize_rows(PyArray_DATA(x), l8_type_of(x), m, k, skip, PyArray_DATA(q), PyArray_DATA(s), nt);
    if (l8_nogil_end(&g) < 0) goto fail; /* interrupted (Ctrl-C) */
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
"quantize_zeropoint($module, x, /)\n--\n\n-> (q, scale, zeropoint). "
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
"find_outlier_columns($module, x, threshold=6.0)\n--\n\n-> int32 array. "
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
    l8_nogil g;
    l8_nogil_begin(&g);
    l8_column_absmax(PyArray_DATA(x), l8_type_of(x), m, k, colmax, nt);
    if (l8_nogil_end(&g) < 0) goto fail; /* interrupted (Ctrl-C) */
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
"int8_matmul($module, a, b, reference=False, kernel=None)\n--\n\n-> int32 array. "
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
    l8_nogil g;
    l8_nogil_begin(&g);
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
    if (l8_nogil_end(&g) < 0) { /* interrupted (Ctrl-C): c is incomplete */
        Py_DECREF(c);
        goto fail;
    }
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

/* ================================================================== decoding attention */

PyDoc_STRVAR(attention_decode_doc,
"attention_decode($module, q, k_cache, v_cache, length, scale, start=0, kernel=None)\n--\n\n-> float32 (B, H, hd). "
"Attention of one new position over a KV cache: q (B, H, hd) float32, k_cache and\n"
"v_cache (B, capacity, KV, hd) float32 with H a multiple of KV (query head h reads kv\n"
"head h // (H // KV)); attends over the positions [start, length) with weights\n"
"softmax(scale * q . k). Agrees with the float64 attention to float32 rounding (the\n"
"order is in csrc/core/attention.h; every kernel gives the same bits). kernel: as for\n"
"int8_matmul ('portable' runs plain C, any other name the AVX2 form). ValueError for\n"
"mismatched shapes or a range outside [0, capacity].");

static const int F32_TYPES[] = {NPY_FLOAT, -1};

static PyObject *py_attention_decode(PyObject *mod, PyObject *args, PyObject *kw) {
    static char *kwlist[] = {"q", "k_cache", "v_cache", "length", "scale", "start", "kernel", NULL};
    PyObject *qo, *ko, *vo, *kerno = Py_None;
    long long length, start = 0;
    float scale;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "OOOLf|LO:attention_decode", kwlist, &qo, &ko, &vo, &length, &scale,
                                     &start, &kerno))
        return NULL;
    l8_state *st = PyModule_GetState(mod);
    l8_kernel kern = L8_KERNEL_PORTABLE;
    if (resolve_cpu_kernel(st, kerno, &kern) < 0) return NULL;
    PyArrayObject *q = as_array(qo, "q", F32_TYPES, "float32", NPY_FLOAT, 3, 3), *k = NULL, *v = NULL, *o = NULL;
    if (!q) return NULL;
    if (!(k = as_array(ko, "k_cache", F32_TYPES, "float32", NPY_FLOAT, 4, 4))) goto fail;
    if (!(v = as_array(vo, "v_cache", F32_TYPES, "float32", NPY_FLOAT, 4, 4))) goto fail;
    const int64_t B = PyArray_DIM(q, 0), H = PyArray_DIM(q, 1), hd = PyArray_DIM(q, 2);
    const int64_t cap = PyArray_DIM(k, 1), KV = PyArray_DIM(k, 2);
    char qs[128], ks[128], vs[128]; /* the shapes, written only for an error message */
    if (!PyArray_SAMESHAPE(k, v)) {
        shape_str(k, ks, sizeof ks);
        shape_str(v, vs, sizeof vs);
        PyErr_Format(PyExc_ValueError, "k_cache and v_cache must have one shape, got %s and %s", ks, vs);
        goto fail;
    }
    if (PyArray_DIM(k, 0) != B || PyArray_DIM(k, 3) != hd || KV == 0 || H % KV != 0) {
        shape_str(q, qs, sizeof qs);
        shape_str(k, ks, sizeof ks);
        PyErr_Format(PyExc_ValueError,
                     "k_cache must be (B, capacity, KV, hd) with B and hd of q and H a multiple of KV; "
                     "got q %s and k_cache %s", qs, ks);
        goto fail;
    }
    if (!(0 <= start && start < length && length <= cap)) {
        PyErr_Format(PyExc_ValueError, "expected 0 <= start < length <= capacity (%lld); got start %lld, length %lld",
                     (long long)cap, start, length);
        goto fail;
    }
    npy_intp dims[3] = {B, H, hd};
    if (!(o = (PyArrayObject *)PyArray_SimpleNew(3, dims, NPY_FLOAT))) goto fail;
    l8_nogil g;
    l8_nogil_begin(&g);
    const int rc = l8_attention_decode(PyArray_DATA(q), PyArray_DATA(k), PyArray_DATA(v), B, H, KV, hd, cap,
                                       (int64_t)start, (int64_t)length, scale, PyArray_DATA(o),
                                       kern != L8_KERNEL_PORTABLE, num_threads(st));
    if (l8_nogil_end(&g) < 0) goto fail; /* interrupted (Ctrl-C): o is incomplete */
    if (rc < 0) {
        PyErr_NoMemory();
        goto fail;
    }
    Py_DECREF(q);
    Py_DECREF(k);
    Py_DECREF(v);
    return (PyObject *)o;
fail:
    Py_DECREF(q);
    Py_XDECREF(k);
    Py_XDECREF(v);
    Py_XDECREF(o);
    return NULL;
}

/* ================================================================== weights */

PyDoc_STRVAR(quantize_weight_doc,
"quantize_weight($module, weight, outlier_columns=None)\n--\n\n-> (weight_int8, weight_scale, outlier_weight). "
"Quantize a layer weight (out, in) float16/float32 the way Int8Linear holds it:\n"
"weight_int8 (out, in) int8 with the outlier columns set to 0; weight_scale (out,)\n"
"float32 absmax of each row over the other columns; outlier_weight (out, n_outliers)\n"
"float16, the original weight's outlier columns (outlier_columns sorted, unique).\n"
"ValueError for an empty weight, a column outside [0, in), or a float32 weight beyond\n"
"float16's range (65504) in an outlier column (the layer keeps those in float16).");

static PyObject *py_quantize_weight(PyObject *mod, PyObject *args, PyObject *kw) {
    static char *kwlist[] = {"weight", "outlier_columns", NULL};
    PyObject *wo, *co = Py_None;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "O|O:quantize_weight", kwlist, &wo, &co)) return NULL;
    l8_state *st = PyModule_GetState(mod);
    PyArrayObject *w = as_float(wo, "weight", 2, 2), *cols = NULL, *wq = NULL, *ws = NULL, *wf = NULL;
    if (!w) return NULL;
    const int64_t n = PyArray_DIM(w, 0), k = PyArray_DIM(w, 1);
    if (n < 1 || k < 1) {
        PyErr_Format(PyExc_ValueError, "weight must have at least one row and column, got (%lld, %lld)",
                     (long long)n, (long long)k);
        goto fail;
    }
    if (check_finite(w, "weight") < 0) goto fail;
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
    l8_nogil g;
    l8_nogil_begin(&g);
    rc = l8_quantize_weight(PyArray_DATA(w), l8_type_of(w), n, k, PyArray_DATA(cols), no, &dst, nt, &s);
    if (l8_nogil_end(&g) < 0) goto fail; /* interrupted (Ctrl-C) */
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

PyMethodDef l8_ops_methods[] = {
    {"quantize_absmax", py_quantize_absmax, METH_O, quantize_absmax_doc},
    {"quantize_rowwise", (PyCFunction)(void (*)(void))py_quantize_rowwise, METH_VARARGS | METH_KEYWORDS,
     quantize_rowwise_doc},
    {"quantize_zeropoint", py_quantize_zeropoint, METH_O, quantize_zeropoint_doc},
    {"find_outlier_columns", (PyCFunction)(void (*)(void))py_find_outlier_columns, METH_VARARGS | METH_KEYWORDS,
     find_outlier_columns_doc},
    {"int8_matmul", (PyCFunction)(void (*)(void))py_int8_matmul, METH_VARARGS | METH_KEYWORDS, int8_matmul_doc},
    {"attention_decode", (PyCFunction)(void (*)(void))py_attention_decode, METH_VARARGS | METH_KEYWORDS,
     attention_decode_doc},
    {"quantize_weight", (PyCFunction)(void (*)(void))py_quantize_weight, METH_VARARGS | METH_KEYWORDS,
     quantize_weight_doc},
    {NULL, NULL, 0, NULL},
};
