"""Calibrated against data-free compression of all-MiniLM-L6-v2 at 3 bits, with the learning ablation, in one run.

Calibration: 128 sentences of gensim's ``lee_background.cor`` (never the evaluation texts), each its own sample.
Every row is 3 bits with one codebook per output row and the default outliers, so every file has the same size up
to a few bytes of metadata, except the size-target rows, which let the planner spread the same bytes over the
tensors (``target_size`` = the data-free file's size; with calibration data the planner weighs each tensor's error by
its measured output sensitivity, :mod:`jlcm_onnx.pipeline.sensitivity`). Ablation: initial codes (k-means vs GPTQ-style
error feedback with a least-squares codebook refit), 50 steps of the mapping update (proximal, the paper's; naive, the
one it rejects; frozen codes, codebooks only), sequential or one-pass statistics.

Metrics: fidelity, the mean embedding cosine against fp32 over 1,555 texts (the 1,391 evaluation texts plus the 82
titles and 82 abstracts of ``models/data/abstracts.tsv``); title -> abstract retrieval top-1; Lee document-similarity
Pearson; compression wall time on this machine (2 cores; other work may have been running).

Run: ``python bench/calibration.py``; writes ``bench/results/calibration.json`` and the table between the
``calibration`` markers of README.md.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "models"), str(ROOT / "bench")]

from readme_section import write_section  # noqa: E402

import jlcm_onnx  # noqa: E402
from jlcm_onnx import CompressionConfig  # noqa: E402

import minilm  # noqa: E402

BUILD = ROOT / "build"
RESULTS = ROOT / "bench" / "results" / "calibration.json"
BITS = 3
SAME_SIZE = "same size"  # placeholder for the data-free file's size, known after the first row
#: label -> (config fields, calibrated)
VARIANTS: dict[str, tuple[dict[str, Any], bool]] = {
    "data-free k-means": ({}, False),
    "error-feedback init + codebook refit (default)": ({}, True),
    "error-feedback init, 50 proximal steps": ({"learning_steps": 50}, True),
    "k-means init, 50 proximal steps": ({"init": "kmeans", "learning_steps": 50}, True),
    "k-means init, 50 naive steps": ({"init": "kmeans", "mapping": "naive", "learning_steps": 50}, True),
    "k-means init, 50 steps, frozen codes": ({"init": "kmeans", "mapping": "frozen", "learning_steps": 50}, True),
    "error-feedback init, sequential": ({"sequential": True}, True),
    "size target, data-free": ({"target_size": SAME_SIZE}, False),
    "size target weighted by output sensitivity, error-feedback init": ({"target_size": SAME_SIZE}, True),
}


def main() -> None:
    original = BUILD / "minilm.onnx"
    if not original.exists():
        minilm.export(original)
    output = BUILD / "minilm-calibrated.onnx"
    feeds = [minilm.tokenize([text]) for text in minilm.load_calibration_texts(128)]
    rows: list[dict[str, Any]] = []
    fp32: dict[str, float] = {}
    for label, (fields, calibrated) in VARIANTS.items():
        if fields.get("target_size") == SAME_SIZE:
            fields = {**fields, "target_size": rows[0]["bytes"]}
        config = CompressionConfig(bits=BITS, **fields)
        started = time.perf_counter()
        result = jlcm_onnx.compress(original, config, calibration=feeds if calibrated else None)
        seconds = time.perf_counter() - started
        result.save(output)
        metrics = minilm.evaluate(original, output)
        rows.append({"method": label, "config": fields, "calibrated": calibrated, "bytes": metrics["compressed_bytes"],
                     "ratio": metrics["ratio"], "fidelity": metrics["fidelity"],
                     "retrieval_top1": metrics["compressed"]["retrieval_top1"],
                     "lee_pearson": metrics["compressed"]["lee_pearson"], "seconds": seconds,
                     "notes": result.report.notes})
        print(json.dumps(rows[-1]), flush=True)
        fp32 = metrics["original"]
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({"fp32": fp32, "rows": rows}, indent=2))
    write_readme(rows, fp32)


def write_readme(rows: list[dict[str, Any]], fp32: dict[str, float]) -> None:
    lines = [f"Measured by `python bench/calibration.py`: all-MiniLM-L6-v2, {BITS} bits, one codebook per output row "
             "(size-target rows: bits and groups per tensor at the data-free file's size), 128 calibration sentences "
             "from `lee_background.cor`. Fidelity: mean cosine to fp32 over 1,555 texts. fp32: retrieval top-1 "
             f"{fp32['retrieval_top1']:.4f}, Lee Pearson {fp32['lee_pearson']:.4f}.", "",
             "| method | file bytes | ratio | fidelity | retrieval top-1 | Lee Pearson | compress time |",
             "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['method']} | {r['bytes']:,} | {r['ratio']:.2f}x | {r['fidelity']:.4f} | {r['retrieval_top1']:.4f} "
              f"| {r['lee_pearson']:.4f} | {r['seconds']:.0f} s |" for r in rows]
    write_section("calibration", "\n".join(lines))


if __name__ == "__main__":
    main()
