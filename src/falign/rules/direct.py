"""Shared code of the *direct* rules, whose hidden layers receive a signal straight from the output.

A direct rule sends a converted layer's input the projection ``q D_l`` of one quantity ``q`` known at
the output — the output error ``e = ∂L/∂output`` (``dfa``, ``dkp``) or the target (``drtp``) — through a
matrix ``D_l`` of its own (``feedback_weight``). The error of each forward pass is recorded by the model's
:class:`~falign.functional.ErrorTap` (installed by :func:`falign.convert`), the target given by
:func:`falign.set_target`; layers without weights between two converted layers pass the signal on by the
chain rule, and residual additions sum it with the skip path. The first layer's input signal, when its
input is data, is never computed.

``D_l`` is created at the layer's first forward pass, sized from the model's output (measured by
``convert``'s probe of the first forward pass); :meth:`DirectRule.plan` decides:

- *per position*: a Linear layer whose input has the output's positions (``(N, in)`` and ``(N, C)``;
  ``(N, T, in)`` and ``(N, T, C)``) gets ``q D`` at every position, ``D`` of shape ``(C, in)``;
- *per sample*: otherwise (convolutions; a Linear layer over other positions than the output's) ``q`` of
  a sample is flattened to ``E`` entries and ``D`` is ``(E, C·H·W)`` of the layer's input (conv), or
  ``(E, in)`` with the same signal at every position (Linear).
"""

from __future__ import annotations

import math

from torch import Tensor

from falign.functional import PER_POSITION, PER_SAMPLE, ErrorSession
from falign.rules.base import FeedbackRule, Signal


class DirectRule(FeedbackRule):
    """Base of the direct rules: the shape of ``D`` and the quantity projected."""

    signal = Signal.OUTPUT_ERROR

    def feedback_shape(self, layer) -> tuple[int, ...] | None:
        return layer.direct_shape

    def plan(self, layer, x: Tensor, output_sizes: tuple[int, tuple[int, ...]]) -> tuple[str, tuple[int, ...]]:
        """``(mode, shape of D)`` for ``layer`` on input ``x``, given the model output's
        ``(entries per sample, positions)``."""
        per_sample, positions = output_sizes
        if layer.weight.dim() == 2:
            x_positions = tuple(x.shape[1:-1]) if x.dim() > 1 else ()
            if x_positions == tuple(positions):
                return PER_POSITION, (per_sample // max(1, math.prod(positions)), layer.weight.shape[1])
            return PER_SAMPLE, (per_sample, layer.weight.shape[1])
        return PER_SAMPLE, (per_sample, math.prod(x.shape[1:]))

    def projected(self, session: ErrorSession | None, n_out: int) -> Tensor:
        """The quantity ``q`` that the backward pass projects through ``D`` (default: the output error)."""
        return ErrorSession.read(session)
