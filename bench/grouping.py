"""Neuron grouping against per-tensor k-means, data-free, on all-MiniLM-L6-v2 and EfficientNet-Lite0, in one run.

For each model the baseline is the classic per-tensor codebook: one k-means codebook of 2^b values per tensor, no
outliers. Against it, at the same bits: G contiguous groups in the original row order, G groups of rows clustered by
distribution and re-ordered (multi-codebook and multi-scaling); and at the baseline's exact file size (``target_size``
= baseline bytes, bits/groups/outliers chosen per tensor): multi-codebook and multi-scaling. Output fidelity: MiniLM
mean embedding cosine over 1,391 texts; EfficientNet mean KL(original || compressed) over 38 photos.

Run: ``python bench/grouping.py`` (about 10 minutes on 2 cores); writes ``bench/results/grouping.json`` and the table
between the ``grouping`` markers of README.md.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "models"), str(ROOT / "bench")]

from readme_section import write_section  # noqa: E402

import jlcm_onnx  # noqa: E402
from jlcm_onnx import CompressionConfig  # noqa: E402

import efficientnet  # noqa: E402
import minilm  # noqa: E402

BUILD = ROOT / "build"
RESULTS = ROOT / "bench" / "results" / "grouping.json"
GROUPS = 16

#: model name -> (export/evaluate module, bits, fidelity metric, higher is better)
MODELS: dict[str, tuple[Any, int, str, bool]] = {
    "all-MiniLM-L6-v2": (minilm, 3, "mean_cosine", True),
    "EfficientNet-Lite0": (efficientnet, 4, "mean_kl", False),
}


def variants(bits: int, baseline_bytes: int) -> dict[str, CompressionConfig]:
    plain = {"bits": bits, "outlier_fraction": 0.0}
    return {
        f"{GROUPS} contiguous groups (original order)": CompressionConfig(groups=GROUPS, reorder=False, **plain),
        f"{GROUPS} re-ordered groups, multi-codebook": CompressionConfig(groups=GROUPS, **plain),
        f"{GROUPS} re-ordered groups, multi-scaling": CompressionConfig(groups=GROUPS, encoding="multi-scaling",
                                                                        **plain),
        "same size as baseline, multi-codebook": CompressionConfig(target_size=baseline_bytes),
        "same size as baseline, multi-scaling": CompressionConfig(target_size=baseline_bytes,
                                                                  encoding="multi-scaling"),
    }


def run_model(name: str) -> dict[str, Any]:
    module, bits, metric, _ = MODELS[name]
    original = BUILD / f"{module.__name__}.onnx"
    if not original.exists():
        module.export(original)
    output = BUILD / f"{module.__name__}-grouping.onnx"
    baseline = jlcm_onnx.compress(original, CompressionConfig(bits=bits, groups=1, outlier_fraction=0.0))
    baseline.save(output)
    rows = [{"method": f"per-tensor k-means, {bits}-bit (baseline)", "bytes": output.stat().st_size,
             metric: module.evaluate(original, output)[metric]}]
    for label, config in variants(bits, rows[0]["bytes"]).items():
        jlcm_onnx.compress(original, config).save(output)
        rows.append({"method": label, "bytes": output.stat().st_size,
                     metric: module.evaluate(original, output)[metric]})
    return {"model": name, "bits": bits, "metric": metric, "rows": rows}


def to_markdown(results: list[dict[str, Any]]) -> str:
    lines = ["Measured by `python bench/grouping.py` (data-free; no calibration).", ""]
    for result in results:
        better = "higher" if MODELS[result["model"]][3] else "lower"
        baseline = result["rows"][0]["bytes"]
        lines += [f"**{result['model']}**, {result['bits']} bits, fidelity `{result['metric']}` ({better} is better):",
                  "", f"| method | file bytes | vs baseline size | {result['metric']} |", "|---|---|---|---|"]
        for row in result["rows"]:
            lines.append(f"| {row['method']} | {row['bytes']:,} | {row['bytes'] / baseline - 1:+.1%} "
                         f"| {row[result['metric']]:.4f} |")
        lines.append("")
    return "\n".join(lines).rstrip()


def main() -> None:
    results = [run_model(name) for name in MODELS]
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2))
    markdown = to_markdown(results)
    write_section("grouping", markdown)
    print(markdown)


if __name__ == "__main__":
    main()
