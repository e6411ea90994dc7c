"""`dsv4-ggml chat`: chat through the model's chat template; each stdin line is a user turn, the reply
streams to stdout (reasoning to stderr)."""
from __future__ import annotations

import sys

from ..cli_options import backend_kwargs
from .common import _default_model, _draft_args, _drafting, _open_model, _sampling_args, _sampling_kwargs


def add_arguments(ch) -> None:
    ch.add_argument("-m", "--model", help="a DeepSeek-V4 .gguf file (default: the embedded tiny model)")
    ch.add_argument("-s", "--system", default=None, help="system prompt")
    ch.add_argument("--thinking", action="store_true", help="thinking mode (reasoning goes to stderr)")
    ch.add_argument("-n", "--n-predict", type=int, default=256, help="max tokens per reply (default 256)")
    _sampling_args(ch)
    _draft_args(ch)


def run(args) -> int:
    path = args.model or _default_model()
    m = _open_model(path, args.ctx, args.threads, mtp=args.draft == "mtp", **backend_kwargs(args))
    draft = _drafting(args, m)
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
                                              thinking=args.thinking, draft=draft, **_sampling_kwargs(args)):
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
