"""Text in, text out: tokenizer, chat template, sampling, streaming generation, chat turns."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

import dsv4_ggml
from dsv4_ggml import errors
from dsv4_ggml.chat import ChatTemplate
from dsv4_ggml.generation import StopMatcher
from dsv4_ggml.sampling import Sampler, SamplingParams
from dsv4_ggml.tokenizer import StreamDecoder

BOS, EOS, USER, ASSISTANT = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜User｜>", "<｜Assistant｜>"


@pytest.fixture(scope="module")
def model(tiny_model):
    return dsv4_ggml.Model(tiny_model, n_ctx=1024)


# --- tokenizer -----------------------------------------------------------------------------------

def test_tokenize_round_trips_and_adds_bos(model):
    for text in ("The quick brown fox jumps over the lazy dog.", "inference engines 4096", "Ünïcödé 中文 🙂\n\n  x"):
        ids = model.tokenize(text)
        assert ids[0] == 0
        assert model.detokenize(ids[1:]) == text
        assert model.tokenize(text, add_bos=False) == ids[1:]


def test_special_tokens_in_text_become_their_ids(model):
    ids = model.tokenize(f"{USER}hi{ASSISTANT}</think>", add_bos=False)
    vocab = model.tokenizer.tokens
    assert ids[0] == vocab.index(USER) and vocab.index(ASSISTANT) in ids and vocab.index("</think>") == ids[-1]
    # a rendered template carries its own BOS: no second one
    assert model.tokenize(BOS + "x", add_bos=True).count(0) == 1


def test_pre_tokenizer_splits_digits_in_runs_of_three(model):
    tok = model.tokenizer
    pieces = [tok.decode([i]) for i in tok.encode("1234567", add_bos=False)]
    assert "".join(pieces) == "1234567"
    # no token spans across a 3-digit group boundary (\p{N}{1,3})
    boundaries = np.cumsum([len(p) for p in pieces])
    assert set(boundaries) >= {3, 6, 7}


def test_stream_decoder_never_emits_broken_utf8(model):
    tok = model.tokenizer
    text = "naïve 中文 🙂 done"
    ids = tok.encode(text, add_bos=False)
    decoder = StreamDecoder(tok)
    pieces = [decoder.push(i) for i in ids] + [decoder.flush()]
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)
    # a 4-byte emoji fed byte by byte (byte tokens) comes out whole, once
    byte_ids = [tok.tokens.index(tok.tokens[2 + b]) for b in "🙂".encode()]
    decoder = StreamDecoder(tok)
    assert [decoder.push(i) for i in byte_ids] == ["", "", "", "🙂"]


# --- chat template -----------------------------------------------------------------------------------

TEMPLATE_CASES = {
    "single turn": (dict(messages=[{"role": "user", "content": "Hello"}]),
                    f"{BOS}{USER}Hello{ASSISTANT}</think>"),
    "system + user": (dict(messages=[{"role": "system", "content": "Be brief."},
                                     {"role": "user", "content": "Hi"}]),
                      f"{BOS}Be brief.{USER}Hi{ASSISTANT}</think>"),
    "multi-turn": (dict(messages=[{"role": "system", "content": "S1"}, {"role": "system", "content": "S2"},
                                  {"role": "user", "content": "a"},
                                  {"role": "assistant", "content": "b", "reasoning_content": "r"},
                                  {"role": "user", "content": "c"}, {"role": "user", "content": "d"}]),
                   f"{BOS}S1\n\nS2{USER}a{ASSISTANT}</think>b{EOS}{USER}c\n\nd{ASSISTANT}</think>"),
    "thinking": (dict(messages=[{"role": "user", "content": "a"},
                                {"role": "assistant", "content": "b", "reasoning_content": "old"},
                                {"role": "user", "content": "c"}], thinking=True),
                 f"{BOS}{USER}a{ASSISTANT}</think>b{EOS}{USER}c{ASSISTANT}<think>"),
    "thinking keeps the latest reasoning": (
        dict(messages=[{"role": "user", "content": "a"},
                       {"role": "assistant", "content": "b", "reasoning_content": "r"}], thinking=True),
        f"{BOS}{USER}a{ASSISTANT}<think>r</think>b{EOS}{ASSISTANT}<think>"),
    "tool call and result": (
        dict(messages=[{"role": "user", "content": "weather?"},
                       {"role": "assistant", "content": "", "tool_calls": [
                           {"type": "function", "function": {"name": "get", "arguments": '{"city": "Paris", "days": 2}'}}]},
                       {"role": "tool", "content": "sunny"}]),
        f'{BOS}{USER}weather?{ASSISTANT}</think>\n\n<｜DSML｜tool_calls>\n<｜DSML｜invoke name="get">\n'
        '<｜DSML｜parameter name="city" string="true">Paris</｜DSML｜parameter>\n'
        '<｜DSML｜parameter name="days" string="false">2</｜DSML｜parameter>\n</｜DSML｜invoke>\n'
        f'</｜DSML｜tool_calls>{EOS}{USER}<tool_result>sunny</tool_result>{ASSISTANT}</think>'),
}


@pytest.mark.parametrize("name", list(TEMPLATE_CASES))
def test_builtin_template_renders_byte_exact(name):
    kwargs, want = TEMPLATE_CASES[name]
    assert ChatTemplate().render(**kwargs) == want


def test_gguf_template_is_used_when_present_and_sandboxed(model):
    assert model.chat_template.builtin  # the tiny model has none
    t = ChatTemplate("{% for m in messages %}[{{ m.role }}]{{ m.content }}{% endfor %}")
    assert t.render([{"role": "user", "content": "x"}]) == "[user]x"
    evil = ChatTemplate("{{ ''.__class__.__mro__[1].__subclasses__() }}")
    with pytest.raises(errors.InvalidArgumentError):
        evil.render([{"role": "user", "content": "x"}])


@pytest.mark.parametrize("bad", [[], [{"content": "x"}], [{"role": "robot", "content": "x"}],
                                 [{"role": "user", "content": 3}]])
def test_bad_messages_raise(bad):
    with pytest.raises(errors.InvalidArgumentError):
        ChatTemplate().render(bad)


# --- sampling and generation -----------------------------------------------------------------------

def test_sampler_chain():
    logits = np.array([3.0, 2.9, 1.0, -5.0, 0.5])
    assert Sampler(SamplingParams(temperature=0)).sample(logits) == 0
    draws = {Sampler(SamplingParams(temperature=1.0, top_k=2, seed=s)).sample(logits) for s in range(50)}
    assert draws == {0, 1}
    draws = {Sampler(SamplingParams(temperature=1.0, top_k=0, top_p=1.0, min_p=0.5, seed=s)).sample(logits)
             for s in range(50)}
    assert draws == {0, 1}   # min-p: only tokens with p >= 0.5·p_max
    # repetition penalty: a recent token with a positive logit is divided by the penalty
    assert Sampler(SamplingParams(temperature=0, repeat_penalty=2.0)).sample(logits, history=[0]) == 1
    with pytest.raises(errors.InvalidArgumentError):
        Sampler(SamplingParams(top_p=0.0))


def test_stop_matcher_holds_back_possible_stops():
    s = StopMatcher(["STOP"])
    assert s.push("abc ST") == "abc "
    assert s.push("O") == ""
    assert s.push("P and more") == "" and s.stopped


def test_seeded_generation_is_reproducible(model):
    a = [c.token for c in model.generate("Hello", max_tokens=12, temperature=0.9, seed=7)]
    b = [c.token for c in model.generate("Hello", max_tokens=12, temperature=0.9, seed=7)]
    c = [c.token for c in model.generate("Hello", max_tokens=12, temperature=0.9, seed=8)]
    assert a == b and len(a) == 12 and a != c


def test_greedy_generation_follows_the_argmax(model):
    ids = model.tokenize("The quick")
    chunks = list(model.generate(ids, max_tokens=5, temperature=0))
    assert chunks[-1].finish_reason == "length" and all(c.finish_reason is None for c in chunks[:-1])
    m2 = dsv4_ggml.Model(model.path, n_ctx=64)
    seq = list(ids)
    for c in chunks:
        assert c.token == int(m2.eval(seq)[-1].argmax())
        m2.reset()
        seq.append(c.token)


def test_stop_strings_end_generation_and_are_not_returned(model):
    full = "".join(c.text for c in model.generate("The", max_tokens=20, temperature=0))
    assert len(full) > 4
    stop = full[2:4]
    out = list(model.generate("The", max_tokens=20, temperature=0, stop=[stop]))
    assert out[-1].finish_reason == "stop"
    assert "".join(c.text for c in out) == full[:full.index(stop)]


def test_completion_and_chat_completion_are_openai_shaped(model):
    r = model.create_completion("Hello", max_tokens=4, temperature=0)
    assert r["object"] == "text_completion" and r["choices"][0]["finish_reason"] == "length"
    assert r["usage"]["completion_tokens"] == 4
    c = model.create_chat_completion([{"role": "user", "content": "Hi"}], max_tokens=4, temperature=0)
    assert c["object"] == "chat.completion" and c["choices"][0]["message"]["role"] == "assistant"
    streamed = list(model.create_chat_completion([{"role": "user", "content": "Hi"}], max_tokens=4,
                                                 temperature=0, stream=True))
    assert streamed[0]["object"] == "chat.completion.chunk"
    text = "".join(ch["choices"][0]["delta"].get("content", "") for ch in streamed)
    assert text == c["choices"][0]["message"]["content"]
    assert streamed[-1]["choices"][0]["finish_reason"] == "length"


def count_evaluated(m) -> list[int]:
    """Records the length of every token list `m.eval` is given from now on."""
    fed = []
    eval_ = m.eval

    def spy(tokens, logits="all", **kw):
        fed.append(len(tokens))
        return eval_(tokens, logits, **kw)
    m.eval = spy
    return fed


def test_second_chat_turn_evaluates_only_the_new_tokens(tiny_model):
    m = dsv4_ggml.Model(tiny_model, n_ctx=1024)
    fed = count_evaluated(m)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"}]
    first = m.create_chat_completion(messages, max_tokens=6, temperature=0)
    held = len(m._tokens)
    fed.clear()
    messages += [first["choices"][0]["message"], {"role": "user", "content": "And again"}]
    second = m.create_chat_completion(messages, max_tokens=3, temperature=0)
    prompt2 = second["usage"]["prompt_tokens"]
    # the first turn's tokens are reused: only the rest of the new prompt is evaluated (+ decode steps)
    assert fed[0] == prompt2 - held and sum(fed) < prompt2
    # and it generates what a fresh session given the same prompt tokens generates
    prompt_tokens = m._tokens[:prompt2]
    fresh = dsv4_ggml.Model(tiny_model, n_ctx=1024)
    again = "".join(c.text for c in fresh.generate(prompt_tokens, max_tokens=3, temperature=0))
    assert again == second["choices"][0]["message"]["content"]


def test_thinking_chat_next_turn_evaluates_only_what_follows_the_common_prefix(tiny_model):
    """Thinking mode drops a turn's reasoning from the history, so the next prompt is not an
    extension of the tokens held: the sequence goes back to where the two part (just before the
    first turn's reasoning: the prompt-end checkpoint, nothing recomputed) and evaluates only the
    rest, and generates what a fresh model given the same prompt tokens generates."""
    m = dsv4_ggml.Model(tiny_model, n_ctx=2048)
    fed = count_evaluated(m)
    messages = [{"role": "user", "content": "Hello there"}]
    first = m.create_chat_completion(messages, max_tokens=40, temperature=0, thinking=True)
    held = list(m._tokens)
    messages += [first["choices"][0]["message"], {"role": "user", "content": "And again"}]
    fed.clear()
    second = m.create_chat_completion(messages, max_tokens=3, temperature=0, thinking=True)
    prompt2 = second["usage"]["prompt_tokens"]
    prompt_tokens = m._tokens[:prompt2]
    common = next(i for i, (a, b) in enumerate(zip(held, prompt_tokens)) if a != b)
    assert common < len(held) - 30                  # the held reasoning is not part of the new prompt
    assert fed[0] == prompt2 - common and sum(fed) < prompt2
    st = m.stats()
    assert st["n_restores"] == 1 and st["n_reevaluated"] == 0
    fresh = dsv4_ggml.Model(tiny_model, n_ctx=2048)
    again = [c.token for c in fresh.generate(prompt_tokens, max_tokens=3, temperature=0)]
    generated = m._tokens[prompt2:]                 # the last sampled token is never evaluated
    assert len(generated) == 2 and again[:2] == generated


def test_prompt_longer_than_the_context_raises(tiny_model):
    m = dsv4_ggml.Model(tiny_model, n_ctx=16)
    with pytest.raises(errors.ContextOverflowError):
        list(m.generate(list(range(2, 30)), max_tokens=2))


def test_generation_stops_at_n_ctx(tiny_model):
    m = dsv4_ggml.Model(tiny_model, n_ctx=24)
    out = list(m.generate(list(range(2, 20)), max_tokens=50, temperature=0))
    assert out[-1].finish_reason == "length" and len(out) <= 6


def test_cli_chat_works_when_piped(tiny_model):
    r = subprocess.run([sys.executable, "-m", "dsv4_ggml.cli", "chat", "-m", str(tiny_model), "-n", "4",
                        "--temp", "0"], input="hello\n/reset\nagain\n", capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    assert len(r.stdout.splitlines()) == 2   # one reply line per user line


def test_token_types_follow_gguf():
    """gguf token types: CONTROL (3) and UNUSED (5) are specials; USER_DEFINED (4) tokens are
    matched anywhere in text and decode to their own text (a converter writes them for added,
    non-special tokens)."""
    from dsv4_ggml.tiny_vocab import build_vocab
    from dsv4_ggml.tokenizer import Dsv4Tokenizer

    v = build_vocab(512)
    tokens, types = list(v.tokens), list(v.token_types)
    user_id = len(tokens) - 1
    assert types[user_id] == 5          # a filler: UNUSED, as in the golden files
    tokens[user_id], types[user_id] = "<tool▁output>", 4
    tok = Dsv4Tokenizer(tokens, v.merges, types, v.bos_id, v.eos_id, add_bos=False)
    ids = tok.encode("a<tool▁output>b")
    assert user_id in ids and tok.decode(ids) == "a<tool▁output>b"
    assert tok.decode(ids, skip_special=True) == "a<tool▁output>b"     # not a special
    assert tok.token_bytes(user_id) == "<tool▁output>".encode()
    filler = len(tokens) - 2
    assert filler in tok.special_ids and tok.decode([filler], skip_special=True) == ""
