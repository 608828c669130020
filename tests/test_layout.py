"""The import graph is a tree you can read from the file list (DESIGN.md, STYLE.md habit 13).

Layers, top to bottom: the CLI (`host.cli`), the embedded dev fleet (`host.fleet`), the
host, `shard_migrations`, the plugins (which see only the plugin API), and `router`, the
shared base. Every import, including function-local and type-only ones, points down or
stays inside its own layer; no module is loaded by a name string; no two modules import
each other, directly or round a circle.

`loadtests/` stands apart (DESIGN.md): Locust patches its process with gevent at import, so
it imports no module of ours (it reaches the fleet over HTTP and runs the CLI), none of ours
imports it or Locust, and inside it only the modules Locust loads (`users`, `locustfile`)
import Locust or gevent.
"""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("router", "plugins", "shard_migrations", "host")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")}


def _ours(name: str) -> bool:
    return name.split(".")[0] in PACKAGES


def _imports(path: Path, modules: dict[str, Path]) -> set[str]:
    """Every module of ours that ``path`` imports, anywhere in the file."""
    tree = ast.parse(path.read_text(), str(path))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if _ours(a.name))
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0 and _ours(node.module):
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                found.add(sub if sub in modules else node.module)
    return found


def _layer(name: str) -> float:
    """Higher layers may import lower ones, never the reverse."""
    if name == "host.cli" or name.startswith("host.cli.") or name.endswith("__main__"):
        return 5
    if name == "host.fleet" or name.startswith("host.fleet."):
        return 4
    if name.startswith("host"):
        return 3
    if name.startswith("shard_migrations"):
        return 2
    if name == "plugins.api" or name == "plugins":
        return 1
    if name.startswith("plugins."):
        return 1.5  # a shipped plugin: only the plugin API (checked below)
    return 0  # router


def test_every_import_points_down() -> None:
    modules = _modules()
    wrong = []
    for name, path in modules.items():
        for target in _imports(path, modules):
            if _layer(target) > _layer(name):
                wrong.append(f"{name} imports {target}, a layer above it")
    assert wrong == []


def test_plugins_import_only_the_plugin_api() -> None:
    modules = _modules()
    wrong = []
    for name, path in modules.items():
        if not name.startswith("plugins.") or name == "plugins.api":
            continue
        own = ".".join(name.split(".")[:2])
        for target in _imports(path, modules):
            if target != "plugins.api" and not (target == own or target.startswith(own + ".")):
                wrong.append(f"{name} imports {target}")
    assert wrong == []


def test_no_module_of_ours_is_imported_by_a_name_string() -> None:
    wrong = []
    for name, path in _modules().items():
        for node in ast.walk(ast.parse(path.read_text())):
            if (isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant)
                    and isinstance(node.args[0].value, str) and _ours(node.args[0].value)
                    and isinstance(node.func, (ast.Attribute, ast.Name))
                    and (getattr(node.func, "attr", None) or getattr(node.func, "id", None)) in
                    ("import_module", "__import__")):
                wrong.append(f"{name} loads {node.args[0].value!r} by name")
    assert wrong == []


def test_no_import_circle() -> None:
    modules = _modules()
    graph = {name: _imports(path, modules) & modules.keys() for name, path in modules.items()}
    # Tarjan's strongly connected components: any component of more than one module is a circle.
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    circles: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                circles.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    assert circles == []


def test_the_checks_see_a_wrong_import(tmp_path: Path) -> None:
    """The graph reader finds function-local and type-only imports (so the checks above can fail)."""
    sample = tmp_path / "sample.py"
    sample.write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from host.runtime import HostRuntime\n"
                      "def f():\n    import shard_migrations.engine\n    from host import rbac\n")
    modules = _modules()
    assert _imports(sample, modules) == {"host.runtime", "shard_migrations.engine", "host.rbac"}
    assert _layer("router.errors") < _layer("plugins.api") < _layer("shard_migrations.engine") < _layer("host.tx") \
        < _layer("host.fleet.embedded") < _layer("host.cli.base")


LOADTESTS = ROOT / "loadtests"
GEVENT_BOUND = ("locust", "gevent", "geventhttpclient")
LOCUST_MODULES = {"loadtests.users", "loadtests.locustfile"}


def _top_level_imports(path: Path) -> set[str]:
    """Every module name ``path`` imports (absolute imports), anywhere in the file."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
    return found


def _loadtests_modules() -> dict[str, Path]:
    return {_module_name(p): p for p in LOADTESTS.rglob("*.py")}


def test_loadtests_import_no_module_of_ours() -> None:
    wrong = [f"{name} imports {target}" for name, path in _loadtests_modules().items()
             for target in _top_level_imports(path) if target.split(".")[0] in PACKAGES]
    assert wrong == []


def test_no_module_of_ours_imports_loadtests_or_locust() -> None:
    wrong = [f"{name} imports {target}" for name, path in _modules().items()
             for target in _top_level_imports(path) if target.split(".")[0] in ("loadtests", *GEVENT_BOUND)]
    assert wrong == []


def test_only_the_modules_locust_loads_import_locust_or_gevent() -> None:
    modules = _loadtests_modules()
    assert LOCUST_MODULES <= modules.keys()
    wrong = [f"{name} imports {target}" for name, path in modules.items() if name not in LOCUST_MODULES
             for target in _top_level_imports(path) if target.split(".")[0] in GEVENT_BOUND]
    assert wrong == []
    # and so importing the runner (what the CLI starts) loads neither, even indirectly
    plain = sorted(modules.keys() - LOCUST_MODULES - {"loadtests"})
    code = ("import sys\n" + "".join(f"import {m}\n" for m in plain) +
            f"print(sorted(m for m in sys.modules if m.split('.')[0] in {GEVENT_BOUND!r}))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


def test_the_loadtests_checks_see_a_wrong_import(tmp_path: Path) -> None:
    sample = tmp_path / "sample.py"
    sample.write_text("def f():\n    from host.runtime import HostRuntime\n    import gevent.monkey\n")
    assert _top_level_imports(sample) == {"host.runtime", "gevent.monkey"}
