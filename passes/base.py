"""The pass contract: a pass is a small object with one job, checked before and after it runs.

``pass_(model)`` runs ``requires(model)`` (raises :class:`PreconditionError` when the pass cannot apply), then
``call(model)``, then ``ensures(result.model)``. Passes edit a model they own (the pipeline hands them a copy of the
input) and return what they did as ``PassResult.records``, so the report can say what happened to every tensor.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from typing import Any

import onnx

from jlcm_onnx.errors import ModelError


class PreconditionError(ModelError):
    """The model does not meet what a pass requires."""


@dataclass
class PassResult:
    model: onnx.ModelProto
    modified: bool
    records: list[Any] = field(default_factory=list)


class Pass(abc.ABC):
    """Base class of graph passes."""

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
