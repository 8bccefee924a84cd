"""Generates the "Numbers" section of README.md: all-MiniLM-L6-v2 compressed data-free at 2, 3 and 4 bits, next to
onnxruntime's own 4-bit weight-only quantizer, on the same model and the same texts, in one run.

Steps (outputs under ``build/``):

1. export all-MiniLM-L6-v2 to ``build/minilm.onnx`` if it is missing (``models/minilm.py``);
2. compress it with jlcm-onnx (default config, ``bits`` = 2, 3, 4) and with onnxruntime's ``MatMulNBitsQuantizer``
   (RTN, asymmetric, block 32, MatMul and Gather);
3. compare every file with the fp32 original on the 1,391 evaluation texts (mean embedding cosine and three task
   metrics, ``models/minilm.py evaluate``);
4. measure load peak, after-load and steady RSS and latency of each file with default onnxruntime options, each in a
   fresh process (``bench/memory.py``), at batch 1 x 16 tokens;
5. write ``bench/results/minilm.json`` and replace the text between the ``numbers`` markers of README.md.

Run: ``python bench/minilm_numbers.py`` (about 3 minutes on 2 cores).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from datetime import date
from pathlib import Path
from typing import Any

import onnx
import onnxruntime as ort

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "models"), str(ROOT / "bench")]

from readme_section import write_section  # noqa: E402

import jlcm_onnx  # noqa: E402

import memory  # noqa: E402
import minilm  # noqa: E402

BUILD = ROOT / "build"
RESULTS = ROOT / "bench" / "results" / "minilm.json"
MB = 1024 * 1024


def compress_jlcm(original: Path, bits: int) -> tuple[Path, float]:
    target = BUILD / f"minilm-jlcm-{bits}bit.onnx"
    started = time.perf_counter()
    jlcm_onnx.compress(original, jlcm_onnx.CompressionConfig(bits=bits)).save(target)
    return target, time.perf_counter() - started


def compress_ort_rtn(original: Path, bits: int = 4, block: int = 32) -> tuple[Path, float]:
    from onnxruntime.quantization import matmul_nbits_quantizer as nbits

    target = BUILD / f"minilm-ort-rtn{bits}-b{block}.onnx"
    started = time.perf_counter()
    axes = (("MatMul", 0), ("Gather", 1))
    kinds = ("MatMul", "Gather")
    config = nbits.DefaultWeightOnlyQuantConfig(block_size=block, is_symmetric=False, bits=bits,
                                                op_types_to_quantize=kinds, quant_axes=axes)
    quantizer = nbits.MatMulNBitsQuantizer(onnx.load(original), bits=bits, block_size=block, is_symmetric=False,
                                           op_types_to_quantize=kinds, quant_axes=axes, algo_config=config)
    quantizer.process()
    quantizer.model.save_model_to_file(str(target), use_external_data_format=False)
    return target, time.perf_counter() - started


def run() -> dict[str, Any]:
    BUILD.mkdir(exist_ok=True)
    original = BUILD / "minilm.onnx"
    if not original.exists():
        minilm.export(original)
    methods: list[tuple[str, Path, float | None]] = [("fp32 (original)", original, None)]
    for bits in (4, 3, 2):
        path, seconds = compress_jlcm(original, bits)
        methods.append((f"jlcm-onnx {bits}-bit, data-free", path, seconds))
    path, seconds = compress_ort_rtn(original)
    methods.append(("onnxruntime MatMulNBits RTN 4-bit, block 32", path, seconds))
    rows = []
    for name, path, seconds in methods:
        quality = minilm.evaluate(original, path)
        cost = memory.measure(path, runs=20, batch=1, seq=16)
        rows.append({"method": name, "file": path.name, "compress_seconds": seconds, **quality, "memory": cost})
    return {
        "date": date.today().isoformat(),
        "machine": f"{platform.machine()}, {platform.processor() or 'cpu'}, python {platform.python_version()}",
        "onnxruntime": ort.__version__,
        "onnx": onnx.__version__,
        "jlcm_onnx": jlcm_onnx.__version__,
        "rows": rows,
    }


def to_markdown(results: dict[str, Any]) -> str:
    lines = [
        f"all-MiniLM-L6-v2 (22.7M parameters), measured {results['date']} by `python bench/minilm_numbers.py` "
        f"(onnxruntime {results['onnxruntime']}, CPU, 2 threads). Fidelity: mean cosine between the compressed and "
        f"the original sentence embeddings over {results['rows'][0]['num_texts']} real texts (Lee corpus documents, "
        "SimLex-999 and WordSim-353 words); task metrics as in `models/minilm.py`.",
        "",
        "| method | file MB | ratio | cosine | Lee r | SimLex ρ | WordSim ρ | compress s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in results["rows"]:
        metrics = row["compressed"]
        seconds = "" if row["compress_seconds"] is None else f"{row['compress_seconds']:.1f}"
        lines.append(
            f"| {row['method']} | {row['compressed_bytes'] / 1e6:.2f} | {row['ratio']:.2f}x | {row['mean_cosine']:.4f}"
            f" | {metrics['lee_pearson']:.3f} | {metrics['simlex_spearman']:.3f} | {metrics['wordsim_spearman']:.3f}"
            f" | {seconds} |"
        )
    lines += [
        "",
        "Memory and latency with default onnxruntime options, each file in a fresh process, batch 1 x 16 tokens "
        "(RSS net of the interpreter's baseline; steady = after 23 runs):",
        "",
        "| method | load peak MB | after load MB | steady MB | latency ms |",
        "|---|---|---|---|---|",
    ]
    for row in results["rows"]:
        cost = row["memory"]
        lines.append(
            f"| {row['method']} | {cost['load_peak_net'] / MB:.1f} | {cost['after_load_net'] / MB:.1f}"
            f" | {cost['steady_net'] / MB:.1f} | {cost['latency_ms_median']:.1f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--no-readme", action="store_true", help="only write bench/results/minilm.json")
    args = parser.parse_args()
    results = run()
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2))
    markdown = to_markdown(results)
    if not args.no_readme:
        write_section("numbers", markdown)
    print(markdown)


if __name__ == "__main__":
    main()
