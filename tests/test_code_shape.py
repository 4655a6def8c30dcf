"""The shape of the code (DESIGN.md): imports only point down, no function over 80 lines.

The import graph counts every import statement at any depth (module level and inside
functions); imports under ``if TYPE_CHECKING:`` are type-only and left out.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = "davae_cli"
ROOT = Path(__file__).resolve().parents[1] / PACKAGE
MAX_FUNCTION_LINES = 80
MAX_FILE_LINES = 600  # ../shared/DESIGN.md: no function over 80 lines; no file over 600
JOBS = ("generate", "upscale", "synth")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _import_nodes(node: ast.AST):
    """Every Import / ImportFrom below ``node``, skipping ``if TYPE_CHECKING:`` bodies."""
    for child in ast.iter_child_nodes(node):
        if isinstance(child, (ast.Import, ast.ImportFrom)):
            yield child
        elif isinstance(child, ast.If) and _is_type_checking(child):
            for sub in child.orelse:
                yield from _import_nodes(ast.Module(body=[sub], type_ignores=[]))
        else:
            yield from _import_nodes(child)


def _resolve(name: str, modules: dict[str, Path]) -> str | None:
    """The innermost package module that ``name`` names (a.b.func -> a.b)."""
    while name:
        if name in modules:
            return name
        name = name.rpartition(".")[0]
    return None


def _targets(node: ast.AST, module: str, is_package: bool, modules) -> set[str]:
    found: set[str] = set()
    if isinstance(node, ast.Import):
        for alias in node.names:
            found.add(_resolve(alias.name, modules))
    else:
        if node.level:
            base = module.split(".") if is_package else module.split(".")[:-1]
            base = base[: len(base) - (node.level - 1)]
            prefix = ".".join(base + ([node.module] if node.module else []))
        else:
            prefix = node.module or ""
        for alias in node.names:
            found.add(_resolve(f"{prefix}.{alias.name}", modules))
    return {t for t in found if t and t != module}


def import_graph() -> dict[str, set[str]]:
    modules = _modules()
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        is_package = path.name == "__init__.py"
        edges: set[str] = set()
        for node in _import_nodes(tree):
            edges |= _targets(node, name, is_package, modules)
        graph[name] = edges
    return graph


def _is_package_reexport(src: str, dst: str) -> bool:
    """A package's ``__init__`` importing its own submodules is how a package exports, not a layering arrow."""
    return dst.startswith(src + ".")


def layer_graph(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    """The graph between layers: each subpackage (``davae_cli.vae``, ``davae_cli.dit``, ...) is one node, each
    top-level module its own. A module that imports nothing of the package (an import-free table such as
    ``dit/registry.py``, read by the preset loader) stays its own node: it cannot point up."""
    leaves = {m for m, deps in graph.items() if not deps}

    def layer(module: str) -> str:
        return module if module in leaves else ".".join(module.split(".")[:2])

    layers: dict[str, set[str]] = {}
    for src, deps in graph.items():
        for dst in deps:
            if layer(src) != layer(dst) and not _is_package_reexport(src, dst):
                layers.setdefault(layer(src), set()).add(layer(dst))
    return layers


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    colour: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        colour[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if _is_package_reexport(node, nxt):
                continue
            if colour.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in colour:
                cycle = visit(nxt)
                if cycle:
                    return cycle
        stack.pop()
        colour[node] = 2
        return None

    for start in sorted(graph):
        if start not in colour:
            cycle = visit(start)
            if cycle:
                return cycle
    return None


def test_import_graph_has_no_cycle():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle between modules: " + " -> ".join(cycle)


def test_layers_only_point_down():
    """Between subpackages and top-level modules a circle is an arrow back up (a converter importing a trainer,
    the config importing a backend, vae and metrics importing each other)."""
    graph = import_graph()
    cycle = find_cycle(layer_graph(graph))
    if cycle:
        steps = list(zip(cycle, cycle[1:]))
        imports = [f"  {s} -> {d}" for s, deps in sorted(graph.items()) for d in sorted(deps)
                   if any(s.startswith(a) and d.startswith(b) for a, b in steps) and not _is_package_reexport(s, d)]
        raise AssertionError("layers import each other: " + " -> ".join(cycle) + "\n" + "\n".join(imports))


def test_no_job_imports_another():
    graph = import_graph()
    jobs = {f"{PACKAGE}.{j}" for j in JOBS}
    crossings = [(a, b) for a in jobs for b in graph[a] if b in jobs]
    assert not crossings, f"one job imports another: {crossings}"


def test_find_cycle_reports_a_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert find_cycle(graph) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_function_over_80_lines():
    offenders = []
    for path in sorted(ROOT.rglob("*.py")):
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                first = min([node.lineno] + [d.lineno for d in node.decorator_list])
                length = node.end_lineno - first + 1
                if length > MAX_FUNCTION_LINES:
                    rel = path.relative_to(ROOT.parent)
                    offenders.append(f"{rel}:{node.lineno} {node.name} ({length} lines)")
    assert not offenders, "functions over 80 lines:\n" + "\n".join(offenders)


def test_no_file_over_600_lines():
    long = [f"{p.relative_to(ROOT.parent)} ({n} lines)" for p in sorted(ROOT.rglob("*.py"))
            if (n := len(p.read_text().splitlines())) > MAX_FILE_LINES]
    assert not long, "files over 600 lines:\n" + "\n".join(long)
