// CPU helpers shared by our ops' CPU implementations (ops.h).
#pragma once

#include "ggml-cpu.h"
#include "ggml.h"

#include <cstdint>
#include <cstring>

namespace dsv4::ops {

// Whether row_to_float reads rows of `t`: F32, or any type with a float conversion.
inline bool rows_convertible(const ggml_tensor * t) {
    return t->type == GGML_TYPE_F32 || ggml_get_type_traits(t->type)->to_float != nullptr;
}

// Row r of a cache or weight tensor (ne[0] values) as floats: F16 and BF16 through ggml-cpu's
// vectorized conversions (ggml-base's row conversions are scalar), other types through their
// own.
inline void row_to_float(const ggml_tensor * t, int64_t r, float * out) {
    const char * src = static_cast<const char *>(t->data) + r * t->nb[1];
    switch (t->type) {
        case GGML_TYPE_F32: std::memcpy(out, src, size_t(t->ne[0]) * sizeof(float)); break;
        case GGML_TYPE_F16: ggml_cpu_fp16_to_fp32(reinterpret_cast<const ggml_fp16_t *>(src), out, t->ne[0]); break;
        case GGML_TYPE_BF16: ggml_cpu_bf16_to_fp32(reinterpret_cast<const ggml_bf16_t *>(src), out, t->ne[0]); break;
        default: ggml_get_type_traits(t->type)->to_float(src, out, t->ne[0]); break;
    }
}

}  // namespace dsv4::ops
