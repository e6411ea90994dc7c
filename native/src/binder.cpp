#include "binder.h"

#include "error.h"

#include <cstdio>

namespace dsv4 {

std::string layer_name(const char * fmt, uint32_t il) {
    char buf[GGML_MAX_NAME + 16];
    std::snprintf(buf, sizeof(buf), fmt, int(il));
    return buf;
}

bool name_matches(const std::string & name, const char * pattern) {
    static const std::string il = "{il}";
    const std::string pat = pattern;
    const size_t at = pat.find(il);
    if (at == std::string::npos) {
        return name == pat;
    }
    const size_t tail = pat.size() - at - il.size();
    if (name.size() <= at + tail || name.compare(0, at, pat, 0, at) != 0 ||
        name.compare(name.size() - tail, tail, pat, at + il.size(), tail) != 0) {
        return false;
    }
    for (size_t i = at; i < name.size() - tail; ++i) {
        if (name[i] < '0' || name[i] > '9') {
            return false;
        }
    }
    return true;
}

namespace {

std::string shape_string(const int64_t * ne, size_t n) {
    std::string s = "{";
    for (size_t i = 0; i < n; ++i) {
        s += (i ? ", " : "") + std::to_string(ne[i]);
    }
    return s + "}";
}

bool dtype_allowed(DType d, ggml_type t) {
    switch (d) {
        case DType::F32: return t == GGML_TYPE_F32;
        case DType::I32: return t == GGML_TYPE_I32;
        case DType::FLOAT: return t == GGML_TYPE_F32 || t == GGML_TYPE_F16 || t == GGML_TYPE_BF16;
        case DType::WEIGHT:
            // q8_1 and q8_K are quantized but only as the activations' side of a dot product: ggml
            // can neither dequantize them nor multiply by them (a weight of that type crashes)
            return t == GGML_TYPE_F32 || t == GGML_TYPE_F16 || t == GGML_TYPE_BF16 ||
                   (ggml_is_quantized(t) && ggml_get_type_traits(t)->to_float != nullptr);
    }
    return false;
}

const char * dtype_text(DType d) {
    switch (d) {
        case DType::F32: return "f32";
        case DType::I32: return "i32";
        case DType::FLOAT: return "f32, f16 or bf16";
        case DType::WEIGHT: return "a float (f32, f16, bf16) or quantized ggml type other than q8_1 and q8_K";
    }
    return "?";
}

}  // namespace

WeightBinder::WeightBinder(const GgufFile & file, ggml_context * ctx)
    : file_(file), ctx_(ctx), used_(file.tensors().size(), false) {}

ggml_tensor * WeightBinder::bind(const std::string & name, DType dtype, Need need,
                                 std::initializer_list<int64_t> shape, const char * shape_text,
                                 std::initializer_list<int64_t> view) {
    const GgufTensorInfo * info = file_.find_tensor(name);
    if (info == nullptr) {
        if (need == Need::OPTIONAL) {
            return nullptr;
        }
        fail(DSV4_ERR_MISSING_TENSOR, "tensor '%s' is missing: the hyperparameters require it with shape %s = %s",
             name.c_str(), shape_string(shape.begin(), shape.size()).c_str(), shape_text);
    }
    // trailing dimensions of size 1 may be omitted in the file
    bool match = true;
    const int64_t * want = shape.begin();
    for (size_t d = 0; d < GGML_MAX_DIMS; ++d) {
        const int64_t w = d < shape.size() ? want[d] : 1;
        match = match && info->ne[d] == w;
    }
    if (!match) {
        fail(DSV4_ERR_TENSOR_SHAPE, "tensor '%s' has shape %s, but the hyperparameters imply %s = %s", name.c_str(),
             shape_string(info->ne, info->n_dims).c_str(), shape_string(shape.begin(), shape.size()).c_str(),
             shape_text);
    }
    if (!dtype_allowed(dtype, info->type)) {
        fail(DSV4_ERR_TENSOR_TYPE, "tensor '%s' has type %s; it must be %s", name.c_str(), ggml_type_name(info->type),
             dtype_text(dtype));
    }
    const size_t index = size_t(info - file_.tensors().data());
    used_[index] = true;

    const int64_t * ne = view.size() ? view.begin() : shape.begin();
    const int n_dims = int(view.size() ? view.size() : shape.size());
    ggml_tensor * t = ggml_new_tensor(ctx_, info->type, n_dims, ne);
    if (t == nullptr) {
        fail(DSV4_ERR_INTERNAL, "no room for tensor '%s' in the weight context", name.c_str());
    }
    if (ggml_nbytes(t) != info->nbytes) {
        fail(DSV4_ERR_INTERNAL, "tensor '%s': view %s does not cover its %llu bytes", name.c_str(),
             shape_string(ne, size_t(n_dims)).c_str(), (unsigned long long) info->nbytes);
    }
    ggml_set_name(t, name.c_str());
    bound_.push_back({t, info});
    return t;
}

void WeightBinder::check_all_used() const {
    for (size_t i = 0; i < used_.size(); ++i) {
        if (!used_[i] && foreign_family(file_.tensors()[i].name) == nullptr) {
            fail(DSV4_ERR_UNEXPECTED_TENSOR,
                 "the file holds tensor '%s', which this model's hyperparameters do not use "
                 "(a different architecture variant, or hparams that contradict the tensors?)",
                 printable(file_.tensors()[i].name).c_str());
        }
    }
}

}  // namespace dsv4
