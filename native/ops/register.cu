// Hands ggml-cuda the CUDA twin of each of our custom ops (vendor/ggml/patches/0003-cuda-custom-ops.patch).
#include "ops.h"

#include "ggml-cuda.h"

namespace dsv4::ops {

void register_cuda_ops() {
    ggml_backend_cuda_register_custom_op(compress_pool_cpu, compress_pool_cuda);
    ggml_backend_cuda_register_custom_op(topk_mask_cpu, topk_mask_cuda);
    ggml_backend_cuda_register_custom_op(indexer_scores_cpu, indexer_scores_cuda);
    ggml_backend_cuda_register_custom_op(attend_decode_cpu, attend_decode_cuda);
}

}  // namespace dsv4::ops
