#include "model.h"

#include "backend.h"
#include "binder.h"
#include "error.h"
#include "hparams.h"

#include "ggml-alloc.h"

#include <algorithm>

#include <sys/mman.h>
#include <unistd.h>

namespace dsv4 {

uint64_t fnv1a(const void * data, size_t n, uint64_t h) {
    const uint8_t * p = static_cast<const uint8_t *>(data);
    for (size_t i = 0; i < n; ++i) {
        h = (h ^ p[i]) * 0x100000001b3ull;
    }
    return h;
}

namespace {

void check_architecture(const GgufFile & f) {
    const GgufValue * v = f.find("general.architecture");
    if (v == nullptr) {
        fail(DSV4_ERR_MISSING_KEY, "required metadata key 'general.architecture' is missing");
    }
    if (v->type != GgufType::STRING) {
        fail(DSV4_ERR_BAD_KEY, "metadata key 'general.architecture' has type %s, expected string",
             gguf_type_name(v->type));
    }
    if (v->str != "deepseek4") {
        std::string arch(v->str.substr(0, 64));
        fail(DSV4_ERR_WRONG_ARCH, "'%s' is a '%s' model; this engine runs 'deepseek4' (DeepSeek-V4) models",
             f.path().c_str(), arch.c_str());
    }
}

void check_backend(const dsv4_model_params & p) {
    if (p.backend != DSV4_BACKEND_CPU && p.backend != DSV4_BACKEND_CUDA) {
        fail(DSV4_ERR_INVALID_ARGUMENT, "unknown backend %d", int(p.backend));
    }
    if (!dsv4_backend_available(p.backend)) {
        fail(DSV4_ERR_BACKEND, "this build has no CUDA backend (rebuild with -DDSV4_CUDA=ON)");
    }
}

// Hash routing reads expert ids from the file (§3.8): an id out of range would index past the
// expert tensors, so check them once here.
void check_tid2eid(const dsv4_hparams & hp, const Weights & w, const GgufFile & f,
                   const std::vector<WeightBinder::Bound> & bound) {
    for (const WeightBinder::Bound & b : bound) {
        bool is_table = false;
        for (uint32_t il = 0; il < hp.n_layer_all; ++il) {
            is_table = is_table || b.tensor == w.layers[il].ffn_gate_tid2eid;
        }
        if (!is_table) {
            continue;
        }
        const int32_t * ids = reinterpret_cast<const int32_t *>(f.data(*b.info));
        const int64_t n = ggml_nelements(b.tensor);
        for (int64_t i = 0; i < n; ++i) {
            if (ids[i] < 0 || uint32_t(ids[i]) >= hp.n_expert) {
                fail(DSV4_ERR_CORRUPT, "tensor '%s' routes token %lld to expert %d, but the model has %u experts",
                     b.info->name.c_str(), (long long) (i / b.tensor->ne[0]), int(ids[i]), unsigned(hp.n_expert));
            }
        }
    }
}

// Asks the kernel to back the 2 MiB-aligned part of a freshly allocated (not yet touched) host
// buffer with transparent huge pages: decode streams the repacked weights once per token, and
// with 4 KiB pages every 4 KiB of an expert matrix is another TLB miss. Only a hint: where THP
// is off ("never") or the buffer is too small this changes nothing.
void advise_huge_pages(void * data, size_t size) {
    constexpr uintptr_t huge = uintptr_t(2) << 20;
    const uintptr_t lo = (reinterpret_cast<uintptr_t>(data) + huge - 1) & ~(huge - 1);
    const uintptr_t hi = (reinterpret_cast<uintptr_t>(data) + size) & ~(huge - 1);
    if (hi > lo) {
        madvise(reinterpret_cast<void *>(lo), size_t(hi - lo), MADV_HUGEPAGE);
    }
}

size_t physical_memory_bytes() {
    const long pages = sysconf(_SC_PHYS_PAGES), page = sysconf(_SC_PAGESIZE);
    return pages > 0 && page > 0 ? size_t(pages) * size_t(page) : 0;
}

// Gives every weight its memory: host weights are the mapped file itself (read in place);
// device weights (backend CUDA, backend.h) get a device buffer and are uploaded; on the CPU with
// `repack`, the matrices ggml can re-lay out get an AMX or CPU_REPACK buffer instead, and the other
// non-expert weights but the token embedding a plain copy (when they fit). Progress is
// reported by bytes over both; `prefetch` also reads every host page now, so that the first
// tokens do not stall on page faults.
// Where each bound weight goes: an index into `bufts` (a copy of that buffer type), or -1 (read in
// place from the mapped file); the bytes each buffer type needs.
struct Placement {
    std::vector<ggml_backend_buffer_type_t> bufts;
    std::vector<int> target;
    std::vector<size_t> bytes;
    std::string note;   // what the plan left out, for the user (dsv4_model_load_note)
};

// On the CPU, every copy together stays within the copy limit (default half the physical
// memory, so that a model larger than the machine still loads): the non-expert weights first
// (every token reads them all), then the routed experts in file order; the rest stay mapped.
void cap_copies(const dsv4_model & m, const std::vector<WeightBinder::Bound> & bound, const std::vector<size_t> & size,
                Placement & pl) {
    const uint64_t limit = m.params.copy_limit != 0 ? m.params.copy_limit : physical_memory_bytes() / 2;
    uint64_t used = 0, left_bytes = 0;
    size_t left = 0;
    for (const bool experts : {false, true}) {
        for (size_t i = 0; i < bound.size(); ++i) {
            if (pl.target[i] < 0 || (bound[i].info->name.find("_exps.") != std::string::npos) != experts) {
                continue;
            }
            if (used + size[i] <= limit) {
                used += size[i];
                continue;
            }
            pl.bytes[size_t(pl.target[i])] -= size[i];
            pl.target[i] = -1;
            left += 1;
            left_bytes += bound[i].info->nbytes;
        }
    }
    if (left > 0) {
        pl.note = format("%zu weights (%.2f GiB) are read in place from the mapped file: copying them too (repack) "
                         "would pass the copy limit of %.2f GiB (%s); %.2f GiB were copied",
                         left, double(left_bytes) / 1073741824.0, double(limit) / 1073741824.0,
                         m.params.copy_limit != 0 ? "copy_limit" : "half of this machine's memory",
                         double(used) / 1073741824.0);
    }
}

Placement plan_placement(const dsv4_model & m, const std::vector<WeightBinder::Bound> & bound) {
    const dsv4_model_params & p = m.params;
    Placement pl;
    pl.bufts = copy_buffer_types(p);
    pl.target.assign(bound.size(), -1);
    pl.bytes.assign(pl.bufts.size(), 0);
    std::vector<size_t> size(bound.size(), 0);
    for (size_t i = 0; i < bound.size(); ++i) {
        ggml_backend_buffer_type_t buft = weight_buffer_type(p, m.hp, pl.bufts, bound[i].tensor, bound[i].info->name);
        if (buft == nullptr) {
            continue;
        }
        const auto k = size_t(std::find(pl.bufts.begin(), pl.bufts.end(), buft) - pl.bufts.begin());
        GGML_ASSERT(k < pl.bufts.size());
        pl.target[i] = int(k);
        size[i] = GGML_PAD(ggml_backend_buft_get_alloc_size(buft, bound[i].tensor), ggml_backend_buft_get_alignment(buft));
        pl.bytes[k] += size[i];
    }
    // the plain copies (weights as they are, for huge pages) are only a speed-up: where they would
    // take more than a quarter of this machine's memory, those weights are read in place instead
    const auto plain = size_t(std::find(pl.bufts.begin(), pl.bufts.end(), ggml_backend_cpu_buffer_type()) - pl.bufts.begin());
    if (plain < pl.bufts.size() && pl.bytes[plain] > physical_memory_bytes() / 4) {
        std::replace(pl.target.begin(), pl.target.end(), int(plain), -1);
        pl.bytes[plain] = 0;
    }
    if (p.backend == DSV4_BACKEND_CPU) {
        cap_copies(m, bound, size, pl);
    }
    return pl;
}

// Places the weights read in place in the mapped files (one host buffer per file: a split model
// has several), allocates one buffer per buffer type for the copies and places them there;
// returns the bytes copied.
size_t allocate_weights(dsv4_model & m, const std::vector<WeightBinder::Bound> & bound, const Placement & pl) {
    const dsv4_model_params & p = m.params;
    const GgufFile & f = *m.file;
    for (size_t ip = 0; ip < f.n_parts(); ++ip) {
        const GgufPart & part = f.part(ip);
        ggml_backend_buffer_t buf = ggml_backend_cpu_buffer_from_ptr(const_cast<uint8_t *>(part.map), size_t(part.size));
        if (buf == nullptr) {
            fail(DSV4_ERR_OUT_OF_MEMORY, "cannot wrap the mapped weights of '%s' in a backend buffer", part.path.c_str());
        }
        m.weights_bufs.push_back(buf);
        ggml_backend_buffer_set_usage(buf, GGML_BACKEND_BUFFER_USAGE_WEIGHTS);
    }
    for (size_t i = 0; i < bound.size(); ++i) {
        const GgufTensorInfo & ti = *bound[i].info;
        if (pl.target[i] < 0 && ggml_backend_tensor_alloc(m.weights_bufs[ti.part], bound[i].tensor,
                                                          const_cast<uint8_t *>(f.data(ti))) != GGML_STATUS_SUCCESS) {
            fail(DSV4_ERR_INTERNAL, "cannot place tensor '%s'", ti.name.c_str());
        }
    }
    size_t copied = 0;
    for (size_t k = 0; k < pl.bufts.size(); ++k) {
        if (pl.bytes[k] == 0) {
            continue;
        }
        copied += pl.bytes[k];
        ggml_backend_buffer_t buf = ggml_backend_buft_alloc_buffer(pl.bufts[k], pl.bytes[k]);
        if (buf == nullptr) {
            if (p.backend == DSV4_BACKEND_CPU) {
                fail(DSV4_ERR_OUT_OF_MEMORY, "cannot allocate %.1f MiB for the weights copied at load (repack=False reads "
                     "them in place)", double(pl.bytes[k]) / 1048576.0);
            }
            fail(DSV4_ERR_OUT_OF_MEMORY, "cannot allocate %.1f MiB of device memory for the weights (lower n_gpu_layers "
                 "or keep the experts on the host)", double(pl.bytes[k]) / 1048576.0);
        }
        m.copy_bufs.push_back(buf);
        if (p.backend == DSV4_BACKEND_CPU) {  // every copy on the CPU is in host memory
            advise_huge_pages(ggml_backend_buffer_get_base(buf), ggml_backend_buffer_get_size(buf));
        }
        ggml_backend_buffer_set_usage(buf, GGML_BACKEND_BUFFER_USAGE_WEIGHTS);
        ggml_tallocr ta = ggml_tallocr_new(buf);
        for (size_t i = 0; i < bound.size(); ++i) {
            if (pl.target[i] == int(k) && ggml_tallocr_alloc(&ta, bound[i].tensor) != GGML_STATUS_SUCCESS) {
                fail(DSV4_ERR_INTERNAL, "cannot place tensor '%s' in a %s buffer", bound[i].info->name.c_str(),
                     ggml_backend_buft_name(pl.bufts[k]));
            }
        }
    }
    return copied;
}

// Copies the weights into their buffers (releasing the mapped pages each came from), reads the
// others once when prefetching, and reports progress (which may cancel the load).
void fill_weights(dsv4_model & m, const std::vector<WeightBinder::Bound> & bound, const Placement & pl) {
    const GgufFile & f = *m.file;
    const dsv4_model_params & p = m.params;
    uint64_t total = 0, done = 0;
    for (const WeightBinder::Bound & b : bound) {
        total += b.info->nbytes;
    }
    if (p.prefetch) {
        for (size_t ip = 0; ip < f.n_parts(); ++ip) {
            madvise(const_cast<uint8_t *>(f.part(ip).map), size_t(f.part(ip).size), MADV_WILLNEED);
        }
    }
    const long page = sysconf(_SC_PAGESIZE);
    volatile uint8_t sink = 0;
    for (size_t i = 0; i < bound.size(); ++i) {
        const GgufTensorInfo & ti = *bound[i].info;
        const uint8_t * base = f.part(ti.part).map;  // ti.offset is within its part
        if (pl.target[i] >= 0) {
            ggml_backend_tensor_set(bound[i].tensor, base + ti.offset, 0, ti.nbytes);
            // the copy is all the graph reads: release the mapped pages it came from
            const uint64_t lo = (ti.offset + uint64_t(page) - 1) / uint64_t(page) * uint64_t(page);
            const uint64_t hi = (ti.offset + ti.nbytes) / uint64_t(page) * uint64_t(page);
            if (hi > lo) {
                madvise(const_cast<uint8_t *>(base) + lo, size_t(hi - lo), MADV_DONTNEED);
            }
        } else if (p.prefetch) {
            for (uint64_t o = 0; o < ti.nbytes; o += uint64_t(page)) {
                sink = sink + base[ti.offset + o];
            }
        }
        done += ti.nbytes;
        if (p.progress != nullptr && !p.progress(total ? float(double(done) / double(total)) : 1.0f, p.progress_data)) {
            fail(DSV4_ERR_CANCELLED, "loading '%s' was cancelled", f.path().c_str());
        }
    }
    (void) sink;
}

void place_weights(dsv4_model & m, const std::vector<WeightBinder::Bound> & bound) {
    const Placement pl = plan_placement(m, bound);
    m.load_note = pl.note;
    const size_t copied = allocate_weights(m, bound, pl);
    if (copied > 0 || m.params.prefetch || m.params.progress != nullptr) {
        fill_weights(m, bound, pl);
    }
}

}  // namespace

std::unique_ptr<dsv4_model> open_model(const std::string & path, const dsv4_model_params & params) {
    check_backend(params);
    auto m = std::make_unique<dsv4_model>();
    m->params = params;
    m->file = GgufFile::open(path);
    const GgufFile & f = *m->file;

    check_architecture(f);
    read_hparams(f, m->hp);

    if (m->hp.n_nextn > 0 && f.find_tensor("blk.0.attn_norm.weight") == nullptr) {
        fail(DSV4_ERR_MISSING_TENSOR,
             "'%s' holds only the MTP block (no trunk tensors such as blk.0.attn_norm.weight): open the main model file",
             path.c_str());
    }

    ggml_init_params ip = {ggml_tensor_overhead() * (f.tensors().size() + 1), nullptr, true};
    m->ctx_meta = ggml_init(ip);
    if (m->ctx_meta == nullptr) {
        fail(DSV4_ERR_OUT_OF_MEMORY, "cannot create the weight context");
    }
    WeightBinder binder(f, m->ctx_meta);
    bind_weights(m->hp, binder, m->weights);
    binder.check_all_used();
    check_tid2eid(m->hp, m->weights, f, binder.bound());

    place_weights(*m, binder.bound());

    // what a saved state must match: hparams, the tensor table and a sample of every tensor's
    // data (two files with the same shapes but other weights are other models)
    m->fingerprint = fnv1a(&m->hp, sizeof(m->hp));
    for (const GgufTensorInfo & ti : f.tensors()) {
        m->fingerprint = fnv1a(ti.name.data(), ti.name.size(), m->fingerprint);
        m->fingerprint = fnv1a(&ti.type, sizeof(ti.type), m->fingerprint);
        m->fingerprint = fnv1a(ti.ne, sizeof(ti.ne), m->fingerprint);
        m->fingerprint = fnv1a(f.data(ti), size_t(std::min<uint64_t>(ti.nbytes, 256)), m->fingerprint);
    }
    m->table.reserve(f.tensors().size());
    for (const GgufTensorInfo & ti : f.tensors()) {
        dsv4_tensor_info t{};
        t.name = ti.name.c_str();
        t.type = int32_t(ti.type);
        t.type_name = ggml_type_name(ti.type);
        t.n_dims = int32_t(ti.n_dims);
        for (int d = 0; d < 4; ++d) {
            t.ne[d] = ti.ne[d];
        }
        t.offset = ti.offset;
        t.nbytes = ti.nbytes;
        t.file = int32_t(ti.part);
        const ggml_tensor * w = ggml_get_tensor(m->ctx_meta, ti.name.c_str());
        if (w == nullptr) {   // a foreign tensor (check_all_used let only those through)
            t.placement = "ignored";
        } else if (w->buffer == nullptr ||
                   std::find(m->weights_bufs.begin(), m->weights_bufs.end(), w->buffer) != m->weights_bufs.end()) {
            t.placement = "mapped";
        } else {
            t.placement = ggml_backend_buft_name(ggml_backend_buffer_get_type(w->buffer));
        }
        m->table.push_back(t);
    }
    return m;
}

}  // namespace dsv4

dsv4_model::~dsv4_model() {
    for (ggml_backend_buffer_t b : copy_bufs) {
        ggml_backend_buffer_free(b);
    }
    for (ggml_backend_buffer_t b : weights_bufs) {
        ggml_backend_buffer_free(b);
    }
    if (ctx_meta != nullptr) {
        ggml_free(ctx_meta);
    }
}
