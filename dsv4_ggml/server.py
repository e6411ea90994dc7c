"""An OpenAI-compatible HTTP server (starlette + uvicorn) for one DeepSeek-V4 model.

    python -m dsv4_ggml.server -m model.gguf --port 8080 [--api-key KEY]
    dsv4-ggml serve -m model.gguf ...                       (the same options)

Endpoints (each also without the `/v1` prefix, like llama.cpp's server):

- `GET /health` (and `/v1/health`): `{"status": "ok", ...}`; never needs the API key and answers
  while a request is generating.
- `GET /v1/models`, `GET /v1/models/{id}`: the OpenAI list / model shape.
- `POST /v1/completions`, `POST /v1/chat/completions`: the OpenAI shapes; `"stream": true` sends
  Server-Sent Events (`data: {chunk}\\n\\n` per chunk, then `data: [DONE]\\n\\n`).

Request fields
--------------
Used: `prompt` (completions: a string, a list of token ids, or a one-element list of either),
`messages` (chat), `max_tokens` / `max_completion_tokens` (llama.cpp's `n_predict` too; -1 or
absent: until the context is full for chat, 16 for completions as in OpenAI, unless the server
was started with `--n-predict`), `temperature`, `top_p`, `seed` (-1: random), `stop` (a string or
a list), `stream`, `stream_options.include_usage`, `echo` (completions), `n` / `best_of` (1 only),
llama.cpp's `top_k` (<= 0: off, as vLLM's -1), `min_p`, `repeat_penalty`, DeepSeek thinking mode
(`chat_template_kwargs: {"thinking": true}` or `{"enable_thinking": true}`, a top-level
`"thinking": true` or `{"type": "enabled"}`), `reasoning_effort`, `tools` (rendered by the chat
template; `tool_choice` "auto" or "none", "none" renders no tools). Defaults of the sampling fields
are the engine's (llama.cpp's): temperature 0.8, top_k 40, top_p 0.95, min_p 0.05,
repeat_penalty 1.0. `model` may name anything: the server has one model and answers as it.

Rejected with HTTP 400 (instead of being silently ignored, since each changes what a client gets):
`n` or `best_of` above 1, more than one prompt, `suffix`, `logprobs` / `top_logprobs`, non-zero
`presence_penalty` / `frequency_penalty`, a non-empty `logit_bias`, `response_format` other than
text, `grammar` / `json_schema`, `tool_choice` "required" or a named function. Every other field
(`user`, `metadata`, `store`, `service_tier`, `parallel_tool_calls`, `cache_prompt`, ...) is ignored.

Errors are OpenAI-shaped `{"error": {"message", "type", "param", "code"}}`: 400
`invalid_request_error` for bad requests (a context overflow has code `context_length_exceeded`),
401 `authentication_error` for a missing or wrong API key, 404/405 for unknown routes, 500
`server_error` (message only, the traceback goes to the server log) for engine failures. An error
after a stream has started is sent as a final `data: {"error": {...}}` event.

Queueing
--------
A `Model` holds one session and is not thread-safe, so every request becomes a job run by ONE
worker thread, in arrival order. The job drives the (blocking) generator and hands each chunk to
the request's coroutine through an asyncio queue; the native eval releases the GIL, so the event
loop keeps answering (health checks, queued clients, other streams' bytes) while a job runs.
Cancellation: a client that disconnects (while queued, during prompt processing or mid-stream,
streaming or not) sets its job's cancel flag; the worker stops before its next eval (a hook around
`model.eval` for the duration of the job) and closes the generator on its own thread, so the
session is left at a token boundary with its token list consistent, and the next job starts at once.
An unexpected engine error resets the session before the next job.
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import hmac
import json
import logging
import math
import os
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable

try:     # the server's own dependencies: add_arguments() works without them, build_app() needs them
    from starlette.applications import Starlette
    from starlette.exceptions import HTTPException
    from starlette.middleware import Middleware
    from starlette.requests import Request
    from starlette.responses import JSONResponse, Response, StreamingResponse
    from starlette.routing import Route
    _MISSING_DEPS: str | None = None
except ImportError as e:   # pragma: no cover - depends on the environment
    _MISSING_DEPS = f"{e}"
    StreamingResponse = object

from .cli_options import add_backend_arguments, backend_kwargs, run_parsed
from .errors import ContextOverflowError, Dsv4Error, InvalidArgumentError, OutOfMemoryError, StateError

log = logging.getLogger("uvicorn.error")

OPEN_PATHS = ("/health", "/v1/health")      # never need the API key
COMPLETION_DEFAULT_MAX_TOKENS = 16          # OpenAI's (and vLLM's) default for /v1/completions


# --- errors -----------------------------------------------------------------------------------------
class RequestError(Exception):
    """A bad request: HTTP 400 (or `status`) with an OpenAI-style error body."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None,
                 status: int = 400, type: str = "invalid_request_error"):
        super().__init__(message)
        self.message, self.param, self.code, self.status, self.type = message, param, code, status, type


def _error_body(message: str, type: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


_SHUTDOWN = _error_body("the server is shutting down", "server_error", code="server_shutdown")


def _error_of(exc: BaseException) -> tuple[int, dict]:
    """(HTTP status, OpenAI error body) for an exception raised by validation or the engine."""
    if isinstance(exc, RequestError):
        return exc.status, _error_body(exc.message, exc.type, exc.param, exc.code)
    if isinstance(exc, ContextOverflowError):
        return 400, _error_body(str(exc), "invalid_request_error", None, "context_length_exceeded")
    if isinstance(exc, (InvalidArgumentError, StateError)):
        return 400, _error_body(str(exc), "invalid_request_error")
    if isinstance(exc, OutOfMemoryError):
        return 503, _error_body(f"out of memory: {exc}", "server_error", code="out_of_memory")
    if isinstance(exc, Dsv4Error):
        return 500, _error_body(f"{type(exc).__name__}: {exc}", "server_error")
    return 500, _error_body(f"internal error ({type(exc).__name__})", "server_error")


def _error_response(exc: BaseException) -> JSONResponse:
    status, body = _error_of(exc)
    if status >= 500:
        log.error("request failed: %s", body["error"]["message"], exc_info=exc)
    return JSONResponse(body, status_code=status)


# --- the worker -------------------------------------------------------------------------------------
class _Cancelled(Exception):
    """Raised inside the worker when a job's client has gone."""


class _Job:
    """One request's work: its cancel flag and the queue its chunks come back through."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self.cancel = threading.Event()
        self.items: asyncio.Queue = asyncio.Queue()
        self.created = time.monotonic()
        self.started: float | None = None
        self.prompt_tokens: int | None = None   # as fed by the model (set by the eval hook)
        self.evals = 0                          # single-token evals after the prompt

    def put(self, kind: str, value: Any = None) -> None:
        try:
            self.loop.call_soon_threadsafe(self.items.put_nowait, (kind, value))
        except RuntimeError:                     # the loop is closed: nobody is listening
            self.cancel.set()

    @property
    def completion_tokens(self) -> int:
        return self.evals + 1 if self.prompt_tokens is not None else 0

    def usage(self) -> dict | None:
        if self.prompt_tokens is None:
            return None
        n = self.completion_tokens
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": n, "total_tokens": self.prompt_tokens + n}


class Engine:
    """Owns the model and runs jobs on it one at a time, in arrival order, on one worker thread."""

    def __init__(self, model):
        self.model = model
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="dsv4-model")
        self._count_lock = threading.Lock()
        self.queued = 0          # submitted, not started
        self.busy = False        # a job is running
        self.closing = False
        self.served = 0          # jobs finished (any way)
        self.cancelled = 0       # jobs stopped because their client went away

    def submit(self, job: _Job, work: Callable[[Any, _Job], None]) -> None:
        with self._count_lock:
            self.queued += 1
        self._executor.submit(self._run, job, work)

    def shutdown(self) -> None:
        self.closing = True
        self._executor.shutdown(wait=False, cancel_futures=False)

    @contextlib.contextmanager
    def _hooks(self, job: _Job):
        """For one job: a cancellation check before every eval, and the prompt/completion token
        counts (for streamed usage). Set on the instance, on the worker thread only."""
        model = self.model
        real_eval = model.eval
        real_feed = getattr(model, "_feed", None)

        def eval(tokens, *args, **kwargs):
            if job.cancel.is_set() or self.closing:
                raise _Cancelled()
            out = real_eval(tokens, *args, **kwargs)
            if job.prompt_tokens is not None:
                job.evals += 1
            return out

        def _feed(tokens, *args, **kwargs):
            out = real_feed(tokens, *args, **kwargs)
            job.prompt_tokens, job.evals = len(tokens), 0
            return out

        hooked = []
        try:
            for name, fn in (("eval", eval), ("_feed", _feed if real_feed is not None else None)):
                if fn is not None:
                    setattr(model, name, fn)
                    hooked.append(name)
        except AttributeError:    # a model that refuses instance attributes: no hooks
            pass
        try:
            yield
        finally:
            for name in hooked:
                with contextlib.suppress(AttributeError):
                    delattr(model, name)

    def _run(self, job: _Job, work: Callable[[Any, _Job], None]) -> None:
        with self._count_lock:
            self.queued -= 1
            self.busy = True
        job.started = time.monotonic()
        try:
            if job.cancel.is_set() or self.closing:
                raise _Cancelled()
            with self._hooks(job):
                work(self.model, job)
        except _Cancelled:
            with self._count_lock:
                self.cancelled += 1
            job.put("cancelled")
        except BaseException as e:  # noqa: BLE001 - every failure goes back to the request
            if not isinstance(e, (InvalidArgumentError, ContextOverflowError, StateError)):
                # an unexpected failure: start the next job from an empty, known state
                with contextlib.suppress(BaseException):
                    self.model.reset()
            job.put("error", e)
        finally:
            with self._count_lock:
                self.busy = False
                self.served += 1


def _run_blocking(call: Callable[[], dict]) -> Callable[[Any, _Job], None]:
    def work(model, job: _Job) -> None:
        job.put("result", call())
    return work


def _run_stream(call: Callable[[], Any]) -> Callable[[Any, _Job], None]:
    def work(model, job: _Job) -> None:
        it = call()
        try:
            for chunk in it:
                if job.cancel.is_set():
                    raise _Cancelled()
                job.put("chunk", chunk)
        finally:
            close = getattr(it, "close", None)
            if close is not None:
                close()         # on this thread: the generator never runs on two threads
        job.put("end")
    return work


# --- request parsing ----------------------------------------------------------------------------------
_MISSING = object()


def _get(body: dict, *names: str) -> tuple[str, Any]:
    """(name, value) of the first of `names` present and not null in the body, else (names[0], _MISSING)."""
    for n in names:
        v = body.get(n)
        if v is not None:
            return n, v
    return names[0], _MISSING


def _number(body: dict, name: str, default: Any, integer: bool = False, aliases: tuple[str, ...] = ()) -> Any:
    name, v = _get(body, name, *aliases)
    if v is _MISSING:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)) or (integer and not float(v).is_integer()):
        raise RequestError(f"{name} must be {'an integer' if integer else 'a number'}, got {v!r}", name)
    if not math.isfinite(v):
        raise RequestError(f"{name} must be finite, got {v!r}", name)
    return int(v) if integer else float(v)


def _flag(body: dict, name: str, default: bool = False) -> bool:
    v = body.get(name)
    if v is None:
        return default
    if not isinstance(v, bool):
        raise RequestError(f"{name} must be a boolean, got {v!r}", name)
    return v


def _reject_unsupported(body: dict) -> None:
    for name in ("n", "best_of"):
        v = body.get(name)
        if v is not None and v != 1:
            raise RequestError(f"{name}={v!r} is not supported: this server generates one choice per request "
                               f"(send several requests)", name)
    if body.get("logprobs") not in (None, False, 0) or body.get("top_logprobs") not in (None, 0):
        raise RequestError("logprobs are not supported by this server", "logprobs")
    for name in ("presence_penalty", "frequency_penalty"):
        v = body.get(name)
        if v not in (None, 0, 0.0):
            raise RequestError(f"{name} is not supported (use repeat_penalty)", name)
    if body.get("logit_bias"):
        raise RequestError("logit_bias is not supported by this server", "logit_bias")
    rf = body.get("response_format")
    if rf is not None and not (isinstance(rf, dict) and rf.get("type") in (None, "text")):
        raise RequestError("response_format other than {'type': 'text'} is not supported (no constrained "
                           "decoding)", "response_format")
    for name in ("grammar", "json_schema"):
        if body.get(name):
            raise RequestError(f"{name} is not supported (no constrained decoding)", name)


def _sampling(body: dict, default_max: int | None, n_ctx: int) -> dict:
    """The Model keyword arguments common to both endpoints."""
    _reject_unsupported(body)
    max_tokens = _number(body, "max_completion_tokens", None, integer=True, aliases=("max_tokens", "n_predict"))
    if max_tokens is None or max_tokens == -1:
        max_tokens = default_max if default_max is not None else n_ctx
    elif max_tokens < 1:
        raise RequestError(f"max_tokens must be at least 1, got {max_tokens}", "max_tokens")
    temperature = _number(body, "temperature", 0.8)
    if temperature < 0:
        raise RequestError(f"temperature must be >= 0, got {temperature}", "temperature")
    top_p = _number(body, "top_p", 0.95)
    if not 0 < top_p <= 1:
        raise RequestError(f"top_p must be in (0, 1], got {top_p}", "top_p")
    top_k = max(0, _number(body, "top_k", 40, integer=True))
    min_p = _number(body, "min_p", 0.05)
    if not 0 <= min_p <= 1:
        raise RequestError(f"min_p must be in [0, 1], got {min_p}", "min_p")
    repeat_penalty = _number(body, "repeat_penalty", 1.0)
    if repeat_penalty <= 0:
        raise RequestError(f"repeat_penalty must be > 0, got {repeat_penalty}", "repeat_penalty")
    seed = _number(body, "seed", None, integer=True)
    if seed is not None and seed < 0:
        if seed != -1:
            raise RequestError(f"seed must be >= 0 (or -1 for a random seed), got {seed}", "seed")
        seed = None
    stop = body.get("stop")
    if stop is not None and not isinstance(stop, str):
        if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
            raise RequestError("stop must be a string or a list of strings", "stop")
    return dict(max_tokens=max_tokens, temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                repeat_penalty=repeat_penalty, seed=seed, stop=stop)


def _stream_flags(body: dict) -> tuple[bool, bool]:
    stream = _flag(body, "stream")
    opts = body.get("stream_options")
    if opts is not None and not isinstance(opts, dict):
        raise RequestError("stream_options must be an object", "stream_options")
    include_usage = bool(opts and opts.get("include_usage")) and stream
    return stream, include_usage


def _prompt(body: dict, n_vocab: int) -> str | list[int]:
    p = body.get("prompt")
    if isinstance(p, list) and len(p) == 1 and isinstance(p[0], (str, list)):
        p = p[0]                                     # ["text"] or [[ids]]
    if isinstance(p, str):
        return p
    if isinstance(p, list) and p and all(isinstance(t, int) and not isinstance(t, bool) for t in p):
        bad = [t for t in p if not 0 <= t < n_vocab]
        if bad:
            raise RequestError(f"token id {bad[0]} is outside the vocabulary [0, {n_vocab})", "prompt")
        return p
    if isinstance(p, list) and len(p) > 1 and all(isinstance(x, (str, list)) for x in p):
        raise RequestError("only one prompt per request is supported (send several requests)", "prompt")
    raise RequestError("prompt must be a string, a non-empty list of token ids, or a list holding one of them",
                       "prompt")


def _thinking(body: dict) -> bool:
    kwargs = body.get("chat_template_kwargs")
    if kwargs is not None and not isinstance(kwargs, dict):
        raise RequestError("chat_template_kwargs must be an object", "chat_template_kwargs")
    kwargs = kwargs or {}
    for source, key in ((kwargs, "thinking"), (kwargs, "enable_thinking"), (body, "thinking")):
        v = source.get(key)
        if v is None:
            continue
        if isinstance(v, dict):                      # DeepSeek API style: {"type": "enabled"}
            v = v.get("type")
            if v in ("enabled", "disabled"):
                return v == "enabled"
        if isinstance(v, bool):
            return v
        raise RequestError(f"{key} must be a boolean (or {{'type': 'enabled'|'disabled'}}), got {v!r}",
                           "chat_template_kwargs" if source is kwargs else key)
    return False


def _chat_args(body: dict) -> dict:
    from .chat import normalize_messages

    messages = body.get("messages")
    try:
        normalize_messages(messages)                  # same checks the template applies, but before queueing
    except InvalidArgumentError as e:
        raise RequestError(str(e), "messages") from None
    tools = body.get("tools")
    if tools is not None and (not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools)):
        raise RequestError("tools must be a list of tool objects", "tools")
    choice = body.get("tool_choice")
    if choice is not None and choice not in ("auto", "none"):
        raise RequestError("tool_choice must be 'auto' or 'none' (forcing a tool call is not supported)",
                           "tool_choice")
    if choice == "none":
        tools = None
    effort = body.get("reasoning_effort")
    kwargs = body.get("chat_template_kwargs")
    if effort is None and isinstance(kwargs, dict):
        effort = kwargs.get("reasoning_effort")
    if effort is not None and not isinstance(effort, str):
        raise RequestError("reasoning_effort must be a string", "reasoning_effort")
    return dict(messages=messages, thinking=_thinking(body), tools=tools or None, reasoning_effort=effort)


async def _json_body(request: Request) -> dict:
    raw = await request.body()
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise RequestError(f"the request body is not valid JSON: {e}") from None
    if not isinstance(body, dict):
        raise RequestError("the request body must be a JSON object")
    return body


# --- responses ------------------------------------------------------------------------------------------
def _sse(data: Any) -> bytes:
    return b"data: " + json.dumps(data, ensure_ascii=False, separators=(",", ":")).encode("utf-8") + b"\n\n"


class _EventStream(StreamingResponse):
    """text/event-stream whose job is cancelled however the response ends (done, disconnect, error)."""

    def __init__(self, content, job: _Job):
        super().__init__(content, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self._job = job

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._job.cancel.set()


async def _watch_disconnect(request: Request, job: _Job) -> None:
    """Cancels `job` when the client goes away before the response starts."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            job.cancel.set()
            return


# --- the application ------------------------------------------------------------------------------------
class _Auth:
    """Pure-ASGI Bearer-token check (Authorization: Bearer KEY, or X-Api-Key: KEY)."""

    def __init__(self, app, keys: list[str]):
        self.app = app
        self.keys = [k.encode() for k in keys]

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http" and scope["method"] != "OPTIONS" and scope["path"] not in OPEN_PATHS:
            headers = dict(scope["headers"])
            auth = headers.get(b"authorization", b"")
            token = auth[7:].strip() if auth[:7].lower() == b"bearer " else headers.get(b"x-api-key", b"")
            if not any(hmac.compare_digest(token, k) for k in self.keys):
                body = _error_body("invalid or missing API key (send 'Authorization: Bearer KEY')",
                                   "authentication_error", code="invalid_api_key")
                await JSONResponse(body, 401, headers={"WWW-Authenticate": "Bearer"})(scope, receive, send)
                return
        await self.app(scope, receive, send)


def _require_deps() -> None:
    if _MISSING_DEPS is not None:
        raise ImportError(f"the server needs starlette and uvicorn ({_MISSING_DEPS}): "
                          f"pip install starlette uvicorn")


def build_app(model, model_id: str | None = None, api_key: str | list[str] | None = None,
              default_max_tokens: int | None = None, cors_origins: list[str] | None = None) -> Starlette:
    """The ASGI app serving `model` (a `dsv4_ggml.Model`) under the id `model_id` (default: the
    model's file name without extension). `api_key`: one key or a list (None: no check);
    `default_max_tokens`: the generation cap of requests that give none; `cors_origins`: origins
    allowed by CORS (None: no CORS headers)."""
    _require_deps()
    model_id = model_id or model.name
    engine = Engine(model)
    created = int(time.time())
    n_ctx = int(model.n_ctx)

    def model_card() -> dict:
        hp = getattr(model, "hparams", {}) or {}
        return {"id": model_id, "object": "model", "created": created, "owned_by": "dsv4-ggml",
                "max_model_len": n_ctx,
                "meta": {"n_ctx": n_ctx, "n_vocab": int(model.n_vocab), "n_ctx_train": hp.get("n_ctx_train"),
                         "n_layer": hp.get("n_layer"), "backend": getattr(model, "backend", None)}}

    async def health(request: Request) -> Response:
        return JSONResponse({"status": "ok", "model": model_id, "busy": engine.busy, "queued": engine.queued,
                             "served": engine.served, "cancelled": engine.cancelled})

    async def models(request: Request) -> Response:
        return JSONResponse({"object": "list", "data": [model_card()]})

    async def model_info(request: Request) -> Response:
        if request.path_params["model"] != model_id:
            return JSONResponse(_error_body(f"the model {request.path_params['model']!r} does not exist "
                                            f"(this server serves {model_id!r})", "invalid_request_error",
                                            "model", "model_not_found"), 404)
        return JSONResponse(model_card())

    async def dispatch(request: Request, kind: str, call: Callable[..., Any], stream: bool,
                       include_usage: bool, leading: int = 0) -> Response:
        """Queues the job and answers: a JSON body, or an event stream once a chunk made by sampling
        (past the `leading` chunks made before it: the chat role, the echoed prompt) or the end has
        come back, so that request errors found by the engine are still plain HTTP errors."""
        job = _Job(asyncio.get_running_loop())
        engine.submit(job, _run_stream(call) if stream else _run_blocking(call))
        watcher = asyncio.create_task(_watch_disconnect(request, job))
        handed_off = False
        try:
            if not stream:
                what, value = await job.items.get()
                if what == "error":
                    return _error_response(value)
                if what == "cancelled":
                    return _cancelled_response()
                value["model"] = model_id
                _log_job(kind, job)
                return JSONResponse(value)
            head: list[tuple[str, Any]] = []
            while True:
                what, value = await job.items.get()
                if what == "error":
                    return _error_response(value)
                if what == "cancelled":
                    return _cancelled_response()
                head.append((what, value))
                if what == "end" or len(head) > leading:
                    break
            handed_off = True
            return _EventStream(_events(kind, job, head, include_usage), job)
        finally:
            watcher.cancel()
            if not handed_off:
                job.cancel.set()

    def _cancelled_response() -> Response:
        if engine.closing:
            return JSONResponse(_SHUTDOWN, status_code=503)
        return Response(status_code=499)     # the client has gone: nobody reads this

    async def _events(kind: str, job: _Job, head: list, include_usage: bool):
        last: dict | None = None
        items = iter(head)
        while True:
            nxt = next(items, None)
            what, value = nxt if nxt is not None else await job.items.get()
            if what == "chunk":
                value["model"] = model_id
                last = value
                yield _sse(value)
            elif what == "error":
                status, body = _error_of(value)
                if status >= 500:
                    log.error("stream failed: %s", body["error"]["message"], exc_info=value)
                yield _sse(body)
                return
            elif what == "cancelled":     # the client has gone, or the server is stopping
                if engine.closing:
                    yield _sse(_SHUTDOWN)
                return
            else:   # end
                if include_usage and last is not None:
                    yield _sse({"id": last["id"], "object": last["object"], "created": last["created"],
                                "model": model_id, "choices": [], "usage": job.usage()})
                _log_job(kind, job)
                yield b"data: [DONE]\n\n"
                return

    async def completions(request: Request) -> Response:
        try:
            body = await _json_body(request)
            kw = _sampling(body, default_max_tokens if default_max_tokens is not None
                           else COMPLETION_DEFAULT_MAX_TOKENS, n_ctx)
            prompt = _prompt(body, int(model.n_vocab))
            if body.get("suffix"):
                raise RequestError("suffix (fill-in-the-middle) is not supported", "suffix")
            echo = _flag(body, "echo")
            stream, include_usage = _stream_flags(body)
        except RequestError as e:
            return _error_response(e)
        return await dispatch(request, "completion",
                              lambda: model.create_completion(prompt, stream=stream, echo=echo, **kw),
                              stream, include_usage, leading=1 if echo else 0)

    async def chat_completions(request: Request) -> Response:
        try:
            body = await _json_body(request)
            kw = _sampling(body, default_max_tokens, n_ctx)
            kw.update(_chat_args(body))
            stream, include_usage = _stream_flags(body)
        except RequestError as e:
            return _error_response(e)
        messages = kw.pop("messages")
        return await dispatch(request, "chat.completion",
                              lambda: model.create_chat_completion(messages, stream=stream, **kw),
                              stream, include_usage, leading=1)

    def _log_job(kind: str, job: _Job) -> None:
        if job.started is None:
            return
        took = time.monotonic() - job.started
        n = job.completion_tokens
        log.info("%s: prompt %s tokens, %d generated in %.2f s (%.1f tokens/s), waited %.2f s in the queue",
                 kind, job.prompt_tokens, n, took, n / max(took, 1e-9), job.started - job.created)

    async def http_error(request: Request, exc: HTTPException) -> Response:
        typ = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return JSONResponse(_error_body(f"{request.method} {request.url.path}: {exc.detail}", typ),
                            status_code=exc.status_code, headers=getattr(exc, "headers", None))

    async def server_error(request: Request, exc: Exception) -> Response:
        return _error_response(exc)

    routes = []
    for prefix in ("/v1", ""):
        routes += [
            Route(f"{prefix}/health", health, methods=["GET"]),
            Route(f"{prefix}/models", models, methods=["GET"]),
            Route(f"{prefix}/models/{{model:path}}", model_info, methods=["GET"]),
            Route(f"{prefix}/completions", completions, methods=["POST"]),
            Route(f"{prefix}/chat/completions", chat_completions, methods=["POST"]),
        ]
    middleware = []
    if cors_origins:
        from starlette.middleware.cors import CORSMiddleware
        middleware.append(Middleware(CORSMiddleware, allow_origins=list(cors_origins), allow_methods=["*"],
                                     allow_headers=["*"]))
    keys = [api_key] if isinstance(api_key, str) else list(api_key or [])
    keys = [k for k in keys if k]
    if keys:
        middleware.append(Middleware(_Auth, keys=keys))

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        engine.shutdown()      # running and queued jobs stop at their next token

    app = Starlette(routes=routes, middleware=middleware, lifespan=lifespan,
                    exception_handlers={HTTPException: http_error, Exception: server_error})
    app.state.engine = engine
    app.state.model_id = model_id
    return app


# --- running it -------------------------------------------------------------------------------------------
def _tiny_default() -> str:
    import tempfile

    from .tiny import write_tiny_model

    d = tempfile.mkdtemp(prefix="dsv4-tiny-")
    path = os.path.join(d, "tiny-seed0.gguf")
    write_tiny_model(path, seed=0)
    return path


def serve(model_path: str | None, host: str = "127.0.0.1", port: int = 8080, n_ctx: int = 4096,
          n_threads: int | None = None, api_key: str | list[str] | None = None, model_id: str | None = None,
          backend: str = "cpu", n_ubatch: int = 512, cache_type: str = "f16", flash_attn: bool = True,
          default_max_tokens: int | None = None, cors_origins: list[str] | None = None,
          log_level: str = "info", n_gpu_layers: int | None = None, experts_on_host: bool = False,
          repack: bool | str = True) -> None:
    """Loads the model and serves it until interrupted (Ctrl-C / SIGTERM). `model_path` None:
    the embedded tiny random model (a demo)."""
    _require_deps()
    import uvicorn

    from .model import Model

    temporary = model_path is None
    if temporary:
        model_path = _tiny_default()
        print("(no model given: serving the embedded tiny DeepSeek-V4 model, random weights)", file=sys.stderr)
    try:
        model = Model(model_path, n_ctx=n_ctx, n_threads=n_threads, backend=backend, n_ubatch=n_ubatch,
                      cache_type=cache_type, flash_attn=flash_attn, n_gpu_layers=n_gpu_layers,
                      experts_on_host=experts_on_host, repack=repack)
        _ = (model.tokenizer, model.chat_template)     # build both now, not in the first request
    finally:
        if temporary:     # loaded (mapped) already; uvicorn ends a SIGTERM by the signal, so no atexit
            import shutil
            shutil.rmtree(os.path.dirname(model_path), ignore_errors=True)
    app = build_app(model, model_id=model_id, api_key=api_key, default_max_tokens=default_max_tokens,
                    cors_origins=cors_origins)
    print(f"serving {app.state.model_id!r} (n_ctx {n_ctx}, {backend}) on http://{host}:{port}/v1"
          + (" (API key required)" if api_key else ""), file=sys.stderr, flush=True)
    engine: Engine = app.state.engine

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame) -> None:
            engine.closing = True       # running and queued jobs end at their next token: streams close
            super().handle_exit(sig, frame)

    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=5)
    try:
        Server(config).run()
    finally:
        model.close()


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
    parser.add_argument("-b", "--ubatch", type=int, default=512, help="micro-batch size (default 512)")
    parser.add_argument("--cache-type", default="f16", help="f32, f16 (default), bf16 or q8_0")
    parser.add_argument("--no-flash-attn", action="store_true", help="attention by matmul + softmax")
    parser.add_argument("--cors-origin", action="append", default=None,
                        help="allow browser requests from this origin (repeatable, '*' for any; default none)")
    parser.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"),
                        help="server log level (default info)")


def run(args: argparse.Namespace) -> int:
    """Runs `serve` with the options of `add_arguments` (for `dsv4-ggml serve`); returns the exit code."""
    try:
        _require_deps()
        import uvicorn  # noqa: F401
    except ImportError as e:
        print(f"dsv4-ggml serve: {e}", file=sys.stderr)
        return 1
    keys = args.api_key or ([os.environ["DSV4_API_KEY"]] if os.environ.get("DSV4_API_KEY") else None)
    serve(args.model, host=args.host, port=args.port, n_ctx=args.ctx, n_threads=args.threads, api_key=keys,
          model_id=args.alias, n_ubatch=args.ubatch, cache_type=args.cache_type,
          flash_attn=not args.no_flash_attn, default_max_tokens=args.n_predict, cors_origins=args.cors_origin,
          log_level=args.log_level, **backend_kwargs(args))
    return 0


def main(argv: list[str] | None = None) -> int:
    """`python -m dsv4_ggml.server ...`: the same as `dsv4-ggml serve ...`."""
    parser = argparse.ArgumentParser(prog="dsv4-ggml serve", description="Serve a DeepSeek-V4 model over HTTP.")
    add_arguments(parser)
    parser.set_defaults(fn=run)
    return run_parsed(parser, sys.argv[1:] if argv is None else list(argv))


if __name__ == "__main__":
    sys.exit(main())
