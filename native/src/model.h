// A validated model: the mapped GGUF, its hyperparameters and its weight table.
#pragma once

#include "dsv4.h"
#include "gguf_file.h"
#include "weights.h"

#include "ggml-backend.h"

#include <memory>
#include <string>
#include <vector>

struct dsv4_model {
    std::unique_ptr<dsv4::GgufFile> file;
    dsv4_hparams hp{};
    dsv4::Weights weights;
    ggml_context * ctx_meta = nullptr;        // tensor objects of the weights
    std::vector<ggml_backend_buffer_t> weights_bufs;  // host weights: each mapped file (part) itself, no copy
    std::vector<ggml_backend_buffer_t> copy_bufs;  // weights copied at open: CUDA, or CPU AMX/CPU_REPACK
    std::vector<dsv4_tensor_info> table;      // the file's tensors, in file (part, then file) order
    dsv4_model_params params{};
    uint64_t fingerprint = 0;                 // of the hparams and the tensor table (saved states)
    std::string load_note;                    // dsv4_model_load_note

    ~dsv4_model();
};

namespace dsv4 {

// FNV-1a, 64 bits (fingerprints and checksums of saved states; not cryptographic).
uint64_t fnv1a(const void * data, size_t n, uint64_t h = 0xcbf29ce484222325ull);

// Opens, parses and validates `path` (a GGUF, or any part of a split one); throws dsv4::Error.
std::unique_ptr<dsv4_model> open_model(const std::string & path, const dsv4_model_params & params);

}  // namespace dsv4
