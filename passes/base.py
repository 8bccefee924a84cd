"""The pass contract: a pass is a small object with one job, checked before and after it runs.

``pass_(model)`` runs ``requires(model)`` (raises :class:`PreconditionError` when the pass cannot apply), then
``call(model)``, then ``ensures(result.model)``. Passes edit a model they own (the pipeline hands them a copy of the
input) and return what they did: a :class:`~jlcm_onnx.report.TensorRecord` per float tensor they decided on, and
notes for the report.

Besides the model, passes share the run's :class:`~jlcm_onnx.analysis.plan.CompressionPlan`. Each pass declares the
plan's results it reads (``needs``) and writes (``makes``), by field name; the
:class:`~jlcm_onnx.passes.manager.PassManager` checks, before anything runs, that every result a pass needs is given
or made by a pass before it.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from typing import ClassVar

import onnx

from jlcm_onnx.errors import ModelError
from jlcm_onnx.report import TensorRecord


class PreconditionError(ModelError):
    """The model does not meet what a pass requires."""


@dataclass
class PassResult:
    """The model a pass returns (its input, edited in place, or a new message), whether it changed it, a record per
    float tensor it decided on and its notes for the report."""

    model: onnx.ModelProto
    modified: bool
    tensors: list[TensorRecord] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


class Pass(abc.ABC):
    """Base class of graph passes."""

    #: The plan's results (field names of :class:`~jlcm_onnx.analysis.plan.CompressionPlan`) the pass reads.
    needs: ClassVar[frozenset[str]] = frozenset()
    #: The plan's results the pass writes.
    makes: ClassVar[frozenset[str]] = frozenset()

    def requires(self, model: onnx.ModelProto) -> None:  # noqa: B027 - optional hook
        """Raises :class:`PreconditionError` if the pass cannot run on ``model``."""

    @abc.abstractmethod
    def call(self, model: onnx.ModelProto) -> PassResult:
        """Runs the pass on ``model`` (edited in place) and says what it did."""

    def ensures(self, model: onnx.ModelProto) -> None:  # noqa: B027 - optional hook
        """Raises if the pass left ``model`` in a state it promised not to."""

    def __call__(self, model: onnx.ModelProto) -> PassResult:
        self.requires(model)
        result = self.call(model)
        self.ensures(result.model)
        return result
