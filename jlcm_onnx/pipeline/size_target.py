"""Choosing bits and groups per tensor so the compressed model meets a size target.

The stored bytes of a tensor at b bits with G groups are its format's estimate
(:meth:`~jlcm_onnx.encodings.base.Encoding.stored_bytes`; codebooks: :mod:`jlcm_onnx.encodings.codebook_formats`).

Which (b, G) each tensor gets is a rate-distortion choice: the planner minimises the summed measured relative weight
error ``sum_t D_t(b_t, G_t)`` (:mod:`jlcm_onnx.pipeline.distortion`) subject to ``sum_t cost_t <= budget``. For a
multiplier ``lambda`` every tensor independently picks ``argmin_o D_t(o) + lambda * cost_t(o)``; ``lambda`` is bisected
(in log space) to the smallest value whose total fits, which lands on the lower convex hull of every tensor's options.
What is left under the budget is spent greedily on the upgrades with the largest error drop per byte, then in fine steps
of group counts and outliers (:func:`adjust_fine`), so the total lands close to the budget.

**Error floor (data-free).** Summed relative errors let the planner starve one tensor to feed many: a large tensor
whose bytes buy little error elsewhere (a CTC or classifier head) ends at 2-3 bits although the output reads it
directly. Without calibration data to show that, no tensor may exceed a cap ``D_t <= D_cap``: the lowest cap whose
cheapest plan (each tensor's cheapest option under the cap) takes at most ``FLOOR_SHARE`` of the budget, found by
bisection in log space (:func:`error_floor`). The planner spends the rest as above, over the options under the cap.
With calibration data the output sensitivities weigh the errors instead (:mod:`jlcm_onnx.pipeline.sensitivity`).
"""

from __future__ import annotations

import onnx

from jlcm_onnx.analysis.plan import TensorChoice
from jlcm_onnx.config import CompressionConfig
from jlcm_onnx.encodings.base import WeightShape, codebook_dtype
from jlcm_onnx.encodings.registry import encoding_for
from jlcm_onnx.encodings.vector_format import vector_groups
from jlcm_onnx.errors import JlcmError
from jlcm_onnx.ir.weight_sites import compressible_sites, is_lone_table_gather, is_row_packed
from jlcm_onnx.pipeline.distortion import ErrorTable

#: Most outliers the size planner keeps in one tensor when it spends a budget on them.
MAX_OUTLIER_FRACTION = 0.02
#: Data-free, the cheapest plan under the error floor may take this share of the budget (see the module docstring).
FLOOR_SHARE = 0.8
#: The floor is searched between these powers of ten of relative error, in this many bisection steps.
FLOOR_LOG10_RANGE, FLOOR_STEPS = (-12.0, 1.0), 40

def weight_shapes(model: onnx.ModelProto, config: CompressionConfig) -> list[WeightShape]:
    """The compressible weights of ``model`` under ``config``."""
    shapes = []
    for site, row_axis in compressible_sites(model, config):
        itemsize = onnx.helper.tensor_dtype_to_np_dtype(site.tensor.data_type).itemsize
        value_bytes = codebook_dtype(config, site.tensor.data_type).itemsize
        shapes.append(WeightShape(site.name, site.num_elements, site.shape[row_axis], value_bytes,
                                  is_lone_table_gather(site, row_axis), itemsize, encoding_for(site, row_axis, config),
                                  is_row_packed(site, row_axis)))
    return shapes


def tensor_cost(shape: WeightShape, choice: TensorChoice, config: CompressionConfig) -> int:
    """Stored bytes of ``shape`` encoded with ``choice``, as its format estimates them."""
    groups = shape.rows if choice.groups is None else min(choice.groups, shape.rows)
    if choice.groups is None and shape.encoding.vector_dim(config) > 1:  # vector codebooks pool rows by default
        groups = vector_groups(shape.rows, shape.size // shape.rows, choice.bits, config.vector_dim)
    fraction = config.outlier_fraction if choice.outlier_fraction is None else choice.outlier_fraction
    return shape.encoding.stored_bytes(shape, choice.bits, groups, fraction, config)


def total_cost(shapes: list[WeightShape], choices: dict[str, TensorChoice], config: CompressionConfig) -> int:
    return sum(tensor_cost(s, choices[s.name], config) for s in shapes)


def smallest_cost(shapes: list[WeightShape], config: CompressionConfig) -> int:
    return sum(tensor_cost(s, TensorChoice(1, 1), config) for s in shapes)


def largest_cost(shapes: list[WeightShape], config: CompressionConfig) -> int:
    return sum(tensor_cost(s, TensorChoice(config.max_bits, None), config) for s in shapes)


def error_floor(shapes: list[WeightShape], budget: int, config: CompressionConfig,
                errors: ErrorTable) -> float | None:
    """The lowest cap on every tensor's relative error whose cheapest plan takes at most :data:`FLOOR_SHARE` of
    ``budget`` (see the module docstring); None when even the loosest cap's does not (a budget near the smallest
    file leaves no room for a floor)."""
    def cheapest(cap: float) -> int:
        table = capped_errors(errors, cap)
        return sum(min(tensor_cost(s, option, config) for option in table[s.name]) for s in shapes)

    low, high = FLOOR_LOG10_RANGE
    if cheapest(10.0**high) > FLOOR_SHARE * budget:
        return None
    for _ in range(FLOOR_STEPS):
        middle = (low + high) / 2
        low, high = (low, middle) if cheapest(10.0**middle) <= FLOOR_SHARE * budget else (middle, high)
    return 10.0**high


def capped_errors(errors: ErrorTable, cap: float) -> ErrorTable:
    """Every tensor's options whose error is at most ``cap`` (its lowest-error option where none is)."""
    capped = {}
    for name, options in errors.items():
        kept = {option: error for option, error in options.items() if error <= cap}
        capped[name] = kept or dict([min(options.items(), key=lambda item: item[1])])
    return capped


def plan_for_budget(
    shapes: list[WeightShape], budget: int, config: CompressionConfig, errors: ErrorTable
) -> dict[str, TensorChoice]:
    """Per-tensor choices of least summed error (``errors``, every tensor's options) whose total cost is at most
    ``budget`` bytes and as close to it as the steps allow (see the module docstring)."""
    if budget < smallest_cost(shapes, config):
        raise JlcmError("size target too small for the weights' stored bytes")
    options = {s.name: [(tensor_cost(s, c, config), error, c) for c, error in errors[s.name].items()] for s in shapes}

    def choose(multiplier: float) -> dict[str, tuple[int, float, TensorChoice]]:
        return {name: min(opts, key=lambda o: (o[1] + multiplier * o[0], o[0])) for name, opts in options.items()}

    def total(picked: dict[str, tuple[int, float, TensorChoice]]) -> int:
        return sum(cost for cost, _, _ in picked.values())

    low, high = -30.0, 10.0  # log10 of the multiplier: error per byte
    if total(choose(10.0**high)) > budget:
        picked = {name: min(opts, key=lambda o: o[0]) for name, opts in options.items()}
    else:
        for _ in range(60):
            middle = (low + high) / 2
            low, high = (low, middle) if total(choose(10.0**middle)) <= budget else (middle, high)
        picked = choose(10.0**high)
    leftover = budget - total(picked)
    while True:  # greedy: the upgrade with the largest error drop per byte that still fits
        best, best_gain = None, 0.0
        for name, (cost, error, _) in picked.items():
            for option in options[name]:
                extra = option[0] - cost
                if 0 < extra <= leftover and (error - option[1]) / extra > best_gain:
                    best, best_gain = (name, option), (error - option[1]) / extra
        if best is None:
            break
        leftover -= best[1][0] - picked[best[0]][0]
        picked[best[0]] = best[1]
    choices = {name: choice for name, (_, _, choice) in picked.items()}
    return adjust_fine(shapes, choices, leftover, config)[0]


def adjust_fine(
    shapes: list[WeightShape], choices: dict[str, TensorChoice], change: int, config: CompressionConfig
) -> tuple[dict[str, TensorChoice], int]:
    """Moves the total cost by about ``change`` bytes without changing any tensor's bits (so the decoders, and their
    bytes, stay as measured): first through group counts, then through outlier counts, largest tensors first. The
    fine correction once a run has measured what the planner cannot see; returns the new choices and the part of
    ``change`` they could not absorb."""
    adjusted = dict(choices)
    for knob in (_with_groups, _with_outliers):
        for shape in sorted(shapes, key=lambda s: -s.size):
            before = tensor_cost(shape, adjusted[shape.name], config)
            candidate = knob(shape, adjusted[shape.name], change, config)
            if candidate is not None:
                adjusted[shape.name] = candidate
                change -= tensor_cost(shape, candidate, config) - before
    return adjusted, change


def _with_groups(
    shape: WeightShape, choice: TensorChoice, change: int, config: CompressionConfig
) -> TensorChoice | None:
    if choice.groups is None or shape.rows < 4:
        return None
    step = tensor_cost(shape, TensorChoice(choice.bits, 3), config) - tensor_cost(
        shape, TensorChoice(choice.bits, 2), config)
    if step <= 0 or abs(change) < step:  # a format whose cost does not depend on the group count
        return None
    groups = min(max(choice.groups + int(change / step), 2), shape.rows - 1)
    before = tensor_cost(shape, choice, config)
    while change > 0 and groups > choice.groups and tensor_cost(
            shape, TensorChoice(choice.bits, groups, choice.outlier_fraction), config) - before > change:
        groups -= 1  # never spend more than offered: the step from one group to two also stores the row map
    return None if groups == choice.groups else TensorChoice(choice.bits, groups, choice.outlier_fraction)


def _with_outliers(
    shape: WeightShape, choice: TensorChoice, change: int, config: CompressionConfig
) -> TensorChoice | None:
    step = tensor_cost(shape, TensorChoice(choice.bits, choice.groups, 1 / shape.size), config) - tensor_cost(
        shape, TensorChoice(choice.bits, choice.groups, 0.0), config)  # one outlier's bytes; none in a row decoder
    if step <= 0 or abs(change) < step:
        return None
    current = config.outlier_fraction if choice.outlier_fraction is None else choice.outlier_fraction
    count = round(current * shape.size) + int(change / step)  # whole outliers: never over
    return TensorChoice(choice.bits, choice.groups, min(max(count / shape.size, 0.0), MAX_OUTLIER_FRACTION))
