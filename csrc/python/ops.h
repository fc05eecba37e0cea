/* ops.h: what module.c takes from the entry-point files of llmint8._C. */
#ifndef LLMINT8_OPS_H
#define LLMINT8_OPS_H

#include "py.h"

extern PyMethodDef l8_ops_methods[];  /* ops.c: the primitives */
extern PyType_Spec l8_linear_spec;    /* int8linear.c: the Int8Linear type */

#endif
