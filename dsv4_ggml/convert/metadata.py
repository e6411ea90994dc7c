"""The GGUF metadata: exactly the key set (names and value types) of `dsv4_ggml.tiny.write_tiny_model`,
plus `tokenizer.chat_template` when the checkpoint has one."""
from __future__ import annotations

from typing import Any

from gguf import GGUFValueType, GGUFWriter

from ..tiny import ARCH


def _write_metadata(w: GGUFWriter, hp: dict[str, Any], tok: dict[str, Any], mtp: bool) -> None:
    U32, F32, BOOL, STR = GGUFValueType.UINT32, GGUFValueType.FLOAT32, GGUFValueType.BOOL, GGUFValueType.STRING
    ARR, I32 = GGUFValueType.ARRAY, GGUFValueType.INT32
    n_layer = hp["n_layer"]
    n_blocks = n_layer + (1 if mtp else 0)
    ratios = list(hp["compress_ratios"][:n_layer])
    ratios.append(hp["compress_ratios"][n_layer] if len(hp["compress_ratios"]) > n_layer else 0)  # MTP entry
    k = f"{ARCH}."
    for key, value, vtype in [
        ("block_count", n_blocks, U32),
        ("context_length", hp["context_length"], U32),
        ("embedding_length", hp["n_embd"], U32),
        ("embedding_length_out", hp["hc_mult"] * hp["n_embd"], U32),
        ("feed_forward_length", hp["ff_length"], U32),
        ("attention.head_count", hp["n_head"], U32),
        ("attention.head_count_kv", 1, U32),
        ("attention.key_length", hp["head_dim"], U32),
        ("attention.value_length", hp["head_dim"], U32),
        ("rope.dimension_count", hp["n_rot"], U32),
        ("rope.freq_base", hp["rope_freq_base"], F32),
        ("rope.scaling.type", hp["rope_scaling_type"], STR),
        ("rope.scaling.factor", hp["rope_scaling_factor"], F32),
        ("rope.scaling.original_context_length", hp["rope_orig_ctx"], U32),
        ("rope.scaling.yarn_beta_fast", hp["yarn_beta_fast"], F32),
        ("rope.scaling.yarn_beta_slow", hp["yarn_beta_slow"], F32),
        ("attention.layer_norm_rms_epsilon", hp["norm_eps"], F32),
        ("attention.q_lora_rank", hp["q_lora_rank"], U32),
        ("attention.sliding_window", hp["n_swa"], U32),
        ("expert_count", hp["n_expert"], U32),
        ("expert_used_count", hp["n_expert_used"], U32),
        ("expert_feed_forward_length", hp["expert_ff"], U32),
        ("expert_shared_count", hp["n_expert_shared"], U32),
        ("expert_weights_scale", hp["expert_weights_scale"], F32),
        ("expert_weights_norm", hp["expert_weights_norm"], BOOL),
        ("expert_gating_func", 4, U32),   # SQRT_SOFTPLUS (checked in read_config)
    ]:
        w.add_key_value(k + key, value, vtype)
    w.add_key_value(k + "swiglu_clamp_exp", [hp["swiglu_limit"]] * n_blocks, ARR, sub_type=F32)
    w.add_key_value(k + "swiglu_clamp_shexp", [hp["swiglu_limit"]] * n_blocks, ARR, sub_type=F32)
    for key, value, vtype in [
        ("attention.indexer.head_count", hp["indexer_n_head"], U32),
        ("attention.indexer.key_length", hp["indexer_head_dim"], U32),
        ("attention.indexer.top_k", hp["indexer_top_k"], U32),
        ("attention.output_group_count", hp["o_groups"], U32),
        ("attention.output_lora_rank", hp["o_lora_rank"], U32),
    ]:
        w.add_key_value(k + key, value, vtype)
    w.add_key_value(k + "attention.compress_ratios", ratios, ARR, sub_type=I32)
    w.add_key_value(k + "attention.compress_rope_freq_base", hp["compress_rope_freq_base"], F32)
    w.add_key_value(k + "hyper_connection.count", hp["hc_mult"], U32)
    w.add_key_value(k + "hyper_connection.sinkhorn_iterations", hp["hc_sinkhorn_iters"], U32)
    w.add_key_value(k + "hyper_connection.epsilon", hp["hc_eps"], F32)
    w.add_key_value(k + "hash_layer_count", hp["n_hash_layers"], U32)
    if mtp:
        w.add_key_value(k + "nextn_predict_layers", 1, U32)

    w.add_key_value("tokenizer.ggml.model", "gpt2", STR)
    w.add_key_value("tokenizer.ggml.pre", "deepseek-v3", STR)
    w.add_key_value("tokenizer.ggml.tokens", tok["tokens"], ARR, sub_type=STR)
    w.add_key_value("tokenizer.ggml.token_type", tok["types"], ARR, sub_type=I32)
    w.add_key_value("tokenizer.ggml.merges", tok["merges"], ARR, sub_type=STR)
    w.add_key_value("tokenizer.ggml.bos_token_id", hp["bos_id"], U32)
    w.add_key_value("tokenizer.ggml.eos_token_id", hp["eos_id"], U32)
    w.add_key_value("tokenizer.ggml.add_bos_token", True, BOOL)
    if tok.get("chat_template"):
        w.add_key_value("tokenizer.chat_template", tok["chat_template"], STR)
