"""Reading the fields of a request body: numbers, flags, sampling, prompts, chat arguments."""
from __future__ import annotations

import json
import math
from typing import Any

from ..errors import InvalidArgumentError
from .errors import RequestError

_MISSING = object()


def _get(body: dict, *names: str) -> tuple[str, Any]:
    """(name, value) of the first of `names` present and not null in the body, else (names[0], _MISSING)."""
    for n in names:
        v = body.get(n)
        if v is not None:
            return n, v
    return names[0], _MISSING


def number(body: dict, name: str, default: Any, integer: bool = False, aliases: tuple[str, ...] = ()) -> Any:
    name, v = _get(body, name, *aliases)
    if v is _MISSING:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)) or (integer and not float(v).is_integer()):
        raise RequestError(f"{name} must be {'an integer' if integer else 'a number'}, got {v!r}", name)
    if not math.isfinite(v):
        raise RequestError(f"{name} must be finite, got {v!r}", name)
    return int(v) if integer else float(v)


def flag(body: dict, name: str, default: bool = False) -> bool:
    v = body.get(name)
    if v is None:
        return default
    if not isinstance(v, bool):
        raise RequestError(f"{name} must be a boolean, got {v!r}", name)
    return v


def reject_unsupported(body: dict) -> None:
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


def sampling(body: dict, default_max: int | None, n_ctx: int) -> dict:
    """The Model keyword arguments common to both endpoints."""
    reject_unsupported(body)
    max_tokens = number(body, "max_completion_tokens", None, integer=True, aliases=("max_tokens", "n_predict"))
    if max_tokens is None or max_tokens == -1:
        max_tokens = default_max if default_max is not None else n_ctx
    elif max_tokens < 1:
        raise RequestError(f"max_tokens must be at least 1, got {max_tokens}", "max_tokens")
    temperature = number(body, "temperature", 0.8)
    if temperature < 0:
        raise RequestError(f"temperature must be >= 0, got {temperature}", "temperature")
    top_p = number(body, "top_p", 0.95)
    if not 0 < top_p <= 1:
        raise RequestError(f"top_p must be in (0, 1], got {top_p}", "top_p")
    top_k = max(0, number(body, "top_k", 40, integer=True))
    min_p = number(body, "min_p", 0.05)
    if not 0 <= min_p <= 1:
        raise RequestError(f"min_p must be in [0, 1], got {min_p}", "min_p")
    repeat_penalty = number(body, "repeat_penalty", 1.0)
    if repeat_penalty <= 0:
        raise RequestError(f"repeat_penalty must be > 0, got {repeat_penalty}", "repeat_penalty")
    seed = number(body, "seed", None, integer=True)
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


def stream_flags(body: dict) -> tuple[bool, bool]:
    stream = flag(body, "stream")
    opts = body.get("stream_options")
    if opts is not None and not isinstance(opts, dict):
        raise RequestError("stream_options must be an object", "stream_options")
    include_usage = bool(opts and opts.get("include_usage")) and stream
    return stream, include_usage


def prompt(body: dict, n_vocab: int) -> str | list[int]:
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


def thinking(body: dict) -> bool:
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


def chat_args(body: dict) -> dict:
    from ..chat import normalize_messages

    messages = body.get("messages")
    try:
        normalize_messages(messages)                  # same checks the template applies, but before queueing
    except InvalidArgumentError as e:
        raise RequestError(str(e), "messages") from None
    tools = body.get("tools")
    if tools is not None and (not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools)):
        raise RequestError("tools must be a list of tool objects", "tools")
    force = tool_choice(body.get("tool_choice"), tools)
    if body.get("tool_choice") == "none":
        tools = None
    effort = body.get("reasoning_effort")
    kwargs = body.get("chat_template_kwargs")
    if effort is None and isinstance(kwargs, dict):
        effort = kwargs.get("reasoning_effort")
    if effort is not None and not isinstance(effort, str):
        raise RequestError("reasoning_effort must be a string", "reasoning_effort")
    return dict(messages=messages, thinking=thinking(body), tools=tools or None, reasoning_effort=effort,
                force_tool=force)


def tool_names(tools: list | None) -> list[str]:
    return [t["function"]["name"] for t in tools or ()
            if isinstance(t, dict) and isinstance(t.get("function"), dict) and isinstance(t["function"].get("name"), str)]


def tool_choice(choice: Any, tools: list | None) -> str | bool | None:
    """What `tool_choice` forces: None (auto, none), True (some tool: "required") or a tool's name.
    Forcing is done by constraining the start of the answer (see `server.chat`)."""
    if choice is None or choice in ("auto", "none"):
        return None
    names = tool_names(tools)
    if choice in ("required", "any"):
        if not names:
            raise RequestError("tool_choice 'required' needs at least one tool in 'tools'", "tool_choice")
        return True
    name = None
    if isinstance(choice, dict):
        fn = choice.get("function") if choice.get("type") == "function" else None
        name = fn.get("name") if isinstance(fn, dict) else None
    if not isinstance(name, str):
        raise RequestError("tool_choice must be 'auto', 'none', 'required' or "
                           "{'type': 'function', 'function': {'name': ...}}", "tool_choice")
    if name not in names:
        raise RequestError(f"tool_choice names {name!r}, which is not in 'tools'", "tool_choice")
    return name


MAX_BODY_BYTES = 32 << 20     # a request body larger than this is refused (HTTP 413)


async def json_body(request: Any, max_bytes: int = MAX_BODY_BYTES) -> dict:
    """The request's JSON object; 413 when the body is over `max_bytes`, 400 when it is not JSON."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > max_bytes:
        raise RequestError(f"the request body has {declared} bytes; the limit is {max_bytes}", status=413,
                           code="request_too_large")
    raw = bytearray()
    async for piece in request.stream():
        raw += piece
        if len(raw) > max_bytes:
            raise RequestError(f"the request body is over the limit of {max_bytes} bytes", status=413,
                               code="request_too_large")
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise RequestError(f"the request body is not valid JSON: {e}") from None
    if not isinstance(body, dict):
        raise RequestError("the request body must be a JSON object")
    return body
