"""The OpenAI shapes: `text_completion` and `chat.completion` bodies and their stream chunks.

A formatter turns a run's events into the response: `head()` (chunks before any token: the
chat role, the echoed prompt), `text(piece)` for generated (or forced) text, `end(finish,
usage)` for the last chunks, `body(finish, usage)` for the non-streamed response. Chat text goes
through the DSML parser: reasoning to `reasoning_content`, tool calls to `tool_calls`
(`finish_reason: "tool_calls"`), never DSML in `content`.
"""
from __future__ import annotations

import json
import time
import uuid
from typing import Any

from ..dsml import StreamParser, parse_turn


def sse(data: Any) -> bytes:
    return b"data: " + json.dumps(data, ensure_ascii=False, separators=(",", ":")).encode("utf-8") + b"\n\n"


DONE = b"data: [DONE]\n\n"


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


class CompletionFormat:
    """/v1/completions."""

    kind = "completion"

    def __init__(self, model_id: str, echo_text: str = "", include_usage: bool = False,
                 return_tokens: bool = False):
        self.id, self.created, self.model = new_id("cmpl"), int(time.time()), model_id
        self.echo_text = echo_text
        self.return_tokens = return_tokens
        self.task = None            # set by respond()
        self.include_usage = include_usage
        self.pieces: list[str] = [echo_text]

    def _chunk(self, text: str, finish: str | None) -> dict:
        return {"id": self.id, "object": "text_completion", "created": self.created, "model": self.model,
                "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish}]}

    def head(self) -> list[bytes]:
        return [sse(self._chunk(self.echo_text, None))] if self.echo_text else []

    def text(self, piece: str) -> list[bytes]:
        self.pieces.append(piece)
        return [sse(self._chunk(piece, None))] if piece else []

    def end(self, finish: str, usage: dict) -> list[bytes]:
        last = self._chunk("", finish)
        if self.return_tokens:       # streamed: every generated id, in the finishing chunk
            last["choices"][0]["tokens"] = list(self.task.generated)
        out = [sse(last)]
        if self.include_usage:
            out.append(sse({"id": self.id, "object": "text_completion", "created": self.created, "model": self.model,
                            "choices": [], "usage": usage}))
        return out + [DONE]

    def body(self, finish: str, usage: dict) -> dict:
        out = self._chunk("".join(self.pieces), finish)
        if self.return_tokens:       # llama.cpp's extension: the generated token ids
            out["choices"][0]["tokens"] = list(self.task.generated)
        out["usage"] = usage
        return out

    def error_event(self, body: dict) -> bytes:
        return sse(body)


class ChatFormat:
    """/v1/chat/completions."""

    kind = "chat.completion"

    def __init__(self, model_id: str, thinking: bool, tools: list | None, include_usage: bool = False,
                 return_tokens: bool = False):
        self.id, self.created, self.model = new_id("chatcmpl"), int(time.time()), model_id
        self.thinking, self.tools = thinking, tools
        self.return_tokens = return_tokens
        self.task = None            # set by respond()
        self.include_usage = include_usage
        self.parser = StreamParser(thinking, tools or [])      # no tools: every DSML block stays text
        self.pieces: list[str] = []
        self.n_calls = 0

    def _chunk(self, delta: dict, finish: str | None = None) -> dict:
        return {"id": self.id, "object": "chat.completion.chunk", "created": self.created, "model": self.model,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}

    def _deltas(self, events) -> list[bytes]:
        out = []
        for kind, value in events:
            if kind == "reasoning":
                out.append(sse(self._chunk({"reasoning_content": value})))
            elif kind == "content":
                out.append(sse(self._chunk({"content": value})))
            else:
                self.n_calls += 1
                out.append(sse(self._chunk({"tool_calls": [{
                    "index": value["index"], "id": value["id"], "type": "function",
                    "function": {"name": value["name"], "arguments": value["arguments"]}}]})))
        return out

    def head(self) -> list[bytes]:
        return [sse(self._chunk({"role": "assistant", "content": ""}))]

    def text(self, piece: str) -> list[bytes]:
        self.pieces.append(piece)
        return self._deltas(self.parser.push(piece)) if piece else []

    def end(self, finish: str, usage: dict) -> list[bytes]:
        out = self._deltas(self.parser.finish())
        last = self._chunk({}, "tool_calls" if self.n_calls else finish)
        if self.return_tokens:
            last["choices"][0]["tokens"] = list(self.task.generated)
        out.append(sse(last))
        if self.include_usage:
            out.append(sse({"id": self.id, "object": "chat.completion.chunk", "created": self.created,
                            "model": self.model, "choices": [], "usage": usage}))
        return out + [DONE]

    def body(self, finish: str, usage: dict) -> dict:
        turn = parse_turn("".join(self.pieces), self.thinking, self.tools or [])
        message: dict[str, Any] = {"role": "assistant", "content": turn.content}
        if turn.reasoning is not None:
            message["reasoning_content"] = turn.reasoning
        if turn.tool_calls:
            message["tool_calls"] = turn.tool_calls
            finish = "tool_calls"
        choice = {"index": 0, "message": message, "finish_reason": finish}
        if self.return_tokens:
            choice["tokens"] = list(self.task.generated)
        return {"id": self.id, "object": "chat.completion", "created": self.created, "model": self.model,
                "choices": [choice], "usage": usage}

    def error_event(self, body: dict) -> bytes:
        return sse(body)
