#include "backend.h"

#include "error.h"
#include "ggml-cpu.h"

#include <cstdlib>
#include <cstring>

#ifdef DSV4_WITH_CUDA
#include "ggml-cuda.h"
#include "ops.h"
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
        ops::register_cuda_ops();  // our custom ops run on the device too
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

// One of the CPU device's extra buffer types by name ("CPU_REPACK", "AMX"); null when this build
// or this CPU has none.
ggml_backend_buffer_type_t cpu_extra_buffer_type(const char * name) {
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
        if (std::strcmp(ggml_backend_buft_name(*b), name) == 0) {
            return *b;
        }
    }
    return nullptr;
}

// Whether ggml computes our uses of `t` from `buft`: the graph reads a quantized matrix as src0
// of a MUL_MAT with contiguous F32 activations (native/generated/blocks.cpp), except token_embd
// (GET_ROWS) and attn_output_a (a 3-D batched MUL_MAT over permuted activations), and the routed
// experts as src0 of MUL_MAT_ID. Experts go to the AMX layout only: ggml's interleaved
// MUL_MAT_ID makes prefill slower (benchmarks/RESULTS.md). The rest is ggml's own answer for
// that op with `t` placed in `buft`.
bool cpu_layout_accepts(ggml_backend_buffer_type_t buft, const ggml_tensor * t, const std::string & name) {
    const bool expert = is_routed_expert(name);
    if (buft == ggml_backend_cpu_buffer_type()) {
        return !expert && name != "token_embd.weight";
    }
    if (!ggml_is_quantized(t->type) || name == "token_embd.weight" || name.find("attn_output_a") != std::string::npos ||
        t->ne[3] != 1 || (!expert && t->ne[2] != 1) ||
        (expert && std::strcmp(ggml_backend_buft_name(buft), "AMX") != 0)) {
        return false;
    }
    ggml_backend_buffer_t buf = ggml_backend_buft_alloc_buffer(buft, ggml_backend_buft_get_alignment(buft));
    if (buf == nullptr) {
        return false;
    }
    ggml_tensor w = *t;  // init_tensor and supports_op read only the type, shape and buffer
    w.extra = nullptr;
    w.buffer = buf;
    w.data = ggml_backend_buffer_get_base(buf);
    ggml_backend_buffer_init_tensor(buf, &w);
    ggml_tensor x{};     // one token's activations
    x.type = GGML_TYPE_F32;
    x.ne[0] = t->ne[0];
    x.ne[1] = x.ne[2] = x.ne[3] = 1;
    x.nb[0] = sizeof(float);
    x.nb[1] = x.nb[2] = x.nb[3] = size_t(t->ne[0]) * sizeof(float);
    ggml_tensor ids{};   // one expert slot
    ids.type = GGML_TYPE_I32;
    ids.ne[0] = ids.ne[1] = ids.ne[2] = ids.ne[3] = 1;
    ids.nb[0] = ids.nb[1] = ids.nb[2] = ids.nb[3] = sizeof(int32_t);
    ggml_tensor y = x;
    y.op = expert ? GGML_OP_MUL_MAT_ID : GGML_OP_MUL_MAT;
    y.ne[0] = t->ne[1];
    y.nb[1] = y.nb[2] = y.nb[3] = size_t(t->ne[1]) * sizeof(float);
    y.src[0] = &w;
    y.src[1] = &x;
    y.src[2] = expert ? &ids : nullptr;
    // CPU_REPACK marks the tensors it has a layout for in `extra`; AMX takes any type it supports
    const bool ok = w.extra != nullptr &&
                    ggml_backend_dev_supports_op(ggml_backend_buft_get_device(buft), &y);
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

std::vector<ggml_backend_buffer_type_t> copy_buffer_types(const dsv4_model_params & p) {
    if (p.backend == DSV4_BACKEND_CPU) {
        ggml_backend_buffer_type_t amx = nullptr, interleaved = nullptr;
        switch (p.repack) {
            case DSV4_REPACK_NONE:
                return {};
            case DSV4_REPACK_AUTO:
                amx = cpu_extra_buffer_type("AMX");
                interleaved = cpu_extra_buffer_type("CPU_REPACK");
                break;
            case DSV4_REPACK_INTERLEAVED:
                interleaved = cpu_extra_buffer_type("CPU_REPACK");
                if (interleaved == nullptr) {
                    fail(DSV4_ERR_BACKEND, "repack=interleaved: this build of ggml has no CPU_REPACK buffer type");
                }
                break;
            case DSV4_REPACK_AMX:
                amx = cpu_extra_buffer_type("AMX");
                if (amx == nullptr) {
                    fail(DSV4_ERR_BACKEND, "repack=amx: no AMX on this CPU (or ggml was built without AMX_INT8 "
                         "and AVX512_VNNI)");
                }
                break;
            default:
                fail(DSV4_ERR_INVALID_ARGUMENT, "repack must be a dsv4_repack value (0..3), got %d", int(p.repack));
        }
        std::vector<ggml_backend_buffer_type_t> out;
        for (ggml_backend_buffer_type_t b : {amx, interleaved}) {  // AMX first: faster where both apply
            if (b != nullptr) {
                out.push_back(b);
            }
        }
        out.push_back(ggml_backend_cpu_buffer_type());  // the other non-expert weights, as they are
        return out;
    }
#ifdef DSV4_WITH_CUDA
    if (p.backend == DSV4_BACKEND_CUDA) {
        if (ggml_backend_cuda_get_device_count() < 1) {
            fail(DSV4_ERR_BACKEND, "backend cuda: no CUDA device is available");
        }
        return {ggml_backend_cuda_buffer_type(0)};
    }
#endif
    fail(DSV4_ERR_BACKEND, "backend %d is not available in this build", int(p.backend));
}

ggml_backend_buffer_type_t weight_buffer_type(const dsv4_model_params & p, const dsv4_hparams & hp,
                                              const std::vector<ggml_backend_buffer_type_t> & bufts,
                                              const ggml_tensor * t, const std::string & name) {
    for (ggml_backend_buffer_type_t b : bufts) {
        if (p.backend == DSV4_BACKEND_CPU ? cpu_layout_accepts(b, t, name) : on_cuda(p, hp, name)) {
            return b;
        }
    }
    return nullptr;
}

}  // namespace dsv4
