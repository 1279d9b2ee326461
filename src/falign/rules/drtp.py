"""``drtp``: direct random target projection (Frenkel, Lefebvre & Bol, "Learning without feedback: Fixed
random learning signals allow for feedforward training of deep neural networks", Front. Neurosci. 15,
2021; arXiv:1909.01311).

A hidden layer's input signal is ``t P_l``: the one-hot target ``t`` of the example, projected by a fixed
random matrix ``P_l`` (``feedback_weight``), in place of the output error — no error travels backwards,
so a layer can be updated as soon as its own forward pass is done. The output layer keeps its true local
gradient. ``P_l`` is sized and applied as the other direct rules' ``D`` (:mod:`falign.rules.direct`); the
target is given by :func:`falign.set_target` before each forward pass (``falign train`` does it).

What the publication leaves open, and what falign chooses:

- **Sign.** The authors' code projects ``+t`` (the target as a proxy for the sign of the error
  ``y − t``, whose wrong-class entries it drops). With ``P_l`` drawn from a distribution symmetric about
  zero, the sign only flips ``P_l``; falign projects ``+t`` as they do.
- **Scale.** The authors' code projects ``t`` unscaled. A mean-reduced loss divides its error by the
  number of labelled examples (positions) in the batch, so falign divides ``t`` by it too by default,
  keeping the hidden and output updates on one scale for one learning rate; ``batch_mean=False`` gives the
  authors' unscaled projection.
- **Targets** are class indices (``(N,)`` or ``(N, T)``) turned into one-hot vectors of the output's size,
  or a float tensor of the output's shape used as it is (soft targets).
- **Activations.** The signal ``t P_l`` does not shrink as the loss falls, so with unbounded ReLU units and a
  large step the hidden weights can grow without bound (on digits, ReLU with SGD momentum 0.9 and lr 0.01
  diverges, while tanh reaches 95.6% in 20 epochs); the publication's networks use tanh hidden units (its
  code's default), which saturate. ``falign train --rule drtp --activation tanh`` follows it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from falign.functional import OUTSIDE_FORWARD_CAUSES, ErrorSession
from falign.rules.base import Feedback, Law, Signal
from falign.rules.direct import DirectRule


@dataclass(frozen=True)
class TargetProjectionOptions:
    """Options of ``drtp``."""

    batch_mean: bool = field(default=True, metadata={
        "help": "divide the target by the number of labelled examples, as a mean-reduced loss scales its error"})


class DirectRandomTargetProjection(DirectRule):
    name = "drtp"
    summary = "direct random target projection: input signal t·P_l from the one-hot target (Frenkel et al. 2021)"
    feedback = Feedback.FIXED
    signal = Signal.TARGET
    law = Law.NONE
    Options = TargetProjectionOptions

    def projected(self, session: ErrorSession | None, n_out: int) -> Tensor:
        if session is None:
            raise RuntimeError("drtp: this layer ran outside a forward pass of the converted model (a submodule called "
                               f"on its own; {OUTSIDE_FORWARD_CAUSES}), so no target is known for it. Call the whole "
                               "model, or compute true gradients inside falign.functional.backprop_mode().")
        target = session.target
        if target is None:
            raise RuntimeError("drtp projects the target of each example: call falign.set_target(model, y) before "
                               "the forward pass (falign train does)")
        if target.is_floating_point():
            onehot, count = target, max(1, target[..., 0].numel())
        else:  # a comparison, not one_hot: no data-dependent check, so it runs under torch.func.vmap
            classes = torch.arange(n_out, device=target.device)
            onehot, count = (target.unsqueeze(-1) == classes).to(torch.get_default_dtype()), max(1, target.numel())
        return onehot / count if self.options.batch_mean else onehot
