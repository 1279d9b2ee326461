"""Shared code of the sign-concordant rules (Liao, Leibo & Poggio, AAAI 2016).

All three use ``B = M ⊙ sign(W)`` with the *current* weights, where ``M ≥ 0`` are the magnitudes kept
in ``feedback_weight``: a constant (``usf``), fixed random ``|R|`` (``frsf``) or ``|R_t|`` redrawn every
step (``brsf``). A user who overwrites ``feedback_weight`` sets ``M`` directly.

``B`` is built in the backward pass, into a per-layer scratch buffer, from the ``W`` saved by the
forward pass (so it is the ``W`` of that forward): the forward costs nothing extra, a layer whose
input needs no gradient never builds ``B``, and no ``W``-sized tensor is allocated per step.
"""

from __future__ import annotations

from functools import partial

import torch
from torch import Tensor

from falign.rules.base import FeedbackRule


class SignConcordantRule(FeedbackRule):
    sign_concordant = True

    def current_feedback(self, layer) -> Tensor:
        return torch.sign(layer.weight.detach()).mul_(layer.feedback_weight)

    def feedback(self, layer):
        return partial(self.backward_feedback, layer)

    def backward_feedback(self, layer, weight: Tensor) -> Tensor:
        """``B = M ⊙ sign(W)`` for the ``W`` saved by the forward pass, in the layer's scratch buffer.

        Under ``create_graph=True`` (a double backward) ``B`` is built out of place, so the input signal
        ``g B`` stays differentiable (its derivative with respect to W is zero, as ``sign`` is flat).
        """
        if torch.is_grad_enabled():
            return torch.sign(weight) * layer.feedback_weight
        out = layer.scratch("feedback", weight)
        return torch.sign(weight, out=out).mul_(layer.feedback_weight)
