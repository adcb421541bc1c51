"""The house rules of the tree (ARCHITECTURE.md), checked on the code itself.

Each rule keeps the layout explaining the system: imports flow one way (cli → api → domain →
redis/storage/upstream), no module or function grows past what a reader holds in their head, every
Redis key is built in one module and every Lua script lives in its own file.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("service", "workers")
MAX_MODULE_LINES = 600
MAX_FUNCTION_LINES = 80
KEY_MODULE = "service.redis.keys"


def modules() -> dict[str, Path]:
    found: dict[str, Path] = {}
    for package in PACKAGES:
        for path in sorted((REPO / package).rglob("*.py")):
            parts = list(path.relative_to(REPO).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join(parts)] = path
    return found


MODULES = modules()


def imports_of(name: str, path: Path) -> Iterator[tuple[str, int]]:
    """Every project module ``name`` imports (module level or inside functions), with its line."""
    tree = ast.parse(path.read_text())
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield from _project(alias.name, node.lineno)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            for alias in node.names:
                # `from service.lanes import batch` imports the module service.lanes.batch.
                if f"{base}.{alias.name}" in MODULES:
                    yield f"{base}.{alias.name}", node.lineno
                else:
                    yield from _project(base, node.lineno)


def _project(module: str, line: int) -> Iterator[tuple[str, int]]:
    while module and module not in MODULES:
        module = module.rpartition(".")[0]
    if module:
        yield module, line


GRAPH = {
    name: {dep for dep, _ in imports_of(name, path)} - {name} for name, path in MODULES.items()
}


def test_no_import_cycles() -> None:
    # Tarjan's strongly connected components: any component of more than one module is a cycle.
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for dep in GRAPH[node]:
            if dep not in index:
                visit(dep)
                low[node] = min(low[node], low[dep])
            elif dep in on_stack:
                low[node] = min(low[node], index[dep])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for name in GRAPH:
        if name not in index:
            visit(name)
    assert not cycles, f"import cycles: {cycles}"


def _layer(module: str) -> str:
    if module.startswith("workers"):
        return "workers"
    for layer in ("service.cli", "service.api", "service.console"):
        if module == layer or module.startswith(layer + "."):
            return layer
    return "domain"


def test_imports_follow_the_flow() -> None:
    """The CLI starts everything; the API and the domain never import workers; the domain never
    imports the API or the console; workers never import the API or the CLI."""
    allowed = {
        "service.cli": {"service.cli", "service.api", "domain", "workers"},
        # The API process mounts the console; the console calls the domain, never the API.
        "service.api": {"service.api", "service.console", "domain"},
        "service.console": {"service.console", "domain"},
        "domain": {"domain"},
        "workers": {"workers", "domain"},
    }
    wrong = [
        f"{name} imports {dep}"
        for name, deps in GRAPH.items()
        for dep in deps
        if _layer(dep) not in allowed[_layer(name)]
    ]
    assert not wrong, wrong


@pytest.mark.parametrize("name", sorted(MODULES))
def test_module_and_functions_are_small(name: str) -> None:
    path = MODULES[name]
    text = path.read_text()
    assert text.count("\n") <= MAX_MODULE_LINES, f"{name} has {text.count(chr(10))} lines"
    long = [
        f"{node.name} ({node.end_lineno - node.lineno + 1} lines, line {node.lineno})"
        for node in ast.walk(ast.parse(text))
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
        and node.end_lineno is not None
        and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES
    ]
    assert not long, f"{name}: functions over {MAX_FUNCTION_LINES} lines: {long}"


def test_lua_lives_in_lua_files() -> None:
    offenders = [
        str(path.relative_to(REPO))
        for root in (*PACKAGES, "simulator", "tests", "bench")
        for path in (REPO / root).rglob("*.py")
        if "redis.call(" in path.read_text() and path != Path(__file__).resolve()
    ]
    assert not offenders, offenders


# A Redis key as code writes one: "ib:..." or f"{PREFIX}:..." in a string.
_KEY_LITERAL = re.compile(r"""["'](ib:|\{PREFIX\}:|\{_PREFIX\}:|\{keys\.)""")


def test_redis_keys_are_built_in_one_module() -> None:
    offenders = [
        f"{name}:{lineno}"
        for name, path in MODULES.items()
        if name != KEY_MODULE
        for lineno, line in enumerate(path.read_text().splitlines(), 1)
        if _KEY_LITERAL.search(line.replace('f"', '"').replace("f'", "'"))
    ]
    assert not offenders, f"Redis keys built outside {KEY_MODULE}: {offenders}"


def test_create_app_only_assembles() -> None:
    tree = ast.parse((REPO / "service" / "api" / "app.py").read_text())
    (create_app,) = [
        n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) and n.name == "create_app"
    ]
    assert create_app.end_lineno is not None
    assert create_app.end_lineno - create_app.lineno + 1 < 80
