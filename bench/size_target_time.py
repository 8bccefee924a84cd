"""Wall time, peak memory and perplexity of the calibrated size target on SmolLM2-135M, as a user runs it.

``jlcm-onnx compress build/smollm2.onnx --bits-per-weight 3.3 --calibration CALIBRATION`` in a fresh process
(:func:`compress_memory.measure`: the peak resident set size is that run's alone), with 64 windows of 256 tokens
(``models/smollm2.py``'s calibration windows, taken after its evaluation text), then the perplexity of the output on
the evaluation text (``models/smollm2.py evaluate``). The model is exported first if missing. Results go to
``bench/results/size_target_time.json`` and the "size-target-time" section of BENCHMARKS.md.

Command line::

    python bench/size_target_time.py [--model build/smollm2.onnx] [--render-only]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(ROOT / "models"))
import smollm2  # noqa: E402
from compress_memory import BENCHMARKS, measure  # noqa: E402
from readme_section import write_section  # noqa: E402

RESULTS = ROOT / "bench" / "results" / "size_target_time.json"
DEFAULT_MODEL = ROOT / "build" / "smollm2.onnx"
WINDOWS, TOKENS = 64, 256
OPTION = "--bits-per-weight 3.3 --calibration (64 x 256)"
ARGUMENTS = ["--bits-per-weight", "3.3", "--calibration", "CALIBRATION"]


def calibration_file(folder: Path) -> Path:
    feeds = smollm2.calibration_feeds(WINDOWS, TOKENS)
    path = folder / "calibration.npz"
    np.savez(path, **{name: np.concatenate([feed[name] for feed in feeds]) for name in feeds[0]})
    return path


def markdown(row: dict) -> str:
    peak = row["peak_rss_bytes"]
    return "\n".join([
        f"`jlcm-onnx compress` on SmolLM2-135M-Instruct ({row['model_bytes'] / 1e6:.0f} MB fp32) with its {WINDOWS} "
        f"calibration windows of {TOKENS} tokens, 2 cores, in a fresh process; perplexity on the evaluation text "
        "(`models/smollm2.py evaluate`). Measured by `python bench/size_target_time.py`.",
        "",
        "| option | exit | wall s | peak RSS | ratio | perplexity | vs fp32 |",
        "|---|---|---|---|---|---|---|",
        f"| `{row['option']}` | {row['exit_code']} | {row['seconds']} | "
        f"{'' if peak is None else f'{peak / 1e9:.2f} GB'} | {row['ratio']} | {row['perplexity']:.2f} | "
        f"{row['perplexity_change']:+.1%} |",
    ])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    parser.add_argument("--render-only", action="store_true", help="render the stored result; run nothing")
    args = parser.parse_args(argv)
    if args.render_only:
        write_section("size-target-time", markdown(json.loads(RESULTS.read_text())), BENCHMARKS)
        return 0
    if not args.model.exists():
        smollm2.export(args.model)
    with tempfile.TemporaryDirectory() as folder:
        row = measure(args.model, OPTION, ARGUMENTS, Path(folder), calibration_file(Path(folder)))
        if row["exit_code"] != 0:
            print(f"compress failed: {row.get('error', '')}", file=sys.stderr)
            return 1
        quality = smollm2.evaluate(args.model, Path(folder) / "out.onnx")
    row.update(model_bytes=args.model.stat().st_size, perplexity=quality["compressed_perplexity"],
               perplexity_change=quality["perplexity_change"])
    RESULTS.write_text(json.dumps(row, indent=2) + "\n")
    write_section("size-target-time", markdown(row), BENCHMARKS)
    print(markdown(row))
    return 0


if __name__ == "__main__":
    sys.exit(main())
