"""`dsv4-ggml run`: generate text from a prompt, streaming tokens (the embedded tiny model without -m)."""
from __future__ import annotations

import sys

from ..cli_options import backend_kwargs
from .common import _default_model, _draft_args, _drafting, _open_model, _sampling_args, _sampling_kwargs


def add_arguments(r) -> None:
    r.add_argument("-m", "--model", help="a DeepSeek-V4 .gguf file (default: the embedded tiny model)")
    r.add_argument("-p", "--prompt", default="The quick brown fox", help="prompt text")
    r.add_argument("-n", "--n-predict", type=int, default=64, help="tokens to generate (default 64)")
    r.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    _sampling_args(r)
    _draft_args(r)


def run(args) -> int:
    import time

    path = args.model or _default_model()
    if not args.model:
        print(f"(no -m given: using the embedded tiny DeepSeek-V4 model, random weights: {path})",
              file=sys.stderr)
    t0 = time.perf_counter()
    m = _open_model(path, args.ctx, args.threads, mtp=args.draft == "mtp", **backend_kwargs(args))
    draft = _drafting(args, m)
    ids = m.tokenize(args.prompt)
    t_load = time.perf_counter() - t0
    sys.stdout.write(args.prompt)
    sys.stdout.flush()
    t1 = time.perf_counter()
    t_first = None
    n_gen = 0
    for chunk in m.generate(ids, max_tokens=args.n_predict, stop=args.stop, draft=draft, **_sampling_kwargs(args)):
        if t_first is None:
            t_first = time.perf_counter()
        sys.stdout.write(chunk.text)
        sys.stdout.flush()
        n_gen += 1
    t_end = time.perf_counter()
    sys.stdout.write("\n")
    t_prompt = (t_first or t_end) - t1
    rate = (n_gen - 1) / (t_end - t_first) if n_gen > 1 and t_first else 0.0
    print(f"load {t_load:.2f} s | prompt {len(ids)} tokens in {t_prompt:.3f} s "
          f"({len(ids) / max(t_prompt, 1e-9):.1f} tokens/s) | generated {n_gen} tokens, {rate:.1f} tokens/s"
          + (f" | drafts accepted {draft.stats['accepted']}/{draft.stats['proposed']}" if draft else ""),
          file=sys.stderr)
    return 0
