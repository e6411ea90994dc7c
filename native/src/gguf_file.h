// A defensive GGUF reader: memory-maps the file, parses the header with a bounds check on
// every read, and reports each malformation as a dsv4::Error that names it (never an abort,
// never an allocation sized by an unchecked count).
#pragma once

#include "ggml.h"

#include <cstddef>
#include <cstdint>
#include <initializer_list>
#include <memory>
#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

namespace dsv4 {

enum class GgufType : uint32_t {
    U8 = 0, I8 = 1, U16 = 2, I16 = 3, U32 = 4, I32 = 5, F32 = 6, BOOL = 7,
    STRING = 8, ARRAY = 9, U64 = 10, I64 = 11, F64 = 12,
};

const char * gguf_type_name(GgufType type);

// `s` made safe for an error message: bytes outside printable ASCII become '?', cut at 80.
std::string printable(std::string_view s);

struct GgufValue {
    GgufType type = GgufType::U8;
    GgufType elem_type = GgufType::U8;       // arrays only
    uint64_t n = 0;                          // arrays only: element count
    const uint8_t * data = nullptr;          // scalars and fixed-size array elements (unaligned)
    std::string_view str;                    // STRING
    std::vector<std::string_view> strs;      // arrays of STRING
};

struct GgufTensorInfo {
    std::string name;
    ggml_type type = GGML_TYPE_F32;
    uint32_t n_dims = 0;
    int64_t ne[GGML_MAX_DIMS] = {1, 1, 1, 1};
    uint64_t offset = 0;   // absolute offset of the data in its file (GgufFile::data reads it)
    uint64_t nbytes = 0;
    uint32_t part = 0;     // the file holding it: 0, or its part of a split model (0-based)
};

// One mapped GGUF file: a whole model, or one part of a model split by llama.cpp's gguf-split
// (every part has its own header, tensor table and data section; only the first carries the
// model's metadata, the others just the split.* keys).
struct GgufPart {
    std::string path;
    int fd = -1;
    const uint8_t * map = nullptr;
    uint64_t size = 0;
    uint32_t version = 0;
    uint32_t alignment = 32;
    uint64_t data_offset = 0;
    std::vector<std::string> key_order;
    std::unordered_map<std::string, GgufValue> kv;
    std::vector<GgufTensorInfo> tensors;   // this part's, in its order

    GgufPart() = default;
    ~GgufPart();
    GgufPart(const GgufPart &) = delete;
    GgufPart & operator=(const GgufPart &) = delete;

    const GgufValue * find(std::string_view key) const;
};

// A model's GGUF: one file, or every part of a split model seen as one (the first part's
// metadata, the tensors of all parts in part order).
class GgufFile {
  public:
    // Opens and parses `path`: a single GGUF, or any part of a split model, whose other parts
    // are found by name (PREFIX-00001-of-00003.gguf …) and opened too. Throws dsv4::Error (IO,
    // NOT_GGUF, TRUNCATED, CORRUPT, BAD_KEY); an error in a part names that part.
    static std::unique_ptr<GgufFile> open(const std::string & path);
    GgufFile(const GgufFile &) = delete;
    GgufFile & operator=(const GgufFile &) = delete;

    const std::string & path() const { return parts_[0]->path; }  // the first part's
    uint32_t version() const { return parts_[0]->version; }
    uint32_t alignment() const { return parts_[0]->alignment; }
    size_t n_parts() const { return parts_.size(); }
    const GgufPart & part(size_t i) const { return *parts_[i]; }
    // The mapped bytes of a tensor of this file (in whichever part holds it).
    const uint8_t * data(const GgufTensorInfo & ti) const { return parts_[ti.part]->map + ti.offset; }

    const GgufValue * find(std::string_view key) const { return parts_[0]->find(key); }
    const std::vector<std::string> & keys() const { return parts_[0]->key_order; }
    const std::vector<GgufTensorInfo> & tensors() const { return tensors_; }
    const GgufTensorInfo * find_tensor(std::string_view name) const;

    // Typed getters used by the generated hparams reader. Integer getters accept any integer
    // type whose value fits; float getters accept F32 and F64. Missing required key:
    // DSV4_ERR_MISSING_KEY; wrong type or out-of-range value: DSV4_ERR_BAD_KEY.
    uint32_t get_u32(const char * key) const;
    uint32_t get_u32_or(const char * key, uint32_t fallback) const;
    float get_f32(const char * key) const;
    float get_f32_or(const char * key, float fallback) const;
    bool get_bool(const char * key) const;
    bool get_bool_or(const char * key, bool fallback) const;
    std::string_view get_str(const char * key) const;
    std::string_view get_str_or(const char * key, std::string_view fallback) const;
    void check_str_choice(const char * key, std::string_view value, std::initializer_list<const char *> choices) const;
    uint32_t get_str_array_len(const char * key) const;
    // An integer array of exactly n (or, with at_least, n or more) entries; the first n are
    // stored in out[0..n). Values outside `choices` (when non-empty) are rejected.
    void get_int_array(const char * key, uint32_t n, bool at_least, int32_t * out,
                       std::initializer_list<int32_t> choices) const;
    // Per-layer value: an array of exactly n entries, or one scalar repeated n times.
    // Returns false when the key is absent and !required.
    bool get_f32_per_layer(const char * key, uint32_t n, float * out, bool required) const;
    bool get_u32_per_layer(const char * key, uint32_t n, uint32_t * out, bool required) const;

  private:
    GgufFile() = default;
    void merge_tensors();
    const GgufValue & require(const char * key) const;

    std::vector<std::unique_ptr<GgufPart>> parts_;
    std::vector<GgufTensorInfo> tensors_;
    std::unordered_map<std::string, size_t> tensor_index_;
};

}  // namespace dsv4
