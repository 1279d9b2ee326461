"""``fa``: feedback alignment (Lillicrap, Cownden, Tweed & Akerman, Nat. Commun. 2016).

The input signal is ``g B`` with ``B`` a fixed random matrix of W's shape, drawn once from the
feedback initialisation and the seed. ``B`` is the buffer ``feedback_weight``.
"""

from __future__ import annotations

from falign.rules.base import Feedback, FeedbackRule, Law


class FeedbackAlignment(FeedbackRule):
    """Fixed random feedback ``B`` (a buffer, never trained)."""

    name = "fa"
    summary = "feedback alignment: fixed random B (Lillicrap et al. 2016)"
    feedback = Feedback.FIXED
    law = Law.EXACT
