"""The converter's command line: `dsv4-ggml convert` and `python -m dsv4_ggml.convert` wire the same
arguments (`add_arguments`, `run`)."""
from __future__ import annotations

import argparse
import sys

from ..cli_options import size_argument as _size
from .encode import EXPERT_TYPES, OUTTYPES
from .writer import convert


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("hf_dir", help="directory of the official checkpoint (config.json, safetensors, tokenizer.json)")
    p.add_argument("out", nargs="?", help="output .gguf path (none with --dry-run)")
    p.add_argument("--outtype", default="q8_0", choices=OUTTYPES,
                   help="type of the projection matrices, embedding and LM head (default q8_0)")
    p.add_argument("--experts", default="auto", choices=EXPERT_TYPES,
                   help="routed expert type: auto (lossless MXFP4 repack of FP4 experts unless --outtype f32), "
                        "mxfp4, or a float/q8_0 type (default auto)")
    p.add_argument("--mtp", action="store_true", help="also write the MTP block as blk.{n_layer}")
    p.add_argument("--split-max-size", type=_size, default=0, metavar="N[K|M|G|T]",
                   help="split the output into parts of at most this much tensor data (e.g. 50G; decimal "
                        "units), named as llama.cpp's gguf-split names them: OUT-00001-of-0000N.gguf ...")
    p.add_argument("--split-max-tensors", type=int, default=0, metavar="N",
                   help="split the output into parts of at most N tensors (with or without --split-max-size)")
    p.add_argument("--dry-run", action="store_true",
                   help="read only the checkpoint's headers and print the tensor table the conversion would "
                        "write (names, ggml shapes, types, sizes); write nothing")


def run(args: argparse.Namespace) -> int:
    from ..cli_options import ProgressBar

    if args.split_max_tensors < 0:
        raise SystemExit("dsv4-ggml convert: --split-max-tensors must be 0 or more")
    if args.out is None and not args.dry_run:
        raise SystemExit("dsv4-ggml convert: give the output .gguf path (or --dry-run)")
    st = convert(args.hf_dir, args.out, outtype=args.outtype, experts=args.experts, mtp=args.mtp,
                 progress=None if args.dry_run else ProgressBar("converting"), split_max_size=args.split_max_size,
                 split_max_tensors=args.split_max_tensors, dry_run=args.dry_run)
    types = ", ".join(f"{k} {v}" for k, v in sorted(st["types"].items()))
    if args.dry_run:
        width = max(len(name) for name, *_ in st["table"])
        for name, ne, gtype, nbytes in st["table"]:
            shape = "{" + ", ".join(str(x) for x in ne) + "}"
            print(f"{name:<{width}}  {gtype:<6} {shape:<24} {nbytes:>14,}")
        print(f"would write {st['tensors']} tensors ({types}), {st['data_bytes'] / 2**30:.2f} GiB of tensor data, "
              f"experts {st['experts']}" + (f"; would skip {len(st['skipped'])} checkpoint tensors (MTP/vision/unused)"
                                              if st["skipped"] else ""))
        return 0
    print(f"wrote {st['path']}: {st['tensors']} tensors ({types}), {st['bytes'] / 2**30:.2f} GiB, experts "
          f"{st['experts']}, {st['seconds']:.1f} s, peak RSS {st['peak_rss_bytes'] / 2**20:.0f} MiB"
          + (f"; skipped {len(st['skipped'])} checkpoint tensors (MTP/vision/unused)" if st["skipped"] else ""))
    if len(st["files"]) > 1:
        print(f"in {len(st['files'])} parts: " + ", ".join(st["files"]))
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
