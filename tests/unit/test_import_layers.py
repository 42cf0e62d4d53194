"""The package's import graph follows its layers (docs/design.md, "Layers"): no module imports one of a
higher layer, and the package ``__init__`` is imported by no module of the package (only users, the
tests and the entry points load it). Imports under ``if TYPE_CHECKING:`` are annotations only and do
not count. The graph is read from the source (``ast``), so the test needs no import side effects."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "hdkd_fast"

LAYERS: tuple[tuple[str, ...], ...] = (
    ("_version", "_types", "_validation", "_pairs", "_distributed", "_atomic", "_ext_spec", "_ext_loader", "kernels"),
    ("backends", "models", "data"),
    ("_autograd", "inference"),
    ("functional", "modules", "fused_linear", "reference", "evaluation"),
    ("bilevel", "distill", "lm"),
    ("training", "info", "bench", "build", "cli", "__main__"),
)
"""Lowest first; a module is placed by its first name below ``hdkd_fast`` (``models.base`` → ``models``)."""


def layer_of(module: str) -> int:
    top = module.split(".")[1]
    for rank, names in enumerate(LAYERS):
        if top in names:
            return rank
    raise AssertionError(f"{module} is in no layer: add it to LAYERS and to docs/design.md")


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _type_checking_only(node: ast.AST) -> bool:
    test = node.test if isinstance(node, ast.If) else None
    return isinstance(test, ast.Name) and test.id == "TYPE_CHECKING"


def imports(path: Path) -> set[str]:
    """The ``hdkd_fast`` modules ``path`` imports at run time (``from . import x`` counts as ``pkg.x``)."""
    name = module_name(path)
    package = package_of(path)
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if _type_checking_only(node):
            return
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.split(".")[0] == "hdkd_fast")
        elif isinstance(node, ast.ImportFrom):
            base = imported_from(node, package)
            if base.split(".")[0] != "hdkd_fast":
                return
            submodules = [f"{base}.{a.name}" for a in node.names if _is_module(f"{base}.{a.name}")]
            found.update(submodules or [base])
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text()))
    found.discard(name)
    return found


def package_of(path: Path) -> str:
    """The package that ``path``'s relative imports start from."""
    name = module_name(path)
    return name if path.name == "__init__.py" else name.rsplit(".", 1)[0]


def imported_from(node: ast.ImportFrom, package: str) -> str:
    """The absolute name of the module of ``from ... import`` in ``package``."""
    if not node.level:
        return node.module or ""
    parts = package.split(".")
    return ".".join(parts[: len(parts) - node.level + 1] + ([node.module] if node.module else []))


def _is_module(name: str) -> bool:
    path = PACKAGE.parent.joinpath(*name.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


MODULES = sorted(PACKAGE.rglob("*.py"))


@pytest.mark.parametrize("path", MODULES, ids=[module_name(p) for p in MODULES])
def test_imports_go_down_the_layers(path: Path) -> None:
    name = module_name(path)
    if name == "hdkd_fast":
        return  # the package __init__ is the public face: it may import any layer
    for target in imports(path):
        assert target != "hdkd_fast", f"{name} imports the package __init__"
        assert layer_of(target) <= layer_of(name), (
            f"{name} (layer {layer_of(name)}) imports {target} (layer {layer_of(target)}), a higher layer"
        )


def test_the_parser_sees_relative_imports() -> None:
    """The checker itself can fail: it finds known edges of both import forms."""
    assert "hdkd_fast.training.distributed" in imports(PACKAGE / "training" / "loop.py")  # from . import x
    assert "hdkd_fast.models.base" in imports(PACKAGE / "distill" / "equilibrium.py")  # from ..models.base import
    assert "hdkd_fast.training.config" not in imports(PACKAGE / "training" / "methods.py")  # TYPE_CHECKING only


def _private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def private_imports(path: Path, source: str | None = None) -> list[str]:
    """The underscore-prefixed names that ``path`` (or ``source`` read as ``path``) takes from another
    ``hdkd_fast`` module: ``from .x import _name``, and ``x._name`` on a module ``x`` it imported. Private
    modules (``_validation``) and dunders (``__version__``) are fine; a private name stays in its module,
    and a helper others need is public in the module that owns it."""
    tree = ast.parse(path.read_text() if source is None else source)
    package = package_of(path)
    found: list[str] = []
    aliases: set[str] = set()  # local names bound to hdkd_fast modules
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            aliases.update(a.asname or a.name.split(".")[0] for a in node.names if a.name.split(".")[0] == "hdkd_fast")
        elif isinstance(node, ast.ImportFrom):
            base = imported_from(node, package)
            if base.split(".")[0] != "hdkd_fast":
                continue
            for a in node.names:
                if _is_module(f"{base}.{a.name}") or a.name == "_C":  # a module (the compiled one has no .py)
                    aliases.add(a.asname or a.name)
                elif _private(a.name):
                    found.append(f"line {node.lineno}: from {base} import {a.name}")
    for node in ast.walk(tree):
        if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases
                and _private(node.attr)):
            found.append(f"line {node.lineno}: {node.value.id}.{node.attr}")
    return found


@pytest.mark.parametrize("path", MODULES, ids=[module_name(p) for p in MODULES])
def test_no_private_name_crosses_modules(path: Path) -> None:
    assert not private_imports(path), (
        f"{module_name(path)} uses private names of other modules: {private_imports(path)}; make the helper "
        "public (no underscore) in the module that owns it, or move it where it belongs"
    )


def test_the_private_name_checker_can_fail() -> None:
    path = PACKAGE / "training" / "report.py"
    assert private_imports(path, "from ..evaluation.plots import _figure, save_figure\n") == [
        "line 1: from hdkd_fast.evaluation.plots import _figure"]
    assert private_imports(path, "from .. import functional as F\nF._spec\nF.op_spec\n") == ["line 2: F._spec"]
    assert private_imports(path, "from .. import _validation\nfrom .._version import __version__\n") == []
