"""``kp``: Kolen–Pollack learned feedback (Kolen & Pollack 1994; Akrout et al., NeurIPS 2019).

``feedback_weight`` is an ``nn.Parameter`` that receives exactly the gradient of ``W``
(``∂B = gᵀ x``) at every step, and only while ``W`` itself is trained: a frozen weight
(``weight.requires_grad_(False)``) freezes its feedback too. With weight decay λ in the optimiser both
decay alike, so ``W_t − B_t = (1 − ηλ)^t (W_0 − B_0) → 0`` under SGD: the feedback comes to mirror the
weights. Build the optimiser *after* converting so that it sees the feedback parameters.
"""

from __future__ import annotations

from falign.rules.base import Feedback, FeedbackRule


class KolenPollack(FeedbackRule):
    name = "kp"
    summary = "Kolen-Pollack: B trained with W's gradient and weight decay (Akrout et al. 2019)"
    feedback = Feedback.LEARNED
    feedback_is_parameter = True
