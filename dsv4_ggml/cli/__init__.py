"""The `dsv4-ggml` command line.

Each command is a module with the same contract: `add_arguments(parser)` adds its options to its
subparser, `run(args) -> int` runs it. `COMMANDS` names the module of each command with its help
lines; `build_parser` imports a command's module only when that command is the one chosen, so
`dsv4-ggml version` imports neither the server, the converter nor the benchmark."""
from __future__ import annotations

import argparse
import importlib
import sys
from typing import NamedTuple

from ..cli_options import run_parsed


class Command(NamedTuple):
    module: str         # a module with add_arguments(parser) and run(args) -> int
    help: str           # the line `dsv4-ggml --help` shows
    description: str    # the text `dsv4-ggml COMMAND --help` starts with


COMMANDS: dict[str, Command] = {
    "generate": Command("dsv4_ggml.cli.generate", "regenerate native/generated and the C header from the DSL",
                        "Lower codegen/v4.py through codegen/templates into native/."),
    "tiny": Command("dsv4_ggml.cli.tiny", "write a small random DeepSeek-V4 GGUF (llama.cpp format)",
                    "Write a tiny random DeepSeek-V4 model for tests and demos."),
    "inspect": Command("dsv4_ggml.cli.inspect", "show a GGUF's hyperparameters and tensors",
                       "Validate a model file and print what it holds."),
    "run": Command("dsv4_ggml.cli.run", "generate text from a prompt (streams tokens)",
                   "Generate text. Without -m, runs the embedded tiny model."),
    "chat": Command("dsv4_ggml.cli.chat", "interactive chat (reads stdin; works when piped)",
                    "Chat with the model through its chat template. Each stdin line "
                    "is a user turn; the reply streams to stdout."),
    "bench": Command("dsv4_ggml.cli.bench", "measure prompt and generation throughput (llama-bench style)",
                     "pp: prefill throughput; tg: decode throughput after a prefill of "
                     "each --depth. Warm-up run, then --repetitions runs: mean ± std."),
    "serve": Command("dsv4_ggml.server", "serve the model over an OpenAI-compatible HTTP API",
                     "Serve /v1/completions, /v1/chat/completions (SSE streaming) and "
                     "/v1/models. Requests are queued and run one at a time."),
    "convert": Command("dsv4_ggml.convert.cli", "convert an official DeepSeek-V4 checkpoint (safetensors) to GGUF",
                       "Convert the official FP8/FP4 safetensors checkpoint into a GGUF in "
                       "llama.cpp's DeepSeek-V4 format, one tensor at a time."),
    "version": Command("dsv4_ggml.cli.version", "print versions", "Print versions."),
}


def chosen_command(argv: list[str] | None) -> str | None:
    """The command `argv` runs: its first argument that is not an option."""
    return next((a for a in argv or [] if not a.startswith("-")), None)


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The parser of `argv`: every command with its help lines, and the options of the command `argv`
    runs (its module imported here, no other command's). argv None: every command's options."""
    chosen = chosen_command(argv)
    p = argparse.ArgumentParser(prog="dsv4-ggml", description="DeepSeek-V4 inference on ggml")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name, cmd in COMMANDS.items():
        sp = sub.add_parser(name, help=cmd.help, description=cmd.description)
        if argv is None or name == chosen:
            mod = importlib.import_module(cmd.module)
            mod.add_arguments(sp)
            sp.set_defaults(fn=mod.run)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    return run_parsed(build_parser(argv), argv)
