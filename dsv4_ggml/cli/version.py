"""`dsv4-ggml version`: the package's and the native library's versions."""
from __future__ import annotations


def add_arguments(parser) -> None:
    """`version` has no options."""


def run(args) -> int:
    from .. import __version__, _native

    print(f"dsv4-ggml {__version__}; native: {_native.version()}")
    return 0
