"""The package's shape: no import cycles between its modules, and commands import only what they run."""
from __future__ import annotations

import ast
import importlib
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


def is_module(name: str) -> bool:
    path = PKG.parent / name.replace(".", "/")
    return path.with_suffix(".py").exists() or (path / "__init__.py").exists()


def imports_of(path: Path) -> set[str]:
    """Every dsv4_ggml module `path` imports, at module level or inside functions (the package
    itself, e.g. `from . import __version__`, is not counted: it is every module's parent). `from
    . import x` counts module x, or the package `.` when x is a name it defines."""
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
                    for a in node.names:
                        out.add(f"{target}.{a.name}" if is_module(f"{target}.{a.name}") else target)
                else:
                    out.add(target)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.startswith("dsv4_ggml"))
    return {m for m in out if m != "dsv4_ggml" and m != name}


def within(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def import_graph() -> dict[str, set[str]]:
    return {module_name(p): imports_of(p) for p in PKG.rglob("*.py")}


def test_no_import_cycles_between_modules():
    graph = import_graph()
    assert graph["dsv4_ggml.split"] <= {"dsv4_ggml.errors"}, graph["dsv4_ggml.split"]   # leaves: the
    assert graph["dsv4_ggml.cli_options"] <= {"dsv4_ggml.errors", "dsv4_ggml.split"}, \
        graph["dsv4_ggml.cli_options"]                                               # CLI's shared options
    for m, deps in graph.items():
        if any(within(m, p) for p in ("dsv4_ggml.bench", "dsv4_ggml.server", "dsv4_ggml.convert")):
            assert not any(within(d, "dsv4_ggml.cli") for d in deps), f"{m} imports the CLI"
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


def test_package_parts_do_not_import_their_package():
    """A module of the cli or convert package imports its siblings, never the package's __init__
    (which imports them: a cycle at import time); `__main__` runs after the package, it may."""
    graph = import_graph()
    for package in ("dsv4_ggml.cli", "dsv4_ggml.convert"):
        for m, deps in graph.items():
            if m.startswith(package + ".") and m != f"{package}.__main__":
                assert package not in deps, f"{m} imports {package} itself"


def test_the_cli_imports_its_commands_only_by_name():
    """dsv4_ggml.cli (the top-level parser) imports no command module: the registry names them."""
    from dsv4_ggml.cli import COMMANDS

    deps = import_graph()["dsv4_ggml.cli"]
    for cmd in COMMANDS.values():
        assert cmd.module not in deps, f"dsv4_ggml.cli imports {cmd.module}"


def test_every_command_module_has_the_contract():
    from dsv4_ggml.cli import COMMANDS

    expected = {"generate", "tiny", "inspect", "run", "chat", "bench", "serve", "convert", "version"}
    assert set(COMMANDS) == expected
    for name, cmd in COMMANDS.items():
        mod = importlib.import_module(cmd.module)
        assert callable(getattr(mod, "add_arguments", None)), f"{cmd.module} has no add_arguments"
        assert callable(getattr(mod, "run", None)), f"{cmd.module} has no run"
        assert cmd.help and cmd.description, name
    # every module of the cli package but the shared ones is a command
    shared = {"__init__", "__main__", "common"}
    modules = {p.stem for p in (PKG / "cli").glob("*.py")} - shared
    assert {f"dsv4_ggml.cli.{m}" for m in modules} <= {c.module for c in COMMANDS.values()}


def _loaded_by(argv: list[str]) -> tuple[subprocess.CompletedProcess, list[str]]:
    code = ("import sys\nfrom dsv4_ggml import cli\ntry:\n    cli.main(%r)\nexcept SystemExit:\n    pass\n"
            "print(sorted(m for m in sys.modules if m.startswith('dsv4_ggml.')))" % (argv,))
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                       cwd=PKG.parent)
    assert r.returncode == 0, r.stderr
    return r, eval(r.stdout.strip().splitlines()[-1])


def test_a_command_imports_only_what_it_runs():
    for argv in (["version"], ["--help"], ["tiny", "--help"]):
        r, loaded = _loaded_by(argv)
        for heavy in ("server", "convert", "bench", "generation", "reference"):
            assert not any(within(m, f"dsv4_ggml.{heavy}") for m in loaded), (argv, loaded)
        commands = [m for m in loaded if within(m, "dsv4_ggml.cli") and m != "dsv4_ggml.cli"]
        chosen = {"version": ["dsv4_ggml.cli.version"], "tiny": ["dsv4_ggml.cli.common", "dsv4_ggml.cli.tiny"]}
        assert commands == chosen.get(argv[0], []), (argv, commands)


def test_help_lists_every_command():
    from dsv4_ggml.cli import COMMANDS

    r, _ = _loaded_by(["--help"])
    for name, cmd in COMMANDS.items():
        assert any(line.split() == [name, *cmd.help.split()] for line in r.stdout.splitlines()), (name, r.stdout)
