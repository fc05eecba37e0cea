/* dlpack.h: the DLPack ABI (https://dmlc.github.io/dlpack/latest/c_api.html), the
 * subset llmint8 uses to exchange device arrays with CuPy, JAX, PyTorch and others.
 * The layouts below are fixed by the DLPack specification (1.0 for the versioned
 * tensor); only the fields are declared, no behaviour. */
#ifndef LLMINT8_DLPACK_H
#define LLMINT8_DLPACK_H

#include <stdint.h>

#define L8_DLPACK_MAJOR 1
#define L8_DLPACK_MINOR 0

enum { kDLCPU = 1, kDLCUDA = 2, kDLCUDAHost = 3, kDLCUDAManaged = 13 };
enum { kDLInt = 0, kDLUInt = 1, kDLFloat = 2, kDLBfloat = 4 };

#define DLPACK_FLAG_BITMASK_READ_ONLY (1ULL << 0)

typedef struct {
    int32_t device_type;
    int32_t device_id;
} DLDevice;

typedef struct {
    uint8_t code;
    uint8_t bits;
    uint16_t lanes;
} DLDataType;

typedef struct {
    void *data;
    DLDevice device;
    int32_t ndim;
    DLDataType dtype;
    int64_t *shape;
    int64_t *strides;   /* in elements; NULL means compact row-major */
    uint64_t byte_offset;
} DLTensor;

typedef struct DLManagedTensor {
    DLTensor dl_tensor;
    void *manager_ctx;
    void (*deleter)(struct DLManagedTensor *self);
} DLManagedTensor;

typedef struct {
    uint32_t major;
    uint32_t minor;
} DLPackVersion;

typedef struct DLManagedTensorVersioned {
    DLPackVersion version;
    void *manager_ctx;
    void (*deleter)(struct DLManagedTensorVersioned *self);
    uint64_t flags;
    DLTensor dl_tensor;
} DLManagedTensorVersioned;

#endif
