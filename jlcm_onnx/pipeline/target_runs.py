"""Runs that meet a size target: the goal resolved against the input, the planner's first choices, and the loop that
rehearses them on stand-in encodings and corrects the budget until the file lands within 1% under the goal.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import onnx

from jlcm_onnx.analysis.calibration import CalibrationData
from jlcm_onnx.analysis.grouping import RowClusterings
from jlcm_onnx.analysis.plan import CompressionPlan, TensorChoice
from jlcm_onnx.config import CompressionConfig
from jlcm_onnx.devices import execution_providers
from jlcm_onnx.encodings.base import WeightShape
from jlcm_onnx.errors import JlcmError
from jlcm_onnx.ir.lazy_weights import materialize
from jlcm_onnx.ir.model_save import serialized_bytes
from jlcm_onnx.memory_budget import (
    MAX_CHUNK_WEIGHTS,
    release_freed_memory,
)
from jlcm_onnx.passes.manager import PipelineRun
from jlcm_onnx.pipeline.distortion import ErrorTable, estimate_errors
from jlcm_onnx.pipeline.pass_list import run_passes
from jlcm_onnx.pipeline.sensitivity import output_sensitivities, weight_errors
from jlcm_onnx.pipeline.size_target import (
    adjust_fine,
    capped_errors,
    error_floor,
    largest_cost,
    plan_for_budget,
    smallest_cost,
    total_cost,
    weight_shapes,
)
from jlcm_onnx.progress import Phase

#: Rehearsals of a size target's choices on stand-in encodings (:mod:`jlcm_onnx.passes.stand_in_encodings`),
#: which measure the file exactly in a fraction of a run's time; the second one almost always lands within 1%.
MAX_REHEARSALS = 4


#: Real compression runs allowed to converge on a size target (the first one lands when a rehearsal did).
MAX_TARGET_RUNS = 4


#: A size target's runs aim this share of the goal (half a percent under it).
AIM = 0.995


@dataclass(frozen=True)
class SizeTarget:
    """A size target resolved against the input: the goal in bytes, the bytes outside the compressed tensors
    (``fixed``), the shapes and measured option errors of the tensors (only those under the error floor, data-free),
    the first per-tensor choices, the row clusterings met so far (which every run reuses) and the floor (None with
    calibration data)."""

    kind: str
    value: float
    goal: float
    fixed: int
    shapes: list[WeightShape]
    errors: ErrorTable
    choices: dict[str, TensorChoice]
    clusterings: RowClusterings
    floor: float | None = None

    @property
    def aim(self) -> float:
        return AIM * self.goal


def resolve_target(
    source: onnx.ModelProto, original_bytes: int, config: CompressionConfig, progress: bool,
    data: CalibrationData | None, device: str,
) -> SizeTarget:
    """The config's size target for ``source``: the goal, the option errors (weighed by their effect on the outputs
    with calibration data) and the planner's first choices; a goal out of reach is a :class:`JlcmError`."""
    shapes = weight_shapes(source, config)
    kind, value = config.target
    if kind == "target_bits_per_weight":
        goal, fixed = value / 8 * sum(s.size for s in shapes), 0
    else:
        goal = value if kind == "target_size" else original_bytes / value
        fixed = original_bytes - sum(s.size * s.original_itemsize for s in shapes)
    lowest, highest = fixed + smallest_cost(shapes, config), fixed + largest_cost(shapes, config)
    if not lowest <= goal <= highest:
        raise JlcmError(
            f"{kind}={value} asks for {goal:,.0f} bytes, outside what can be reached: {lowest:,.0f} (1 bit, one "
            f"codebook per tensor) to {highest:,.0f} (8 bits, one codebook per row)" + _unit(kind)
        )
    clusterings = RowClusterings()
    floor = None
    if data is None:  # no tensor above the error floor (see jlcm_onnx.pipeline.size_target)
        errors = estimate_errors(source, config, progress, clusterings)
        floor = error_floor(shapes, int(AIM * goal - fixed), config, errors)
        errors = errors if floor is None else capped_errors(errors, floor)
    else:  # weigh each tensor's error by what it does to the outputs; the option table (mostly Python) is measured
        # beside the output probes (onnxruntime), which leave part of the cores idle
        with ThreadPoolExecutor(max_workers=1) as beside:
            table = beside.submit(estimate_errors, source, config, False, clusterings)
            coefficients = output_sensitivities(source, config, data, execution_providers(device), progress)
            errors = weight_errors(table.result(), coefficients)
    choices = plan_for_budget(shapes, int(AIM * goal - fixed), config, errors)
    return SizeTarget(kind, value, goal, fixed, shapes, errors, choices, clusterings, floor)


def run_to_target(
    load: Callable[[], onnx.ModelProto],
    target: SizeTarget,
    config: CompressionConfig,
    progress: bool,
    data: CalibrationData | None = None,
    device: str = "cpu",
    chunk: int = MAX_CHUNK_WEIGHTS,
) -> tuple[PipelineRun, CompressionPlan]:
    """Compresses with per-tensor bits and groups chosen to meet the config's size target within 1%; returns the
    last run (the target's note first among its notes) and its plan.

    The planner budgets the tensors' stored bytes; the rest of the file (graph, decoders, uncompressed tensors) is
    measured after each run and the budget corrected, aiming half a percent under the target. The choices are first
    rehearsed on stand-in encodings, which measure the file exactly in a fraction of a run's time, until they land;
    then the real run (with calibration and learning) makes the same bytes. Every run works on its own copy of the
    input from ``load`` and consumes it, so one copy is in memory at a time.
    """
    goal, fixed, shapes, choices = target.goal, target.fixed, target.shapes, target.choices
    rehearsed = runs = 0
    landed = False  # a rehearsal met the target: the real run next, with the same choices
    for attempt in range(MAX_REHEARSALS + MAX_TARGET_RUNS):
        rehearsal = runs == 0 and not landed and rehearsed < MAX_REHEARSALS
        plan = CompressionPlan(config, choices=choices, device=device, chunk_weights=chunk)
        run = None  # the previous run's model goes before the next copy comes
        release_freed_memory()
        with Phase(f"size target: rehearsal {rehearsed + 1} on stand-in encodings", enabled=progress and rehearsal):
            run = run_passes(load(), config, plan, progress and not rehearsal, data, rehearsal, target.clusterings)
        if fixed:
            materialize(run.model)  # the weights left dense count as they will be written
        achieved = serialized_bytes(run.model) if fixed else sum(r.compressed_bytes or 0 for r in run.tensors)
        rehearsed, runs = rehearsed + rehearsal, runs + (not rehearsal)
        if 0.99 * goal <= achieved <= goal:
            if not rehearsal:
                break
            landed = True
            continue
        # fine: change group counts only, so the decoders (and their bytes) stay as measured; else coarse: re-plan
        # with the bytes the planner did not see (graph, uncompressed tensors, its own estimates)
        adjusted, unabsorbed = adjust_fine(shapes, choices, int(target.aim - achieved), config)
        if attempt > 0 and abs(unabsorbed) < 0.004 * goal:
            choices = adjusted
        else:
            spent = int(target.aim - (achieved - total_cost(shapes, choices, config)))
            choices = plan_for_budget(shapes, spent, config, target.errors)
    else:
        raise JlcmError(f"could not meet {target.kind}={target.value}: {achieved:,.0f} bytes for a goal of "
                        f"{goal:,.0f}")
    note = (f"{target.kind}={target.value}: goal {goal:,.0f} bytes, achieved {achieved:,} ({achieved / goal - 1:+.2%})"
            f" after {rehearsed} rehearsal{'s' if rehearsed != 1 else ''} and {runs} run{'s' if runs != 1 else ''}")
    notes = [note]
    if target.floor is not None:
        notes.append(f"size target, data-free error floor: every tensor's relative weight error at most "
                     f"{target.floor:.3g} (SQNR >= {-10 * math.log10(target.floor):.1f} dB)")
    run.notes[:0] = notes
    return run, plan


def _unit(kind: str) -> str:
    return " bytes of stored weights" if kind == "target_bits_per_weight" else " bytes of file"
