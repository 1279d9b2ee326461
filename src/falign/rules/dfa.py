"""``dfa``: direct feedback alignment (Nøkland, NeurIPS 2016).

A converted layer's input signal is ``e D_l`` where ``e = ∂L/∂output`` is the model output's error and
``D_l`` is fixed random (``feedback_weight``). The error of each forward pass is recorded by the
model's :class:`~falign.functional.ErrorTap` (installed by :func:`falign.convert` on the model's root),
so DFA works on any architecture: layers without weights between two converted layers pass the DFA
signal on by the chain rule, and residual additions sum it with the skip path. The first layer's input
signal, when its input is data, is never computed.

``D_l`` is created at the layer's first forward pass, sized from the model's output (measured by
``convert``'s probe of the first forward pass):

- *per position*: a Linear layer whose input has the output's positions (``(N, in)`` and ``(N, C)``;
  ``(N, T, in)`` and ``(N, T, C)``) gets ``e D`` at every position, ``D`` of shape ``(C, in)``;
- *per sample*: otherwise (convolutions; a Linear layer over other positions than the output's) the
  error of a sample is flattened to ``E`` entries and ``D`` is ``(E, C·H·W)`` of the layer's input
  (conv), or ``(E, in)`` with the same signal at every position (Linear).
"""

from __future__ import annotations

import math

from torch import Tensor

from falign.functional import PER_POSITION, PER_SAMPLE
from falign.rules.base import FeedbackRule


class DirectFeedbackAlignment(FeedbackRule):
    name = "dfa"
    summary = "direct feedback alignment: input signal e·D_l from the output error (Nøkland 2016)"

    def feedback_shape(self, layer) -> tuple[int, ...] | None:
        return layer.dfa_shape

    def plan(self, layer, x: Tensor) -> None:
        """Decide ``D``'s shape and the projection mode from the input and the model's output sizes."""
        tap = layer.error_tap
        sizes = None if tap is None else tap.output_sizes
        if sizes is None:
            raise RuntimeError(
                "dfa: this layer does not know the model's output size yet. Convert the whole model with "
                "falign.convert(model, 'dfa') and call the model (not the layer on its own), or build the layer "
                "with output_features= and call falign.install_error_tap(model)")
        per_sample, positions = sizes
        if layer.weight.dim() == 2:
            x_positions = tuple(x.shape[1:-1]) if x.dim() > 1 else ()
            if x_positions == positions:
                layer.dfa_mode = PER_POSITION
                layer.dfa_shape = (per_sample // max(1, math.prod(positions)), layer.weight.shape[1])
            else:
                layer.dfa_mode = PER_SAMPLE
                layer.dfa_shape = (per_sample, layer.weight.shape[1])
        else:
            layer.dfa_mode = PER_SAMPLE
            layer.dfa_shape = (per_sample, math.prod(x.shape[1:]))

    def forward(self, layer, x: Tensor) -> Tensor:
        if layer.feedback_weight.numel() == 0:
            self.plan(layer, x)
            layer.reset_feedback()  # the shape is known now
        if not self.needs_signal(x):
            return layer.plain_forward(x)
        layer._feedback_used = True
        tap = layer.error_tap
        return layer.direct_forward(x, layer.feedback_weight, None if tap is None else tap.current, layer.dfa_mode)
