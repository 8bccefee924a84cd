"""The command line shared by the model scripts: ``export OUT.onnx`` and ``evaluate ORIGINAL COMPRESSED [--json]``."""

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
