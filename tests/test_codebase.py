"""Codebase rules from STYLE.md and docs/architecture.md that a test can hold: module size cap, no
grab-bag modules, and imports that only point down the layer order."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src" / "memfit"
MAX_LINES = 600


def test_no_module_exceeds_the_line_cap():
    too_long = {p.name: n for p in SRC.rglob("*.py") if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not too_long, f"split these modules by concept: {too_long}"


def test_no_grab_bag_modules():
    banned = {"utils.py", "helpers.py", "common.py"}
    assert not [p for p in SRC.rglob("*.py") if p.name in banned]


# -- layering ------------------------------------------------------------------------------------


def layer_order() -> list[str]:
    """The layers recorded in docs/architecture.md, bottom first."""
    text = (ROOT / "docs" / "architecture.md").read_text()
    block = re.search(r"<!-- layers:[^>]*-->\s*```text\n(.*?)```", text, re.S)
    assert block, "docs/architecture.md lost its layer list"
    names = [line.split()[0] for line in block.group(1).splitlines() if line.strip()]
    return names[::-1]


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def imports_of(source: str, module: str, is_package: bool = False) -> list[tuple[str, int]]:
    """``(imported memfit module, line)`` for every import in ``source``, at any depth (lazy
    imports inside functions too), except those under ``if TYPE_CHECKING:``."""
    package = module if is_package else module.rpartition(".")[0]
    found: list[tuple[str, int]] = []

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.extend((alias.name, node.lineno) for alias in node.names if alias.name.split(".")[0] == "memfit")
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] == "memfit":
                for alias in node.names:  # `from memfit import optim` imports memfit.optim
                    sub = f"{target}.{alias.name}"
                    is_module = (SRC.parent / Path(*sub.split("."))).with_suffix(".py").is_file() or (
                        SRC.parent / Path(*sub.split("."))
                    ).is_dir()
                    found.append((sub if is_module else target, node.lineno))
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(source))
    return found


def layer_of(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "memfit"


def upward_imports(sources: dict[str, tuple[str, bool]], order: list[str]) -> list[str]:
    """Every import in ``sources`` (module -> (text, is_package)) that points up ``order``
    (bottom first), and every module whose layer is not in it."""
    rank = {name: i for i, name in enumerate(order)}
    problems = []
    for module, (source, is_package) in sorted(sources.items()):
        here = layer_of(module)
        if here not in rank:
            problems.append(f"{module}: layer {here!r} is not in docs/architecture.md's layer list")
            continue
        for target, line in imports_of(source, module, is_package):
            there = layer_of(target)
            if there != here and rank.get(there, len(order)) > rank[here]:
                problems.append(f"{module}:{line} imports {target} ({there} is above {here})")
    return problems


def _sources() -> dict[str, tuple[str, bool]]:
    return {module_name(p): (p.read_text(), p.name == "__init__.py") for p in SRC.rglob("*.py")}


def test_every_import_points_down_the_recorded_layers():
    problems = upward_imports(_sources(), layer_order())
    assert not problems, "imports pointing up the layers of docs/architecture.md:\n" + "\n".join(problems)


def test_an_upward_import_is_caught_even_when_lazy():
    sources = _sources()
    models_meta, is_package = sources["memfit.models.meta"]
    lazy = models_meta + "\n\ndef _late():\n    from memfit.plan import Plan\n\n    return Plan\n"
    sources["memfit.models.meta"] = (lazy, is_package)
    problems = upward_imports(sources, layer_order())
    assert len(problems) == 1 and re.match(r"memfit\.models\.meta:\d+ imports memfit\.plan \(plan is above models\)",
                                           problems[0]), problems


def test_type_checking_imports_and_submodule_imports_are_read_as_they_mean():
    source = (
        "from typing import TYPE_CHECKING\n"
        "from memfit import optim\n"
        "if TYPE_CHECKING:\n"
        "    from memfit.plan import Plan\n"
    )
    assert imports_of(source, "memfit.strategies.training") == [("memfit.optim", 2)]


def test_every_layer_in_the_list_exists():
    present = {layer_of(module_name(p)) for p in SRC.rglob("*.py")}
    assert set(layer_order()) == present


@pytest.mark.xdist_group("codebase")
def test_xdist_groups_reach_one_worker(request):
    """`make test` runs `--dist loadgroup`: a group's tests must carry its name to the scheduler, or
    the module fixtures they share (the demo's pruned models, the planner's optimize run) are
    computed once on each worker."""
    if not getattr(request.config.option, "loadgroup", False):  # set on pytest-xdist workers
        pytest.skip("runs under pytest-xdist --dist loadgroup (make test)")
    assert request.node.nodeid.endswith("@codebase"), request.node.nodeid
