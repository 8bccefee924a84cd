"""A 2-layer bidirectional LSTM (or GRU) sequence tagger exported by torch, and how its compressed copy compares.

Embedding (vocabulary 5,000, width 256) -> 2-layer bidirectional LSTM or GRU (hidden 256) -> linear tag logits (20
tags), 3-3.5M parameters, random weights (torch's own initialisation): enough to measure what compression does to the
recurrent weights, meaningless as a tagger. Exported with torch's TorchScript exporter (``dynamo=False``), which hands
the recurrent op its ``W`` [directions, gates * hidden, inputs] and ``R`` [directions, gates * hidden, hidden] as
initializers; torch's dynamo exporter instead assembles them at run time from slices of the torch parameters (gate
order differs), which jlcm-onnx does not compress yet.

``evaluate`` runs both models on 64 batches of random token ids (seeded) and reports the file ratio, the mean cosine
of the tag logits per position and top-1 tag agreement (:func:`jlcm_onnx.verify`).

Command line::

    python models/recurrent_tagger.py export OUT.onnx [--cell lstm|gru]
    python models/recurrent_tagger.py evaluate ORIGINAL.onnx COMPRESSED.onnx [--json]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

VOCAB, WIDTH, HIDDEN, TAGS, LAYERS = 5000, 256, 256, 20, 2
INPUT_NAME, OUTPUT_NAME = "input_ids", "logits"
SAMPLES, SEQUENCE = 64, 32


def export(path: Path, cell: str = "lstm", seed: int = 0) -> None:
    """Builds the tagger with ``seed`` and exports it to ``path`` (batch and sequence axes dynamic)."""
    import torch

    torch.manual_seed(seed)

    class Tagger(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embedding = torch.nn.Embedding(VOCAB, WIDTH)
            recurrent = torch.nn.LSTM if cell == "lstm" else torch.nn.GRU
            self.recurrent = recurrent(WIDTH, HIDDEN, num_layers=LAYERS, bidirectional=True, batch_first=True)
            self.tags = torch.nn.Linear(2 * HIDDEN, TAGS)

        def forward(self, ids: torch.Tensor) -> torch.Tensor:
            return self.tags(self.recurrent(self.embedding(ids))[0])

    example = torch.zeros(2, 7, dtype=torch.long)
    axes = {0: "batch", 1: "sequence"}
    torch.onnx.export(Tagger().eval(), (example,), str(path), dynamo=False, input_names=[INPUT_NAME],
                      output_names=[OUTPUT_NAME], dynamic_axes={INPUT_NAME: axes, OUTPUT_NAME: axes})


def evaluate(original: Path, compressed: Path) -> dict[str, Any]:
    """File ratio, per-position logit cosine and top-1 tag agreement on seeded random token ids."""
    import jlcm_onnx

    ids = np.random.default_rng(0).integers(0, VOCAB, (SAMPLES, SEQUENCE), dtype=np.int64)
    report = jlcm_onnx.verify(original, compressed, [{INPUT_NAME: ids}], samples=None, repeats=3)
    (logits,) = report.outputs
    return {"ratio": report.ratio, "cosine": logits.cosine, "top1_agreement": logits.top1_agreement,
            "kl_divergence": logits.kl_divergence, "original_bytes": report.original_file_bytes,
            "compressed_bytes": report.compressed_file_bytes}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    exporting = commands.add_parser("export")
    exporting.add_argument("output", type=Path)
    exporting.add_argument("--cell", choices=("lstm", "gru"), default="lstm")
    evaluating = commands.add_parser("evaluate")
    evaluating.add_argument("original", type=Path)
    evaluating.add_argument("compressed", type=Path)
    evaluating.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    if args.command == "export":
        export(args.output, args.cell)
        print(f"exported {args.output} ({args.output.stat().st_size:,} bytes)")
        return 0
    result = evaluate(args.original, args.compressed)
    print(json.dumps(result, indent=2) if args.json else
          f"{result['ratio']:.2f}x smaller, logit cosine {result['cosine']:.4f}, top-1 {result['top1_agreement']:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
