"""`dsv4-ggml serve` / `python -m dsv4_ggml.server`: options, loading the model, running uvicorn."""
from __future__ import annotations

import argparse
import importlib.util
import os
import sys

from ..cli_options import add_backend_arguments, backend_kwargs, run_parsed


def _require_deps() -> None:
    missing = [m for m in ("starlette", "uvicorn") if importlib.util.find_spec(m) is None]
    if missing:
        raise ImportError(f"the server needs starlette and uvicorn ({', '.join(missing)} missing): "
                          f"pip install starlette uvicorn")


# --- running it -------------------------------------------------------------------------------------------
def _tiny_default() -> str:
    import tempfile

    from ..tiny import write_tiny_model

    d = tempfile.mkdtemp(prefix="dsv4-tiny-")
    path = os.path.join(d, "tiny-seed0.gguf")
    write_tiny_model(path, seed=0)
    return path


def serve(model_path: str | None, host: str = "127.0.0.1", port: int = 8080, n_ctx: int = 4096,
          n_threads: int | None = None, api_key: str | list[str] | None = None, model_id: str | None = None,
          backend: str = "cpu", n_ubatch: int = 512, cache_type: str = "f16", flash_attn: bool = True,
          default_max_tokens: int | None = None, cors_origins: list[str] | None = None,
          log_level: str = "info", n_gpu_layers: int | None = None, experts_on_host: bool = False,
          repack: bool | str = True, parallel: int | str = "auto", max_queue: int = 64,
          cache_dir: str | None = None, cache_mib: int = 8192, draft: str | None = None, n_draft: int = 2,
          adaptive_draft: bool = True, draft_model: str | None = None, copy_limit: int | None = None) -> None:
    """Loads the model and serves it until interrupted (Ctrl-C / SIGTERM). `model_path` None:
    the embedded tiny random model (a demo). `parallel`: sequence slots that generate at once
    (continuous batching); "auto": 4 when their state fits in half the free memory, else 1.
    `max_queue`: requests that may wait for a slot. `cache_dir`: slot states saved there (at most
    `cache_mib` MiB, least recently used first out) and restored on a prefix hit, across restarts.
    `draft="mtp"`: speculative decoding with the file's MTP block in every slot (`n_draft` drafts
    at most, K adapting unless `adaptive_draft=False`); `draft_model`: the same with a smaller
    DeepSeek-V4 GGUF of the same vocabulary (opened with one sequence slot per server slot)."""
    _require_deps()
    import uvicorn

    from ..model import Model
    from .app import build_app

    temporary = model_path is None
    if temporary:
        model_path = _tiny_default()
        print("(no model given: serving the embedded tiny DeepSeek-V4 model, random weights)", file=sys.stderr)
    try:
        model = Model(model_path, n_ctx=n_ctx, n_threads=n_threads, backend=backend, n_ubatch=n_ubatch,
                      cache_type=cache_type, flash_attn=flash_attn, n_gpu_layers=n_gpu_layers,
                      experts_on_host=experts_on_host, repack=repack, n_seq=parallel, mtp=draft == "mtp",
                      copy_limit=copy_limit)
        _ = (model.tokenizer, model.chat_template)     # build both now, not in the first request
        if draft_model is not None:
            if draft is not None:
                raise SystemExit("dsv4-ggml serve: --draft mtp and --draft-model exclude each other")
            draft = Model(draft_model, n_ctx=n_ctx, n_threads=n_threads, backend=backend, n_ubatch=n_ubatch,
                          cache_type=cache_type, flash_attn=flash_attn, repack=repack, n_seq=model.n_seq,
                          copy_limit=copy_limit)
    finally:
        if temporary:     # loaded (mapped) already; uvicorn ends a SIGTERM by the signal, so no atexit
            import shutil
            shutil.rmtree(os.path.dirname(model_path), ignore_errors=True)
    app = build_app(model, model_id=model_id, api_key=api_key, default_max_tokens=default_max_tokens,
                    cors_origins=cors_origins, max_queue=max_queue, cache_dir=cache_dir, cache_bytes=cache_mib << 20,
                    draft=draft, n_draft=n_draft, adaptive_draft=adaptive_draft)
    slot_mib = model.estimate_state_bytes(n_ctx, per_slot=True) / 2**20
    print(f"serving {app.state.model_id!r} (n_ctx {n_ctx}, {backend}, {model.n_seq} parallel slot"
          f"{'s' if model.n_seq > 1 else ''} of {slot_mib:.1f} MiB{' (auto)' if parallel == 'auto' else ''}, "
          f"queue {max_queue}{_draft_words(draft, n_draft)}) on http://{host}:{port}/v1"
          + (" (API key required)" if api_key else ""), file=sys.stderr, flush=True)
    scheduler = app.state.scheduler

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame) -> None:
            scheduler.shutdown()        # running and queued requests end at the next step: streams close
            super().handle_exit(sig, frame)

    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=5)
    try:
        Server(config).run()
    finally:
        scheduler.shutdown()
        scheduler.join()           # the engine thread is out of the model before it closes
        model.close()
        if draft is not None and draft != "mtp":
            draft.close()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The `serve` options (for `dsv4-ggml serve` and `python -m dsv4_ggml.server`)."""
    parser.add_argument("-m", "--model", default=None,
                        help="a DeepSeek-V4 .gguf file (default: the embedded tiny random model)")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8080, help="port (default 8080)")
    parser.add_argument("-c", "--ctx", type=int, default=4096, help="context length (default 4096)")
    parser.add_argument("-t", "--threads", type=int, default=None, help="CPU threads (default: all cores)")
    parser.add_argument("--api-key", action="append", default=None,
                        help="require 'Authorization: Bearer KEY' (repeatable; default: $DSV4_API_KEY, else none)")
    parser.add_argument("-a", "--alias", "--served-model-name", dest="alias", default=None,
                        help="the model id clients see (default: the file name without .gguf)")
    parser.add_argument("-n", "--n-predict", type=int, default=None,
                        help="max tokens of a request that sets none (default: chat until the context is "
                             "full, completions 16)")
    add_backend_arguments(parser)
    parser.add_argument("-np", "--parallel", default="auto", type=_parallel,
                        help="requests generated at once, each in its own sequence slot (continuous batching; "
                             "default auto: 4 when their state fits in half the free memory, else 1)")
    parser.add_argument("--queue-size", type=int, default=64,
                        help="requests that may wait for a slot; beyond, HTTP 503 with Retry-After (default 64)")
    parser.add_argument("--cache-dir", default=None,
                        help="save slot states here and restore them on a prompt-prefix hit, across restarts")
    parser.add_argument("--cache-size", type=int, default=8192,
                        help="MiB the --cache-dir may hold; least recently used states go first (default 8192)")
    parser.add_argument("--draft", choices=("mtp",), default=None,
                        help="speculative decoding with the file's MTP block (spec §3.10) in every slot")
    parser.add_argument("--draft-model", default=None, metavar="DRAFT.gguf",
                        help="speculative decoding with a smaller DeepSeek-V4 GGUF of the same vocabulary")
    parser.add_argument("--n-draft", type=int, default=2,
                        help="most drafts per slot and step with --draft / --draft-model (default 2)")
    parser.add_argument("--no-adaptive-draft", action="store_true",
                        help="always draft --n-draft tokens (default: K adapts to measured costs and acceptance)")
    parser.add_argument("-b", "--ubatch", type=int, default=512, help="micro-batch size (default 512)")
    parser.add_argument("--cache-type", default="f16", help="f32, f16 (default), bf16 or q8_0")
    parser.add_argument("--no-flash-attn", action="store_true", help="attention by matmul + softmax")
    parser.add_argument("--cors-origin", action="append", default=None,
                        help="allow browser requests from this origin (repeatable, '*' for any; default none)")
    parser.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"),
                        help="server log level (default info)")


def _parallel(text: str) -> int | str:
    if text == "auto":
        return text
    n = int(text)
    if n < 1:
        raise argparse.ArgumentTypeError(f"--parallel must be a positive integer or auto, got {text}")
    return n


def _draft_words(draft, n_draft: int) -> str:
    if draft is None:
        return ""
    return f", {'MTP' if draft == 'mtp' else 'draft-model'} drafts up to {n_draft}"


def run(args: argparse.Namespace) -> int:
    """Runs `serve` with the options of `add_arguments` (for `dsv4-ggml serve`); returns the exit code."""
    try:
        _require_deps()
    except ImportError as e:
        print(f"dsv4-ggml serve: {e}", file=sys.stderr)
        return 1
    keys = args.api_key or ([os.environ["DSV4_API_KEY"]] if os.environ.get("DSV4_API_KEY") else None)
    serve(args.model, host=args.host, port=args.port, n_ctx=args.ctx, n_threads=args.threads, api_key=keys,
          model_id=args.alias, n_ubatch=args.ubatch, cache_type=args.cache_type,
          flash_attn=not args.no_flash_attn, default_max_tokens=args.n_predict, cors_origins=args.cors_origin,
          log_level=args.log_level, parallel=args.parallel, max_queue=args.queue_size,
          cache_dir=args.cache_dir, cache_mib=args.cache_size, draft=args.draft, n_draft=args.n_draft,
          adaptive_draft=not args.no_adaptive_draft, draft_model=args.draft_model, **backend_kwargs(args))
    return 0


def main(argv: list[str] | None = None) -> int:
    """`python -m dsv4_ggml.server ...`: the same as `dsv4-ggml serve ...`."""
    parser = argparse.ArgumentParser(prog="dsv4-ggml serve", description="Serve a DeepSeek-V4 model over HTTP.")
    add_arguments(parser)
    parser.set_defaults(fn=run)
    return run_parsed(parser, sys.argv[1:] if argv is None else list(argv))

