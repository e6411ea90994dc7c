// Backend selection and weight placement: the CPU always; CUDA when built with DSV4_CUDA.
//
// With CUDA, every weight of the first n_gpu_layers trunk layers (all, by default) and the output
// head lives in device memory; routed experts can stay in host memory (experts_on_host), which is
// what makes a model larger than the card usable: attention, shared experts, norms and HC run on
// the GPU, the selected experts on the CPU. The token embedding stays in host memory (one row
// per token is read). The scheduler sends each op to the backend of its weights.
#pragma once

#include "dsv4.h"
#include "ggml-backend.h"

#include <string>

namespace dsv4 {

// A compute backend of the given kind (DSV4_BACKEND_CPU/CUDA); throws when unavailable.
ggml_backend_t make_backend(int32_t kind, int n_threads);

// The device buffer type of a kind (CPU: host memory).
ggml_backend_buffer_type_t device_buffer_type(int32_t kind);

// The CPU's repacking buffer type ("CPU_REPACK": weights re-laid out for faster quantized
// matrix products), or null when this build has none.
ggml_backend_buffer_type_t cpu_repack_buffer_type();

// Whether `t` (a weight, not yet allocated) can live in `repack`: ggml repacks its type and
// shape, and our graph uses it only as the matrix of MUL_MAT / MUL_MAT_ID with F32 activations
// (the only ops the repacked layout supports).
bool repackable(ggml_backend_buffer_type_t repack, const ggml_tensor * t, const std::string & name);

// Whether weight `name` of layer `il` (-1: not a layer tensor) goes to the device.
bool weight_on_device(const dsv4_model_params & p, const dsv4_hparams & hp, const std::string & name, int il);

}  // namespace dsv4
