"""Layer-wise joint learning of codebooks and mappings (docs/method.md, section 4).

A weight ``W`` [rows, cols] (rows = output neurons) is approximated by ``W^[r, j] = C[g(r), I[r, j]]`` (codebooks
``C`` [G, K] of contiguous row groups, codes ``I``), except for the dense-and-sparse outliers, kept exactly. With the
Gram ``H = X X^T`` of the layer's input activations (damped, ``H + 0.3 * mean(diag H) * Id``: well posed, and pulled
towards plain weight MSE so it generalises beyond the calibration data, see
:data:`~jlcm_onnx.encodings.error_feedback.DAMPING`; ``H = Id`` without data) the objective is the relative output
error::

    L(C, I) = tr(ΔW H ΔW^T) / tr(W H W^T),     ΔW = W - W^   (ΔW = 0 at outliers up to their storage rounding)

    dL/dW^ = 2 (W^ - W) H / tr(W H W^T)

A grouped Conv has one Gram per conv group (``gram`` [Q, cols, cols], row ``r`` uses ``gram[r // (rows / Q)]``); every
sum below then runs block by block.

**Codebook step (closed form).** For fixed codes ``W^_r = E_r c_g + o_r`` with ``E_r`` [cols, K] the one-hot matrix
of row r's codes (zero at outliers) and ``o_r`` its outlier values, so L is quadratic in ``c_g`` and its minimiser
solves the K x K normal equations of each group::

    A_g = sum_{r in g} E_r^T H E_r      A_g[k, l] = sum_r sum_{i,j} [I_ri = k] H_ij [I_rj = l]
    b_g = sum_{r in g} E_r^T H (W_r - o_r)
    (A_g + λ Id) c_g = b_g + λ c_g_old          (ridge towards the current codebook, λ = 1e-6 mean diag A_g)

The ridge keeps unused codewords where they were and makes ``L(c_new) <= L(c_old)`` (before rounding to the codebook
dtype, and up to the float32 products of ``PRODUCT_DTYPE``). Codebooks are re-sorted after each solve and the codes
permuted with them, so "neighbouring codeword" keeps its meaning. Cost per solve: ``rows * K * cols^2`` (a dense product
of the one-hot codes with H).

**Mapping step** (:mod:`jlcm_onnx.encodings.mapping_update`): between refits the codes move by the paper's proximal
update (the default), the naive update it rejects, or not at all (frozen).

Each run does ``steps`` Adam steps with a cosine schedule and refits the codebooks in closed form every
``refit_every`` steps and once at the end; the best (lowest objective) state seen is returned, so the result is never
worse than its starting point. ``init="error-feedback"`` starts from GPTQ codes
(:func:`~jlcm_onnx.encodings.error_feedback.error_feedback_codes`, column by column, error propagated with the Cholesky
factor of ``H^-1``) followed by a closed-form codebook refit.

**Input blocks.** With a scale and an offset per block of inputs (``W^ = S ⊙ C[I] + M``, S and M the per-block values
repeated over their block) everything above runs in the codebook's normalised space: the one-hot matrix ``E_r``
carries ``S_r`` (the codebook step solves for ``c_g`` in ``W_r - M_r = diag(S_r) E_r c_g``), latents live next to the
normalised codewords and get the straight-through gradient times ``S``, and the error-feedback codes quantise
``(w - m) / s`` column by column. The scales and offsets start from the data-free fit and are refit at every codebook
refit (before it), for the output objective: for fixed codewords ``q_r = C[g(r), I_r]`` row r's decoded weights are
linear in its 2 * nb block values ``θ_r = (s_r1..s_rnb, m_r1..m_rnb)``, ``W^_r = D_r θ_r`` with ``D_r`` [cols, 2 nb]
the block-masked ``q_r`` and ones (zero at outliers), so::

    (D_r^T H D_r + λ Id) θ_r = D_r^T H (W_r - o_r) + λ θ_r_old       (λ = 1e-6 mean diagonal, as above)

with ``(D^T H D)[(s, b), (s, c)] = sum_{i in b, j in c} q_i H_ij q_j`` (and likewise with ones for m): cost
``rows * cols^2`` per refit. The data-free fit minimises weight error block by block; this one lets the blocks of a
row trade errors through H (it lowered SmolLM2-135M's perplexity at 3 bits with blocks of 32).

**Multi-scaling** (``C[g] = s_g c``, one shared codebook ``c``) is learned as one group of all rows whose single
"input block" per row has scale ``s_g(r)`` and offset 0: the codebook step solves for the shared ``c`` with the group
scales fixed, and the result is stored back as the shared codebook and its scales.
Deterministic on CPU: no random draws are made (``seed`` seeds torch for future stochastic options), and the same
inputs give the same bytes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Literal

import numpy as np
import torch

from jlcm_onnx.encodings.codebook import EncodedMatrix
from jlcm_onnx.encodings.error_feedback import damped_gram, error_feedback_codes
from jlcm_onnx.encodings.mapping_update import Mapping, MappingUpdate

#: Alternations of the closed-form block scales and offsets with the closed-form codebooks at every refit (a second
#: one changed SmolLM2's calibrated 3-bit perplexity, blocks of 32, by less than its run-to-run noise).
BLOCK_ROUNDS = 1
#: Ridge of the closed-form codebook solve, relative to the mean diagonal of the normal matrix.
RIDGE = 1e-6
#: The codebook step's one-hot products with H (``rows * K * cols^2``, its whole cost) run in float32, half float64's
#: time; the K x K sums and solves stay in float64.
PRODUCT_DTYPE = torch.float32
#: One-hot blocks of the closed-form solve hold at most this many elements (32 MB in float32).
CHUNK_ELEMENTS = 1 << 23

Init = Literal["kmeans", "error-feedback"]


@dataclass(frozen=True)
class LearnedLayer:
    """The refined encoding and how the objective went.

    Attributes:
        encoded: same group sizes and outliers as the initial encoding, codebooks in its dtype, uint8 codes.
        trace: the objective at every step (after the init), then after the final refit.
        initial_objective: the objective of the encoding passed in.
        final_objective: the objective of ``encoded``.
    """

    encoded: EncodedMatrix
    trace: list[float]
    initial_objective: float
    final_objective: float


class _Layer:
    """W, the damped Gram blocks and the outliers of one layer, as float64 torch tensors on ``device``."""

    def __init__(self, matrix: np.ndarray, encoded: EncodedMatrix, gram: np.ndarray | None, device: str,
                 shared_scales: bool = False):
        self.device = torch.device(device)
        self.rows, self.cols = matrix.shape
        self.weight = torch.as_tensor(np.asarray(matrix, dtype=np.float64), device=self.device)
        self.grams = damped_gram(gram, self.cols).to(self.device)
        if self.rows % self.grams.shape[0]:
            raise ValueError(f"{self.rows} rows do not split into {self.grams.shape[0]} conv groups")
        self.per_block = self.rows // self.grams.shape[0]
        self.group_sizes = encoded.group_sizes
        if sum(self.group_sizes) != self.rows:
            raise ValueError(f"group sizes {self.group_sizes} do not cover {self.rows} rows")
        self.group_of_row = torch.repeat_interleave(torch.arange(len(self.group_sizes)),
                                                    torch.tensor(self.group_sizes)).to(self.device)
        self.outlier_index = torch.as_tensor(encoded.outlier_index.astype(np.int64), device=self.device)
        self.outlier_values = torch.as_tensor(encoded.outlier_values.astype(np.float64), device=self.device)
        self.learnable = torch.ones(self.rows * self.cols, dtype=torch.bool, device=self.device)
        self.learnable[self.outlier_index] = False
        self.learnable = self.learnable.view(self.rows, self.cols)
        # W - o: what the codebook part must reproduce (outlier positions carry W minus the stored value, ~0).
        self.unstored = self.weight.clone()
        self.unstored.view(-1)[self.outlier_index] -= self.outlier_values
        self.block_size = encoded.block_size
        self.learns_blocks = encoded.blocked and not shared_scales
        self.set_blocks(*(torch.as_tensor(a.astype(np.float64), device=self.device)
                          for a in (encoded.block_scales, encoded.block_offsets))
                        if encoded.blocked else (None, None))
        self.norm = float(sum((self._block(self.weight, q) @ self.grams[q] * self._block(self.weight, q)).sum()
                              for q in range(self.grams.shape[0])))
        self.norm = self.norm if self.norm > 0 else 1.0

    def set_blocks(self, scales: torch.Tensor | None, offsets: torch.Tensor | None) -> None:
        """Use the per-block ``scales`` and ``offsets`` [rows, ceil(cols / B)] (None, None: no input blocks)."""
        self.block_scales, self.block_offsets = scales, offsets
        if scales is None:
            self.scale = torch.ones_like(self.weight)
            self.offset = torch.zeros_like(self.weight)
        else:
            self.scale, self.offset = (a.repeat_interleave(self.block_size, dim=1)[:, :self.cols]
                                       for a in (scales, offsets))
        self.target = self.unstored - self.offset * self.learnable  # W - M - o: the target of the codebook part

    def refit_blocks(self, books: torch.Tensor, codes: torch.Tensor, dtype: np.dtype) -> None:
        """Set every row's block scales and offsets to their closed-form least squares for fixed codewords (rounded
        to ``dtype``), a ridge towards the current values keeping the objective from rising before the rounding."""
        count = self.block_scales.shape[1]
        padded = count * self.block_size
        pad = padded - self.cols
        normal = torch.zeros(self.rows, 2 * count, 2 * count, dtype=torch.float64, device=self.device)
        rhs = torch.zeros(self.rows, 2 * count, dtype=torch.float64, device=self.device)
        step = max(1, CHUNK_ELEMENTS // (2 * count * padded))
        for q in range(self.grams.shape[0]):
            gram = torch.nn.functional.pad(self.grams[q], (0, pad, 0, pad))  # zero rows and columns for the padding
            for start in range(q * self.per_block, (q + 1) * self.per_block, step):
                stop = min(start + step, (q + 1) * self.per_block)
                n = stop - start
                picked = self.codewords(books, codes[start:stop]) * self.learnable[start:stop]
                design = torch.stack([picked, self.learnable[start:stop].to(torch.float64)], dim=1)  # [n, 2, cols]
                design = torch.nn.functional.pad(design, (0, pad)).view(n, 2, count, self.block_size)
                # H times each (kind, block) column of D: [n, i, kind, block]; then D^T (H D), summed block by block
                weighted = torch.einsum("ick,nxck->nixc", gram.view(padded, count, self.block_size), design)
                weighted = weighted.reshape(n, count, self.block_size, 2, count)
                normal[start:stop] = torch.einsum("nxbk,nbkyc->nxbyc", design, weighted).reshape(n, 2 * count, -1)
                target = torch.nn.functional.pad(self.unstored[start:stop], (0, pad)) @ gram
                rhs[start:stop] = torch.einsum("nxbk,nbk->nxb", design,
                                               target.view(n, count, self.block_size)).reshape(n, 2 * count)
        current = torch.cat([self.block_scales, self.block_offsets], dim=1)
        ridge = RIDGE * torch.diagonal(normal, dim1=1, dim2=2).mean(dim=1).clamp(min=1e-30)
        eye = torch.eye(2 * count, dtype=torch.float64, device=self.device)
        solved = torch.linalg.solve(normal + ridge[:, None, None] * eye, rhs + ridge[:, None] * current)
        solved = _round(solved, dtype)
        self.set_blocks(solved[:, :count], solved[:, count:])

    def refit_all(self, books: torch.Tensor, codes: torch.Tensor,
                  dtype: np.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """The closed-form codebooks; with learned input blocks, ``BLOCK_ROUNDS`` alternations of the closed-form
        block scales and offsets and the closed-form codebooks."""
        if not self.learns_blocks:
            return self.refit(books, codes, dtype)
        for _ in range(BLOCK_ROUNDS):
            self.refit_blocks(books, codes, dtype)
            books, codes = self.refit(books, codes, dtype)
        return books, codes

    def _block(self, tensor: torch.Tensor, q: int) -> torch.Tensor:
        return tensor[q * self.per_block:(q + 1) * self.per_block]

    def codewords(self, books: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
        """``C[g(r), I[r, j]]``: the codewords picked, in the codebook's (normalised, with input blocks) space."""
        return books[self.group_of_row].gather(1, codes)

    def decode(self, books: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
        decoded = self.codewords(books, codes) * self.scale + self.offset
        decoded.view(-1)[self.outlier_index] = self.outlier_values
        return decoded

    def objective(self, decoded: torch.Tensor) -> tuple[float, torch.Tensor]:
        """(L, dL/dW^) at the decoded matrix."""
        residual = decoded - self.weight
        product = torch.cat([self._block(residual, q) @ self.grams[q] for q in range(self.grams.shape[0])])
        return float((product * residual).sum()) / self.norm, product * (2.0 / self.norm)

    def refit(self, books: torch.Tensor, codes: torch.Tensor, dtype: np.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """The closed-form codebooks for ``codes`` (rounded to ``dtype``, sorted) and the codes permuted with them."""
        groups, num_codes = books.shape
        normal = torch.zeros(groups, num_codes, num_codes, dtype=torch.float64, device=self.device)
        rhs = torch.zeros(groups, num_codes, dtype=torch.float64, device=self.device)
        step = max(1, CHUNK_ELEMENTS // (num_codes * self.cols))
        for q in range(self.grams.shape[0]):
            gram = self.grams[q].to(PRODUCT_DTYPE)
            for start in range(q * self.per_block, (q + 1) * self.per_block, step):
                stop = min(start + step, (q + 1) * self.per_block)
                onehot = torch.zeros(stop - start, num_codes, self.cols, dtype=PRODUCT_DTYPE, device=self.device)
                onehot.scatter_(1, codes[start:stop, None, :],
                                (self.learnable * self.scale)[start:stop, None, :].to(PRODUCT_DTYPE))
                weighted = (onehot.reshape(-1, self.cols) @ gram).view_as(onehot)
                rows_normal = torch.bmm(weighted, onehot.transpose(1, 2))
                rows_rhs = torch.bmm(weighted, self.target[start:stop, :, None].to(PRODUCT_DTYPE))[..., 0]
                normal.index_add_(0, self.group_of_row[start:stop], rows_normal.to(torch.float64))
                rhs.index_add_(0, self.group_of_row[start:stop], rows_rhs.to(torch.float64))
        ridge = RIDGE * torch.diagonal(normal, dim1=1, dim2=2).mean(dim=1).clamp(min=1e-30)
        eye = torch.eye(num_codes, dtype=torch.float64, device=self.device)
        solved = torch.linalg.solve(normal + ridge[:, None, None] * eye, rhs + ridge[:, None] * books)
        rounded = _round(solved, dtype)
        order = rounded.argsort(dim=1, stable=True)
        rank = order.argsort(dim=1)
        return rounded.gather(1, order), rank[self.group_of_row].gather(1, codes)


def _round(values: torch.Tensor, dtype: np.dtype) -> torch.Tensor:
    """``values`` rounded to the storage dtype, back in float64."""
    return torch.from_numpy(values.cpu().numpy().astype(dtype).astype(np.float64)).to(values.device)


def _sorted_books(encoded: EncodedMatrix, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The encoding's codebooks sorted per group (float64) and its codes permuted accordingly (int64)."""
    books = torch.as_tensor(encoded.codebooks.astype(np.float64), device=device)
    order = books.argsort(dim=1, stable=True)
    group_of_row = torch.repeat_interleave(torch.arange(len(encoded.group_sizes)),
                                           torch.tensor(encoded.group_sizes)).to(device)
    codes = torch.as_tensor(encoded.codes.astype(np.int64), device=device)
    return books.gather(1, order), order.argsort(dim=1)[group_of_row].gather(1, codes)


def layer_objective(matrix: np.ndarray, encoded: EncodedMatrix, gram: np.ndarray | None) -> float:
    """The relative output error ``tr(ΔW H ΔW^T) / tr(W H W^T)`` of ``encoded`` (damped H, see the module)."""
    view = _as_shared_codebook(encoded)
    layer = _Layer(matrix, view, gram, "cpu", shared_scales=encoded.multi_scaling)
    books, codes = _sorted_books(view, layer.device)
    return layer.objective(layer.decode(books, codes))[0]


def refit_codebooks(matrix: np.ndarray, encoded: EncodedMatrix, gram: np.ndarray | None) -> EncodedMatrix:
    """The closed-form least-squares codebooks for ``encoded``'s codes (codes permuted if the order changes)."""
    _check_codebook_size(encoded)
    view = _as_shared_codebook(encoded)
    layer = _Layer(matrix, view, gram, "cpu", shared_scales=encoded.multi_scaling)
    books, codes = _sorted_books(view, layer.device)
    books, codes = layer.refit(books, codes, view.codebooks.dtype)
    return _from_shared_codebook(encoded, _encoded(view, books, codes))


def refit_input_blocks(matrix: np.ndarray, encoded: EncodedMatrix, gram: np.ndarray | None) -> EncodedMatrix:
    """``encoded`` (with input blocks) with the closed-form block scales and offsets for its codes and codebooks
    (rounded to the blocks' dtype; see "Input blocks" in the module docstring)."""
    layer = _Layer(matrix, encoded, gram, "cpu")
    books, codes = _sorted_books(encoded, layer.device)
    dtype = encoded.block_scales.dtype
    layer.refit_blocks(books, codes, dtype)
    return replace(encoded, block_scales=layer.block_scales.numpy().astype(dtype),
                   block_offsets=layer.block_offsets.numpy().astype(dtype))


def _encoded(template: EncodedMatrix, books: torch.Tensor, codes: torch.Tensor,
             blocks: tuple[torch.Tensor, torch.Tensor] | None = None) -> EncodedMatrix:
    """``template`` with these codebooks and codes (and block scales and offsets, when given)."""
    dtype = template.codebooks.dtype
    learned = {} if blocks is None else dict(block_scales=blocks[0].cpu().numpy().astype(dtype),
                                             block_offsets=blocks[1].cpu().numpy().astype(dtype))
    return replace(template, codebooks=books.cpu().numpy().astype(dtype), codes=codes.cpu().numpy().astype(np.uint8),
                   **learned)


def _as_shared_codebook(encoded: EncodedMatrix) -> EncodedMatrix:
    """A multi-scaling encoding seen as what the learner handles: its shared codebook as the one group of all rows,
    and each row's group scale as the scale of one input block spanning the row (offset 0). Others unchanged."""
    if not encoded.multi_scaling:
        return encoded
    rows, cols = encoded.codes.shape
    row_scales = np.repeat(encoded.scales, encoded.group_sizes)[:, None]
    return replace(encoded, codebooks=encoded.shared_codebook[None, :], group_sizes=(rows,), scales=None,
                   shared_codebook=None, block_size=cols, block_scales=row_scales,
                   block_offsets=np.zeros_like(row_scales))


def _from_shared_codebook(template: EncodedMatrix, learned: EncodedMatrix) -> EncodedMatrix:
    """The learned view of :func:`_as_shared_codebook` stored back in ``template``'s multi-scaling form."""
    if not template.multi_scaling:
        return learned
    shared = learned.codebooks[0]
    books = template.scales.astype(np.float32)[:, None] * shared.astype(np.float32)[None, :]
    return replace(template, codebooks=books, codes=learned.codes, shared_codebook=shared)


def _check_codebook_size(encoded: EncodedMatrix) -> None:
    if encoded.codebooks.shape[1] > 256:
        raise ValueError(f"codebooks of {encoded.codebooks.shape[1]} values do not fit uint8 codes")


def learn_layer(
    matrix: np.ndarray,
    initial: EncodedMatrix,
    gram: np.ndarray | None,
    *,
    mapping: Mapping = "proximal",
    init: Init = "error-feedback",
    steps: int = 50,
    learning_rate: float = 0.05,
    refit_every: int = 50,
    seed: int = 0,
    device: str = "cpu",
) -> LearnedLayer:
    """Jointly learn the codebooks and codes of ``initial`` for the layer objective (see the module docstring).

    Args:
        matrix: the float weight [rows, cols], rows = output neurons.
        initial: its encoding (k-means from :func:`~jlcm_onnx.encodings.codebook.encode_matrix`); group sizes and
            outliers kept.
        gram: ``H = sum x x^T`` [cols, cols] (or [Q, cols, cols] per conv group), float64; None: plain weight MSE.
        mapping: ``"proximal"`` (straight-through latent, nearest codeword), ``"naive"`` (continuous index, the
            rejected update) or ``"frozen"`` (codebooks only).
        init: ``"kmeans"`` (the codes of ``initial``) or ``"error-feedback"`` (GPTQ codes against ``initial``'s
            codebooks, then a closed-form codebook refit).
        steps: Adam steps (cosine schedule from ``learning_rate`` to 0).
        learning_rate: in codeword gaps per step (the latent of a weight in group g is ``V0 + gap_g * Z``).
        refit_every: closed-form codebook refit period, in steps (and once at the end).
        seed: torch seed (the learner itself draws nothing at random).
        device: torch device.

    """
    _check_codebook_size(initial)
    template, initial = initial, _as_shared_codebook(initial)
    if mapping not in ("proximal", "naive", "frozen"):
        raise ValueError(f"mapping must be 'proximal', 'naive' or 'frozen', not {mapping!r}")
    if init not in ("kmeans", "error-feedback"):
        raise ValueError(f"init must be 'kmeans' or 'error-feedback', not {init!r}")
    torch.manual_seed(seed)
    dtype = initial.codebooks.dtype
    layer = _Layer(matrix, initial, gram, device, shared_scales=template.multi_scaling)
    books, codes = _sorted_books(initial, layer.device)
    initial_objective = layer.objective(layer.decode(books, codes))[0]
    if init == "error-feedback":
        ef = error_feedback_codes(matrix, books.cpu().numpy(), initial.group_sizes, gram,
                                  outlier_index=initial.outlier_index, outlier_values=initial.outlier_values,
                                  block_affine=initial.block_affine() if initial.blocked else None)
        codes = torch.as_tensor(ef.astype(np.int64), device=layer.device)
        books, codes = layer.refit(books, codes, dtype)
        if layer.learns_blocks:
            books, codes = layer.refit_all(books, codes, dtype)
    update = MappingUpdate(mapping, layer.codewords(books, codes), books, codes, layer.group_of_row, steps,
                           learning_rate)
    best = (math.inf, books, codes, None)
    trace: list[float] = []
    for step in range(steps + 1):
        value, gradient = layer.objective(layer.decode(books, codes))
        trace.append(value)
        if value < best[0]:
            best = (value, books, codes, (layer.block_scales, layer.block_offsets) if layer.learns_blocks else None)
        if step == steps:
            break
        codes = update.step(gradient * layer.scale, books, codes)
        if (step + 1) % refit_every == 0 or step + 1 == steps:
            old_values, old = layer.codewords(books, codes), codes
            books, codes = layer.refit_all(books, codes, dtype)
            update.follow_refit(layer.codewords(books, codes) - old_values, old, codes)
    final_objective, books, codes, blocks = best
    return LearnedLayer(encoded=_from_shared_codebook(template, _encoded(initial, books, codes, blocks)), trace=trace,
                        initial_objective=initial_objective, final_objective=final_objective)
