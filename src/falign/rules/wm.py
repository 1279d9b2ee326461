"""``wm``: weight mirror (Akrout, Wilson, Humphreys, Lillicrap & Tweed, NeurIPS 2019).

The backward pass uses the buffer ``B = feedback_weight`` as in ``fa``. Between training steps,
*mirror steps* teach ``B`` the weights: white noise ``x ~ N(0, σ²)`` of shape ``(N, in)`` goes through
each layer, ``y = x Wᵀ``, and

    B ← (1 − λ) B + η yᵀ x / N,

whose expectation is ``(1 − λ) B + η σ² W``: ``B`` converges to ``(η σ²/λ) W``, aligned with ``W``.
The noise of a layer's mirror steps after optimiser step ``t`` is drawn from a generator seeded with the
layer's feedback seed and ``t`` (``feedback_step``, a buffer), as brsf's redraws: the same on every process.
``every=k`` takes the mirror steps after every k-th optimiser step only, dividing their cost by k (the
W–B angle and accuracy this costs: ``python benchmarks/wm_schedule.py``, docs/benchmarks.md).
The defaults (η = λ = 0.2, N = 128) track ``W`` within a few steps: a slow mirror (λ = 0.05) lags
behind fast-moving weights, and on LeNet / Fashion-MNIST with SGD momentum 0.9 that lag made
training diverge, while λ = 0.2 stayed stable (angles 8–30° per layer).
Convolutions use noise of the kernel's spatial size, so ``yᵀx`` is the weight gradient of a
``1×1`` output. The mirror steps run after every optimiser step through the step hook that
:func:`falign.attach` installs (``steps`` of them; ``--rule-option steps=K`` in ``falign train``);
:func:`mirror_step` runs them by hand, with each layer's own options unless told otherwise.

Example::

    model = falign.convert(net, "wm", lr=0.2, decay=0.2)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    falign.attach(model, opt)            # mirror steps after every opt.step(), in any loop
    for x, y in loader:
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad(); loss.backward(); opt.step()
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import cast

import torch
from torch import Tensor, nn

from falign.rules.base import Feedback, FeedbackLayer, FeedbackRule, load_seed_state, register_seed_state
from falign.seeding import mix_seed


@dataclass(frozen=True)
class MirrorOptions:
    """Options of ``wm`` (``--rule-option KEY=VALUE`` on the command line)."""

    lr: float = field(default=0.2, metadata={"help": "mirror step size η"})
    decay: float = field(default=0.2, metadata={"help": "mirror decay λ in [0, 1)"})
    noise_std: float = field(default=1.0, metadata={"help": "standard deviation σ of the mirror noise"})
    batch_size: int = field(default=128, metadata={"help": "noise samples N per mirror step"})
    steps: int = field(default=1, metadata={"help": "mirror steps after each optimiser step"})
    every: int = field(default=1, metadata={
        "help": "take the mirror steps after every k-th optimiser step only (1: after each; k > 1 divides their "
                "cost by k, B then lags W by up to k - 1 updates)"})

    def __post_init__(self) -> None:
        if not (self.lr > 0 and 0 <= self.decay < 1 and self.noise_std > 0 and self.batch_size >= 1
                and self.steps >= 0 and self.every >= 1):
            raise ValueError("wm needs lr > 0, 0 <= decay < 1, noise_std > 0, batch_size >= 1, steps >= 0, every >= 1; "
                             f"got lr={self.lr}, decay={self.decay}, noise_std={self.noise_std}, "
                             f"batch_size={self.batch_size}, steps={self.steps}, every={self.every}")


class WeightMirror(FeedbackRule):
    """Weight mirror: ``B`` (a buffer) learned by mirror steps after each optimiser step."""

    name = "wm"
    summary = "weight mirror: B learned from noise, B <- (1-λ)B + η yᵀx/N (Akrout et al. 2019)"
    feedback = Feedback.LEARNED
    step_work = "mirror steps that teach B the weights"
    Options = MirrorOptions

    def register_state(self, layer) -> None:
        # the optimiser steps counted (saved for an exact resume): with the layer's feedback seed they name the
        # mirror noise, so a layer's draws do not depend on which other layers share its process (pipeline
        # stages) or on the global generator
        layer.register_buffer("feedback_step", torch.zeros((), dtype=torch.int64))
        layer.rule_state["step"] = 0
        register_seed_state(layer)  # the noise is named by (seed, step): both travel in the state_dict

    def after_load(self, layer) -> None:
        layer.rule_state["step"] = int(layer.feedback_step)
        load_seed_state(layer)

    def after_step(self, layers, optimizer=None) -> None:
        o = self.options
        due = []
        for layer in layers:
            step = layer.rule_state["step"] = layer.rule_state["step"] + 1
            layer.feedback_step.fill_(step)
            if step % o.every == 0:
                due.append(layer)
        for i in range(o.steps):
            for layer in due:
                generator = torch.Generator(device=layer.weight.device)
                generator.manual_seed(mix_seed(layer.feedback_seed, layer.rule_state["step"], i))
                mirror_layer(layer, o.lr, o.decay, o.noise_std, o.batch_size, generator)


@torch.no_grad()
def mirror_layer(layer, lr: float, decay: float, noise_std: float = 1.0, batch_size: int = 128,
                 generator: torch.Generator | None = None) -> None:
    """One mirror step on one converted layer: ``B ← (1−λ)B + η yᵀx/N`` with ``x ~ N(0, σ²)``."""
    w: Tensor = layer.weight
    b: Tensor = layer.feedback_weight
    if w.dim() == 2:
        x = torch.randn(batch_size, w.shape[1], device=w.device, dtype=w.dtype, generator=generator)
        x.mul_(noise_std)
        y = x.mm(w.t())
        update = y.t().mm(x)
    else:
        groups = layer.groups
        n = w.dim() - 2
        transposed = bool(getattr(layer, "transposed", False))
        # noise over one kernel window (a transposed convolution: one input position, whose output is the
        # kernel window), so yᵀx is the weight gradient of a single position and E[yᵀx] = σ² N W
        shape = (batch_size, w.shape[0], *([1] * n)) if transposed else (batch_size, w.shape[1] * groups,
                                                                         *w.shape[2:])
        x = torch.randn(shape, device=w.device, dtype=w.dtype, generator=generator).mul_(noise_std)
        y = torch.convolution(x, w, None, [1] * n, [0] * n, [1] * n, transposed, [0] * n, groups)
        _, update, _ = torch.ops.aten.convolution_backward(
            y, x, w, None, [1] * n, [0] * n, [1] * n, transposed, [0] * n, groups, [False, True, False]
        )
    b.mul_(1.0 - decay).add_(update, alpha=lr / batch_size)


def mirror_step(model: nn.Module, lr: float | None = None, decay: float | None = None,
                noise_std: float | None = None, batch_size: int | None = None,
                generator: torch.Generator | None = None) -> int:
    """One mirror step on every ``wm`` layer of ``model``; returns how many layers were updated.

    Each option left at ``None`` takes the value the layer was converted with (``falign.convert(net, "wm",
    lr=..., decay=...)``); a value given here overrides it for this call.
    """
    count = 0
    for module in model.modules():
        rule = getattr(module, "rule", None)
        if isinstance(rule, WeightMirror):  # a converted layer under wm
            o = rule.options
            mirror_layer(module, o.lr if lr is None else lr, o.decay if decay is None else decay,
                         o.noise_std if noise_std is None else noise_std,
                         o.batch_size if batch_size is None else batch_size, generator)
            cast(FeedbackLayer, module).mark_stepped()
            count += 1
    return count
