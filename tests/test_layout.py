"""The package layout's rules (README, "Where things are"), read from the source with `ast`:

- no import cycle between nimbus modules (imports at module level, as Python runs them);
- a role's package (the doorman, the workers, the client, the web view and admin of ops/) is
  imported only by itself and by the entry modules that start it: no module reaches into a role
  for a helper;
- core/ is pure: no engine, role, broker client, gRPC library or event-loop bridge;
- no module of nimbus/ over 600 lines, no function over 80 (proto_gen/ is generated).
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

NIMBUS = Path(__file__).resolve().parent.parent / "nimbus"

ROLES = ("nimbus.doorman", "nimbus.workers", "nimbus.client", "nimbus.ops.web", "nimbus.ops.admin")
# The modules that start roles: `python -m nimbus` (all of them), and the documented commands.
ENTRY = {
    "nimbus.__main__",
    "nimbus.server",
    "nimbus.web",
    "nimbus.admin",
    "nimbus.token",
}
CORE_MAY_NOT = (
    "nimbus.engines",
    "nimbus.doorman",
    "nimbus.workers",
    "nimbus.client",
    "nimbus.ops",
    "kafka",
    "confluent_kafka",
    "redis",
    "grpclib",
    "trio_asyncio",
    "asyncio",
    "socket",
)
MAX_MODULE_LINES = 600
MAX_FUNCTION_LINES = 80


def _name(path: Path) -> str:
    parts = path.relative_to(NIMBUS.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_name(p): p for p in NIMBUS.rglob("*.py") if "proto_gen" not in p.parts}


def _within(name: str, package: str) -> bool:
    return name == package or name.startswith(package + ".")


def _is_type_checking(node: ast.If) -> bool:
    t = node.test
    return (isinstance(t, ast.Name) and t.id == "TYPE_CHECKING") or (
        isinstance(t, ast.Attribute) and t.attr == "TYPE_CHECKING"
    )


def _imports(
    module: str, path: Path, tree: ast.AST, *, top_only: bool
) -> Iterator[tuple[str, int]]:
    """(imported name, line): each module, and each `from m import n` as m and m.n. Skips what
    `if TYPE_CHECKING:` guards; with `top_only`, also what a function or class body imports."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]

    def walk(node: ast.AST) -> Iterator[tuple[str, int]]:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child):
                yield from (x for n in child.orelse for x in walk_one(n))
                continue
            yield from walk_one(child)

    def walk_one(node: ast.AST) -> Iterator[tuple[str, int]]:
        if isinstance(node, ast.Import):
            for a in node.names:
                yield a.name, node.lineno
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                parts = parts[: len(parts) - (node.level - 1)]
                base = ".".join([*parts, base] if base else parts)
            yield base, node.lineno
            for a in node.names:
                yield f"{base}.{a.name}", node.lineno
        elif top_only and isinstance(
            node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef | ast.Lambda
        ):
            return
        else:
            yield from walk(node)

    yield from walk(tree)


def _graph(top_only: bool) -> dict[str, dict[str, int]]:
    mods = _modules()
    graph: dict[str, dict[str, int]] = {}
    for name, path in mods.items():
        tree = ast.parse(path.read_text(), str(path))
        deps = {}
        for imported, line in _imports(name, path, tree, top_only=top_only):
            if imported in mods and imported != name:
                deps.setdefault(imported, line)
        graph[name] = deps
    return graph


def _cycles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

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
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_rules_see_the_whole_package() -> None:
    graph = _graph(top_only=False)
    # The reader must see real imports, or every rule below passes vacuously.
    assert len(graph) > 60
    assert "nimbus.core.lifecycle" in graph["nimbus.engines.redis_scripts"]
    assert "nimbus.doorman.server" in graph["nimbus.__main__"]


def test_no_import_cycle() -> None:
    assert _cycles(_graph(top_only=True)) == []


def test_the_cycle_finder_finds_a_cycle() -> None:
    assert _cycles({"a": {"b": 1}, "b": {"c": 1}, "c": {"a": 1}, "d": {"a": 1}}) == [
        ["a", "b", "c"]
    ]


def test_no_module_reaches_into_a_role_for_a_helper() -> None:
    wrong = []
    for module, deps in _graph(top_only=False).items():
        if module in ENTRY:
            continue
        for imported, line in deps.items():
            for role in ROLES:
                if _within(imported, role) and not _within(module, role):
                    wrong.append(f"{module}:{line} imports {imported}")
    assert not wrong, "\n".join(wrong)


def test_core_is_pure() -> None:
    wrong = []
    for name, path in _modules().items():
        if not _within(name, "nimbus.core"):
            continue
        tree = ast.parse(path.read_text(), str(path))
        for imported, line in _imports(name, path, tree, top_only=False):
            if any(_within(imported, banned) for banned in CORE_MAY_NOT):
                wrong.append(f"{name}:{line} imports {imported}")
    assert not wrong, "\n".join(wrong)


def test_no_module_or_function_is_too_long() -> None:
    wrong = []
    for name, path in _modules().items():
        text = path.read_text()
        lines = text.count("\n")
        if lines > MAX_MODULE_LINES:
            wrong.append(f"{name}: {lines} lines")
        for node in ast.walk(ast.parse(text, str(path))):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                size = (node.end_lineno or node.lineno) - node.lineno + 1
                if size > MAX_FUNCTION_LINES:
                    wrong.append(f"{name}:{node.lineno} {node.name}: {size} lines")
    assert not wrong, "\n".join(wrong)
