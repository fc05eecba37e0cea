/* module.c: llmint8._C, the module: its state, settings (threads, CPU kernel),
 * build_info, the method table and initialization.
 *
 * The entry points live by responsibility: ops.c (primitives), int8linear.c (the layer
 * type), convert.c (argument checks). Every one checks dtypes, shapes and values,
 * converts inputs to C-contiguous native arrays (copying only when needed, never writing
 * to them), releases the GIL around compute, and turns an l8_status into an exception:
 * TypeError for dtypes, ValueError for shapes and values, MemoryError, RuntimeError.
 */
#define LLMINT8_MODULE_C
#include "py.h"

#include <math.h>
#include <stdlib.h>

#include "convert.h"
#include "ops.h"

static struct PyModuleDef l8_module_def;

/* The module (borrowed) that created tp or one of its bases (Python subclasses). */
PyObject *l8_module_of_type(PyTypeObject *tp) {
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
    PyObject *m = l8_module_of_type(tp);
    return m ? PyModule_GetState(m) : NULL;
}

/* ================================================================== interruptible work */

/* The main thread's ident, a fact of the process (read at import, the same for every
 * interpreter): only that thread runs signal handlers. */
static unsigned long main_thread_ident;

static int read_main_thread_ident(void) {
    PyObject *threading = PyImport_ImportModule("threading");
    PyObject *main = threading ? PyObject_CallMethod(threading, "main_thread", NULL) : NULL;
    PyObject *ident = main ? PyObject_GetAttrString(main, "ident") : NULL;
    const unsigned long v = ident ? PyLong_AsUnsignedLong(ident) : 0;
    Py_XDECREF(ident);
    Py_XDECREF(main);
    Py_XDECREF(threading);
    if (PyErr_Occurred()) return -1;
    main_thread_ident = v;
    return 0;
}

/* The pool's check (threadpool.h): take the GIL back for a moment and run the signal
 * handlers. */
static int check_signals(void *arg) {
    l8_nogil *g = arg;
    PyEval_RestoreThread(g->ts);
    const int stop = PyErr_CheckSignals() < 0; /* the handler's exception stays set */
    g->ts = PyEval_SaveThread();
    return stop;
}

void l8_nogil_begin(l8_nogil *g) {
    /* off the main thread a check could never see a signal: it would only take the GIL from
     * whoever holds it every 50 ms, so no scope is opened there */
    g->checked = PyThread_get_thread_ident() == main_thread_ident;
    g->ts = PyEval_SaveThread();
    if (g->checked) l8_interrupt_push(&g->scope, check_signals, g);
}

int l8_nogil_end(l8_nogil *g) {
    const int stopped = g->checked && l8_interrupt_pop(&g->scope);
    PyEval_RestoreThread(g->ts);
    return stopped ? -1 : 0;
}

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

static PyObject *py_is_cuda_array(PyObject *mod, PyObject *x) {
    (void)mod;
    return PyBool_FromLong(l8_looks_like_device_array(x));
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
        Py_RETURN_NONE;
    }
    l8_kernel kern;
    if (resolve_cpu_kernel(st, arg, &kern) < 0) return NULL;
    st->cpu_kernel = (int)kern;
    Py_RETURN_NONE;
}

static PyObject *py_build_info(PyObject *mod, PyObject *unused) {
    (void)unused;
    PyObject *threads = PyLong_FromLong(num_threads(PyModule_GetState(mod)));
#ifdef LLMINT8_CUDA_OFF
    PyObject *cuda = Py_False; /* llmint8._cuda was not built */
#else
    PyObject *cuda = Py_True;  /* llmint8._cuda was built beside this module (it may still fail to load) */
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
    PyObject *d = kname && kernels && threads ? Py_BuildValue("{s:O,s:O,s:s,s:O,s:O}", "threads", threads, "cuda_built", cuda,
                                                             "compiler",
#ifdef __VERSION__
                         __VERSION__,
#else
                         "unknown",
#endif
                         "cpu_kernel", kname, "cpu_kernels", kernels) : NULL;
    Py_XDECREF(threads);
    Py_XDECREF(kname);
    Py_XDECREF(kernels);
    if (d && kerr && PyDict_SetItemString(d, "cpu_kernel_error", kerr) < 0) Py_CLEAR(d);
#ifdef LLMINT8_CUDA_OFF
    if (d) { /* why this build has no CUDA backend */
        PyObject *r = PyUnicode_FromString(LLMINT8_CUDA_OFF);
        if (!r || PyDict_SetItemString(d, "cuda_off", r) < 0) Py_CLEAR(d);
        Py_XDECREF(r);
    }
#endif
    Py_XDECREF(kerr);
    return d;
}

static PyMethodDef module_methods[] = {
    {"set_num_threads", py_set_num_threads, METH_O, "set_num_threads($module, n, /)\n--\n\nThreads for CPU work (0 = default)."},
    {"get_num_threads", py_get_num_threads, METH_NOARGS, "get_num_threads($module, /)\n--\n\nThreads used for CPU work."},
    {"_is_cuda_array", py_is_cuda_array, METH_O,
     "_is_cuda_array($module, x, /)\n--\n\nTrue when x exports CUDA memory by the CUDA Array Interface or DLPack (a look at\n"
     "the object only: no import of llmint8._cuda, no GPU call)."},
    {"build_info", py_build_info, METH_NOARGS, "build_info($module, /)\n--\n\nA dict: how this extension was built."},
    {"cpu_kernels", py_cpu_kernels, METH_NOARGS,
     "cpu_kernels($module, /)\n--\n\nA list of str: the CPU GEMM kernels this CPU and build can run, slowest first."},
    {"set_cpu_kernel", py_set_cpu_kernel, METH_O,
     "set_cpu_kernel($module, name, /)\n--\n\nname (a str, or None): the CPU kernel for int8_matmul and for CPU layers created\n"
     "afterwards (a layer keeps the kernel its weights were packed for); None = the fastest.\n"
     "Overrides LLMINT8_CPU_KERNEL. ValueError for an unknown name, RuntimeError if unsupported."},
    {NULL, NULL, 0, NULL},
};

/* LLMINT8_CPU_KERNEL, read once at import (any case). A name that is no kernel warns
 * (RuntimeWarning) and leaves the choice to the CPU: every kernel gives the same bits,
 * so falling back is safe, and the warning names the value at once instead of the
 * first call failing. A kernel this CPU lacks raises when a kernel is needed. */
static int read_cpu_kernel_env(l8_state *st) {
    st->cpu_kernel = -1;
    const char *env = getenv("LLMINT8_CPU_KERNEL");
    if (!env || !env[0]) return 0;
    const int k = l8_kernel_from_name(env);
    if (k >= 0) {
        st->cpu_kernel = k;
        return 0;
    }
    return PyErr_WarnFormat(PyExc_RuntimeWarning, 1,
                            "LLMINT8_CPU_KERNEL=%.40s%s names no CPU kernel; expected portable, avx2, avxvnni or "
                            "avx512vnni (any case). Using the fastest this CPU runs, %s",
                            env, strlen(env) > 40 ? "..." : "", l8_kernel_name(l8_kernel_best()));
}

static int module_exec(PyObject *m) {
    if (_import_array() < 0) return -1;
    if (read_main_thread_ident() < 0) return -1;
    l8_state *st = PyModule_GetState(m);
    st->num_threads = 0;
    st->cuda_module = NULL; /* llmint8._cuda loads on the first CUDA layer */
    st->cuda_api = NULL;
    if (read_cpu_kernel_env(st) < 0) return -1;
    if (PyModule_AddFunctions(m, l8_ops_methods) < 0) return -1;
    st->Int8Linear_type = (PyTypeObject *)PyType_FromModuleAndSpec(m, &l8_linear_spec, NULL);
    if (!st->Int8Linear_type) return -1;
    if (PyModule_AddType(m, st->Int8Linear_type) < 0) return -1;
    return 0;
}

static int module_traverse(PyObject *m, visitproc visit, void *arg) {
    l8_state *st = PyModule_GetState(m);
    Py_VISIT(st->Int8Linear_type);
    Py_VISIT(st->cuda_module);
    return 0;
}

static int module_clear(PyObject *m) {
    l8_state *st = PyModule_GetState(m);
    Py_CLEAR(st->Int8Linear_type);
    Py_CLEAR(st->cuda_module);
    st->cuda_api = NULL;
    return 0;
}

static void module_free(void *m) {
    module_clear((PyObject *)m);
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
