/* errors.c: l8_status -> Python exception, for both extension modules (_C and _cuda). */
#include "py.h"

PyObject *l8_raise(const l8_status *st) {
    PyObject *type = st->code == L8_ERR_TYPE    ? PyExc_TypeError
                     : st->code == L8_ERR_VALUE ? PyExc_ValueError
                     : st->code == L8_ERR_NOMEM ? PyExc_MemoryError
                                                : PyExc_RuntimeError;
    PyErr_SetString(type, st->msg[0] ? st->msg : "llmint8: unknown error");
    return NULL;
}
