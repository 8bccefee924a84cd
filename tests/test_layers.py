"""The package's layers import one way: foundation <- ir <- encodings <- analysis <- passes <- pipeline <- front ends.

Every ``import`` in every module of the installed package is read (those inside functions too) and each import of a
``jlcm_onnx`` module must name one of the importing module's layer or of a layer below. Modules stay under 400 lines
and functions under 80.
"""

from __future__ import annotations

import ast
import pkgutil
from pathlib import Path

import jlcm_onnx

#: Layers from the bottom up; a module is in the first layer whose prefix it has, else in the foundation.
LAYERS = ("jlcm_onnx.ir", "jlcm_onnx.encodings", "jlcm_onnx.analysis", "jlcm_onnx.passes", "jlcm_onnx.pipeline")
FRONT_ENDS = ("jlcm_onnx", "jlcm_onnx.cli", "jlcm_onnx.olive", "jlcm_onnx.plot")
FOUNDATION = ("jlcm_onnx.config", "jlcm_onnx.config_values", "jlcm_onnx.devices", "jlcm_onnx.errors",
              "jlcm_onnx.memory_budget", "jlcm_onnx.progress", "jlcm_onnx.report", "jlcm_onnx.workers")


def layer_of(module: str) -> int:
    """0 for the foundation, 1.. for :data:`LAYERS` in order, and one past them for the front ends."""
    if module in FRONT_ENDS:
        return len(LAYERS) + 1
    for rank, prefix in enumerate(LAYERS, start=1):
        if module == prefix or module.startswith(prefix + "."):
            return rank
    assert module in FOUNDATION, f"{module} is in no layer: add it to a layer package or to FOUNDATION"
    return 0


def package_modules() -> dict[str, Path]:
    modules = {"jlcm_onnx": Path(jlcm_onnx.__file__)}
    for info in pkgutil.walk_packages(jlcm_onnx.__path__, "jlcm_onnx."):
        spec = info.module_finder.find_spec(info.name, None)
        modules[info.name] = Path(spec.origin)
    return modules


def imported_modules(module: str, source: str, known: set[str], is_package: bool = False) -> set[str]:
    """The ``jlcm_onnx`` modules ``module`` imports (``from package import submodule`` counts as the submodule)."""
    package = module if is_package else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parts, *([base] if base else [])])
            found.add(base)
            found |= {f"{base}.{alias.name}" for alias in node.names if f"{base}.{alias.name}" in known}
    return {name for name in found if name in known and name != module}


def test_every_module_is_in_a_layer() -> None:
    for module in package_modules():
        layer_of(module)


def test_no_module_imports_from_a_layer_above_its_own() -> None:
    modules = package_modules()
    upward = []
    for module, path in modules.items():
        for imported in imported_modules(module, path.read_text(), set(modules), path.name == "__init__.py"):
            if layer_of(imported) > layer_of(module):
                upward.append(f"{module} imports {imported}")
    assert not upward, "\n".join(upward)


def test_the_walk_sees_imports_inside_functions() -> None:
    """The check can fail: a lazy upward import is caught."""
    known = set(package_modules())
    lazy = "def f():\n    from jlcm_onnx.pipeline.compress import compress\n    from ..encodings import codebook\n"
    found = imported_modules("jlcm_onnx.ir.probe", lazy, known)
    assert found == {"jlcm_onnx.pipeline.compress", "jlcm_onnx.encodings", "jlcm_onnx.encodings.codebook"}
    assert max(layer_of(name) for name in found) > layer_of("jlcm_onnx.ir.probe")


#: Limits that keep modules to one job and functions readable on one screen.
MAX_MODULE_LINES, MAX_FUNCTION_LINES = 400, 80


def test_modules_and_functions_stay_small() -> None:
    too_long = []
    for module, path in package_modules().items():
        source = path.read_text()
        if len(source.splitlines()) > MAX_MODULE_LINES:
            too_long.append(f"{module}: {len(source.splitlines())} lines")
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                length = node.end_lineno - node.lineno + 1
                if length > MAX_FUNCTION_LINES:
                    too_long.append(f"{module}.{node.name}: {length} lines")
    assert not too_long, "\n".join(too_long)
