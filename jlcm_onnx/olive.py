"""jlcm-onnx as a pass of a Microsoft Olive workflow (olive-ai 0.13; ``pip install 'jlcm-onnx[olive]'``).

The pass ``JlcmCompression`` takes an ONNX model and returns it compressed. Its parameters are the fields of
:class:`jlcm_onnx.CompressionConfig` (same names, same defaults) plus ``calibration`` (a path read like the CLI's
``--calibration``), ``calibration_samples`` and ``device``. Olive finds a pass by its ``type`` in a *package config*
(its own ``olive_config.json`` unless one is given), not by import, so:

- in Python, :func:`run_workflow` runs a workflow with Olive's package config plus this pass;
- with Olive's CLI, ``python -m jlcm_onnx.olive jlcm-olive.json`` writes that package config, then
  ``olive run --config workflow.json --package-config jlcm-olive.json``.

A bad input (a :class:`jlcm_onnx.JlcmError`) is raised as a ``ValueError`` naming it: Olive lets those through, where
it would log other errors and finish without an output model. Olive caches a pass's output by its parameters and its
input; the parameter ``jlcm_onnx_version`` (this package's version) makes an upgrade re-run it.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import typing
from pathlib import Path
from typing import Any

from olive.hardware import AcceleratorSpec
from olive.model import ONNXModelHandler
from olive.model.utils import resolve_onnx_path
from olive.package_config import OlivePackageConfig
from olive.passes import Pass
from olive.passes.pass_config import BasePassConfig, PassConfigParam

from jlcm_onnx import __version__
from jlcm_onnx.analysis.calibration import DEFAULT_SAMPLES, load_calibration
from jlcm_onnx.config import CompressionConfig
from jlcm_onnx.errors import JlcmError
from jlcm_onnx.pipeline.compress import compress, save

PASS_TYPE = "JlcmCompression"
#: Pass parameters that are not config fields.
RUN_PARAMETERS = ("calibration", "calibration_samples", "device", "jlcm_onnx_version")


class JlcmCompression(Pass):
    """Compresses the model's float weights into codebooks (or affine blocks) with jlcm-onnx."""

    @classmethod
    def _default_config(cls, accelerator_spec: AcceleratorSpec) -> dict[str, PassConfigParam]:
        types = typing.get_type_hints(CompressionConfig)
        parameters = {
            field.name: PassConfigParam(type_=types[field.name], default_value=field.default,
                                        description=f"CompressionConfig.{field.name}")
            for field in dataclasses.fields(CompressionConfig)
        }
        return {
            **parameters,
            "calibration": PassConfigParam(type_=str, default_value=None,
                                           description="calibration inputs: a .npz file or a folder of .npy/.npz"),
            "calibration_samples": PassConfigParam(type_=int, default_value=DEFAULT_SAMPLES,
                                                   description="most calibration samples used"),
            "device": PassConfigParam(type_=str, default_value="cpu", description="cpu or cuda (calibration)"),
            "jlcm_onnx_version": PassConfigParam(type_=str, default_value=__version__,
                                                 description="re-runs the pass when jlcm-onnx changes"),
        }

    def _run_for_config(self, model: ONNXModelHandler, config: BasePassConfig,
                        output_model_path: str) -> ONNXModelHandler:
        values = config.model_dump()
        settings = {key: value for key, value in values.items() if key not in RUN_PARAMETERS}
        calibration = values["calibration"]
        try:
            compression = CompressionConfig.from_dict(settings)
            data = None if calibration is None else load_calibration(
                calibration, model.model_path, samples=values["calibration_samples"], seed=compression.seed)
            result = compress(model.model_path, compression, data, device=values["device"])
            output = Path(resolve_onnx_path(output_model_path))
            save(result, output)
        except JlcmError as error:
            raise ValueError(f"jlcm-onnx: {error}") from error
        return ONNXModelHandler(model_path=str(output.parent), onnx_file_name=output.name)


def package_config() -> dict[str, Any]:
    """Olive's own package config with :class:`JlcmCompression` added."""
    config = json.loads(Path(OlivePackageConfig.get_default_config_path()).read_text())
    config.setdefault("passes", {})[PASS_TYPE] = {
        "module_path": f"{__name__}.{PASS_TYPE}",
        "supported_providers": ["*"],
        "supported_accelerators": ["*"],
        "supported_precisions": ["*"],
    }
    return config


def run_workflow(workflow: dict[str, Any] | str | Path, **options: Any) -> Any:
    """``olive.workflows.run(workflow)`` with :func:`package_config`, so a workflow's passes may include
    ``{"type": "JlcmCompression", ...}``; returns Olive's ``WorkflowOutput``."""
    from olive.workflows import run

    return run(workflow, package_config=package_config(), **options)


def main(argv: list[str] | None = None) -> int:
    """``python -m jlcm_onnx.olive FILE``: writes :func:`package_config` to FILE for ``olive run --package-config``."""
    arguments = sys.argv[1:] if argv is None else argv
    if len(arguments) != 1:
        print("usage: python -m jlcm_onnx.olive PACKAGE_CONFIG.json", file=sys.stderr)
        return 2
    Path(arguments[0]).write_text(json.dumps(package_config(), indent=2) + "\n")
    print(f"wrote {arguments[0]}: use it with olive run --config WORKFLOW.json --package-config {arguments[0]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
