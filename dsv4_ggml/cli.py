"""The `dsv4-ggml` command line."""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from .cli_options import ProgressBar, add_backend_arguments, backend_kwargs, run_parsed


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


def _open_model(path: str, ctx: int, threads: int | None, prefetch: bool = True, **kwargs):
    from .model import Model

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

    m = Model(args.model, n_ctx=1, repack=False)  # describes the file: no copies of its weights
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
    for n_ctx in args.ctx:
        if n_ctx > hp["n_ctx_train"]:
            print(f"n_ctx {n_ctx}: exceeds the model's context length {hp['n_ctx_train']}")
            continue
        slot = m.estimate_state_bytes(n_ctx, per_slot=True)
        state = m.estimate_state_bytes(n_ctx, n_seq=args.seqs)
        print(f"memory at n_ctx {n_ctx}: weights {_human(total)} (mapped from the file) + session state "
              f"{_human(state)} for {args.seqs} sequence{'s' if args.seqs > 1 else ''} ({_human(slot)} per "
              f"sequence slot, {slot / n_ctx:.0f} bytes/token incl. fixed windows and rollback rings) + "
              f"compute buffer")
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

    path = args.model or _default_model()
    if not args.model:
        print(f"(no -m given: using the embedded tiny DeepSeek-V4 model, random weights: {path})",
              file=sys.stderr)
    t0 = time.perf_counter()
    m = _open_model(path, args.ctx, args.threads, **backend_kwargs(args))
    ids = m.tokenize(args.prompt)
    t_load = time.perf_counter() - t0
    sys.stdout.write(args.prompt)
    sys.stdout.flush()
    t1 = time.perf_counter()
    t_first = None
    n_gen = 0
    for chunk in m.generate(ids, max_tokens=args.n_predict, stop=args.stop, **_sampling_kwargs(args)):
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
          f"({len(ids) / max(t_prompt, 1e-9):.1f} tokens/s) | generated {n_gen} tokens, {rate:.1f} tokens/s",
          file=sys.stderr)
    return 0


def cmd_chat(args) -> int:
    path = args.model or _default_model()
    m = _open_model(path, args.ctx, args.threads, **backend_kwargs(args))
    interactive = sys.stdin.isatty()
    messages: list[dict] = []
    if args.system:
        messages.append({"role": "system", "content": args.system})
    if interactive:
        print("chat with the model; /reset starts over, /exit or Ctrl-D quits", file=sys.stderr)
    while True:
        if interactive:
            sys.stderr.write("> ")
            sys.stderr.flush()
        line = sys.stdin.readline()
        if not line:
            break
        text = line.rstrip("\n")
        if text.strip() in ("/exit", "/quit"):
            break
        if text.strip() == "/reset":
            messages = messages[:1] if args.system else []
            continue
        if not text.strip():
            continue
        messages.append({"role": "user", "content": text})
        reply, reasoning = [], []
        for chunk in m.create_chat_completion(messages, max_tokens=args.n_predict, stream=True,
                                              thinking=args.thinking, **_sampling_kwargs(args)):
            delta = chunk["choices"][0]["delta"]
            if delta.get("reasoning_content"):
                reasoning.append(delta["reasoning_content"])
                sys.stderr.write(delta["reasoning_content"])
                sys.stderr.flush()
            if delta.get("content"):
                reply.append(delta["content"])
                sys.stdout.write(delta["content"])
                sys.stdout.flush()
        sys.stdout.write("\n")
        sys.stdout.flush()
        messages.append({"role": "assistant", "content": "".join(reply),
                         **({"reasoning_content": "".join(reasoning)} if reasoning else {})})
    return 0


def cmd_version(args) -> int:
    from . import __version__, _native

    print(f"dsv4-ggml {__version__}; native: {_native.version()}")
    return 0


def _lazy(module: str, parser, argv: list[str] | None) -> None:
    """The options of dsv4_ggml.<module> (its add_arguments, then run_args or run), added only when
    `argv` runs that command: other commands never import the module."""
    command = next((a for a in argv or [] if not a.startswith("-")), None)
    if command != parser.prog.split()[-1]:
        return
    import importlib

    mod = importlib.import_module(f".{module}", __package__)
    mod.add_arguments(parser)
    parser.set_defaults(fn=getattr(mod, "run_args", None) or mod.run)


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
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
    i.add_argument("--seqs", type=int, default=1, help="sequence slots of the session (default 1)")
    i.add_argument("--ctx", type=int, nargs="*", default=[4096, 32768],
                   help="context lengths to estimate memory for (default 4096 32768)")
    i.set_defaults(fn=cmd_inspect)

    r = sub.add_parser("run", help="generate text from a prompt (streams tokens)",
                       description="Generate text. Without -m, runs the embedded tiny model.")
    r.add_argument("-m", "--model", help="a DeepSeek-V4 .gguf file (default: the embedded tiny model)")
    r.add_argument("-p", "--prompt", default="The quick brown fox", help="prompt text")
    r.add_argument("-n", "--n-predict", type=int, default=64, help="tokens to generate (default 64)")
    r.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    _sampling_args(r)
    r.set_defaults(fn=cmd_run)

    ch = sub.add_parser("chat", help="interactive chat (reads stdin; works when piped)",
                        description="Chat with the model through its chat template. Each stdin line "
                                    "is a user turn; the reply streams to stdout.")
    ch.add_argument("-m", "--model", help="a DeepSeek-V4 .gguf file (default: the embedded tiny model)")
    ch.add_argument("-s", "--system", default=None, help="system prompt")
    ch.add_argument("--thinking", action="store_true", help="thinking mode (reasoning goes to stderr)")
    ch.add_argument("-n", "--n-predict", type=int, default=256, help="max tokens per reply (default 256)")
    _sampling_args(ch)
    ch.set_defaults(fn=cmd_chat)

    b = sub.add_parser("bench", help="measure prompt and generation throughput (llama-bench style)",
                       description="pp: prefill throughput; tg: decode throughput after a prefill of "
                                   "each --depth. Warm-up run, then --repetitions runs: mean ± std.")
    b.add_argument("-m", "--model", required=True, help="a DeepSeek-V4 .gguf file")
    b.add_argument("-p", "--n-prompt", type=int, default=512, help="prompt tokens (0: skip pp; default 512)")
    b.add_argument("-n", "--n-gen", type=int, default=128, help="generated tokens (0: skip tg; default 128)")
    b.add_argument("-t", "--threads", type=int, default=None, help="CPU threads (default: all cores)")
    b.add_argument("-d", "--depth", default="0", help="comma-separated context depths for tg (default 0)")
    b.add_argument("-r", "--repetitions", type=int, default=3, help="timed runs per test (default 3)")
    b.add_argument("--seqs", default=None,
                   help="comma-separated sequence counts, e.g. 1,2,4,8: N sequences prefill -p tokens each "
                        "together, then decode -n tokens each together at each --depth (llama-batched-bench "
                        "style; aggregate t/s, weight bytes read per step and the bandwidth floor)")
    b.add_argument("-b", "--ubatch", type=int, default=512, help="micro-batch size (default 512)")
    b.add_argument("--cache-type", default="f16", help="f32, f16 (default), bf16 or q8_0")
    b.add_argument("--no-flash-attn", action="store_true", help="attention by matmul + softmax")
    add_backend_arguments(b)
    b.add_argument("--bandwidth", type=float, default=None,
                   help="measured memory read bandwidth in GB/s (benchmarks/membw) for the floor")
    b.add_argument("--json", action="store_true", help="print JSON")
    b.set_defaults(fn=lambda a: __import__("dsv4_ggml.bench", fromlist=["main_args"]).main_args(a))

    sv = sub.add_parser("serve", help="serve the model over an OpenAI-compatible HTTP API",
                        description="Serve /v1/completions, /v1/chat/completions (SSE streaming) and "
                                    "/v1/models. Requests are queued and run one at a time.")
    _lazy("server", sv, argv)

    cv = sub.add_parser("convert", help="convert an official DeepSeek-V4 checkpoint (safetensors) to GGUF",
                        description="Convert the official FP8/FP4 safetensors checkpoint into a GGUF in "
                                    "llama.cpp's DeepSeek-V4 format, one tensor at a time.")
    _lazy("convert", cv, argv)

    v = sub.add_parser("version", help="print versions", description="Print versions.")
    v.set_defaults(fn=cmd_version)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    return run_parsed(build_parser(argv), argv)


if __name__ == "__main__":
    sys.exit(main())
