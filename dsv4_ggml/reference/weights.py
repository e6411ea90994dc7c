"""GGUF -> hyperparameter dict + float64 weight arrays (spec §1.4, §1.5, §2).

Weights keep their GGUF names without the ``.weight`` / ``.bias`` suffix (``attn_q_a``,
``exp_probs_b`` ...). Arrays are NumPy row-major, i.e. ggml ``ne`` reversed: a linear layer
``ne{in, out}`` is ``[out, in]`` and ``x @ W.T`` applies it.
"""

from __future__ import annotations

import numpy as np

from ..errors import (BadKeyError, MissingKeyError, MissingTensorError, ModelFormatError,
                      TensorShapeError, WrongArchitectureError)

ARCH = "deepseek4"
SQRT_SOFTPLUS = 4  # expert_gating_func value for sqrt(softplus) (spec §1.4)
# llama.cpp never reads rope.scaling.yarn_beta_* and always uses 32 / 1 (spec §1.3, §1.5).
YARN_BETA_FAST = 32.0
YARN_BETA_SLOW = 1.0


def _read_field(reader, key, default=None, required=True):
    field = reader.fields.get(key)
    if field is None:
        if required:
            raise MissingKeyError(f"GGUF key '{key}' is missing")
        return default
    return field.contents()


def _per_layer_floats(reader, key, n_layer, fallback=None):
    """An f32 array of exactly n_layer (= block_count) entries, or one scalar repeated (spec §1.5)."""
    value = _read_field(reader, key, required=fallback is None)
    if value is None:
        return list(fallback)
    if isinstance(value, (list, tuple)):
        if len(value) != n_layer:
            raise BadKeyError(f"GGUF key '{key}' has {len(value)} entries, expected block_count = {n_layer}")
        return [float(v) for v in value]
    return [float(value)] * n_layer


def read_hparams(reader) -> dict:
    """Hyperparameters with clear names, read by literal key (the gguf package has no DS4 constants)."""
    arch = _read_field(reader, "general.architecture")
    if arch != ARCH:
        raise WrongArchitectureError(f"general.architecture is '{arch}', expected '{ARCH}'")

    def key(suffix, default=None, required=True):
        return _read_field(reader, f"{ARCH}.{suffix}", default, required)

    n_layer = int(key("block_count"))
    n_nextn = int(key("nextn_predict_layers", 0, required=False))
    n_layer -= n_nextn  # the MTP block is not part of the trunk (not needed by the reference)

    head_dim = int(key("attention.key_length"))
    if int(key("attention.value_length")) != head_dim:
        raise BadKeyError("attention.value_length must equal attention.key_length (K = V)")
    if int(key("attention.head_count_kv")) != 1:
        raise BadKeyError("attention.head_count_kv must be 1 (one shared K = V vector)")
    if int(key("expert_gating_func")) != SQRT_SOFTPLUS:
        raise BadKeyError(f"expert_gating_func must be {SQRT_SOFTPLUS} (sqrt(softplus))")
    scaling_type = key("rope.scaling.type")
    if scaling_type != "yarn":
        raise BadKeyError(f"rope.scaling.type is '{scaling_type}', expected 'yarn'")

    ratios = [int(r) for r in key("attention.compress_ratios")]
    if len(ratios) < n_layer:
        raise BadKeyError(f"attention.compress_ratios has {len(ratios)} entries, fewer than {n_layer} layers")
    ratios = ratios[:n_layer]
    if any(r not in (0, 4, 128) for r in ratios):
        raise BadKeyError(f"attention.compress_ratios must hold only 0, 4, 128; got {ratios}")

    block_count = n_layer + n_nextn
    clamp_exp = _per_layer_floats(reader, f"{ARCH}.swiglu_clamp_exp", block_count)
    # the shared-expert limit falls back to the routed one (spec §1.4)
    clamp_shexp = _per_layer_floats(reader, f"{ARCH}.swiglu_clamp_shexp", block_count, fallback=clamp_exp)

    tokens = reader.fields.get("tokenizer.ggml.tokens")
    n_vocab = len(tokens.data) if tokens is not None else None

    hp = dict(
        n_layer=n_layer,
        n_embd=int(key("embedding_length")),
        n_head=int(key("attention.head_count")),
        head_dim=head_dim,
        n_rot=int(key("rope.dimension_count")),
        q_lora_rank=int(key("attention.q_lora_rank")),
        o_groups=int(key("attention.output_group_count")),
        o_lora_rank=int(key("attention.output_lora_rank")),
        n_swa=int(key("attention.sliding_window")),
        compress_ratios=ratios,
        rope_freq_base=float(key("rope.freq_base")),
        compress_rope_freq_base=float(key("attention.compress_rope_freq_base")),
        rope_scaling_factor=float(key("rope.scaling.factor")),
        rope_orig_ctx=int(key("rope.scaling.original_context_length")),
        yarn_beta_fast=YARN_BETA_FAST,
        yarn_beta_slow=YARN_BETA_SLOW,
        norm_eps=float(key("attention.layer_norm_rms_epsilon")),
        hc_mult=int(key("hyper_connection.count")),
        hc_sinkhorn_iters=int(key("hyper_connection.sinkhorn_iterations")),
        hc_eps=float(key("hyper_connection.epsilon")),
        n_expert=int(key("expert_count")),
        n_expert_used=int(key("expert_used_count")),
        n_expert_shared=int(key("expert_shared_count", 0, required=False)),
        expert_ff=int(key("expert_feed_forward_length")),
        expert_weights_scale=float(key("expert_weights_scale", 1.0, required=False)),
        expert_weights_norm=bool(key("expert_weights_norm", False, required=False)),
        swiglu_clamp_exp=clamp_exp[:n_layer],
        swiglu_clamp_shexp=clamp_shexp[:n_layer],
        n_hash_layers=int(key("hash_layer_count", 0, required=False)),
        indexer_n_head=int(key("attention.indexer.head_count", 0, required=4 in ratios)),
        indexer_head_dim=int(key("attention.indexer.key_length", 0, required=4 in ratios)),
        indexer_top_k=int(key("attention.indexer.top_k", 0, required=4 in ratios)),
        n_ctx_train=int(key("context_length")),
        n_vocab=n_vocab,
    )
    if hp["n_head"] % hp["o_groups"]:
        raise BadKeyError("attention.head_count must be divisible by attention.output_group_count")
    if hp["n_rot"] % 2 or hp["n_rot"] > hp["head_dim"]:
        raise BadKeyError("rope.dimension_count must be even and <= attention.key_length")
    if 4 in ratios and (hp["n_rot"] > hp["indexer_head_dim"] or hp["indexer_top_k"] < 1):
        raise BadKeyError("attention.indexer.key_length must be >= rope.dimension_count and top_k >= 1")
    if hp["hc_sinkhorn_iters"] < 1:
        raise BadKeyError("hyper_connection.sinkhorn_iterations must be >= 1")
    return hp


def _tensor_to_f64(tensor) -> np.ndarray:
    import gguf

    if tensor.tensor_type in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F64,
                              gguf.GGMLQuantizationType.F16):
        return np.array(tensor.data, dtype=np.float64)
    if tensor.tensor_type in (gguf.GGMLQuantizationType.I32, gguf.GGMLQuantizationType.I64,
                              gguf.GGMLQuantizationType.I16, gguf.GGMLQuantizationType.I8):
        return np.array(tensor.data, dtype=np.int64)
    return np.asarray(gguf.quants.dequantize(tensor.data, tensor.tensor_type), dtype=np.float64)


def _strip_suffix(name: str) -> str:
    for suffix in (".weight", ".bias"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def load_model(path):
    """Read a DS4 GGUF. Returns (hparams, global weights, per-layer weight dicts)."""
    import gguf

    reader = gguf.GGUFReader(str(path))
    hp = read_hparams(reader)
    n_layer = hp["n_layer"]
    globals_: dict[str, np.ndarray] = {}
    layers: list[dict[str, np.ndarray]] = [dict() for _ in range(n_layer)]
    for tensor in reader.tensors:
        name = _strip_suffix(tensor.name)
        if name.startswith("blk."):
            _, idx, local = name.split(".", 2)
            if int(idx) < n_layer:  # skip the MTP block (blk.{n_layer})
                layers[int(idx)][local] = _tensor_to_f64(tensor)
        else:
            globals_[name] = _tensor_to_f64(tensor)

    for name in ("token_embd", "output_norm", "output", "output_hc_fn", "output_hc_base", "output_hc_scale"):
        if name not in globals_:
            raise MissingTensorError(f"GGUF tensor '{name}.weight' is missing")
    if hp["n_vocab"] is None:
        hp["n_vocab"] = globals_["token_embd"].shape[0]
    if globals_["token_embd"].shape != (hp["n_vocab"], hp["n_embd"]):
        raise TensorShapeError(f"token_embd has shape {globals_['token_embd'].shape}, "
                        f"expected [n_vocab={hp['n_vocab']}, n_embd={hp['n_embd']}]")

    for il, w in enumerate(layers):
        _check_layer(hp, il, w)
        # attn_output_a ne{H*Dh/G, G*R} is a stack of G matrices [R, H*Dh/G], group slowest (§7 #23).
        w["attn_output_a"] = w["attn_output_a"].reshape(
            hp["o_groups"], hp["o_lora_rank"], hp["n_head"] * hp["head_dim"] // hp["o_groups"])
    return hp, globals_, layers


def _check_layer(hp, il, w):
    required = ["attn_norm", "attn_sinks", "attn_q_a", "attn_q_a_norm", "attn_q_b", "attn_kv",
                "attn_kv_a_norm", "attn_output_a", "attn_output_b",
                "hc_attn_fn", "hc_attn_base", "hc_attn_scale", "hc_ffn_fn", "hc_ffn_base", "hc_ffn_scale",
                "ffn_norm", "ffn_gate_inp", "ffn_gate_exps", "ffn_up_exps", "ffn_down_exps"]
    if hp["n_expert_shared"] > 0:
        required += ["ffn_gate_shexp", "ffn_up_shexp", "ffn_down_shexp"]
    ratio = hp["compress_ratios"][il]
    if ratio:
        required += ["attn_compressor_kv", "attn_compressor_gate", "attn_compressor_ape", "attn_compressor_norm"]
    if ratio == 4:
        required += ["indexer.attn_q_b", "indexer.proj", "indexer_compressor_kv", "indexer_compressor_gate",
                     "indexer_compressor_ape", "indexer_compressor_norm"]
    required.append("ffn_gate_tid2eid" if il < hp["n_hash_layers"] else "exp_probs_b")
    for name in required:
        if name not in w:
            raise MissingTensorError(f"GGUF tensor 'blk.{il}.{name}' is missing")
    expected_a = (hp["o_groups"] * hp["o_lora_rank"], hp["n_head"] * hp["head_dim"] // hp["o_groups"])
    if w["attn_output_a"].shape != expected_a:
        raise TensorShapeError(f"blk.{il}.attn_output_a has shape {w['attn_output_a'].shape}, expected {expected_a}")
    if il < hp["n_hash_layers"]:
        lut = w["ffn_gate_tid2eid"]
        if lut.shape != (hp["n_vocab"], hp["n_expert_used"]):
            raise TensorShapeError(f"blk.{il}.ffn_gate_tid2eid has shape {lut.shape}, "
                            f"expected [n_vocab, n_expert_used] = {(hp['n_vocab'], hp['n_expert_used'])}")
        if lut.min() < 0 or lut.max() >= hp["n_expert"]:
            raise ModelFormatError(f"blk.{il}.ffn_gate_tid2eid holds expert ids outside [0, {hp['n_expert']})")
