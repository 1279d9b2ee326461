"""``dkp``: direct Kolen–Pollack (Webster, Choi & Ahn, "Learning the Connections in Direct Feedback
Alignment", ICLR 2021 submission; code: github.com/mattmwebster/direct-kolen-pollack).

DFA whose direct matrices are learned: a hidden layer's input signal is ``e D_l`` as in ``dfa``
(:mod:`falign.rules.direct`), and ``D_l`` (``feedback_weight``, an ``nn.Parameter``) receives the gradient
``∂⟨e D_l, x_l⟩/∂D_l = eᵀ x_l`` — the output error against the layer's input — the Kolen–Pollack update
of a matrix that maps the output error to the layer's input. For the layer feeding the output that is
exactly the output weight's own gradient, as in ``kp``; with weight decay on both (put ``D_l`` in the
optimiser, with weight decay), ``D_l`` comes to estimate the forward path from the layer to the output.

What the publication leaves open, and what falign chooses: the authors train the backward matrices with
their own optimiser and learning-rate schedule and recommend a small feedback decay; falign hands
``D_l`` to the model's optimiser like every other parameter (one learning rate and weight decay unless the
user builds parameter groups), and ``D_l`` is trained only while the layer's weight is.
"""

from __future__ import annotations

from falign.rules.base import Feedback, Law
from falign.rules.direct import DirectRule


class DirectKolenPollack(DirectRule):
    name = "dkp"
    summary = "direct Kolen-Pollack: DFA whose D_l is learned with eᵀx and weight decay (Webster et al. 2021)"
    feedback = Feedback.LEARNED
    feedback_is_parameter = True
    law = Law.NONE
