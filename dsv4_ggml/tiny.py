"""Tiny random DeepSeek-V4 models in llama.cpp's GGUF format (arch "deepseek4").

`write_tiny_model(path, seed=0, **overrides)` writes a small model with the spec §8
configuration by default: 6 layers with compress ratios 0/4/128 twice, hash routing on the first
two, a 512-token byte-level BPE vocabulary (`tiny_vocab`), and seeded weights scaled so activations
stay O(1) (Gaussian std 1/sqrt(fan_in), norms 1 + 0.1·N(0,1), `hc_*_fn` std 1/sqrt(HC·D), HC base
N(0, 0.5), HC scale U(0.5, 1.5), sinks N(0, 1), APE N(0, 0.5), router bias N(0, 0.1), `tid2eid` =
n_expert_used distinct experts per token id). `n_mtp_layers=1` adds the MTP block `blk.{n_layer}`.
Keys, value types, tensor names, shapes and dtypes are exactly those of a llama.cpp-converted
file (checked against `../shared/golden/` by the tests); `attention.compress_ratios` always has
n_layer + 1 entries (the last, 0, is the MTP block's slot, like the real config's 44 for 43 layers).

All tensors are F32 (`tid2eid` I32) unless `weight_type` / `expert_type` name a ggml type for the
matrices llama-quantize would quantize (`QUANTIZED`); rows a type's blocks do not fit fall back to
Q8_0, then F16, like llama-quantize. `recipe` mixes types per tensor like the community's
"dynamic" quants: a dict of name patterns (fnmatch, first match wins) to types, or the name of
one of `RECIPES`; a quantizable tensor no pattern matches takes weight_type / expert_type.

Files people have also carry what the engine does not compute with: `dspark_rank > 0` bundles the
DSpark draft head (llama.cpp's names, as its DeepSeek-V4 DSpark converter writes them), and
`ratio_tail` appends entries to `compress_ratios` beyond the file's blocks (the -0731 release's
46-entry array; readers use the first block_count entries).
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import fnmatch
import math
import numbers
import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from gguf import GGUFValueType, GGUFWriter

from codegen.tables import gguf_key

from .tiny_vocab import build_vocab

ARCH = "deepseek4"

# the ggml types a tiny model's matrices may have (the quantizable set of a llama.cpp conversion:
# token_embd, output, attention projections, indexer q, routed and shared experts; HC, norms,
# router, compressors and indexer.proj stay F32 like in the golden Q8_0 file)
WEIGHT_TYPES = ("f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "q5_0", "q5_1", "q2_k", "q3_k", "q4_k", "q5_k",
                "q6_k", "iq1_s", "iq1_m", "iq2_xxs", "iq2_xs", "iq2_s", "iq3_xxs", "iq3_s", "iq4_nl", "iq4_xs",
                "mxfp4")

# per-tensor mixes shaped like published DeepSeek-V4 GGUFs (routed experts at 1-4 bits, the shared
# expert, attention, embedding and head higher): together they use every type of WEIGHT_TYPES
RECIPES: dict[str, dict[str, str]] = {
    "iq1_m": {"*.ffn_down_exps.weight": "iq2_xxs", "*_exps.weight": "iq1_m", "*_shexp.weight": "q4_k",
              "*.attn_kv.weight": "q8_0", "blk.*": "q6_k", "token_embd.weight": "q4_k", "output.weight": "q6_k"},
    "iq1_s": {"*.ffn_down_exps.weight": "iq2_xs", "*_exps.weight": "iq1_s", "*_shexp.weight": "q3_k",
              "blk.*": "q5_k", "token_embd.weight": "q4_k", "output.weight": "q5_k"},
    "iq2": {"*.ffn_down_exps.weight": "iq2_s", "*_exps.weight": "iq2_xxs", "*_shexp.weight": "iq4_xs",
            "blk.*": "q4_k", "token_embd.weight": "iq4_nl", "output.weight": "q6_k"},
    "iq3": {"*.ffn_down_exps.weight": "iq3_s", "*_exps.weight": "iq3_xxs", "*_shexp.weight": "q5_k",
            "blk.*": "iq4_xs", "token_embd.weight": "q4_k", "output.weight": "q8_0"},
    "k": {"*.ffn_down_exps.weight": "q3_k", "*_exps.weight": "q2_k", "*_shexp.weight": "q4_k",
          "blk.*": "q5_k", "token_embd.weight": "q4_k", "output.weight": "q6_k"},
    "mxfp4": {"*_exps.weight": "mxfp4", "*_shexp.weight": "q8_0", "blk.*": "bf16",
              "token_embd.weight": "bf16", "output.weight": "f16"},
    "legacy": {"*.ffn_down_exps.weight": "q5_1", "*_exps.weight": "q4_0", "*_shexp.weight": "q5_0",
               "blk.*": "q4_1", "token_embd.weight": "q8_0", "output.weight": "f16"},
}

QUANTIZED = ("token_embd.weight", "output.weight", "attn_q_a.weight", "attn_q_b.weight", "attn_kv.weight",
             "attn_output_a.weight", "attn_output_b.weight", "indexer.attn_q_b.weight", "ffn_gate_exps.weight",
             "ffn_up_exps.weight", "ffn_down_exps.weight", "ffn_gate_shexp.weight", "ffn_up_shexp.weight",
             "ffn_down_shexp.weight", "nextn.eh_proj.weight")


_INT_FIELDS = ("n_vocab", "n_embd", "n_layer", "n_hash_layers", "n_mtp_layers", "n_head", "head_dim", "n_rot",
               "q_lora_rank", "o_groups", "o_lora_rank", "n_swa", "indexer_n_head", "indexer_head_dim",
               "indexer_top_k", "n_expert", "n_expert_used", "n_expert_shared", "expert_ff", "hc_mult",
               "hc_sinkhorn_iters", "rope_orig_ctx", "context_length", "distinct_experts", "dspark_rank")
_FLOAT_FIELDS = ("expert_weights_scale", "swiglu_limit", "swiglu_limit_shared", "hc_eps", "norm_eps",
                 "rope_freq_base", "compress_rope_freq_base", "rope_scaling_factor", "yarn_beta_fast",
                 "yarn_beta_slow")


@dataclass
class TinyConfig:
    """Hyperparameters of a tiny model (defaults: spec §8). Names are the reference's hparam names."""

    n_vocab: int = 512
    n_embd: int = 256
    n_layer: int = 6                # trunk layers (the MTP block comes on top: block_count = n_layer + n_mtp_layers)
    compress_ratios: list[int] = field(default_factory=lambda: [0, 4, 128, 0, 4, 128])   # one per trunk layer
    n_hash_layers: int = 2
    n_mtp_layers: int = 0           # 1: adds blk.{n_layer} with its nextn.* tensors (ratio 0, not hash-routed)
    n_head: int = 4
    head_dim: int = 256
    n_rot: int = 64
    q_lora_rank: int = 64
    o_groups: int = 2
    o_lora_rank: int = 32
    n_swa: int = 32
    indexer_n_head: int = 16
    indexer_head_dim: int = 128
    indexer_top_k: int = 8
    n_expert: int = 8
    n_expert_used: int = 2
    n_expert_shared: int = 1
    expert_ff: int = 128
    expert_weights_scale: float = 1.5
    swiglu_limit: float = 1.0
    swiglu_limit_shared: float | None = None   # None: same as swiglu_limit
    hc_mult: int = 4
    hc_sinkhorn_iters: int = 20
    hc_eps: float = 1e-6
    norm_eps: float = 1e-6
    rope_freq_base: float = 10000.0
    compress_rope_freq_base: float = 160000.0
    rope_scaling_factor: float = 16.0
    rope_orig_ctx: int = 65536
    yarn_beta_fast: float = 32.0    # written to the file; llama.cpp never reads them and uses 32 / 1 (spec §1.5)
    yarn_beta_slow: float = 1.0
    context_length: int = 32768
    weight_type: str = "f32"      # 2-D projections, experts, embedding and LM head
    expert_type: str | None = None  # routed experts (default: weight_type)
    distinct_experts: int = 0       # >0: draw this many routed experts per layer and repeat them to
    #                                 n_expert (a large benchmark file in seconds; 0: all drawn)
    recipe: str | dict | None = None   # per-tensor types: a RECIPES name or {pattern: type}
    dspark_rank: int = 0            # >0: bundle the DSpark draft head (markov rank), unused by the engine
    ratio_tail: list[int] = field(default_factory=list)   # compress_ratios entries after the blocks'

    def validate(self) -> None:
        """Raises ValueError naming the first option that cannot make a file llama.cpp's loader
        (and ours) accepts."""
        def need(cond: bool, msg: str) -> None:
            if not cond:
                raise ValueError(msg)
        for name in _INT_FIELDS:
            v = getattr(self, name)
            need(isinstance(v, numbers.Integral) and not isinstance(v, bool),
                 f"{name} must be an integer, got {v!r}")
        for name in _FLOAT_FIELDS:
            v = getattr(self, name)
            if v is None and name == "swiglu_limit_shared":
                continue
            need(isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v),
                 f"{name} must be a finite number, got {v!r}")
        for name in ("n_embd", "n_layer", "n_head", "head_dim", "n_rot", "q_lora_rank", "o_groups", "o_lora_rank",
                     "n_swa", "indexer_n_head", "indexer_head_dim", "indexer_top_k", "n_expert", "expert_ff",
                     "hc_sinkhorn_iters", "rope_orig_ctx", "context_length"):
            need(getattr(self, name) >= 1, f"{name} must be at least 1, got {getattr(self, name)}")
        need(isinstance(self.compress_ratios, (list, tuple)),
             f"compress_ratios must be a list of 0/4/128, got {self.compress_ratios!r}")
        need(len(self.compress_ratios) == self.n_layer,
             f"compress_ratios has {len(self.compress_ratios)} entries for {self.n_layer} layers "
             f"(give n_layer entries, or n_layer + 1 with a final 0)")
        bad = [r for r in self.compress_ratios
               if not (isinstance(r, numbers.Integral) and not isinstance(r, bool) and r in (0, 4, 128))]
        if bad:
            raise ValueError(f"compress ratios must be 0, 4 or 128 (llama.cpp rejects others), got {bad[0]!r}")
        need(0 <= self.n_hash_layers <= self.n_layer,
             f"n_hash_layers must be in [0, n_layer={self.n_layer}], got {self.n_hash_layers}")
        need(self.n_mtp_layers in (0, 1), f"n_mtp_layers must be 0 or 1, got {self.n_mtp_layers}")
        need(self.n_head % self.o_groups == 0,
             f"n_head ({self.n_head}) must be divisible by o_groups ({self.o_groups})")
        need(self.head_dim % 2 == 0, f"head_dim must be even, got {self.head_dim}")
        need(self.n_rot % 2 == 0, f"n_rot must be even, got {self.n_rot}")
        need(self.n_rot <= self.head_dim and self.n_rot <= self.indexer_head_dim,
             f"n_rot ({self.n_rot}) must fit in head_dim ({self.head_dim}) and indexer_head_dim "
             f"({self.indexer_head_dim})")
        need(1 <= self.n_expert_used <= self.n_expert,
             f"n_expert_used must be in [1, n_expert={self.n_expert}], got {self.n_expert_used}")
        need(0 <= self.distinct_experts <= self.n_expert,
             f"distinct_experts must be in [0, n_expert={self.n_expert}], got {self.distinct_experts}")
        need(self.n_expert_shared == 1, f"n_expert_shared must be 1, got {self.n_expert_shared}")
        need(self.hc_mult == 4, f"hc_mult must be 4 (llama.cpp requires it), got {self.hc_mult}")
        for name in ("norm_eps", "hc_eps", "swiglu_limit", "rope_scaling_factor", "expert_weights_scale"):
            need(getattr(self, name) > 0, f"{name} must be positive, got {getattr(self, name)}")
        need(self.swiglu_limit_shared is None or self.swiglu_limit_shared > 0,
             f"swiglu_limit_shared must be positive, got {self.swiglu_limit_shared}")
        for name in ("rope_freq_base", "compress_rope_freq_base"):
            need(getattr(self, name) > 1, f"{name} must be greater than 1, got {getattr(self, name)}")
        for name in (self.weight_type, self.expert_type or self.weight_type):
            need(isinstance(name, str) and name.lower() in WEIGHT_TYPES,
                 f"weight type {name!r} is not one of {', '.join(WEIGHT_TYPES)}")
        if self.recipe is not None:
            need(isinstance(self.recipe, dict) or self.recipe in RECIPES,
                 f"recipe must be a dict of name pattern -> type or one of {', '.join(RECIPES)}, got {self.recipe!r}")
            for pattern, kind in _recipe(self).items():
                need(isinstance(pattern, str) and isinstance(kind, str) and kind.lower() in WEIGHT_TYPES,
                     f"recipe entry {pattern!r}: {kind!r} is not one of {', '.join(WEIGHT_TYPES)}")
        need(self.dspark_rank >= 0, f"dspark_rank must be non-negative, got {self.dspark_rank}")
        need(isinstance(self.ratio_tail, (list, tuple)) and
             all(isinstance(r, numbers.Integral) and not isinstance(r, bool) and r >= 0 for r in self.ratio_tail),
             f"ratio_tail must be a list of non-negative integers, got {self.ratio_tail!r}")
        build_vocab(self.n_vocab)  # raises for a too small vocabulary


def _config(overrides: dict[str, Any]) -> TinyConfig:
    names = {f.name for f in dataclasses.fields(TinyConfig)}
    unknown = sorted(set(overrides) - names)
    if unknown:
        raise TypeError(f"write_tiny_model() got unknown option(s): {', '.join(unknown)} "
                        f"(known: {', '.join(sorted(names))})")
    opts = dict(overrides)
    if "compress_ratios" in opts:
        try:
            ratios = [int(r) if isinstance(r, numbers.Integral) and not isinstance(r, bool) else r
                      for r in opts["compress_ratios"]]
        except TypeError:
            raise ValueError(f"compress_ratios must be a sequence of 0/4/128, got {opts['compress_ratios']!r}") \
                from None
        n_layer = opts.get("n_layer", TinyConfig.n_layer)
        # llama.cpp-style lists carry one more entry than the trunk (the MTP/unused slot, always 0)
        if isinstance(n_layer, numbers.Integral) and len(ratios) == n_layer + 1 and ratios[-1] == 0:
            ratios = ratios[:-1]
        opts["compress_ratios"] = ratios
    for name, v in opts.items():   # NumPy scalars -> Python numbers (the returned config is plain data)
        if name in _INT_FIELDS and isinstance(v, numbers.Integral) and not isinstance(v, bool):
            opts[name] = int(v)
        elif name in _FLOAT_FIELDS and isinstance(v, numbers.Real) and not isinstance(v, bool):
            opts[name] = float(v)
    cfg = TinyConfig(**opts)
    if "compress_ratios" not in opts and isinstance(cfg.n_layer, numbers.Integral) and cfg.n_layer != 6:
        cfg.compress_ratios = [(0, 4, 128)[i % 3] for i in range(max(cfg.n_layer, 0))]
    if "n_hash_layers" not in opts and isinstance(cfg.n_layer, numbers.Integral):
        cfg.n_hash_layers = max(0, min(cfg.n_hash_layers, cfg.n_layer))
    cfg.validate()
    return cfg


class _Weights:
    """Seeded weights, drawn in file order."""

    def __init__(self, seed: int):
        self.rng = np.random.default_rng(seed)

    def matrix(self, *ne: int) -> np.ndarray:
        """ggml ne{in, out, ...} -> numpy [..., out, in], std 1/sqrt(in)."""
        return (self.rng.standard_normal(ne[::-1]) / np.sqrt(ne[0])).astype(np.float32)

    def normal(self, std: float, *shape: int, mean: float = 0.0) -> np.ndarray:
        return (mean + std * self.rng.standard_normal(shape)).astype(np.float32)

    def uniform(self, lo: float, hi: float, *shape: int) -> np.ndarray:
        return self.rng.uniform(lo, hi, shape).astype(np.float32)


@dataclass
class _Repeated:
    """Stacked experts [n, out, in] written as `total` experts: the drawn ones repeated in turn
    (converted once, then copied: quantization works row by row)."""

    drawn: np.ndarray
    total: int

    @property
    def shape(self) -> tuple[int, ...]:
        return (self.total, *self.drawn.shape[1:])

    def expand(self, converted: np.ndarray) -> np.ndarray:
        reps = -(-self.total // converted.shape[0])
        return np.concatenate([converted] * reps)[:self.total]


# llama.cpp's DSpark draft head (its `dflash` arch), bundled into a target file: name -> ne
# (ggml order) from the config; the engine ignores these tensors (codegen/v4.py foreign_family)
def _dspark_tensors(cfg: TinyConfig, w: _Weights) -> list[tuple[str, np.ndarray]]:
    r, D, V = cfg.dspark_rank, cfg.n_embd, cfg.n_vocab
    return [("fc.weight", w.matrix(2 * D, D)), ("enc.output_norm.weight", w.normal(0.1, D, mean=1.0)),
            ("markov_w1.weight", w.matrix(r, V)), ("markov_w2.weight", w.matrix(r, V)),
            ("markov_w2.scale", w.uniform(0.5, 1.5, 1)), ("conf_proj.weight", w.matrix(D + r, 1)),
            ("conf_proj.bias", w.normal(0.1, 1))]


def _layer_tensors(cfg: TinyConfig, w: _Weights, il: int, mtp: bool) -> list[tuple[str, np.ndarray]]:
    D, H, Dh, HC = cfg.n_embd, cfg.n_head, cfg.head_dim, cfg.hc_mult
    mix = (2 + HC) * HC
    ratio = 0 if mtp else cfg.compress_ratios[il]
    hashed = not mtp and il < cfg.n_hash_layers
    F, E = cfg.expert_ff, cfg.n_expert
    p = f"blk.{il}."
    t: list[tuple[str, np.ndarray]] = []

    def norm(n: int) -> np.ndarray:
        return w.normal(0.1, n, mean=1.0)

    if mtp:
        t += [(p + "nextn.eh_proj.weight", w.matrix(2 * D, D)),
              (p + "nextn.enorm.weight", norm(D)),
              (p + "nextn.hnorm.weight", norm(D)),
              (p + "nextn.shared_head_norm.weight", norm(D))]
    t += [
        (p + "attn_norm.weight", norm(D)),
        (p + "attn_sinks.weight", w.normal(1.0, H)),
        (p + "attn_q_a.weight", w.matrix(D, cfg.q_lora_rank)),
        (p + "attn_q_a_norm.weight", norm(cfg.q_lora_rank)),
        (p + "attn_q_b.weight", w.matrix(cfg.q_lora_rank, H * Dh)),
        (p + "attn_kv.weight", w.matrix(D, Dh)),
        (p + "attn_kv_a_norm.weight", norm(Dh)),
        (p + "attn_output_a.weight", w.matrix(H * Dh // cfg.o_groups, cfg.o_groups * cfg.o_lora_rank)),
        (p + "attn_output_b.weight", w.matrix(cfg.o_groups * cfg.o_lora_rank, D)),
    ]
    for site in ("attn", "ffn"):
        t += [(p + f"hc_{site}_fn.weight", w.normal(1.0 / np.sqrt(HC * D), mix, HC * D)),
              (p + f"hc_{site}_base.weight", w.normal(0.5, mix)),
              (p + f"hc_{site}_scale.weight", w.uniform(0.5, 1.5, 3))]
    if ratio:
        c = 2 if ratio == 4 else 1
        t += [(p + "attn_compressor_kv.weight", w.matrix(D, c * Dh)),
              (p + "attn_compressor_gate.weight", w.matrix(D, c * Dh)),
              (p + "attn_compressor_ape.weight", w.normal(0.5, ratio, c * Dh)),
              (p + "attn_compressor_norm.weight", norm(Dh))]
    if ratio == 4:
        Di, HI = cfg.indexer_head_dim, cfg.indexer_n_head
        t += [(p + "indexer.proj.weight", w.matrix(D, HI)),
              (p + "indexer.attn_q_b.weight", w.matrix(cfg.q_lora_rank, HI * Di)),
              (p + "indexer_compressor_kv.weight", w.matrix(D, 2 * Di)),
              (p + "indexer_compressor_gate.weight", w.matrix(D, 2 * Di)),
              (p + "indexer_compressor_ape.weight", w.normal(0.5, ratio, 2 * Di)),
              (p + "indexer_compressor_norm.weight", norm(Di))]
    t.append((p + "ffn_gate_inp.weight", w.matrix(D, E)))
    if hashed:  # tid2eid[v]: n_expert_used distinct experts per token id
        table = np.stack([w.rng.permutation(E)[:cfg.n_expert_used] for _ in range(cfg.n_vocab)])
        t.append((p + "ffn_gate_tid2eid.weight", table.astype(np.int32)))
    else:
        t.append((p + "exp_probs_b.bias", w.normal(0.1, E)))
    n_drawn = cfg.distinct_experts or E

    def experts(n_in: int, n_out: int) -> np.ndarray | _Repeated:
        drawn = w.matrix(n_in, n_out, n_drawn)
        return drawn if n_drawn == E else _Repeated(drawn, E)

    t += [
        (p + "ffn_norm.weight", norm(D)),
        (p + "ffn_gate_exps.weight", experts(D, F)),
        (p + "ffn_up_exps.weight", experts(D, F)),
        (p + "ffn_down_exps.weight", experts(F, D)),
        (p + "ffn_gate_shexp.weight", w.matrix(D, F * cfg.n_expert_shared)),
        (p + "ffn_up_shexp.weight", w.matrix(D, F * cfg.n_expert_shared)),
        (p + "ffn_down_shexp.weight", w.matrix(F * cfg.n_expert_shared, D)),
    ]
    return t


def write_tiny_model(path: str | os.PathLike, seed: int = 0, **overrides: Any) -> dict[str, Any]:
    """Writes a tiny DeepSeek-V4 GGUF and returns its configuration as a dict.

    Every `TinyConfig` field can be overridden by keyword (an unknown keyword raises TypeError,
    an unusable value ValueError). The weights depend only on `seed` and the configuration: the same
    call writes the same bytes. The returned dict is `TinyConfig`'s fields plus `seed` and
    `tensor_types` (tensor name -> ggml type, for the tensors not written as F32)."""
    if not (isinstance(seed, numbers.Integral) and not isinstance(seed, bool) and seed >= 0):
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    cfg = _config(overrides)
    vocab = build_vocab(cfg.n_vocab)
    n_blocks = cfg.n_layer + cfg.n_mtp_layers
    ratios = list(cfg.compress_ratios) + [0] * cfg.n_mtp_layers
    ratios_key = ratios + ([0] if cfg.n_mtp_layers == 0 else [])   # one extra entry, like the real files
    ratios_key += [int(r) for r in cfg.ratio_tail]
    shexp = cfg.swiglu_limit if cfg.swiglu_limit_shared is None else cfg.swiglu_limit_shared

    w = GGUFWriter(os.fspath(path), ARCH)
    k = f"{ARCH}."
    U32, F32, BOOL, STR = GGUFValueType.UINT32, GGUFValueType.FLOAT32, GGUFValueType.BOOL, GGUFValueType.STRING
    ARR, I32 = GGUFValueType.ARRAY, GGUFValueType.INT32
    # keys by the DSL's hyperparameter names (codegen/v4.py holds each key once); then the keys
    # llama.cpp's files carry that the engine does not read
    kv = [
        ("n_layer_all", n_blocks, U32),
        ("n_ctx_train", cfg.context_length, U32),
        ("n_embd", cfg.n_embd, U32),
        (k + "embedding_length_out", cfg.hc_mult * cfg.n_embd, U32),
        (k + "feed_forward_length", cfg.expert_ff, U32),
        ("n_head", cfg.n_head, U32),
        ("n_head_kv", 1, U32),
        ("head_dim", cfg.head_dim, U32),
        ("head_dim_v", cfg.head_dim, U32),
        ("n_rot", cfg.n_rot, U32),
        ("rope_freq_base", cfg.rope_freq_base, F32),
        ("rope_scaling_type", "yarn", STR),
        ("rope_scaling_factor", cfg.rope_scaling_factor, F32),
        ("rope_orig_ctx", cfg.rope_orig_ctx, U32),
        (k + "rope.scaling.yarn_beta_fast", cfg.yarn_beta_fast, F32),
        (k + "rope.scaling.yarn_beta_slow", cfg.yarn_beta_slow, F32),
        ("norm_eps", cfg.norm_eps, F32),
        ("q_lora_rank", cfg.q_lora_rank, U32),
        ("n_swa", cfg.n_swa, U32),
        ("n_expert", cfg.n_expert, U32),
        ("n_expert_used", cfg.n_expert_used, U32),
        ("expert_ff", cfg.expert_ff, U32),
        ("n_expert_shared", cfg.n_expert_shared, U32),
        ("expert_weights_scale", cfg.expert_weights_scale, F32),
        ("expert_weights_norm", True, BOOL),
        ("expert_gating_func", 4, U32),
    ]
    for key, value, vtype in kv:
        w.add_key_value(key if key.startswith(k) else gguf_key(key), value, vtype)
    w.add_key_value(gguf_key("swiglu_clamp_exp"), [cfg.swiglu_limit] * n_blocks, ARR, sub_type=F32)
    w.add_key_value(gguf_key("swiglu_clamp_shexp"), [shexp] * n_blocks, ARR, sub_type=F32)
    for key, value, vtype in [
        ("indexer_n_head", cfg.indexer_n_head, U32),
        ("indexer_head_dim", cfg.indexer_head_dim, U32),
        ("indexer_top_k", cfg.indexer_top_k, U32),
        ("o_groups", cfg.o_groups, U32),
        ("o_lora_rank", cfg.o_lora_rank, U32),
    ]:
        w.add_key_value(gguf_key(key), value, vtype)
    w.add_key_value(gguf_key("compress_ratios"), ratios_key, ARR, sub_type=I32)
    w.add_key_value(gguf_key("compress_rope_freq_base"), cfg.compress_rope_freq_base, F32)
    w.add_key_value(gguf_key("hc_mult"), cfg.hc_mult, U32)
    w.add_key_value(gguf_key("hc_sinkhorn_iters"), cfg.hc_sinkhorn_iters, U32)
    w.add_key_value(gguf_key("hc_eps"), cfg.hc_eps, F32)
    w.add_key_value(gguf_key("n_hash_layers"), cfg.n_hash_layers, U32)
    if cfg.n_mtp_layers:
        w.add_key_value(gguf_key("n_nextn"), cfg.n_mtp_layers, U32)

    w.add_key_value("tokenizer.ggml.model", "gpt2", STR)
    w.add_key_value("tokenizer.ggml.pre", "deepseek-v3", STR)
    w.add_key_value("tokenizer.ggml.tokens", list(vocab.tokens), ARR, sub_type=STR)
    w.add_key_value("tokenizer.ggml.token_type", list(vocab.token_types), ARR, sub_type=I32)
    w.add_key_value("tokenizer.ggml.merges", list(vocab.merges), ARR, sub_type=STR)
    w.add_key_value("tokenizer.ggml.bos_token_id", vocab.bos_id, U32)
    w.add_key_value("tokenizer.ggml.eos_token_id", vocab.eos_id, U32)
    w.add_key_value("tokenizer.ggml.add_bos_token", True, BOOL)

    types: dict[str, str] = {}
    rng = _Weights(seed)
    D, HC = cfg.n_embd, cfg.hc_mult
    tensors = [
        ("token_embd.weight", rng.normal(1.0, cfg.n_vocab, D)),
        ("output_norm.weight", rng.normal(0.1, D, mean=1.0)),
        ("output.weight", rng.matrix(D, cfg.n_vocab)),
        ("output_hc_fn.weight", rng.normal(1.0 / np.sqrt(HC * D), HC, HC * D)),
        ("output_hc_base.weight", rng.normal(0.5, HC)),
        ("output_hc_scale.weight", rng.uniform(0.5, 1.5, 1)),
    ]
    for il in range(n_blocks):
        tensors += _layer_tensors(cfg, rng, il, mtp=il >= cfg.n_layer)
    if cfg.dspark_rank:
        tensors += _dspark_tensors(cfg, rng)
    kinds: list[str] = []
    for name, data in tensors:
        wanted = _wanted_type(cfg, name)
        if wanted is None or wanted == "f32":
            kinds.append("f32")
        else:
            kinds.append(_fitting_type(wanted, data.shape[-1]))
            types[name] = kinds[-1]

    def convert(data: np.ndarray, kind: str) -> tuple[np.ndarray, Any]:
        if kind == "f32":
            return np.ascontiguousarray(data), None
        if kind == "f16":
            return data.astype(np.float16), None
        from .quantize import ggml_type, quantize
        return quantize(data, ggml_type(kind)), ggml_type(kind)

    def converted(data: Any, kind: str) -> tuple[np.ndarray, Any]:
        if isinstance(data, _Repeated):
            out, raw = convert(data.drawn, kind)
            return data.expand(out), raw
        return convert(data, kind)

    # ggml's quantizers release the GIL (cffi): the tensors are converted in parallel, in file order
    with concurrent.futures.ThreadPoolExecutor(min(8, os.cpu_count() or 1)) as pool:
        for (name, _), (data, raw) in zip(tensors, pool.map(converted, [d for _, d in tensors], kinds)):
            w.add_tensor(name, data, raw_dtype=raw)

    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    out = dataclasses.asdict(cfg)
    out["seed"] = seed
    out["tensor_types"] = types
    return out


def _recipe(cfg: TinyConfig) -> dict:
    return RECIPES[cfg.recipe] if isinstance(cfg.recipe, str) else dict(cfg.recipe or {})


def _wanted_type(cfg: TinyConfig, name: str) -> str | None:
    suffix = name.split(".", 2)[-1] if name.startswith("blk.") else name
    if suffix not in QUANTIZED:
        return None
    for pattern, kind in _recipe(cfg).items():
        if fnmatch.fnmatchcase(name, pattern):
            return kind.lower()
    if suffix.endswith("_exps.weight"):
        return (cfg.expert_type or cfg.weight_type).lower()
    return cfg.weight_type.lower()


def _fitting_type(kind: str, n_per_row: int) -> str:
    """`kind`, or the nearest type whose blocks fit rows of n_per_row values (like
    llama-quantize's fallback for small tensors): q8_0, then f16."""
    if kind in ("f32", "f16"):
        return kind
    from .quantize import block_size, ggml_type
    if n_per_row % block_size(ggml_type(kind)) == 0:
        return kind
    return "q8_0" if n_per_row % 32 == 0 else "f16"
