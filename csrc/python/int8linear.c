/* int8linear.c: the Int8Linear heap type of llmint8._C: construction from quantized
 * weights (validated), the forward on host arrays through the layer's backend
 * (l8_backend, linear.h), copies of the held weights. CUDA layers load llmint8._cuda on
 * first use and run through its capsule (cuda_api.h), device arrays in and out. */
#include "convert.h"
#include "ops.h"

#include <stdlib.h>

#include "cuda_api.h"
#include "dlpack.h"
#include "gemm.h"
#include "quantize.h"

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

/* llmint8._cuda's table, importing that module on first use (it links the CUDA
 * libraries; this module does not). RuntimeError naming the cause when it cannot load. */
static const l8_cuda_api *cuda_api(l8_state *st) {
    if (st->cuda_api) return st->cuda_api;
#ifdef LLMINT8_CUDA_OFF
    PyErr_Format(PyExc_RuntimeError, "device 'cuda' requested but this build of llmint8 has no CUDA backend (%s); "
                 "use device='cpu' or rebuild with the CUDA toolkit (nvcc) on PATH", LLMINT8_CUDA_OFF);
    return NULL;
#else
    PyObject *mod = PyImport_ImportModule("llmint8._cuda");
    if (!mod) {
        /* chain the import error: it says which library or symbol is missing */
#if PY_VERSION_HEX >= 0x030C0000
        PyObject *cause = PyErr_GetRaisedException();
        PyErr_Format(PyExc_RuntimeError, "device 'cuda' requested but llmint8's CUDA backend could not be loaded "
                     "(%S); use device='cpu'", cause ? cause : Py_None);
        PyObject *err = PyErr_GetRaisedException();
        if (err && cause) PyException_SetCause(err, cause); else Py_XDECREF(cause);
        PyErr_SetRaisedException(err);
#else
        PyObject *et, *ev, *tb;
        PyErr_Fetch(&et, &ev, &tb);
        PyErr_NormalizeException(&et, &ev, &tb);
        PyErr_Format(PyExc_RuntimeError, "device 'cuda' requested but llmint8's CUDA backend could not be loaded "
                     "(%S); use device='cpu'", ev ? ev : Py_None);
        Py_XDECREF(et); Py_XDECREF(ev); Py_XDECREF(tb);
#endif
        return NULL;
    }
    const l8_cuda_api *api = PyCapsule_Import(L8_CUDA_API_CAPSULE, 0);
    if (!api) {
        Py_DECREF(mod);
        return NULL;
    }
    if (api->version != L8_CUDA_API_VERSION || api->layer_size != sizeof(l8_layer) ||
        api->backend_size != sizeof(l8_backend)) {
        Py_DECREF(mod);
        PyErr_SetString(PyExc_RuntimeError, "llmint8._cuda comes from another build of llmint8 than llmint8._C; "
                        "reinstall llmint8");
        return NULL;
    }
    st->cuda_module = mod;
    st->cuda_api = api;
    return api;
#endif
}

static const l8_backend *backend_for(l8_state *st, int device, void **ctx, PyObject **cuda_module) {
    *ctx = NULL;
    *cuda_module = NULL;
    if (device < 0) return &l8_cpu_backend;
    const l8_cuda_api *api = cuda_api(st);
    if (!api) return NULL;
    const l8_backend *be = api->backend_for(st->cuda_module, device, ctx);
    if (be) *cuda_module = Py_NewRef(st->cuda_module);
    return be;
}

static PyObject *linear_new(PyTypeObject *tp, PyObject *args, PyObject *kw) {
    static char *kwlist[] = {"weight_int8", "weight_scale", "outlier_columns", "outlier_weight",
                             "bias", "threshold", "device", NULL};
    PyObject *wqo, *wso, *co = Py_None, *woo = Py_None, *bo = Py_None, *to = NULL, *devo = NULL;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "OO|OOOOO:Int8Linear", kwlist, &wqo, &wso, &co, &woo, &bo, &to,
                                     &devo))
        return NULL;
    PyObject *module = l8_module_of_type(tp);
    if (!module) return NULL;
    l8_state *st = PyModule_GetState(module);
    float thr = 6.0f;
    int device = -1;
    if (to && parse_threshold(to, &thr) < 0) return NULL;
    if (devo && parse_device(devo, &device) < 0) return NULL;

    PyArrayObject *wq = NULL, *ws = NULL, *cols = NULL, *wout = NULL, *bias = NULL;
    l8_Int8LinearObject *self = NULL;
    int32_t *order = NULL;
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
        cols = paired_columns(co, k, &order);
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
    if (order) { /* the weight columns follow their columns into sorted order */
        PyArrayObject *sorted = reorder_columns(wout, order);
        Py_DECREF(wout);
        if (!(wout = sorted)) goto fail;
    }
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
    const l8_backend *be = backend_for(st, device, &L->backend_ctx, &self->cuda_module);
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
    free(order);
    return (PyObject *)self;
fail:
    Py_XDECREF(wq); Py_XDECREF(ws); Py_XDECREF(cols); Py_XDECREF(wout); Py_XDECREF(bias);
    free(order);
    Py_XDECREF(self);
    return NULL;
}

static void linear_dealloc(PyObject *op) {
    l8_Int8LinearObject *self = (l8_Int8LinearObject *)op;
    PyTypeObject *tp = Py_TYPE(op);
    l8_layer_release(&self->layer);
    Py_CLEAR(self->cuda_module); /* after the release: the layer's context lives in its state */
    Py_CLEAR(self->module);
    tp->tp_free(op);
    Py_DECREF(tp);
}

PyDoc_STRVAR(linear_forward_doc,
"forward($self, x, out_dtype=None)\n--\n\n"
"y = x @ weight.T + bias by LLM.int8() for x (m, in_features) float16/float32.\n"
"Returns (m, out_features) in out_dtype (float16 or float32; default x's dtype).\n"
"The outlier product keeps x's precision: fp16 operands for float16 x, x in float32\n"
"for float32 x (a finite float32 input never overflows there).\n"
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
    /* device arrays stay on the device: no host round trip */
    const l8_cuda_api *api =
        self->cuda_module ? ((l8_state *)PyModule_GetState(self->module))->cuda_api : NULL; /* CUDA layers only */
    if (api ? api->is_device_input(self->cuda_module, xo) : l8_looks_like_device_array(xo)) {
        PyObject *r = NULL;
        if (L->device < 0)
            PyErr_SetString(PyExc_TypeError, "x is a CUDA device array but this layer is on the cpu; pass a NumPy "
                                             "array (DeviceArray.numpy()) or build the layer with device='cuda'");
        else if (od && od->type_num != NPY_HALF && od->type_num != NPY_FLOAT)
            PyErr_Format(PyExc_TypeError, "out_dtype must be float16 or float32, got %S", (PyObject *)od);
        else
            r = api->forward_device(self->cuda_module, L, xo, od ? od->type_num : -1);
        Py_XDECREF(od);
        return r;
    }
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
    l8_nogil g;
    l8_nogil_begin(&g);
    rc = L->backend->forward_host(L, PyArray_DATA(x), l8_type_of(x), m, PyArray_DATA(y),
                                  yt == NPY_HALF ? L8_F16 : L8_F32, nt, &s);
    if (l8_nogil_end(&g) < 0) goto fail; /* interrupted (Ctrl-C): y is incomplete */
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
     "_export($self, /)\n--\n\n(weight_int8, weight_scale, outlier_weight, bias or None): copies of the weights."},
    {NULL, NULL, 0, NULL},
};

PyDoc_STRVAR(linear_doc,
"Int8Linear(weight_int8, weight_scale, outlier_columns=None, outlier_weight=None, bias=None, "
"threshold=6.0, device='cpu')\n--\n\n"
"The C layer behind llmint8.Int8Linear, built from already quantized weights\n"
"(see quantize_weight). outlier_columns[i] pairs with outlier_weight[:, i]; both are\n"
"sorted together by column, and a column given twice is a ValueError.\n"
"Use llmint8.Int8Linear.from_float instead.");

static PyType_Slot linear_slots[] = {
    {Py_tp_new, linear_new},
    {Py_tp_dealloc, linear_dealloc},
    {Py_tp_methods, linear_methods},
    {Py_tp_getset, linear_getset},
    {Py_tp_doc, (void *)linear_doc},
    {0, NULL},
};

PyType_Spec l8_linear_spec = {
    .name = "llmint8._C.Int8Linear",
    .basicsize = sizeof(l8_Int8LinearObject),
    .flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE,
    .slots = linear_slots,
};

