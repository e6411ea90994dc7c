// Backend selection and weight placement: the CPU always; CUDA when built with DSV4_CUDA.
//
// With CUDA, every weight of the first n_gpu_layers trunk layers (all, by default) and the output
// head lives in device memory; routed experts can stay in host memory (experts_on_host), which is
// what makes a model larger than the card usable: attention, shared experts, norms and HC run on
// the GPU, the selected experts on the CPU. The token embedding stays in host memory (one row
// per token is read). The scheduler sends each op to the backend of its weights. On the CPU,
// every weight is read from the mapped file, except (with `repack`) the quantized matrices ggml
// has a faster layout for: copied into its AMX (experts included) or interleaved (CPU_REPACK) layouts.
#pragma once

#include "dsv4.h"
#include "ggml-backend.h"

#include <string>
#include <vector>

namespace dsv4 {

// A compute backend of the given kind (DSV4_BACKEND_CPU/CUDA); throws when unavailable.
ggml_backend_t make_backend(int32_t kind, int n_threads);

// Where the weights that are not read from the mapped file may go, in order of preference: CUDA's
// device buffer type (throws when no device is present); on the CPU, by `repack` (dsv4_repack),
// ggml's AMX and/or CPU_REPACK types (weights re-laid out for faster quantized matrix products;
// throws when the one asked for is missing); empty when every weight is read in place.
std::vector<ggml_backend_buffer_type_t> copy_buffer_types(const dsv4_model_params & p);

// The buffer type (one of `bufts`) weight `t` (named `name`, not yet allocated) is copied into, or
// null: read in place. CUDA: the weights of the first n_gpu_layers layers and the output head,
// less the token embedding and, with experts_on_host, the routed experts. CPU: the first layout
// ggml computes our uses of the matrix from (MUL_MAT with F32 activations)
// (and MUL_MAT_ID for the routed experts, which go to the AMX layout only: ggml's interleaved
// MUL_MAT_ID is slower in prefill, benchmarks/RESULTS.md).
ggml_backend_buffer_type_t weight_buffer_type(const dsv4_model_params & p, const dsv4_hparams & hp,
                                              const std::vector<ggml_backend_buffer_type_t> & bufts,
                                              const ggml_tensor * t, const std::string & name);

}  // namespace dsv4
