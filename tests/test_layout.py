"""Layout rules of the package (issue 13): no module over 600 lines and no function over 100
lines in scoresde/, so that every fact has one small home."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "scoresde"


def _modules() -> list[Path]:
    return [p for p in sorted(ROOT.rglob("*.py")) if p.is_file()]


def test_no_module_over_600_lines() -> None:
    long = {
        str(p.relative_to(ROOT)): n
        for p in _modules()
        if (n := len(p.read_text().splitlines())) > 600
    }
    assert long == {}


def test_no_function_over_100_lines() -> None:
    long = {}
    for path in _modules():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > 100:
                    long[f"{path.relative_to(ROOT)}:{node.name}"] = n
    assert long == {}
