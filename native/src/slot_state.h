// The persistent state of a session (§4.1): the geometry of its tensors, and each sequence slot's
// rows in them (window rings, compressor rings, compressed caches), read and written row-exact for
// checkpoints, copies, saved states and rollback.
#pragma once

#include "session.h"

#include <cstdint>
#include <functional>

namespace dsv4 {

enum RingKind { WINDOW = 0, RATIO4 = 4, RATIO128 = 128 };

struct RingRef {
    ggml_tensor * t;
    int64_t rows;  // per slot
    RingKind kind;
    bool score;    // a gate-logit plane (unwritten rows: -inf)
};

struct CacheRef {
    ggml_tensor * t;
    int64_t rows;  // per slot
    int ratio;
};

// Calls fn(il, name, type, ne0, ne1) for every state tensor of the session, in layer order.
void for_each_state_tensor(const dsv4_hparams & hp, const Geometry & geo, ggml_type cache_type, bool mtp,
                           const std::function<void(uint32_t il, const char * name, ggml_type type, int64_t ne0,
                                                    int64_t ne1)> & fn);
void check_session_params(const dsv4_hparams & hp, const dsv4_session_params & p);

int64_t ring_rows(const Geometry & geo, RingKind kind);
std::vector<RingRef> rings(const dsv4_session & s);
std::vector<CacheRef> caches(const dsv4_session & s);
int64_t ring_start(const dsv4_hparams & hp, RingKind kind, int64_t n, int64_t slack);
int64_t & ring_lo(SeqSlot & sl, RingKind kind);
int64_t ring_lo(const SeqSlot & sl, RingKind kind);
size_t rings_get(const dsv4_session & s, int32_t slot, int64_t n, int64_t slack, uint8_t * dst);
size_t rings_set(dsv4_session & s, int32_t slot, int64_t n, int64_t slack, const uint8_t * src);
size_t caches_io(const dsv4_session & s, int32_t slot, int64_t n, uint8_t * get, const uint8_t * set);
void fill_rows(ggml_tensor * t, int64_t row0, int64_t n_rows, float value);
void clear_slot(dsv4_session & s, int32_t slot);
bool rings_hold(const dsv4_session & s, const SeqSlot & sl, int64_t n);
void check_seq(const dsv4_session & s, int32_t seq, const char * what);

// Calls fn(first row, rows, first position) for the runs of consecutive ring rows that hold
// positions [p0, p1) of `slot` (at most two: the ring wraps once).
template <typename F> void ring_runs(int32_t slot, int64_t S, int64_t p0, int64_t p1, F && fn) {
    for (int64_t p = p0; p < p1;) {
        const int64_t r = p % S;
        const int64_t n = std::min(p1 - p, S - r);
        fn(slot * S + r, n, p);
        p += n;
    }
}

}  // namespace dsv4
