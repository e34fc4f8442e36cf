"""The house rules that keep the code changeable, checked on the source itself.

- the layers of `.importlinter` hold (lint-imports, also run by `make test`);
- no code outside `slm.model` imports a private name of it or reads its private attributes;
- the transformer's forward is written once: outside the reference model and the accelerators
  beside it, nothing rotates queries and keys, calls attention, or runs the blocks itself.
"""

from __future__ import annotations

import ast
import os
import pathlib
import re
import shutil
import subprocess
import sys

import pytest

SRC = pathlib.Path(__file__).resolve().parents[2] / "src" / "slm"


def _sources(exclude: tuple[str, ...] = ()):
    for path in sorted(SRC.rglob("*.py")):
        rel = path.relative_to(SRC).as_posix()
        if not rel.startswith(exclude):
            yield rel, path.read_text()


def _module(rel: str) -> list[str]:
    parts = ["slm", *rel[:-3].split("/")]
    return parts[:-1] if parts[-1] == "__init__" else parts


def _absolute(node: ast.ImportFrom, rel: str) -> str:
    if not node.level:
        return node.module or ""
    package = _module(rel) if rel.endswith("__init__.py") else _module(rel)[:-1]
    base = package[:len(package) - node.level + 1]
    return ".".join(base + ([node.module] if node.module else []))


def test_import_layers():
    exe = shutil.which("lint-imports", path=os.path.dirname(sys.executable))
    if exe is None:
        if os.environ.get("CI"):
            pytest.fail("lint-imports is not installed (pip install import-linter)")
        pytest.skip("lint-imports is not installed")
    root = SRC.parents[1]
    r = subprocess.run([exe, "--config", str(root / ".importlinter")], cwd=root, capture_output=True, text=True,
                       env={**os.environ, "PYTHONPATH": str(root / "src")})
    assert r.returncode == 0, r.stdout[-4000:]


def _model_private_attributes() -> set[str]:
    """The private names slm.model's classes give their instances or themselves (self._x = ...,
    def _x, and class-level _x)."""
    names = set()
    for path in sorted((SRC / "model").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store) and node.attr.startswith("_") \
                    and isinstance(node.value, ast.Name) and node.value.id == "self":
                names.add(node.attr)
            elif isinstance(node, ast.ClassDef):
                for item in node.body:
                    if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef)) and item.name.startswith("_") \
                            and not item.name.startswith("__"):
                        names.add(item.name)
    return names


def test_no_private_model_names_outside_model():
    found = []
    for rel, text in _sources(exclude=("model/",)):
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.ImportFrom):
                mod = _absolute(node, rel)
                if mod == "slm.model" or mod.startswith("slm.model."):
                    found += [f"{rel}:{node.lineno} imports {mod}.{a.name}" for a in node.names
                              if a.name.startswith("_")]
        # private attributes that slm.model's classes define, e.g. model._layer_rope
        found += [f"{rel}: reads {m.group(0)}" for m in re.finditer(r"\.(_[a-z]\w*)\b", text)
                  if m.group(1) in _model_private_attributes()]
    assert not found, "\n".join(found)


def test_forward_written_once():
    """Rotation, attention and running the blocks live in slm.model (and, as accelerators held equal
    to it by tests, in slm.accel and slm.kernels); everything else calls the model's public API."""
    pattern = re.compile(r"\b(apply_rope|scaled_dot_product_attention)\(|\bblock\(|\bblocks\[[^\]]+\]\(")
    found = [f"{rel}:{text[:m.start()].count(chr(10)) + 1}: {m.group(0)}"
             for rel, text in _sources(exclude=("model/", "accel/", "kernels/"))
             for m in pattern.finditer(text)]
    assert not found, "\n".join(found)
