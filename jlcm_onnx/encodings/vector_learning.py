"""Learning vector codebooks against a layer's output error, GPTVQ-style.

A weight ``W`` [rows, cols] coded by vectors of d consecutive inputs, ``W^[r, j d + a] = s * C[g(r), I[r, j], a] + m``
(``s``, ``m`` the input block's scale and offset, 1 and 0 without input blocks; outliers kept exactly), is learned for
the damped Gram ``H`` of the layer's input (:func:`~jlcm_onnx.encodings.error_feedback.damped_gram`) by alternating:

**Error-feedback assignment** (GPTQ with vectors). With ``U`` the upper Cholesky factor of ``H^-1``, the columns are
taken d at a time, in order. Fixing columns ``B = [j d, j d + d)`` of a row to the codeword ``q`` costs the output error
``|(w_B - q) U_BB^-1|^2`` (the optimal-brain-surgeon cost of a block: ``(H^-1)_BB = U_BB^T U_BB`` over the columns
not yet fixed), so each row takes the codeword that minimises it, and the later columns absorb the error::

    E_B = (W_B - Q_B) U_BB^-1          W_R -= E_B U_BR          (R: the columns after B)

which is GPTQ's update for d = 1. Columns are processed in blocks of 128 with a lazy update of the rest.

**Codebook refit** (closed form). For fixed codes ``W^_r = P_r c_g + m_r + o_r``, with ``c_g`` the group's K d
codeword values, ``P_r`` [cols, K d] the one-hot map of row r's weights to them (carrying ``s``; zero at outliers) and
``o_r`` the outliers' stored values (zero elsewhere, as ``m_r`` is at outliers), the objective is quadratic in ``c_g``::

    (sum_r P_r^T H P_r + λ Id) c_g = sum_r P_r^T H (w_r - m_r - o_r) + λ c_g_old      (λ = 1e-6 mean diagonal)

The ridge keeps unused codewords in place. The input blocks keep their data-free fit. The best state seen (lowest
relative objective ``tr(ΔW H ΔW^T) / tr(W H W^T)``) is returned, so learning never makes the start worse.

Cost per weight of ``cols`` inputs: the assignment ``K d^2`` (on the group codebooks times ``U_BB^-1``, so only the
rows' projections are per row), the refit ``cols K d`` (the one-hot codes times H, in float32).
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import torch

from jlcm_onnx.encodings.codebook import EncodedMatrix
from jlcm_onnx.encodings.error_feedback import damped_gram

#: Alternations of the error-feedback assignment and the codebook refit (a second one lowered a synthetic layer's
#: objective by 2%, at twice the time).
ROUNDS = 1
#: Columns of one lazy error-feedback block (a multiple of every vector size).
FEEDBACK_BLOCK = 128
#: Rows of one batch of the refit's one-hot products.
REFIT_ROWS = 64
#: Ridge of the closed-form codebook solve, relative to the mean diagonal of the normal matrix.
RIDGE = 1e-6


def learn_vectors(matrix: np.ndarray, encoded: EncodedMatrix, gram: np.ndarray | None) -> tuple[EncodedMatrix, float]:
    """``encoded`` learned against ``gram`` (see the module docstring), and its relative output error."""
    grams = damped_gram(gram, matrix.shape[1])
    best, best_error = encoded, vector_objective(matrix, encoded, grams)
    current = encoded
    for _ in range(ROUNDS):
        current = replace(current, codes=feedback_codes(matrix, current, grams))
        current = replace(current, codebooks=refit_vector_codebooks(matrix, current, grams))
        error = vector_objective(matrix, current, grams)
        if error < best_error:
            best, best_error = current, error
    return best, best_error


def vector_objective(matrix: np.ndarray, encoded: EncodedMatrix, grams: torch.Tensor) -> float:
    """``tr(ΔW H ΔW^T) / tr(W H W^T)`` (one H per block of rows when ``grams`` holds several)."""
    weight = torch.from_numpy(np.asarray(matrix, dtype=np.float64))
    delta = weight - torch.from_numpy(encoded.decode().astype(np.float64))
    error = energy = 0.0
    for part, gram in _row_parts(matrix.shape[0], grams):
        error += float(((delta[part] @ gram) * delta[part]).sum())
        energy += float(((weight[part] @ gram) * weight[part]).sum())
    return error / max(energy, 1e-300)


def _row_parts(rows: int, grams: torch.Tensor) -> list[tuple[slice, torch.Tensor]]:
    """The row range each Gram applies to (a grouped Conv has one per conv group)."""
    per_part = rows // grams.shape[0]
    return [(slice(q * per_part, (q + 1) * per_part), grams[q]) for q in range(grams.shape[0])]


def _affine_and_outliers(encoded: EncodedMatrix) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Every weight's block scale and offset, whether it is an outlier, and its stored value (float64 [rows, cols])."""
    rows, cols = encoded.shape
    scale, offset = (torch.from_numpy(a) for a in encoded.block_affine())
    exact = torch.zeros(rows * cols, dtype=torch.bool)
    stored = torch.zeros(rows * cols, dtype=torch.float64)
    index = torch.from_numpy(encoded.outlier_index.astype(np.int64))
    exact[index] = True
    stored[index] = torch.from_numpy(encoded.outlier_values.astype(np.float64))
    return scale, offset, exact.view(rows, cols), stored.view(rows, cols)


def feedback_codes(matrix: np.ndarray, encoded: EncodedMatrix, grams: torch.Tensor) -> np.ndarray:
    """Error-feedback codes (uint8 [rows, cols / d]) for ``encoded``'s codebooks (see the module docstring)."""
    rows, cols = encoded.shape
    dim = encoded.vector_dim
    books = torch.from_numpy(encoded.codebooks.astype(np.float64))  # [G, K, d]
    group_of_row = torch.from_numpy(np.repeat(np.arange(len(encoded.group_sizes)), encoded.group_sizes))
    scale, offset, exact, stored = _affine_and_outliers(encoded)
    weight = torch.from_numpy(np.asarray(matrix, dtype=np.float64)).clone()
    codes = torch.zeros(rows, cols // dim, dtype=torch.int64)
    for part, gram in _row_parts(rows, grams):
        upper = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(gram)), upper=True)
        work, groups = weight[part], group_of_row[part]
        for start in range(0, cols, FEEDBACK_BLOCK):
            stop = min(start + FEEDBACK_BLOCK, cols)
            chunk, errors = work[:, start:stop].clone(), torch.zeros(work.shape[0], stop - start, dtype=torch.float64)
            for j in range(start, stop, dim):
                local, columns = slice(j - start, j - start + dim), slice(j, j + dim)
                inverse = torch.linalg.inv(upper[columns, columns])
                quantized, chosen = nearest_output_codes(chunk[:, local], books, groups, inverse, scale[part, j],
                                                     offset[part, j], exact[part, columns], stored[part, columns])
                codes[part, j // dim] = chosen
                error = (chunk[:, local] - quantized) @ inverse
                chunk[:, j - start + dim:] -= error @ upper[columns, j + dim:stop]
                errors[:, local] = error
            work[:, stop:] -= errors @ upper[start:stop, stop:]
    return codes.numpy().astype(np.uint8)


def nearest_output_codes(values: torch.Tensor, books: torch.Tensor, groups: torch.Tensor, inverse: torch.Tensor,
                     scale: torch.Tensor, offset: torch.Tensor, exact: torch.Tensor, stored: torch.Tensor
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """The decoded vectors [r, d] and codes [r] minimising ``|(w - q) A|^2`` (``A = U_BB^-1``) for the vectors
    ``values`` [r, d] of rows in ``groups``, whose input block has ``scale`` and ``offset`` [r] (a vector lies in one
    block). With ``q = s c + m`` that is ``s^2 |(n - c) A|^2`` for ``n = (w - m) / s``, so the nearest codeword is
    found in the normalised space from the group codebooks times A (``|cA|^2 - 2 (nA) . cA``); rows with an outlier
    in the vector, whose stored values no codeword moves, are costed in full."""
    divisor = torch.where(scale > 0, scale, torch.ones_like(scale))
    projected = ((values - offset[:, None]) / divisor[:, None]) @ inverse  # nA [r, d]
    books_a = books @ inverse  # cA [G, K, d]
    cost = (books_a * books_a).sum(dim=2)[groups] - 2 * torch.einsum("rd,rkd->rk", projected, books_a[groups])
    chosen = cost.argmin(dim=1)
    quantized = books[groups, chosen] * scale[:, None] + offset[:, None]
    patched = exact.any(dim=1)
    if bool(patched.any()):
        rows = patched.nonzero()[:, 0]
        candidates = books[groups[rows]] * scale[rows, None, None] + offset[rows, None, None]  # [p, K, d]
        candidates = torch.where(exact[rows, None], stored[rows, None], candidates)
        full = ((values[rows, None] - candidates) @ inverse).square().sum(dim=2)
        chosen[rows] = full.argmin(dim=1)
        quantized[rows] = candidates[torch.arange(rows.numel()), chosen[rows]]
    return quantized, chosen


def refit_vector_codebooks(matrix: np.ndarray, encoded: EncodedMatrix, grams: torch.Tensor) -> np.ndarray:
    """The closed-form codebooks [G, K, d] for ``encoded``'s codes, in its codebook dtype (see the module)."""
    rows, cols = encoded.shape
    groups, entries, dim = encoded.codebooks.shape
    width = entries * dim
    scale, offset, exact, stored = _affine_and_outliers(encoded)
    carried = torch.where(exact, 0.0, scale)
    target = torch.from_numpy(np.asarray(matrix, dtype=np.float64)) - torch.where(exact, stored, offset)
    # the codeword value each weight reads: code * d + its place in the vector
    slot = (torch.from_numpy(encoded.codes.astype(np.int64))[:, :, None] * dim + torch.arange(dim)).reshape(rows, cols)
    group_of_row = torch.from_numpy(np.repeat(np.arange(groups), encoded.group_sizes))
    normal = torch.zeros(groups, width, width, dtype=torch.float64)
    right = torch.zeros(groups, width, dtype=torch.float64)
    for part, gram in _row_parts(rows, grams):
        gram32 = gram.float()
        for first in range(part.start, part.stop, REFIT_ROWS):
            batch = slice(first, min(first + REFIT_ROWS, part.stop))
            one_hot = torch.zeros(batch.stop - batch.start, cols, width)
            one_hot.scatter_(2, slot[batch, :, None], carried[batch, :, None].float())
            product = torch.einsum("ij,rjw->riw", gram32, one_hot)
            members = group_of_row[batch]
            normal.index_add_(0, members, torch.einsum("riv,riw->rvw", one_hot, product).double())
            right.index_add_(0, members, torch.einsum("riw,ri->rw", product.double(), target[batch]))
    old = torch.from_numpy(encoded.codebooks.astype(np.float64)).reshape(groups, width)
    ridge = RIDGE * torch.diagonal(normal, dim1=1, dim2=2).mean(dim=1).clamp(min=1e-30)
    eye = torch.eye(width, dtype=torch.float64)
    solved = torch.linalg.solve(normal + ridge[:, None, None] * eye, right + ridge[:, None] * old)
    return solved.reshape(groups, entries, dim).numpy().astype(encoded.codebooks.dtype)
