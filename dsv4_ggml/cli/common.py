"""What several commands share: byte sizes for people, opening a model with a progress bar, the
embedded default model, and the sampling options of `run` and `chat`."""
from __future__ import annotations

import os
import sys

from ..cli_options import ProgressBar, add_backend_arguments


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


def _open_model(path: str, ctx: int, threads: int | None, prefetch: bool = True, **kwargs):
    from ..model import Model

    bar = ProgressBar(f"loading {os.path.basename(path)}")
    m = Model(path, n_ctx=ctx, n_threads=threads, prefetch=prefetch, progress=bar, **kwargs)
    if not bar.tty:
        print(f"loaded {os.path.basename(path)}", file=sys.stderr)
    return m


def _sampling_args(p) -> None:
    p.add_argument("--temp", type=float, default=0.8, help="temperature (0: greedy; default 0.8)")
    p.add_argument("--top-k", type=int, default=40, help="top-k (0: off; default 40)")
    p.add_argument("--top-p", type=float, default=0.95, help="top-p (1: off; default 0.95)")
    p.add_argument("--min-p", type=float, default=0.05, help="min-p (0: off; default 0.05)")
    p.add_argument("--repeat-penalty", type=float, default=1.0, help="repetition penalty (default 1: off)")
    p.add_argument("--seed", type=int, default=None, help="sampling seed (default: random)")
    p.add_argument("-c", "--ctx", type=int, default=4096, help="context length (default 4096)")
    p.add_argument("-t", "--threads", type=int, default=None, help="CPU threads (default: all cores)")
    add_backend_arguments(p)


def _sampling_kwargs(args) -> dict:
    return dict(temperature=args.temp, top_k=args.top_k, top_p=args.top_p, min_p=args.min_p,
                repeat_penalty=args.repeat_penalty, seed=args.seed)


def _default_model() -> str:
    """The embedded default: the tiny model of spec §8 (seed 0), written to a temporary file."""
    import atexit
    import shutil
    import tempfile

    from ..tiny import write_tiny_model

    d = tempfile.mkdtemp(prefix="dsv4-tiny-")
    atexit.register(shutil.rmtree, d, True)
    path = os.path.join(d, "tiny-seed0.gguf")
    write_tiny_model(path, seed=0)
    return path


def _draft_args(p) -> None:
    p.add_argument("--draft", choices=("mtp",), default=None,
                   help="speculative decoding drafted by the model's own MTP block (a file with one)")
    p.add_argument("--draft-model", default=None,
                   help="speculative decoding with this smaller DeepSeek-V4 GGUF as the drafter (same vocabulary)")
    p.add_argument("--n-draft", type=int, default=2, help="most drafts checked per step, 1..8 (default 2)")
    p.add_argument("--no-adaptive-draft", action="store_true",
                   help="always draft --n-draft tokens (default: K adapts to the measured acceptance)")


def _drafting(args, target):
    """The `draft=` argument of generate for the --draft / --draft-model options (None without one)."""
    if args.draft == "mtp":
        from ..speculative import Drafting

        return Drafting.of("mtp", args.n_draft, adaptive=not args.no_adaptive_draft)
    if not args.draft_model:
        return None
    from ..model import Model
    from ..speculative import Drafting, ModelDrafter

    d = Model(args.draft_model, n_ctx=target.n_ctx, n_threads=target.n_threads)
    return Drafting(ModelDrafter(d), args.n_draft, adaptive=not args.no_adaptive_draft)
