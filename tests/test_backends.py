"""The backend protocol: every registered family implements it, code outside `dit/` names no family, the
package has no import circle, and bench's shared-trunk view shares what it should and nothing else."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch
from torch import nn

from davae_cli.dit.backend import Backend, backend_class, shared_trunk_view
from davae_cli.dit.registry import REGISTRY, backend_names

PACKAGE = Path(__file__).resolve().parents[1] / "davae_cli"
FAMILY_MODULES = {v.split(":")[0] for v in REGISTRY.values()}  # davae_cli.dit.sd3, ...


def _modules():
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE.parent).with_suffix("")
        name = ".".join(rel.parts).removesuffix(".__init__")
        yield name, path, ast.parse(path.read_text())


def _imports(name: str, tree: ast.AST, top_level_only: bool) -> set[str]:
    """Modules of the package that `name` imports (relative imports resolved)."""
    out = set()
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    pkg = name.split(".") if name.endswith("__init__") else name.split(".")[:-1]
    for node in nodes:
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = pkg[: len(pkg) - node.level + 1] if node.level > 1 else pkg
                base = ".".join(parent + ([base] if base else []))
            if base.startswith("davae_cli"):
                out.add(base)
                out.update(f"{base}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.startswith("davae_cli"))
    return out


def test_no_family_is_named_outside_dit():
    """Outside davae_cli/dit/ no code imports a family module or holds a family's registry name as a value
    (docstrings, comments and help text may mention families as examples)."""
    names = set(backend_names())
    offenders = []
    for name, path, tree in _modules():
        if name.startswith("davae_cli.dit"):
            continue
        hits = _imports(name, tree, top_level_only=False) & FAMILY_MODULES
        docs = {id(n.body[0].value) for n in ast.walk(tree) if isinstance(n, (ast.Module, ast.FunctionDef, ast.ClassDef))
                and n.body and isinstance(n.body[0], ast.Expr)}
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and node.value in names and id(node) not in docs:
                hits.add(f"{node.value!r} at line {node.lineno}")
        offenders += [f"{path.relative_to(PACKAGE)}: {h}" for h in sorted(hits)]
    assert not offenders, offenders


def test_no_import_circle():
    """The module-level import graph of the package is acyclic (imports inside functions are deferred and
    do not run at import time)."""
    graph = {name: {m for m in _imports(name, tree, top_level_only=True)} for name, _, tree in _modules()}
    graph = {k: {m for m in v if m in graph and m != k} for k, v in graph.items()}
    state: dict[str, int] = {}

    def visit(n, stack):
        state[n] = 1
        for m in graph[n]:
            if state.get(m) == 1:
                raise AssertionError(" -> ".join(stack[stack.index(m):] + [m]))
            if m not in state:
                visit(m, stack + [m])
        state[n] = 2

    for n in graph:
        if n not in state:
            visit(n, [n])


@pytest.mark.parametrize("name", backend_names())
def test_every_family_implements_the_protocol(name):
    """A registered family overrides what has no generic default, names itself as registered, and says how
    it is conditioned; its presets load."""
    from davae_cli.config import available_presets, load_preset

    cls = backend_class(name)
    assert issubclass(cls, Backend) and cls.name == name and cls.label and cls.conditioning in ("prompt", "class")
    for method in ("model_class", "load", "extend", "velocity", "flops", "native_model", "random_condition"):
        assert getattr(cls, method) is not getattr(Backend, method), f"{name} does not implement {method}"
    if cls.conditioning == "prompt":
        for method in ("prompt_encoder", "random_prompt_encoder", "heads"):
            assert getattr(cls, method) is not getattr(Backend, method), f"{name} does not implement {method}"
    presets = [p for p in available_presets() if load_preset(p).dit.backend == name]
    assert presets, f"no bundled preset uses {name}"


def test_shared_trunk_view_shares_the_trunk_and_leaves_the_model_alone():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Sequential(nn.ReLU(), nn.Linear(8, 3)))
    model.out_channels = 3
    head = nn.Linear(8, 5)
    view = shared_trunk_view(model, {"1.1": head}, {"out_channels": 5})
    x = torch.randn(2, 4)
    assert view(x).shape == (2, 5) and model(x).shape == (2, 3)  # the model keeps its own head
    assert view[0] is model[0] and view[1][0] is model[1][0] and view[1][1] is head
    assert model.out_channels == 3 and view.out_channels == 5
    with torch.no_grad():
        model[0].weight.add_(1.0)  # a trunk update is seen by both
    torch.testing.assert_close(view(x), head(torch.relu(model[0](x))))
    with pytest.raises(Exception, match="no submodule"):
        shared_trunk_view(model, {"1.7": head})
