"""``bp``: plain backpropagation, the baseline and the test oracle (``B = W``)."""

from __future__ import annotations

from torch import Tensor

from falign.rules.base import Feedback, FeedbackRule, Law


class Backprop(FeedbackRule):
    """Backpropagation: the input signal is ``g W``. The layer keeps no feedback matrix."""

    name = "bp"
    summary = "backpropagation (B = W)"
    feedback = Feedback.NONE
    law = Law.BALANCEDNESS

    def feedback_shape(self, layer) -> None:
        return None

    def matrix(self, layer, weight: Tensor, out: Tensor | None = None) -> Tensor:
        return weight
