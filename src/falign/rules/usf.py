"""``usf``: uniform sign-concordant feedback, "sign-FA" (Liao, Leibo & Poggio, AAAI 2016).

``B = s · sign(W)`` at every step, with ``s`` the feedback initialisation's standard deviation for
this shape, so that ``‖B‖`` matches a random feedback matrix. ``feedback_weight`` holds ``s`` in every
entry (overwrite it to change the magnitudes: ``B = feedback_weight ⊙ sign(W)``).
"""

from __future__ import annotations

import torch

from falign.rules.base import Law
from falign.rules.sign import SignConcordantRule


class UniformSignFeedback(SignConcordantRule):
    name = "usf"
    summary = "uniform sign-concordant feedback: B = s·sign(W) (Liao et al. 2016)"
    law = Law.EXACT

    def initial_feedback(self, layer, shape, init, generator):
        return torch.full(shape, init.std(shape), dtype=layer.weight.dtype)
