"""Calibration batches padded the usual way: does padding change what the statistics learn?

MiniLM, 3 bits, calibrated on the same 128 sentences (``models/minilm.py``'s calibration texts, not its evaluation
texts) three ways: one sentence per sample without padding ("packed"); batches of 16 padded to 128 tokens as a
tokenizer's ``padding="max_length"`` writes them, with the attention mask left to mark the padding; the same padded
batches with the mask ignored (``mask=None``, what the statistics did before they read it). Fidelity is
``models/minilm.py evaluate``'s (mean cosine of the embeddings to the fp32 model's on its evaluation texts). Results go
to ``bench/results/calibration_padding.json`` and the "calibration-padding" section of BENCHMARKS.md.

Command line::

    python bench/calibration_padding.py [--render-only]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(ROOT / "models"))
from readme_section import stored_or_measured, write_section  # noqa: E402

import jlcm_onnx  # noqa: E402

import minilm  # noqa: E402

RESULTS = ROOT / "bench" / "results" / "calibration_padding.json"
BENCHMARKS = ROOT / "BENCHMARKS.md"
ORIGINAL = ROOT / "build" / "minilm.onnx"
BITS, SENTENCES, BATCH, PADDED_LENGTH = 3, 128, 16, 128


def padded_batches(texts: list[str]) -> list[dict[str, np.ndarray]]:
    tokenizer = minilm.get_tokenizer()
    batches = []
    for start in range(0, len(texts), BATCH):
        encoded = tokenizer(texts[start:start + BATCH], padding="max_length", truncation=True,
                            max_length=PADDED_LENGTH, return_tensors="np")
        batches.append({name: np.asarray(value, dtype=np.int64) for name, value in encoded.items()})
    return batches


def measure() -> list[dict]:
    if not ORIGINAL.exists():
        minilm.export(ORIGINAL)
    texts = minilm.load_calibration_texts(SENTENCES)
    packed = [minilm.tokenize([text]) for text in texts]
    padded = padded_batches(texts)
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        output = Path(folder) / "out.onnx"
        for label, feeds, mask in (("packed, one sentence per sample", packed, "auto"),
                                   (f"padded to {PADDED_LENGTH} tokens, mask read", padded, "auto"),
                                   (f"padded to {PADDED_LENGTH} tokens, mask ignored", padded, None)):
            data = jlcm_onnx.load_calibration(feeds, ORIGINAL, mask=mask)
            real, total = data.positions() if data.mask else (None, None)
            started = time.perf_counter()
            result = jlcm_onnx.compress(ORIGINAL, jlcm_onnx.CompressionConfig(bits=BITS), data)
            seconds = time.perf_counter() - started
            result.save(output)
            metrics = minilm.evaluate(ORIGINAL, output)
            tokens = sum(feed["attention_mask"].size for feed in feeds)
            rows.append({"calibration": label, "tokens": tokens, "real_tokens": real, "ratio": metrics["ratio"],
                         "fidelity": metrics["fidelity"], "seconds": round(seconds, 1)})
            print(json.dumps(rows[-1]), flush=True)
    return rows


def markdown(rows: list[dict]) -> str:
    lines = [
        f"MiniLM, {BITS} bits, calibrated on the same {SENTENCES} sentences three ways; fidelity on the evaluation "
        "texts (another source). Measured by `python bench/calibration_padding.py`.",
        "",
        "| calibration | tokens fed | tokens counted | ratio | fidelity |",
        "|---|---|---|---|---|",
    ]
    for row in rows:
        counted = row["tokens"] if row["real_tokens"] is None else row["real_tokens"]
        lines.append(f"| {row['calibration']} | {row['tokens']:,} | {counted:,} | {row['ratio']:.2f}x | "
                     f"{row['fidelity']:.4f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--render-only", action="store_true", help="rewrite BENCHMARKS.md from the stored results")
    args = parser.parse_args(argv)
    write_section("calibration-padding", markdown(stored_or_measured(RESULTS, args.render_only, measure)), BENCHMARKS)
    return 0


if __name__ == "__main__":
    sys.exit(main())
