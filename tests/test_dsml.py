"""DSML tool calls (dsv4_ggml/dsml.py): parse_turn on recorded assistant turns, the chat template
round trip, the robustness rules, and StreamParser against parse_turn for every split."""
from __future__ import annotations

import itertools
import json
import re
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dsv4_ggml.chat import EOS_TEXT, ChatTemplate
from dsv4_ggml.dsml import (DSML, THINK_END, TOOL_CALLS_END, TOOL_CALLS_OPEN, TOOL_CALLS_START, Event,
                            StreamParser, Turn, parse_turn, tool_call_prefix)

ASSISTANT = "<｜Assistant｜>"
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}}}}},
    {"type": "function", "function": {"name": "search", "parameters": {
        "type": "object", "properties": {"query": {"type": "string"}, "filters": {"type": "object"}}}}},
    {"type": "function", "function": {"name": "list_files", "parameters": {"type": "object", "properties": {}}}},
]


def _param(name: str, value: str, string: bool = True) -> str:
    return f'<｜DSML｜parameter name="{name}" string="{"true" if string else "false"}">{value}</｜DSML｜parameter>\n'


def _invoke(name: str, *params: str) -> str:
    return f'<｜DSML｜invoke name="{name}">\n' + ("".join(params) or "\n") + "</｜DSML｜invoke>\n"


def _block(*invokes: str) -> str:
    return "\n\n<｜DSML｜tool_calls>\n" + "".join(invokes) + "</｜DSML｜tool_calls>"


# --- recorded turns (the text generated after the prompt's <think> or </think>) ------------------

WEATHER = _invoke("get_weather", _param("city", "Paris"), _param("days", "3", string=False))
SINGLE_CALL = "I'll look up the forecast for Paris." + _block(WEATHER)
TWO_CALLS = ("The user wants two cities, so I call the tool twice.</think>"
             + _block(WEATHER, _invoke("get_weather", _param("city", "Lyon"), _param("days", "1", string=False))))
NO_THINK_END = "I need the weather, let me call the tool." + _block(WEATHER)
NESTED_JSON = ("Searching." + _block(_invoke(
    "search",
    _param("query", "a <b>bold</b> > 3 && x < 4\nsecond line\n"),
    _param("filters", '{"a": "b", "n": [1, 2, {"c": null, "d": 2.5}], "ok": true}', string=False),
    _param("flag", "true", string=False),
    _param("ids", "[1, 2]", string=False))))
UNICODE = "天气怎么样？我来查一下 🌤️" + _block(_invoke("get_weather", _param("city", "東京 🗼"),
                                                      _param("days", "2", string=False)))
NO_PARAMS = "Listing." + _block(_invoke("list_files"))
CONTENT_BEFORE = ("Sure! First some context:\n\n- item one\n- item two\n\nNow the call:"
                  + _block(_invoke("search", _param("query", "dsml")), _invoke("list_files")))
NO_CALL = "No tool needed: 1 < 2 and 3 > 2, see </b> and <｜ and \n\n< text.\n\n"
THINKING_PLAIN = "The user asks 2+2. That is 4.\n\n</think>The answer is **4**."
UNKNOWN_NAME = "Deleting." + _block(_invoke("delete_everything", _param("path", "/")))
GARBAGE = ("Trying." + "\n\n<｜DSML｜tool_calls>\nlet me think about it\n" + WEATHER + "</｜DSML｜tool_calls>")
MISSING_NAME = "Calling." + "\n\n<｜DSML｜tool_calls>\n<｜DSML｜invoke>\n" + _param("city", "Paris") + \
    "</｜DSML｜invoke>\n</｜DSML｜tool_calls>"
BAD_NESTING = ("Calling." + "\n\n<｜DSML｜tool_calls>\n<｜DSML｜invoke name=\"get_weather\">\n"
               '<｜DSML｜parameter name="city" string="true">Paris\n</｜DSML｜invoke>\n</｜DSML｜tool_calls>')
INVOKE_IN_INVOKE = ("Calling." + "\n\n<｜DSML｜tool_calls>\n<｜DSML｜invoke name=\"get_weather\">\n"
                    + WEATHER + "</｜DSML｜invoke>\n</｜DSML｜tool_calls>")
EMPTY_BLOCK = "Nothing." + "\n\n<｜DSML｜tool_calls>\n</｜DSML｜tool_calls>"
TEXT_AFTER = SINGLE_CALL + "\nDone, waiting for the result."
TWO_BLOCKS = SINGLE_CALL + "\nAnd also:" + _block(_invoke("list_files"))
REOPENED = "Oops." + _block(WEATHER)[:60] + _block(_invoke("list_files"))
STRAY_THINK_END = "</think>Hello there."
NOT_JSON = "x" + _block(_invoke("get_weather", _param("days", "three", string=False),
                                    _param("n", "NaN", string=False), _param("e", "", string=False)))
TRUNCATION_POINTS = [2, 9, 14, 40, 75, 130, -30, -20, -19, -1]
TRUNCATED = [SINGLE_CALL[:len("I'll look up the forecast for Paris.") + n] if n > 0 else SINGLE_CALL[:n]
             for n in TRUNCATION_POINTS]

# (name, text, thinking, tools) for the split and fuzz properties
RECORDED = [
    ("single", SINGLE_CALL, False, TOOLS), ("two_calls", TWO_CALLS, True, TOOLS),
    ("no_think_end", NO_THINK_END, True, TOOLS), ("nested", NESTED_JSON, False, None),
    ("unicode", UNICODE, False, TOOLS), ("no_params", NO_PARAMS, True, TOOLS),
    ("content_before", CONTENT_BEFORE, False, TOOLS), ("no_call", NO_CALL, False, TOOLS),
    ("no_call_thinking", NO_CALL, True, None), ("thinking_plain", THINKING_PLAIN, True, TOOLS),
    ("unknown", UNKNOWN_NAME, False, TOOLS), ("unknown_any", UNKNOWN_NAME, True, None),
    ("garbage", GARBAGE, False, TOOLS), ("missing_name", MISSING_NAME, True, TOOLS),
    ("bad_nesting", BAD_NESTING, False, TOOLS), ("invoke_in_invoke", INVOKE_IN_INVOKE, False, None),
    ("empty_block", EMPTY_BLOCK, False, None), ("text_after", TEXT_AFTER, False, TOOLS),
    ("two_blocks", TWO_BLOCKS, True, TOOLS), ("reopened", REOPENED, False, TOOLS),
    ("stray_think_end", STRAY_THINK_END, False, None), ("not_json", NOT_JSON, False, None),
] + [(f"truncated_{n}", text, False, TOOLS) for n, text in zip(TRUNCATION_POINTS, TRUNCATED)]
ALL_TEXT = "".join(text for _, text, _, _ in RECORDED)


def counter_ids():
    numbers = itertools.count()
    return lambda: f"call_{next(numbers):024x}"


def parse(text: str, thinking: bool, tools=None, prefix: str = "") -> Turn:
    return parse_turn(text, thinking, tools, id_factory=counter_ids(), prefix=prefix)


def stream(pieces, thinking: bool, tools=None, prefix: str = "") -> tuple[Turn, list[Event]]:
    parser = StreamParser(thinking, tools, counter_ids(), prefix=prefix)
    events = [e for piece in pieces for e in parser.push(piece)] + parser.finish()
    return Turn.from_events(events, thinking), events


def calls(turn: Turn) -> list[tuple[str, dict]]:
    return [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in turn.tool_calls]


# --- parse_turn --------------------------------------------------------------------------------

def test_single_call():
    turn = parse_turn(SINGLE_CALL, False, TOOLS)
    assert turn == Turn(None, "I'll look up the forecast for Paris.", turn.tool_calls)
    [call] = turn.tool_calls
    assert re.fullmatch(r"call_[0-9a-f]{24}", call["id"]) and call["type"] == "function"
    assert call["function"] == {"name": "get_weather", "arguments": '{"city": "Paris", "days": 3}'}
    assert parse_turn(SINGLE_CALL, False).tool_calls[0]["id"] != call["id"]


def test_two_calls_in_thinking_mode():
    turn = parse(TWO_CALLS, True, TOOLS)
    assert turn.reasoning == "The user wants two cities, so I call the tool twice." and turn.content == ""
    assert calls(turn) == [("get_weather", {"city": "Paris", "days": 3}), ("get_weather", {"city": "Lyon", "days": 1})]
    assert [c["id"] for c in turn.tool_calls] == [f"call_{0:024x}", f"call_{1:024x}"]


def test_missing_think_end_ends_reasoning_at_the_block():
    turn = parse(NO_THINK_END, True, TOOLS)
    assert turn.reasoning == "I need the weather, let me call the tool." and turn.content == ""
    assert calls(turn) == [("get_weather", {"city": "Paris", "days": 3})]


def test_nested_json_and_markup_in_values():
    turn = parse(NESTED_JSON, False)
    assert turn.content == "Searching."
    [(name, args)] = calls(turn)
    assert name == "search" and list(args) == ["query", "filters", "flag", "ids"]
    assert args["query"] == "a <b>bold</b> > 3 && x < 4\nsecond line\n"
    assert args["filters"] == {"a": "b", "n": [1, 2, {"c": None, "d": 2.5}], "ok": True}
    assert args["flag"] is True and args["ids"] == [1, 2]


def test_unicode():
    turn = parse(UNICODE, False, TOOLS)
    assert turn.content == "天气怎么样？我来查一下 🌤️"
    assert turn.tool_calls[0]["function"]["arguments"] == '{"city": "東京 🗼", "days": 2}'


def test_no_parameters_content_before_text_after_and_two_blocks():
    assert calls(parse(NO_PARAMS, True)) == [("list_files", {})]
    turn = parse(CONTENT_BEFORE, False, TOOLS)
    assert turn.content == "Sure! First some context:\n\n- item one\n- item two\n\nNow the call:"
    assert calls(turn) == [("search", {"query": "dsml"}), ("list_files", {})]
    turn = parse(TEXT_AFTER, False, TOOLS)
    assert turn.content == "I'll look up the forecast for Paris.\nDone, waiting for the result."
    assert len(turn.tool_calls) == 1
    turn = parse(TWO_BLOCKS, False, TOOLS)
    assert turn.content == "I'll look up the forecast for Paris.\nAnd also:"
    assert calls(turn) == [("get_weather", {"city": "Paris", "days": 3}), ("list_files", {})]


def test_no_call_and_plain_thinking():
    assert parse(NO_CALL, False) == Turn(None, NO_CALL, [])
    assert parse(NO_CALL, True) == Turn(NO_CALL, "", [])
    assert parse(THINKING_PLAIN, True) == Turn("The user asks 2+2. That is 4.\n\n", "The answer is **4**.", [])
    assert parse(STRAY_THINK_END, False) == Turn(None, "Hello there.", [])
    assert parse("", True) == Turn("", "", []) and parse("", False) == Turn(None, "", [])


@pytest.mark.parametrize("text", [UNKNOWN_NAME, GARBAGE, MISSING_NAME, BAD_NESTING, INVOKE_IN_INVOKE,
                                  EMPTY_BLOCK] + TRUNCATED)
def test_failed_blocks_are_plain_content(text):
    assert parse(text, False, TOOLS) == Turn(None, text, [])


def test_failed_block_in_reasoning_stays_reasoning():
    assert parse(UNKNOWN_NAME, True, TOOLS) == Turn(UNKNOWN_NAME, "", [])
    text = "hm" + _block(WEATHER)[:50] + "</think>answer"
    assert parse(text, True, TOOLS) == Turn(text[:-len("</think>answer")], "answer", [])


def test_unknown_names_accepted_without_tools():
    assert calls(parse(UNKNOWN_NAME, False)) == [("delete_everything", {"path": "/"})]
    assert parse(UNKNOWN_NAME, False, []).tool_calls == []


def test_a_reopened_block_drops_the_unterminated_one():
    turn = parse(REOPENED, False, TOOLS)
    assert turn.content == "Oops." + _block(WEATHER)[:60] and calls(turn) == [("list_files", {})]


def test_values_that_are_not_json_stay_text():
    assert calls(parse(NOT_JSON, False)) == [("get_weather", {"days": "three", "n": "NaN", "e": ""})]
    escaped = "x" + _block(_invoke("a", _param("v", '"\\uff5cDSML\\uff5c"', string=False)))
    assert parse(escaped, False) == Turn(None, escaped, [])
    deep = "x" + _block(_invoke("a", _param("v", "[" * 100000 + "]" * 100000, string=False)))
    assert json.loads(parse(deep, False).tool_calls[0]["function"]["arguments"])["v"].startswith("[[[")


def test_only_the_first_think_end_and_only_at_the_start_when_not_thinking():
    assert parse("a</think>b</think>c", True) == Turn("a", "b</think>c", [])
    assert parse("x</think>y", False) == Turn(None, "x</think>y", [])
    assert parse("</thi", False) == Turn(None, "</thi", [])


# --- the chat template round trip -----------------------------------------------------------------

@pytest.mark.parametrize("text, thinking", [
    (SINGLE_CALL, False), (TWO_CALLS, True), (NESTED_JSON, False), (UNICODE, False), ("想一想。</think>" + UNICODE, True),
    (NO_PARAMS, False), ("Files?\n</think>" + NO_PARAMS, True), (CONTENT_BEFORE, False), (NO_CALL, False), (THINKING_PLAIN, True), (TWO_CALLS, False)])
def test_rendering_the_parsed_turn_gives_back_the_generated_text(text, thinking):
    turn = parse(text, thinking, TOOLS)
    assert bool(turn.tool_calls) != (text in (NO_CALL, THINKING_PLAIN))
    message = {"role": "assistant", "content": turn.content, "reasoning_content": turn.reasoning,
               "tool_calls": turn.tool_calls}
    rendered = ChatTemplate().render([{"role": "user", "content": "hi"}, message], add_generation_prompt=False,
                                     thinking=thinking, tools=TOOLS, drop_thinking=False)
    assert rendered.endswith(ASSISTANT + ("<think>" if thinking else "</think>") + text + EOS_TEXT)


# --- StreamParser --------------------------------------------------------------------------------

def test_stream_holds_back_split_markers():
    parser = StreamParser(True, TOOLS, counter_ids())
    assert parser.push("Thinking <") == [("reasoning", "Thinking ")]
    assert parser.push("/thi") == []
    assert parser.push("nk>Hello\n") == [("content", "Hello")]
    assert parser.push("\n<｜DS") == []
    assert parser.push("ML｜tool_calls>\n" + WEATHER) == []
    assert parser.push("</｜DSML｜tool_calls>") == [Event("tool_call", {
        "index": 0, "id": f"call_{0:024x}", "name": "get_weather", "arguments": '{"city": "Paris", "days": 3}'})]
    assert parser.push(" after") == [("content", " after")] and parser.finish() == []


def test_stream_releases_what_is_not_a_marker():
    parser = StreamParser(False)
    assert parser.push("a\n") == [("content", "a")]
    assert parser.push("\nb <x") == [("content", "\n\nb <x")]
    assert parser.push("\n\n<｜DSML｜tool") == []
    assert parser.finish() == [("content", "\n\n<｜DSML｜tool")]
    parser = StreamParser(False)
    assert parser.push("</thi") == [] and parser.push("nking") == [("content", "</thinking")]


def test_stream_unterminated_block_becomes_content_at_finish():
    parser = StreamParser(False, TOOLS)
    assert parser.push(TRUNCATED[-1]) == [("content", "I'll look up the forecast for Paris.")]
    assert parser.finish() == [("content", TRUNCATED[-1][len("I'll look up the forecast for Paris."):])]


def _assert_stream_matches(text, thinking, tools, cuts, prefix=""):
    cuts = sorted(set(cuts))
    pieces = [text[a:b] for a, b in zip([0] + cuts, cuts + [len(text)])]
    turn, events = stream(pieces, thinking, tools, prefix)
    assert turn == parse(text, thinking, tools, prefix)
    assert all(e.data for e in events if e.kind != "tool_call")
    assert [e.data["index"] for e in events if e.kind == "tool_call"] == list(range(len(turn.tool_calls)))


@pytest.mark.parametrize("name, text, thinking, tools", RECORDED, ids=[r[0] for r in RECORDED])
def test_stream_one_character_pieces(name, text, thinking, tools):
    _assert_stream_matches(text, thinking, tools, range(1, len(text)))


@pytest.mark.parametrize("name, text, thinking, tools", RECORDED, ids=[r[0] for r in RECORDED])
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_stream_any_split(name, text, thinking, tools, data):
    cuts = data.draw(st.lists(st.integers(0, len(text)), max_size=12))
    _assert_stream_matches(text, thinking, tools, cuts)


def test_stream_is_linear_enough():
    text = "r" * 50000 + "</think>" + "c\n" * 20000 + _block(_invoke("a", _param("v", "<x>\n" * 5000)))
    start = time.perf_counter()
    turn, _ = stream(text, True)
    assert time.perf_counter() - start < 10 and calls(turn) == [("a", {"v": "<x>\n" * 5000})]


# --- fuzz: never raises, plain text stays intact, streaming agrees ----------------------------------

FRAGMENTS = [TOOL_CALLS_START, TOOL_CALLS_OPEN, TOOL_CALLS_END, THINK_END, "</think", "<｜DSML｜", DSML,
             '<｜DSML｜invoke name="get_weather">', '<｜DSML｜invoke name="nope">', "</｜DSML｜invoke>",
             '<｜DSML｜parameter name="city" string="true">', '<｜DSML｜parameter name="n" string="false">',
             "</｜DSML｜parameter>", "\n", "\n\n", "<", ">", "/", '"', "｜", "Paris", "3", "{", "}", " ", "é", "🙂",
             WEATHER, _invoke("list_files"), _block(WEATHER), _block(_invoke("nope"))]


def _check_invariants(text, thinking, tools, prefix=""):
    turn = parse(text, thinking, tools, prefix)
    for call in turn.tool_calls:
        assert DSML not in call["function"]["arguments"] and isinstance(json.loads(call["function"]["arguments"]), dict)
        assert tools is None or call["function"]["name"] in {t["function"]["name"] for t in tools}
    if not turn.tool_calls and not prefix:       # nothing was taken out: the text comes back whole
        if thinking:
            rebuilt = turn.reasoning + (THINK_END + turn.content if THINK_END in text else "")
        else:
            rebuilt = (THINK_END if text.startswith(THINK_END) else "") + turn.content
        assert rebuilt == text
    return turn


@settings(max_examples=400, deadline=None)
@given(parts=st.lists(st.sampled_from(FRAGMENTS) | st.text(max_size=3), max_size=30), thinking=st.booleans(),
       with_tools=st.booleans(), cuts=st.lists(st.integers(0, 400), max_size=8))
def test_fuzz_fragments(parts, thinking, with_tools, cuts):
    text = "".join(parts)
    tools = TOOLS if with_tools else None
    _check_invariants(text, thinking, tools)
    _assert_stream_matches(text, thinking, tools, [c for c in cuts if c <= len(text)])


@settings(max_examples=300, deadline=None)
@given(start=st.integers(0, len(ALL_TEXT)), length=st.integers(0, 600), thinking=st.booleans(),
       cuts=st.lists(st.integers(0, 600), max_size=8))
def test_fuzz_slices_of_recorded_text(start, length, thinking, cuts):
    text = ALL_TEXT[start:start + length]
    _check_invariants(text, thinking, TOOLS)
    _assert_stream_matches(text, thinking, None, [c for c in cuts if c <= len(text)])


def test_odd_tools_argument():
    assert parse(SINGLE_CALL, False, [{"type": "function"}, "x", {"function": None}]).tool_calls == []


# --- forced calls: prefix -----------------------------------------------------------------------

FORCED = tool_call_prefix("get_weather")
FORCED_REST = _param("city", "Paris") + "</｜DSML｜invoke>\n</｜DSML｜tool_calls>"


def test_tool_call_prefix():
    assert FORCED == '\n\n<｜DSML｜tool_calls>\n<｜DSML｜invoke name="get_weather">\n'
    assert FORCED.startswith(TOOL_CALLS_START) and TOOL_CALLS_START == "\n\n" + TOOL_CALLS_OPEN


@pytest.mark.parametrize("thinking", [False, True])
def test_forced_call_parses_as_one_turn(thinking):
    turn = parse(FORCED_REST, thinking, TOOLS, prefix=FORCED)
    assert turn == Turn("" if thinking else None, "", turn.tool_calls)
    assert calls(turn) == [("get_weather", {"city": "Paris"})]
    assert parse(FORCED_REST + "\nok", thinking, TOOLS, prefix=FORCED).content == "\nok"
    forced = "</think>" + FORCED if thinking else FORCED
    assert calls(parse(FORCED_REST, thinking, TOOLS, prefix=forced)) == calls(turn)
    _assert_stream_matches(FORCED_REST, thinking, TOOLS, range(1, len(FORCED_REST)), prefix=FORCED)


def test_forced_call_that_fails_reports_only_the_generated_text():
    assert parse(FORCED_REST[:30], False, TOOLS, prefix=FORCED) == Turn(None, FORCED_REST[:30], [])
    assert parse("", False, TOOLS, prefix=FORCED) == Turn(None, "", [])
    bad = "garbage</｜DSML｜invoke>\n</｜DSML｜tool_calls>then text"
    assert parse(bad, False, TOOLS, prefix=FORCED) == Turn(None, bad, [])
    assert parse(FORCED_REST, False, TOOLS[1:], prefix=FORCED) == Turn(None, FORCED_REST, [])


def test_prefix_with_a_whole_block_queues_its_calls_for_the_first_push():
    parser = StreamParser(False, prefix="pre" + _block(_invoke("list_files")))
    assert [e.kind for e in parser.push("x")] == ["tool_call", "content"]


@settings(max_examples=200, deadline=None)
@given(cut=st.integers(0, len(SINGLE_CALL)), cuts=st.lists(st.integers(0, len(SINGLE_CALL)), max_size=6),
       thinking=st.booleans())
def test_prefix_splits_anywhere(cut, cuts, thinking):
    prefix, rest = SINGLE_CALL[:cut], SINGLE_CALL[cut:]
    whole = parse(SINGLE_CALL, thinking, TOOLS)
    turn = parse(rest, thinking, TOOLS, prefix=prefix)
    assert turn.tool_calls == whole.tool_calls
    if thinking:    # the text before the block is reasoning, at offset 0 of the turn
        assert (turn.reasoning, turn.content) == (whole.reasoning[cut:], "")
    else:
        assert (turn.reasoning, turn.content) == (None, whole.content[cut:])
    _assert_stream_matches(rest, thinking, TOOLS, [c for c in cuts if c <= len(rest)], prefix=prefix)
