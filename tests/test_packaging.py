"""The installed package holds every subpackage of the source tree (a wheel ships only those pyproject.toml lists)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.skipif(sys.version_info < (3, 11), reason="tomllib is in the standard library from Python 3.11")
def test_every_subpackage_is_listed_in_pyproject() -> None:
    import tomllib

    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    folders = {"jlcm_onnx": ROOT / "jlcm_onnx",
               **{name: ROOT / path for name, path in setuptools["package-dir"].items()}}
    found = {name for name, folder in folders.items() if (folder / "__init__.py").exists()}
    found |= {".".join(("jlcm_onnx", *init.parent.relative_to(ROOT / "jlcm_onnx").parts))
              for init in (ROOT / "jlcm_onnx").rglob("__init__.py")}
    assert found == set(setuptools["packages"])
