"""Recurrent models: a 2-layer bidirectional LSTM and a GRU tagger (``models/recurrent_tagger.py``) at 4 and 3 bits.

Each tagger is exported by torch (built first if missing), compressed with ``--bits B`` and compared with
``models/recurrent_tagger.py evaluate`` (file ratio, per-position cosine of the tag logits, top-1 tag agreement on
seeded random token ids; random weights, so near-tied logits make top-1 a harsh measure). Results go to
``bench/results/recurrent.json`` and the "recurrent" section of BENCHMARKS.md.

Command line::

    python bench/recurrent.py [--render-only]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(ROOT / "models"))
import recurrent_tagger  # noqa: E402
from readme_section import stored_or_measured, write_section  # noqa: E402

import jlcm_onnx  # noqa: E402

RESULTS = ROOT / "bench" / "results" / "recurrent.json"
BENCHMARKS = ROOT / "BENCHMARKS.md"
CELLS, BITS = ("lstm", "gru"), (4, 3)


def measure() -> list[dict]:
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for cell in CELLS:
            original = ROOT / "build" / f"tagger-{cell}.onnx"
            if not original.exists():
                original.parent.mkdir(exist_ok=True)
                recurrent_tagger.export(original, cell)
            for bits in BITS:
                output = Path(folder) / f"{cell}-{bits}.onnx"
                result = jlcm_onnx.compress(original, jlcm_onnx.CompressionConfig(bits=bits))
                result.save(output)
                recurrent = [r.name for r in result.report.compressed if r.layer.endswith(f"({cell.upper()})")]
                rows.append({"cell": cell, "bits": bits, "recurrent_tensors": len(recurrent),
                             **recurrent_tagger.evaluate(original, output)})
                print(json.dumps(rows[-1]), flush=True)
    return rows


def markdown(rows: list[dict]) -> str:
    lines = [
        "2-layer bidirectional taggers (`models/recurrent_tagger.py`: vocabulary 5,000, width and hidden 256, 20 tags, "
        "random weights, TorchScript export), default config at each bit width; W and R of every recurrent layer "
        "compressed, biases kept. Measured by `python bench/recurrent.py`.",
        "",
        "| cell | bits | recurrent tensors | ratio | logit cosine | top-1 tag | KL |",
        "|---|---|---|---|---|---|---|",
    ]
    lines += [f"| {r['cell'].upper()} | {r['bits']} | {r['recurrent_tensors']} | {r['ratio']:.2f}x | {r['cosine']:.4f} "
              f"| {r['top1_agreement']:.4f} | {r['kl_divergence']:.4f} |" for r in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--render-only", action="store_true", help="rewrite BENCHMARKS.md from the stored results")
    args = parser.parse_args(argv)
    write_section("recurrent", markdown(stored_or_measured(RESULTS, args.render_only, measure)), BENCHMARKS)
    return 0


if __name__ == "__main__":
    sys.exit(main())
