"""The package's shape: no import cycles between its modules, and commands import only what they run."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PKG = Path(__file__).resolve().parent.parent / "dsv4_ggml"


def module_name(path: Path) -> str:
    rel = path.relative_to(PKG.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(path: Path) -> set[str]:
    """Every dsv4_ggml module `path` imports, at module level or inside functions (the package
    itself, e.g. `from . import __version__`, is not counted: it is every module's parent)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                target = f"{base}.{node.module}" if node.module else base
            else:
                target = node.module or ""
            if target.startswith("dsv4_ggml"):
                if node.module is None:   # from . import x: x may be a module
                    out.update(f"{target}.{a.name}" for a in node.names
                               if (PKG.parent / f"{target}.{a.name}".replace(".", "/")).with_suffix(".py").exists())
                else:
                    out.add(target)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.startswith("dsv4_ggml"))
    return {m for m in out if m != "dsv4_ggml" and m != name}


def test_no_import_cycles_between_modules():
    graph = {module_name(p): imports_of(p) for p in PKG.rglob("*.py")}
    assert graph["dsv4_ggml.cli_options"] <= {"dsv4_ggml.errors"}, graph["dsv4_ggml.cli_options"]
    for m in ("dsv4_ggml.bench", "dsv4_ggml.server", "dsv4_ggml.convert"):
        assert "dsv4_ggml.cli" not in graph[m], f"{m} imports the CLI"
    done: set[str] = set()

    def visit(m: str, stack: list[str]) -> None:
        if m in stack:
            raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(m):] + [m]))
        if m in done:
            return
        for n in sorted(graph.get(m, ())):
            visit(n, stack + [m])
        done.add(m)

    for m in sorted(graph):
        visit(m, [])


def test_a_command_imports_only_what_it_runs():
    code = ("import sys; from dsv4_ggml import cli; cli.main(['version']); "
            "print(sorted(m for m in sys.modules if m.startswith('dsv4_ggml.')))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                       cwd=PKG.parent)
    assert r.returncode == 0, r.stderr
    loaded = r.stdout.strip().splitlines()[-1]
    for heavy in ("server", "convert", "bench", "generation", "reference"):
        assert f"'dsv4_ggml.{heavy}" not in loaded, loaded
