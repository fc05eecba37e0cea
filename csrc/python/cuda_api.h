/* cuda_api.h: what llmint8._C asks of llmint8._cuda, through one capsule.
 *
 * _C links no CUDA library, so `import llmint8` maps neither libcudart nor libcublasLt.
 * The first CUDA layer imports llmint8._cuda (which links both) and takes this table
 * from its `_api` capsule; a _cuda that cannot load makes the CUDA device unavailable
 * with the import error as the reason, and leaves the CPU path untouched.
 *
 * Both modules are built from the same headers; the version and the struct sizes guard
 * against a stale _cuda from another build. Every function needs the GIL.
 */
#ifndef LLMINT8_CUDA_API_H
#define LLMINT8_CUDA_API_H

#include "py.h"

#define L8_CUDA_API_CAPSULE "llmint8._cuda._api"
#define L8_CUDA_API_VERSION 1

typedef struct {
    int version;
    size_t layer_size;    /* sizeof(l8_layer) */
    size_t backend_size;  /* sizeof(l8_backend) */
    /* The CUDA backend for `device` and its context (*ctx); NULL with an exception set
     * when the device cannot be used. */
    const l8_backend *(*backend_for)(PyObject *cuda_module, int device, void **ctx);
    /* 1 when x is a CUDA device array (DeviceArray, CUDA __dlpack__ or __cuda_array_interface__). */
    int (*is_device_input)(PyObject *cuda_module, PyObject *x);
    /* A CUDA layer's forward on a device array: a DeviceArray out, no host round trip.
     * out_type: NPY_HALF, NPY_FLOAT or -1 for x's dtype. */
    PyObject *(*forward_device)(PyObject *cuda_module, const l8_layer *L, PyObject *x, int out_type);
} l8_cuda_api;

#endif
