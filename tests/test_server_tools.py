"""Tool calls, reasoning and the Anthropic API end to end: a real server on 127.0.0.1 driven by the
`openai` and `anthropic` clients, over a scripted model whose greedy answers are recorded DSML
strings (random tiny weights never write DSML on their own). The script replaces only the
network's logits: tokenizer, chat template, scheduler, slots, prompt cache, parsing and the
HTTP layer are the real ones."""
from __future__ import annotations

import socket
import threading
import time

import numpy as np
import pytest

from dsv4_ggml.dsml import tool_call_prefix

pytest.importorskip("starlette")
uvicorn = pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")
anthropic = pytest.importorskip("anthropic")
httpx = pytest.importorskip("httpx")

D = "｜DSML｜"
WEATHER_CALL = (f'\n\n<{D}tool_calls>\n<{D}invoke name="get_weather">\n'
                f'<{D}parameter name="city" string="true">Paris</{D}parameter>\n'
                f'<{D}parameter name="days" string="false">3</{D}parameter>\n'
                f'</{D}invoke>\n</{D}tool_calls>')
TWO_CALLS = (f'\n\n<{D}tool_calls>\n<{D}invoke name="get_weather">\n'
             f'<{D}parameter name="city" string="true">東京 ☀</{D}parameter>\n</{D}invoke>\n'
             f'<{D}invoke name="get_time">\n<{D}parameter name="zone" string="false">{{"tz": ["UTC", 1]}}'
             f'</{D}parameter>\n</{D}invoke>\n</{D}tool_calls>')
TRUNCATED = f'\n\n<{D}tool_calls>\n<{D}invoke name="get_weather">\n<{D}parameter name="city" str'
# trigger (in the prompt) -> the answer the scripted model writes
SCRIPT = {
    "weather please": "Let me check." + WEATHER_CALL,
    "think then call": "The user wants weather.</think>Checking." + WEATHER_CALL,
    "forgot to close": "I need the tool." + WEATHER_CALL,                   # thinking mode, no </think>
    "two calls": TWO_CALLS,
    "truncated": "Hmm." + TRUNCATED,
    "unknown tool": f'\n\n<{D}tool_calls>\n<{D}invoke name="rm_rf">\n</{D}invoke>\n</{D}tool_calls>',
    "sunny": "It is sunny in Paris.",
    # the server writes the forced opening (tool_choice names get_time); the model goes on after it
    "forced": [tool_call_prefix("get_time"), f"</{D}invoke>\n</{D}tool_calls>"],
    "thinking forced": ["Let me see.</think>", tool_call_prefix("get_time"), f"</{D}invoke>\n</{D}tool_calls>"],
}
TOOLS = [{"type": "function", "function": {"name": n, "description": n, "parameters": {"type": "object"}}}
         for n in ("get_weather", "get_time")]
ANTHROPIC_TOOLS = [{"name": n, "description": n, "input_schema": {"type": "object"}} for n in ("get_weather", "get_time")]


class ScriptedModel:
    """The interface the server uses (tokenizer, template, sequences, eval_batch) of a real tiny
    model, with logits that make greedy decoding write SCRIPT's answer for the prompt."""

    def __init__(self, real, n_seq: int = 2):
        self.real = real
        self.tokenizer, self.chat_template = real.tokenizer, real.chat_template
        self.n_ctx, self.n_ubatch, self.n_vocab, self.n_seq = real.n_ctx, 64, real.n_vocab, n_seq
        self.name, self.hparams, self.backend = "scripted", real.hparams, "cpu"
        self._seqs: list[list[int]] = [[] for _ in range(n_seq)]
        self.assistant = real.tokenize("<｜Assistant｜>", add_bos=False)[0]
        self.evaluated = 0

    def tokenize(self, text, add_bos=None):
        return self.real.tokenize(text, add_bos)

    def detokenize(self, ids):
        return self.real.detokenize(ids)

    def _next(self, held: list[int]) -> int:
        """The answer's next token id: the answer is tokenized by segments, as the server
        tokenizes a forced opening apart from the model's own text."""
        if self.assistant not in held:          # a prompt chunk before the generation prompt
            return 0
        start = len(held) - 1 - held[::-1].index(self.assistant) + 2    # after <｜Assistant｜> and (</)think>
        prompt, written = self.detokenize(held[:start]).rpartition("<｜User｜>")[2], held[start:]   # the last turn
        answer = next((a for trigger, a in sorted(SCRIPT.items(), key=lambda kv: -len(kv[0])) if trigger in prompt), "")
        ids = [t for seg in ([answer] if isinstance(answer, str) else answer) for t in self.tokenize(seg, add_bos=False)]
        if ids[:len(written)] != written or len(written) >= len(ids):
            return self.tokenizer.eos_id
        return ids[len(written)]

    def eval_batch(self, batch, logits="last"):
        out = {}
        for seq, tokens in batch.items():
            self._seqs[seq].extend(int(t) for t in tokens)
            self.evaluated += len(tokens)
            row = np.zeros((1, self.n_vocab), dtype=np.float32)
            row[0, self._next(self._seqs[seq])] = 50.0
            out[seq] = row
        return out

    def truncate(self, n, seq=0):
        del self._seqs[seq][n:]

    def reset(self, seq=None):
        for s in range(self.n_seq) if seq is None else [seq]:
            self._seqs[s] = []

    def stats(self):
        return {"n_reevaluated": 0}


@pytest.fixture(scope="module")
def server(tiny_model):
    from dsv4_ggml import Model
    from dsv4_ggml.server import build_app

    real = Model(str(tiny_model), n_ctx=4096, n_threads=1)
    model = ScriptedModel(real)
    app = build_app(model, model_id="scripted", api_key="k")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not srv.started:
        assert time.monotonic() < deadline and thread.is_alive(), "the server did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}", model
    srv.should_exit = True
    thread.join(10)
    real.close()


@pytest.fixture(scope="module")
def oai(server):
    return openai.OpenAI(base_url=f"{server[0]}/v1", api_key="k", max_retries=0, timeout=30)


@pytest.fixture(scope="module")
def claude(server):
    return anthropic.Anthropic(base_url=server[0], api_key="k", max_retries=0, timeout=30)


def _ask(oai, text, stream=False, thinking=False, **kw):
    extra = {"chat_template_kwargs": {"thinking": True}} if thinking else {}
    return oai.chat.completions.create(model="scripted", messages=[{"role": "user", "content": text}],
                                       temperature=0, max_tokens=600, stream=stream, extra_body=extra,
                                       **{"tools": TOOLS, **kw})


def _collect(stream) -> tuple[str, str, dict, str]:
    """(content, reasoning, {index: call}, finish_reason) of an OpenAI chat stream."""
    content, reasoning, calls, finish = [], [], {}, None
    for ch in stream:
        if not ch.choices:
            continue
        c = ch.choices[0]
        d = c.delta
        content.append(d.content or "")
        reasoning.append((d.model_extra or {}).get("reasoning_content") or "")
        for tc in d.tool_calls or []:
            calls[tc.index] = {"id": tc.id, "name": tc.function.name, "arguments": tc.function.arguments}
        finish = c.finish_reason or finish
    return "".join(content), "".join(reasoning), calls, finish


CASES = [  # prompt, thinking, content, reasoning, [(name, arguments)]
    ("weather please", False, "Let me check.", None, [("get_weather", '{"city": "Paris", "days": 3}')]),
    ("think then call", True, "Checking.", "The user wants weather.",
     [("get_weather", '{"city": "Paris", "days": 3}')]),
    ("forgot to close", True, "", "I need the tool.", [("get_weather", '{"city": "Paris", "days": 3}')]),
    ("two calls", False, "", None, [("get_weather", '{"city": "東京 ☀"}'), ("get_time", '{"zone": {"tz": ["UTC", 1]}}')]),
    ("truncated", False, "Hmm." + TRUNCATED, None, []),
    ("unknown tool", False, SCRIPT["unknown tool"], None, []),
    ("sunny", False, "It is sunny in Paris.", None, []),
]


@pytest.mark.parametrize("prompt,thinking,content,reasoning,calls", CASES, ids=[c[0] for c in CASES])
def test_openai_tool_calls_stream_and_not(oai, prompt, thinking, content, reasoning, calls):
    out = _ask(oai, prompt, thinking=thinking)
    msg = out.choices[0].message
    assert msg.content == content
    assert (msg.model_extra or {}).get("reasoning_content") == reasoning
    got = [(c.function.name, c.function.arguments) for c in msg.tool_calls or []]
    assert got == calls
    assert out.choices[0].finish_reason == ("tool_calls" if calls else "stop")
    assert all(c.id.startswith("call_") and c.type == "function" for c in msg.tool_calls or [])
    s_content, s_reasoning, s_calls, s_finish = _collect(_ask(oai, prompt, stream=True, thinking=thinking))
    assert (s_content, s_reasoning or None if reasoning is None else s_reasoning) == (content, reasoning)
    assert [(c["name"], c["arguments"]) for _, c in sorted(s_calls.items())] == calls
    assert s_finish == out.choices[0].finish_reason
    assert D not in s_content + s_reasoning or not calls


def test_tool_call_turn_renders_back_exactly(server, oai):
    """The assistant's tool calls sent back with the tool's result: the new prompt extends the
    tokens the slot holds (prompt + the generated answer), so the whole first turn is cached."""
    first = _ask(oai, "weather please")
    msg = first.choices[0].message
    turn2 = [{"role": "user", "content": "weather please"},
             {"role": "assistant", "content": msg.content,
              "tool_calls": [c.model_dump() for c in msg.tool_calls]},
             {"role": "tool", "tool_call_id": msg.tool_calls[0].id, "content": "sunny, 21 C"}]
    second = oai.chat.completions.create(model="scripted", messages=turn2, tools=TOOLS, temperature=0, max_tokens=50)
    generated = first.usage.completion_tokens - 1            # the end-of-sentence token is never evaluated
    assert second.usage.prompt_tokens_details.cached_tokens == first.usage.prompt_tokens + generated
    assert second.choices[0].message.content == "It is sunny in Paris."


@pytest.mark.parametrize("thinking", [False, True])
def test_tool_choice_forces_a_call(oai, thinking):
    prompt = "thinking forced" if thinking else "forced"
    out = _ask(oai, prompt, thinking=thinking, tool_choice={"type": "function", "function": {"name": "get_time"}})
    msg = out.choices[0].message
    assert [(c.function.name, c.function.arguments) for c in msg.tool_calls] == [("get_time", "{}")]
    assert out.choices[0].finish_reason == "tool_calls"
    assert (msg.model_extra or {}).get("reasoning_content") == ("Let me see." if thinking else None)
    with pytest.raises(openai.BadRequestError):
        _ask(oai, prompt, tool_choice={"type": "function", "function": {"name": "nope"}})


def test_no_tools_means_no_tool_calls(oai):
    out = oai.chat.completions.create(model="scripted", messages=[{"role": "user", "content": "weather please"}],
                                      temperature=0, max_tokens=600)
    assert out.choices[0].message.tool_calls is None
    assert out.choices[0].message.content == SCRIPT["weather please"]


# --- Anthropic ------------------------------------------------------------------------------------------------
def test_anthropic_tool_use_and_thinking(claude):
    out = claude.messages.create(model="scripted", max_tokens=600, tools=ANTHROPIC_TOOLS,
                                 thinking={"type": "enabled", "budget_tokens": 100},
                                 messages=[{"role": "user", "content": "think then call"}])
    assert [b.type for b in out.content] == ["thinking", "text", "tool_use"]
    assert out.content[0].thinking == "The user wants weather."
    assert out.content[1].text == "Checking."
    assert (out.content[2].name, out.content[2].input) == ("get_weather", {"city": "Paris", "days": 3})
    assert out.content[2].id.startswith("toolu_")
    assert out.stop_reason == "tool_use"
    with claude.messages.stream(model="scripted", max_tokens=600, tools=ANTHROPIC_TOOLS,
                                thinking={"type": "enabled", "budget_tokens": 100},
                                messages=[{"role": "user", "content": "think then call"}]) as stream:
        events = [e.type for e in stream]
        final = stream.get_final_message()
    assert [b.type for b in final.content] == ["thinking", "text", "tool_use"]
    assert final.content[2].input == {"city": "Paris", "days": 3} and final.stop_reason == "tool_use"
    assert events[0] == "message_start" and "content_block_start" in events and events[-1] == "message_stop"
    # the tool's result goes back as a tool_result block: the whole first turn is cached
    turn2 = [{"role": "user", "content": "think then call"},
             {"role": "assistant", "content": [b.model_dump() for b in out.content]},
             {"role": "user", "content": [{"type": "tool_result", "tool_use_id": out.content[2].id,
                                           "content": "sunny"}]}]
    again = claude.messages.create(model="scripted", max_tokens=50, tools=ANTHROPIC_TOOLS,
                                   thinking={"type": "enabled", "budget_tokens": 100}, messages=turn2)
    assert again.usage.cache_read_input_tokens > out.usage.input_tokens
    n = claude.messages.count_tokens(model="scripted", messages=turn2, tools=ANTHROPIC_TOOLS,
                                     thinking={"type": "enabled", "budget_tokens": 100})
    assert n.input_tokens == again.usage.input_tokens + again.usage.cache_read_input_tokens


def test_anthropic_text_stop_sequence_and_errors(claude):
    out = claude.messages.create(model="scripted", max_tokens=50, system="Be brief.",
                                 messages=[{"role": "user", "content": "sunny"}])
    assert [b.type for b in out.content] == ["text"] and out.content[0].text == "It is sunny in Paris."
    assert out.stop_reason == "end_turn"
    cut = claude.messages.create(model="scripted", max_tokens=50, stop_sequences=["Paris"],
                                 messages=[{"role": "user", "content": "sunny"}])
    assert (cut.content[0].text, cut.stop_reason, cut.stop_sequence) == ("It is sunny in ", "stop_sequence", "Paris")
    short = claude.messages.create(model="scripted", max_tokens=2, messages=[{"role": "user", "content": "sunny"}])
    assert short.stop_reason == "max_tokens" and short.usage.output_tokens == 2
    with pytest.raises(anthropic.BadRequestError) as e:
        claude.messages.create(model="scripted", max_tokens=0, messages=[{"role": "user", "content": "x"}])
    assert e.value.body["error"]["type"] == "invalid_request_error"
    with pytest.raises(anthropic.BadRequestError):
        claude.messages.create(model="scripted", max_tokens=5, messages=[{"role": "user", "content": [
            {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "AA=="}}]}])
    bad = anthropic.Anthropic(base_url=claude.base_url, api_key="wrong", max_retries=0)
    with pytest.raises(anthropic.AuthenticationError) as e:
        bad.messages.create(model="scripted", max_tokens=5, messages=[{"role": "user", "content": "x"}])
    assert e.value.body["error"]["type"] == "authentication_error"
