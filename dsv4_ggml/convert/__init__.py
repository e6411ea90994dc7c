"""Official DeepSeek-V4 safetensors checkpoint -> GGUF in llama.cpp's DeepSeek-V4 format (arch "deepseek4").

    from dsv4_ggml.convert import convert
    stats = convert("DeepSeek-V4-Flash/", "dsv4-flash-q8_0.gguf", outtype="q8_0")

    python -m dsv4_ggml.convert HF_DIR OUT.gguf --outtype q8_0 [--experts auto|mxfp4|f32|bf16|f16|q8_0] [--mtp]

Input (spec §1.1, §2, §6.1): `config.json` (+ `inference/config.json` as a fallback for missing keys),
`model.safetensors.index.json` + shards (or one `model.safetensors`), `tokenizer.json`
(+ `tokenizer_config.json` / `chat_template.jinja` when present). The safetensors files are parsed here
(header JSON + raw bytes) because NumPy has no FP8/E8M0/BF16 dtypes; tensors are read with plain
positioned reads, row block by row block, so neither the checkpoint nor the output is ever held in
memory: at most one source tensor's row block (one routed expert while stacking) is alive at a time.

Decoding (§6.1): FP8 e4m3 weights with UE8M0 128x128 block scales, `W = e4m3(q) * 2^(s-127)` (edge
blocks ragged, grid `ceil(out/128) x ceil(in/128)`); FP4 e2m1 routed experts, two codes per byte (element
2k in the low nibble), UE8M0 scale per 32 inputs; BF16/F16/F32 as stored. All decodes are exact in
float32.

Output types:
* `outtype` (f32, bf16, f16, q8_0, q4_k, q2_k): token_embd, output, the attention projections, the
  indexer query, the shared expert and MTP eh_proj. Rows a type's blocks do not fit fall back to Q8_0
  (K-quants: 256 values per block), then F16 (Q8_0: 32), as llama-quantize does. K-quants use ggml's
  own quantizers through our library.
* routed experts: `experts="auto"` = lossless MXFP4 repack when the checkpoint's experts are FP4 and
  `outtype` is not f32, else `outtype`; `"mxfp4"` forces the repack; any outtype name forces that type.
* always F32: 1-D tensors, `hc_*`, `*_ape`, the router `ffn_gate_inp`, `exp_probs_b`.
* compressor kv/gate and `indexer.proj`: F32 for outtype f32, F16 for f16, else BF16 (their checkpoint
  type; F16 if the checkpoint holds them in another float type).
* `ffn_gate_tid2eid`: I32.

Metadata: exactly the key set (names and value types) of `dsv4_ggml.tiny.write_tiny_model`, i.e. what
llama.cpp's converter writes for the model, plus `tokenizer.chat_template` when the checkpoint has one.
With `mtp=True` the MTP block is written as `blk.{n_layer}` (block_count n_layer+1, nextn_predict_layers
1) like `write_tiny_model(n_mtp_layers=1)`; that single-file layout has no slot for the MTP block's own
HC head (`mtp.0.hc_head_*`), so those tensors are dropped (listed in the stats) and the root
`output_hc_*` (the trunk's) is the only HC head in the file, as in llama.cpp's merged files (spec §7 #22).
"""
from __future__ import annotations

from .checkpoint import Checkpoint
from .cli import add_arguments, main, run, run_args
from .config import read_config
from .encode import EXPERT_TYPES, OUTTYPES
from .formats import (FP4_BLOCK, FP4_E2M1_VALUES, FP8_BLOCK, FP8_E4M3_VALUES, bf16_to_f32, dequant_fp4, dequant_fp8,
                      e8m0_to_f32, fp4_to_mxfp4, fp8_e4m3_to_f32)
from ..memory import peak_rss_bytes, rss_bytes
from .tokenizer import TOKEN_CONTROL, TOKEN_NORMAL, TOKEN_UNUSED, TOKEN_USER_DEFINED, read_tokenizer
from .writer import convert

__all__ = [
    "convert", "read_config", "read_tokenizer", "Checkpoint", "OUTTYPES", "EXPERT_TYPES",
    "FP8_BLOCK", "FP4_BLOCK", "FP8_E4M3_VALUES", "FP4_E2M1_VALUES", "fp8_e4m3_to_f32", "e8m0_to_f32", "bf16_to_f32",
    "dequant_fp8", "dequant_fp4", "fp4_to_mxfp4", "TOKEN_NORMAL", "TOKEN_CONTROL", "TOKEN_USER_DEFINED",
    "TOKEN_UNUSED", "peak_rss_bytes", "rss_bytes", "add_arguments", "run", "run_args", "main",
]
