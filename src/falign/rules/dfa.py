"""``dfa``: direct feedback alignment (Nøkland, NeurIPS 2016).

A converted layer's input signal is ``e D_l`` where ``e = ∂L/∂output`` is the model output's error
(``N × n_out``) and ``D_l ∈ R^{n_out × in_l}`` is fixed random (``feedback_weight``). The error is
captured by an :class:`~falign.functional.ErrorTap` that :func:`falign.convert` attaches to the
converted model's output, so DFA works on any architecture: layers without weights between two
converted layers pass the DFA signal on by the chain rule, and residual additions sum it with the
skip path. The first layer's input signal, when its input is data, is never computed.

``D`` of a Linear layer is ``(n_out, in_features)`` and exists after conversion; ``D`` of a
convolution is ``(n_out, C·H·W)`` of the layer's input and is created at the first forward pass.
``n_out`` is ``output_features`` given to :func:`falign.convert`, else the ``out_features`` of the
last ``nn.Linear`` in the model.
"""

from __future__ import annotations

import math

from torch import Tensor

from falign.rules.base import FeedbackRule


class DirectFeedbackAlignment(FeedbackRule):
    name = "dfa"
    summary = "direct feedback alignment: input signal e·D_l from the output error (Nøkland 2016)"

    def feedback_shape(self, layer) -> tuple[int, ...] | None:
        n_out = layer.dfa_output_features
        if n_out is None:
            return None
        if layer.weight.dim() == 2:
            return (n_out, layer.weight.shape[1])
        shape = layer._dfa_input_shape
        return None if shape is None else (n_out, math.prod(shape[1:]))

    def forward(self, layer, x: Tensor) -> Tensor:
        if layer.feedback_weight.numel() == 0:
            layer._dfa_input_shape = tuple(x.shape)
            layer.reset_feedback()  # the shape is known now
        if not self.needs_signal(x):
            return layer.plain_forward(x)
        layer._feedback_used = True
        return layer.direct_forward(x, layer.feedback_weight, layer.error_tap)
