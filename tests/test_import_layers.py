"""The package's import graph follows its layers (docs/design.md, "Layers"): no module imports one of a
higher layer, and the package ``__init__`` is imported by no module of the package (only users, the
tests and the entry points load it). Imports under ``if TYPE_CHECKING:`` are annotations only and do
not count. The graph is read from the source (``ast``), so the test needs no import side effects."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "hdkd_fast"

LAYERS: tuple[tuple[str, ...], ...] = (
    ("_version", "_types", "_validation", "_pairs", "_distributed", "_ext_spec", "_ext_loader"),
    ("backends", "models", "data"),
    ("_autograd", "inference"),
    ("functional", "modules", "fused_linear", "reference", "evaluation"),
    ("bilevel", "distill"),
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
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if _type_checking_only(node):
            return
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.split(".")[0] == "hdkd_fast")
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            if base.split(".")[0] != "hdkd_fast":
                return
            submodules = [f"{base}.{a.name}" for a in node.names if _is_module(f"{base}.{a.name}")]
            found.update(submodules or [base])
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text()))
    found.discard(name)
    return found


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
