#include "session.h"

#include "error.h"
#include "slot_state.h"

#include <cstring>
#include <vector>

namespace dsv4 {

// --- saved states -------------------------------------------------------------------------------
// One sequence, in a form that depends only on the sequence (not on the session's n_ctx, slots
// or ring slack, nor on how the sequence was computed: batched, rolled back or copied): header,
// the ring rows it needs to go on (ring by ring in layer order, positions ascending), the cache
// rows of its completed blocks, its tokens, then an FNV-1a checksum of everything before it.

namespace {

constexpr char kStateMagic[8] = {'D', 'S', 'V', '4', 'S', 'T', 'A', 'T'};
constexpr uint32_t kStateVersion = 2;

struct StateHeader {
    char magic[8];
    uint32_t version;
    int32_t cache_type;
    uint64_t model_fingerprint;
    int64_t n_past;
    uint64_t ring_bytes;
    uint64_t cache_bytes;
};

}  // namespace

size_t session_state_size(const dsv4_session & s, int32_t seq) {
    const SeqSlot & sl = session_slot(s, seq);
    return sizeof(StateHeader) + rings_get(s, seq, sl.n_past, 0, nullptr) + caches_io(s, seq, sl.n_past, nullptr, nullptr) +
           sl.tokens.size() * sizeof(int32_t) + sizeof(uint64_t);
}

size_t session_save_state(const dsv4_session & s, int32_t seq, uint8_t * dst, size_t capacity) {
    const size_t need = session_state_size(s, seq);
    if (capacity < need) {
        fail(DSV4_ERR_INVALID_ARGUMENT, "the state needs %zu bytes, the buffer has %zu", need, capacity);
    }
    const SeqSlot & sl = s.slots[size_t(seq)];
    StateHeader h{};
    std::memcpy(h.magic, kStateMagic, sizeof(h.magic));
    h.version = kStateVersion;
    h.cache_type = s.params.cache_type;
    h.model_fingerprint = s.model->fingerprint;
    h.n_past = sl.n_past;
    uint8_t * p = dst + sizeof(h);
    h.ring_bytes = rings_get(s, seq, sl.n_past, 0, p);
    p += h.ring_bytes;
    h.cache_bytes = caches_io(s, seq, sl.n_past, p, nullptr);
    p += h.cache_bytes;
    std::memcpy(dst, &h, sizeof(h));
    std::memcpy(p, sl.tokens.data(), sl.tokens.size() * sizeof(int32_t));
    p += sl.tokens.size() * sizeof(int32_t);
    const uint64_t sum = fnv1a(dst, size_t(p - dst));
    std::memcpy(p, &sum, sizeof(sum));
    return need;
}

void session_load_state(dsv4_session & s, int32_t seq, const uint8_t * src, size_t size) {
    check_seq(s, seq, "load_state");
    StateHeader h{};
    if (size < sizeof(h) + sizeof(uint64_t)) {
        fail(DSV4_ERR_BAD_STATE, "the state blob is %zu bytes, too short to be a saved state", size);
    }
    std::memcpy(&h, src, sizeof(h));
    if (std::memcmp(h.magic, kStateMagic, sizeof(h.magic)) != 0) {
        fail(DSV4_ERR_BAD_STATE, "not a saved dsv4-ggml session state (bad magic)");
    }
    if (h.version != kStateVersion) {
        fail(DSV4_ERR_BAD_STATE, "saved state version %u is not supported (expected %u)", h.version, kStateVersion);
    }
    uint64_t sum;
    std::memcpy(&sum, src + size - sizeof(sum), sizeof(sum));
    if (sum != fnv1a(src, size - sizeof(sum))) {
        fail(DSV4_ERR_BAD_STATE, "the saved state is corrupt (checksum mismatch)");
    }
    if (h.model_fingerprint != s.model->fingerprint) {
        fail(DSV4_ERR_BAD_STATE, "the saved state belongs to another model");
    }
    if (h.cache_type != s.params.cache_type) {
        fail(DSV4_ERR_BAD_STATE, "the saved state is for cache type %s; this session has cache type %s",
             ggml_type_name(ggml_type(h.cache_type)), ggml_type_name(ggml_type(s.params.cache_type)));
    }
    if (h.n_past < 0 || h.n_past > s.params.n_ctx) {
        fail(DSV4_ERR_BAD_STATE, "the saved state holds %lld tokens; this session's n_ctx is %d", (long long) h.n_past,
             int(s.params.n_ctx));
    }
    if (h.ring_bytes != rings_get(s, seq, h.n_past, 0, nullptr) ||
        h.cache_bytes != caches_io(s, seq, h.n_past, nullptr, nullptr) ||
        size != sizeof(h) + h.ring_bytes + h.cache_bytes + uint64_t(h.n_past) * sizeof(int32_t) + sizeof(uint64_t)) {
        fail(DSV4_ERR_BAD_STATE, "the saved state's layout does not match this session");
    }
    const uint8_t * tok = src + sizeof(h) + h.ring_bytes + h.cache_bytes;
    std::vector<int32_t> toks(size_t(h.n_past));
    std::memcpy(toks.data(), tok, toks.size() * sizeof(int32_t));
    for (int32_t t : toks) {
        if (t < 0 || uint32_t(t) >= s.model->hp.n_vocab) {
            fail(DSV4_ERR_BAD_STATE, "the saved state holds token %d, outside the vocabulary", int(t));
        }
    }
    // validated: now change the slot
    clear_slot(s, seq);
    rings_set(s, seq, h.n_past, 0, src + sizeof(h));
    caches_io(s, seq, h.n_past, nullptr, src + sizeof(h) + h.ring_bytes);
    SeqSlot & sl = s.slots[size_t(seq)];
    sl.n_past = h.n_past;
    sl.tokens = std::move(toks);
}

}  // namespace dsv4
