#include "gguf_file.h"

#include "error.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cmath>
#include <cstring>
#include <limits>

namespace dsv4 {

namespace {

constexpr uint64_t kMinKvBytes = 8 + 4 + 1;               // key length, type, smallest value
constexpr uint64_t kMinTensorInfoBytes = 8 + 4 + 8 + 4 + 8;  // name length, n_dims, ne0, type, offset
constexpr size_t kMaxTensorName = GGML_MAX_NAME - 1;
// A count or length needing more than this many bytes is corrupt, not a truncated download.
constexpr uint64_t kAbsurdBytes = uint64_t(1) << 40;
// Each metadata key, tensor description and string array entry costs memory beyond its bytes
// in the file (a hash map entry, a tensor object): these bound what a small hostile file can
// make us allocate, far above any real model (DeepSeek-V4: ~50 keys, ~1.4k tensors, 129k tokens).
constexpr uint64_t kMaxKeys = uint64_t(1) << 20;
constexpr uint64_t kMaxTensors = uint64_t(1) << 20;
constexpr uint64_t kMaxArrayStrings = uint64_t(1) << 24;

size_t fixed_size(GgufType t) {
    switch (t) {
        case GgufType::U8: case GgufType::I8: case GgufType::BOOL: return 1;
        case GgufType::U16: case GgufType::I16: return 2;
        case GgufType::U32: case GgufType::I32: case GgufType::F32: return 4;
        case GgufType::U64: case GgufType::I64: case GgufType::F64: return 8;
        default: return 0;
    }
}

bool valid_type(uint32_t t) { return t <= uint32_t(GgufType::F64); }

}  // namespace

std::string printable(std::string_view s) {
    std::string out;
    for (char c : s.substr(0, 80)) {
        out += (c >= 32 && c < 127) ? c : '?';
    }
    if (s.size() > 80) {
        out += "...";
    }
    return out;
}

namespace {

// A bounds-checked reader over the mapped file.
struct Cursor {
    const uint8_t * base;
    uint64_t size;
    uint64_t pos;

    void need(uint64_t n, const char * what) const {
        const uint64_t left = size - pos;
        if (n <= left) {
            return;
        }
        if (n > kAbsurdBytes) {
            fail(DSV4_ERR_CORRUPT, "corrupt GGUF: %s at byte %llu declares %llu bytes", what, (unsigned long long) pos,
                 (unsigned long long) n);
        }
        fail(DSV4_ERR_TRUNCATED, "truncated GGUF: the file ends at byte %llu while reading %s at byte %llu (%llu more bytes needed)",
             (unsigned long long) size, what, (unsigned long long) pos, (unsigned long long) (n - left));
    }

    template <typename T> T read(const char * what) {
        need(sizeof(T), what);
        T v;
        std::memcpy(&v, base + pos, sizeof(T));
        pos += sizeof(T);
        return v;
    }

    std::string_view read_str(const char * what) {
        const uint64_t n = read<uint64_t>(what);
        need(n, what);
        std::string_view s(reinterpret_cast<const char *>(base + pos), size_t(n));
        pos += n;
        return s;
    }

    // Checks that `count` items of at least `min_bytes` each can fit in what is left.
    void need_items(uint64_t count, uint64_t min_bytes, const char * what) const {
        const uint64_t left = size - pos;
        if (count > left / min_bytes) {
            const bool absurd = count > kAbsurdBytes / min_bytes;
            fail(absurd ? DSV4_ERR_CORRUPT : DSV4_ERR_TRUNCATED,
                 "%s GGUF: %llu %s at byte %llu cannot fit in the %llu bytes left in the file",
                 absurd ? "corrupt" : "truncated", (unsigned long long) count, what, (unsigned long long) pos,
                 (unsigned long long) left);
        }
    }
};

bool mul_overflows(uint64_t a, uint64_t b, uint64_t * out) {
    return __builtin_mul_overflow(a, b, out);
}

}  // namespace

const char * gguf_type_name(GgufType type) {
    switch (type) {
        case GgufType::U8: return "u8";
        case GgufType::I8: return "i8";
        case GgufType::U16: return "u16";
        case GgufType::I16: return "i16";
        case GgufType::U32: return "u32";
        case GgufType::I32: return "i32";
        case GgufType::F32: return "f32";
        case GgufType::BOOL: return "bool";
        case GgufType::STRING: return "string";
        case GgufType::ARRAY: return "array";
        case GgufType::U64: return "u64";
        case GgufType::I64: return "i64";
        case GgufType::F64: return "f64";
    }
    return "unknown";
}

std::unique_ptr<GgufFile> GgufFile::open(const std::string & path) {
    std::unique_ptr<GgufFile> f(new GgufFile());
    f->path_ = path;
    f->fd_ = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
    if (f->fd_ < 0) {
        fail(DSV4_ERR_IO, "cannot open '%s': %s", path.c_str(), std::strerror(errno));
    }
    struct stat st;
    if (fstat(f->fd_, &st) != 0) {
        fail(DSV4_ERR_IO, "cannot stat '%s': %s", path.c_str(), std::strerror(errno));
    }
    if (S_ISDIR(st.st_mode)) {
        fail(DSV4_ERR_IO, "'%s' is a directory, not a GGUF file", path.c_str());
    }
    if (!S_ISREG(st.st_mode)) {
        fail(DSV4_ERR_IO, "'%s' is not a regular file", path.c_str());
    }
    f->size_ = uint64_t(st.st_size);
    if (f->size_ < 4) {
        fail(DSV4_ERR_NOT_GGUF, "'%s' is not a GGUF file: it is only %llu bytes long", path.c_str(),
             (unsigned long long) f->size_);
    }
    void * m = mmap(nullptr, size_t(f->size_), PROT_READ, MAP_SHARED, f->fd_, 0);
    if (m == MAP_FAILED) {
        fail(DSV4_ERR_IO, "cannot map '%s': %s", path.c_str(), std::strerror(errno));
    }
    f->map_ = static_cast<const uint8_t *>(m);
    f->parse();
    return f;
}

GgufFile::~GgufFile() {
    if (map_ != nullptr) {
        munmap(const_cast<uint8_t *>(map_), size_t(size_));
    }
    if (fd_ >= 0) {
        ::close(fd_);
    }
}

void GgufFile::parse() {
    Cursor c{map_, size_, 0};
    if (std::memcmp(map_, "GGUF", 4) != 0) {
        fail(DSV4_ERR_NOT_GGUF, "'%s' is not a GGUF file (its first bytes are not the magic \"GGUF\")", path_.c_str());
    }
    c.pos = 4;
    version_ = c.read<uint32_t>("the GGUF version");
    if (version_ != 2 && version_ != 3) {
        fail(DSV4_ERR_CORRUPT, "unsupported GGUF version %u (this reader handles versions 2 and 3%s)", version_,
             (version_ & 0xffff) == 0 ? "; a big-endian file?" : "");
    }
    const uint64_t n_tensors = c.read<uint64_t>("the tensor count");
    const uint64_t n_kv = c.read<uint64_t>("the metadata key count");
    c.need_items(n_kv, kMinKvBytes, "metadata keys");
    if (n_kv > kMaxKeys) {
        fail(DSV4_ERR_CORRUPT, "corrupt GGUF: %llu metadata keys (this reader accepts at most %llu)",
             (unsigned long long) n_kv, (unsigned long long) kMaxKeys);
    }

    key_order_.reserve(size_t(n_kv));
    for (uint64_t i = 0; i < n_kv; ++i) {
        const std::string_view key = c.read_str("a metadata key");
        if (key.empty()) {
            fail(DSV4_ERR_CORRUPT, "corrupt GGUF: metadata key %llu has an empty name", (unsigned long long) i);
        }
        const std::string skey(key);
        const uint32_t t = c.read<uint32_t>("a metadata value type");
        if (!valid_type(t)) {
            fail(DSV4_ERR_CORRUPT, "corrupt GGUF: key '%s' has unknown value type %u", printable(key).c_str(), t);
        }
        GgufValue v;
        v.type = GgufType(t);
        if (v.type == GgufType::STRING) {
            v.str = c.read_str("a string value");
        } else if (v.type == GgufType::ARRAY) {
            const uint32_t et = c.read<uint32_t>("an array element type");
            if (!valid_type(et)) {
                fail(DSV4_ERR_CORRUPT, "corrupt GGUF: array '%s' has unknown element type %u", printable(key).c_str(),
                     et);
            }
            v.elem_type = GgufType(et);
            if (v.elem_type == GgufType::ARRAY) {
                fail(DSV4_ERR_CORRUPT, "corrupt GGUF: array '%s' holds arrays (nested arrays are not supported)",
                     printable(key).c_str());
            }
            v.n = c.read<uint64_t>("an array length");
            if (v.elem_type == GgufType::STRING) {
                c.need_items(v.n, 8, "array strings");
                if (v.n > kMaxArrayStrings) {
                    fail(DSV4_ERR_CORRUPT, "corrupt GGUF: array '%s' holds %llu strings (this reader accepts at most %llu)",
                         printable(key).c_str(), (unsigned long long) v.n, (unsigned long long) kMaxArrayStrings);
                }
                v.strs.reserve(size_t(v.n));
                for (uint64_t j = 0; j < v.n; ++j) {
                    v.strs.push_back(c.read_str("an array string"));
                }
            } else {
                const size_t es = fixed_size(v.elem_type);
                c.need_items(v.n, es, "array elements");
                v.data = map_ + c.pos;
                c.pos += v.n * es;
            }
        } else {
            const size_t es = fixed_size(v.type);
            c.need(es, "a metadata value");
            v.data = map_ + c.pos;
            c.pos += es;
        }
        if (!kv_.emplace(skey, std::move(v)).second) {
            fail(DSV4_ERR_CORRUPT, "corrupt GGUF: metadata key '%s' appears twice", printable(key).c_str());
        }
        key_order_.push_back(skey);
    }

    if (const GgufValue * a = find("general.alignment")) {
        if (a->type != GgufType::U32) {
            fail(DSV4_ERR_CORRUPT, "corrupt GGUF: general.alignment has type %s, expected u32", gguf_type_name(a->type));
        }
        uint32_t al;
        std::memcpy(&al, a->data, 4);
        // the GGUF specification requires a multiple of 8: every tensor then starts at an address
        // aligned for any element type (with 1, 2 or 4, f32 or i32 data would be read misaligned)
        if (al < 8 || (al & (al - 1)) != 0) {
            fail(DSV4_ERR_CORRUPT, "corrupt GGUF: general.alignment %u is not a power of two of at least 8", al);
        }
        alignment_ = al;
    }

    c.need_items(n_tensors, kMinTensorInfoBytes, "tensor descriptions");
    if (n_tensors > kMaxTensors) {
        fail(DSV4_ERR_CORRUPT, "corrupt GGUF: %llu tensors (this reader accepts at most %llu)",
             (unsigned long long) n_tensors, (unsigned long long) kMaxTensors);
    }
    tensors_.reserve(size_t(n_tensors));
    for (uint64_t i = 0; i < n_tensors; ++i) {
        GgufTensorInfo ti;
        const std::string_view name = c.read_str("a tensor name");
        if (name.empty()) {
            fail(DSV4_ERR_CORRUPT, "corrupt GGUF: tensor %llu has an empty name", (unsigned long long) i);
        }
        if (name.size() > kMaxTensorName) {
            fail(DSV4_ERR_CORRUPT, "corrupt GGUF: tensor name '%s' is longer than %zu bytes", printable(name).c_str(),
                 kMaxTensorName);
        }
        ti.name = std::string(name);
        const std::string tn_text = printable(name);  // names may hold control bytes: never print them raw
        const char * tn = tn_text.c_str();
        ti.n_dims = c.read<uint32_t>("a tensor rank");
        if (ti.n_dims == 0 || ti.n_dims > GGML_MAX_DIMS) {
            fail(DSV4_ERR_CORRUPT, "corrupt GGUF: tensor '%s' has %u dimensions (1 to %d allowed)", tn, ti.n_dims,
                 GGML_MAX_DIMS);
        }
        for (uint32_t d = 0; d < ti.n_dims; ++d) {
            const uint64_t ne = c.read<uint64_t>("a tensor dimension");
            if (ne > uint64_t(std::numeric_limits<int64_t>::max())) {
                fail(DSV4_ERR_CORRUPT, "corrupt GGUF: tensor '%s' dimension %u is %llu (negative or too large)", tn, d,
                     (unsigned long long) ne);
            }
            ti.ne[d] = int64_t(ne);
        }
        const uint32_t type = c.read<uint32_t>("a tensor type");
        if (type >= GGML_TYPE_COUNT || ggml_blck_size(ggml_type(type)) == 0 || ggml_type_size(ggml_type(type)) == 0) {
            fail(DSV4_ERR_CORRUPT, "corrupt GGUF: tensor '%s' has unknown or unsupported ggml type %u", tn, type);
        }
        ti.type = ggml_type(type);
        const uint64_t rel = c.read<uint64_t>("a tensor data offset");

        uint64_t n_elem = 1;
        for (int d = 0; d < GGML_MAX_DIMS; ++d) {
            if (mul_overflows(n_elem, uint64_t(ti.ne[d]), &n_elem) || n_elem > uint64_t(std::numeric_limits<int64_t>::max())) {
                fail(DSV4_ERR_CORRUPT, "corrupt GGUF: tensor '%s' has too many elements (the dimensions overflow)", tn);
            }
        }
        const int64_t blck = ggml_blck_size(ti.type);
        if (ti.ne[0] % blck != 0) {
            fail(DSV4_ERR_CORRUPT, "corrupt GGUF: tensor '%s' of type %s has %lld columns, not a multiple of its block size %lld",
                 tn, ggml_type_name(ti.type), (long long) ti.ne[0], (long long) blck);
        }
        uint64_t nbytes = uint64_t(ti.ne[0] / blck) * ggml_type_size(ti.type);
        for (int d = 1; d < GGML_MAX_DIMS; ++d) {
            if (mul_overflows(nbytes, uint64_t(ti.ne[d]), &nbytes)) {
                fail(DSV4_ERR_CORRUPT, "corrupt GGUF: tensor '%s' is too large (its byte size overflows)", tn);
            }
        }
        ti.nbytes = nbytes;
        if (rel % alignment_ != 0) {
            fail(DSV4_ERR_CORRUPT, "corrupt GGUF: tensor '%s' data offset %llu is not a multiple of the alignment %u", tn,
                 (unsigned long long) rel, alignment_);
        }
        ti.offset = rel;  // made absolute below, once the data section start is known
        if (!tensor_index_.emplace(ti.name, tensors_.size()).second) {
            fail(DSV4_ERR_CORRUPT, "corrupt GGUF: tensor '%s' appears twice", tn);
        }
        tensors_.push_back(std::move(ti));
    }

    // the data section starts at the next multiple of the alignment
    const uint64_t pad = (alignment_ - c.pos % alignment_) % alignment_;
    data_offset_ = c.pos + pad;
    for (GgufTensorInfo & ti : tensors_) {
        uint64_t begin, end;
        if (__builtin_add_overflow(data_offset_, ti.offset, &begin) || __builtin_add_overflow(begin, ti.nbytes, &end)) {
            fail(DSV4_ERR_CORRUPT, "corrupt GGUF: tensor '%s' data offset overflows", printable(ti.name).c_str());
        }
        if (end > size_) {
            const bool absurd = end > kAbsurdBytes;
            fail(absurd ? DSV4_ERR_CORRUPT : DSV4_ERR_TRUNCATED,
                 "%s GGUF: tensor '%s' data [%llu, %llu) extends past the end of the file (%llu bytes)",
                 absurd ? "corrupt" : "truncated", printable(ti.name).c_str(), (unsigned long long) begin,
                 (unsigned long long) end, (unsigned long long) size_);
        }
        ti.offset = begin;
    }
}

const GgufValue * GgufFile::find(std::string_view key) const {
    auto it = kv_.find(std::string(key));
    return it == kv_.end() ? nullptr : &it->second;
}

const GgufTensorInfo * GgufFile::find_tensor(std::string_view name) const {
    auto it = tensor_index_.find(std::string(name));
    return it == tensor_index_.end() ? nullptr : &tensors_[it->second];
}

const GgufValue & GgufFile::require(const char * key) const {
    const GgufValue * v = find(key);
    if (v == nullptr) {
        fail(DSV4_ERR_MISSING_KEY, "required metadata key '%s' is missing", key);
    }
    return *v;
}

namespace {

bool is_int(GgufType t) {
    switch (t) {
        case GgufType::U8: case GgufType::I8: case GgufType::U16: case GgufType::I16:
        case GgufType::U32: case GgufType::I32: case GgufType::U64: case GgufType::I64: return true;
        default: return false;
    }
}

// Reads element `i` of integer type `t` at `p` as a (signed or unsigned) 128-bit-safe pair.
struct IntValue {
    bool negative;
    uint64_t magnitude;
};

IntValue read_int(GgufType t, const uint8_t * p) {
    switch (t) {
        case GgufType::U8: return {false, *p};
        case GgufType::I8: { int8_t v; std::memcpy(&v, p, 1); return {v < 0, uint64_t(v < 0 ? -int64_t(v) : v)}; }
        case GgufType::U16: { uint16_t v; std::memcpy(&v, p, 2); return {false, v}; }
        case GgufType::I16: { int16_t v; std::memcpy(&v, p, 2); return {v < 0, uint64_t(v < 0 ? -int64_t(v) : v)}; }
        case GgufType::U32: { uint32_t v; std::memcpy(&v, p, 4); return {false, v}; }
        case GgufType::I32: { int32_t v; std::memcpy(&v, p, 4); return {v < 0, uint64_t(v < 0 ? -int64_t(v) : v)}; }
        case GgufType::U64: { uint64_t v; std::memcpy(&v, p, 8); return {false, v}; }
        case GgufType::I64: {
            int64_t v;
            std::memcpy(&v, p, 8);
            return {v < 0, v < 0 ? uint64_t(0) - uint64_t(v) : uint64_t(v)};
        }
        default: return {false, 0};
    }
}

uint32_t to_u32(const char * key, GgufType t, const uint8_t * p) {
    const IntValue v = read_int(t, p);
    if (v.negative || v.magnitude > std::numeric_limits<uint32_t>::max()) {
        fail(DSV4_ERR_BAD_KEY, "metadata key '%s' has value %s%llu, outside the range of an unsigned 32-bit integer",
             key, v.negative ? "-" : "", (unsigned long long) v.magnitude);
    }
    return uint32_t(v.magnitude);
}

int32_t to_i32(const char * key, GgufType t, const uint8_t * p) {
    const IntValue v = read_int(t, p);
    if (v.magnitude > (v.negative ? uint64_t(1) << 31 : uint64_t(std::numeric_limits<int32_t>::max()))) {
        fail(DSV4_ERR_BAD_KEY, "metadata key '%s' has value %s%llu, outside the range of a 32-bit integer", key,
             v.negative ? "-" : "", (unsigned long long) v.magnitude);
    }
    return v.negative ? int32_t(-int64_t(v.magnitude)) : int32_t(v.magnitude);
}

float to_f32(const char * key, GgufType t, const uint8_t * p) {
    double d;
    if (t == GgufType::F32) {
        float f;
        std::memcpy(&f, p, 4);
        d = f;
    } else if (t == GgufType::F64) {
        std::memcpy(&d, p, 8);
    } else {
        fail(DSV4_ERR_BAD_KEY, "metadata key '%s' has type %s, expected a float", key, gguf_type_name(t));
    }
    if (!std::isfinite(d) || std::fabs(d) > std::numeric_limits<float>::max()) {
        fail(DSV4_ERR_BAD_KEY, "metadata key '%s' has the non-finite value %g", key, d);
    }
    return float(d);
}

}  // namespace

uint32_t GgufFile::get_u32(const char * key) const {
    const GgufValue & v = require(key);
    if (!is_int(v.type)) {
        fail(DSV4_ERR_BAD_KEY, "metadata key '%s' has type %s, expected an unsigned integer", key, gguf_type_name(v.type));
    }
    return to_u32(key, v.type, v.data);
}

uint32_t GgufFile::get_u32_or(const char * key, uint32_t fallback) const {
    return find(key) ? get_u32(key) : fallback;
}

float GgufFile::get_f32(const char * key) const {
    const GgufValue & v = require(key);
    return to_f32(key, v.type, v.data);
}

float GgufFile::get_f32_or(const char * key, float fallback) const {
    return find(key) ? get_f32(key) : fallback;
}

bool GgufFile::get_bool(const char * key) const {
    const GgufValue & v = require(key);
    if (v.type != GgufType::BOOL) {
        fail(DSV4_ERR_BAD_KEY, "metadata key '%s' has type %s, expected bool", key, gguf_type_name(v.type));
    }
    if (*v.data > 1) {
        fail(DSV4_ERR_BAD_KEY, "metadata key '%s' holds the byte %u, not a bool (0 or 1)", key, unsigned(*v.data));
    }
    return *v.data != 0;
}

bool GgufFile::get_bool_or(const char * key, bool fallback) const {
    return find(key) ? get_bool(key) : fallback;
}

std::string_view GgufFile::get_str(const char * key) const {
    const GgufValue & v = require(key);
    if (v.type != GgufType::STRING) {
        fail(DSV4_ERR_BAD_KEY, "metadata key '%s' has type %s, expected string", key, gguf_type_name(v.type));
    }
    return v.str;
}

std::string_view GgufFile::get_str_or(const char * key, std::string_view fallback) const {
    return find(key) ? get_str(key) : fallback;
}

void GgufFile::check_str_choice(const char * key, std::string_view value,
                                std::initializer_list<const char *> choices) const {
    std::string allowed;
    for (const char * ch : choices) {
        if (value == ch) {
            return;
        }
        allowed += allowed.empty() ? "" : ", ";
        allowed += "'" + std::string(ch) + "'";
    }
    fail(DSV4_ERR_BAD_KEY, "metadata key '%s' is '%s'; supported: %s", key, printable(value).c_str(), allowed.c_str());
}

uint32_t GgufFile::get_str_array_len(const char * key) const {
    const GgufValue & v = require(key);
    if (v.type != GgufType::ARRAY || v.elem_type != GgufType::STRING) {
        fail(DSV4_ERR_BAD_KEY, "metadata key '%s' has type %s%s%s, expected an array of strings", key,
             gguf_type_name(v.type), v.type == GgufType::ARRAY ? " of " : "",
             v.type == GgufType::ARRAY ? gguf_type_name(v.elem_type) : "");
    }
    if (v.n > std::numeric_limits<uint32_t>::max()) {
        fail(DSV4_ERR_BAD_KEY, "metadata key '%s' has %llu entries (too many)", key, (unsigned long long) v.n);
    }
    return uint32_t(v.n);
}

void GgufFile::get_int_array(const char * key, uint32_t n, bool at_least, int32_t * out,
                             std::initializer_list<int32_t> choices) const {
    const GgufValue & v = require(key);
    if (v.type != GgufType::ARRAY || !is_int(v.elem_type)) {
        fail(DSV4_ERR_BAD_KEY, "metadata key '%s' has type %s%s%s, expected an array of integers", key,
             gguf_type_name(v.type), v.type == GgufType::ARRAY ? " of " : "",
             v.type == GgufType::ARRAY ? gguf_type_name(v.elem_type) : "");
    }
    if (at_least ? v.n < n : v.n != n) {
        fail(DSV4_ERR_BAD_KEY, "metadata key '%s' has %llu entries, expected %s%u (one per block)", key,
             (unsigned long long) v.n, at_least ? "at least " : "", n);
    }
    const size_t es = fixed_size(v.elem_type);
    for (uint32_t i = 0; i < n; ++i) {
        out[i] = to_i32(key, v.elem_type, v.data + size_t(i) * es);
        if (choices.size() > 0) {
            bool ok = false;
            std::string allowed;
            for (int32_t ch : choices) {
                ok = ok || out[i] == ch;
                allowed += (allowed.empty() ? "" : ", ") + std::to_string(ch);
            }
            if (!ok) {
                fail(DSV4_ERR_BAD_KEY, "metadata key '%s' entry %u is %d; supported values: %s", key, i, out[i],
                     allowed.c_str());
            }
        }
    }
}

bool GgufFile::get_f32_per_layer(const char * key, uint32_t n, float * out, bool required) const {
    const GgufValue * v = find(key);
    if (v == nullptr) {
        if (required) {
            require(key);
        }
        return false;
    }
    if (v->type == GgufType::ARRAY) {
        if (v->n != n) {
            fail(DSV4_ERR_BAD_KEY, "metadata key '%s' has %llu entries, expected %u (one per block) or a single value",
                 key, (unsigned long long) v->n, n);
        }
        const size_t es = fixed_size(v->elem_type);
        if (es == 0) {
            fail(DSV4_ERR_BAD_KEY, "metadata key '%s' is an array of %s, expected floats", key,
                 gguf_type_name(v->elem_type));
        }
        for (uint32_t i = 0; i < n; ++i) {
            out[i] = to_f32(key, v->elem_type, v->data + size_t(i) * es);
        }
    } else {
        const float x = to_f32(key, v->type, v->data);
        for (uint32_t i = 0; i < n; ++i) {
            out[i] = x;
        }
    }
    return true;
}

bool GgufFile::get_u32_per_layer(const char * key, uint32_t n, uint32_t * out, bool required) const {
    const GgufValue * v = find(key);
    if (v == nullptr) {
        if (required) {
            require(key);
        }
        return false;
    }
    if (v->type == GgufType::ARRAY) {
        if (v->n != n) {
            fail(DSV4_ERR_BAD_KEY, "metadata key '%s' has %llu entries, expected %u (one per block) or a single value",
                 key, (unsigned long long) v->n, n);
        }
        if (!is_int(v->elem_type)) {
            fail(DSV4_ERR_BAD_KEY, "metadata key '%s' is an array of %s, expected integers", key,
                 gguf_type_name(v->elem_type));
        }
        const size_t es = fixed_size(v->elem_type);
        for (uint32_t i = 0; i < n; ++i) {
            out[i] = to_u32(key, v->elem_type, v->data + size_t(i) * es);
        }
    } else {
        if (!is_int(v->type)) {
            fail(DSV4_ERR_BAD_KEY, "metadata key '%s' has type %s, expected an unsigned integer", key,
                 gguf_type_name(v->type));
        }
        const uint32_t x = to_u32(key, v->type, v->data);
        for (uint32_t i = 0; i < n; ++i) {
            out[i] = x;
        }
    }
    return true;
}

}  // namespace dsv4
