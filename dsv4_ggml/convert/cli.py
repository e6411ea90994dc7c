"""The converter's command line: `dsv4-ggml convert` and `python -m dsv4_ggml.convert` wire the same
arguments (`add_arguments`, `run`)."""
from __future__ import annotations

import argparse
import sys

from .encode import EXPERT_TYPES, OUTTYPES
from .writer import convert


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("hf_dir", help="directory of the official checkpoint (config.json, safetensors, tokenizer.json)")
    p.add_argument("out", help="output .gguf path")
    p.add_argument("--outtype", default="q8_0", choices=OUTTYPES,
                   help="type of the projection matrices, embedding and LM head (default q8_0)")
    p.add_argument("--experts", default="auto", choices=EXPERT_TYPES,
                   help="routed expert type: auto (lossless MXFP4 repack of FP4 experts unless --outtype f32), "
                        "mxfp4, or a float/q8_0 type (default auto)")
    p.add_argument("--mtp", action="store_true", help="also write the MTP block as blk.{n_layer}")


def run(args: argparse.Namespace) -> int:
    from ..cli_options import ProgressBar

    st = convert(args.hf_dir, args.out, outtype=args.outtype, experts=args.experts, mtp=args.mtp,
                 progress=ProgressBar("converting"))
    types = ", ".join(f"{k} {v}" for k, v in sorted(st["types"].items()))
    print(f"wrote {st['path']}: {st['tensors']} tensors ({types}), {st['bytes'] / 2**30:.2f} GiB, experts "
          f"{st['experts']}, {st['seconds']:.1f} s, peak RSS {st['peak_rss_bytes'] / 2**20:.0f} MiB"
          + (f"; skipped {len(st['skipped'])} checkpoint tensors (MTP/vision/unused)" if st["skipped"] else ""))
    return 0


def main(argv: list[str] | None = None) -> int:
    """`python -m dsv4_ggml.convert ...`: the same as `dsv4-ggml convert ...`."""
    from ..cli_options import run_parsed

    parser = argparse.ArgumentParser(prog="dsv4-ggml convert", description="Convert an official DeepSeek-V4 "
                                     "checkpoint (safetensors) to GGUF.")
    add_arguments(parser)
    parser.set_defaults(fn=run)
    return run_parsed(parser, sys.argv[1:] if argv is None else list(argv))


run_args = run   # its name before the command contract (add_arguments, run)
