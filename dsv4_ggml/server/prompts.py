"""From a request to the tokens the scheduler runs: the chat template rendered and tokenized as
a cold run would (so a cached and a cold run evaluate the same ids), and the forced start of a
tool call for `tool_choice` "required" or a named function."""
from __future__ import annotations

from dataclasses import dataclass, field

from ..dsml import TOOL_CALLS_START, tool_call_prefix


@dataclass
class Prompt:
    tokens: list[int]
    forced: list[int] = field(default_factory=list)
    forced_text: str = ""
    force_after: list[int] | None = None      # token ids after which `forced` is inserted (None: at once)


def text_prompt(model, prompt: str | list[int]) -> Prompt:
    return Prompt(model.tokenize(prompt) if isinstance(prompt, str) else list(prompt))


def chat_prompt(model, messages: list, thinking: bool, tools: list | None, reasoning_effort: str | None,
                force_tool: str | bool | None) -> Prompt:
    """The chat's tokens. `force_tool` (True: any tool, or a name) constrains the answer to start
    with a DSML tool-call block: the block's opening (with the invoke's name when one is named)
    is inserted after the generation prompt, or, in thinking mode, right after the model closes
    its reasoning with `</think>`, and the model continues from there."""
    extra = {"reasoning_effort": reasoning_effort} if reasoning_effort else {}
    text = model.chat_template.render(messages, add_generation_prompt=True, thinking=thinking, tools=tools, **extra)
    out = Prompt(model.tokenize(text, add_bos=False))
    if force_tool:
        out.forced_text = (tool_call_prefix(force_tool) if isinstance(force_tool, str)
                           else TOOL_CALLS_START + "\n<｜DSML｜invoke name=\"")
        out.forced = model.tokenize(out.forced_text, add_bos=False)
        if thinking:
            out.force_after = model.tokenize("</think>", add_bos=False)
    return out
