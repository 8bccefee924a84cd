"""A Llama-shaped decoder of any size, exported by torch to ONNX, with weights that look trained.

The architecture is transformers' ``LlamaForCausalLM`` (RMSNorm, rotary attention with grouped key/value heads, SwiGLU
MLP, an embedding table tied to the language-model head), built from a config and exported with the dynamo-based
``torch.onnx.export`` the way users export theirs (inputs ``input_ids`` / ``attention_mask``, output ``logits``, no KV
cache, the exporter's metadata kept). Files the exporter cannot hold in one protobuf (over 2 GB) get external data.

No weights are downloaded: they are random, shaped like trained ones. Every row of a weight matrix gets its own
scale (log-normal, sigma 0.5, so rows differ by ~3x within a layer) on a normal bulk of standard deviation 0.02, and
a fraction ``1e-4`` of weights are outliers at 10-30 row standard deviations; norms are 1 plus a little noise. Good
enough to measure memory, time and size; meaningless for quality.

The default size is the shape of a 268M-parameter model with a 262,144-word vocabulary (Gemma-3-270M's dimensions:
hidden 640, 18 layers, 4 query heads and 1 key/value head of 256, MLP 2,048): 1.07 GB in fp32, two thirds of it one
262,144 x 640 table, which is what current small LLMs look like.

Command line::

    python models/llama_shaped.py OUT.onnx [--vocab 262144] [--hidden 640] [--layers 18] [--intermediate 2048]
                                           [--heads 4] [--kv-heads 1] [--head-dim 256] [--fp16] [--seed 0]
"""

from __future__ import annotations

import argparse
import logging
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

import model_cli

LOG = logging.getLogger("llama_shaped")
INPUT_NAMES = ("input_ids", "attention_mask")
OUTPUT_NAME = "logits"
ROW_SCALE_SIGMA = 0.5
BULK_STD = 0.02
OUTLIER_FRACTION = 1e-4
#: Protobuf's hard limit: larger models keep their weights in a data file beside the .onnx.
PROTOBUF_LIMIT = 2**31


@dataclass(frozen=True)
class Shape:
    """The dimensions of the decoder (defaults: Gemma-3-270M's)."""

    vocab: int = 262_144
    hidden: int = 640
    layers: int = 18
    intermediate: int = 2048
    heads: int = 4
    kv_heads: int = 1
    head_dim: int = 256

    def parameters(self) -> int:
        attention = self.hidden * self.head_dim * (2 * self.heads + 2 * self.kv_heads)
        mlp = 3 * self.hidden * self.intermediate
        return self.vocab * self.hidden + self.layers * (attention + mlp + 2 * self.hidden) + self.hidden


def build(shape: Shape, seed: int = 0, fp16: bool = False):  # noqa: ANN201 - torch is imported lazily
    """The torch model (eval mode, float32 or, made so from the start, float16: a 7B model in float32 would not fit
    in 24 GB) with trained-looking random weights."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=shape.vocab, hidden_size=shape.hidden, intermediate_size=shape.intermediate,
        num_hidden_layers=shape.layers, num_attention_heads=shape.heads, num_key_value_heads=shape.kv_heads,
        head_dim=shape.head_dim, tie_word_embeddings=True, max_position_embeddings=4096, use_cache=False,
    )
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float16 if fp16 else torch.float32)
    try:
        model = LlamaForCausalLM(config).eval()
    finally:
        torch.set_default_dtype(default)
    rng = np.random.default_rng(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            parameter.copy_(torch.from_numpy(_trained_looking(tuple(parameter.shape), rng)))
            LOG.debug("%s %s", name, tuple(parameter.shape))
    return model


def _trained_looking(shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    """Norm weights near 1; matrices with a log-normal scale per row and a few large outliers (float32)."""
    if len(shape) == 1:
        return (1.0 + 0.05 * rng.standard_normal(shape)).astype(np.float32)
    rows, cols = shape
    values = rng.standard_normal(shape, dtype=np.float32)
    values *= (BULK_STD * rng.lognormal(0.0, ROW_SCALE_SIGMA, rows)).astype(np.float32)[:, None]
    count = int(OUTLIER_FRACTION * values.size)
    flat = rng.choice(values.size, count, replace=False)
    row_std = values.std(axis=1)[flat // cols]
    values.reshape(-1)[flat] = (rng.choice([-1.0, 1.0], count) * rng.uniform(10, 30, count) * row_std)
    return values


def export(path: Path, shape: Shape, fp16: bool = False, seed: int = 0) -> None:
    """Builds the model and writes it to ``path`` (external data beside it when over 2 GB), checked by
    ``onnx.checker`` on the path."""
    import onnx
    import torch

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    model = build(shape, seed, fp16)

    ids = torch.randint(0, shape.vocab, (2, 16), generator=torch.Generator().manual_seed(seed))
    batch, seq = torch.export.Dim("batch"), torch.export.Dim("seq", max=4096)
    external = shape.parameters() * (2 if fp16 else 4) >= PROTOBUF_LIMIT
    with torch.no_grad():
        program = torch.onnx.export(
            model_cli.logits_only(model), (ids, torch.ones_like(ids)), input_names=list(INPUT_NAMES),
            output_names=[OUTPUT_NAME], dynamic_shapes={name: {0: batch, 1: seq} for name in INPUT_NAMES},
            dynamo=True, external_data=external, verbose=False)
    del model
    program.save(str(path), external_data=external)
    onnx.checker.check_model(str(path), full_check=False)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("output", type=Path)
    defaults = Shape()
    for field_name in ("vocab", "hidden", "layers", "intermediate", "heads", "kv_heads", "head_dim"):
        parser.add_argument(f"--{field_name.replace('_', '-')}", type=int, default=getattr(defaults, field_name))
    parser.add_argument("--fp16", action="store_true", help="export in float16")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    shape = Shape(args.vocab, args.hidden, args.layers, args.intermediate, args.heads, args.kv_heads, args.head_dim)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    LOG.info("building a %.1fM-parameter decoder", shape.parameters() / 1e6)
    export(args.output, shape, args.fp16, args.seed)
    print(f"exported {args.output} ({args.output.stat().st_size:,} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
