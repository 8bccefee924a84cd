"""Runs one explicit list of passes over a model: what each needs is checked before anything runs, and what ran is
logged.

A pass list is valid when every result a pass ``needs`` is among those given up front (the plan's per-tensor choices,
which the config or the size planner sets) or made by a pass listed before it; an invalid list is a programming error
and raises before the model is touched. Each pass's run is logged (``logging`` name ``jlcm_onnx.passes``, level
DEBUG) and kept in :attr:`PipelineRun.log`, which the report carries.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import onnx

from jlcm_onnx.memory_budget import release_freed_memory
from jlcm_onnx.passes.base import Pass
from jlcm_onnx.report import PassLog, TensorRecord

LOG = logging.getLogger("jlcm_onnx.passes")
#: What a run's plan holds before the first pass: the per-tensor choices (bits, groups, outliers).
GIVEN = frozenset({"choices"})


class PipelineError(RuntimeError):
    """A pass list in which a pass needs a result that no earlier pass makes."""


@dataclass
class PipelineRun:
    """The model after the last pass, the tensor records and notes of every pass in order, and what ran."""

    model: onnx.ModelProto
    tensors: list[TensorRecord] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    log: list[PassLog] = field(default_factory=list)


class PassManager:
    """An ordered pass list, checked on construction (see the module docstring)."""

    def __init__(self, passes: Sequence[Pass], given: frozenset[str] = GIVEN) -> None:
        available = set(given)
        for graph_pass in passes:
            missing = graph_pass.needs - available
            if missing:
                raise PipelineError(f"{type(graph_pass).__name__} needs {', '.join(sorted(missing))}, which no pass "
                                    "before it makes")
            available |= graph_pass.makes
        self.passes = list(passes)

    def run(self, model: onnx.ModelProto) -> PipelineRun:
        """Runs every pass in order on ``model``, which it consumes (a pass may edit it or return a new one)."""
        run = PipelineRun(model)
        del model  # passes may return a new model: the one they replaced must go
        for graph_pass in self.passes:
            started = time.perf_counter()
            result = graph_pass(run.model)
            run.model = result.model
            release_freed_memory()  # a replaced model's buffers go back to the system before the next pass
            run.tensors.extend(result.tensors)
            run.notes.extend(result.notes)
            entry = PassLog(type(graph_pass).__name__, time.perf_counter() - started, result.modified)
            run.log.append(entry)
            LOG.debug("%s: %.3f s, %s", entry.name, entry.seconds, "modified" if entry.modified else "unchanged")
        return run
