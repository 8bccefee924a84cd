"""Peak memory and wall time of ``jlcm-onnx compress`` for each option, on a Llama-shaped model with a large vocabulary.

Each option runs the CLI in a fresh process (started through a small Python wrapper, so the kernel's peak resident set
size of the compressing process, ``RUSAGE_CHILDREN``'s ``ru_maxrss``, belongs to that run alone). The model is
``models/llama_shaped.py``'s default: 268M parameters, fp32, 1.07 GB, two thirds of it one 262,144 x 640 embedding
table tied to the language-model head (Gemma-3-270M's shape), built first if missing. Calibrated options read 64
sequences of 256 random token ids with an all-ones attention mask (the weights are random, so text would mean
nothing). Results go to ``bench/results/compress_memory.json`` and the "compress-memory" section of BENCHMARKS.md.

Command line::

    python bench/compress_memory.py [--model build/llama268m.onnx] [--only LABEL ...] [--no-write] [--render-only]

``--render-only`` rewrites the BENCHMARKS.md and README.md sections from the stored results without running; with
``--only`` the measured rows replace the stored rows of the same options.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(ROOT / "models"))
import llama_shaped  # noqa: E402
from readme_section import write_section  # noqa: E402

RESULTS = ROOT / "bench" / "results" / "compress_memory.json"
BENCHMARKS = ROOT / "BENCHMARKS.md"
DEFAULT_MODEL = ROOT / "build" / "llama268m.onnx"
CALIBRATION_SHAPE = (64, 256)
PARAMETERS = llama_shaped.Shape().parameters()
#: Option label -> CLI arguments (``CALIBRATION`` is replaced by the calibration file).
OPTIONS: dict[str, list[str]] = {
    "--bits 4": ["--bits", "4"],
    "--bits 3": ["--bits", "3"],
    "--bits 4 --block-size 32": ["--bits", "4", "--block-size", "32"],
    "--ratio 6": ["--ratio", "6"],
    "--outlier-fraction 0.01": ["--outlier-fraction", "0.01"],
    "--speed fast": ["--speed", "fast"],
    "--ratio 9.1 --calibration (64 x 256)": ["--ratio", "9.1", "--calibration", "CALIBRATION"],
    "--bits 3 --block-size 32 --calibration (64 x 256)": ["--bits", "3", "--block-size", "32", "--calibration",
                                                          "CALIBRATION"],
}
#: Runs longer than this are stopped and reported as such.
TIMEOUT_S = 3600

WRAPPER = """
import resource, subprocess, sys, json
done = subprocess.run(sys.argv[1:], capture_output=True, text=True)
peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
print(json.dumps({"code": done.returncode, "peak_rss": peak, "stderr": done.stderr[-2000:], "stdout": done.stdout}))
"""


def calibration_file(folder: Path, vocab: int) -> Path:
    ids = np.random.default_rng(0).integers(0, vocab, CALIBRATION_SHAPE, dtype=np.int64)
    path = folder / "calibration.npz"
    np.savez(path, input_ids=ids, attention_mask=np.ones_like(ids))
    return path


def measure(model: Path, label: str, arguments: list[str], folder: Path, calibration: Path,
            timeout_s: int = TIMEOUT_S) -> dict:
    """One run of the option: exit code, peak RSS, wall seconds and the output's size (stopped after ``timeout_s``)."""
    output = folder / "out.onnx"
    output.unlink(missing_ok=True)
    arguments = [str(calibration) if a == "CALIBRATION" else a for a in arguments]
    command = [sys.executable, "-c", WRAPPER, "jlcm-onnx", "compress", str(model), "-o", str(output), "--quiet",
               *arguments]
    started = time.perf_counter()
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s, check=True)
        result = json.loads(done.stdout)
    except subprocess.TimeoutExpired:
        result = {"code": None, "peak_rss": None, "stderr": f"stopped after {timeout_s} s"}
    seconds = time.perf_counter() - started
    size = output.stat().st_size if output.exists() else None
    row = {"option": label, "exit_code": result["code"], "peak_rss_bytes": result["peak_rss"],
           "seconds": round(seconds, 1), "output_bytes": size,
           "ratio": None if size is None else round(model.stat().st_size / size, 2)}
    if result.get("stdout", "").startswith("{"):  # the report of a run with --json: each pass's wall time
        row["passes"] = {entry["name"]: entry["seconds"] for entry in json.loads(result["stdout"])["passes"]}
    if result["code"] != 0:
        row["error"] = result["stderr"].strip().splitlines()[-1] if result["stderr"].strip() else ""
    print(json.dumps(row), file=sys.stderr)
    return row


def markdown(model: Path, rows: list[dict]) -> str:
    model_bytes = model.stat().st_size
    lines = [
        f"`jlcm-onnx compress` on `models/llama_shaped.py`'s default model ({model_bytes / 1e9:.2f} GB fp32, 268M "
        "parameters, a 262,144 x 640 table tied to the head), default `--max-memory`, 2 cores; each option in a fresh "
        "process, measured by `python bench/compress_memory.py`.",
        "",
        "| option | exit | peak RSS | x model | wall s | ratio |",
        "|---|---|---|---|---|---|",
    ]
    for row in rows:
        peak = row["peak_rss_bytes"]
        lines.append(
            f"| `{row['option']}` | {row['exit_code']} | {'' if peak is None else f'{peak / 1e9:.2f} GB'} | "
            f"{'' if peak is None else f'{peak / model_bytes:.1f}'} | {row['seconds']} | "
            f"{'' if row['ratio'] is None else row['ratio']} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    parser.add_argument("--only", nargs="*", help="option labels to run (default: all)")
    parser.add_argument("--no-write", action="store_true", help="print only; leave the results and BENCHMARKS.md")
    parser.add_argument("--render-only", action="store_true", help="render the stored results; run nothing")
    args = parser.parse_args(argv)
    if args.render_only:
        render(args.model, json.loads(RESULTS.read_text()))
        return 0
    if not args.model.exists():
        subprocess.run([sys.executable, str(ROOT / "models" / "llama_shaped.py"), str(args.model)], check=True)
    with tempfile.TemporaryDirectory() as folder:
        calibration = calibration_file(Path(folder), llama_shaped.Shape().vocab)
        rows = [measure(args.model, label, arguments, Path(folder), calibration)
                for label, arguments in OPTIONS.items() if not args.only or label in args.only]
    if not args.no_write:
        if args.only and RESULTS.exists():  # measured rows replace the stored ones of the same option
            measured = {row["option"]: row for row in rows}
            stored = json.loads(RESULTS.read_text())
            rows = [measured.pop(row["option"], row) for row in stored] + list(measured.values())
        RESULTS.write_text(json.dumps(rows, indent=2) + "\n")
        render(args.model, rows)
    print(markdown(args.model, rows))
    return 0


def render(model: Path, rows: list[dict]) -> None:
    """The BENCHMARKS.md table and the README's memory line."""
    write_section("compress-memory", markdown(model, rows), BENCHMARKS)
    write_section("memory", readme_line(model, rows))


def readme_line(model: Path, rows: list[dict]) -> str:
    """The memory a user needs per billion parameters, from the options that finished."""
    size = model.stat().st_size
    finished = [row for row in rows if row["exit_code"] == 0 and "calibration" not in row["option"]]
    small = max(row["peak_rss_bytes"] for row in finished if "fast" not in row["option"])
    fast = max(row["peak_rss_bytes"] for row in finished if "fast" in row["option"])
    line = (f"Measured by `python bench/compress_memory.py` on a {PARAMETERS / 1e6:.0f}M-parameter fp32 model "
            f"({size / 1e9:.2f} GB, a 262,144 x 640 table tied to the head): the data-free `--speed small` options "
            f"peak at {small / 1e9:.2f} GB or less, {small / size:.1f}x the file (the peak grows with the output "
            "and the largest weight, not with the whole input, so larger models need less per parameter: see "
            f"above); `--speed fast` at {fast / 1e9:.2f} GB (the table is stored twice)")
    calibrated = [row for row in rows if row["exit_code"] == 0 and "calibration" in row["option"]]
    if calibrated:
        peak = max(row["peak_rss_bytes"] for row in calibrated)
        line += f"; with calibration data (64 x 256 tokens) at {peak / 1e9:.2f} GB or less"
    refused = [row for row in rows if row["exit_code"] == 2]
    if refused:
        line += (f"; the calibrated options are refused up front ({refused[0]['error'].removeprefix('error: ')})")
    return line + ". BENCHMARKS.md has every option."


if __name__ == "__main__":
    sys.exit(main())
