"""Speed 'balanced': codebooks where they save the most weight error for the run time they add, fused affine blocks
elsewhere.

A weight read by one MatMul or Gemm (as B) at 2, 4 or 8 bits can be written as affine blocks, a ``DequantizeLinear``
that onnxruntime fuses with its reader into ``MatMulNBits`` (about the dense product's time or less), or as codebooks,
decoded on every run (many times the dense product's time at one token) and usually of smaller error at the same
bits. With ``n_t`` weights, ``t(f)`` the run time per weight of format ``f`` at one row of activations (one token at
batch 1, where decoding weighs the most against the product: :mod:`jlcm_onnx.pipeline.run_costs`) and ``D_t(f)`` the
relative weight error of the format at the weight's bits, measured on a sample of rows encoded both ways (as the size
planner measures it, :mod:`jlcm_onnx.pipeline.distortion`), the planner picks every weight's format ``f_t`` to::

    minimise  sum_t D_t(f_t)   subject to   sum_t n_t t(f_t) <= r sum_t n_t t_dense          r = max_latency_ratio

Starting from every such weight fused, it moves weights to codebooks in order of error saved per nanosecond added,
each while the total still fits (a greedy knapsack). Weights no fused kernel reads (Conv, ConvTranspose, tied
heads, other bit widths) keep codebooks and count at their codebook time; an embedding table read by one Gather,
decoded at the looked-up rows only, counts for nothing. The estimate counts the products of the compressed weights
only; the rest of the model runs the same in every file, so the whole model's ratio is lower.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx

from jlcm_onnx.analysis.plan import CompressionPlan
from jlcm_onnx.config import FAST_BITS, CompressionConfig
from jlcm_onnx.devices import map_on_cores
from jlcm_onnx.encodings.affine_format import AffineBlocksFormat
from jlcm_onnx.encodings.base import codebook_dtype
from jlcm_onnx.encodings.codebook import equal_group_sizes
from jlcm_onnx.encodings.registry import encoding_for
from jlcm_onnx.ir.weight_sites import WeightSite, compressible_sites, is_lone_table_gather
from jlcm_onnx.pipeline.distortion import ESTIMATE_ITERATIONS, SAMPLE_ROWS
from jlcm_onnx.pipeline.run_costs import RunCosts

#: The readers whose weight input onnxruntime fuses with a DequantizeLinear into MatMulNBits.
FUSED_READERS = ("MatMul", "Gemm")


@dataclass(frozen=True)
class WeightFormats:
    """One fusable weight: its ``weights``, ``bits``, and the relative error and run time (ns at one row) of each
    format."""

    name: str
    weights: int
    codebook_error: float
    fused_error: float
    codebook_ns: float
    fused_ns: float

    @property
    def saving(self) -> float:
        """Error saved per nanosecond added by codebooks (0 when they save none)."""
        extra = self.codebook_ns - self.fused_ns
        gain = self.fused_error - self.codebook_error
        return gain / extra if gain > 0 and extra > 0 else 0.0


@dataclass(frozen=True)
class SpeedPlan:
    """The weights 'balanced' fuses, the estimated time of the products over the dense ones, and the report's note."""

    fast: tuple[str, ...]
    estimated_ratio: float
    note: str


def plan_speeds(model: onnx.ModelProto, config: CompressionConfig, progress: bool = False,
                costs: RunCosts | None = None) -> SpeedPlan:
    """Each fusable weight's format under speed 'balanced' (see the module docstring)."""
    costs = costs or RunCosts.packaged()
    sites = [(site, axis) for site, axis in compressible_sites(model, config) if not is_lone_table_gather(site, axis)]
    fusable = [(site, axis) for site, axis in sites if _fusable(site, axis, config)]
    measured = map_on_cores(lambda item: _formats(*item, config, costs), fusable, description="weighing formats",
                            weight=lambda item: min(item[0].shape[item[1]], SAMPLE_ROWS), progress=progress)
    fused_names = {site.name for site, _ in fusable}
    dense = sum(site.num_elements for site, _ in sites) * costs.dense
    time = sum(site.num_elements * costs.codebook_ns(_bits(site, config)) for site, _ in sites
               if site.name not in fused_names) + sum(weight.weights * weight.fused_ns for weight in measured)
    in_codebooks, time = in_codebooks_within(measured, time, config.max_latency_ratio * dense)
    fast = tuple(weight.name for weight in measured if weight.name not in in_codebooks)
    ratio = time / dense if dense else 1.0
    note = (f"speed balanced: {len(fast)} of {len(sites)} weights read by products in fused affine blocks, "
            f"{len(sites) - len(fast)} in codebooks; their products estimated at {ratio:.2f}x the dense ones' time "
            f"at one token (at most {config.max_latency_ratio:g}x; cost model measured on {costs.machine})")
    if ratio > config.max_latency_ratio:
        note += "; the weights no fused kernel reads take more than that alone"
    return SpeedPlan(fast, ratio, note)


def in_codebooks_within(weights: list[WeightFormats], time: float, budget: float) -> tuple[set[str], float]:
    """The weights moved from fused blocks to codebooks, in order of error saved per nanosecond added, each while the
    estimated ``time`` (every weight fused) stays within ``budget``; and the time then."""
    chosen = set()
    for weight in sorted(weights, key=lambda w: (-w.saving, w.name)):
        extra = weight.weights * (weight.codebook_ns - weight.fused_ns)
        if weight.saving > 0 and time + extra <= budget:
            time += extra
            chosen.add(weight.name)
    return chosen, time


def _bits(site: WeightSite, config: CompressionConfig) -> int:
    return config.override_settings(site.name, {c.node.op_type for c in site.consumers}).get("bits", config.bits)


def _fusable(site: WeightSite, row_axis: int, config: CompressionConfig) -> bool:
    """A [rows, cols] weight with one reader, a MatMul or Gemm reading it as B, at bits a fused kernel runs, and no
    speed of its own."""
    readers = {consumer.node.op_type for consumer in site.consumers}
    return (len(site.consumers) == 1 and len(site.shape) == 2 and readers <= set(FUSED_READERS)
            and site.consumers[0].input_index == 1 and _bits(site, config) in FAST_BITS
            and "speed" not in config.override_settings(site.name, readers))


def _formats(site: WeightSite, row_axis: int, config: CompressionConfig, costs: RunCosts) -> WeightFormats:
    """Both formats of a fusable weight, their errors measured on ``SAMPLE_ROWS`` rows taken evenly through it."""
    bits = _bits(site, config)
    weight = site.array()
    rows = weight.shape[row_axis]
    matrix = np.ascontiguousarray(np.moveaxis(weight, row_axis, 0).reshape(rows, -1), dtype=np.float32)
    picks = np.linspace(0, rows - 1, min(rows, SAMPLE_ROWS)).round().astype(int)
    sample = matrix[picks]
    groups = CompressionPlan(config).groups(site.name, rows, matrix.shape[1])
    sizes = equal_group_sizes(len(picks), max(1, round(groups * len(picks) / rows)))
    dtype = codebook_dtype(config, site.tensor.data_type, matrix)
    signal = float(np.sum(sample.astype(np.float64) ** 2)) or 1.0
    errors = [encoding.squared_errors(sample, [bits], sizes, dtype, config, ESTIMATE_ITERATIONS)[bits] / signal
              for encoding in (encoding_for(site, row_axis, config), AffineBlocksFormat())]
    return WeightFormats(site.name, site.num_elements, *errors, costs.codebook_ns(bits),
                         costs.fused_ns(bits, config.affine_block_size))
