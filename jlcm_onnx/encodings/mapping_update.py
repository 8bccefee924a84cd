"""The mapping step of the joint learning (:mod:`jlcm_onnx.encodings.learning`): how the codes move between two
closed-form codebook refits.

**Mapping step, proximal (the paper's).** A continuous latent ``V`` per weight is updated by Adam with the
straight-through gradient ``dL/dW^`` (the gradient at the quantized point applied to the latent), and every weight is
re-mapped to the codeword nearest its latent, ``I = argmin_k |V - C[g, k]|``. A weight moves only to a codeword near
its latent value, which drifts by about ``learning_rate`` codeword gaps per step (V is parametrised as ``V0 + gap_g *
Z`` and Adam updates Z): the proximal step. Two choices made by measurement (64x48 layers, correlated inputs, 3 seeds):
``V0`` is the decoded value ``W^`` (the codeword, so a latent must travel half a cell before its code changes), not
``W`` as the paper's description suggests (from ``W`` the final objective was 20-70% higher: weights next to a cell
edge flip on noise); and when a refit moves the codewords each latent moves with its own codeword (``V += C_new[I] -
C_old[I]``), so the refit changes no code by itself (without this, every refit re-mapped many weights at once and the
final objective doubled). Frequent refits still hurt (every step: 2-3x worse than every 50 steps), hence
``refit_every=50``.

**Mapping step, naive (the ablation the paper rejects).** The index is treated as continuous, ``U`` (initialised at
``I``) with ``dL/dU = dL/dW^ * (C[I+1] - C[I])``, and ``I = clip(round(U), 0, K-1)``; the step in value space grows
with the gap between codewords.

**Frozen.** Codes never change; only the codebooks are refit.
"""

from __future__ import annotations

import math
from typing import Literal

import torch

from jlcm_onnx.encodings.kmeans import nearest_codes

Mapping = Literal["proximal", "naive", "frozen"]


class MappingUpdate:
    """The state of one layer's mapping step: the latents (or continuous indices), Adam and its cosine schedule."""

    def __init__(self, mapping: Mapping, latent: torch.Tensor, books: torch.Tensor, codes: torch.Tensor,
                 group_of_row: torch.Tensor, steps: int, learning_rate: float) -> None:
        """``latent``: the decoded value of every weight (``V0``); ``books`` [G, K] sorted and ``codes`` [rows, cols]
        the starting state; ``group_of_row`` each row's group."""
        self.mapping, self.latent, self.group_of_row = mapping, latent, group_of_row
        self.num_codes = books.shape[1]
        gap = ((books[:, -1] - books[:, 0]) / max(self.num_codes - 1, 1))[group_of_row][:, None]
        self.gap = torch.where(gap > 0, gap, torch.full_like(gap, 1e-8))
        self.parameter = torch.zeros_like(latent) if mapping != "naive" else codes.to(torch.float64)
        self.parameter.requires_grad_(True)
        self.moves_codes = steps > 0 and mapping != "frozen"
        if self.moves_codes:  # only then: the first torch optimizer made in a process costs seconds of imports
            self.optimizer = torch.optim.Adam([self.parameter], lr=learning_rate)
            self.schedule = torch.optim.lr_scheduler.LambdaLR(
                self.optimizer, lambda step: 0.5 * (1.0 + math.cos(math.pi * min(step, steps) / max(steps, 1))))

    def step(self, gradient: torch.Tensor, books: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
        """One Adam step on the straight-through ``gradient`` (``dL/dW^`` in the codebook's normalised space); the
        codes it leads to."""
        if not self.moves_codes:
            return codes
        row_books = books[self.group_of_row]
        if self.mapping == "proximal":
            self.parameter.grad = gradient * self.gap
        else:
            upper = row_books.gather(1, (codes + 1).clamp(max=self.num_codes - 1))
            lower = row_books.gather(1, (codes + 1).clamp(max=self.num_codes - 1) - 1)
            self.parameter.grad = gradient * (upper - lower)
        self.optimizer.step()
        self.schedule.step()
        with torch.no_grad():
            if self.mapping == "proximal":
                return nearest_codes(self.latent + self.gap * self.parameter, row_books)
            return self.parameter.round().clamp(0, self.num_codes - 1).to(torch.int64)

    def follow_refit(self, moved: torch.Tensor, old_codes: torch.Tensor, codes: torch.Tensor) -> None:
        """After a refit that moved each weight's codeword by ``moved`` and permuted ``old_codes`` into ``codes``:
        each latent moves with its codeword, so the refit changes no code by itself."""
        with torch.no_grad():
            if self.mapping == "naive":
                self.parameter += (codes - old_codes).to(torch.float64)
            elif self.mapping == "proximal":
                self.latent = self.latent + moved
