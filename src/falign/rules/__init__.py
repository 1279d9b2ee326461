"""Learning rules, one small module each, found by name through a registry.

=======  ==========================================================  ===========================
name     backward input signal                                       source
=======  ==========================================================  ===========================
bp       ``g W``                                                     backpropagation (oracle)
fa       ``g B``, ``B`` fixed random                                 Lillicrap et al. 2016
dfa      ``e D_l`` from the output error                             Nøkland 2016
usf      ``g (s·sign W)``                                            Liao, Leibo & Poggio 2016
frsf     ``g (|R| ⊙ sign W)``, ``R`` fixed                           Liao, Leibo & Poggio 2016
brsf     ``g (|R_t| ⊙ sign W)``, ``R_t`` redrawn every step          Liao, Leibo & Poggio 2016
kp       ``g B``, ``B`` gets W's gradient and weight decay           Akrout et al. 2019
wm       ``g B``, ``B`` learned by mirror steps on noise             Akrout et al. 2019
drtp     ``t P_l`` from the one-hot target (no error travels)        Frenkel, Lefebvre & Bol 2021
dkp      ``e D_l``, ``D_l`` learned Kolen–Pollack-style (``eᵀx``)     Webster, Choi & Ahn 2021
=======  ==========================================================  ===========================

A new rule is one module here and one line in :data:`RULES`; everything else reads its class data
(:mod:`falign.rules.base`).
"""

from __future__ import annotations

from falign.rules.base import (
    FEEDBACK_INITS,
    Feedback,
    FeedbackInit,
    FeedbackRule,
    Law,
    NoOptions,
    Signal,
    option_help,
)
from falign.rules.bp import Backprop
from falign.rules.brsf import BatchwiseRandomSignFeedback
from falign.rules.dfa import DirectFeedbackAlignment
from falign.rules.dkp import DirectKolenPollack
from falign.rules.drtp import DirectRandomTargetProjection
from falign.rules.fa import FeedbackAlignment
from falign.rules.frsf import FixedRandomSignFeedback
from falign.rules.kp import KolenPollack
from falign.rules.usf import UniformSignFeedback
from falign.rules.wm import WeightMirror, mirror_step

RULES: dict[str, type[FeedbackRule]] = {
    cls.name: cls
    for cls in (
        Backprop,
        FeedbackAlignment,
        DirectFeedbackAlignment,
        UniformSignFeedback,
        FixedRandomSignFeedback,
        BatchwiseRandomSignFeedback,
        KolenPollack,
        WeightMirror,
        DirectRandomTargetProjection,
        DirectKolenPollack,
    )
}


def available_rules() -> list[str]:
    """Registry names of every learning rule, sorted."""
    return sorted(RULES)


def get_rule(rule: str | FeedbackRule, **options) -> FeedbackRule:
    """A rule instance from a registry name (with the rule's own options) or an instance as is."""
    if isinstance(rule, FeedbackRule):
        if options:
            raise TypeError("rule options are only accepted with a rule name, not a rule instance")
        return rule
    if not isinstance(rule, str) or rule not in RULES:
        raise ValueError(f"unknown rule {rule!r}; available rules: {', '.join(available_rules())}")
    return RULES[rule](**options)


__all__ = [
    "FEEDBACK_INITS",
    "RULES",
    "Backprop",
    "BatchwiseRandomSignFeedback",
    "DirectFeedbackAlignment",
    "DirectKolenPollack",
    "DirectRandomTargetProjection",
    "Feedback",
    "FeedbackAlignment",
    "FeedbackInit",
    "FeedbackRule",
    "FixedRandomSignFeedback",
    "KolenPollack",
    "Law",
    "NoOptions",
    "Signal",
    "UniformSignFeedback",
    "WeightMirror",
    "available_rules",
    "get_rule",
    "mirror_step",
    "option_help",
]
