"""Operations endpoints: /health, /metrics (Prometheus), /slots, /tokenize, /detokenize."""
from __future__ import annotations

from typing import Any

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from .errors import RequestError
from .params import flag, json_body

COUNTERS = (   # scheduler counter, metric name, help
    ("requests", "requests", "requests accepted into the queue"),
    ("served", "requests_served", "requests that generated to the end"),
    ("cancelled", "requests_cancelled", "requests stopped because the client went away (or shutdown)"),
    ("errors", "request_errors", "requests that failed in the engine"),
    ("prompt_tokens_evaluated", "prompt_tokens_evaluated", "prompt tokens evaluated (cache misses)"),
    ("cached_tokens", "prompt_tokens_cached", "prompt tokens reused from a slot's cache"),
    ("generated_tokens", "generated_tokens", "tokens generated"),
    ("cache_hits", "prompt_cache_hits", "requests that reused at least one cached prompt token"),
    ("disk_cache_hits", "disk_cache_hits", "slot states restored from --cache-dir"),
    ("steps", "engine_steps", "batched engine steps"),
    ("draft_proposed", "draft_tokens_proposed", "draft tokens verified (--draft)"),
    ("draft_accepted", "draft_tokens_accepted", "draft tokens accepted (--draft)"),
)


class _Collector:
    """Reads the scheduler's counters at scrape time (no locks on the hot path)."""

    def __init__(self, scheduler):
        self.scheduler = scheduler

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        s = self.scheduler
        counts = dict(s.counters)
        for key, name, text in COUNTERS:
            m = CounterMetricFamily(f"dsv4_{name}", text)
            m.add_metric([], counts.get(key, 0))
            yield m
        for name, text, value in (
                ("queue_depth", "requests waiting for a slot", s.queued),
                ("slots_busy", "slots running a request", s.active),
                ("slots_total", "parallel slots", len(s.slots)),
                ("generated_tokens_per_second", "generation speed over the last 10 s", s.tokens_per_second())):
            g = GaugeMetricFamily(f"dsv4_{name}", text)
            g.add_metric([], value)
            yield g


def operation_routes(ctx) -> list[tuple[str, Any, str]]:
    model, scheduler = ctx.model, ctx.scheduler
    registry = None

    async def health(request: Request) -> Response:
        c = scheduler.counters
        return JSONResponse({"status": "ok", "model": ctx.model_id, "busy": scheduler.active > 0,
                             "slots_busy": scheduler.active, "n_parallel": len(scheduler.slots),
                             "queued": scheduler.queued, "served": c["served"], "cancelled": c["cancelled"]})

    async def metrics(request: Request) -> Response:
        nonlocal registry
        try:
            from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
        except ImportError:
            return JSONResponse({"error": {"message": "pip install prometheus-client for /metrics",
                                           "type": "server_error", "param": None, "code": None}}, 501)
        if registry is None:
            registry = CollectorRegistry()
            registry.register(_Collector(scheduler))
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    async def slots(request: Request) -> Response:
        return JSONResponse(scheduler.slot_info())

    async def tokenize(request: Request) -> Response:
        try:
            body = await json_body(request)
            text = body.get("content", body.get("text"))
            if not isinstance(text, str):
                raise RequestError("content must be a string", "content")
            add_special = flag(body, "add_special", False)
        except RequestError as e:
            return ctx.error_response(e)
        ids = await run_in_threadpool(model.tokenize, text, add_special)
        return JSONResponse({"tokens": ids})

    async def detokenize(request: Request) -> Response:
        try:
            body = await json_body(request)
            ids = body.get("tokens")
            if not isinstance(ids, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
                raise RequestError("tokens must be a list of token ids", "tokens")
            bad = [t for t in ids if not 0 <= t < int(model.n_vocab)]
            if bad:
                raise RequestError(f"token id {bad[0]} is outside the vocabulary [0, {model.n_vocab})", "tokens")
        except RequestError as e:
            return ctx.error_response(e)
        return JSONResponse({"content": await run_in_threadpool(model.detokenize, ids)})

    return [("/health", health, "GET"), ("/metrics", metrics, "GET"), ("/slots", slots, "GET"),
            ("/tokenize", tokenize, "POST"), ("/detokenize", detokenize, "POST")]
