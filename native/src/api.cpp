// The C API: argument checks, and every exception turned into a status + dsv4_last_error().
#include "dsv4.h"

#include "error.h"
#include "model.h"
#include "session.h"

#include "ggml.h"

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <new>
#include <vector>

#ifndef DSV4_VERSION
#define DSV4_VERSION "unknown"
#endif

namespace {

using dsv4::guarded;
using dsv4::require;

// ggml's own log: warnings and errors go to stderr; its info and debug lines (one per repacked
// tensor, per allocated buffer, ...) only with DSV4_VERBOSE=1.
void ggml_log(ggml_log_level level, const char * text, void *) {
    static const bool verbose = std::getenv("DSV4_VERBOSE") != nullptr;
    thread_local ggml_log_level last = GGML_LOG_LEVEL_INFO;  // CONT lines continue the previous level
    if (level != GGML_LOG_LEVEL_CONT) {
        last = level;
    }
    if (verbose || last == GGML_LOG_LEVEL_WARN || last == GGML_LOG_LEVEL_ERROR) {
        std::fputs(text, stderr);
    }
}

void install_ggml_log() {
    static std::once_flag once;
    std::call_once(once, [] { ggml_log_set(ggml_log, nullptr); });
}

}  // namespace

extern "C" {

const char * dsv4_version(void) {
    return "dsv4-ggml " DSV4_VERSION " (ggml " DSV4_GGML_VERSION ")";
}

const char * dsv4_last_error(void) {
    return dsv4::last_error();
}

const char * dsv4_status_name(dsv4_status status) {
    switch (status) {
        case DSV4_OK: return "ok";
        case DSV4_ERR_INVALID_ARGUMENT: return "invalid argument";
        case DSV4_ERR_IO: return "i/o error";
        case DSV4_ERR_NOT_GGUF: return "not a GGUF file";
        case DSV4_ERR_TRUNCATED: return "truncated file";
        case DSV4_ERR_CORRUPT: return "corrupt file";
        case DSV4_ERR_WRONG_ARCH: return "wrong architecture";
        case DSV4_ERR_MISSING_KEY: return "missing metadata key";
        case DSV4_ERR_BAD_KEY: return "bad metadata value";
        case DSV4_ERR_MISSING_TENSOR: return "missing tensor";
        case DSV4_ERR_TENSOR_SHAPE: return "tensor shape mismatch";
        case DSV4_ERR_TENSOR_TYPE: return "tensor type not allowed";
        case DSV4_ERR_UNEXPECTED_TENSOR: return "unexpected tensor";
        case DSV4_ERR_CONTEXT_OVERFLOW: return "context overflow";
        case DSV4_ERR_BACKEND: return "backend error";
        case DSV4_ERR_OUT_OF_MEMORY: return "out of memory";
        case DSV4_ERR_NUMERICS: return "non-finite values";
        case DSV4_ERR_INTERNAL: return "internal error";
        case DSV4_ERR_CANCELLED: return "cancelled";
        case DSV4_ERR_BAD_STATE: return "bad session state";
    }
    return "unknown status";
}

bool dsv4_backend_available(int32_t backend) {
    if (backend == DSV4_BACKEND_CPU) {
        return true;
    }
#ifdef DSV4_WITH_CUDA
    if (backend == DSV4_BACKEND_CUDA) {
        return true;
    }
#endif
    return false;
}

dsv4_status dsv4_quantize(int32_t type, const float * src, int64_t n_rows, int64_t n_per_row, const float * imatrix,
                          void * dst, size_t dst_capacity, size_t * written) {
    return guarded([&] {
        require(src, "src");
        require(dst, "dst");
        require(written, "written");
        if (type < 0 || type >= GGML_TYPE_COUNT || ggml_blck_size(ggml_type(type)) == 0 ||
            !(ggml_is_quantized(ggml_type(type)) || type == GGML_TYPE_F16 || type == GGML_TYPE_BF16)) {
            dsv4::fail(DSV4_ERR_INVALID_ARGUMENT, "cannot quantize to ggml type %d", int(type));
        }
        const ggml_type t = ggml_type(type);
        if (n_rows < 1 || n_per_row < 1 || n_per_row % ggml_blck_size(t) != 0) {
            dsv4::fail(DSV4_ERR_INVALID_ARGUMENT, "%s needs rows of a multiple of %lld values, got %lld x %lld",
                       ggml_type_name(t), (long long) ggml_blck_size(t), (long long) n_rows, (long long) n_per_row);
        }
        if (ggml_quantize_requires_imatrix(t) && imatrix == nullptr) {
            dsv4::fail(DSV4_ERR_INVALID_ARGUMENT, "%s needs an importance matrix", ggml_type_name(t));
        }
        const size_t need = ggml_row_size(t, n_per_row) * size_t(n_rows);
        if (dst_capacity < need) {
            dsv4::fail(DSV4_ERR_INVALID_ARGUMENT, "dst has %zu bytes, %zu needed", dst_capacity, need);
        }
        *written = ggml_quantize_chunk(t, src, dst, 0, n_rows, n_per_row, imatrix);
    });
}

dsv4_status dsv4_type_size(int32_t type, int64_t * block_size, size_t * block_bytes) {
    return guarded([&] {
        require(block_size, "block_size");
        require(block_bytes, "block_bytes");
        const bool ok = type >= 0 && type < GGML_TYPE_COUNT;
        *block_size = ok ? ggml_blck_size(ggml_type(type)) : 0;
        *block_bytes = ok && *block_size ? ggml_type_size(ggml_type(type)) : 0;
    });
}

dsv4_model_params dsv4_model_default_params(void) {
    dsv4_model_params p{};
    p.backend = DSV4_BACKEND_CPU;
    p.n_threads = 0;
    p.prefetch = false;
    p.n_gpu_layers = -1;
    p.experts_on_host = false;
    p.repack = DSV4_REPACK_AUTO;
    p.copy_limit = 0;
    p.progress = nullptr;
    p.progress_data = nullptr;
    return p;
}

dsv4_status dsv4_model_open(const char * path, const dsv4_model_params * params, dsv4_model ** out_model) {
    return guarded([&] {
        require(path, "path");
        require(out_model, "out_model");
        *out_model = nullptr;
        const dsv4_model_params p = params ? *params : dsv4_model_default_params();
        install_ggml_log();
        *out_model = dsv4::open_model(path, p).release();
    });
}

void dsv4_model_free(dsv4_model * model) {
    delete model;
}

dsv4_status dsv4_model_get_hparams(const dsv4_model * model, dsv4_hparams * out) {
    return guarded([&] {
        require(model, "model");
        require(out, "out");
        *out = model->hp;
    });
}

dsv4_status dsv4_model_n_tensors(const dsv4_model * model, int64_t * out) {
    return guarded([&] {
        require(model, "model");
        require(out, "out");
        *out = int64_t(model->table.size());
    });
}

dsv4_status dsv4_model_n_files(const dsv4_model * model, int32_t * out) {
    return guarded([&] {
        require(model, "model");
        require(out, "out");
        *out = int32_t(model->file->n_parts());
    });
}

dsv4_status dsv4_model_file_path(const dsv4_model * model, int32_t index, const char ** out) {
    return guarded([&] {
        require(model, "model");
        require(out, "out");
        if (index < 0 || size_t(index) >= model->file->n_parts()) {
            dsv4::fail(DSV4_ERR_INVALID_ARGUMENT, "file index %d is out of range [0, %zu)", int(index),
                       model->file->n_parts());
        }
        *out = model->file->part(size_t(index)).path.c_str();
    });
}

dsv4_status dsv4_model_tensor_info(const dsv4_model * model, int64_t index, dsv4_tensor_info * out) {
    return guarded([&] {
        require(model, "model");
        require(out, "out");
        if (index < 0 || index >= int64_t(model->table.size())) {
            dsv4::fail(DSV4_ERR_INVALID_ARGUMENT, "tensor index %lld is out of range [0, %zu)", (long long) index,
                       model->table.size());
        }
        *out = model->table[size_t(index)];
    });
}

dsv4_status dsv4_model_state_bytes(const dsv4_model * model, const dsv4_session_params * params, uint64_t * out,
                                   uint64_t * per_slot) {
    return guarded([&] {
        require(model, "model");
        require(params, "params");
        require(out, "out");
        *out = dsv4::state_bytes(model->hp, *params, per_slot);
    });
}

dsv4_status dsv4_model_token(const dsv4_model * model, int32_t id, const char ** text, size_t * len, int32_t * type) {
    return guarded([&] {
        require(model, "model");
        require(text, "text");
        require(len, "len");
        const dsv4::GgufValue * tokens = model->file->find("tokenizer.ggml.tokens");
        if (id < 0 || uint32_t(id) >= model->hp.n_vocab) {
            dsv4::fail(DSV4_ERR_INVALID_ARGUMENT, "token id %d is outside the vocabulary [0, %u)", int(id),
                       unsigned(model->hp.n_vocab));
        }
        *text = tokens->strs[size_t(id)].data();
        *len = tokens->strs[size_t(id)].size();
        if (type != nullptr) {
            *type = 1;  // normal, when the file has no token types
            const dsv4::GgufValue * types = model->file->find("tokenizer.ggml.token_type");
            if (types != nullptr && types->type == dsv4::GgufType::ARRAY && types->elem_type == dsv4::GgufType::I32 &&
                types->n == tokens->strs.size()) {
                std::memcpy(type, types->data + size_t(id) * 4, 4);
            }
        }
    });
}

dsv4_status dsv4_model_merge(const dsv4_model * model, int32_t index, const char ** text, size_t * len) {
    return guarded([&] {
        require(model, "model");
        require(text, "text");
        require(len, "len");
        const dsv4::GgufValue * merges = model->file->find("tokenizer.ggml.merges");
        if (index < 0 || uint32_t(index) >= model->hp.n_merges) {
            dsv4::fail(DSV4_ERR_INVALID_ARGUMENT, "merge %d is outside [0, %u)", int(index), unsigned(model->hp.n_merges));
        }
        *text = merges->strs[size_t(index)].data();
        *len = merges->strs[size_t(index)].size();
    });
}

dsv4_status dsv4_model_meta_string(const dsv4_model * model, const char * key, const char ** text, size_t * len) {
    return guarded([&] {
        require(model, "model");
        require(key, "key");
        require(text, "text");
        require(len, "len");
        *text = nullptr;
        *len = 0;
        if (const dsv4::GgufValue * v = model->file->find(key)) {
            if (v->type != dsv4::GgufType::STRING) {
                dsv4::fail(DSV4_ERR_BAD_KEY, "metadata key '%s' is not a string", key);
            }
            *text = v->str.data();
            *len = v->str.size();
        }
    });
}

dsv4_status dsv4_model_load_note(const dsv4_model * model, const char ** text) {
    return guarded([&] {
        require(model, "model");
        require(text, "text");
        *text = model->load_note.c_str();
    });
}

dsv4_status dsv4_model_meta_array_length(const dsv4_model * model, const char * key, int64_t * n) {
    return guarded([&] {
        require(model, "model");
        require(key, "key");
        require(n, "n");
        const dsv4::GgufValue * v = model->file->find(key);
        *n = v != nullptr && v->type == dsv4::GgufType::ARRAY ? int64_t(v->n) : -1;
    });
}

dsv4_session_params dsv4_session_default_params(void) {
    dsv4_session_params p{};
    p.n_ctx = 4096;
    p.n_ubatch = 512;
    p.n_threads = 0;
    p.cache_type = GGML_TYPE_F16;
    p.flash_attn = true;
    p.n_seq = 1;
    p.n_rollback = 32;
    p.checkpoint_interval = 1024;
    p.n_checkpoints = 8;
    p.mtp = false;
    return p;
}

dsv4_status dsv4_session_create(dsv4_model * model, const dsv4_session_params * params, dsv4_session ** out_session) {
    return guarded([&] {
        require(model, "model");
        require(out_session, "out_session");
        *out_session = nullptr;
        const dsv4_session_params p = params ? *params : dsv4_session_default_params();
        *out_session = dsv4::create_session(model, p).release();
    });
}

void dsv4_session_free(dsv4_session * session) {
    delete session;
}

dsv4_status dsv4_session_eval_batch(dsv4_session * session, const dsv4_seq_batch * batch, int32_t n_seqs) {
    return guarded([&] {
        require(session, "session");
        require(batch, "batch");
        std::vector<dsv4::SeqRequest> req;
        for (int32_t i = 0; i < n_seqs; ++i) {
            req.push_back({batch[i].seq, batch[i].tokens, batch[i].n_tokens, batch[i].logits, batch[i].out_rows,
                           batch[i].mtp_logits});
        }
        dsv4::session_eval_batch(*session, req.data(), int64_t(req.size()));
    });
}

dsv4_status dsv4_session_eval(dsv4_session * session, int32_t seq, const int32_t * tokens, int64_t n_tokens, float * logits,
                              int64_t out_rows) {
    return guarded([&] {
        require(session, "session");
        require(tokens, "tokens");
        if (out_rows > 0) {
            require(logits, "logits");
        }
        const dsv4::SeqRequest req{seq, tokens, n_tokens, logits, out_rows, nullptr};
        dsv4::session_eval_batch(*session, &req, 1);
    });
}

dsv4_status dsv4_session_mtp_draft(dsv4_session * session, int32_t seq, int32_t token, int64_t offset,
                                   float * logits) {
    return guarded([&] {
        require(session, "session");
        require(logits, "logits");
        dsv4::session_mtp_draft(*session, seq, token, offset, logits);
    });
}

dsv4_status dsv4_session_truncate(dsv4_session * session, int32_t seq, int64_t n) {
    return guarded([&] {
        require(session, "session");
        dsv4::session_truncate(*session, seq, n);
    });
}

dsv4_status dsv4_session_copy_seq(dsv4_session * session, int32_t src, int32_t dst) {
    return guarded([&] {
        require(session, "session");
        dsv4::session_copy_seq(*session, src, dst);
    });
}

dsv4_status dsv4_session_reset(dsv4_session * session, int32_t seq) {
    return guarded([&] {
        require(session, "session");
        dsv4::session_reset(*session, seq);
    });
}

dsv4_status dsv4_session_n_past(const dsv4_session * session, int32_t seq, int64_t * out) {
    return guarded([&] {
        require(session, "session");
        require(out, "out");
        *out = dsv4::session_slot(*session, seq).n_past;
    });
}

dsv4_status dsv4_session_get_stats(const dsv4_session * session, dsv4_session_stats * out) {
    return guarded([&] {
        require(session, "session");
        require(out, "out");
        *out = dsv4::session_stats(*session);
    });
}

dsv4_status dsv4_session_tokens(const dsv4_session * session, int32_t seq, int32_t * out, int64_t capacity, int64_t * n) {
    return guarded([&] {
        require(session, "session");
        require(n, "n");
        const dsv4::SeqSlot & sl = dsv4::session_slot(*session, seq);
        *n = int64_t(sl.tokens.size());
        if (out != nullptr) {
            if (capacity < *n) {
                dsv4::fail(DSV4_ERR_INVALID_ARGUMENT, "capacity %lld is smaller than the %lld tokens", (long long) capacity,
                           (long long) *n);
            }
            std::copy(sl.tokens.begin(), sl.tokens.end(), out);
        }
    });
}

dsv4_status dsv4_session_state_size(const dsv4_session * session, int32_t seq, size_t * out) {
    return guarded([&] {
        require(session, "session");
        require(out, "out");
        *out = dsv4::session_state_size(*session, seq);
    });
}

dsv4_status dsv4_session_save_state(const dsv4_session * session, int32_t seq, void * dst, size_t capacity,
                                    size_t * written) {
    return guarded([&] {
        require(session, "session");
        require(dst, "dst");
        require(written, "written");
        *written = dsv4::session_save_state(*session, seq, static_cast<uint8_t *>(dst), capacity);
    });
}

dsv4_status dsv4_session_load_state(dsv4_session * session, int32_t seq, const void * src, size_t size) {
    return guarded([&] {
        require(session, "session");
        require(src, "src");
        dsv4::session_load_state(*session, seq, static_cast<const uint8_t *>(src), size);
    });
}

}  // extern "C"
