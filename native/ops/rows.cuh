// Device helpers shared by our CUDA twins (ops.h).
#pragma once

#include "ggml.h"

#include <cuda_fp16.h>

#include <cstdint>

namespace dsv4::ops {

// Element d of a cache row stored as F32, F16, BF16 or Q8_0 (blocks of {f16 scale, 32 × int8}).
__device__ inline float row_value(const char * row, int type, int64_t d) {
    switch (type) {
        case GGML_TYPE_F32:
            return reinterpret_cast<const float *>(row)[d];
        case GGML_TYPE_F16:
            return __half2float(reinterpret_cast<const __half *>(row)[d]);
        case GGML_TYPE_BF16:
            return __uint_as_float(uint32_t(reinterpret_cast<const uint16_t *>(row)[d]) << 16);
        default: {  // GGML_TYPE_Q8_0
            const char * block = row + (d / 32) * (sizeof(__half) + 32);
            const float scale = __half2float(*reinterpret_cast<const __half *>(block));
            return scale * float(reinterpret_cast<const int8_t *>(block + sizeof(__half))[d % 32]);
        }
    }
}

// Whether row_value reads `type`.
inline bool row_type_supported(ggml_type type) {
    return type == GGML_TYPE_F32 || type == GGML_TYPE_F16 || type == GGML_TYPE_BF16 || type == GGML_TYPE_Q8_0;
}

}  // namespace dsv4::ops
