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

namespace {

// Opens and maps `path` into `p` (read-only, shared: the weights are read in place).
void map_part(GgufPart & p, const std::string & path) {
    p.path = path;
    p.fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
    if (p.fd < 0) {
        fail(DSV4_ERR_IO, "cannot open '%s': %s", path.c_str(), std::strerror(errno));
    }
    struct stat st;
    if (fstat(p.fd, &st) != 0) {
        fail(DSV4_ERR_IO, "cannot stat '%s': %s", path.c_str(), std::strerror(errno));
    }
    if (S_ISDIR(st.st_mode)) {
        fail(DSV4_ERR_IO, "'%s' is a directory, not a GGUF file", path.c_str());
    }
    if (!S_ISREG(st.st_mode)) {
        fail(DSV4_ERR_IO, "'%s' is not a regular file", path.c_str());
    }
    p.size = uint64_t(st.st_size);
    if (p.size < 4) {
        fail(DSV4_ERR_NOT_GGUF, "'%s' is not a GGUF file: it is only %llu bytes long", path.c_str(),
             (unsigned long long) p.size);
    }
    void * m = mmap(nullptr, size_t(p.size), PROT_READ, MAP_SHARED, p.fd, 0);
    if (m == MAP_FAILED) {
        fail(DSV4_ERR_IO, "cannot map '%s': %s", path.c_str(), std::strerror(errno));
    }
    p.map = static_cast<const uint8_t *>(m);
}

// Parses the header and tensor table of the mapped file `p`, checking every read and every
// tensor's data range against the file.
void parse_part(GgufPart & p) {
    std::unordered_map<std::string, size_t> tensor_index;
    Cursor c{p.map, p.size, 0};
    if (std::memcmp(p.map, "GGUF", 4) != 0) {
        fail(DSV4_ERR_NOT_GGUF, "'%s' is not a GGUF file (its first bytes are not the magic \"GGUF\")", p.path.c_str());
    }
    c.pos = 4;
    p.version = c.read<uint32_t>("the GGUF version");
    if (p.version != 2 && p.version != 3) {
        fail(DSV4_ERR_CORRUPT, "unsupported GGUF version %u (this reader handles versions 2 and 3%s)", p.version,
             (p.version & 0xffff) == 0 ? "; a big-endian file?" : "");
    }
    const uint64_t n_tensors = c.read<uint64_t>("the tensor count");
    const uint64_t n_kv = c.read<uint64_t>("the metadata key count");
    c.need_items(n_kv, kMinKvBytes, "metadata keys");
    if (n_kv > kMaxKeys) {
        fail(DSV4_ERR_CORRUPT, "corrupt GGUF: %llu metadata keys (this reader accepts at most %llu)",
             (unsigned long long) n_kv, (unsigned long long) kMaxKeys);
    }

    p.key_order.reserve(size_t(n_kv));
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
                v.data = p.map + c.pos;
                c.pos += v.n * es;
            }
        } else {
            const size_t es = fixed_size(v.type);
            c.need(es, "a metadata value");
            v.data = p.map + c.pos;
            c.pos += es;
        }
        if (!p.kv.emplace(skey, std::move(v)).second) {
            fail(DSV4_ERR_CORRUPT, "corrupt GGUF: metadata key '%s' appears twice", printable(key).c_str());
        }
        p.key_order.push_back(skey);
    }

    if (const GgufValue * a = p.find("general.alignment")) {
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
        p.alignment = al;
    }

    c.need_items(n_tensors, kMinTensorInfoBytes, "tensor descriptions");
    if (n_tensors > kMaxTensors) {
        fail(DSV4_ERR_CORRUPT, "corrupt GGUF: %llu tensors (this reader accepts at most %llu)",
             (unsigned long long) n_tensors, (unsigned long long) kMaxTensors);
    }
    p.tensors.reserve(size_t(n_tensors));
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
        if (rel % p.alignment != 0) {
            fail(DSV4_ERR_CORRUPT, "corrupt GGUF: tensor '%s' data offset %llu is not a multiple of the alignment %u", tn,
                 (unsigned long long) rel, p.alignment);
        }
        ti.offset = rel;  // made absolute below, once the data section start is known
        if (!tensor_index.emplace(ti.name, p.tensors.size()).second) {
            fail(DSV4_ERR_CORRUPT, "corrupt GGUF: tensor '%s' appears twice", tn);
        }
        p.tensors.push_back(std::move(ti));
    }

    // the data section starts at the next multiple of the alignment
    const uint64_t pad = (p.alignment - c.pos % p.alignment) % p.alignment;
    p.data_offset = c.pos + pad;
    for (GgufTensorInfo & ti : p.tensors) {
        uint64_t begin, end;
        if (__builtin_add_overflow(p.data_offset, ti.offset, &begin) || __builtin_add_overflow(begin, ti.nbytes, &end)) {
            fail(DSV4_ERR_CORRUPT, "corrupt GGUF: tensor '%s' data offset overflows", printable(ti.name).c_str());
        }
        if (end > p.size) {
            const bool absurd = end > kAbsurdBytes;
            fail(absurd ? DSV4_ERR_CORRUPT : DSV4_ERR_TRUNCATED,
                 "%s GGUF: tensor '%s' data [%llu, %llu) extends past the end of the file (%llu bytes)",
                 absurd ? "corrupt" : "truncated", printable(ti.name).c_str(), (unsigned long long) begin,
                 (unsigned long long) end, (unsigned long long) p.size);
        }
        ti.offset = begin;
    }
}

}  // namespace

GgufPart::~GgufPart() {
    if (map != nullptr) {
        munmap(const_cast<uint8_t *>(map), size_t(size));
    }
    if (fd >= 0) {
        ::close(fd);
    }
}

const GgufValue * GgufPart::find(std::string_view key) const {
    auto it = kv.find(std::string(key));
    return it == kv.end() ? nullptr : &it->second;
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

// --- split models (llama.cpp's gguf-split format) ------------------------------------------------

namespace {

// llama.cpp names the parts PREFIX-00001-of-00003.gguf … PREFIX-00003-of-00003.gguf
// (llama_split_path: numbered from 1, five digits each).
constexpr size_t kSplitSuffixLen = 20;  // "-NNNNN-of-MMMMM.gguf"

struct SplitName {
    std::string prefix;
    uint32_t no = 0;  // from 1, as in the name
    uint32_t count = 0;
};

bool parse_split_name(const std::string & path, SplitName & out) {
    if (path.size() <= kSplitSuffixLen) {
        return false;
    }
    const char * suffix = path.c_str() + path.size() - kSplitSuffixLen;
    const char * pattern = "-#####-of-#####.gguf";
    uint32_t numbers[2] = {0, 0};
    for (size_t i = 0; i < kSplitSuffixLen; ++i) {
        if (pattern[i] != '#') {
            if (suffix[i] != pattern[i]) {
                return false;
            }
        } else if (suffix[i] < '0' || suffix[i] > '9') {
            return false;
        } else {
            uint32_t & n = numbers[i < 6 ? 0 : 1];
            n = n * 10 + uint32_t(suffix[i] - '0');
        }
    }
    if (numbers[0] == 0 || numbers[0] > numbers[1]) {
        return false;  // not a name gguf-split writes
    }
    out.prefix = path.substr(0, path.size() - kSplitSuffixLen);
    out.no = numbers[0];
    out.count = numbers[1];
    return true;
}

std::string split_path(const SplitName & name, uint32_t no) {
    return name.prefix + format("-%05u-of-%05u.gguf", no, name.count);
}

// Runs `fn`; a dsv4::Error it throws gets `context` (which names the file) before its message.
template <typename F> void with_context(const std::string & context, F && fn) {
    try {
        fn();
    } catch (const Error & e) {
        throw Error(e.status(), context + e.what());
    }
}

// A part's split keys as llama.cpp writes them: split.no (u16, from 0), split.count (u16) and
// split.tensors.count (i32, the tensors of all parts); any integer type whose value fits is read.
struct SplitKeys {
    bool present = false;  // split.no and split.count are there
    uint32_t no = 0;
    uint32_t count = 1;
    bool has_total = false;
    uint32_t total = 0;
};

uint32_t split_key(const GgufPart & p, const char * key, bool & present) {
    const GgufValue * v = p.find(key);
    present = v != nullptr;
    if (v == nullptr) {
        return 0;
    }
    if (!is_int(v->type)) {
        fail(DSV4_ERR_BAD_KEY, "'%s': metadata key '%s' has type %s, expected an integer", p.path.c_str(), key,
             gguf_type_name(v->type));
    }
    uint32_t value = 0;
    with_context(format("'%s': ", p.path.c_str()), [&] { value = to_u32(key, v->type, v->data); });
    return value;
}

SplitKeys read_split_keys(const GgufPart & p) {
    SplitKeys k;
    bool has_no = false, has_count = false;
    k.no = split_key(p, "split.no", has_no);
    k.count = split_key(p, "split.count", has_count);
    k.total = split_key(p, "split.tensors.count", k.has_total);
    if (!has_no && !has_count) {
        k.count = 1;
        return k;
    }
    if (!has_no || !has_count) {
        fail(DSV4_ERR_CORRUPT, "'%s' has the split key '%s' but not '%s'", p.path.c_str(),
             has_no ? "split.no" : "split.count", has_no ? "split.count" : "split.no");
    }
    if (k.count == 0 || k.no >= k.count) {
        fail(DSV4_ERR_CORRUPT, "'%s' says it is part %u (split.no, from 0) of %u (split.count)", p.path.c_str(), k.no,
             k.count);
    }
    k.present = true;
    return k;
}

// Opens, maps and parses one file; errors of the parse (which know offsets, not files) get
// `context` before them.
std::unique_ptr<GgufPart> open_part(const std::string & path, const std::string & map_context,
                                    const std::string & parse_context) {
    auto p = std::make_unique<GgufPart>();
    with_context(map_context, [&] { map_part(*p, path); });
    with_context(parse_context, [&] { parse_part(*p); });
    return p;
}

std::string part_context(const SplitName & name, uint32_t no, const std::string & path) {
    return format("split GGUF part %u of %u '%s': ", no, name.count, path.c_str());
}

// Opens the other parts of the split model `given` belongs to, by name, and checks that each is
// the part its name says, of the same set.
std::vector<std::unique_ptr<GgufPart>> open_split(std::unique_ptr<GgufPart> given, const SplitName & name) {
    std::vector<std::unique_ptr<GgufPart>> parts(name.count);
    parts[name.no - 1] = std::move(given);
    for (uint32_t i = 0; i < name.count; ++i) {
        if (parts[i] == nullptr) {
            const std::string path = split_path(name, i + 1);
            parts[i] = open_part(path, format("split GGUF part %u of %u: ", i + 1, name.count),
                                  part_context(name, i + 1, path));
        }
        const GgufPart & p = *parts[i];
        const SplitKeys k = read_split_keys(p);
        if (!k.present) {
            fail(DSV4_ERR_CORRUPT,
                 "split GGUF part %u of %u '%s' has no split.no and split.count keys: it is not a part of a split model",
                 i + 1, name.count, p.path.c_str());
        }
        if (k.no != i || k.count != name.count) {
            fail(DSV4_ERR_CORRUPT,
                 "split GGUF part %u of %u '%s' says it is part %u of %u (split.no %u, split.count %u): a renamed, "
                 "duplicated or foreign part", i + 1, name.count, p.path.c_str(), k.no + 1, k.count, k.no, k.count);
        }
    }
    // the parts of one split agree on the tensors of the whole (a part of another model or of
    // another split of this one usually does not)
    const SplitKeys first = read_split_keys(*parts[0]);
    for (uint32_t i = 1; i < name.count; ++i) {
        const SplitKeys k = read_split_keys(*parts[i]);
        if (first.has_total && k.has_total && k.total != first.total) {
            fail(DSV4_ERR_CORRUPT,
                 "split GGUF part %u of %u '%s' belongs to a split of %u tensors (split.tensors.count), but part 1 "
                 "'%s' to one of %u: a part of another split model", i + 1, name.count, parts[i]->path.c_str(), k.total,
                 parts[0]->path.c_str(), first.total);
        }
    }
    return parts;
}

}  // namespace

std::unique_ptr<GgufFile> GgufFile::open(const std::string & path) {
    std::unique_ptr<GgufFile> f(new GgufFile());
    SplitName name;
    const bool split_named = parse_split_name(path, name);
    // a plain file reports its malformations as it always has; a part's name the part
    std::unique_ptr<GgufPart> given = open_part(path, "", split_named ? part_context(name, name.no, path) : "");
    const SplitKeys keys = read_split_keys(*given);
    if (keys.count > 1) {
        if (!split_named) {
            fail(DSV4_ERR_CORRUPT,
                 "'%s' is part %u of a model split into %u files (split.no, split.count), but its name does not end "
                 "in -%05u-of-%05u.gguf, which names the other parts (rename the parts as gguf-split wrote them)",
                 path.c_str(), keys.no + 1, keys.count, keys.no + 1, keys.count);
        }
        f->parts_ = open_split(std::move(given), name);
    } else {
        f->parts_.push_back(std::move(given));
    }
    f->merge_tensors();
    return f;
}

// One table of the tensors of every part, in part order; each name once across the parts.
void GgufFile::merge_tensors() {
    size_t n = 0;
    std::string per_part;  // "part 1: 31, part 2: 18, ...", for the error below
    for (size_t ip = 0; ip < parts_.size(); ++ip) {
        n += parts_[ip]->tensors.size();
        if (ip < 16) {
            per_part += format("%spart %zu: %zu", ip ? ", " : "", ip + 1, parts_[ip]->tensors.size());
        }
    }
    per_part += parts_.size() > 16 ? ", ..." : "";
    tensors_.reserve(n);
    tensor_index_.reserve(n);
    for (uint32_t ip = 0; ip < uint32_t(parts_.size()); ++ip) {
        for (GgufTensorInfo & ti : parts_[ip]->tensors) {
            ti.part = ip;
            const auto [it, fresh] = tensor_index_.emplace(ti.name, tensors_.size());
            if (!fresh) {
                const uint32_t other = tensors_[it->second].part;
                fail(DSV4_ERR_CORRUPT, "split GGUF part %u of %zu '%s' holds tensor '%s', which part %u '%s' holds too",
                     ip + 1, parts_.size(), parts_[ip]->path.c_str(), printable(ti.name).c_str(), other + 1,
                     parts_[other]->path.c_str());
            }
            tensors_.push_back(std::move(ti));
        }
        parts_[ip]->tensors.clear();  // moved into the table above
    }
    const SplitKeys keys = read_split_keys(*parts_[0]);
    if (keys.present && keys.has_total && keys.total != tensors_.size()) {
        fail(DSV4_ERR_CORRUPT, "split GGUF '%s': split.tensors.count says the model has %u tensors, but its %zu part%s "
             "hold%s %zu (%s; a part from another split?)", parts_[0]->path.c_str(), keys.total, parts_.size(),
             parts_.size() == 1 ? "" : "s", parts_.size() == 1 ? "s" : "", tensors_.size(), per_part.c_str());
    }
}

}  // namespace dsv4
