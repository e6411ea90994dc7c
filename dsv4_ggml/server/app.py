"""The ASGI application: the OpenAI routes, authentication, and `build_app`, which wires every
route (OpenAI, Anthropic, operations) to one scheduler."""
from __future__ import annotations

import contextlib
import hmac
import logging
import time
from typing import Callable

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from .errors import RequestError, error_body
from .openai_api import ChatFormat, CompletionFormat
from .params import chat_args, flag, json_body, prompt, sampling, stream_flags
from .prompts import chat_prompt, text_prompt
from .respond import Context, respond
from .scheduler import Scheduler

log = logging.getLogger("uvicorn.error")

OPEN_PATHS = ("/health", "/v1/health", "/metrics")     # never need the API key
COMPLETION_DEFAULT_MAX_TOKENS = 16                     # OpenAI's (and vLLM's) default for /v1/completions


# --- authentication ---------------------------------------------------------------------------------------
class Auth:
    """Pure-ASGI key check: `Authorization: Bearer KEY` or `x-api-key: KEY` (Anthropic's header)."""

    def __init__(self, app, keys: list[str], anthropic_paths: tuple[str, ...] = ()):
        self.app = app
        self.keys = [k.encode() for k in keys]
        self.anthropic_paths = anthropic_paths

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http" and scope["method"] != "OPTIONS" and scope["path"] not in OPEN_PATHS:
            headers = dict(scope["headers"])
            auth = headers.get(b"authorization", b"")
            token = auth[7:].strip() if auth[:7].lower() == b"bearer " else headers.get(b"x-api-key", b"")
            if not any(hmac.compare_digest(token, k) for k in self.keys):
                message = "invalid or missing API key (send 'Authorization: Bearer KEY' or 'x-api-key: KEY')"
                if scope["path"].startswith(self.anthropic_paths):
                    body = {"type": "error", "error": {"type": "authentication_error", "message": message}}
                else:
                    body = error_body(message, "authentication_error", code="invalid_api_key")
                await JSONResponse(body, 401, headers={"WWW-Authenticate": "Bearer"})(scope, receive, send)
                return
        await self.app(scope, receive, send)


# --- routes ---------------------------------------------------------------------------------------------------
def _openai_routes(ctx: Context) -> list[tuple[str, Callable, str]]:
    model = ctx.model

    def model_card() -> dict:
        hp = getattr(model, "hparams", {}) or {}
        return {"id": ctx.model_id, "object": "model", "created": ctx.created, "owned_by": "dsv4-ggml",
                "max_model_len": ctx.n_ctx,
                "meta": {"n_ctx": ctx.n_ctx, "n_vocab": int(model.n_vocab), "n_ctx_train": hp.get("n_ctx_train"),
                         "n_layer": hp.get("n_layer"), "backend": getattr(model, "backend", None),
                         "n_parallel": len(ctx.scheduler.slots)}}

    async def models(request: Request) -> Response:
        return JSONResponse({"object": "list", "data": [model_card()]})

    async def model_info(request: Request) -> Response:
        if request.path_params["model"] != ctx.model_id:
            return JSONResponse(error_body(f"the model {request.path_params['model']!r} does not exist "
                                           f"(this server serves {ctx.model_id!r})", "invalid_request_error",
                                           "model", "model_not_found"), 404)
        return JSONResponse(model_card())

    async def completions(request: Request) -> Response:
        try:
            body = await json_body(request)
            kw = sampling(body, ctx.default_max_tokens if ctx.default_max_tokens is not None
                          else COMPLETION_DEFAULT_MAX_TOKENS, ctx.n_ctx)
            p = prompt(body, int(model.n_vocab))
            if body.get("suffix"):
                raise RequestError("suffix (fill-in-the-middle) is not supported", "suffix")
            echo = flag(body, "echo")
            stream, include_usage = stream_flags(body)
        except RequestError as e:
            return ctx.error_response(e)
        echo_text = (p if isinstance(p, str) else await run_in_threadpool(model.detokenize, p)) if echo else ""
        fmt = CompletionFormat(ctx.model_id, echo_text, include_usage, return_tokens=flag(body, "return_tokens"))
        return await respond(ctx, request, lambda: text_prompt(model, p), kw, fmt, stream,
                             cache_prompt=flag(body, "cache_prompt", True))

    async def chat_completions(request: Request) -> Response:
        try:
            body = await json_body(request)
            kw = sampling(body, ctx.default_max_tokens, ctx.n_ctx)
            chat = chat_args(body)
            stream, include_usage = stream_flags(body)
        except RequestError as e:
            return ctx.error_response(e)
        fmt = ChatFormat(ctx.model_id, chat["thinking"], chat["tools"], include_usage,
                         return_tokens=flag(body, "return_tokens"))
        return await respond(ctx, request, lambda: chat_prompt(model, **chat), kw, fmt, stream,
                             cache_prompt=flag(body, "cache_prompt", True))

    return [("/models", models, "GET"), ("/models/{model:path}", model_info, "GET"),
            ("/completions", completions, "POST"), ("/chat/completions", chat_completions, "POST")]


def build_app(model, model_id: str | None = None, api_key: str | list[str] | None = None,
              default_max_tokens: int | None = None, cors_origins: list[str] | None = None,
              max_queue: int = 64, cache_dir: str | None = None, cache_bytes: int = 8 << 30,
              draft=None, n_draft: int = 2, adaptive_draft: bool = True) -> Starlette:
    """The ASGI app serving `model` (a `dsv4_ggml.Model`; its `n_seq` sequences are the parallel
    slots) under the id `model_id` (default: the file name without extension). `api_key`: one
    key or a list (None: no check); `default_max_tokens`: the cap of requests that give none;
    `cors_origins`: origins allowed by CORS (None: no CORS headers); `max_queue`: requests that
    may wait for a slot (beyond: HTTP 503 with Retry-After); `cache_dir`: keep slot states on disk
    (at most `cache_bytes`) so the prompt cache survives restarts; `draft="mtp"`: speculative
    decoding with the model's MTP block (opened with mtp=True), up to `n_draft` drafts per slot
    and step, K adapting unless `adaptive_draft=False`; or `draft` a draft `Model` with at least
    as many sequence slots."""
    from .anthropic_api import anthropic_routes
    from .operations import operation_routes

    disk_cache = None
    if cache_dir:
        from .disk_cache import DiskCache, model_identity
        disk_cache = DiskCache(cache_dir, cache_bytes, model_identity(model))
    scheduler = Scheduler(model, max_queue=max_queue, disk_cache=disk_cache, draft=draft, n_draft=n_draft,
                          adaptive_draft=adaptive_draft)
    ctx = Context(model=model, scheduler=scheduler, model_id=model_id or model.name,
                  default_max_tokens=default_max_tokens, n_ctx=int(model.n_ctx), created=int(time.time()))

    async def http_error(request: Request, exc: HTTPException) -> Response:
        typ = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return JSONResponse(error_body(f"{request.method} {request.url.path}: {exc.detail}", typ),
                            status_code=exc.status_code, headers=getattr(exc, "headers", None))

    async def server_error(request: Request, exc: Exception) -> Response:
        return ctx.error_response(exc)

    routes = []
    for prefix in ("/v1", ""):
        for path, fn, method in _openai_routes(ctx) + operation_routes(ctx) + anthropic_routes(ctx):
            if path == "/metrics" and prefix:
                continue
            routes.append(Route(prefix + path, fn, methods=[method]))
    middleware = []
    if cors_origins:
        from starlette.middleware.cors import CORSMiddleware
        middleware.append(Middleware(CORSMiddleware, allow_origins=list(cors_origins), allow_methods=["*"],
                                     allow_headers=["*"]))
    keys = [api_key] if isinstance(api_key, str) else list(api_key or [])
    keys = [k for k in keys if k]
    if keys:
        middleware.append(Middleware(Auth, keys=keys, anthropic_paths=("/v1/messages", "/messages")))

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        scheduler.shutdown()      # running and queued requests end at the next step
        if disk_cache is not None:
            disk_cache.close()    # pending writes land

    app = Starlette(routes=routes, middleware=middleware, lifespan=lifespan,
                    exception_handlers={HTTPException: http_error, Exception: server_error})
    app.state.scheduler = scheduler
    app.state.model_id = ctx.model_id
    app.state.context = ctx
    return app
