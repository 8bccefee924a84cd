"""SHA-256 of the bytes ``compress`` writes for a fixed set of settings: the check that a refactoring or a memory bound
left every output byte as it was.

Run it on the commit before a change with ``--json``, then on the change with ``--compare`` that file: it lists every
setting whose digest differs and exits with 1 if any does.
The settings cover every encoder path: per-row and grouped codebooks, input blocks, outliers, multi-scaling, a size
target, the fast path (integer and float offsets) and calibrated learning (synthetic calibration inputs drawn with a
fixed seed, so both runs see the same data).

Command line::

    python bench/output_digest.py MODEL.onnx [--json OUT.json] [--compare BEFORE.json] [--only NAME ...]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort

import jlcm_onnx
from jlcm_onnx.ir.synthetic_inputs import gather_rows

SETTINGS: dict[str, dict[str, Any]] = {
    "bits 4": {"bits": 4},
    "bits 3, 16 groups, reordered": {"bits": 3, "groups": 16, "reorder": True},
    "bits 3, blocks of 32": {"bits": 3, "groups": 1, "block_size": 32},
    "bits 4, outliers 1%": {"bits": 4, "outlier_fraction": 0.01},
    "bits 3, multi-scaling, 8 groups": {"bits": 3, "groups": 8, "encoding": "multi-scaling"},
    "ratio 6": {"target_ratio": 6.0},
    "fast 4": {"speed": "fast", "bits": 4},
    "fast 4, float offsets": {"speed": "fast", "bits": 4, "affine_offsets": "float"},
}
#: Settings run with calibration inputs.
CALIBRATED: dict[str, dict[str, Any]] = {
    "bits 3, calibrated": {"bits": 3},
    "bits 3, blocks of 32, calibrated": {"bits": 3, "groups": 1, "block_size": 32},
    "fast 4, calibrated": {"speed": "fast", "bits": 4},
}
CALIBRATION_SAMPLES = 8


def calibration_inputs(model: Path, samples: int = CALIBRATION_SAMPLES) -> list[dict[str, np.ndarray]]:
    """Fixed inputs for ``model``, one seed per sample: symbolic dims 1 on axis 0 and 8 elsewhere, floats standard
    normal, integers uniform in ``[0, min(10, rows of the smallest Gather table))``. They only need to stay the same
    from one version of the package to the next, so they are drawn here, not by the package's generator."""
    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    high = min(10, gather_rows(onnx.load(str(model))) or 10)
    feeds = []
    for seed in range(samples):
        rng = np.random.default_rng(seed)
        symbols: dict[str, int] = {}
        feed = {}
        for spec in session.get_inputs():
            shape = [dim if isinstance(dim, int) and dim >= 0 else symbols.setdefault(dim, 1 if axis == 0 else 8)
                     for axis, dim in enumerate(spec.shape)]
            dtype = np.dtype({"float": "float32"}.get(spec.type[7:-1], spec.type[7:-1]))  # "tensor(int64)" -> int64
            feed[spec.name] = (rng.standard_normal(shape) if dtype.kind == "f"
                               else rng.integers(0, high, shape)).astype(dtype)
        feeds.append(feed)
    return feeds


def digests(model: Path, only: list[str] | None = None) -> dict[str, str]:
    """Setting name -> SHA-256 of the compressed model's serialized bytes."""
    data = calibration_inputs(model)
    runs = [(name, settings, None) for name, settings in SETTINGS.items()]
    runs += [(name, settings, data) for name, settings in CALIBRATED.items()]
    result = {}
    for name, settings, calibration in runs:
        if only and name not in only:
            continue
        compressed = jlcm_onnx.compress(model, jlcm_onnx.CompressionConfig(**settings), calibration)
        result[name] = hashlib.sha256(compressed.model.SerializeToString(deterministic=True)).hexdigest()
        print(f"{name:<36} {result[name][:16]}", file=sys.stderr)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", type=Path)
    parser.add_argument("--json", type=Path, help="write the digests here")
    parser.add_argument("--compare", type=Path, help="digests of an earlier run (--json) to compare against")
    parser.add_argument("--only", nargs="*", help="setting names to run (default: all)")
    args = parser.parse_args(argv)
    result = digests(args.model, args.only)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    if args.compare is None:
        return 0
    before = json.loads(args.compare.read_text())
    changed = [name for name, digest in result.items() if before.get(name) != digest]
    for name in changed:
        print(f"changed: {name}", file=sys.stderr)
    print(f"{len(result) - len(changed)} of {len(result)} settings write the same bytes as {args.compare}",
          file=sys.stderr)
    return 1 if changed else 0


if __name__ == "__main__":
    sys.exit(main())
