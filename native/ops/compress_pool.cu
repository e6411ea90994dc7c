// CUDA twin of compress_pool_cpu (ops.h): one thread per (channel, block); the same two passes
// (maximum logit over the members, then the exponentials' weighted sum) in float.
#include "ops.h"

#include <cuda_runtime.h>

namespace dsv4::ops {

namespace {

struct Rows {
    const char * ring;
    const char * batch;
    size_t ring_nb1, batch_nb1;
};

__device__ const float * member_row(const Rows & t, int64_t r, int64_t ring_rows) {
    return r < ring_rows ? reinterpret_cast<const float *>(t.ring + r * t.ring_nb1)
                         : reinterpret_cast<const float *>(t.batch + (r - ring_rows) * t.batch_nb1);
}

__global__ void compress_pool_kernel(Rows v, Rows z, const int32_t * rows, float * out, size_t out_nb1, int64_t d,
                                     int64_t members, int64_t ring_rows, bool overlap) {
    const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
    const int64_t b = blockIdx.y;
    if (i >= d) {
        return;
    }
    const int32_t * mr = rows + members * b;
    float mx = -INFINITY;
    for (int64_t m = 0; m < members; ++m) {
        const int64_t f = (overlap && m >= members / 2 ? d : 0) + i;
        mx = fmaxf(mx, member_row(z, mr[m], ring_rows)[f]);
    }
    float sum = 0.0f, acc = 0.0f;
    for (int64_t m = 0; m < members; ++m) {
        const int64_t f = (overlap && m >= members / 2 ? d : 0) + i;
        const float e = expf(member_row(z, mr[m], ring_rows)[f] - mx);
        sum += e;
        acc += e * member_row(v, mr[m], ring_rows)[f];
    }
    reinterpret_cast<float *>(reinterpret_cast<char *>(out) + b * out_nb1)[i] = acc / sum;
}

}  // namespace

void compress_pool_cuda(ggml_tensor * dst, void * stream) {
    const ggml_tensor * ring_kv = dst->src[0];
    const ggml_tensor * kv = dst->src[1];
    const ggml_tensor * ring_score = dst->src[2];
    const ggml_tensor * score = dst->src[3];
    const ggml_tensor * rows = dst->src[4];
    const int64_t d = dst->ne[0];
    const int64_t n_blocks = dst->ne[1];
    if (n_blocks == 0 || d == 0) {
        return;
    }
    const int64_t members = rows->ne[0] / n_blocks;
    const Rows v{static_cast<const char *>(ring_kv->data), static_cast<const char *>(kv->data), ring_kv->nb[1], kv->nb[1]};
    const Rows z{static_cast<const char *>(ring_score->data), static_cast<const char *>(score->data), ring_score->nb[1],
                 score->nb[1]};
    constexpr int kThreads = 128;
    const dim3 grid(unsigned((d + kThreads - 1) / kThreads), unsigned(n_blocks));
    compress_pool_kernel<<<grid, kThreads, 0, static_cast<cudaStream_t>(stream)>>>(
        v, z, static_cast<const int32_t *>(rows->data), static_cast<float *>(dst->data), dst->nb[1], d, members,
        ring_kv->ne[1], ring_kv->ne[0] == 2 * d);
}

}  // namespace dsv4::ops
