"""The `dsv4-ggml` command line."""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


def _find_source_root(start: Path) -> Path | None:
    """The source checkout holding codegen/ and native/ (for `generate`)."""
    for d in (start, *start.parents):
        if (d / "codegen" / "v4.py").exists() and (d / "native").is_dir():
            return d
    here = Path(__file__).resolve().parent.parent
    if (here / "codegen" / "v4.py").exists() and (here / "native").is_dir():
        return here
    return None


def cmd_generate(args) -> int:
    from codegen.emit import generate

    root = Path(args.root).resolve() if args.root else _find_source_root(Path.cwd().resolve())
    if root is None:
        print("dsv4-ggml generate: run it inside a source checkout (codegen/ and native/), "
              "or pass --root", file=sys.stderr)
        return 2
    return generate(root, check=args.check)


def cmd_tiny(args) -> int:
    from .tiny import write_tiny_model

    overrides = {}
    if args.n_mtp_layers:
        overrides["n_mtp_layers"] = args.n_mtp_layers
    cfg = write_tiny_model(args.out, seed=args.seed, **overrides)
    size = os.path.getsize(args.out)
    layers = cfg.get("n_layer") if isinstance(cfg, dict) else None
    print(f"wrote {args.out} ({_human(size)}, seed {args.seed}"
          + (f", {layers} layers" if layers is not None else "") + ")")
    return 0


def cmd_inspect(args) -> int:
    from .model import Model

    m = Model(args.model, n_ctx=args.ctx) if args.ctx else Model(args.model, n_ctx=1)
    hp = m.hparams
    print(f"{args.model}: DeepSeek-V4 (deepseek4), {hp['n_layer']} layers"
          f"{' + MTP' if hp['n_nextn'] else ''}, vocab {m.n_vocab}")
    width = max(len(k) for k in hp)
    for k, v in hp.items():
        print(f"  {k:<{width}}  {v}")
    tensors = m.tensors
    total = sum(t.nbytes for t in tensors)
    by_type: dict[str, int] = {}
    for t in tensors:
        by_type[t.type] = by_type.get(t.type, 0) + t.nbytes
    print(f"tensors: {len(tensors)}, {_human(total)} "
          + "(" + ", ".join(f"{k} {_human(v)}" for k, v in sorted(by_type.items())) + ")")
    if args.tensors:
        nw = max(len(t.name) for t in tensors)
        for t in tensors:
            shape = "{" + ", ".join(str(x) for x in t.shape) + "}"
            print(f"  {t.name:<{nw}}  {t.type:<8} {shape:<22} {_human(t.nbytes):>10}")
    m.close()
    return 0


def _default_model() -> str:
    """The embedded default: the tiny model of spec §8 (seed 0), written to a temporary file."""
    import atexit
    import shutil
    import tempfile

    from .tiny import write_tiny_model

    d = tempfile.mkdtemp(prefix="dsv4-tiny-")
    atexit.register(shutil.rmtree, d, True)
    path = os.path.join(d, "tiny-seed0.gguf")
    write_tiny_model(path, seed=0)
    return path


def cmd_run(args) -> int:
    import time

    import numpy as np

    from .model import Model
    from .tokenizer import Dsv4Tokenizer, StreamDecoder

    path = args.model or _default_model()
    if not args.model:
        print(f"(no -m given: using the embedded tiny DeepSeek-V4 model, random weights: {path})",
              file=sys.stderr)
    t0 = time.perf_counter()
    m = Model(path, n_ctx=args.ctx, n_threads=args.threads)
    tok = Dsv4Tokenizer.from_model(m)
    ids = tok.encode(args.prompt)
    if len(ids) + args.n_predict > m.n_ctx:
        print(f"dsv4-ggml run: prompt ({len(ids)} tokens) + {args.n_predict} exceed --ctx {m.n_ctx}",
              file=sys.stderr)
        return 2
    t_load = time.perf_counter() - t0
    rng = np.random.default_rng(args.seed)
    out = StreamDecoder(tok)
    sys.stdout.write(args.prompt)
    sys.stdout.flush()
    t1 = time.perf_counter()
    logits = m.eval(ids, logits="last")[0]
    t_prompt = time.perf_counter() - t1
    n_gen = 0
    t2 = time.perf_counter()
    for _ in range(args.n_predict):
        if args.temp <= 0:
            nxt = int(logits.argmax())
        else:
            p = np.exp((logits - logits.max()) / args.temp)
            nxt = int(rng.choice(len(p), p=p / p.sum()))
        if nxt == tok.eos_id:
            break
        sys.stdout.write(out.push(nxt))
        sys.stdout.flush()
        n_gen += 1
        logits = m.eval([nxt], logits="last")[0]
    sys.stdout.write(out.flush() + "\n")
    t_gen = time.perf_counter() - t2
    print(f"load {t_load:.2f} s | prompt {len(ids)} tokens, {len(ids) / t_prompt:.1f} tokens/s | "
          f"generated {n_gen} tokens, {n_gen / max(t_gen, 1e-9):.1f} tokens/s", file=sys.stderr)
    return 0


def cmd_version(args) -> int:
    from . import __version__, _native

    print(f"dsv4-ggml {__version__}; native: {_native.version()}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dsv4-ggml", description="DeepSeek-V4 inference on ggml")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    g = sub.add_parser("generate", help="regenerate native/generated and the C header from the DSL",
                       description="Lower codegen/v4.py through codegen/templates into native/.")
    g.add_argument("--check", action="store_true",
                   help="do not write; exit 1 if the committed files differ from the DSL")
    g.add_argument("--root", help="source checkout to write into (default: found from the cwd)")
    g.set_defaults(fn=cmd_generate)

    t = sub.add_parser("tiny", help="write a small random DeepSeek-V4 GGUF (llama.cpp format)",
                       description="Write a tiny random DeepSeek-V4 model for tests and demos.")
    t.add_argument("out", help="output .gguf path")
    t.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    t.add_argument("--n-mtp-layers", type=int, default=0, choices=(0, 1),
                   help="add the MTP block (default 0)")
    t.set_defaults(fn=cmd_tiny)

    i = sub.add_parser("inspect", help="show a GGUF's hyperparameters and tensors",
                       description="Validate a model file and print what it holds.")
    i.add_argument("model", help="a DeepSeek-V4 .gguf file")
    i.add_argument("--tensors", action="store_true", help="list every tensor")
    i.add_argument("--ctx", type=int, default=0, help="context length to validate against")
    i.set_defaults(fn=cmd_inspect)

    r = sub.add_parser("run", help="generate text from a prompt (streams tokens)",
                       description="Generate text. Without -m, runs the embedded tiny model.")
    r.add_argument("-m", "--model", help="a DeepSeek-V4 .gguf file (default: the embedded tiny model)")
    r.add_argument("-p", "--prompt", default="The quick brown fox", help="prompt text")
    r.add_argument("-n", "--n-predict", type=int, default=64, help="tokens to generate (default 64)")
    r.add_argument("--temp", type=float, default=0.0, help="sampling temperature (0: greedy, the default)")
    r.add_argument("--seed", type=int, default=0, help="sampling seed")
    r.add_argument("-c", "--ctx", type=int, default=4096, help="context length (default 4096)")
    r.add_argument("-t", "--threads", type=int, default=None, help="CPU threads (default: all cores)")
    r.set_defaults(fn=cmd_run)

    v = sub.add_parser("version", help="print versions", description="Print versions.")
    v.set_defaults(fn=cmd_version)
    return p


def main(argv: list[str] | None = None) -> int:
    from .errors import Dsv4Error

    args = build_parser().parse_args(argv)
    try:
        return int(args.fn(args) or 0)
    except Dsv4Error as e:
        print(f"dsv4-ggml {args.command}: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
