"""Learning a tensor too large to learn at once: a block of whole row groups at a time.

The learner (:mod:`jlcm_onnx.encodings.learning`) holds about :data:`jlcm_onnx.memory_budget.LEARNING_BYTES_PER_WEIGHT`
bytes per weight of the tensor it learns (float64 weights, latents, Adam moments, gradients, codes): 21 GB for the
262,144 x 640 head of a 268M-parameter LLM. Its objective is a sum over rows, ``tr(ΔW H ΔW^T) = sum_r Δw_r H Δw_r^T``,
and with one codebook per row group (or input blocks of a row) every parameter belongs to one group, so the problem
splits exactly into independent problems on blocks of whole groups sharing ``H``. Learning them one after the other
bounds the memory by the block; the relative objective of the whole is the blocks' objectives weighted by their
output energies ``e_b = tr(W_b H W_b^T)``::

    L = sum_b L_b e_b / sum_b e_b

What is not the same as learning at once: the best state is kept per block (each block's objective is never worse
than its start, so the whole's is not either), and Adam's steps see one block's gradients (it is elementwise, so they
differ only through its epsilon). A tensor of at most :data:`LEARNING_BLOCK_WEIGHTS` weights is learned at once, as
before; the block size is fixed, not taken from ``max_memory``, so the budget never changes the output. Multi-scaling
(one codebook shared by all rows) and grouped convolutions (one Gram per conv group) are learned at once.
"""

from __future__ import annotations

import itertools
from typing import Any

import numpy as np
import torch

from jlcm_onnx.encodings.codebook import EncodedMatrix
from jlcm_onnx.encodings.error_feedback import damped_gram
from jlcm_onnx.encodings.learning import LearnedLayer, learn_layer

#: Tensors above this many weights are learned a block of row groups at a time (about 1 GB of learner state each).
LEARNING_BLOCK_WEIGHTS = 1 << 23


def learn_in_row_blocks(matrix: np.ndarray, initial: EncodedMatrix, gram: np.ndarray | None,
                        **options: Any) -> LearnedLayer:
    """:func:`jlcm_onnx.encodings.learning.learn_layer` of ``matrix``, a block of row groups at a time when it is large
    (see the module docstring); ``options`` are ``learn_layer``'s."""
    splittable = not initial.multi_scaling and (gram is None or np.ndim(gram) == 2)
    if matrix.size <= LEARNING_BLOCK_WEIGHTS or not splittable:
        return learn_layer(matrix, initial, gram, **options)
    learned, energies = [], []
    for start, stop in itertools.pairwise(initial.block_boundaries(LEARNING_BLOCK_WEIGHTS)):
        learned.append(learn_layer(matrix[start:stop], initial.row_block(start, stop), gram, **options))
        energies.append(_output_energy(matrix[start:stop], gram))
    weights = np.asarray(energies) / max(sum(energies), 1e-300)
    return LearnedLayer(
        encoded=EncodedMatrix.stacked([layer.encoded for layer in learned]),
        trace=[float(v) for v in np.average([layer.trace for layer in learned], axis=0, weights=weights)],
        initial_objective=float(np.dot(weights, [layer.initial_objective for layer in learned])),
        final_objective=float(np.dot(weights, [layer.final_objective for layer in learned])),
    )


def _output_energy(block: np.ndarray, gram: np.ndarray | None) -> float:
    """``tr(W H W^T)`` with the learner's damped ``H``."""
    weight = torch.from_numpy(np.asarray(block, dtype=np.float64))
    return float(((weight @ damped_gram(gram, block.shape[1])[0]) * weight).sum())
