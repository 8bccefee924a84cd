"""Compressing Llama-shaped models of 1.5B and 7B parameters on this machine: peak memory, time, and every tensor
checked.

The models are ``models/llama_shaped.py`` decoders with external data, built into ``build/scale/`` when missing
(``qwen15b.onnx``, ``qwen15b-fp16.onnx``, ``llama7b-fp16.onnx``):

- ``qwen2.5-1.5b``: Qwen2.5-1.5B's shapes (hidden 1,536, 28 layers, 12 query and 2 key/value heads of 128, MLP 8,960,
  a 151,936-word table tied to the head), 1.54B parameters, in fp32 (6.2 GB) and fp16 (3.1 GB);
- ``llama-7b``: Llama-2-7B's shapes (hidden 4,096, 32 layers, 32 heads of 128, MLP 11,008, 32,000 words, the table
  tied), 6.6B parameters, fp16 (13.2 GB); slow to build and run, so only with ``--only``.

The calibrated default run starts the learning from k-means (``--init kmeans``): the default error-feedback start
costs about 200 s of one core for each 8,960-input down projection of the 1.5B model (70 minutes in all on 2 cores;
run it with ``--only``). Each run is ``jlcm-onnx compress MODEL -o OUT --quiet`` plus its options in a fresh process
(:func:`compress_memory.measure`: the kernel's peak resident set size of that process alone, its wall time). The
calibrated runs read 64 sequences of 256 random token ids (the weights are random: text would mean nothing). Then, in
another fresh process, the output is checked as a user would meet it (:func:`verify`):

1. it loads and runs in onnxruntime with default session options on 16 tokens, its logits finite;
2. data-free runs: every compressed tensor's stored arrays (codes, codebooks, outliers) equal those of that tensor
   encoded on its own (the encoder called on the input's weight alone, with a plan of its own).

Results go to ``bench/results/scale.json`` and the "scale" section of BENCHMARKS.md, with a projection for 70B
parameters from the measured rate and memory per parameter, and for 7B and 70B on N one-CPU Ray workers from each
pass's wall time (the compress runs print their report with ``--json``).

Command line::

    python bench/scale.py [--only LABEL ...] [--no-verify] [--render-only]
    python bench/scale.py --verify-output MODEL OUTPUT   # step 2 alone, printing one JSON line
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(ROOT / "models"))
import compress_memory  # noqa: E402
import llama_shaped  # noqa: E402
from readme_section import write_section  # noqa: E402

RESULTS = ROOT / "bench" / "results" / "scale.json"
BENCHMARKS = ROOT / "BENCHMARKS.md"
FOLDER = ROOT / "build" / "scale"
QWEN_1_5B = llama_shaped.Shape(vocab=151_936, hidden=1536, layers=28, intermediate=8960, heads=12, kv_heads=2,
                               head_dim=128)
LLAMA_7B = llama_shaped.Shape(vocab=32_000, hidden=4096, layers=32, intermediate=11_008, heads=32, kv_heads=32,
                              head_dim=128)
SPOT_TOKENS = 16
#: Cores of the machine the stored runs were measured on (this project's 2-core, 24 GB machine), and the Ray worker
#: counts the projection shows.
CORES, WORKERS = 2, (8, 32, 128)
#: A compress run is stopped after this long (the 7B fp16 run took 46 min on 2 cores).
TIMEOUT_S = 4 * 3600


@dataclass(frozen=True)
class Run:
    label: str
    model: str  # file name in FOLDER
    shape: llama_shaped.Shape
    fp16: bool
    arguments: tuple[str, ...]
    default: bool = True


RUNS = (
    Run("1.5B fp32, --bits 4", "qwen15b.onnx", QWEN_1_5B, False, ("--bits", "4")),
    Run("1.5B fp16, --bits 4", "qwen15b-fp16.onnx", QWEN_1_5B, True, ("--bits", "4")),
    Run("1.5B fp32, --bits 4 --init kmeans, calibrated (64 x 256)", "qwen15b.onnx", QWEN_1_5B, False,
        ("--bits", "4", "--init", "kmeans", "--calibration", "CALIBRATION")),
    Run("1.5B fp32, --bits 4, calibrated (64 x 256)", "qwen15b.onnx", QWEN_1_5B, False,
        ("--bits", "4", "--calibration", "CALIBRATION"), default=False),
    Run("7B fp16, --bits 4", "llama7b-fp16.onnx", LLAMA_7B, True, ("--bits", "4"), default=False),
)


def build(run: Run) -> Path:
    """The run's model, exported first when missing."""
    path = FOLDER / run.model
    if not path.exists():
        llama_shaped.export(path, run.shape, fp16=run.fp16)
    return path


def model_bytes(path: Path) -> int:
    """The model file and its external data."""
    return sum(file.stat().st_size for file in path.parent.glob(f"{path.name}*"))


def verify(model: Path, output: Path, check_tensors: bool) -> dict:
    """Step 1 (and 2 with ``check_tensors``) of the module docstring; a dict of what was found."""
    import onnxruntime as ort

    ids = np.random.default_rng(0).integers(0, 500, (1, SPOT_TOKENS), dtype=np.int64)  # below every vocabulary
    session = ort.InferenceSession(str(output), providers=["CPUExecutionProvider"])
    logits = session.run(None, {"input_ids": ids, "attention_mask": np.ones_like(ids)})[0]
    del session
    found = {"runs": bool(np.isfinite(logits).all()), "logits_shape": list(logits.shape)}
    if check_tensors:
        found.update(_check_tensors(model, output))
    return found


def _check_tensors(model: Path, output: Path) -> dict:
    """Every compressed tensor's stored arrays in ``output`` against those of the tensor encoded on its own: the
    encoder called on the input's weight alone, with a plan of its own, and its decoder written as the encoder
    writes it (the same array names, ``<weight>.jlcm_*``)."""
    from onnx import numpy_helper

    from jlcm_onnx.analysis.plan import CompressionPlan
    from jlcm_onnx.analysis.site_encoding import encode_site
    from jlcm_onnx.config import CompressionConfig
    from jlcm_onnx.encodings.base import DecoderContext
    from jlcm_onnx.ir.graph_building import ConstantPool, NameAllocator
    from jlcm_onnx.ir.lazy_weights import tensor_array
    from jlcm_onnx.ir.model_load import load_model
    from jlcm_onnx.ir.weight_sites import compressible_row_axis, find_weight_sites
    from jlcm_onnx.pipeline.metadata import read_metadata

    compressed, _ = load_model(output)
    stored = {tensor.name: tensor for tensor in compressed.graph.initializer}
    metadata = read_metadata(compressed)
    config = CompressionConfig.from_dict(metadata["config"])
    names_in_file = {entry["name"] for entry in metadata["tensors"]}
    source, _ = load_model(model)
    sites = [(site, axis) for site in find_weight_sites(source)
             for axis in [compressible_row_axis(site, config)[0]] if axis is not None]
    used = {name for node in source.graph.node for name in (*node.input, *node.output)}
    mismatched = []
    for site, axis in sites:
        alone = encode_site(site, axis, config, CompressionPlan(config))
        names = NameAllocator(used)
        context = DecoderContext(names, ConstantPool(names), {s.name for s, _ in sites}, config)
        written = alone.encoding.write(site, axis, alone, context).decoder.initializers
        if not all(t.name in stored and np.array_equal(numpy_helper.to_array(t), tensor_array(stored[t.name]))
                   for t in written):
            mismatched.append(site.name)
    return {"tensors_checked": len(sites), "tensors_in_metadata": len(names_in_file),
            "tensors_mismatched": mismatched}


def measure(run: Run, folder: Path, calibration: Path, check_tensors: bool) -> dict:
    """One run: compress in a fresh process, then verify its output in another."""
    model = build(run)
    row = compress_memory.measure(model, run.label, [*run.arguments, "--json"], folder, calibration, TIMEOUT_S)
    output = folder / "out.onnx"
    written = model_bytes(output) if output.exists() else None  # with its external data, past 2 GB
    row.update(model=run.model, model_bytes=model_bytes(model), parameters=run.shape.parameters(),
               output_bytes=written, ratio=None if written is None else round(model_bytes(model) / written, 2))
    if row["exit_code"] == 0:
        row["parameters_per_second"] = round(run.shape.parameters() / row["seconds"])
        command = [sys.executable, __file__, "--verify-output", str(model), str(folder / "out.onnx")]
        if check_tensors and "--calibration" not in run.arguments:
            command.append("--check-tensors")
        done = subprocess.run(command, capture_output=True, text=True, check=False)
        row["verify"] = json.loads(done.stdout) if done.returncode == 0 else {"error": done.stderr.strip()[-500:]}
    print(json.dumps(row), file=sys.stderr)
    return row


def markdown(rows: list[dict]) -> str:
    lines = [
        "`jlcm-onnx compress` on Llama-shaped models with external data (`models/llama_shaped.py`: Qwen2.5-1.5B's and "
        f"Llama-2-7B's shapes, random trained-looking weights), default `--max-memory`, {CORES} cores, 24 GB; each run "
        "in a fresh process, measured by `python bench/scale.py`. \"Checked\": the output runs in onnxruntime (default "
        "options) with finite logits, and every compressed tensor decoded from the file equals the tensor encoded on "
        "its own.",
        "",
        "| run | model | peak RSS | x model | wall s | parameters/s | ratio | checked |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        peak, size = row["peak_rss_bytes"], row["model_bytes"]
        lines.append(
            f"| {row['option']} | {size / 1e9:.2f} GB | {'' if peak is None else f'{peak / 1e9:.2f} GB'} | "
            f"{'' if peak is None else f'{peak / size:.2f}'} | {row['seconds']} | "
            f"{row.get('parameters_per_second', 0) / 1e6:.1f}M | {row['ratio'] or ''} | {_checked(row)} |")
    lines += ["", *_projection(rows)]
    return "\n".join(lines)


def _checked(row: dict) -> str:
    if row.get("note"):
        return f"{_verdict(row)} ({row['note']})"
    return _verdict(row)


def _verdict(row: dict) -> str:
    if row["exit_code"] != 0:
        return f"exit {row['exit_code']}: {row.get('error', '')}"
    if "verify" not in row:
        return "run not checked"
    found = row["verify"]
    if "error" in found:
        return f"verify failed: {found['error']}"
    text = "runs" if found.get("runs") else "NaN/Inf logits"
    if "tensors_checked" in found:
        bad = found["tensors_mismatched"]
        text += f"; {found['tensors_checked'] - len(bad)}/{found['tensors_checked']} tensors equal"
    return text


def _projection(rows: list[dict]) -> list[str]:
    """70B fp16, data-free, from the largest fp16 run: its rate and its peak per parameter (the peak follows the
    output, which follows the parameters); and, where the run logged its passes, the same on N one-CPU Ray workers:
    the encoding pass divides among them (it ran on this machine's cores), the rest (loading, planning, writing and
    checking the file) does not."""
    fp16 = [row for row in rows if row["exit_code"] == 0 and "fp16" in row["option"] and "calibrated" not in
            row["option"]]
    if not fp16:
        return []
    largest = max(fp16, key=lambda row: row["parameters"])
    rate = largest["parameters_per_second"]
    peak = 70e9 * largest["peak_rss_bytes"] / largest["parameters"]
    lines = [f"Projected from the {largest['option']} run ({rate / 1e6:.1f}M parameters/s on {CORES} cores): a "
             f"70B-parameter fp16 model would take {70e9 / rate / 3600:.1f} h on this machine and about "
             f"{peak / 1e9:.0f} GB of memory, more than it has."]
    if "passes" not in largest:
        return lines
    encoding = largest["passes"]["EncodeWeights"]
    rest = largest["seconds"] - encoding
    lines += ["", f"On N Ray workers of one CPU each (`--ray`), from the same run: of its {largest['seconds']:.0f} s, "
              f"{encoding:.0f} s were the encoding pass on {CORES} cores, which divides among the workers, and "
              f"{rest:.0f} s the rest (loading, planning, writing and checking), which does not. Projected wall time "
              "(each job ships its weight's values to a worker, not counted here):", "",
              "| parameters | this machine | " + " | ".join(f"{n} workers" for n in WORKERS) + " |",
              "|---|---|" + "---|" * len(WORKERS)]
    for parameters in (largest["parameters"], 70e9):
        scale = parameters / largest["parameters"]
        times = [largest["seconds"] * scale] + [(rest + encoding * CORES / n) * scale for n in WORKERS]
        lines.append(f"| {parameters / 1e9:.1f}B | " + " | ".join(_duration(t) for t in times) + " |")
    return lines


def _duration(seconds: float) -> str:
    return f"{seconds / 60:.0f} min" if seconds < 5400 else f"{seconds / 3600:.1f} h"


def readme_text(rows: list[dict]) -> str:
    """One line per run for the README: peak memory against the model's size, time, and whether it checked out."""
    lines = []
    for row in rows:
        peak = row["peak_rss_bytes"]
        if row["exit_code"] == 0 and peak is not None:
            lines.append(f"- {row['option']} ({row['model_bytes'] / 1e9:.2f} GB): peak RSS {peak / 1e9:.2f} GB "
                         f"({peak / row['model_bytes']:.2f}x the model) in {row['seconds'] / 60:.1f} min, "
                         f"{row['ratio']}x smaller; {_checked(row)}.")
        else:
            lines.append(f"- {row['option']}: {_checked(row)}.")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", nargs="*", help="run labels to run (default: the default runs)")
    parser.add_argument("--no-verify", action="store_true", help="skip the per-tensor check (the run check stays)")
    parser.add_argument("--render-only", action="store_true", help="render the stored results; run nothing")
    parser.add_argument("--verify-output", nargs=2, type=Path, metavar=("MODEL", "OUTPUT"))
    parser.add_argument("--check-tensors", action="store_true", help="with --verify-output: step 2 too")
    args = parser.parse_args(argv)
    if args.verify_output:
        print(json.dumps(verify(*args.verify_output, check_tensors=args.check_tensors)))
        return 0
    rows = json.loads(RESULTS.read_text()) if RESULTS.exists() else []
    if not args.render_only:
        chosen = [run for run in RUNS if (run.label in args.only if args.only else run.default)]
        with tempfile.TemporaryDirectory() as folder:
            calibration = compress_memory.calibration_file(Path(folder), QWEN_1_5B.vocab)
            measured = {row["option"]: row for row in
                        (measure(run, Path(folder), calibration, not args.no_verify) for run in chosen)}
        order = [run.label for run in RUNS]
        merged = {row["option"]: row for row in rows} | measured
        rows = sorted(merged.values(), key=lambda row: order.index(row["option"]))
        RESULTS.write_text(json.dumps(rows, indent=2) + "\n")
    write_section("scale", markdown(rows), BENCHMARKS)
    write_section("scale", readme_text(rows))
    print(markdown(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
