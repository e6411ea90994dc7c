"""`dsv4-ggml generate`: lower codegen/v4.py through codegen/templates into native/."""
from __future__ import annotations

import sys
from pathlib import Path


def add_arguments(g) -> None:
    g.add_argument("--check", action="store_true",
                   help="do not write; exit 1 if the committed files differ from the DSL")
    g.add_argument("--root", help="source checkout to write into (default: found from the cwd)")


def _find_source_root(start: Path) -> Path | None:
    """The source checkout holding codegen/ and native/ (for `generate`)."""
    for d in (start, *start.parents):
        if (d / "codegen" / "v4.py").exists() and (d / "native").is_dir():
            return d
    here = Path(__file__).resolve().parents[2]   # the checkout above dsv4_ggml/cli/
    if (here / "codegen" / "v4.py").exists() and (here / "native").is_dir():
        return here
    return None


def run(args) -> int:
    from codegen.emit import generate

    root = Path(args.root).resolve() if args.root else _find_source_root(Path.cwd().resolve())
    if root is None:
        print("dsv4-ggml generate: run it inside a source checkout (codegen/ and native/), "
              "or pass --root", file=sys.stderr)
        return 2
    return generate(root, check=args.check)
