"""``dfa``: direct feedback alignment (Nøkland, NeurIPS 2016).

A converted layer's input signal is ``e D_l`` where ``e = ∂L/∂output`` is the model output's error and
``D_l`` is fixed random (``feedback_weight``, drawn at the layer's first forward pass, when its shape is
known); how ``D_l`` is sized and applied is in :mod:`falign.rules.direct`.
"""

from __future__ import annotations

from falign.rules.base import Feedback, Law
from falign.rules.direct import DirectRule


class DirectFeedbackAlignment(DirectRule):
    name = "dfa"
    summary = "direct feedback alignment: input signal e·D_l from the output error (Nøkland 2016)"
    feedback = Feedback.FIXED
    law = Law.LAST_HIDDEN
