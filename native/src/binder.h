// Binding the tensors a model declares (native/generated/weights.cpp) to the tensors of a
// GGUF file: presence, shape and dtype checks, and creation of the ggml tensor objects.
#pragma once

#include "dsv4.h"
#include "gguf_file.h"
#include "weights.h"

#include <initializer_list>
#include <string>
#include <vector>

namespace dsv4 {

// Which ggml types a tensor may have (see codegen/dsl.py DType).
enum class DType { F32, I32, FLOAT, WEIGHT };

enum class Need { REQUIRED, OPTIONAL };

std::string layer_name(const char * fmt, uint32_t il);

// Whether `name` is `pattern`, where "{il}" in the pattern stands for a block number (decimal digits).
bool name_matches(const std::string & name, const char * pattern);

class WeightBinder {
  public:
    struct Bound {
        ggml_tensor * tensor;          // in the binder's (no_alloc) context, with the graph's shape
        const GgufTensorInfo * info;   // where its data is in the file
    };

    // `ctx` must have room for one tensor object per tensor of `file` (no_alloc).
    WeightBinder(const GgufFile & file, ggml_context * ctx);

    // Checks the named tensor against the declared shape and dtype and returns its ggml tensor
    // (viewed as `view` when non-empty). Absent and !required: returns nullptr.
    ggml_tensor * bind(const std::string & name, DType dtype, Need need, std::initializer_list<int64_t> shape,
                       const char * shape_text, std::initializer_list<int64_t> view);

    // Throws DSV4_ERR_UNEXPECTED_TENSOR if the file holds a tensor no declaration bound and no
    // foreign family (foreign_family) names.
    void check_all_used() const;

    const std::vector<Bound> & bound() const { return bound_; }

  private:
    const GgufFile & file_;
    ggml_context * ctx_;
    std::vector<bool> used_;
    std::vector<Bound> bound_;
};

// Generated from the DSL: binds every declared tensor of the model into `w`.
void bind_weights(const dsv4_hparams & hp, WeightBinder & b, Weights & w);

}  // namespace dsv4
