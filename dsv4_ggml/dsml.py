"""DeepSeek-V4 DSML tool calls: parsing a generated assistant turn, in one go or streamed.

The format (written by `templates/deepseek_v4.jinja`; `｜` is U+FF5C FULLWIDTH VERTICAL LINE)::

    [reasoning</think>]content\\n\\n<｜DSML｜tool_calls>
    <｜DSML｜invoke name="get_weather">
    <｜DSML｜parameter name="city" string="true">Paris</｜DSML｜parameter>
    <｜DSML｜parameter name="days" string="false">3</｜DSML｜parameter>
    </｜DSML｜invoke>
    </｜DSML｜tool_calls>

In thinking mode the prompt ends with `<think>`, so the generated text starts inside the reasoning,
which runs to `</think>`; otherwise all of it is content. `string="true"` values are kept as text,
`string="false"` values are JSON (text that is not JSON is kept as text). An invoke without
parameters has arguments `{}`. The `\\n\\n` before `<｜DSML｜tool_calls>` belongs to the block, so the
parsed message rendered back with the template reproduces the generated text byte for byte.

Robustness rules (model output is never trusted, and nothing here raises on any text):

* a `<｜DSML｜tool_calls>` in the reasoning ends it, as a `</think>` would (the model forgot to close
  its thinking), and the block is parsed;
* a block that is unterminated (the text ends inside it), malformed (no `name=`, text between the
  elements, a value holding DSML markup, bad nesting, no invoke at all), interrupted by another
  `<｜DSML｜tool_calls>`, or that calls a tool not among `tools` (when `tools` is not None) is plain
  text of the part it appeared in (content, or reasoning when it opened there), as if its opening
  marker were ordinary text; the text after it is scanned again, so a later block may still parse;
* text after a parsed block is content (and may hold further blocks);
* in non-thinking mode a stray `</think>` at the very start is dropped.

So no DSML markup reaches content or arguments unless it was part of a block that failed to parse.

`StreamParser` gives the same result for every split of the text into pieces: it holds back any
tail that may begin a marker (`</think>`, `\\n\\n<｜DSML｜tool_calls>`), and a whole block until it
closes and validates. `prefix` is text forced before the generated text (`tool_call_prefix`): it is
parsed with it as one turn, but only the generated part is reported as reasoning or content.
"""
from __future__ import annotations

import json
import re
import secrets
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, NamedTuple, Sequence

DSML = "｜DSML｜"
THINK_END = "</think>"
SEPARATOR = "\n\n"                      # what the template writes between content and the block
TOOL_CALLS_OPEN = f"<{DSML}tool_calls>"
TOOL_CALLS_START = SEPARATOR + TOOL_CALLS_OPEN
TOOL_CALLS_END = f"</{DSML}tool_calls>"
INVOKE_END = f"</{DSML}invoke>"
PARAMETER_END = f"</{DSML}parameter>"

_INVOKE_OPEN = re.compile(f'<{DSML}invoke name="([^"<>｜\\s]+)">')
_PARAMETER_OPEN = re.compile(f'<{DSML}parameter name="([^"<>｜\\n]+)"(?: string="(true|false)")?>')
_SPACE = re.compile(r"\s*")

_START, _REASONING, _CONTENT, _BLOCK = "start", "reasoning", "content", "block"


def tool_call_prefix(name: str) -> str:
    """The text that starts a call to `name`: appended to the prompt it forces that call."""
    return f'{TOOL_CALLS_START}\n<{DSML}invoke name="{name}">\n'


def new_call_id() -> str:
    return "call_" + secrets.token_hex(12)


class Event(NamedTuple):
    """("reasoning", text), ("content", text) or ("tool_call", {"index", "id", "name", "arguments"})."""
    kind: str
    data: Any


@dataclass
class Turn:
    reasoning: str | None
    content: str
    tool_calls: list[dict] = field(default_factory=list)

    @classmethod
    def from_events(cls, events: Iterable[Event], thinking: bool) -> "Turn":
        reasoning, content, calls = [], [], []
        for kind, data in events:
            if kind == "reasoning":
                reasoning.append(data)
            elif kind == "content":
                content.append(data)
            else:
                calls.append({"id": data["id"], "type": "function",
                              "function": {"name": data["name"], "arguments": data["arguments"]}})
        return cls("".join(reasoning) if thinking else None, "".join(content), calls)


def parse_turn(text: str, thinking: bool, tools: Sequence[dict] | None = None, *,
               id_factory: Callable[[], str] | None = None, prefix: str = "") -> Turn:
    """Reasoning, content and tool calls (OpenAI shape) of a whole generated assistant turn."""
    parser = StreamParser(thinking, tools, id_factory, prefix=prefix)
    return Turn.from_events(parser.push(text) + parser.finish(), thinking)


# --- the block ---------------------------------------------------------------------------------

def _json_value(text: str) -> Any:
    """`text` as JSON, or `text` itself when it is not (NaN and Infinity are not JSON)."""
    def reject(constant: str) -> Any:
        raise ValueError(constant)
    try:
        return json.loads(text, parse_constant=reject)
    except (ValueError, RecursionError):
        return text


def _parse_invoke(body: str, pos: int) -> tuple[str, dict, int] | None:
    """(name, arguments, end) of the invoke at `pos`, or None when it is malformed."""
    opening = _INVOKE_OPEN.match(body, pos)
    if not opening:
        return None
    args: dict[str, Any] = {}
    pos = opening.end()
    while True:
        pos = _SPACE.match(body, pos).end()
        if body.startswith(INVOKE_END, pos):
            return opening.group(1), args, pos + len(INVOKE_END)
        param = _PARAMETER_OPEN.match(body, pos)
        if not param:
            return None
        end = body.find(PARAMETER_END, param.end())
        value = body[param.end():end]
        if end < 0 or DSML in value:
            return None
        args[param.group(1)] = value if param.group(2) == "true" else _json_value(value)
        pos = end + len(PARAMETER_END)


def _parse_block(block: str, known: frozenset[str] | None) -> list[tuple[str, str]] | None:
    """[(name, arguments JSON)] of a whole `<｜DSML｜tool_calls>...</｜DSML｜tool_calls>` block,
    or None when it is malformed, empty or names an unknown tool."""
    body = block[len(TOOL_CALLS_OPEN):len(block) - len(TOOL_CALLS_END)]
    calls = []
    pos = _SPACE.match(body).end()
    while pos < len(body):
        invoke = _parse_invoke(body, pos)
        if invoke is None:
            return None
        name, args, pos = invoke
        if known is not None and name not in known:
            return None
        try:
            arguments = json.dumps(args, ensure_ascii=False)
        except (ValueError, RecursionError):
            return None
        if DSML in arguments:       # a JSON value spelling markup with escapes
            return None
        calls.append((name, arguments))
        pos = _SPACE.match(body, pos).end()
    return calls or None


def _tool_names(tools: Sequence[dict] | None) -> frozenset[str] | None:
    if tools is None:
        return None
    names = set()
    for tool in tools:
        function = tool.get("function") if isinstance(tool, dict) else None
        if isinstance(function, dict) and isinstance(function.get("name"), str):
            names.add(function["name"])
    return frozenset(names)


# --- the stream --------------------------------------------------------------------------------

def _find_first(text: str, markers: Sequence[str]) -> tuple[int, str | None]:
    found = [(i, m) for m in markers if (i := text.find(m)) >= 0]
    return min(found) if found else (-1, None)


def _held_back(text: str, markers: Sequence[str]) -> int:
    """Length of the longest tail of `text` that could begin one of `markers`."""
    for k in range(min(len(text), max(map(len, markers)) - 1), 0, -1):
        if any(m.startswith(text[-k:]) for m in markers):
            return k
    return 0


class StreamParser:
    """Parses a generated turn piece by piece: `push` each piece, then `finish`; both return the
    events now certain. Their concatenation equals `parse_turn` of the whole text."""

    def __init__(self, thinking: bool, tools: Sequence[dict] | None = None,
                 id_factory: Callable[[], str] | None = None, *, prefix: str = ""):
        self._known = _tool_names(tools)
        self._new_id = id_factory or new_call_id
        self._phase = _REASONING if thinking else _START
        self._origin = self._phase      # the phase a block opened in
        self._pos = 0                   # offset of _buf in prefix + generated text
        self._sep = ""                  # the separator before the open block
        self._scan = 0                  # where to look on for the block's end
        self._hidden = len(prefix)      # text before this offset was emitted already (forced)
        self._calls = 0
        self._events: list[Event] = []
        self._buf = prefix              # text not yet decided; tool calls the prefix completes
                                        # wait for the first push
        self._run(final=False)

    def push(self, text: str) -> list[Event]:
        self._buf += text
        self._run(final=False)
        return self._drain()

    def finish(self) -> list[Event]:
        """The rest: held-back text, and an unterminated block as plain text."""
        self._run(final=True)
        return self._drain()

    def _drain(self) -> list[Event]:
        events, self._events = self._events, []
        return events

    def _run(self, final: bool) -> None:
        steps = {_START: self._step_start, _REASONING: self._step_text,
                 _CONTENT: self._step_text, _BLOCK: self._step_block}
        while steps[self._phase](final):
            pass

    def _take(self, n: int) -> str:
        text, self._buf = self._buf[:n], self._buf[n:]
        self._pos += n
        return text

    def _emit(self, kind: str, start: int, text: str) -> None:
        """Text found at `start` of prefix + generated text; only its generated part is emitted."""
        text = text[max(0, self._hidden - start):]
        if not text:
            return
        if self._events and self._events[-1].kind == kind:
            text = self._events.pop().data + text
        self._events.append(Event(kind, text))

    def _emit_taken(self, kind: str, n: int) -> None:
        start = self._pos
        self._emit(kind, start, self._take(n))

    def _step_start(self, final: bool) -> bool:
        """Non-thinking mode, at the very start: drop a stray `</think>`."""
        if self._buf.startswith(THINK_END):
            self._take(len(THINK_END))
        elif THINK_END.startswith(self._buf) and not final:
            return False
        self._phase = _CONTENT
        return True

    def _step_text(self, final: bool) -> bool:
        """Reasoning or content up to the next marker; a tail that may begin one is held back."""
        kind = self._phase
        markers = (THINK_END, TOOL_CALLS_OPEN) if kind == _REASONING else (TOOL_CALLS_OPEN,)
        i, marker = _find_first(self._buf, markers)
        if marker is None:
            held = 0 if final else _held_back(self._buf, markers + (TOOL_CALLS_START,))
            self._emit_taken(kind, len(self._buf) - held)
            return False
        if marker == THINK_END:
            self._emit_taken(kind, i)
            self._take(len(THINK_END))
            self._phase = _CONTENT
            return True
        sep = len(SEPARATOR) if self._buf.endswith(SEPARATOR, 0, i) else 0
        self._emit_taken(kind, i - sep)
        self._sep = self._take(sep)
        self._origin, self._phase = kind, _BLOCK
        self._scan = len(TOOL_CALLS_OPEN)
        return True

    def _step_block(self, final: bool) -> bool:
        """Waits for the block's end, then emits its calls, or its text when it does not parse."""
        end = self._buf.find(TOOL_CALLS_END, self._scan)
        reopened = self._buf.find(TOOL_CALLS_OPEN, self._scan, end if end >= 0 else len(self._buf))
        if reopened >= 0 or (end < 0 and final):
            return self._reject_block()
        if end < 0:
            self._scan = max(self._scan, len(self._buf) - len(TOOL_CALLS_END) + 1)
            return False
        calls = _parse_block(self._buf[:end + len(TOOL_CALLS_END)], self._known)
        if calls is None:
            return self._reject_block()
        self._take(end + len(TOOL_CALLS_END))
        for name, arguments in calls:
            data = {"index": self._calls, "id": self._new_id(), "name": name, "arguments": arguments}
            self._events.append(Event("tool_call", data))
            self._calls += 1
        self._phase = _CONTENT
        return True

    def _reject_block(self) -> bool:
        """The block is plain text of the phase it opened in: its opening marker (and separator)
        is emitted as such and the text after it is scanned again."""
        start = self._pos - len(self._sep)
        self._emit(self._origin, start, self._sep + self._take(len(TOOL_CALLS_OPEN)))
        self._sep = ""
        self._phase = self._origin
        return True
