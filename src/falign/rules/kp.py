"""``kp``: Kolen–Pollack learned feedback (Kolen & Pollack 1994; Akrout et al., NeurIPS 2019).

``feedback_weight`` is an ``nn.Parameter`` that receives exactly the gradient of ``W``
(``∂B = gᵀ x``) at every step, and only while ``W`` itself is trained: a frozen weight
(``weight.requires_grad_(False)``) freezes its feedback too, so ``W − B`` keeps decaying only where
both move. With weight decay λ in the optimiser both decay alike, so
``W_t − B_t = (1 − ηλ)^t (W_0 − B_0) → 0`` under SGD: the feedback comes to mirror the weights.
Build the optimiser *after* converting so that it sees the feedback parameters.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from falign.rules.base import FeedbackRule


class KolenPollack(FeedbackRule):
    name = "kp"
    learned = True
    summary = "Kolen-Pollack: B trained with W's gradient and weight decay (Akrout et al. 2019)"

    def wrap_feedback(self, tensor: Tensor) -> nn.Parameter:
        return nn.Parameter(tensor)

    def feedback(self, layer) -> Tensor:
        # a Parameter: the autograd function gives it W's gradient, if W is trained at all
        b = layer.feedback_weight
        return b if layer.weight.requires_grad else b.detach()

    def forward(self, layer, x: Tensor) -> Tensor:
        if not torch.is_grad_enabled():
            return layer.plain_forward(x)
        layer._feedback_used = bool(x.requires_grad)
        return layer.feedback_forward(x, self.feedback(layer))
