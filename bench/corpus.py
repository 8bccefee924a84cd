"""Corpus run: every ONNX node-test model compressed, then run against the original in onnxruntime on its own inputs.

The corpus is ``onnx/backend/test/data/node/*/model.onnx`` with ``test_data_set_0/input_*.pb``. Wheels of onnx 1.23 do
not ship that folder, so when it is missing it is generated once from the installed package's own test-case
definitions (``onnx.backend.test.case.node``, the source the folder is made from) into ``build/onnx-node-data/node``.

Each model is compressed with the default config except ``min_elements=1`` (so tiny weights are compressed too), and
sorted into one of:

- **compressed**: at least one weight compressed; every output has the original's shape and dtype, no NaN/Inf where
  the original is finite, and each float output is within tolerance of the original::

      ||y' - y||_2 <= RTOL_PER_ERROR * e * ||y||_2 + ATOL * sqrt(size)

  where ``e = 10 ** (-min SQNR / 20)`` is the largest relative RMS error of a compressed weight (0 when all are
  exact). Integer and bool outputs (indices, masks) may legitimately change and are compared by shape and dtype only.
  Models that also reproduce their weights exactly at 8 bits with float32 codebooks and no outliers are compressed a
  second time that way and must then match the original to ``EXACT_RTOL``/``EXACT_ATOL``: this checks the rewritten
  graph (decoders, re-ordering, row decoders, subgraphs) with no quantization error to hide behind.
- **unchanged**: nothing was compressed (the reason: the report's skip reasons, or no float weights); the output must
  then give exactly the original's outputs.
- **refused**: compress raised a typed :class:`jlcm_onnx.JlcmError` (e.g. an opset older than the decoder needs);
  the message is the reason.
- **skipped**: the original itself does not run in onnxruntime on its inputs (reason recorded); compress must still
  end cleanly on it (a result or a typed error, else it is a failure). A model whose outputs change between two runs
  (random ops) is not skipped: only shapes and dtypes are then compared.
- **failed**: anything else: an internal error, a mismatch beyond tolerance. The goal is zero.

Run: ``python bench/corpus.py`` (under a minute on 2 cores) writes ``bench/results/corpus.json`` and the table between
the ``corpus`` markers of README.md;
``python bench/corpus.py --sample 30`` runs a deterministic sample. A full run also compresses the edge-case models
that pip packages ship (OCR, voice activity, captcha) when their packages are there (``pip install --no-deps
--target build/edge-pkgs rapidocr-onnxruntime==1.4.4 silero-vad==6.2.3 ddddocr==1.6.1``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import time
import warnings
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
from onnx import numpy_helper

import jlcm_onnx
from jlcm_onnx import CompressionConfig, JlcmError
from jlcm_onnx.config import WEIGHT_SLOTS

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results" / "corpus.json"
README = ROOT / "README.md"
START, END = "<!-- corpus:start -->", "<!-- corpus:end -->"
GENERATED = ROOT / "build" / "onnx-node-data" / "node"

CONFIG = CompressionConfig(min_elements=1)
EXACT_CONFIG = CompressionConfig(min_elements=1, bits=8, codebook_dtype="float32", outlier_fraction=0.0)

#: Tolerance of a compressed model's float outputs, per unit of relative weight error (see the module docstring).
RTOL_PER_ERROR = 8.0
#: Absolute slack per element (float16 codebooks round to ~5e-4 relative; outputs of tiny magnitude).
ATOL = 1e-3
#: Tolerance of the exact re-run (weights reproduced exactly: only float re-association differs).
EXACT_RTOL, EXACT_ATOL = 1e-4, 1e-5

#: Name suffix of a model's variant whose weights, graph inputs in the node tests, are frozen into initializers.
FROZEN_SUFFIX = "[frozen]"

#: package -> glob of its ONNX files (the edge-case models pip packages ship, and their siblings).
EDGE_PACKAGES = {"rapidocr_onnxruntime": "models/*.onnx", "silero_vad": "data/*.onnx", "ddddocr": "*.onnx"}

COMPRESSED, UNCHANGED, REFUSED, SKIPPED, FAILED = "compressed", "unchanged", "refused", "skipped", "failed"


@dataclass
class CaseResult:
    name: str
    status: str
    reason: str = ""
    compressed_tensors: int = 0
    max_relative_error: float | None = None
    tolerance: float | None = None
    exact_checked: bool = False
    deterministic: bool = True
    notes: list[str] = field(default_factory=list)


# ------------------------------------------------------------------------------------------------------------ corpus


def corpus_folder() -> Path:
    """The node-test folder of the installed onnx package, or the generated copy (made on first use)."""
    installed = Path(onnx.__file__).parent / "backend" / "test" / "data" / "node"
    if installed.is_dir() and any(installed.glob("*/model.onnx")):
        return installed
    if not (GENERATED / ".complete").is_file():
        generate(GENERATED)
    return GENERATED


def generate(folder: Path) -> None:
    """Writes every node test case as ``<name>/model.onnx`` and ``<name>/test_data_set_0/input_*.pb``, as onnx's own
    ``backend-test-tools generate-data`` does for the model cases."""
    from onnx.backend.test.case import node

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cases = node.collect_testcases()
    if folder.exists():
        shutil.rmtree(folder)
    for case in cases:
        data = folder / case.name / "test_data_set_0"
        data.mkdir(parents=True)
        (folder / case.name / "model.onnx").write_bytes(case.model.SerializeToString())
        inputs, _ = case.data_sets[0]
        for index, array in enumerate(inputs):
            (data / f"input_{index}.pb").write_bytes(_serialize(case.model.graph.input[index], array))
    (folder / ".complete").write_text(f"onnx {onnx.__version__}\n")


def _serialize(spec: onnx.ValueInfoProto, value: Any) -> bytes:
    kind = spec.type.WhichOneof("value")
    if kind == "sequence_type":
        return numpy_helper.from_list(value, spec.name).SerializeToString()
    if kind == "optional_type":
        return numpy_helper.from_optional(value, spec.name).SerializeToString()
    if kind == "map_type":
        return numpy_helper.from_dict(value, spec.name).SerializeToString()
    if isinstance(value, onnx.TensorProto):
        return value.SerializeToString()
    return numpy_helper.from_array(np.asarray(value), spec.name).SerializeToString()


def case_names(folder: Path) -> list[str]:
    return sorted(p.parent.name for p in folder.glob("*/model.onnx"))


def sample(names: list[str], count: int) -> list[str]:
    """``count`` names spread evenly over the sorted list (deterministic)."""
    if count >= len(names):
        return list(names)
    return [names[int(i * len(names) / count)] for i in range(count)]


def read_inputs(model: onnx.ModelProto, folder: Path) -> dict[str, Any]:
    """The feed of ``test_data_set_0``; raises ValueError for input kinds onnxruntime's Python API cannot take."""
    feed = {}
    files = sorted(folder.glob("input_*.pb"), key=lambda p: int(p.stem.split("_")[1]))
    # the first graph inputs are the ones fed (the rest are optional or initializer-backed)
    for spec, path in zip(model.graph.input, files, strict=False):
        kind = spec.type.WhichOneof("value")
        if kind == "tensor_type":
            tensor = onnx.TensorProto()
            tensor.ParseFromString(path.read_bytes())
            feed[spec.name] = numpy_helper.to_array(tensor)
        elif kind == "sequence_type":
            sequence = onnx.SequenceProto()
            sequence.ParseFromString(path.read_bytes())
            feed[spec.name] = numpy_helper.to_list(sequence)
        else:
            raise ValueError(f"input '{spec.name}' is a {kind}")
    return feed


# -------------------------------------------------------------------------------------------------------------- runs


def run_case(folder: Path) -> list[CaseResult]:
    """Compresses ``folder/model.onnx`` as it is and, when it reads weights from graph inputs, its frozen variant, and
    compares each with its original on the bundled inputs."""
    name = folder.name
    path = folder / "model.onnx"
    model = onnx.load(path)
    try:
        feed = read_inputs(model, folder / "test_data_set_0")
    except Exception as error:  # noqa: BLE001
        return [_without_reference(name, path, f"inputs cannot be fed from Python: {_first_line(error)}")]
    results = [_evaluate(name, path, model, feed)]
    frozen, rest = freeze_weights(model, feed)
    if frozen is not None:
        results.append(_evaluate(f"{name}{FROZEN_SUFFIX}", frozen, frozen, rest))
    return results


def freeze_weights(model: onnx.ModelProto, feed: dict[str, Any]) -> tuple[onnx.ModelProto | None, dict[str, Any]]:
    """A copy of ``model`` whose float graph inputs read in a weight slot (MatMul/Gemm B, Conv/ConvTranspose W,
    Gather data, LSTM/GRU/RNN W and R) are initializers holding the bundled values, and the feed of the remaining
    inputs; (None, feed) when there are none."""
    weights = {
        node.input[slot] for node in model.graph.node if node.domain in ("", "ai.onnx")
        for slot in WEIGHT_SLOTS.get(node.op_type, ()) if len(node.input) > slot and node.input[slot]
    }
    names = [
        v.name for v in model.graph.input
        if v.name in weights and v.name in feed and isinstance(feed[v.name], np.ndarray)
        and feed[v.name].dtype.kind == "f" and feed[v.name].ndim >= 2
    ]
    if not names:
        return None, feed
    frozen = onnx.ModelProto()
    frozen.CopyFrom(model)
    kept = [v for v in frozen.graph.input if v.name not in names]
    del frozen.graph.input[:]
    frozen.graph.input.extend(kept)
    frozen.graph.initializer.extend(numpy_helper.from_array(feed[n], n) for n in names)
    return frozen, {k: v for k, v in feed.items() if k not in names}


def _evaluate(name: str, source: Path | onnx.ModelProto, model: onnx.ModelProto, feed: dict[str, Any]) -> CaseResult:
    try:
        original = _session(model)
        expected = original.run(None, feed)
    except Exception as error:  # noqa: BLE001 - the original cannot run: nothing to compare against
        reason = f"original does not run in onnxruntime: {_first_line(error)}"
        return _without_reference(name, source, reason)
    deterministic = _same(expected, original.run(None, feed))
    try:
        compressed = jlcm_onnx.compress(source, CONFIG)
    except JlcmError as error:
        return CaseResult(name, REFUSED, str(error), deterministic=deterministic)
    except Exception as error:  # noqa: BLE001
        return CaseResult(name, FAILED, f"compress: {type(error).__name__}: {_first_line(error)}")
    records = compressed.report.compressed
    try:
        actual = _session(compressed.model).run(None, feed)
    except Exception as error:  # noqa: BLE001
        return CaseResult(name, FAILED, f"compressed model does not run: {_first_line(error)}", len(records))
    notes = list(compressed.report.notes)
    if not records:
        skipped = sorted({f"{r.name}: {r.reason}" for r in compressed.report.tensors})
        reason = "; ".join(skipped) if skipped else "no float weights"
        if deterministic and not _same(expected, actual):
            return CaseResult(name, FAILED, "nothing compressed but the outputs changed", notes=notes)
        return CaseResult(name, UNCHANGED, reason, deterministic=deterministic, notes=notes)
    weight_error = max(_relative_rms(r.sqnr_db) for r in records)
    tolerance = RTOL_PER_ERROR * weight_error
    problem, worst = _compare(expected, actual, tolerance, ATOL, values=deterministic)
    outcome = CaseResult(name, COMPRESSED, "", len(records), worst, tolerance, deterministic=deterministic,
                         notes=notes)
    if problem:
        outcome.status, outcome.reason = FAILED, problem
        return outcome
    if deterministic:
        try:
            exact = jlcm_onnx.compress(source, EXACT_CONFIG)
        except JlcmError:
            return outcome
        if all(r.sqnr_db is not None and math.isinf(r.sqnr_db) for r in exact.report.compressed):
            outcome.exact_checked = True
            actual = _session(exact.model).run(None, feed)
            problem, _ = _compare(expected, actual, 0.0, EXACT_ATOL, rtol=EXACT_RTOL)
            if problem:
                outcome.status, outcome.reason = FAILED, f"exact re-run (8 bits, float32 codebooks): {problem}"
    return outcome


def _without_reference(name: str, source: Path | onnx.ModelProto, reason: str) -> CaseResult:
    """A model whose original cannot run: compress must still end cleanly (a result or a typed error)."""
    try:
        jlcm_onnx.compress(source, CONFIG)
    except JlcmError as error:
        return CaseResult(name, SKIPPED, f"{reason} (compress: {_first_line(error)})")
    except Exception as error:  # noqa: BLE001
        return CaseResult(name, FAILED, f"compress: {type(error).__name__}: {_first_line(error)}")
    return CaseResult(name, SKIPPED, reason)


def _compare(expected: list, actual: list, tolerance: float, atol: float, rtol: float = 0.0,
             values: bool = True) -> tuple[str, float]:
    """(the first problem, or "", and the largest relative error of a float output)."""
    worst = 0.0
    expected, actual = _flatten(expected), _flatten(actual)
    if len(expected) != len(actual):
        return f"{len(actual)} output tensors, the original has {len(expected)}", worst
    for index, (want, got) in enumerate(zip(expected, actual, strict=True)):
        want, got = np.asarray(want), np.asarray(got)
        if want.shape != got.shape or want.dtype != got.dtype:
            return f"output {index}: {got.dtype}{list(got.shape)} vs {want.dtype}{list(want.shape)}", worst
        if want.dtype.kind not in "fc":
            continue
        finite = np.isfinite(want)
        if np.any(finite & ~np.isfinite(got)):
            return f"output {index}: NaN/Inf where the original is finite", worst
        if not values:
            continue
        both = finite & np.isfinite(got)
        difference = np.linalg.norm((got[both] - want[both]).astype(np.float64).ravel())
        scale = np.linalg.norm(want[both].astype(np.float64).ravel())
        worst = max(worst, float(difference / scale) if scale > 0 else float(difference))
        if rtol:
            if not np.allclose(got[both], want[both], rtol=rtol, atol=atol):
                return f"output {index}: max |diff| {np.max(np.abs(got[both] - want[both])):.3g}", worst
        elif difference > tolerance * scale + atol * math.sqrt(max(int(both.sum()), 1)):
            return (f"output {index}: relative L2 error {difference / max(scale, 1e-30):.3g} > tolerance "
                    f"{tolerance:.3g}"), worst
    return "", worst


def _flatten(outputs: list) -> list[np.ndarray]:
    """Outputs with each sequence output expanded into its tensors."""
    flat = []
    for output in outputs:
        if isinstance(output, list):
            flat.extend(np.asarray(o) for o in output)
        else:
            flat.append(np.asarray(output))
    return flat


def _same(first: list, second: list) -> bool:
    """Bit-equal outputs (NaN equal to NaN)."""
    first, second = _flatten(first), _flatten(second)
    return len(first) == len(second) and all(
        a.shape == b.shape and a.dtype == b.dtype and np.array_equal(a, b, equal_nan=a.dtype.kind in "fc")
        for a, b in zip(first, second, strict=True)
    )


def _relative_rms(sqnr_db: float | None) -> float:
    if sqnr_db is None or math.isinf(sqnr_db):
        return 0.0
    return 10 ** (-sqnr_db / 20)


def _session(model: onnx.ModelProto) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.log_severity_level = 4
    options.intra_op_num_threads = 1
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0][:300] if text else type(error).__name__


# -------------------------------------------------------------------------------------------------------------- main


def summarize(results: list[CaseResult]) -> dict[str, Any]:
    counts = Counter(r.status for r in results)
    return {
        "total": len(results),
        **{status: counts.get(status, 0) for status in (COMPRESSED, UNCHANGED, REFUSED, SKIPPED, FAILED)},
        "exact_checked": sum(r.exact_checked for r in results),
        "nondeterministic": sum(not r.deterministic for r in results),
    }


def skip_kind(reason: str) -> str:
    if "NOT_IMPLEMENTED" in reason:
        return "ops without an onnxruntime CPU kernel"
    if "numpy" in reason.lower():
        return "element types onnxruntime's Python API cannot feed (float8, int4, ...)"
    if "inputs cannot be fed" in reason:
        return "non-tensor inputs"
    return "preview/training domains and other onnxruntime load or run failures"


def readme_block(payload: dict[str, Any]) -> str:
    """The README table of a full run."""
    summary, cases = payload["summary"], payload["cases"]
    frozen = sum(c["name"].endswith(FROZEN_SUFFIX) for c in cases)
    no_weights = sum(c["status"] == UNCHANGED and c["reason"] == "no float weights" for c in cases)
    skips = Counter(skip_kind(c["reason"]) for c in cases if c["status"] == SKIPPED)
    return "\n".join([
        f"`{payload['command']}`: onnx {payload['onnx']}, onnxruntime {payload['onnxruntime']}, "
        f"{payload['seconds']:.0f} s.",
        "",
        "| models | compressed, within tolerance | unchanged, with reason | refused (typed error) | original not "
        "runnable in onnxruntime (skipped) | failed |",
        "|---|---|---|---|---|---|",
        f"| {summary['total']:,} ({summary['total'] - frozen:,} + {frozen} frozen) | {summary[COMPRESSED]:,} "
        f"({summary['exact_checked']} also exact at 8 bits) | {summary[UNCHANGED]:,} ({no_weights:,} without float "
        f"weights) | {summary[REFUSED]} | {summary[SKIPPED]} | **{summary[FAILED]}** |",
        "",
        "Skipped: " + "; ".join(f"{kind} ({count})" for kind, count in skips.most_common()) + ".",
        *_edge_lines(payload["edge_models"]),
    ])


def _edge_lines(edge: list[dict[str, Any]]) -> list[str]:
    if not edge:
        return []
    lines = ["", "Edge-case models (default config; the output check spot-checks each):", "",
             "| model | result | tensors compressed / left | ratio | notes; the main reason large tensors were left |",
             "|---|---|---|---|---|"]
    for entry in edge:
        left = [f"{count} large tensor(s) {reason}" for reason, count in entry.get("large_tensors_left", {}).items()]
        note = "; ".join([*entry.get("notes", []), *left[:1]]) or entry.get("reason", "")
        counts = f"{entry.get('compressed_tensors', 0)} / {entry.get('skipped_tensors', 0)}"
        ratio = f"{entry['ratio']:.2f}x" if "ratio" in entry else ""
        lines.append(f"| {entry['name']} | {entry['status']} | {counts} | {ratio} | {note} |")
    return lines


def write_readme(block: str) -> None:
    text = README.read_text()
    if START in text and END in text:
        head, rest = text.split(START, 1)
        README.write_text(f"{head}{START}\n{block}\n{END}{rest.split(END, 1)[1]}")


def edge_models() -> dict[str, Path]:
    """The edge-case models pip packages ship (weights in Constant nodes, If branches, already int8) where their
    packages are installed, in the environment or with ``pip install --no-deps --target build/edge-pkgs ...``."""
    folders = [ROOT / "build" / "edge-pkgs", *(Path(p) for p in sys.path if p)]
    found: dict[str, Path] = {}
    for folder in folders:
        for package, pattern in EDGE_PACKAGES.items():
            for path in sorted((folder / package).glob(pattern)) if (folder / package).is_dir() else []:
                found.setdefault(f"{package}/{path.name}", path)
    return dict(sorted(found.items()))


def run_edge_model(name: str, path: Path) -> dict[str, Any]:
    """Compresses one edge-case model with the default config; the library's own gate spot-checks it."""
    try:
        result = jlcm_onnx.compress(path)
    except JlcmError as error:
        return {"name": name, "status": REFUSED, "reason": str(error)}
    except Exception as error:  # noqa: BLE001
        return {"name": name, "status": FAILED, "reason": f"{type(error).__name__}: {_first_line(error)}"}
    records = result.report.compressed
    large_left = Counter(r.reason for r in result.report.tensors if r.status != COMPRESSED
                         and math.prod(r.shape) >= CompressionConfig().min_elements)
    return {
        "name": name,
        "status": COMPRESSED if records else UNCHANGED,
        "compressed_tensors": len(records),
        "skipped_tensors": len(result.report.tensors) - len(records),
        "ratio": round(result.report.ratio, 2),
        "notes": result.report.notes,
        "large_tensors_left": dict(large_left.most_common()),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sample", type=int, help="Run this many models, spread evenly over the sorted names.")
    parser.add_argument("--output", type=Path, default=RESULTS, help="Where to write the JSON results.")
    args = parser.parse_args(argv)
    folder = corpus_folder()
    names = case_names(folder)
    if args.sample:
        names = sample(names, args.sample)
    started = time.perf_counter()
    results = []
    for index, name in enumerate(names):
        for result in run_case(folder / name):
            results.append(result)
            if result.status == FAILED:
                print(f"FAILED {result.name}: {result.reason}", file=sys.stderr)
        if (index + 1) % 100 == 0:
            print(f"{index + 1}/{len(names)} {summarize(results)}", file=sys.stderr)
    summary = summarize(results)
    edge = [] if args.sample else [run_edge_model(name, path) for name, path in edge_models().items()]
    summary["edge_failed"] = sum(e["status"] == FAILED for e in edge)
    payload = {
        "command": "python bench/corpus.py" + (f" --sample {args.sample}" if args.sample else ""),
        "corpus": os.path.relpath(folder, ROOT) if folder.is_relative_to(ROOT) else str(folder),
        "onnx": onnx.__version__,
        "onnxruntime": ort.__version__,
        "config": CONFIG.to_dict(),
        "tolerance": {"rtol_per_weight_error": RTOL_PER_ERROR, "atol": ATOL, "exact_rtol": EXACT_RTOL,
                      "exact_atol": EXACT_ATOL},
        "summary": summary,
        "seconds": round(time.perf_counter() - started, 1),
        "edge_models": edge,
        "cases": [asdict(r) for r in results],
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(payload, indent=1) + "\n")
    if not args.sample and args.output == RESULTS:
        write_readme(readme_block(payload))
    print(json.dumps(summary))
    return 1 if summary[FAILED] or summary["edge_failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
