"""The neuron re-ordering pass alone (no compression) leaves real models' outputs unchanged.

For each real model (exported with ``models/*.py`` into ``build/`` if missing), runs ``ReorderNeurons`` with 16 groups
per tensor, then compares the outputs of the re-ordered and the original model in onnxruntime on real inputs, and counts
how each weight's rows were handled (permutation folded into the graph, stored re-ordered and restored by a Gather,
or permuted as the sibling of another weight).

Run: ``python bench/reorder_equivalence.py [minilm] [efficientnet] [smollm2]`` (all three by default); prints one
line per model and writes ``bench/results/reorder_equivalence.json``.
"""

from __future__ import annotations

import argparse
import collections
import importlib
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "models")]

from jlcm_onnx import CompressionConfig  # noqa: E402
from jlcm_onnx.analysis.plan import CompressionPlan  # noqa: E402
from jlcm_onnx.passes.reorder_neurons import ReorderNeurons  # noqa: E402

BUILD = ROOT / "build"
RESULTS = ROOT / "bench" / "results" / "reorder_equivalence.json"


def real_inputs(name: str, module: Any) -> dict[str, np.ndarray]:
    if name == "minilm":
        return module.tokenize(module.load_texts()[:8])
    if name == "efficientnet":
        return {"images": module.load_images()[:8]}
    tokens = module.load_eval_tokens(64)[None, :]
    return {"input_ids": tokens, "attention_mask": np.ones_like(tokens)}


def check(name: str) -> dict[str, Any]:
    module = importlib.import_module(name)
    path = BUILD / f"{name}.onnx"
    if not path.exists():
        module.export(path)
    model = onnx.load(path)
    config = CompressionConfig(groups=16)
    plan = CompressionPlan(config)
    ReorderNeurons(config, plan)(model)
    original = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    reordered = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    feeds = {k: v for k, v in real_inputs(name, module).items() if k in {i.name for i in original.get_inputs()}}
    expected, got = original.run(None, feeds)[0], reordered.run(None, feeds)[0]
    kinds = collections.Counter(
        "folded" if g.reordered and g.note.startswith("re-ordered") else
        "sibling" if g.reordered else "restored by Gather" if g.stored_order is not None else "original order"
        for g in plan.groupings.values()
    )
    return {"model": name, "max_relative_difference": float(np.abs(got - expected).max() / np.abs(expected).max()),
            "weights": dict(kinds)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="*", default=["minilm", "efficientnet", "smollm2"])
    results = [check(name) for name in parser.parse_args().models]
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2))
    for result in results:
        print(f"{result['model']}: max relative output difference {result['max_relative_difference']:.2e}, "
              f"weights {result['weights']}")


if __name__ == "__main__":
    main()
