/* convert.h: the argument checks of llmint8._C's entry points (convert.c): Python objects
 * to validated C-contiguous arrays, column lists, thresholds, the CPU kernel and thread
 * count to use. Each raises (and returns NULL or -1) with a message that names the
 * argument and says what was expected. */
#ifndef LLMINT8_CONVERT_H
#define LLMINT8_CONVERT_H

#include "py.h"

#include "cpu_features.h"

extern const int FLOAT_TYPES[]; /* NPY_HALF, NPY_FLOAT, -1 */
extern const int INT8_TYPES[];  /* NPY_INT8, -1 */

int num_threads(const l8_state *s);
int resolve_cpu_kernel(const l8_state *st, PyObject *name, l8_kernel *out);
void shape_str(PyArrayObject *a, char *buf, size_t n);
PyObject *dtype_name(PyArrayObject *a);
PyArrayObject *as_array(PyObject *obj, const char *name, const int *allowed, const char *expected,
                               int want, int min_nd, int max_nd);
PyArrayObject *as_float(PyObject *obj, const char *name, int min_nd, int max_nd);
int check_finite(PyArrayObject *a, const char *name);
int parse_threshold(PyObject *obj, float *out);
PyArrayObject *columns_int64(PyObject *obj, int64_t k, const char *name);
PyArrayObject *as_columns(PyObject *obj, int64_t k, const char *name);
PyArrayObject *paired_columns(PyObject *obj, int64_t k, int32_t **order);
PyArrayObject *reorder_columns(PyArrayObject *w, const int32_t *order);
l8_dtype l8_type_of(PyArrayObject *a);

#endif
