"""Graph size of a compressed file, and what onnxruntime pays for its decoder functions, on a model as users export it.

all-MiniLM-L6-v2 is exported by torch's dynamo exporter with its per-node debug metadata kept, as
``torch.onnx.export(dynamo=True)`` writes it (``build/minilm-dynamo.onnx``, built first if missing), and compressed with
``--bits 3`` (default config). The table gives each file's nodes and bytes, and, each measured in a fresh process with
default onnxruntime options (``bench/memory.py``, 2 threads, batch 8 x 64 tokens), the median latency, the load peak
and the steady resident memory of the original, the compressed file, and the same file with its decoder functions
inlined by ``onnx.inliner`` (the graph onnxruntime builds from the calls when it loads them): the calls must cost
nothing at run time. Results go to ``bench/results/graph_size.json`` and the "graph-size" section of BENCHMARKS.md.

Command line::

    python bench/graph_size.py [--runs N] [--render-only]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import onnx
import onnx.inliner

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(ROOT / "models"))
from readme_section import stored_or_measured, write_section  # noqa: E402

import jlcm_onnx  # noqa: E402

import memory  # noqa: E402
import minilm  # noqa: E402

RESULTS = ROOT / "bench" / "results" / "graph_size.json"
BENCHMARKS = ROOT / "BENCHMARKS.md"
ORIGINAL = ROOT / "build" / "minilm-dynamo.onnx"
BITS = 3


def _row(label: str, path: Path, runs: int) -> dict:
    model = onnx.load(path)
    figures = memory.measure(path, runs=runs)
    return {"file": label, "nodes": len(model.graph.node), "functions": len(model.functions),
            "bytes": path.stat().st_size, "latency_ms": figures["latency_ms_median"],
            "load_peak_net": figures["load_peak_net"], "steady_net": figures["steady_net"]}


def measure(runs: int) -> list[dict]:
    if not ORIGINAL.exists():
        ORIGINAL.parent.mkdir(exist_ok=True)
        minilm.export(ORIGINAL, keep_metadata=True)
    with tempfile.TemporaryDirectory() as folder:
        compressed, inlined = Path(folder) / "compressed.onnx", Path(folder) / "inlined.onnx"
        jlcm_onnx.compress(ORIGINAL, jlcm_onnx.CompressionConfig(bits=BITS)).save(compressed)
        onnx.save(onnx.inliner.inline_local_functions(onnx.load(compressed)), inlined)
        rows = [_row("original (dynamo export, debug metadata kept)", ORIGINAL, runs),
                _row(f"`--bits {BITS}`", compressed, runs),
                _row(f"`--bits {BITS}`, functions inlined", inlined, runs)]
    for row in rows:
        print(json.dumps(row), flush=True)
    return rows


def markdown(rows: list[dict]) -> str:
    original = rows[0]
    lines = [
        f"all-MiniLM-L6-v2 as `torch.onnx.export(dynamo=True)` writes it (debug metadata kept), `--bits {BITS}`; each "
        "decoder is one call of a model-local function, and the last row is the same file with the functions inlined "
        "(the graph onnxruntime runs). Latency and memory: default onnxruntime options, 2 threads, batch 8 x 64 "
        "tokens, each file in a fresh process. Measured by `python bench/graph_size.py`.",
        "",
        "| file | nodes | functions | size | ratio | latency ms | load peak MB | steady MB |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row['file']} | {row['nodes']:,} | {row['functions']} | {row['bytes'] / 1e6:.2f} MB "
            f"| {original['bytes'] / row['bytes']:.2f}x | {row['latency_ms']:.1f} | {row['load_peak_net'] / 1e6:.0f} "
            f"| {row['steady_net'] / 1e6:.0f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=50, help="timed inferences per file (median reported)")
    parser.add_argument("--render-only", action="store_true", help="rewrite BENCHMARKS.md from the stored results")
    args = parser.parse_args(argv)
    rows = stored_or_measured(RESULTS, args.render_only, lambda: measure(args.runs))
    write_section("graph-size", markdown(rows), BENCHMARKS)
    return 0


if __name__ == "__main__":
    sys.exit(main())
