#include "backend.h"

#include "error.h"
#include "ggml-cpu.h"

#include <cstdlib>
#include <cstring>

#ifdef DSV4_WITH_CUDA
#include "ggml-cuda.h"
#endif

namespace dsv4 {

ggml_backend_t make_backend(int32_t kind, int n_threads) {
    if (kind == DSV4_BACKEND_CPU) {
        ggml_backend_t b = ggml_backend_cpu_init();
        if (b == nullptr) {
            fail(DSV4_ERR_BACKEND, "cannot initialise the CPU backend");
        }
        ggml_backend_cpu_set_n_threads(b, n_threads);
        return b;
    }
#ifdef DSV4_WITH_CUDA
    if (kind == DSV4_BACKEND_CUDA) {
        if (ggml_backend_cuda_get_device_count() < 1) {
            fail(DSV4_ERR_BACKEND, "no CUDA device is available");
        }
        ggml_backend_t b = ggml_backend_cuda_init(0);
        if (b == nullptr) {
            fail(DSV4_ERR_BACKEND, "cannot initialise CUDA device 0");
        }
        return b;
    }
#endif
    fail(DSV4_ERR_BACKEND, "backend %d is not available in this build", int(kind));
}

namespace {

bool is_routed_expert(const std::string & name) {
    return name.find("_exps.") != std::string::npos;
}

// "blk.N.<...>" -> N; -1 for the global tensors.
int layer_of(const std::string & name) {
    if (name.compare(0, 4, "blk.") != 0) {
        return -1;
    }
    return std::atoi(name.c_str() + 4);
}

ggml_backend_buffer_type_t cpu_repack_buffer_type() {
    ggml_backend_dev_t dev = ggml_backend_dev_by_type(GGML_BACKEND_DEVICE_TYPE_CPU);
    if (dev == nullptr) {
        return nullptr;
    }
    auto get = (ggml_backend_dev_get_extra_bufts_t) ggml_backend_reg_get_proc_address(
        ggml_backend_dev_backend_reg(dev), "ggml_backend_dev_get_extra_bufts");
    if (get == nullptr) {
        return nullptr;
    }
    for (ggml_backend_buffer_type_t * b = get(dev); b != nullptr && *b != nullptr; ++b) {
        if (std::strcmp(ggml_backend_buft_name(*b), "CPU_REPACK") == 0) {
            return *b;
        }
    }
    return nullptr;
}

bool repackable(ggml_backend_buffer_type_t repack, const ggml_tensor * t, const std::string & name) {
    // the graph's uses (native/generated/blocks.cpp): token_embd is read by GET_ROWS;
    // attn_output_a is a 3-D batched MUL_MAT over permuted activations
    if (!ggml_is_quantized(t->type) || is_routed_expert(name) || name == "token_embd.weight" ||
        name.find("attn_output_a") != std::string::npos || t->ne[2] != 1) {
        return false;
    }
    // ask ggml: its repack buffer marks the tensors it has a layout for (tensor->extra)
    ggml_backend_buffer_t buf = ggml_backend_buft_alloc_buffer(repack, ggml_backend_buft_get_alignment(repack));
    if (buf == nullptr) {
        return false;
    }
    ggml_tensor probe = *t;
    probe.extra = nullptr;
    probe.buffer = buf;
    probe.data = ggml_backend_buffer_get_base(buf);  // init_tensor reads only the type and shape
    ggml_backend_buffer_init_tensor(buf, &probe);
    const bool ok = probe.extra != nullptr;
    ggml_backend_buffer_free(buf);
    return ok;
}

bool on_cuda(const dsv4_model_params & p, const dsv4_hparams & hp, const std::string & name) {
    if (name == "token_embd.weight") {
        return false;  // a row per token: read from host memory
    }
    const uint32_t n_gpu = p.n_gpu_layers < 0 ? hp.n_layer_all : uint32_t(p.n_gpu_layers);
    const int il = layer_of(name);
    if (il < 0) {
        return n_gpu >= hp.n_layer;  // the output head goes with the last layer
    }
    return uint32_t(il) < n_gpu && !(is_routed_expert(name) && p.experts_on_host);
}

}  // namespace

ggml_backend_buffer_type_t copy_buffer_type(const dsv4_model_params & p) {
    if (p.backend == DSV4_BACKEND_CPU) {
        return p.repack ? cpu_repack_buffer_type() : nullptr;
    }
#ifdef DSV4_WITH_CUDA
    if (p.backend == DSV4_BACKEND_CUDA) {
        if (ggml_backend_cuda_get_device_count() < 1) {
            fail(DSV4_ERR_BACKEND, "backend cuda: no CUDA device is available");
        }
        return ggml_backend_cuda_buffer_type(0);
    }
#endif
    fail(DSV4_ERR_BACKEND, "backend %d is not available in this build", int(p.backend));
}

bool weight_copied(const dsv4_model_params & p, const dsv4_hparams & hp, ggml_backend_buffer_type_t buft,
                   const ggml_tensor * t, const std::string & name) {
    return p.backend == DSV4_BACKEND_CPU ? repackable(buft, t, name) : on_cuda(p, hp, name);
}

}  // namespace dsv4
