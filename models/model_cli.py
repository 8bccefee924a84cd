"""What the model scripts share: the command line (``export OUT.onnx`` and ``evaluate ORIGINAL COMPRESSED [--json]``),
cleaning an exported file, file sizes and the metric-delta lines of a summary."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any


def run(
    description: str,
    export: Callable[[Path], None],
    evaluate: Callable[[Path, Path], dict[str, Any]],
    format_summary: Callable[[dict[str, Any]], str],
    argv: Sequence[str] | None = None,
) -> int:
    """Parses ``argv`` and runs the export or the evaluation of one model script."""
    parser = argparse.ArgumentParser(description=description)
    commands = parser.add_subparsers(dest="command", required=True)
    export_parser = commands.add_parser("export", help="export the model to ONNX and verify it")
    export_parser.add_argument("output", type=Path, help="path of the .onnx file to write")
    evaluate_parser = commands.add_parser("evaluate", help="compare an original and a compressed model")
    evaluate_parser.add_argument("original", type=Path)
    evaluate_parser.add_argument("compressed", type=Path)
    evaluate_parser.add_argument("--json", action="store_true", help="print the result as JSON")
    args = parser.parse_args(argv)
    if args.command == "export":
        export(args.output)
        print(f"exported and verified {args.output} ({args.output.stat().st_size:,} bytes)")
    else:
        result = evaluate(args.original, args.compressed)
        print(json.dumps(result, indent=2) if args.json else format_summary(result))
    return 0


def export_dynamo(
    module: Any, args: tuple[Any, ...], path: Path, input_names: Sequence[str], output_names: Sequence[str],
    dynamic_shapes: Any, keep_metadata: bool = False,
) -> None:
    """``torch.onnx.export(dynamo=True)`` of ``module`` on ``args`` into one self-contained file at ``path``, cleaned by
    :func:`strip_debug_metadata` unless ``keep_metadata`` (the file as the exporter writes it)."""
    import torch

    with torch.no_grad():
        program = torch.onnx.export(module, args, input_names=list(input_names), output_names=list(output_names),
                                    dynamic_shapes=dynamic_shapes, dynamo=True, external_data=False, verbose=False)
    program.save(str(path), external_data=False)
    if not keep_metadata:
        strip_debug_metadata(path)


def logits_only(language_model: Any) -> Any:
    """A torch module (eval mode) running a transformers causal LM on ``(input_ids, attention_mask)`` and returning
    only its logits as a plain tensor (no KV cache): the shape exporters and ``evaluate`` expect."""
    import torch

    class Logits(torch.nn.Module):
        def __init__(self, lm: torch.nn.Module) -> None:
            super().__init__()
            self.lm = lm

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
            return self.lm(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits

    return Logits(language_model).eval()


def strip_debug_metadata(path: Path) -> Any:
    """Keeps the weights inside the .onnx file and drops the exporter's per-node debug metadata (Python stack traces
    with local paths, FX node dumps), which a deployed model does not carry; checks and rewrites the file and returns
    the model."""
    import onnx

    proto = onnx.load(str(path))
    for node in proto.graph.node:
        del node.metadata_props[:]
    onnx.checker.check_model(proto)
    onnx.save(proto, str(path), save_as_external_data=False)
    return proto


def file_sizes(original: Path, compressed: Path) -> dict[str, Any]:
    """``original_bytes``, ``compressed_bytes`` and ``ratio`` (original / compressed) of two model files."""
    original_bytes, compressed_bytes = Path(original).stat().st_size, Path(compressed).stat().st_size
    return {"original_bytes": original_bytes, "compressed_bytes": compressed_bytes,
            "ratio": original_bytes / compressed_bytes}


def metric_delta_lines(original: dict[str, float], compressed: dict[str, float]) -> list[str]:
    """A ``metric / original / compressed / delta`` table, one line per metric of ``original``."""
    lines = [f"{'metric':<18}{'original':>10}{'compressed':>12}{'delta':>10}"]
    for key, before in original.items():
        after = compressed[key]
        lines.append(f"{key:<18}{before:>10.4f}{after:>12.4f}{after - before:>+10.4f}")
    return lines
