"""The layers import downwards only: ``sharding/`` never imports ``pipeline``, and
``plans/`` (the types both share) imports neither, in code or in doctest examples."""

from __future__ import annotations

import ast
import doctest
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FORBIDDEN = {"sharding": {"pipeline"}, "plans": {"pipeline", "sharding"}}


def imported_packages(tree: ast.AST) -> set[str]:
    """Top-level package of every import in ``tree``, at any nesting (functions,
    ``TYPE_CHECKING`` blocks); relative imports stay inside their own package."""
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
    return found


def doctest_packages(tree: ast.AST, path: Path) -> set[str]:
    """Packages the doctest examples of every docstring in ``tree`` import."""
    parser, found = doctest.DocTestParser(), set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node, clean=False)
            for example in parser.get_examples(doc or "", str(path)):
                try:
                    found |= imported_packages(ast.parse(example.source))
                except SyntaxError:
                    continue
    return found


def violations(package: str) -> list[str]:
    bad = []
    for path in sorted((ROOT / package).rglob("*.py")):
        tree = ast.parse(path.read_text(), str(path))
        for name in sorted((imported_packages(tree) | doctest_packages(tree, path)) & FORBIDDEN[package]):
            bad.append(f"{path.relative_to(ROOT)} imports {name}")
    return bad


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_lower_layers_never_import_upper_ones(package):
    assert list((ROOT / package).rglob("*.py")), f"no modules under {package}/"
    assert violations(package) == []


def test_the_check_sees_nested_and_doctest_imports(tmp_path):
    source = '''"""
    >>> from pipeline.data import synth
"""
import typing

if typing.TYPE_CHECKING:
    from sharding.repack import KeyRewriter


def f():
    import pipeline.prune.plan as plan
'''
    tree = ast.parse(source)
    assert imported_packages(tree) == {"typing", "sharding", "pipeline"}
    assert doctest_packages(tree, tmp_path / "m.py") == {"pipeline"}

