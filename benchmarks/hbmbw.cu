// Device memory bandwidth: the floor of the CUDA decode benchmark (issue 8). Reads a large
// buffer with 16-byte loads and writes one value per block (a streaming read, like decode's
// weight reads), and times cudaMemcpy device-to-device (a copy: read + write). Prints GB/s.
//   nvcc -O3 -arch=sm_90 benchmarks/hbmbw.cu -o hbmbw && ./hbmbw [GiB]
#include <cuda_runtime.h>

#include <cstdio>
#include <cstdlib>

#define CHECK(x)                                                                   \
    do {                                                                           \
        cudaError_t e_ = (x);                                                      \
        if (e_ != cudaSuccess) {                                                   \
            std::fprintf(stderr, "%s: %s\n", #x, cudaGetErrorString(e_));          \
            std::exit(1);                                                          \
        }                                                                          \
    } while (0)

__global__ void read_kernel(const float4 * __restrict__ src, size_t n, float * __restrict__ out) {
    float acc = 0.0f;
    for (size_t i = blockIdx.x * size_t(blockDim.x) + threadIdx.x; i < n; i += size_t(gridDim.x) * blockDim.x) {
        const float4 v = src[i];
        acc += v.x + v.y + v.z + v.w;
    }
    __shared__ float s[1024];
    s[threadIdx.x] = acc;
    __syncthreads();
    if (threadIdx.x == 0) {
        float t = 0.0f;
        for (unsigned k = 0; k < blockDim.x; ++k) {
            t += s[k];
        }
        out[blockIdx.x] = t;
    }
}

int main(int argc, char ** argv) {
    const double gib = argc > 1 ? std::atof(argv[1]) : 4.0;
    const size_t bytes = size_t(gib * 1073741824.0) / 16 * 16;
    void * a = nullptr;
    void * b = nullptr;
    float * out = nullptr;
    CHECK(cudaMalloc(&a, bytes));
    CHECK(cudaMalloc(&b, bytes));
    CHECK(cudaMemset(a, 0, bytes));
    int sms = 0;
    CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0));
    const int blocks = sms * 8, threads = 512;
    CHECK(cudaMalloc(&out, sizeof(float) * blocks));
    cudaEvent_t t0, t1;
    CHECK(cudaEventCreate(&t0));
    CHECK(cudaEventCreate(&t1));
    const int reps = 20;
    float ms = 0.0f;

    read_kernel<<<blocks, threads>>>(static_cast<const float4 *>(a), bytes / 16, out);  // warm-up
    CHECK(cudaEventRecord(t0));
    for (int r = 0; r < reps; ++r) {
        read_kernel<<<blocks, threads>>>(static_cast<const float4 *>(a), bytes / 16, out);
    }
    CHECK(cudaEventRecord(t1));
    CHECK(cudaEventSynchronize(t1));
    CHECK(cudaEventElapsedTime(&ms, t0, t1));
    std::printf("read: %.1f GB/s\n", double(bytes) * reps / (ms * 1e-3) / 1e9);

    CHECK(cudaMemcpy(b, a, bytes, cudaMemcpyDeviceToDevice));  // warm-up
    CHECK(cudaEventRecord(t0));
    for (int r = 0; r < reps; ++r) {
        CHECK(cudaMemcpy(b, a, bytes, cudaMemcpyDeviceToDevice));
    }
    CHECK(cudaEventRecord(t1));
    CHECK(cudaEventSynchronize(t1));
    CHECK(cudaEventElapsedTime(&ms, t0, t1));
    std::printf("copy: %.1f GB/s (read + write)\n", 2.0 * double(bytes) * reps / (ms * 1e-3) / 1e9);
    CHECK(cudaFree(a));
    CHECK(cudaFree(b));
    CHECK(cudaFree(out));
    return 0;
}
