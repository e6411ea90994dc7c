"""The Anthropic Messages API: `POST /v1/messages` and `POST /v1/messages/count_tokens`.

A request becomes the same chat the OpenAI endpoint runs: `system` (a string or text blocks),
user turns (text blocks; `tool_result` blocks become tool messages, rendered as the model's
`<tool_result>` text), assistant turns (`thinking` blocks as the reasoning, text, `tool_use`
blocks as DSML tool calls), `tools` (`input_schema` as the function's parameters), `tool_choice`
(auto, any, tool, none), `thinking: {"type": "enabled"}` for thinking mode, `stop_sequences`,
`max_tokens` (required, as in Anthropic's API), `temperature` (default 1.0), `top_p`, `top_k`.
The answer's content blocks are `thinking`, `text` and `tool_use` in the order the model wrote
them; `stop_reason` is end_turn, max_tokens, stop_sequence or tool_use. Streaming sends
message_start, content_block_start / content_block_delta (text_delta, thinking_delta,
input_json_delta) / content_block_stop, message_delta and message_stop events. Errors have
Anthropic's shape `{"type": "error", "error": {"type", "message"}}`.
"""
from __future__ import annotations

import json
import uuid
from typing import Any

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from ..chat import normalize_messages
from ..dsml import StreamParser, parse_turn
from ..errors import InvalidArgumentError
from .errors import RequestError
from .params import json_body, number
from .prompts import chat_prompt
from .respond import respond

ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
               404: "not_found_error", 413: "request_too_large", 429: "rate_limit_error",
               500: "api_error", 503: "overloaded_error"}


def anthropic_error(status: int, body: dict) -> dict:
    """An OpenAI-shaped error body in Anthropic's shape."""
    return {"type": "error", "error": {"type": ERROR_TYPES.get(status, "api_error"),
                                       "message": body["error"]["message"]}}


def _event(name: str, data: dict) -> bytes:
    return (f"event: {name}\ndata: ".encode() + json.dumps(data, ensure_ascii=False, separators=(",", ":")).encode()
            + b"\n\n")


def _tool_id() -> str:
    return "toolu_" + uuid.uuid4().hex[:24]


# --- the request -------------------------------------------------------------------------------------------
def _text_of(content: Any, where: str) -> str:
    """A string, or the text of a list of text blocks."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for b in content:
            if not isinstance(b, dict) or b.get("type") != "text" or not isinstance(b.get("text"), str):
                raise RequestError(f"{where}: only text blocks are supported here, got {_kind(b)}", "messages")
            parts.append(b["text"])
        return "".join(parts)
    raise RequestError(f"{where}: content must be a string or a list of content blocks", "messages")


def _kind(block: Any) -> str:
    return repr(block.get("type")) if isinstance(block, dict) else type(block).__name__


def _user_messages(content: Any, i: int) -> list[dict]:
    if isinstance(content, str):
        return [{"role": "user", "content": content}]
    if not isinstance(content, list):
        raise RequestError(f"messages[{i}].content must be a string or a list of blocks", "messages")
    out: list[dict] = []
    for j, b in enumerate(content):
        kind = b.get("type") if isinstance(b, dict) else None
        if kind == "text" and isinstance(b.get("text"), str):
            out.append({"role": "user", "content": b["text"]})
        elif kind == "tool_result":
            text = _text_of(b.get("content", ""), f"messages[{i}].content[{j}] (tool_result)")
            out.append({"role": "tool", "tool_call_id": b.get("tool_use_id"), "content": text})
        else:
            raise RequestError(f"messages[{i}].content[{j}]: a user turn takes text and tool_result blocks, "
                               f"got {_kind(b)}", "messages")
    return out


def _assistant_message(content: Any, i: int) -> dict:
    if isinstance(content, str):
        return {"role": "assistant", "content": content}
    if not isinstance(content, list):
        raise RequestError(f"messages[{i}].content must be a string or a list of blocks", "messages")
    msg: dict[str, Any] = {"role": "assistant", "content": ""}
    reasoning, calls = [], []
    for j, b in enumerate(content):
        kind = b.get("type") if isinstance(b, dict) else None
        if kind == "text" and isinstance(b.get("text"), str):
            msg["content"] += b["text"]
        elif kind == "thinking" and isinstance(b.get("thinking"), str):
            reasoning.append(b["thinking"])
        elif kind == "redacted_thinking":
            continue
        elif kind == "tool_use" and isinstance(b.get("name"), str) and isinstance(b.get("input", {}), dict):
            calls.append({"id": b.get("id"), "type": "function",
                          "function": {"name": b["name"], "arguments": b.get("input", {})}})
        else:
            raise RequestError(f"messages[{i}].content[{j}]: an assistant turn takes text, thinking and tool_use "
                               f"blocks, got {_kind(b)}", "messages")
    if reasoning:
        msg["reasoning_content"] = "".join(reasoning)
    if calls:
        msg["tool_calls"] = calls
    return msg


def chat_of(body: dict) -> dict:
    """The chat (messages, tools, thinking, forced tool) a Messages request describes."""
    messages: list[dict] = []
    system = body.get("system")
    if system is not None:
        messages.append({"role": "system", "content": _text_of(system, "system")})
    turns = body.get("messages")
    if not isinstance(turns, list) or not turns:
        raise RequestError("messages must be a non-empty list", "messages")
    for i, m in enumerate(turns):
        if not isinstance(m, dict) or m.get("role") not in ("user", "assistant"):
            raise RequestError(f"messages[{i}] must have role 'user' or 'assistant'", "messages")
        if m["role"] == "user":
            messages += _user_messages(m.get("content"), i)
        else:
            messages.append(_assistant_message(m.get("content"), i))
    try:
        normalize_messages(messages)
    except InvalidArgumentError as e:
        raise RequestError(str(e), "messages") from None
    tools = body.get("tools")
    if tools is not None:
        if not isinstance(tools, list) or not all(isinstance(t, dict) and isinstance(t.get("name"), str)
                                                  for t in tools):
            raise RequestError("tools must be a list of {name, description, input_schema}", "tools")
        tools = [{"type": "function", "function": {"name": t["name"], "description": t.get("description", ""),
                                                   "parameters": t.get("input_schema", {})}} for t in tools]
    force: str | bool | None = None
    choice = body.get("tool_choice")
    if choice is not None:
        kind = choice.get("type") if isinstance(choice, dict) else None
        names = [t["function"]["name"] for t in tools or ()]
        if kind == "none":
            tools = None
        elif kind == "any":
            if not names:
                raise RequestError("tool_choice 'any' needs tools", "tool_choice")
            force = True
        elif kind == "tool":
            if choice.get("name") not in names:
                raise RequestError(f"tool_choice names {choice.get('name')!r}, which is not in tools", "tool_choice")
            force = choice["name"]
        elif kind != "auto":
            raise RequestError("tool_choice must be {'type': 'auto'|'any'|'tool'|'none'}", "tool_choice")
    thinking = body.get("thinking")
    if thinking is not None and not (isinstance(thinking, dict) and thinking.get("type") in ("enabled", "disabled")):
        raise RequestError("thinking must be {'type': 'enabled', ...} or {'type': 'disabled'}", "thinking")
    return dict(messages=messages, thinking=bool(thinking and thinking["type"] == "enabled"), tools=tools or None,
                reasoning_effort=None, force_tool=force)


def sampling_of(body: dict, n_ctx: int) -> dict:
    max_tokens = body.get("max_tokens")
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
        raise RequestError("max_tokens is required: a positive integer", "max_tokens")
    temperature = number(body, "temperature", 1.0)
    if not 0 <= temperature:
        raise RequestError(f"temperature must be >= 0, got {temperature}", "temperature")
    top_p = number(body, "top_p", 1.0)
    if not 0 < top_p <= 1:
        raise RequestError(f"top_p must be in (0, 1], got {top_p}", "top_p")
    top_k = max(0, number(body, "top_k", 0, integer=True))
    stop = body.get("stop_sequences")
    if stop is not None and (not isinstance(stop, list) or not all(isinstance(s, str) for s in stop)):
        raise RequestError("stop_sequences must be a list of strings", "stop_sequences")
    return dict(max_tokens=max_tokens, temperature=temperature, top_k=top_k, top_p=top_p, min_p=0.0,
                repeat_penalty=1.0, seed=None, stop=stop)


# --- the answer -------------------------------------------------------------------------------------------------
class MessageFormat:
    """Messages responses and their event streams (the interface of `app.respond`)."""

    kind = "message"

    def __init__(self, model_id: str, thinking: bool, tools: list | None):
        self.id, self.model = "msg_" + uuid.uuid4().hex[:24], model_id
        self.thinking, self.tools = thinking, tools
        self.parser = StreamParser(thinking, tools or [], id_factory=_tool_id)
        self.pieces: list[str] = []
        self.task = None            # set by respond(): the usage comes from it
        self.stop_sequence: str | None = None
        self.block: str | None = None     # the open block's type
        self.index = -1
        self.n_calls = 0

    def _usage(self, usage: dict) -> dict:
        cached = usage["prompt_tokens_details"]["cached_tokens"]
        return {"input_tokens": usage["prompt_tokens"] - cached, "output_tokens": usage["completion_tokens"],
                "cache_read_input_tokens": cached, "cache_creation_input_tokens": 0}

    def _stop_reason(self, finish: str) -> str:
        if self.n_calls:
            return "tool_use"
        if finish == "length":
            return "max_tokens"
        return "stop_sequence" if self.stop_sequence else "end_turn"

    def head(self) -> list[bytes]:
        usage = self._usage(self.task.usage()) if self.task is not None else {"input_tokens": 0, "output_tokens": 0}
        return [_event("message_start", {"type": "message_start", "message": {
            "id": self.id, "type": "message", "role": "assistant", "model": self.model, "content": [],
            "stop_reason": None, "stop_sequence": None, "usage": dict(usage, output_tokens=1)}})]

    def _open(self, kind: str, block: dict) -> list[bytes]:
        out = self._close()
        self.index += 1
        self.block = kind
        return out + [_event("content_block_start", {"type": "content_block_start", "index": self.index,
                                                     "content_block": block})]

    def _close(self) -> list[bytes]:
        if self.block is None:
            return []
        self.block = None
        return [_event("content_block_stop", {"type": "content_block_stop", "index": self.index})]

    def _delta(self, delta: dict) -> bytes:
        return _event("content_block_delta", {"type": "content_block_delta", "index": self.index, "delta": delta})

    def _blocks(self, events) -> list[bytes]:
        out: list[bytes] = []
        for kind, value in events:
            if kind == "reasoning":
                if self.block != "thinking":
                    out += self._open("thinking", {"type": "thinking", "thinking": "", "signature": ""})
                out.append(self._delta({"type": "thinking_delta", "thinking": value}))
            elif kind == "content":
                if self.block != "text":
                    out += self._open("text", {"type": "text", "text": ""})
                out.append(self._delta({"type": "text_delta", "text": value}))
            else:
                self.n_calls += 1
                out += self._open("tool_use", {"type": "tool_use", "id": value["id"], "name": value["name"],
                                               "input": {}})
                out.append(self._delta({"type": "input_json_delta", "partial_json": value["arguments"]}))
                out += self._close()
        return out

    def text(self, piece: str) -> list[bytes]:
        self.pieces.append(piece)
        return self._blocks(self.parser.push(piece)) if piece else []

    def end(self, finish: str, usage: dict) -> list[bytes]:
        out = self._blocks(self.parser.finish()) + self._close()
        return out + [
            _event("message_delta", {"type": "message_delta",
                                     "delta": {"stop_reason": self._stop_reason(finish),
                                               "stop_sequence": self.stop_sequence},
                                     "usage": {"output_tokens": usage["completion_tokens"]}}),
            _event("message_stop", {"type": "message_stop"})]

    def body(self, finish: str, usage: dict) -> dict:
        turn = parse_turn("".join(self.pieces), self.thinking, self.tools or [], id_factory=_tool_id)
        content: list[dict] = []
        if turn.reasoning is not None:
            content.append({"type": "thinking", "thinking": turn.reasoning, "signature": ""})
        if turn.content or not turn.tool_calls:
            content.append({"type": "text", "text": turn.content})
        for call in turn.tool_calls:
            content.append({"type": "tool_use", "id": call["id"], "name": call["function"]["name"],
                            "input": json.loads(call["function"]["arguments"])})
        self.n_calls = len(turn.tool_calls)
        return {"id": self.id, "type": "message", "role": "assistant", "model": self.model, "content": content,
                "stop_reason": self._stop_reason(finish), "stop_sequence": self.stop_sequence,
                "usage": self._usage(usage)}

    def error_event(self, body: dict) -> bytes:
        status = 503 if body["error"].get("code") == "server_shutdown" else 500
        return _event("error", anthropic_error(status, body))


def anthropic_routes(ctx) -> list[tuple[str, Any, str]]:
    model = ctx.model

    async def messages(request: Request) -> Response:
        try:
            body = await json_body(request)
            kw = sampling_of(body, ctx.n_ctx)
            chat = chat_of(body)
            stream = body.get("stream", False)
            if not isinstance(stream, bool):
                raise RequestError("stream must be a boolean", "stream")
        except RequestError as e:
            return ctx.error_response(e, anthropic_error)
        fmt = MessageFormat(ctx.model_id, chat["thinking"], chat["tools"])
        return await respond(ctx, request, lambda: chat_prompt(model, **chat), kw, fmt, stream, anthropic_error)

    async def count_tokens(request: Request) -> Response:
        try:
            body = await json_body(request)
            chat = chat_of(body)
            p = await run_in_threadpool(chat_prompt, model, **dict(chat, force_tool=None))
        except Exception as e:  # noqa: BLE001 - request errors and template failures alike
            return ctx.error_response(e, anthropic_error)
        return JSONResponse({"input_tokens": len(p.tokens)})

    return [("/messages", messages, "POST"), ("/messages/count_tokens", count_tokens, "POST")]
