"""DeepSeek-V4 (llama.cpp GGUF layout, arch "deepseek4") described in the DSL.

Names are the spec's (`../shared/spec/ARCHITECTURE.md`); section numbers point into it.
This file is the one source of truth for the loader: the hparams struct and its GGUF reader,
the consistency checks, and the tensor table are generated from it (`dsv4-ggml generate`).
"""
from __future__ import annotations

from .dsl import LAYER, DType, Kind, Model, select

ARCH = "deepseek4"
MAX_LAYERS = 512
MAX_SINKHORN_ITERS = 1000  # the release uses 20; more would only hang the first token

m = Model(ARCH)
m.max_layers = MAX_LAYERS
U32, F32, BOOL, STR = Kind.U32, Kind.F32, Kind.BOOL, Kind.STR

# --- §1.4 hyperparameters -------------------------------------------------------------------
n_layer_all = m.hparam("n_layer_all", "block_count", U32,
                       "blocks in the file: trunk layers plus MTP blocks")
n_nextn = m.hparam("n_nextn", "nextn_predict_layers", U32,
                   "MTP blocks at the end of the layer list (0: none)", required=False, default=0)
n_ctx_train = m.hparam("n_ctx_train", "context_length", U32, "longest context the model supports")
n_embd = m.hparam("n_embd", "embedding_length", U32, "hidden size D")
n_head = m.hparam("n_head", "attention.head_count", U32, "attention heads H")
n_head_kv = m.hparam("n_head_kv", "attention.head_count_kv", U32,
                     "KV heads (DeepSeek-V4 is MQA: must be 1)")
head_dim = m.hparam("head_dim", "attention.key_length", U32, "head dim Dh (K = V)")
head_dim_v = m.hparam("head_dim_v", "attention.value_length", U32, "value head dim (= key_length)")
n_rot = m.hparam("n_rot", "rope.dimension_count", U32,
                 "roped dims at the tail of each head (and of each indexer head)")
rope_freq_base = m.hparam("rope_freq_base", "rope.freq_base", F32,
                          "rope base of ratio-0 layers (no YaRN)")
m.hparam("rope_scaling_type", "rope.scaling.type", STR,
         "rope scaling of compressed layers", choices=("yarn",))
rope_scaling_factor = m.hparam("rope_scaling_factor", "rope.scaling.factor", F32, "YaRN factor")
rope_orig_ctx = m.hparam("rope_orig_ctx", "rope.scaling.original_context_length", U32,
                         "YaRN original context")
norm_eps = m.hparam("norm_eps", "attention.layer_norm_rms_epsilon", F32,
                    "epsilon of every RMS norm")
q_lora_rank = m.hparam("q_lora_rank", "attention.q_lora_rank", U32, "query low rank")
n_swa = m.hparam("n_swa", "attention.sliding_window", U32,
                 "sliding window: the query and the previous n_swa-1 tokens")
o_groups = m.hparam("o_groups", "attention.output_group_count", U32, "output groups G")
o_lora_rank = m.hparam("o_lora_rank", "attention.output_lora_rank", U32,
                       "output low rank R (per group)")
compress_ratios = m.hparam("compress_ratios", "attention.compress_ratios", Kind.INT_ARRAY,
                          "per-layer KV compression ratio: 0 (window only), 4 (CSA), 128 (HCA)",
                          choices=(0, 4, 128), length=n_layer_all, min_length=True)
compress_rope_freq_base = m.hparam("compress_rope_freq_base",
                                   "attention.compress_rope_freq_base", F32,
                                   "rope base of compressed layers (with YaRN)")
indexer_n_head = m.hparam("indexer_n_head", "attention.indexer.head_count", U32,
                          "lightning indexer heads")
indexer_head_dim = m.hparam("indexer_head_dim", "attention.indexer.key_length", U32,
                            "lightning indexer head dim")
indexer_top_k = m.hparam("indexer_top_k", "attention.indexer.top_k", U32,
                         "compressed blocks a CSA query attends to")
n_expert = m.hparam("n_expert", "expert_count", U32, "routed experts E")
n_expert_used = m.hparam("n_expert_used", "expert_used_count", U32, "active experts K")
n_expert_shared = m.hparam("n_expert_shared", "expert_shared_count", U32, "shared experts")
expert_ff = m.hparam("expert_ff", "expert_feed_forward_length", Kind.U32_PER_LAYER,
                    "expert FFN width (one value, or one per block)", length=n_layer_all)
expert_weights_scale = m.hparam("expert_weights_scale", "expert_weights_scale", F32,
                                "routed scaling factor")
expert_weights_norm = m.hparam("expert_weights_norm", "expert_weights_norm", BOOL,
                               "renormalise the selected experts' weights")
expert_gating_func = m.hparam("expert_gating_func", "expert_gating_func", U32,
                              "router score function: 4 = sqrt(softplus)", choices=(4,))
swiglu_clamp_exp = m.hparam("swiglu_clamp_exp", "swiglu_clamp_exp", Kind.F32_PER_LAYER,
                            "SwiGLU limit of routed experts (one value, or one per block)",
                            length=n_layer_all)
swiglu_clamp_shexp = m.hparam("swiglu_clamp_shexp", "swiglu_clamp_shexp", Kind.F32_PER_LAYER,
                              "SwiGLU limit of the shared expert (falls back to the routed one)",
                              length=n_layer_all, required=False, fallback=swiglu_clamp_exp)
hc_mult = m.hparam("hc_mult", "hyper_connection.count", U32, "hyper-connection streams")
hc_sinkhorn_iters = m.hparam("hc_sinkhorn_iters", "hyper_connection.sinkhorn_iterations", U32,
                             "Sinkhorn iterations")
hc_eps = m.hparam("hc_eps", "hyper_connection.epsilon", F32, "epsilon of the HC formulas")
n_hash_layers = m.hparam("n_hash_layers", "hash_layer_count", U32,
                         "leading layers routed by token id (tid2eid)")

# --- §5 tokenizer keys the engine depends on --------------------------------------------------
m.hparam("tokenizer_model", "tokenizer.ggml.model", STR, "tokenizer kind", choices=("gpt2",))
m.hparam("tokenizer_pre", "tokenizer.ggml.pre", STR, "pre-tokenizer regex set",
         choices=("deepseek-v3", "joyai-llm"))
n_vocab = m.hparam("n_vocab", "tokenizer.ggml.tokens", Kind.STR_ARRAY_LEN,
                   "vocabulary size (length of the token list)")
n_merges = m.hparam("n_merges", "tokenizer.ggml.merges", Kind.STR_ARRAY_LEN, "BPE merges")
bos_token_id = m.hparam("bos_token_id", "tokenizer.ggml.bos_token_id", U32, "BOS token id")
eos_token_id = m.hparam("eos_token_id", "tokenizer.ggml.eos_token_id", U32, "EOS token id")
add_bos = m.hparam("add_bos", "tokenizer.ggml.add_bos_token", BOOL,
                   "prepend BOS when tokenizing a prompt", required=False, default=True)

# --- derived values ------------------------------------------------------------------------
n_layer = m.derive("n_layer", n_layer_all - n_nextn, "trunk layers (blocks without MTP)")
hc_dim = m.derive("hc_dim", hc_mult * n_embd, "flattened stream width HC*D")
hc_mix = m.derive("hc_mix", (2 + hc_mult) * hc_mult, "HC coefficients per site")
n_nope = m.derive("n_nope", head_dim - n_rot, "un-roped dims per head (roped dims are the tail)")

# --- consistency checks: each one turns a crash or silently wrong logits into an error ---------
m.check(n_layer_all >= 1, "must be at least 1", n_layer_all)
m.check(n_layer_all <= MAX_LAYERS, f"more than the supported {MAX_LAYERS} blocks", n_layer_all)
m.check(n_nextn < n_layer_all, "must be smaller than block_count", n_nextn)
m.check(n_nextn <= 1, "at most one MTP block is supported", n_nextn)
m.check(n_head_kv.eq(1), "must be 1 (DeepSeek-V4 shares one KV vector between heads)", n_head_kv)
m.check(head_dim_v.eq(head_dim), "must equal attention.key_length (K = V)", head_dim_v)
m.check(n_embd >= 1, "must be at least 1", n_embd)
m.check(n_head >= 1, "must be at least 1", n_head)
m.check(n_rot >= 2, "must be at least 2", n_rot)
m.check((n_rot % 2).eq(0), "must be even (rope rotates pairs)", n_rot)
m.check(n_rot <= head_dim, "must not exceed attention.key_length", n_rot)
m.check((head_dim % 2).eq(0), "must be even", head_dim)
m.check(n_rot <= indexer_head_dim, "must not exceed attention.indexer.key_length", n_rot)
m.check(q_lora_rank >= 1, "must be at least 1", q_lora_rank)
m.check(n_swa >= 1, "must be at least 1", n_swa)
m.check(o_groups >= 1, "must be at least 1", o_groups)
m.check((n_head % o_groups).eq(0), "must divide attention.head_count", o_groups)
m.check(o_lora_rank >= 1, "must be at least 1", o_lora_rank)
m.check(indexer_n_head >= 1, "must be at least 1", indexer_n_head)
m.check(indexer_head_dim >= 1, "must be at least 1", indexer_head_dim)
m.check(indexer_top_k >= 1, "must be at least 1", indexer_top_k)
m.check(n_expert >= 1, "must be at least 1", n_expert)
m.check(n_expert_used >= 1, "must be at least 1", n_expert_used)
m.check(n_expert_used <= n_expert, "must not exceed expert_count", n_expert_used)
m.check(n_expert_shared.eq(1), "must be 1 (one shared expert per layer)", n_expert_shared)
m.check(expert_ff >= 1, "must be at least 1", expert_ff)
m.check(expert_weights_norm, "must be true (DeepSeek-V4 renormalises the top-k weights)",
        expert_weights_norm)
m.check(hc_mult.eq(4), "must be 4", hc_mult)
m.check(hc_sinkhorn_iters >= 1, "must be at least 1", hc_sinkhorn_iters)
m.check(hc_sinkhorn_iters <= MAX_SINKHORN_ITERS, f"more than {MAX_SINKHORN_ITERS} iterations per token",
        hc_sinkhorn_iters)
m.check(norm_eps > 0, "must be positive", norm_eps)
m.check(n_hash_layers <= n_layer, "must not exceed the trunk layer count", n_hash_layers)
m.check(n_vocab >= 1, "must not be empty", n_vocab)
m.check(bos_token_id < n_vocab, "not a valid token id (must be below the vocabulary size)", bos_token_id)
m.check(eos_token_id < n_vocab, "not a valid token id (must be below the vocabulary size)", eos_token_id)
m.check(n_ctx_train >= 1, "must be at least 1", n_ctx_train)
m.check(rope_orig_ctx >= 1, "must be at least 1", rope_orig_ctx)
# the MTP block (index >= n_layer) is window-only (§1.2)
m.check((LAYER < n_layer) | compress_ratios.eq(0), "the MTP block is window-only: its entry must be 0", compress_ratios)

# --- §2.1 tensors ------------------------------------------------------------------------------
W, F, I, FL = DType.WEIGHT, DType.F32, DType.I32, DType.FLOAT
T = m.tensor
ratio = compress_ratios
is_mtp = LAYER >= n_layer
hashed = (LAYER < n_hash_layers) & ~is_mtp
c = select(ratio.eq(4), 2, 1)          # overlapping compressor keeps two halves (§3.5)

T("token_embd", "token_embd.weight", (n_embd, n_vocab), W, "token embedding")
T("output_norm", "output_norm.weight", (n_embd,), F, "final RMSNorm weight")
T("output", "output.weight", (n_embd, n_vocab), W, "LM head")
T("output_hc_fn", "output_hc_fn.weight", (hc_dim, hc_mult), FL, "HC head mixes (§3.2)")
T("output_hc_base", "output_hc_base.weight", (hc_mult,), F, "HC head bias")
T("output_hc_scale", "output_hc_scale.weight", (1,), F, "HC head scale")

T("attn_norm", "blk.{il}.attn_norm.weight", (n_embd,), F, "attention input norm")
T("hc_attn_fn", "blk.{il}.hc_attn_fn.weight", (hc_dim, hc_mix), FL, "HC mixes, attention site")
T("hc_attn_base", "blk.{il}.hc_attn_base.weight", (hc_mix,), F, "HC bias, attention site")
T("hc_attn_scale", "blk.{il}.hc_attn_scale.weight", (3,), F, "HC scales, attention site")
T("hc_ffn_fn", "blk.{il}.hc_ffn_fn.weight", (hc_dim, hc_mix), FL, "HC mixes, FFN site")
T("hc_ffn_base", "blk.{il}.hc_ffn_base.weight", (hc_mix,), F, "HC bias, FFN site")
T("hc_ffn_scale", "blk.{il}.hc_ffn_scale.weight", (3,), F, "HC scales, FFN site")
T("attn_sinks", "blk.{il}.attn_sinks.weight", (n_head,), F, "attention sink logits (§3.4.5)")
T("attn_q_a", "blk.{il}.attn_q_a.weight", (n_embd, q_lora_rank), W, "wq_a")
T("attn_q_a_norm", "blk.{il}.attn_q_a_norm.weight", (q_lora_rank,), F, "q low-rank norm")
T("attn_q_b", "blk.{il}.attn_q_b.weight", (q_lora_rank, n_head * head_dim), W, "wq_b")
T("attn_kv", "blk.{il}.attn_kv.weight", (n_embd, head_dim), W, "shared wkv (MQA, K = V)")
T("attn_kv_a_norm", "blk.{il}.attn_kv_a_norm.weight", (head_dim,), F, "kv norm")
T("attn_output_a", "blk.{il}.attn_output_a.weight",
  (n_head * head_dim // o_groups, o_groups * o_lora_rank), W,
  "wo_a, used as {H*Dh/G, R, G} (§3.4.6, §7 #23)",
  view=(n_head * head_dim // o_groups, o_lora_rank, o_groups))
T("attn_output_b", "blk.{il}.attn_output_b.weight", (o_groups * o_lora_rank, n_embd), W, "wo_b")
T("ffn_norm", "blk.{il}.ffn_norm.weight", (n_embd,), F, "FFN input norm")
T("ffn_gate_inp", "blk.{il}.ffn_gate_inp.weight", (n_embd, n_expert), W, "router")
T("ffn_gate_tid2eid", "blk.{il}.ffn_gate_tid2eid.weight", (n_expert_used, n_vocab), I,
  "hash routing table: experts per token id", when=hashed)
T("exp_probs_b", "blk.{il}.exp_probs_b.bias", (n_expert,), F,
  "router selection bias", when=~hashed)
T("exp_probs_b_vl", "blk.{il}.exp_probs_b_vl.bias", (n_expert,), F,
  "router selection bias for image tokens (vision variant; unused)", required=False)
T("ffn_gate_exps", "blk.{il}.ffn_gate_exps.weight", (n_embd, expert_ff, n_expert), W,
  "routed experts w1")
T("ffn_up_exps", "blk.{il}.ffn_up_exps.weight", (n_embd, expert_ff, n_expert), W,
  "routed experts w3")
T("ffn_down_exps", "blk.{il}.ffn_down_exps.weight", (expert_ff, n_embd, n_expert), W,
  "routed experts w2")
T("ffn_gate_shexp", "blk.{il}.ffn_gate_shexp.weight", (n_embd, expert_ff * n_expert_shared), W,
  "shared expert w1")
T("ffn_up_shexp", "blk.{il}.ffn_up_shexp.weight", (n_embd, expert_ff * n_expert_shared), W,
  "shared expert w3")
T("ffn_down_shexp", "blk.{il}.ffn_down_shexp.weight", (expert_ff * n_expert_shared, n_embd), W,
  "shared expert w2")

compressed = ratio.ne(0)
csa = ratio.eq(4)
T("attn_compressor_kv", "blk.{il}.attn_compressor_kv.weight", (n_embd, c * head_dim), W,
  "compressor values (§3.5)", when=compressed)
T("attn_compressor_gate", "blk.{il}.attn_compressor_gate.weight", (n_embd, c * head_dim), W,
  "compressor gate logits", when=compressed)
T("attn_compressor_ape", "blk.{il}.attn_compressor_ape.weight", (c * head_dim, ratio), FL,
  "compressor position bias on the gate", when=compressed)
T("attn_compressor_norm", "blk.{il}.attn_compressor_norm.weight", (head_dim,), F,
  "compressed entry norm", when=compressed)
T("indexer_attn_q_b", "blk.{il}.indexer.attn_q_b.weight",
  (q_lora_rank, indexer_n_head * indexer_head_dim), W, "indexer query (§3.6)", when=csa)
T("indexer_proj", "blk.{il}.indexer.proj.weight", (n_embd, indexer_n_head), W,
  "indexer head weights", when=csa)
T("indexer_compressor_kv", "blk.{il}.indexer_compressor_kv.weight",
  (n_embd, 2 * indexer_head_dim), W, "indexer compressor values", when=csa)
T("indexer_compressor_gate", "blk.{il}.indexer_compressor_gate.weight",
  (n_embd, 2 * indexer_head_dim), W, "indexer compressor gate logits", when=csa)
T("indexer_compressor_ape", "blk.{il}.indexer_compressor_ape.weight",
  (2 * indexer_head_dim, ratio), FL, "indexer compressor position bias", when=csa)
T("indexer_compressor_norm", "blk.{il}.indexer_compressor_norm.weight", (indexer_head_dim,), F,
  "indexer key norm", when=csa)

# MTP block (§3.10): blk.{n_layer}
T("nextn_eh_proj", "blk.{il}.nextn.eh_proj.weight", (2 * n_embd, n_embd), W,
  "MTP input projection [e; h]", when=is_mtp)
T("nextn_enorm", "blk.{il}.nextn.enorm.weight", (n_embd,), F, "MTP embedding norm", when=is_mtp)
T("nextn_hnorm", "blk.{il}.nextn.hnorm.weight", (n_embd,), F, "MTP state norm", when=is_mtp)
T("nextn_shared_head_norm", "blk.{il}.nextn.shared_head_norm.weight", (n_embd,), F,
  "MTP output norm (falls back to output_norm)", when=is_mtp, required=False)
T("nextn_embed_tokens", "blk.{il}.nextn.embed_tokens.weight", (n_embd, n_vocab), W,
  "MTP embedding (absent in V4: token_embd)", when=is_mtp, required=False)
T("nextn_shared_head_head", "blk.{il}.nextn.shared_head_head.weight", (n_embd, n_vocab), W,
  "MTP LM head (absent in V4: output)", when=is_mtp, required=False)

# Tensors of llama.cpp's DSpark/DFlash draft (its `dflash` arch: DeepseekV4DSparkModel's root
# tensors and the DFlash2 conv/selector heads) that a converter may bundle into the target's file.
# Nothing here computes with them; the file still loads (llama.cpp's deepseek4 loader refuses it).
m.foreign_family("DSpark/DFlash draft head", [
    "fc.weight", "fc.scale", "enc.output_norm.weight", "d2t",
    "markov_w1.weight", "markov_w2.weight", "markov_w2.scale", "conf_proj.weight", "conf_proj.bias",
    "selector_predecessor.weight", "selector_successor.weight", "selector_hidden.weight",
    "blk.{il}.attn_conv_base.weight", "blk.{il}.attn_conv_proj.weight",
    "blk.{il}.ffn_conv_base.weight", "blk.{il}.ffn_conv_proj.weight",
])

MODEL = m

# =================================================================================================
# Blocks (§3): one generated C++ function per block and variant (native/generated/blocks.cpp).
# `b.*` ops are checked symbolically here and lower to ggml calls; `s.*` calls in the C++ are the
# hand-written runtime (native/src/step.h: window, compressor state, caches, the per-step plan).
# A batch `T` holds tokens of one or more sequences (consecutive positions each): every weight
# applies to the whole batch, the runtime's calls keep each sequence to its own state.

from .graph import N_BLOCKS, N_CACHE, N_VIEW, T, Output, Variant, block_decorator  # noqa: E402

BLOCKS: list = []
block = block_decorator(m, BLOCKS)
D, H, Dh, HC = n_embd, n_head, head_dim, hc_mult

ATTENTION = [
    Variant("swa", ratio.eq(0), {"ratio": 0}, {"compress_ratios": 0}),
    Variant("csa", ratio.eq(4), {"ratio": 4}, {"compress_ratios": 4}),
    Variant("hca", ratio.eq(128), {"ratio": 128}, {"compress_ratios": 128}),
]
ROUTING = [
    Variant("hash", hashed, {"hashed": True}),
    Variant("routed", ~hashed, {"hashed": False}),
]
COMPRESSORS = [
    Variant("csa", csa, {"stream": "CSA", "ratio": 4, "width": head_dim, "w": "attn_compressor"},
            {"compress_ratios": 4}),
    Variant("hca", ratio.eq(128), {"stream": "HCA", "ratio": 128, "width": head_dim,
                                   "w": "attn_compressor"}, {"compress_ratios": 128}),
    Variant("indexer", csa, {"stream": "INDEXER", "ratio": 4, "width": indexer_head_dim,
                             "w": "indexer_compressor"}, {"compress_ratios": 4}),
]
HC_SPLIT = Output(None, ctype="HcSplit", fields={
    "y": ((D, T), "f32"), "post": ((HC, T), "f32"), "comb": ((HC, HC, T), "f32")})


@block("token_rows", "§3.1", params=[], output=Output((D, T)), scope="model")
def token_rows(b, W):
    """Each token's embedding row."""
    return b.get_rows(W.token_embd, b.tokens)


@block("embed", "§3.1", params=[], output=Output((D, HC, T)), scope="model")
def embed(b, W):
    """Token embeddings, copied into every hyper-connection stream."""
    return b.repeat_streams(b.invoke(token_rows, name="e"), HC)


@block("hc_pre", "§3.2", output=HC_SPLIT, scope="step",
       params=[("X", (D, HC, T)), ("fn", (hc_dim, hc_mix)), ("scale", (3,)), ("base", (hc_mix,))])
def hc_pre(b, _, X, fn, scale, base):
    """Mixes the streams into one sub-layer input `y` and returns the coefficients `post` and
    `comb` that hc_post uses to write the sub-layer output back into the streams."""
    mixes = b.linear(fn, b.rms_norm(b.flatten(X)))   # one RMS over all HC·D values (§7 #10)
    pre, post = b.hc_gates(mixes, scale, base)          # sigmoid + eps / 2·sigmoid (§7 #8)
    comb = b.hc_comb(mixes, scale, base)                # softmax + Sinkhorn (§7 #7, #9)
    y = b.hc_sum(X, pre)                                # weighted sum of the un-normalised streams
    return {"y": y, "post": post, "comb": comb}


@block("compress", "§3.5", params=[("x", (D, T))], output=Output(None), variants=COMPRESSORS)
def compress(b, L, x):
    """Runs one compressor over the batch: projects values and gate logits, pools every block
    the batch completes (each sequence's blocks from its own ring), norms and ropes each entry
    at its block's first position, writes it into its sequence's rows of the layer's cache and
    returns the cache."""
    stream, r, d, w = L.stream, L.ratio, L.width, L.w
    a = b.linear(getattr(L, w + "_kv"), x)                       # values
    ape = b.get_rows(getattr(L, w + "_ape"), b.call("ape_row", (T,), f"s.ape_rows(Stream::{stream})",
                                                    dtype="i32"))  # APE row pos mod r ...
    z = b.add(b.linear(getattr(L, w + "_gate"), x), ape)         # ... on the gate logits only
    rows = b.call("rows", None, f"s.compressor_rows(il, Stream::{stream}, {{}}, {{}})", a, z,
                  ctype="CompressorRows", comment="the ring and this batch; the members of each block")
    # overlapping windows (ratio 4): previous block's first half + current block's second half
    pooled = b.compress_pool(rows, d, overlap=r == 4)
    entry = b.entries(b.rms_norm(pooled, getattr(L, w + "_norm")))
    entry = b.rope(entry, b.call("block_pos", (N_BLOCKS,), f"s.block_positions(Stream::{stream})",
                                 dtype="i32"))               # at the block's first token j·r (§7 #6)
    return b.call("cache", (d, N_CACHE), f"s.store(il, Stream::{stream}, {{}})", entry,
                  comment="write the new entries; the whole cache (every sequence's rows)")


@block("indexer", "§3.6", params=[("x", (D, T)), ("qr", (q_lora_rank, T))],
       output=Output((N_VIEW, T)))
def indexer(b, L, x, qr):
    """Lightning indexer scores of every visible compressed block for every query (−inf where
    not visible); the attention keeps the top-k."""
    keys = b.invoke(compress, x, variant="indexer")
    q = b.heads(b.linear(L.indexer_attn_q_b, qr), indexer_n_head, indexer_head_dim)   # no q norm (§7 #15)
    q = b.rope(q, b.positions)
    w = b.scale(b.linear(L.indexer_proj, x),
                "1.0f / std::sqrt(float(hp.indexer_head_dim) * float(hp.indexer_n_head))")
    return b.call("scores", (N_VIEW, T), "s.indexer_scores(il, {0}, {1}, {2})", q, keys, w,
                  comment="Σ_h w_h·relu(q_h·k_j) over each query's own sequence, plus the causal mask")


@block("attention", "§3.4", params=[("x", (D, T))], output=Output((D, T)), variants=ATTENTION)
def attention(b, L, x):
    """Attention of one layer: low-rank query, one shared key/value vector (MQA), keys from the
    sliding window plus the layer's compressed entries, sinks, grouped low-rank output."""
    qr = b.rms_norm(b.linear(L.attn_q_a, x), L.attn_q_a_norm)                   # §3.4.1
    q = b.rms_norm(b.heads(b.linear(L.attn_q_b, qr), H, Dh))                    # per-head RMS, no weight
    q = b.rope(q, b.positions)
    kv = b.rms_norm(b.linear(L.attn_kv, x), L.attn_kv_a_norm)                   # §3.4.2: K = V
    kv = b.rope(b.heads(kv, 1, Dh), b.positions)
    keys = b.call("keys", None, "s.window(il, {})", kv, ctype="KeySet")         # last n_swa tokens
    if L.ratio == 128:    # HCA: every visible compressed block
        cache = b.invoke(compress, x, variant="hca")
        keys = b.call("keys", None, "s.with_all(il, {}, {})", keys, cache, ctype="KeySet")
    if L.ratio == 4:      # CSA: the indexer's top-k visible blocks
        cache = b.invoke(compress, x, variant="csa")
        scores = b.invoke(indexer, x, qr)
        keys = b.call("keys", None, "s.with_selected(il, {}, {}, {})", keys, cache, scores, ctype="KeySet")
    o = b.call("o", (Dh, H, T), "attend(s, {}, {}, {})", q, keys, L.attn_sinks,
               comment="softmax over the keys and the head's sink logit (§3.4.5)")
    o = b.rope(o, b.positions, inverse=True)                                    # K = V was roped (§7 #5)
    return b.linear(L.attn_output_b, b.grouped_linear(L.attn_output_a, o, o_groups))


@block("moe", "§3.8", params=[("x", (D, T))], output=Output((D, T)), variants=ROUTING)
def moe(b, L, x):
    """Routed experts (sqrt-softplus scores; hash routing by token id on the first layers) plus
    the shared expert; both with the clamped SwiGLU."""
    scores = b.unary("sqrt", b.unary("softplus", b.linear(L.ffn_gate_inp, x)))   # [E, T]
    if L.hashed:
        experts = b.get_rows(L.ffn_gate_tid2eid, b.tokens)                       # tid2eid[token]
    else:
        experts = b.argsort_top_k(b.add(scores, L.exp_probs_b), n_expert_used)   # bias selects only
    weights = b.get_rows(b.reshape(scores, (1, n_expert, T)), experts)           # unbiased scores
    weights = b.reshape(weights, (n_expert_used, T))
    weights = b.scale(b.div(weights, b.sum_rows(weights)), expert_weights_scale)
    xe = b.reshape(x, (D, 1, T))
    gate = b.mul_mat_id(L.ffn_gate_exps, xe, experts)
    up = b.mul_mat_id(L.ffn_up_exps, xe, experts)
    act = b.swiglu_clamp(gate, up, swiglu_clamp_exp)
    down = b.mul_mat_id(L.ffn_down_exps, act, experts)
    routed = b.mix_experts(down, weights)
    shared_act = b.swiglu_clamp(b.linear(L.ffn_gate_shexp, x), b.linear(L.ffn_up_shexp, x),
                                swiglu_clamp_shexp)
    shared = b.linear(L.ffn_down_shexp, shared_act)
    return b.add(routed, shared)


@block("layer", "§3.3", params=[("X", (D, HC, T))], output=Output((D, HC, T)))
def layer(b, L, X):
    """One block: HC-wrapped attention, then HC-wrapped MoE."""
    h = b.invoke(hc_pre, X, L.hc_attn_fn, L.hc_attn_scale, L.hc_attn_base, name="attn_hc")
    a = b.invoke(attention, b.rms_norm(h["y"], L.attn_norm))
    X = b.hc_post(a, X, h["post"], h["comb"], name="X_attn")
    h = b.invoke(hc_pre, X, L.hc_ffn_fn, L.hc_ffn_scale, L.hc_ffn_base, name="ffn_hc")
    f = b.invoke(moe, b.rms_norm(h["y"], L.ffn_norm))
    return b.hc_post(f, X, h["post"], h["comb"], name="X_ffn")


@block("head", "§3.9", params=[("X", (D, HC, T)), ("norm", (D,))], output=Output((n_vocab, T)), scope="model")
def head(b, W, X, norm):
    """HC head (pre weights only, no Sinkhorn), final RMSNorm with `norm`, LM head."""
    mixes = b.linear(W.output_hc_fn, b.rms_norm(b.flatten(X)))
    pre = b.scale(b.sigmoid(b.add(b.mul(mixes, W.output_hc_scale), W.output_hc_base)), 1.0, hc_eps)
    y = b.rms_norm(b.hc_sum(X, pre), norm)
    return b.linear(W.output, y)


@block("output_head", "§3.9", params=[("X", (D, HC, T))], output=Output((n_vocab, T)), scope="model")
def output_head(b, W, X):
    """The trunk's logits: the head with the final norm."""
    return b.invoke(head, X, W.output_norm)


@block("mtp_input", "§3.10", params=[("Xprev", (D, HC, T)), ("e", (D, T))], output=Output((D, HC, T)))
def mtp_input(b, L, Xprev, e):
    """The MTP block's input rows: each row's token embedding `e` (normed once, the same in every
    stream) beside the trunk's final streams at the previous position (normed per stream; all
    zero at position 0), projected together: X[k] = eh_proj·[e; ĥ[k]], e first. No residual.
    The block then runs as a window-only layer and ends in the head (the MTP's own norm, falling
    back to output_norm; the root HC head and LM head)."""
    e = b.repeat_streams(b.rms_norm(e, L.nextn_enorm), HC)
    h = b.rms_norm(Xprev, L.nextn_hnorm)
    return b.linear(L.nextn_eh_proj, b.concat(e, h))
