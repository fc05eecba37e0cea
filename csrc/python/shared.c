/* shared.c: what both extension modules (_C and _cuda) link: l8_status -> Python exception,
 * and the test for a CUDA array of any producer. */
#include "py.h"

#include "dlpack.h"

PyObject *l8_raise(const l8_status *st) {
    PyObject *type = st->code == L8_ERR_TYPE    ? PyExc_TypeError
                     : st->code == L8_ERR_VALUE ? PyExc_ValueError
                     : st->code == L8_ERR_NOMEM ? PyExc_MemoryError
                                                : PyExc_RuntimeError;
    PyErr_SetString(type, st->msg[0] ? st->msg : "llmint8: unknown error");
    return NULL;
}

int l8_looks_like_device_array(PyObject *x) {
    if (PyArray_Check(x)) return 0;
    if (PyObject_HasAttrString(x, "__cuda_array_interface__")) return 1;
    if (!PyObject_HasAttrString(x, "__dlpack_device__")) return 0;
    PyObject *dev = PyObject_CallMethod(x, "__dlpack_device__", NULL);
    int type = 0, id = 0;
    if (!dev) {
        PyErr_Clear();
        return 0;
    }
    if (!PyArg_ParseTuple(dev, "ii", &type, &id)) PyErr_Clear();
    Py_DECREF(dev);
    return type == kDLCUDA || type == kDLCUDAManaged;
}
