// The plan of a micro-batch: for its segments (sequences), every row index, mask and position
// its graph reads (host-side arithmetic, uploaded as inputs), the state geometry, and the key
// that says which cached graph computes it.
#include "step.h"


#include <algorithm>
#include <cmath>

namespace dsv4 {

// --- plan --------------------------------------------------------------------------------------------

namespace {

constexpr int64_t kViewQuantum = 64;  // visible cache rows are padded to this (stable graph shapes)
const float kNegInf = -INFINITY;

int64_t round_up(int64_t x, int64_t q) {
    return (x + q - 1) / q * q;
}

int64_t pos_mod(int64_t p, int64_t m) {
    const int64_t r = p % m;
    return r < 0 ? r + m : r;
}

RatioPlan make_ratio_plan(int ratio, int64_t ring_rows, int64_t n_rows, int64_t n_slots,
                          const std::vector<Segment> & segs, int64_t n_group, int64_t T) {
    RatioPlan p;
    p.ratio = ratio;
    p.overlap = ratio == 4;
    p.ring_rows = ring_rows;
    const int64_t S = ring_rows;
    const int64_t synthetic = n_slots * S;  // value 0, logit -inf: positions before 0 (§7 #29)
    const int64_t batch0 = synthetic + 1;   // batch rows follow every ring row
    const int64_t members = p.overlap ? 2 * ratio : ratio;
    p.ape_rows.resize(size_t(T));
    p.cache_base.resize(size_t(T));

    int64_t max_visible = 1;
    for (const Segment & sg : segs) {
        const int64_t end = sg.pos0 + sg.n;
        for (int64_t i = 0; i < sg.n; ++i) {
            p.ape_rows[size_t(sg.offset + i)] = int32_t((sg.pos0 + i) % ratio);
            p.cache_base[size_t(sg.offset + i)] = int32_t(sg.slot * n_rows);
        }
        // member row of position q: the batch's rows follow the rings
        auto row_of = [&](int64_t q) -> int32_t {
            if (q < 0) {
                return int32_t(synthetic);
            }
            return int32_t(q >= sg.pos0 ? batch0 + sg.offset + (q - sg.pos0) : sg.slot * S + pos_mod(q, S));
        };
        // blocks completed by the segment: j with (j+1)·r − 1 in [pos0, end); the first is pos0 / r.
        // The graph always processes ceil(n/r) blocks per segment (a stable shape); the rest are dummies.
        const int64_t j0 = sg.pos0 / ratio;
        const int64_t blocks = (sg.n + ratio - 1) / ratio;
        for (int64_t b = 0; b < blocks; ++b) {
            const int64_t j = j0 + b;
            const bool real = (j + 1) * ratio - 1 < end;
            for (int64_t m = 0; m < members; ++m) {
                if (!real) {
                    p.member_rows.push_back(int32_t(batch0 + sg.offset));  // a finite row: dummies stay finite
                    continue;
                }
                // overlap: r previous-block tokens, then the r tokens of block j (§3.5)
                const int64_t q = p.overlap ? j * ratio - ratio + m : j * ratio + m;
                p.member_rows.push_back(row_of(q));
            }
            p.block_pos.push_back(real ? int32_t(j * ratio) : 0);
            p.write_rows.push_back(sg.slot * n_rows + (real ? j : n_rows - 1));
            p.n_real += real;
        }
        p.n_blocks += blocks;
        // the last ring_rows tokens of the segment stay in its ring, at row pos mod S
        for (int64_t i = std::max<int64_t>(0, sg.n - S); i < sg.n; ++i) {
            p.persist_src.push_back(int32_t(sg.offset + i));
            p.persist_dst.push_back(sg.slot * S + pos_mod(sg.pos0 + i, S));
        }
        max_visible = std::max(max_visible, end / ratio);
    }

    // block j is visible to query t iff j < (t+1)/r, including to the completing token (§3.4.4)
    p.n_view = std::min(round_up(max_visible, kViewQuantum), n_rows - 1);
    p.visible_mask.assign(size_t(p.n_view * T), kNegInf);
    for (const Segment & sg : segs) {
        for (int64_t i = 0; i < sg.n; ++i) {
            const int64_t nvis = std::min((sg.pos0 + i + 1) / ratio, p.n_view);
            std::fill_n(p.visible_mask.begin() + (sg.offset + i) * p.n_view, nvis, 0.0f);
        }
    }
    for (size_t k = size_t(n_group); k < segs.size(); ++k) {
        for (int64_t j = 0; j < p.n_view; ++j) {
            p.segment_rows.push_back(int32_t(segs[k].slot * n_rows + j));
        }
    }
    return p;
}

}  // namespace

Geometry make_geometry(const dsv4_hparams & hp, int64_t n_ctx, int64_t n_slots, int64_t slack) {
    Geometry g;
    g.n_slots = n_slots;
    g.slack = slack;
    g.window_rows = int64_t(hp.n_swa) + slack;
    g.ring4 = 2 * 4 + slack;
    g.ring128 = 128 + slack;
    g.n_rows4 = n_ctx / 4 + 1;
    g.n_rows128 = n_ctx / 128 + 1;
    for (uint32_t il = 0; il < hp.n_layer; ++il) {
        g.has4 = g.has4 || hp.compress_ratios[il] == 4;
        g.has128 = g.has128 || hp.compress_ratios[il] == 128;
    }
    return g;
}

StepPlan make_plan(const dsv4_hparams & hp, const Geometry & geo, const std::vector<Segment> & segs, int64_t n_group,
                   const int32_t * tokens, std::vector<int32_t> out_rows) {
    StepPlan p;
    p.segments = segs;
    p.n_group = n_group;
    int64_t T = 0;
    for (const Segment & sg : segs) {
        T += sg.n;
    }
    p.n_tokens = T;
    p.tokens.assign(tokens, tokens + T);
    p.positions.resize(size_t(T));
    for (const Segment & sg : segs) {
        for (int64_t i = 0; i < sg.n; ++i) {
            p.positions[size_t(sg.offset + i)] = int32_t(sg.pos0 + i);
        }
    }
    p.out_rows = std::move(out_rows);

    // window keys: ring row s of a slot holds the latest position q < pos0 with q ≡ s (mod R),
    // then come the segment's own tokens; key position k is visible to query t iff k <= t and
    // t − k < W (§7 #20)
    const int64_t W = hp.n_swa, R = geo.window_rows;
    p.window_rows = R;
    auto ring_visible = [&](int64_t pos0, int64_t t, float * row) {
        for (int64_t s = 0; s < R; ++s) {
            const int64_t last = pos0 - 1 - pos_mod(pos0 - 1 - s, R);  // latest q < pos0 in row s
            row[s] = last >= 0 && t - last < W ? 0.0f : kNegInf;
        }
    };
    p.group_mask.assign(size_t((R + 1) * n_group), kNegInf);
    for (int64_t g = 0; g < n_group; ++g) {
        const Segment & sg = segs[size_t(g)];
        ring_visible(sg.pos0, sg.pos0, p.group_mask.data() + g * (R + 1));
        p.group_mask[size_t(g * (R + 1) + R)] = 0.0f;  // its own key
        p.group_bases.push_back(int32_t(sg.slot * R));
        p.group_bases.push_back(int32_t(sg.slot * geo.n_rows4));
        p.group_bases.push_back(int32_t(sg.slot * geo.n_rows128));
    }
    for (size_t k = size_t(n_group); k < segs.size(); ++k) {
        const Segment & sg = segs[k];
        const int64_t N = R + sg.n;
        std::vector<float> mask(size_t(N * sg.n), kNegInf);
        for (int64_t i = 0; i < sg.n; ++i) {
            float * row = mask.data() + i * N;
            ring_visible(sg.pos0, sg.pos0 + i, row);
            for (int64_t j = 0; j <= i; ++j) {
                if (i - j < W) {
                    row[R + j] = 0.0f;
                }
            }
        }
        p.segment_mask.push_back(std::move(mask));
        std::vector<int32_t> ring;
        for (int64_t s = 0; s < R; ++s) {
            ring.push_back(int32_t(sg.slot * R + s));
        }
        p.segment_ring.push_back(std::move(ring));
    }
    for (const Segment & sg : segs) {
        for (int64_t i = std::max<int64_t>(0, sg.n - R); i < sg.n; ++i) {
            p.window_src.push_back(int32_t(sg.offset + i));
            p.window_dst.push_back(sg.slot * R + pos_mod(sg.pos0 + i, R));
        }
    }
    // MTP input (§3.10): the final streams of each token's previous position, as rows of
    // the trunk's final streams before each token: the first token of a segment reads its slot's
    // xfin ring (the zero row after the slots' rows at position 0), the others the batch row
    // before them; mtp_prev indexes concat(those ring rows, this batch)
    const int64_t zero_row = geo.n_slots * R;
    p.mtp_ring.assign(size_t(T), int32_t(zero_row));
    p.mtp_prev.resize(size_t(T));
    for (const Segment & sg : segs) {
        const int64_t t0 = sg.offset;
        p.mtp_ring[size_t(t0)] = int32_t(sg.pos0 == 0 ? zero_row : sg.slot * R + pos_mod(sg.pos0 - 1, R));
        for (int64_t i = 0; i < sg.n; ++i) {
            p.mtp_prev[size_t(t0 + i)] = i > 0 ? int32_t(T + t0 + i - 1) : int32_t(t0);
        }
    }

    p.has4 = geo.has4;
    p.has128 = geo.has128;
    if (geo.has4) {
        p.r4 = make_ratio_plan(4, geo.ring4, geo.n_rows4, geo.n_slots, segs, n_group, T);
    }
    if (geo.has128) {
        p.r128 = make_ratio_plan(128, geo.ring128, geo.n_rows128, geo.n_slots, segs, n_group, T);
    }
    return p;
}

GraphKey graph_key(const StepPlan & p) {
    GraphKey k;
    k.n_tokens = p.n_tokens;
    k.n_group = p.n_group;
    for (size_t i = size_t(p.n_group); i < p.segments.size(); ++i) {
        k.segment_lengths.push_back(p.segments[i].n);
    }
    k.n_view4 = p.has4 ? p.r4.n_view : 0;
    k.n_view128 = p.has128 ? p.r128.n_view : 0;
    k.real4 = p.has4 && p.r4.n_real > 0;
    k.real128 = p.has128 && p.r128.n_real > 0;
    k.n_out = int64_t(p.out_rows.size());
    return k;
}

}  // namespace dsv4
