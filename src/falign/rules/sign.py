"""Shared formula of the sign-concordant rules (Liao, Leibo & Poggio, AAAI 2016).

All three use ``B = M ⊙ sign(W)`` with the *current* weights, where ``M ≥ 0`` are the magnitudes kept
in ``feedback_weight``: a constant (``usf``), fixed random ``|R|`` (``frsf``) or ``|R_t|`` redrawn every
step (``brsf``). A user who overwrites ``feedback_weight`` sets ``M`` directly.

The layer builds ``B`` in the backward pass from the ``W`` saved by the forward pass (so it is the ``W``
of that forward) into a per-layer scratch buffer: the forward costs nothing extra, a layer whose input
needs no gradient never builds ``B``, and no ``W``-sized tensor is allocated per step.
"""

from __future__ import annotations

import torch
from torch import Tensor

from falign.rules.base import Feedback, FeedbackRule


class SignConcordantRule(FeedbackRule):
    feedback = Feedback.SIGN

    def matrix(self, layer, weight: Tensor, out: Tensor | None = None) -> Tensor:
        """``B = M ⊙ sign(W)``."""
        if out is None:
            return torch.sign(weight) * layer.feedback_weight
        return torch.sign(weight, out=out).mul_(layer.feedback_weight)
