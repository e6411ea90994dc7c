"""Chat templates: the GGUF's own `tokenizer.chat_template` when present, else the built-in
DeepSeek-V4 template (`templates/deepseek_v4.jinja`), rendered with a sandboxed jinja2."""
from __future__ import annotations

import copy
import json
from datetime import datetime
from importlib import resources
from typing import Any, Mapping, Sequence

from jinja2 import StrictUndefined, TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from .errors import InvalidArgumentError

BOS_TEXT = "<｜begin▁of▁sentence｜>"
EOS_TEXT = "<｜end▁of▁sentence｜>"
ROLES = ("system", "user", "developer", "assistant", "tool")


def builtin_template() -> str:
    return resources.files("dsv4_ggml").joinpath("templates/deepseek_v4.jinja").read_text(encoding="utf-8")


def _tojson(value: Any, indent: int | None = None) -> str:
    # like HF/minja: plain JSON, no HTML escaping
    return json.dumps(value, ensure_ascii=False, indent=indent)


def _raise(message: str) -> None:
    raise TemplateError(message)


def _environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=True)
    env.filters["tojson"] = _tojson
    env.filters["from_json"] = json.loads
    env.globals["raise_exception"] = _raise
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env


def normalize_messages(messages: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Checks roles and contents; tool-call arguments given as JSON text become mappings."""
    if not isinstance(messages, (list, tuple)) or not messages:
        raise InvalidArgumentError("messages must be a non-empty list of {'role': ..., 'content': ...}")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping) or "role" not in m:
            raise InvalidArgumentError(f"message {i} must be a mapping with a 'role'")
        if m["role"] not in ROLES:
            raise InvalidArgumentError(f"message {i} has unknown role {m['role']!r} (one of {', '.join(ROLES)})")
        content = m.get("content")
        if isinstance(content, list):   # OpenAI content parts: keep the text parts
            content = "".join(p.get("text", "") for p in content if isinstance(p, Mapping) and p.get("type") == "text")
        if content is not None and not isinstance(content, str):
            raise InvalidArgumentError(f"message {i}: content must be a string")
        msg = dict(copy.deepcopy(dict(m)), content=content)
        for call in msg.get("tool_calls") or []:
            fn = call.get("function", {})
            if isinstance(fn.get("arguments"), str):
                try:
                    fn["arguments"] = json.loads(fn["arguments"]) if fn["arguments"].strip() else {}
                except json.JSONDecodeError as e:
                    raise InvalidArgumentError(f"message {i}: tool call arguments are not JSON: {e}") from None
        out.append(msg)
    return out


class ChatTemplate:
    """A compiled chat template."""

    def __init__(self, source: str | None = None):
        self.source = source if source is not None else builtin_template()
        self.builtin = source is None
        try:
            self._template = _environment().from_string(self.source)
        except TemplateError as e:
            raise InvalidArgumentError(f"the chat template does not compile: {e}") from None

    def render(self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True,
               thinking: bool = False, tools: Sequence[Mapping[str, Any]] | None = None,
               **extra: Any) -> str:
        try:
            return self._template.render(
                messages=normalize_messages(messages), add_generation_prompt=add_generation_prompt,
                thinking=thinking, enable_thinking=thinking, tools=list(tools) if tools else None,
                bos_token=BOS_TEXT, eos_token=EOS_TEXT, **extra)
        except TemplateError as e:
            raise InvalidArgumentError(f"the chat template failed: {e}") from None


def split_reasoning(text: str, thinking: bool) -> tuple[str | None, str]:
    """(reasoning, content) of a generated assistant turn: in thinking mode the text up to
    `</think>` is the reasoning."""
    if not thinking:
        return None, text
    head, sep, tail = text.partition("</think>")
    if not sep:
        return head, ""
    return head, tail
