"""``bp``: plain backpropagation, the baseline and the test oracle (``B = W``)."""

from __future__ import annotations

from torch import Tensor

from falign.rules.base import FeedbackRule


class Backprop(FeedbackRule):
    """Backpropagation: the input signal is ``g W``. The layer keeps no feedback matrix."""

    name = "bp"
    has_feedback = False
    summary = "backpropagation (B = W)"

    def feedback_shape(self, layer) -> None:
        return None

    def current_feedback(self, layer) -> Tensor:
        return layer.weight.detach()

    def forward(self, layer, x: Tensor) -> Tensor:
        return layer.plain_forward(x)
