"""The ``jlcm-onnx`` command line: a thin layer over :func:`jlcm_onnx.compress` with the same defaults.

Exit codes: 0 success, 2 bad usage or bad input (one line on stderr naming the problem), 1 internal error.
Set ``JLCM_ONNX_TRACEBACK=1`` to see the traceback of an internal error.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from functools import wraps
from pathlib import Path
from typing import Any

import click
import numpy as np

from jlcm_onnx.analysis.calibration import AUTO_MASK, DEFAULT_SAMPLES, load_calibration
from jlcm_onnx.config import AFFINE_OFFSETS, CODEBOOK_DTYPES, ENCODINGS, INITS, MAPPINGS, SPEEDS, CompressionConfig
from jlcm_onnx.devices import DEVICES, execution_providers
from jlcm_onnx.errors import ConfigError, JlcmError
from jlcm_onnx.ir.model_save import check_destination
from jlcm_onnx.pipeline.calibration_text import calibration_from_text, load_tokenizer
from jlcm_onnx.pipeline.compress import compress, save
from jlcm_onnx.pipeline.describe import describe_model
from jlcm_onnx.pipeline.verify import verify
from jlcm_onnx.plot import plot_encodings

EXIT_OK, EXIT_INTERNAL, EXIT_USAGE = 0, 1, 2


def _reporting_errors(command: Callable[..., Any]) -> Callable[..., Any]:
    """Turns library errors into one-line messages and the documented exit codes."""

    @wraps(command)
    def run(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except JlcmError as error:
            click.echo(f"error: {error}", err=True)
            sys.exit(EXIT_USAGE)
        except (click.exceptions.Exit, click.ClickException, KeyboardInterrupt):
            raise
        except Exception as error:  # noqa: BLE001 - the CLI's last line of defence
            if os.environ.get("JLCM_ONNX_TRACEBACK"):
                raise
            click.echo(f"internal error: {type(error).__name__}: {error}".splitlines()[0], err=True)
            sys.exit(EXIT_INTERNAL)

    return run


def parse_override(text: str) -> dict[str, Any]:
    """``"op_type=Gather,bits=8"`` as ``{"op_type": "Gather", "bits": 8}``: integers and decimals as numbers,
    ``none`` as None, anything else as text; the config validates it."""
    override: dict[str, Any] = {}
    for part in text.split(","):
        key, equals, value = (piece.strip() for piece in part.partition("="))
        if not key or not equals:
            raise ConfigError("overrides", text, "SELECTOR,SETTING=VALUE,... such as 'op_type=Gather,bits=8'")
        override[key] = None if value.lower() == "none" else _number(value)
    return override


def _number(text: str) -> int | float | str:
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="jlcm-onnx")
def main() -> None:
    """Compress ONNX models into codebooks and bit-packed indices that run in stock onnxruntime."""


@main.command("compress")
@click.argument("model", type=click.Path(dir_okay=False, path_type=Path))
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), required=True,
              help="Where to write the compressed model (never the input file).")
@click.option("--config", "config_file", type=click.Path(dir_okay=False, path_type=Path),
              help="JSON file of config fields; the flags below override it.")
@click.option("--speed", type=click.Choice(SPEEDS),
              help="small: codebooks, the smallest file for its accuracy, slower than dense at run time; fast: "
                   "affine blocks that onnxruntime runs in its fused MatMulNBits kernel (bits 2, 4 or 8); balanced: "
                   "per weight, codebooks where they save the most error within --max-latency-ratio, fused affine "
                   "blocks elsewhere  [default: small]")
@click.option("--max-latency-ratio", type=float,
              help="With --speed balanced: the most estimated time of the weights' products, a multiple of the dense "
                   "ones' at one token  [default: 2]")
@click.option("--affine-offsets", type=click.Choice(AFFINE_OFFSETS),
              help="With --speed fast: an integer zero point per block, or a float offset (exact for weights from "
                   "GGUF Q4_1-style blocks; +12 bits per block)  [default: integer]")
@click.option("--decode-at-load", is_flag=True, default=None,
              help="No run-time decode gate: any onnxruntime decodes the weights once at load (dense speed and RAM).")
@click.option("--keep-debug-metadata", is_flag=True, default=None,
              help="Keep the exporter's per-node debug metadata (stack traces), dropped by default.")
@click.option("--bits", type=int, help="Bits per weight index, 1..8  [default: 4]")
@click.option("--groups", type=int, help="Codebooks per tensor over contiguous output rows  [default: one per row]")
@click.option("--encoding", type=click.Choice(ENCODINGS),
              help="One codebook per group, or one shared codebook and a scale per group  [default: multi-codebook]")
@click.option("--block-size", type=int,
              help="Inputs per block: with --speed small, a scale and an offset per block on top of the codebooks "
                   "(+32/B bits per weight; default none); with --speed fast, the affine block (default 32)")
@click.option("--vector-dim", type=int,
              help="Vector codebooks: one code per this many consecutive inputs of a row (2, 4, 8; bits x D <= 8), "
                   "learned GPTVQ-style with calibration data  [default: 1, scalar codebooks]")
@click.option("--reorder/--no-reorder", default=None,
              help="With --groups: cluster rows by distribution into contiguous groups  [default: --reorder]")
@click.option("--min-elements", type=int, help="Leave smaller weights as they are  [default: 1024]")
@click.option("--codebook-dtype", type=click.Choice(CODEBOOK_DTYPES), help="Codebook storage type  [default: float16]")
@click.option("--outlier-fraction", type=float,
              help="Fraction of weights kept beside the codebooks (dense-and-sparse), 0..0.1  [default: 0.002]")
@click.option("--include", multiple=True, help="Only compress weights whose name matches this glob (repeatable).")
@click.option("--exclude", multiple=True, help="Never compress weights whose name matches this glob (repeatable).")
@click.option("--override", "override_texts", multiple=True, metavar="SELECTOR,SETTING=VALUE,...",
              help="Per-tensor settings (repeatable, later ones win; name overrides over op-type ones), e.g. "
                   "'op_type=Gather,bits=8' or 'name=*attention*,bits=6,groups=1'. Settings: bits, groups "
                   "(none: one per row), outlier_fraction.")
@click.option("--target-size", help="Size of the output file, e.g. 40MB or 1.5GiB (bits and groups per tensor)")
@click.option("--ratio", "target_ratio", type=float, help="Make the file this many times smaller than MODEL")
@click.option("--bits-per-weight", "target_bits_per_weight", type=float,
              help="Average stored bits per compressed weight, codebooks included")
@click.option("--seed", type=int, help="Seed of every random choice  [default: 0]")
@click.option("--calibration", type=click.Path(path_type=Path),
              help="Calibration inputs: a .npz file or a folder of .npy/.npz files keyed by model input names.")
@click.option("--calibration-samples", type=click.IntRange(min=1), default=DEFAULT_SAMPLES, show_default=True,
              help="Most calibration samples used (a seeded sub-sample when there are more).")
@click.option("--calibration-mask", default=AUTO_MASK, show_default=True,
              help="The input whose zero positions are padding, left out of the statistics ('auto': an input named "
                   "attention_mask; 'none': count every position).")
@click.option("--mapping", type=click.Choice(MAPPINGS),
              help="With --calibration: how codes move while codebooks are learned  [default: proximal]")
@click.option("--init", type=click.Choice(INITS),
              help="With --calibration: where learning starts  [default: error-feedback]")
@click.option("--sequential/--no-sequential", default=None,
              help="With --calibration: calibrate each level of layers with the earlier ones compressed  "
                   "[default: --no-sequential]")
@click.option("--learning-steps", type=int,
              help="With --calibration: optimiser steps per layer after the init  [default: 0]")
@click.option("--device", type=click.Choice(DEVICES), default="cpu", show_default=True,
              help="With --calibration: where onnxruntime collects statistics and torch learns.")
@click.option("--max-memory", help="Memory the run may use, e.g. 4GB; it sizes the encoders' chunks (not the output), "
                                   "and a run estimated above it is refused before it starts  [default: 80% of the "
                                   "available memory]")
@click.option("--workers", type=click.IntRange(min=1),
              help="Encode the weights in this many worker processes (same output)  [default: threads, one per "
                   "core]")
@click.option("--ray", "ray_address", metavar="ADDRESS",
              help="Encode the weights as tasks on the Ray cluster at ADDRESS ('local' starts one here; 'auto', "
                   "'ray://HOST:10001' join one; needs jlcm-onnx[ray]); same output.")
@click.option("--force", is_flag=True, help="Compress a model that jlcm-onnx already compressed (refused otherwise).")
@click.option("--json", "as_json", is_flag=True, help="Print the machine-readable report on stdout.")
@click.option("--quiet", is_flag=True,
              help="No progress on stderr (bars in a terminal; in a log, one line per phase and per tenth of it).")
@_reporting_errors
def compress_command(model: Path, output: Path, config_file: Path | None, calibration: Path | None,
                     calibration_samples: int, calibration_mask: str, device: str, force: bool, as_json: bool,
                     quiet: bool, override_texts: tuple[str, ...], **flags: Any) -> None:
    """Compress MODEL and write the result to the file named by -o."""
    check_destination(output, protect=model)
    config = CompressionConfig.from_file(config_file) if config_file else CompressionConfig()
    changes = {key: value for key, value in flags.items() if value not in (None, ())}
    if override_texts:
        changes["overrides"] = [*config.overrides, *(parse_override(text) for text in override_texts)]
    config = config.replace(**changes) if changes else config
    data = None
    if calibration is not None:
        mask = None if calibration_mask.lower() == "none" else calibration_mask
        data = load_calibration(calibration, model, samples=calibration_samples, seed=config.seed, mask=mask)
    result = compress(model, config, calibration=data, progress=not quiet, device=device, force=force)
    save(result, output)
    for note in result.report.notes:
        if note.startswith("warning:"):
            click.echo(note, err=True)
    if as_json:
        click.echo(result.report.to_json())
    else:
        click.echo(result.report.format_table())
        click.echo(f"wrote {output}")


@main.command("inspect")
@click.argument("model", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the machine-readable description on stdout.")
@click.option("--plot", type=click.Path(dir_okay=False, path_type=Path),
              help="Also draw a compressed model's bits per weight, format and error per layer to this image "
                   "(.png, .svg or .pdf; needs matplotlib).")
@_reporting_errors
def inspect_command(model: Path, as_json: bool, plot: Path | None) -> None:
    """Show MODEL's weights: for a compressed model its bits, groups, codebook sizes and bytes."""
    description = describe_model(model)
    if plot is not None:
        plot_encodings(description, plot)
    if as_json:
        click.echo(json.dumps(description.to_dict(), indent=2))
    else:
        click.echo(description.format_table())



@main.command("calibration-data")
@click.argument("model", type=click.Path(dir_okay=False, path_type=Path))
@click.argument("text", type=click.Path(dir_okay=False, exists=True, path_type=Path))
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), required=True,
              help="The .npz file to write (read by compress --calibration and verify --data).")
@click.option("--tokenizer", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="A folder holding the model's Hugging Face tokenizer (tokenizer.json, ...).")
@click.option("--max-length", type=click.IntRange(min=2), default=128, show_default=True,
              help="Tokens per sample (lines are truncated to it, packed windows are exactly this long).")
@click.option("--samples", type=click.IntRange(min=1), default=DEFAULT_SAMPLES, show_default=True,
              help="Most samples, spread evenly over the text.")
@click.option("--pack", is_flag=True,
              help="Cut the whole text into windows of --max-length tokens (decoder LLMs) instead of one sample per "
                   "line, padded (encoders).")
@_reporting_errors
def calibration_data_command(model: Path, text: Path, output: Path, tokenizer: Path, max_length: int, samples: int,
                             pack: bool) -> None:
    """Tokenize TEXT for MODEL into a calibration file."""
    check_destination(output, protect=model)
    feed = calibration_from_text(text.read_text(encoding="utf-8"), load_tokenizer(tokenizer), model,
                                 max_length=max_length, samples=samples, pack=pack)
    staged = output.with_name(f".{output.name}.partial.npz")
    try:
        np.savez(staged, **feed)
        os.replace(staged, output)
    finally:
        staged.unlink(missing_ok=True)
    count, length = next(iter(feed.values())).shape
    mask = feed.get("attention_mask")
    padding = "" if mask is None else f", {1 - np.count_nonzero(mask) / mask.size:.0%} padding"
    click.echo(f"wrote {output}: {count} samples of {length} tokens{padding}")


@main.command("verify")
@click.argument("original", type=click.Path(dir_okay=False, path_type=Path))
@click.argument("compressed", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--data", type=click.Path(path_type=Path),
              help="Inputs: a .npz file or a folder of .npy/.npz files keyed by model input names  "
                   "[default: seeded synthetic inputs]")
@click.option("--samples", type=click.IntRange(min=1), default=64, show_default=True,
              help="Most samples used (a seeded sub-sample of --data, or how many synthetic ones).")
@click.option("--device", type=click.Choice(DEVICES), default="cpu", show_default=True,
              help="onnxruntime execution provider.")
@click.option("--threads", type=click.IntRange(min=1), default=2, show_default=True,
              help="Intra-op threads of both sessions.")
@click.option("--repeats", type=click.IntRange(min=1), default=5, show_default=True,
              help="Timed runs per model; the median is reported.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of sub-sampling and synthetic inputs.")
@click.option("--json", "as_json", is_flag=True, help="Print the machine-readable report on stdout.")
@_reporting_errors
def verify_command(original: Path, compressed: Path, data: Path | None, samples: int, device: str, threads: int,
                   repeats: int, seed: int, as_json: bool) -> None:
    """Run ORIGINAL and COMPRESSED on the same inputs; report output fidelity, file sizes and latency."""
    providers = execution_providers(device)
    report = verify(original, compressed, data, samples=samples, seed=seed, providers=providers, threads=threads,
                    repeats=repeats)
    click.echo(report.to_json() if as_json else report.format_table())
