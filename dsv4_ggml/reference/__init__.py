"""Float64 NumPy reference forward pass of DeepSeek-V4, written from spec/ARCHITECTURE.md.

One module per job: ``weights`` (GGUF -> hparams + float64 arrays), ``hc`` (mHC, §3.2),
``rope`` (§1.3, §3.4.3), ``attention`` (§3.4), ``compressor`` (§3.5), ``indexer`` (§3.6),
``moe`` (§3.8), ``state`` (§4), ``model`` (the block loop and :class:`Reference`), ``mtp`` (§3.10).
"""

from .attention import (attention_layer, compressed_candidates, grouped_out_proj, indexer_select, kv_proj,
                        query_proj, sparse_attention, window_indices)
from .common import rms_norm, sigmoid, silu, softmax
from .compressor import CompressorState, compress_block, compress_kv, compressor_project, pool_block
from .hc import hc_head, hc_mixes, hc_post, hc_pre, sinkhorn
from .indexer import indexer_query, indexer_scores, indexer_topk, indexer_topk_margins, indexer_weights
from .model import Reference, block
from .moe import expert_ffn, moe_layer, route, routed_experts, router_margins, router_scores, swiglu_clamp
from .mtp import MtpState, MtpWeights, load_mtp, mtp_head, mtp_input, mtp_logits
from .rope import layer_rope_freqs, rope, rope_freqs, yarn_corr_dims, yarn_freqs
from .state import LayerState, RowCache, WindowRing
from .weights import load_model, read_hparams

__all__ = [
    "Reference", "block", "load_model", "read_hparams",
    "rms_norm", "sigmoid", "silu", "softmax",
    "sinkhorn", "hc_mixes", "hc_pre", "hc_post", "hc_head",
    "rope", "rope_freqs", "yarn_freqs", "yarn_corr_dims", "layer_rope_freqs",
    "attention_layer", "query_proj", "kv_proj", "window_indices", "sparse_attention", "grouped_out_proj",
    "compressed_candidates", "indexer_select",
    "compressor_project", "pool_block", "compress_block", "compress_kv", "CompressorState",
    "indexer_query", "indexer_weights", "indexer_scores", "indexer_topk", "indexer_topk_margins",
    "router_scores", "route", "router_margins", "swiglu_clamp", "expert_ffn", "routed_experts", "moe_layer",
    "WindowRing", "RowCache", "LayerState",
    "MtpWeights", "MtpState", "load_mtp", "mtp_input", "mtp_head", "mtp_logits",
]
