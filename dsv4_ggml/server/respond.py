"""`respond`: a run's events turned into a JSON body or an event stream for any API shape
(OpenAI, Anthropic), with the request's context (model, scheduler, options)."""
from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Any, Callable

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from .errors import SHUTDOWN, RequestError, error_of
from .prompts import Prompt
from .runner import Run
from .scheduler import QueueFull, Scheduler

log = logging.getLogger("uvicorn.error")

RETRY_AFTER_S = 1


@dataclass
class Context:
    """What every route needs: the model, its scheduler and the serving options."""
    model: Any
    scheduler: Scheduler
    model_id: str
    default_max_tokens: int | None
    n_ctx: int
    created: int

    def error_response(self, exc: BaseException, shape: Callable[[int, dict], dict] | None = None) -> Response:
        status, body = error_of(exc)
        if status >= 500:
            log.error("request failed: %s", body["error"]["message"], exc_info=exc)
        headers = {"Retry-After": str(RETRY_AFTER_S)} if status == 503 else None
        return JSONResponse(shape(status, body) if shape else body, status_code=status, headers=headers)


class EventStream(StreamingResponse):
    """text/event-stream whose run is cancelled however the response ends (done, disconnect, error)."""

    def __init__(self, content, run: Run):
        super().__init__(content, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self._run = run

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._run.cancel()


async def _watch_disconnect(request: Request, run: Run) -> None:
    """Cancels `run` when the client goes away before the response starts."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            run.cancel()
            return


def _log_run(kind: str, run: Run) -> None:
    t = run.task
    if t.started is None:
        return
    took = (t.finished or time.monotonic()) - t.started
    n = len(t.generated)
    log.info("%s: slot %s, prompt %d tokens (%d cached), %d generated in %.2f s (%.1f tokens/s), "
             "waited %.2f s in the queue", kind, t.seq, t.prompt_tokens, t.cached_tokens, n, took,
             n / max(took, 1e-9), t.started - t.created)


async def respond(ctx: Context, request: Request, prompt_of: Callable[[], Prompt], sampling_kw: dict, fmt,
                  stream: bool, shape: Callable[[int, dict], dict] | None = None, cache_prompt: bool = True) -> Response:
    """Runs a generation and answers with `fmt`'s body, or with an event stream once the first
    token (or the end) has come, so that errors found before it are plain HTTP errors."""
    try:
        p = await run_in_threadpool(prompt_of)
        run = Run(ctx.scheduler, p.tokens, sampling_kw, p.forced, p.forced_text, p.force_after)
        run.task.cache_prompt = cache_prompt
        run.submit()
    except QueueFull as e:
        return ctx.error_response(RequestError(f"the server is busy: {e}; retry later", status=503,
                                               type="server_error", code="overloaded"), shape)
    except Exception as e:  # noqa: BLE001 - a bad prompt (too long, bad ids) or template failure
        return ctx.error_response(e, shape)
    fmt.task = run.task
    watcher = asyncio.create_task(_watch_disconnect(request, run))
    handed_off = False
    try:
        first: list[tuple[str, Any]] = []
        while True:
            kind, value = await run.next()
            if kind == "error":
                return ctx.error_response(value, shape)
            if kind == "cancelled":
                return _cancelled_response(ctx, shape)
            first.append((kind, value))
            if kind in ("token", "done"):
                break
        if not stream:
            finish = "length"
            for kind, value in first:
                finish = _feed(fmt, kind, value, []) or finish
            while not run.ended:
                kind, value = await run.next()
                if kind == "error":
                    return ctx.error_response(value, shape)
                if kind == "cancelled":
                    return _cancelled_response(ctx, shape)
                finish = _feed(fmt, kind, value, []) or finish
            _log_run(fmt.kind, run)
            return JSONResponse(fmt.body(finish, run.task.usage()))
        handed_off = True
        return EventStream(_events(ctx, fmt, run, first), run)
    finally:
        watcher.cancel()
        if not handed_off:
            run.cancel()


def _feed(fmt, kind: str, value: Any, out: list[bytes]) -> str | None:
    """Passes one event's text to the formatter; returns the finish reason it carries, if any."""
    if kind == "forced":
        out += fmt.text(value)
    elif kind == "token":
        out += fmt.text(value.text)
        if value.stop is not None:
            fmt.stop_sequence = value.stop
        return value.finish_reason
    return None


def _cancelled_response(ctx: Context, shape) -> Response:
    if ctx.scheduler.closing:
        return JSONResponse(shape(503, SHUTDOWN) if shape else SHUTDOWN, status_code=503)
    return Response(status_code=499)     # the client has gone: nobody reads this


async def _events(ctx: Context, fmt, run: Run, first: list):
    finish = "length"
    for piece in fmt.head():
        yield piece
    pending = list(first)
    while True:
        kind, value = pending.pop(0) if pending else await run.next()
        out: list[bytes] = []
        finish = _feed(fmt, kind, value, out) or finish
        for piece in out:
            yield piece
        if kind == "error":
            status, body = error_of(value)
            if status >= 500:
                log.error("stream failed: %s", body["error"]["message"], exc_info=value)
            yield fmt.error_event(body)
            return
        if kind == "cancelled":         # the client has gone, or the server is stopping
            if ctx.scheduler.closing:
                yield fmt.error_event(SHUTDOWN)
            return
        if kind == "done":
            for piece in fmt.end(finish, run.task.usage()):
                yield piece
            _log_run(fmt.kind, run)
            return
