"""The floor plan, enforced: arrows point one way (entry -> evaluation -> trainer ->
services.common) and no two modules import each other, directly or around a loop.

Read from the source with `ast`, so it needs nothing installed and sees lazy imports inside
functions too (a lazy import is still a dependency; it only hides a cycle from Python).
Imports under ``if TYPE_CHECKING:`` are annotations, not dependencies, and are skipped.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("services", "trainer", "evaluation", "crs_rlhf")

# Lower rank = lower layer. A module may import its own group, or a group of lower rank
# that it is allowed to see (ALLOWED); nothing may import upwards.
LAYERS: dict[str, int] = {
    "services": 0,  # the namespace package itself
    "services.common": 0,
    "services.reward": 1,
    "services.policy_gen": 1,
    "services.reward_pref": 2,
    "services.reward_abs": 2,
    "services.reward_shared": 2,
    "trainer": 3,
    "evaluation": 4,
    "crs_rlhf": 5,
}
# The trainer and the evaluation talk to services over HTTP; of the services' code they may
# use only the torch-free shared contracts in services.common.
ALLOWED_BELOW: dict[str, tuple[str, ...]] = {
    "services": (),
    "services.common": (),
    "services.reward": ("services.common",),
    "services.policy_gen": ("services.common",),
    "services.reward_pref": ("services.common", "services.reward"),
    "services.reward_abs": ("services.common", "services.reward"),
    "services.reward_shared": ("services.common", "services.reward"),
    "trainer": ("services.common",),
    "evaluation": ("services.common", "trainer"),
    "crs_rlhf": tuple(group for group in LAYERS if group != "crs_rlhf"),
}


def group_of(module: str) -> str | None:
    best = None
    for group in LAYERS:
        if module == group or module.startswith(group + "."):
            if best is None or len(group) > len(best):
                best = group
    return best


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(path: Path, module: str) -> set[str]:
    """Absolute names of the project modules that `module` imports (lazy ones included)."""
    is_package = path.name == "__init__.py"
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".") if is_package else module.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            found.add(target)
            # `from pkg import sub` may name a submodule: count it as importing that module.
            found.update(f"{target}.{alias.name}" for alias in node.names)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text(encoding="utf-8"), filename=str(path)))
    return {name for name in found if name.split(".")[0] in PACKAGES}


def build_graph() -> dict[str, set[str]]:
    files = {_module_name(p): p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for module, path in files.items():
        # Keep only names that are modules of ours (drop `from pkg import function`).
        graph[module] = {name for name in _imports(path, module) if name in files and name != module}
    return graph


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    bad = []
    for source, targets in graph.items():
        src_group = group_of(source)
        for target in targets:
            dst_group = group_of(target)
            if dst_group == src_group:
                continue
            if dst_group not in ALLOWED_BELOW[src_group]:
                bad.append(f"{source} -> {target}  ({src_group} may not import {dst_group})")
    return sorted(bad)


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), each sorted.

    A package's ``__init__`` that re-exports its submodules, and a submodule importing a
    sibling through the package (``from pkg import x``), is not a cycle of design: edges from
    a submodule to its own package's ``__init__`` are ignored.
    """
    def edges(node: str) -> list[str]:
        return [t for t in graph.get(node, ()) if not node.startswith(t + ".")]

    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = 0

    def strongconnect(node: str) -> None:
        nonlocal counter
        index[node] = low[node] = counter
        counter += 1
        stack.append(node)
        on_stack.add(node)
        for nxt in edges(node):
            if nxt not in index:
                strongconnect(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            strongconnect(node)
    return sorted(found)


def test_every_module_belongs_to_a_layer():
    graph = build_graph()
    assert graph, "no modules found: is ROOT right?"
    assert [m for m in graph if group_of(m) is None] == []


def test_no_upward_imports():
    assert upward_imports(build_graph()) == []


def test_no_import_cycles():
    assert cycles(build_graph()) == []


@pytest.mark.parametrize(
    ("graph", "expect_up", "expect_cycles"),
    [
        ({"trainer.a": {"crs_rlhf.cli"}, "crs_rlhf.cli": set()}, 1, 0),
        ({"trainer.a": {"services.reward.engine"}, "services.reward.engine": set()}, 1, 0),
        ({"evaluation.x": {"trainer.a"}, "trainer.a": {"services.common.chat"}, "services.common.chat": set()}, 0, 0),
        ({"trainer.a": {"trainer.b"}, "trainer.b": {"trainer.c"}, "trainer.c": {"trainer.a"}}, 0, 1),
        ({"trainer.data": {"trainer.data.oasst"}, "trainer.data.oasst": {"trainer.data"}}, 0, 0),
    ],
)
def test_the_checks_catch_what_they_claim(graph, expect_up, expect_cycles):
    assert len(upward_imports(graph)) == expect_up
    assert len(cycles(graph)) == expect_cycles
