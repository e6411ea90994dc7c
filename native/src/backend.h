// Backend selection and weight placement: the CPU always; CUDA when built with DSV4_CUDA.
//
// With CUDA, every weight of the first n_gpu_layers trunk layers (all, by default) and the output
// head lives in device memory; routed experts can stay in host memory (experts_on_host), which is
// what makes a model larger than the card usable: attention, shared experts, norms and HC run on
// the GPU, the selected experts on the CPU. The token embedding stays in host memory (one row
// per token is read). The scheduler sends each op to the backend of its weights. On the CPU,
// every weight is read from the mapped file, except (with `repack`) the non-expert quantized
// matrices, copied into ggml's repacked layout.
#pragma once

#include "dsv4.h"
#include "ggml-backend.h"

#include <string>

namespace dsv4 {

// A compute backend of the given kind (DSV4_BACKEND_CPU/CUDA); throws when unavailable.
ggml_backend_t make_backend(int32_t kind, int n_threads);

// Where the weights that are not read from the mapped file go: CUDA's device buffer type (throws
// when no device is present); on the CPU with `repack`, ggml's CPU_REPACK type (weights re-laid out
// for faster quantized matrix products); null when every weight is read in place.
ggml_backend_buffer_type_t copy_buffer_type(const dsv4_model_params & p);

// Whether weight `t` (named `name`, not yet allocated) is copied into `buft` (copy_buffer_type's
// answer, not null) rather than read in place. CUDA: the weights of the first n_gpu_layers layers
// and the output head, less the token embedding and, with experts_on_host, the routed experts.
// CPU: the matrices ggml has a repacked layout for, which our graph uses only in MUL_MAT with F32
// activations (the one op that layout supports), except the routed experts, whose repacked
// MUL_MAT_ID is slower in prefill (benchmarks/RESULTS.md).
bool weight_copied(const dsv4_model_params & p, const dsv4_hparams & hp, ggml_backend_buffer_type_t buft,
                   const ggml_tensor * t, const std::string & name);

}  // namespace dsv4
