"""Streaming generation on top of Model.eval: sampling, stop strings, OpenAI-shaped results."""
from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from typing import Any, Iterable, Iterator, Sequence

from .chat import split_reasoning
from .errors import ContextOverflowError, InvalidArgumentError
from .sampling import Sampler, SamplingParams
from .tokenizer import StreamDecoder


@dataclass(frozen=True)
class GenerationChunk:
    """One generated token: its id, the text it completes (possibly empty while a UTF-8
    character or a possible stop string is held back), and why generation ended (or None)."""

    token: int
    text: str
    finish_reason: str | None = None
    stop: str | None = None          # the stop string that ended generation, if one did


class StopMatcher:
    """Holds back text that might be the start of a stop string; reports a full match."""

    def __init__(self, stops: Iterable[str]):
        self.stops = [s for s in stops if s]
        self.pending = ""
        self.stopped = False
        self.matched: str | None = None      # the stop string found

    def push(self, text: str) -> str:
        self.pending += text
        hits = [(self.pending.find(s), s) for s in self.stops if s in self.pending]
        if hits:
            at, self.matched = min(hits)
            out, self.pending, self.stopped = self.pending[:at], "", True
            return out
        hold = 0
        for s in self.stops:
            for k in range(min(len(s) - 1, len(self.pending)), 0, -1):
                if self.pending.endswith(s[:k]):
                    hold = max(hold, k)
                    break
        out = self.pending[:len(self.pending) - hold]
        self.pending = self.pending[len(self.pending) - hold:]
        return out

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out


class TokenGenerator:
    """One generation's sampling, detokenizing and stop checks, driven by whoever evaluates the
    model (`stream_tokens` below, or the server's batched scheduler): `next(logits, history,
    n_past)` samples the token after a sequence of `n_past` tokens whose last logits are given
    and returns its chunk; a chunk with a `finish_reason` is the last, any other must be
    evaluated before the next call. Both drivers go through this one path, so a batched request
    makes exactly the tokens and text it makes alone."""

    def __init__(self, tokenizer, n_ctx: int, max_tokens: int, params: SamplingParams, stop: Iterable[str] = ()):
        if max_tokens < 1:
            raise InvalidArgumentError(f"max_tokens must be at least 1, got {max_tokens}")
        self.sampler = Sampler(params)
        self.eos_id = tokenizer.eos_id
        self.n_ctx = n_ctx
        self.max_tokens = max_tokens
        self.decoder = StreamDecoder(tokenizer)
        self.stopper = StopMatcher(stop)
        self.n_generated = 0

    def next(self, logits, history: Sequence[int], n_past: int) -> GenerationChunk:
        return self.accept(self.sampler.sample(logits, history), n_past)

    def accept(self, t: int, n_past: int) -> GenerationChunk:
        """The chunk of token `t`, chosen by the caller (a verified draft), after n_past tokens."""
        self.n_generated += 1
        decoder, stopper = self.decoder, self.stopper
        if t == self.eos_id:
            return GenerationChunk(t, stopper.push(decoder.flush()) + stopper.flush(), "stop")
        text = stopper.push(decoder.push(t))
        if stopper.stopped:
            return GenerationChunk(t, text, "stop", stopper.matched)
        if self.n_generated == self.max_tokens or n_past + 1 >= self.n_ctx:
            return GenerationChunk(t, text + stopper.push(decoder.flush()) + stopper.flush(), "length")
        return GenerationChunk(t, text)


def check_prompt_fits(n_tokens: int, n_ctx: int) -> None:
    if n_tokens == 0:
        raise InvalidArgumentError("the prompt is empty")
    if n_tokens >= n_ctx:
        raise ContextOverflowError(f"the prompt has {n_tokens} tokens; n_ctx is {n_ctx}")


def stream_tokens(model, tokens: Sequence[int], max_tokens: int, params: SamplingParams,
                  stop: Iterable[str] = (), draft=None) -> Iterator[GenerationChunk]:
    """Feeds `tokens` (reusing the session's matching prefix) and samples up to `max_tokens`.
    `draft`: a `speculative.Drafting` (speculative decoding: the same stream, fewer steps)."""
    if draft is not None:
        yield from draft.stream(model, tokens, max_tokens, params, stop)
        return
    gen = TokenGenerator(model.tokenizer, model.n_ctx, max_tokens, params, stop)
    check_prompt_fits(len(tokens), model.n_ctx)
    logits = model._feed(list(tokens))
    while True:
        c = gen.next(logits, model._tokens, model.n_past)
        yield c
        if c.finish_reason:
            return
        logits = model.eval([c.token], logits="last")[0]


def _completion_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def completion(model, prompt: str | Sequence[int], stream: bool, max_tokens: int, params: SamplingParams,
               stop: Iterable[str], echo: bool = False, draft=None) -> Any:
    """OpenAI `text_completion` dict, or an iterator of its chunks when `stream`."""
    tokens = model.tokenize(prompt) if isinstance(prompt, str) else list(prompt)
    cid, created, name = _completion_id("cmpl"), int(time.time()), model.name
    prefix = (prompt if isinstance(prompt, str) else model.detokenize(tokens)) if echo else ""

    def chunk(text: str, finish: str | None) -> dict:
        return {"id": cid, "object": "text_completion", "created": created, "model": name,
                "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish}]}

    if stream:
        def gen() -> Iterator[dict]:
            if prefix:
                yield chunk(prefix, None)
            for c in stream_tokens(model, tokens, max_tokens, params, stop, draft):
                if c.text or c.finish_reason:
                    yield chunk(c.text, c.finish_reason)
        return gen()
    pieces, finish, n = [], "length", 0
    for c in stream_tokens(model, tokens, max_tokens, params, stop, draft):
        pieces.append(c.text)
        n += 1
        finish = c.finish_reason or finish
    out = chunk(prefix + "".join(pieces), finish)
    out["usage"] = {"prompt_tokens": len(tokens), "completion_tokens": n, "total_tokens": len(tokens) + n}
    return out


def chat_completion(model, messages: Sequence[dict], stream: bool, max_tokens: int, params: SamplingParams,
                    stop: Iterable[str], thinking: bool, tools: Sequence[dict] | None,
                    template_vars: dict[str, Any], draft=None) -> Any:
    """OpenAI `chat.completion` dict, or an iterator of `chat.completion.chunk` dicts."""
    text = model.chat_template.render(messages, add_generation_prompt=True, thinking=thinking, tools=tools,
                                      **template_vars)
    tokens = model._tokens_for_text(text)
    cid, created, name = _completion_id("chatcmpl"), int(time.time()), model.name

    if stream:
        def gen() -> Iterator[dict]:
            def chunk(delta: dict, finish: str | None) -> dict:
                return {"id": cid, "object": "chat.completion.chunk", "created": created, "model": name,
                        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
            yield chunk({"role": "assistant", "content": ""}, None)
            in_reasoning = thinking
            for c in stream_tokens(model, tokens, max_tokens, params, stop, draft):
                piece = c.text
                while piece:
                    if in_reasoning:
                        head, sep, piece = piece.partition("</think>")
                        if head:
                            yield chunk({"reasoning_content": head}, None)
                        in_reasoning = not sep
                    else:
                        yield chunk({"content": piece}, None)
                        piece = ""
                if c.finish_reason:
                    yield chunk({}, c.finish_reason)
        return gen()

    pieces, finish, n = [], "length", 0
    for c in stream_tokens(model, tokens, max_tokens, params, stop, draft):
        pieces.append(c.text)
        n += 1
        finish = c.finish_reason or finish
    reasoning, content = split_reasoning("".join(pieces), thinking)
    message: dict[str, Any] = {"role": "assistant", "content": content}
    if reasoning is not None:
        message["reasoning_content"] = reasoning
    return {"id": cid, "object": "chat.completion", "created": created, "model": name,
            "choices": [{"index": 0, "message": message, "finish_reason": finish}],
            "usage": {"prompt_tokens": len(tokens), "completion_tokens": n, "total_tokens": len(tokens) + n}}
