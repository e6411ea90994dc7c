"""An OpenAI- and Anthropic-compatible HTTP server (starlette + uvicorn) for one DeepSeek-V4 model.

    python -m dsv4_ggml.server -m model.gguf --port 8080 [--api-key KEY] [-np 4] [--draft mtp]
    dsv4-ggml serve -m model.gguf ...                       (the same options)

`--draft mtp [--n-draft K]`: speculative decoding in every slot with the file's MTP block (the
model opened with mtp=True): a decoding slot's token and its drafts join the shared batched step,
the slot keeps the agreeing prefix (greedy: its own choices; sampling: speculative sampling) and
rolls back the rest; K adapts per request unless `--no-adaptive-draft`. `--draft-model
DRAFT.gguf` drafts with a smaller model of the same vocabulary instead (one of its sequence slots
per server slot). `/metrics` counts the drafts proposed and accepted.

Endpoints (each also without the `/v1` prefix, like llama.cpp's server):

- `GET /health`: `{"status": "ok", "busy", "slots_busy", "n_parallel", "queued", "served",
  "cancelled"}`; never needs the API key and answers while requests generate.
- `GET /metrics`: Prometheus text (requests, prompt tokens evaluated and cached, cache hits,
  tokens generated, drafts proposed and accepted, tokens/s, queue depth, slots busy); no key
  needed. `GET /slots`: each slot's
  tokens held and its running request. `POST /tokenize` `{"content", "add_special"}` ->
  `{"tokens"}`, `POST /detokenize` `{"tokens"}` -> `{"content"}` (llama.cpp's shapes).
- `GET /v1/models`, `GET /v1/models/{id}`: the OpenAI list / model shape.
- `POST /v1/completions`, `POST /v1/chat/completions`: the OpenAI shapes; `"stream": true` sends
  Server-Sent Events (`data: {chunk}\\n\\n` per chunk, then `data: [DONE]\\n\\n`).
- `POST /v1/messages`, `POST /v1/messages/count_tokens`: Anthropic's Messages API
  (`anthropic_api.py` lists what it takes); `x-api-key` works as the key header.

Request fields (OpenAI)
-----------------------
Used: `prompt` (completions: a string, a list of token ids, or a one-element list of either),
`messages` (chat), `max_tokens` / `max_completion_tokens` (llama.cpp's `n_predict` too; -1 or
absent: until the context is full for chat, 16 for completions as in OpenAI, unless the server
was started with `--n-predict`), `temperature`, `top_p`, `seed` (-1: random), `stop` (a string or
a list), `stream`, `stream_options.include_usage`, `echo` (completions), `n` / `best_of` (1 only),
llama.cpp's `top_k` (<= 0: off, as vLLM's -1), `min_p`, `repeat_penalty`, DeepSeek thinking mode
(`chat_template_kwargs: {"thinking": true}` or `{"enable_thinking": true}`, a top-level
`"thinking": true` or `{"type": "enabled"}`), `reasoning_effort`, `tools`, `tool_choice` ("auto",
"none": no tools rendered, "required" or `{"type": "function", "function": {"name": ...}}`: the
answer is constrained to start with a DSML tool-call block, opened after the generation prompt
or, in thinking mode, right after the model's `</think>`; with a named function the block's
first invoke names it). Defaults of the sampling fields are the engine's (llama.cpp's):
temperature 0.8, top_k 40, top_p 0.95, min_p 0.05, repeat_penalty 1.0. `model` may name
anything: the server has one model and answers as it.

Chat answers: the reasoning goes to `reasoning_content` (DeepSeek's API convention), the model's
DSML tool calls to `tool_calls` with `finish_reason: "tool_calls"` (streamed as `tool_calls`
deltas, one per call, when its block has closed); DSML never reaches `content` (a malformed,
unterminated or unknown-tool block is returned as text). See `dsv4_ggml.dsml`.

Rejected with HTTP 400 (instead of being silently ignored, since each changes what a client gets):
`n` or `best_of` above 1, more than one prompt, `suffix`, `logprobs` / `top_logprobs`, non-zero
`presence_penalty` / `frequency_penalty`, a non-empty `logit_bias`, `response_format` other than
text, `grammar` / `json_schema`, `tool_choice` naming no given tool. llama.cpp's `cache_prompt`
(false: evaluate the whole prompt, a cold run) and `return_tokens` (the generated ids in
`choices[0].tokens`; streamed: in the finishing chunk; completions and chat) are read too. Every other field (`user`, `metadata`, `store`,
`service_tier`, `parallel_tool_calls`, ...) is ignored.

Errors are OpenAI-shaped `{"error": {"message", "type", "param", "code"}}` (Anthropic-shaped on
the Messages routes): 400 `invalid_request_error` for bad requests (a context overflow has code
`context_length_exceeded`), 401 for a missing or wrong API key, 404/405 for unknown routes, 413
for a body over 32 MiB, 503 with `Retry-After` when the queue is full, 500 `server_error`
(message only, the traceback goes to the server log) for engine failures. An error after a
stream has started is sent as a final event.

Slots, batching and the prompt cache
------------------------------------
The model is opened with `--parallel` sequence slots. One engine thread (`scheduler.py`) owns
it: every step is one batched evaluation of all running requests (decode tokens and prompt
chunks mixed), a new request joins at the next step, a finished one frees its slot at once,
requests beyond the slots wait in a bounded queue. A request goes to the idle slot whose held
tokens share the longest prefix with its prompt; only the rest is evaluated (usage reports
`prompt_tokens_details.cached_tokens`). The sampling path is `Model.generate`'s and each sequence
attends only to its own state: its logits are bit for bit the same whatever the requests batched
with it hold (tests/test_sequences.py). They can change with how many tokens share its step
(ggml's kernels round differently for different batch shapes): on the tiny F32 test models a
request gets exactly the token ids it gets alone on an idle server (tests/test_server.py); on the
random-weight Q8_0 and Q4_K bench models a logit moves by up to ~1.5 and a stream can part at a
near-tie (benchmarks/RESULTS.md), as in llama.cpp's batched server. A client that disconnects (queued, reading its prompt or mid-stream) has
its request dropped at the next step; the slot is left at a token boundary. SIGTERM ends running
streams with a `server_shutdown` error event.
"""
from __future__ import annotations

from .main import add_arguments, main, run, serve

__all__ = ["add_arguments", "build_app", "main", "run", "serve"]


def build_app(model, **kwargs):
    """`dsv4_ggml.server.app.build_app` (imported on use: it needs starlette)."""
    from .app import build_app as build
    return build(model, **kwargs)
