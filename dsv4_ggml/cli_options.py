"""What the commands share: the backend options, the progress bar, and running a parsed command
with the CLI's error handling. A leaf module: the command modules (cli/, bench, server, convert/)
import it, it imports none of them."""
from __future__ import annotations

import argparse
import sys


class ProgressBar:
    """A load progress bar on stderr (redrawn in place on a terminal, one final line otherwise)."""

    def __init__(self, label: str):
        self.label = label
        self.tty = sys.stderr.isatty()
        self.last = -1

    def __call__(self, fraction: float) -> bool:
        pct = int(fraction * 100)
        if self.tty and pct != self.last:
            bar = "#" * (pct // 4) + "." * (25 - pct // 4)
            sys.stderr.write(f"\r{self.label} [{bar}] {pct:3d}%")
            if pct == 100:
                sys.stderr.write("\n")
            sys.stderr.flush()
        self.last = pct
        return True


def add_backend_arguments(p) -> None:
    """--backend, -ngl, --experts-on-host, --repack/--no-repack (run, chat, bench, serve)."""
    p.add_argument("--backend", default="cpu", choices=("cpu", "cuda"), help="compute backend (default cpu)")
    p.add_argument("-ngl", "--n-gpu-layers", type=int, default=None,
                   help="CUDA: trunk layers whose weights go to the GPU (default: all)")
    p.add_argument("--experts-on-host", action="store_true",
                   help="CUDA: keep the routed experts in host memory and run them on the CPU")
    p.add_argument("--repack", default="auto", choices=("auto", "amx", "interleaved", "none"),
                   help="CPU: layout of the quantized matrices: auto (AMX where the CPU has it, routed experts "
                        "included; else ggml's interleaved layout for the others), amx, interleaved, none (read "
                        "every weight in place); default auto")
    p.add_argument("--no-repack", dest="repack", action="store_const", const="none",
                   help="same as --repack none")
    p.add_argument("--copy-limit", type=size_argument, default=None, metavar="N[K|M|G|T]",
                   help="CPU: the most weight bytes copied at load by --repack (decimal units, e.g. 64G); the "
                        "weights beyond it are read in place from the file (default: half the physical memory)")


def size_argument(text: str) -> int:
    """An argparse type: a byte count with an optional decimal K/M/G/T suffix (dsv4_ggml.split.parse_size)."""
    from .errors import InvalidArgumentError
    from .split import parse_size
    try:
        return parse_size(text)
    except InvalidArgumentError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def backend_kwargs(args) -> dict:
    """The Model keyword arguments of add_backend_arguments' options."""
    return dict(backend=args.backend, n_gpu_layers=args.n_gpu_layers, experts_on_host=args.experts_on_host,
                repack=args.repack, copy_limit=args.copy_limit)


def run_parsed(parser: argparse.ArgumentParser, argv: list[str]) -> int:
    """Parses argv and runs the command it names (the parser's `fn` default): a Dsv4Error becomes
    a one-line message on stderr and exit status 1, Ctrl-C status 130."""
    from .errors import Dsv4Error

    args = parser.parse_args(argv)
    name = getattr(args, "command", None) or parser.prog
    try:
        return int(args.fn(args) or 0)
    except Dsv4Error as e:
        print(f"dsv4-ggml {name}: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
