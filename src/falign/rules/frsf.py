"""``frsf``: fixed random-magnitude sign-concordant feedback (Liao, Leibo & Poggio, AAAI 2016).

``B = |R| ⊙ sign(W)`` with ``R`` drawn once from the feedback initialisation; ``feedback_weight``
holds ``|R|``.
"""

from __future__ import annotations

from falign.rules.base import Law
from falign.rules.sign import SignConcordantRule


class FixedRandomSignFeedback(SignConcordantRule):
    name = "frsf"
    summary = "fixed random-magnitude sign-concordant feedback: B = |R|⊙sign(W) (Liao et al. 2016)"
    law = Law.EXACT

    def initial_feedback(self, layer, shape, init, generator):
        return init.sample(shape, generator, layer.weight.dtype).abs_()
