"""The checkpoint's hyperparameters: config.json (HF names, spec §1.1), falling back to
inference/config.json (ModelArgs names) for absent keys."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from ..errors import BadKeyError, CorruptFileError, FileError, MissingKeyError

_REQ = object()
# field, config.json keys, inference/config.json (ModelArgs) keys, type, default
_CONFIG_FIELDS = [
    ("n_vocab", ("vocab_size",), ("vocab_size",), int, _REQ),
    ("n_embd", ("hidden_size",), ("dim",), int, _REQ),
    ("n_layer", ("num_hidden_layers",), ("n_layers",), int, _REQ),
    ("n_mtp", ("num_nextn_predict_layers",), ("n_mtp_layers",), int, 0),
    ("n_head", ("num_attention_heads",), ("n_heads",), int, _REQ),
    ("n_head_kv", ("num_key_value_heads",), (), int, 1),
    ("head_dim", ("head_dim",), ("head_dim",), int, _REQ),
    ("n_rot", ("qk_rope_head_dim",), ("rope_head_dim",), int, _REQ),
    ("q_lora_rank", ("q_lora_rank",), ("q_lora_rank",), int, _REQ),
    ("o_groups", ("o_groups",), ("o_groups",), int, _REQ),
    ("o_lora_rank", ("o_lora_rank",), ("o_lora_rank",), int, _REQ),
    ("n_swa", ("sliding_window",), ("window_size",), int, _REQ),
    ("compress_ratios", ("compress_ratios",), ("compress_ratios",), list, _REQ),
    ("rope_freq_base", ("rope_theta",), ("rope_theta",), float, _REQ),
    ("compress_rope_freq_base", ("compress_rope_theta",), ("compress_rope_theta",), float, _REQ),
    ("context_length", ("max_position_embeddings",), ("max_seq_len",), int, _REQ),
    ("n_expert", ("n_routed_experts",), ("n_routed_experts",), int, _REQ),
    ("n_expert_shared", ("n_shared_experts",), ("n_shared_experts",), int, 1),
    ("n_expert_used", ("num_experts_per_tok",), ("n_activated_experts",), int, _REQ),
    ("expert_ff", ("moe_intermediate_size",), ("moe_inter_dim",), int, _REQ),
    ("ff_length", ("intermediate_size",), (), int, None),
    ("expert_weights_scale", ("routed_scaling_factor",), ("route_scale",), float, _REQ),
    ("expert_weights_norm", ("norm_topk_prob",), (), bool, True),
    ("scoring_func", ("scoring_func",), ("score_func",), str, "sqrtsoftplus"),
    ("n_hash_layers", ("num_hash_layers",), ("n_hash_layers",), int, 0),
    ("swiglu_limit", ("swiglu_limit",), ("swiglu_limit",), float, _REQ),
    ("indexer_n_head", ("index_n_heads",), ("index_n_heads",), int, _REQ),
    ("indexer_head_dim", ("index_head_dim",), ("index_head_dim",), int, _REQ),
    ("indexer_top_k", ("index_topk",), ("index_topk",), int, _REQ),
    ("hc_mult", ("hc_mult",), ("hc_mult",), int, _REQ),
    ("hc_sinkhorn_iters", ("hc_sinkhorn_iters",), ("hc_sinkhorn_iters",), int, _REQ),
    ("hc_eps", ("hc_eps",), ("hc_eps",), float, _REQ),
    ("norm_eps", ("rms_norm_eps",), ("norm_eps",), float, _REQ),
    ("bos_id", ("bos_token_id",), (), int, None),
    ("eos_id", ("eos_token_id",), (), int, None),
]
# rope_scaling sub-keys: field, config.json rope_scaling key(s), ModelArgs key, type, default
_ROPE_FIELDS = [
    ("rope_scaling_factor", ("factor",), "rope_factor", float, _REQ),
    ("rope_orig_ctx", ("original_max_position_embeddings",), "original_seq_len", int, _REQ),
    ("yarn_beta_fast", ("beta_fast",), "beta_fast", float, 32.0),
    ("yarn_beta_slow", ("beta_slow",), "beta_slow", float, 1.0),
]


def _load_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as e:
        raise CorruptFileError(f"'{path}' is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise CorruptFileError(f"'{path}' does not hold a JSON object")
    return data


def read_config(hf_dir: str | os.PathLike) -> dict[str, Any]:
    """Hyperparameters from config.json (HF names, spec §1.1), falling back to inference/config.json
    (ModelArgs names) for absent keys. Raises MissingKeyError / BadKeyError with the key's name."""
    d = Path(hf_dir)
    path = d / "config.json"
    inf_path = d / "inference" / "config.json"
    if not path.is_file() and not inf_path.is_file():
        raise FileError(f"'{d}' has no config.json")
    cfg = _load_json(path) if path.is_file() else {}
    if isinstance(cfg.get("text_config"), dict):   # multimodal wrappers nest the text model's config
        cfg = {**cfg, **cfg["text_config"]}
    inf = _load_json(inf_path) if inf_path.is_file() else {}

    def cast(field_name, key, value, typ):
        try:
            if typ is list:
                if not isinstance(value, (list, tuple)):
                    raise TypeError
                return [int(v) for v in value]
            if typ is bool:
                if not isinstance(value, bool):
                    raise TypeError
                return value
            if typ is int and isinstance(value, (list, tuple)) and value:   # eos_token_id may be a list
                value = value[0]
            if typ is int and (isinstance(value, bool) or float(value) != int(value)):
                raise TypeError
            return typ(value)
        except (TypeError, ValueError):
            raise BadKeyError(f"config key '{key}' = {value!r} is not a valid {typ.__name__}") from None

    hp: dict[str, Any] = {}
    for fname, hf_keys, inf_keys, typ, default in _CONFIG_FIELDS:
        for src, keys in ((cfg, hf_keys), (inf, inf_keys)):
            hit = next((k for k in keys if src.get(k) is not None), None)
            if hit is not None:
                hp[fname] = cast(fname, hit, src[hit], typ)
                break
        else:
            if default is _REQ:
                alt = f" (or '{inf_keys[0]}' in inference/config.json)" if inf_keys else ""
                raise MissingKeyError(f"config.json key '{hf_keys[0]}'{alt} is missing")
            hp[fname] = default

    rs = cfg.get("rope_scaling") or cfg.get("rope_parameters") or {}
    if not isinstance(rs, dict):
        raise BadKeyError(f"config key 'rope_scaling' = {rs!r} is not an object")
    rtype = rs.get("type") or rs.get("rope_type") or ("yarn" if inf.get("rope_factor") is not None else None)
    if rtype is None:
        raise MissingKeyError("config.json key 'rope_scaling.type' is missing (DeepSeek-V4 uses YaRN)")
    if rtype != "yarn":
        raise BadKeyError(f"config key 'rope_scaling.type' is '{rtype}'; DeepSeek-V4 needs 'yarn'")
    hp["rope_scaling_type"] = "yarn"
    for fname, keys, inf_key, typ, default in _ROPE_FIELDS:
        hit = next((k for k in keys if rs.get(k) is not None), None)
        if hit is not None:
            hp[fname] = cast(fname, f"rope_scaling.{hit}", rs[hit], typ)
        elif inf.get(inf_key) is not None:
            hp[fname] = cast(fname, inf_key, inf[inf_key], typ)
        elif default is _REQ:
            raise MissingKeyError(f"config.json key 'rope_scaling.{keys[0]}' (or '{inf_key}' in inference/config.json) "
                                  "is missing")
        else:
            hp[fname] = default

    if hp["ff_length"] is None:
        hp["ff_length"] = hp["expert_ff"]
    if hp["n_head_kv"] != 1:
        raise BadKeyError(f"config key 'num_key_value_heads' is {hp['n_head_kv']}; "
                          "DeepSeek-V4 has one shared K = V head")
    if hp["scoring_func"] != "sqrtsoftplus":
        raise BadKeyError(f"config key 'scoring_func' is '{hp['scoring_func']}'; "
                          "DeepSeek-V4 routes with 'sqrtsoftplus'")
    if hp["n_head"] % hp["o_groups"]:
        raise BadKeyError("num_attention_heads must be divisible by o_groups")
    ratios = hp["compress_ratios"]
    n_layer = hp["n_layer"]
    if len(ratios) < n_layer:
        raise BadKeyError(f"config key 'compress_ratios' has {len(ratios)} entries for {n_layer} layers")
    if any(r not in (0, 4, 128) for r in ratios[: n_layer + 1]):
        raise BadKeyError(f"config key 'compress_ratios' may hold only 0, 4 and 128, got {ratios[: n_layer + 1]}")
    if not 0 <= hp["n_hash_layers"] <= n_layer:
        raise BadKeyError(f"config key 'num_hash_layers' = {hp['n_hash_layers']} is outside [0, {n_layer}]")
    return hp
