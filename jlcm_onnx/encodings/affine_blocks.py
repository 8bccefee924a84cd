"""Affine blocks: uniform levels with a scale and an integer zero point per block of B consecutive inputs.

A weight matrix ``W`` [rows, cols] (rows = output neurons) is stored as b-bit codes ``q`` and, per block of B inputs
of a row, a scale ``s`` and a zero point ``z`` (both integers in ``[0, K - 1]``, ``K = 2**b``)::

    W^[r, j] = s[r, j // B] * (q[r, j] - z[r, j // B])          n * b + (n / B) * (bits(s) + b) bits

This is exactly what standard ONNX ``DequantizeLinear`` (opset 21, ``block_size``) computes, and onnxruntime rewrites
``DequantizeLinear -> MatMul/Gemm`` into its fused ``MatMulNBits`` kernel at load, so the weight stays b-bit in memory
and runs faster than the dense product. It is the codebook family's uniform member: an "input blocks" encoding whose
codebook is the fixed grid ``0, 1, .., K - 1`` and whose offsets are ``-s * z`` with integer ``z``. Every grid holds
0 (at ``q = z``), so a block's range ``[s * (0 - z), s * (K - 1 - z)]`` always spans 0.

**Data-free fit** (importance ``h``, ``diag(H)`` per input when calibration statistics exist, else 1): for each block
and each shrink factor ``a`` in ``SHRINKS`` the grid spans ``a * [min(w, 0), max(w, 0)]``::

    s = a (max - min) / (K - 1),   z = clip(round(-a min / s)),   q = clip(round(w / s) + z)

then ``s`` is refit by weighted least squares for those codes, ``s = sum h (q - z) w / sum h (q - z)^2``, and the codes
re-rounded; the candidate of least weighted error ``sum h (w - W^)^2`` is kept per block (a scale search in the manner
of llama.cpp's k-quants and HQQ's, rather than plain min/max). Scales are rounded to their storage type before the
final codes are taken, so the codes are nearest for the stored scale.

**Calibrated** (a Gram ``H`` of the layer's inputs): GPTQ-style error-feedback codes against the fitted grid
(:func:`~jlcm_onnx.encodings.error_feedback.error_feedback_codes`, the uniform grid as a one-row codebook), then the
scales refit in closed form for the layer's output error with the zero points fixed. Row r's decoded weights are
linear in its block scales, ``W^_r = D_r s_r`` with ``D_r`` [cols, nb] the block-masked ``q_r - z_r``, so::

    (D_r^T H D_r + λ Id) s_r = D_r^T H w_r + λ s_r_old           (λ = 1e-6 mean diagonal, H damped)

and the codes are taken again for the new scales; ``CALIBRATED_ROUNDS`` such rounds, keeping the best by the layer
objective ``tr(ΔW H ΔW^T) / tr(W H W^T)``.

**Float offsets.** Weights that were once stored in blocks with a float minimum (GGUF Q4_1 and the like) sit on grids
``s * q + m`` whose ``m`` is no integer multiple of ``s``; an integer zero point cannot reproduce them. With
``float_offsets`` a block stores an offset ``o`` (storage dtype) instead of a zero point::

    W^[r, j] = s[r, j // B] * q[r, j] + o[r, j // B]                 n * b + (n / B) * 2 * bits(s) bits

fit by the same search over ranges ``a * [min, max]`` about their centre, and over grids wider than ``[min, max]`` by
up to ``MISSING_LEVELS`` unused levels, each with a weighted least-squares ``(s, o)`` for its codes (2x2 normal
equations per block), the best refined by alternating codes and ``(s, o)``; and, calibrated, the closed-form
``(s, o)`` of :func:`jlcm_onnx.encodings.learning.refit_input_blocks` for the output objective. The decoder carries the
offsets exactly with standard ops (:mod:`jlcm_onnx.encodings.affine_decoder`).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import torch

from jlcm_onnx.encodings.codebook import EncodedMatrix
from jlcm_onnx.encodings.error_feedback import damped_gram, error_feedback_codes
from jlcm_onnx.encodings.input_blocks import expand_blocks
from jlcm_onnx.encodings.learning import layer_objective, refit_input_blocks
from jlcm_onnx.memory_budget import MAX_CHUNK_WEIGHTS, row_chunks

#: Shrink factors of a block's range tried by the data-free fit.
SHRINKS = tuple(np.linspace(1.0, 0.6, 9))
#: Alternations of nearest codes and least-squares scale and offset after the float-offset search.
OFFSET_REFINEMENTS = 4
#: The float-offset search also tries grids whose lowest and highest levels hold up to this many unused levels (a
#: block that came from a b-bit grid but uses none of its top or bottom codes is then reproduced exactly).
MISSING_LEVELS = 3
#: Rounds of error-feedback codes and closed-form scales in the calibrated fit.
CALIBRATED_ROUNDS = 2
#: Weights of the closed-form scale refit's per-row systems solved at once (bounds its working memory).
REFIT_CHUNK_WEIGHTS = 1 << 20
RIDGE = 1e-6


@dataclass(frozen=True)
class AffineBlocks:
    """``codes`` uint8 [rows, cols], ``scales`` [rows, nb] (storage dtype), ``zero_points`` uint8 [rows, nb] (zeros
    with float offsets), ``offsets`` [rows, nb] (storage dtype) or None."""

    codes: np.ndarray
    scales: np.ndarray
    zero_points: np.ndarray
    block_size: int
    bits: int
    offsets: np.ndarray | None = None

    def decode(self, rows: slice = slice(None)) -> np.ndarray:
        """``W^`` [rows, cols] in float32 (of ``rows`` only, when given), computed as the decoder does: ``(q - z) *
        s``, plus ``o``."""
        cols = self.codes.shape[1]
        shifted = self.codes[rows].astype(np.float32) - expand_blocks(self.zero_points[rows], cols, self.block_size)
        decoded = shifted * expand_blocks(self.scales[rows].astype(np.float32), cols, self.block_size)
        if self.offsets is not None:
            decoded += expand_blocks(self.offsets[rows].astype(np.float32), cols, self.block_size)
        return decoded

    def as_codebook_encoding(self) -> EncodedMatrix:
        """The same weights as an input-blocks codebook encoding (the grid as one codebook, offsets ``o - s z``), the
        form :mod:`jlcm_onnx.encodings.learning` reads and the codebook row decoder decodes. Grid and scales keep the
        storage dtype; so do float offsets, while ``-s z`` is kept in float64 (exact)."""
        dtype = self.scales.dtype
        offsets = self.offsets if self.offsets is not None else -self.scales.astype(np.float64) * self.zero_points
        grid = np.arange(1 << self.bits, dtype=dtype)[None, :]
        return EncodedMatrix(codebooks=grid, codes=self.codes, group_sizes=(self.codes.shape[0],),
                             block_size=self.block_size, block_scales=self.scales, block_offsets=offsets)


def fit_affine_blocks(
    matrix: np.ndarray, bits: int, block_size: int, scale_dtype: np.dtype, importance: np.ndarray | None = None,
    float_offsets: bool = False, chunk_weights: int = MAX_CHUNK_WEIGHTS,
) -> AffineBlocks:
    """The data-free fit of the module docstring, ``chunk_weights`` weights of rows at a time (rows are
    independent)."""
    rows, cols = matrix.shape
    count = -(-cols // block_size)
    codes = np.zeros((rows, cols), np.uint8)
    scales = np.zeros((rows, count), scale_dtype)
    zero_points = np.zeros((rows, count), np.uint8)
    offsets = np.zeros((rows, count), scale_dtype) if float_offsets else None
    search = _search_offsets if float_offsets else _search_zero_points
    for part in row_chunks(rows, cols, chunk_weights):
        weight = None if importance is None else importance[part]
        scale, shift = search(_blocks(matrix[part].astype(np.float64), block_size),
                              _blocks(np.ones((part.stop - part.start, cols)) if weight is None else weight,
                                      block_size),
                              (1 << bits) - 1)
        scales[part] = scale.astype(scale_dtype)
        if float_offsets:
            offsets[part] = shift.astype(scale_dtype)
        else:
            zero_points[part] = shift.astype(np.uint8)
        codes[part] = nearest_codes(matrix[part], scales[part], zero_points[part], bits, block_size,
                                    None if offsets is None else offsets[part])
    return AffineBlocks(codes, scales, zero_points, block_size, bits, offsets)


def nearest_codes(matrix: np.ndarray, scales: np.ndarray, zero_points: np.ndarray, bits: int, block_size: int,
                  offsets: np.ndarray | None = None) -> np.ndarray:
    """``clip(round((w - o) / s) + z, 0, K - 1)`` per weight (``z`` where ``s`` is 0), uint8."""
    cols = matrix.shape[1]
    scale = expand_blocks(scales.astype(np.float64), cols, block_size)
    zero = expand_blocks(zero_points.astype(np.float64), cols, block_size)
    shifted = matrix if offsets is None else matrix - expand_blocks(offsets.astype(np.float64), cols, block_size)
    ratio = np.divide(shifted, scale, out=np.zeros(matrix.shape), where=scale > 0)
    return np.clip(np.rint(ratio) + zero, 0, (1 << bits) - 1).astype(np.uint8)


def _search_zero_points(values: np.ndarray, weights: np.ndarray, top: int) -> tuple[np.ndarray, np.ndarray]:
    """(scales, zero points) [rows, nb] of least weighted error over the shrink factors, for blocked ``values`` and
    ``weights`` [rows, nb, B] (padding: zero weight)."""
    low, high = np.minimum(values.min(axis=2), 0.0), np.maximum(values.max(axis=2), 0.0)
    best_error = np.full(low.shape, np.inf)
    best_scale, best_zero = np.zeros(low.shape), np.zeros(low.shape)
    for shrink in SHRINKS:
        scale = shrink * (high - low) / top
        zero = np.clip(np.rint(np.divide(-shrink * low, scale, out=np.zeros(low.shape), where=scale > 0)), 0, top)
        shift = -scale * zero
        shifted = _codes(values, scale, shift, top) - zero[..., None]
        numerator, denominator = (weights * shifted * values).sum(axis=2), (weights * shifted**2).sum(axis=2)
        fitted = np.divide(numerator, denominator, out=scale.copy(), where=denominator > 0)
        scale = np.where(fitted > 0, fitted, scale)
        error = _error(values, weights, scale, -scale * zero, top)
        better = error < best_error
        best_error = np.where(better, error, best_error)
        best_scale, best_zero = np.where(better, scale, best_scale), np.where(better, zero, best_zero)
    return best_scale, best_zero


def _search_offsets(values: np.ndarray, weights: np.ndarray, top: int) -> tuple[np.ndarray, np.ndarray]:
    """(scales, float offsets) [rows, nb] of least weighted error over the shrink factors, each candidate and then
    the best refined by ``OFFSET_REFINEMENTS`` alternations of nearest codes and least-squares ``(s, o)``."""
    counted = weights > 0
    low = np.where(counted, values, np.inf).min(axis=2)
    high = np.where(counted, values, -np.inf).max(axis=2)
    low, high = np.where(np.isfinite(low), low, 0.0), np.where(np.isfinite(high), high, 0.0)
    centre, half = (low + high) / 2, (high - low) / 2
    best = (np.full(low.shape, np.inf), np.zeros(low.shape), np.zeros(low.shape))
    for shrink in SHRINKS:
        best = _better(best, _least_squares(values, weights, 2 * shrink * half / top, centre - shrink * half, top),
                       values, weights, top)
    for missing in range(1, min(MISSING_LEVELS, top - 1) + 1):  # grids wider than the block: unused extreme levels
        scale = 2 * half / (top - missing)
        for below in range(missing + 1):
            best = _better(best, _least_squares(values, weights, scale, low - below * scale, top), values, weights,
                           top)
    for _ in range(OFFSET_REFINEMENTS):
        best = _better(best, _least_squares(values, weights, best[1], best[2], top), values, weights, top)
    return best[1], best[2]


def _least_squares(values: np.ndarray, weights: np.ndarray, scale: np.ndarray, offset: np.ndarray,
                   top: int) -> tuple[np.ndarray, np.ndarray]:
    """The weighted least-squares ``(s, o)`` of each block for its nearest codes under ``(scale, offset)`` (2x2
    normal equations); a block whose system is singular or whose scale is not positive keeps its pair."""
    codes = _codes(values, scale, offset, top)
    sum_h, sum_hq, sum_hqq = weights.sum(axis=2), (weights * codes).sum(axis=2), (weights * codes**2).sum(axis=2)
    sum_hw, sum_hqw = (weights * values).sum(axis=2), (weights * codes * values).sum(axis=2)
    determinant = sum_hqq * sum_h - sum_hq**2
    usable = determinant > 1e-12 * np.maximum(sum_hqq * sum_h, 1e-300)
    safe = np.where(usable, determinant, 1.0)
    fitted_scale = (sum_h * sum_hqw - sum_hq * sum_hw) / safe
    usable &= fitted_scale > 0
    return (np.where(usable, fitted_scale, scale),
            np.where(usable, (sum_hqq * sum_hw - sum_hq * sum_hqw) / safe, offset))


def _better(best: tuple[np.ndarray, np.ndarray, np.ndarray], candidate: tuple[np.ndarray, np.ndarray],
            values: np.ndarray, weights: np.ndarray, top: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(error, scale, offset) per block: the candidate where its error is lower, else ``best``."""
    error = _error(values, weights, *candidate, top)
    better = error < best[0]
    return (np.where(better, error, best[0]), np.where(better, candidate[0], best[1]),
            np.where(better, candidate[1], best[2]))


def _codes(values: np.ndarray, scale: np.ndarray, shift: np.ndarray, top: int) -> np.ndarray:
    """Nearest grid codes ``clip(round((w - shift) / s))`` of blocked ``values`` [rows, nb, B] (float64); for a zero
    point z, ``shift = -s z``."""
    ratio = np.divide(values - shift[..., None], scale[..., None], out=np.zeros(values.shape),
                      where=scale[..., None] > 0)
    return np.clip(np.rint(ratio), 0, top)


def _error(values: np.ndarray, weights: np.ndarray, scale: np.ndarray, shift: np.ndarray, top: int) -> np.ndarray:
    """``sum h (w - s q - shift)^2`` per block for the nearest codes."""
    decoded = scale[..., None] * _codes(values, scale, shift, top) + shift[..., None]
    return (weights * (values - decoded) ** 2).sum(axis=2)


def _blocks(values: np.ndarray, block_size: int) -> np.ndarray:
    """[rows, cols] -> [rows, ceil(cols / B), B], the last block padded with zeros (zero weight, zero value)."""
    rows, cols = values.shape
    count = -(-cols // block_size)
    padded = np.zeros((rows, count * block_size))
    padded[:, :cols] = values
    return padded.reshape(rows, count, block_size)


def refit_scales(matrix: np.ndarray, encoded: AffineBlocks, gram: torch.Tensor) -> np.ndarray:
    """The closed-form block scales for the output objective with codes and zero points fixed (see the module
    docstring); ``gram`` is the damped H [cols, cols] (float64). Returned in the scales' storage dtype; a block whose
    solved scale is not positive keeps its old one."""
    rows, cols = matrix.shape
    size = encoded.block_size
    count = encoded.scales.shape[1]
    pad = count * size - cols
    padded_gram = torch.nn.functional.pad(gram, (0, pad, 0, pad))
    blocked_gram = padded_gram.view(count, size, count, size)
    design = torch.as_tensor(_blocks(encoded.codes.astype(np.float64), size)
                             - encoded.zero_points.astype(np.float64)[..., None])
    if pad:
        design[:, -1, size - pad:] = 0.0  # padded inputs decode nothing
    weight = torch.nn.functional.pad(torch.tensor(matrix, dtype=torch.float64), (0, pad))  # a copy: may be read-only
    old = torch.as_tensor(encoded.scales.astype(np.float64))
    solved = torch.zeros(rows, count, dtype=torch.float64)
    eye = torch.eye(count, dtype=torch.float64)
    step = max(1, REFIT_CHUNK_WEIGHTS // max(count * size * count, 1))
    for start in range(0, rows, step):
        part = slice(start, min(start + step, rows))
        block_design = design[part]  # [n, nb, B]
        times_gram = torch.einsum("bicj,ncj->nbic", blocked_gram, block_design)  # sum_j H[b i, c j] d[c j]
        normal = torch.einsum("nbi,nbic->nbc", block_design, times_gram)
        rhs = (block_design * (weight[part] @ padded_gram).view(-1, count, size)).sum(dim=2)
        ridge = RIDGE * torch.diagonal(normal, dim1=1, dim2=2).mean(dim=1).clamp(min=1e-30)
        solved[part] = torch.linalg.solve(normal + ridge[:, None, None] * eye, rhs + ridge[:, None] * old[part])
    scales = solved.numpy()
    return np.where(scales > 0, scales, encoded.scales.astype(np.float64)).astype(encoded.scales.dtype)


def learn_affine_blocks(matrix: np.ndarray, initial: AffineBlocks, gram: np.ndarray) -> tuple[AffineBlocks, float]:
    """The calibrated fit of the module docstring from ``initial`` (the data-free fit): the best encoding seen and
    its layer objective. ``gram`` is H [cols, cols], or [Q, cols, cols] per conv group."""
    grid = np.arange(1 << initial.bits, dtype=np.float64)[None, :]
    best = (layer_objective(matrix, initial.as_codebook_encoding(), gram), initial)
    current = initial
    for _ in range(CALIBRATED_ROUNDS):
        view = current.as_codebook_encoding()
        codes = error_feedback_codes(matrix, grid, view.group_sizes, gram, block_affine=view.block_affine())
        current = replace(current, codes=codes)
        current = _refit_offsets(matrix, current, gram) if current.offsets is not None else replace(
            current, scales=_refit_scales_per_group(matrix, current, gram))
        objective = layer_objective(matrix, current.as_codebook_encoding(), gram)
        if objective < best[0]:
            best = (objective, current)
    return best[1], best[0]


def _refit_scales_per_group(matrix: np.ndarray, encoded: AffineBlocks, gram: np.ndarray) -> np.ndarray:
    """:func:`refit_scales` on the rows of each conv group with its own (damped) Gram."""
    grams = damped_gram(gram, matrix.shape[1])
    per_group = matrix.shape[0] // grams.shape[0]
    parts = [slice(q * per_group, (q + 1) * per_group) for q in range(grams.shape[0])]
    return np.concatenate([
        refit_scales(matrix[part], replace(encoded, codes=encoded.codes[part], scales=encoded.scales[part],
                                           zero_points=encoded.zero_points[part]), grams[q])
        for q, part in enumerate(parts)
    ])


def _refit_offsets(matrix: np.ndarray, encoded: AffineBlocks, gram: np.ndarray) -> AffineBlocks:
    """The closed-form block scales and float offsets for the output objective (codes fixed)."""
    refit = refit_input_blocks(matrix, encoded.as_codebook_encoding(), gram)
    dtype = encoded.scales.dtype
    return replace(encoded, scales=refit.block_scales.astype(dtype), offsets=refit.block_offsets.astype(dtype))
