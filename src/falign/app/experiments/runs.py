"""Small training runs shared by the experiments: an MLP trained for a fixed number of optimiser steps under
one rule, measuring what the experiments compare (accuracy, gradient alignment, weight–feedback alignment),
and the intervention that sets a layer's feedback at a chosen angle to its weights."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import falign
from falign.app.experiments.base import final_logit_scale
from falign.data import Dataset
from falign.diagnostics import angle, backprop_gradients, weight_alignment
from falign.models import MLP
from falign.nn import FeedbackLayer


@torch.no_grad()
def feedback_at_angle(layer: FeedbackLayer, degrees: float, generator: torch.Generator, *,
                      reference: Tensor | None = None, keep: bool = False) -> Tensor:
    """Set ``layer``'s feedback to ``B = ‖B₀‖ (cos θ Ŵ + sin θ R̂⊥)``: exactly the angle θ to the layer's current
    weights ``W``, the norm of the feedback it was drawn with (``B₀``), ``R⊥`` a random direction orthogonal to
    ``W`` (drawn from ``generator``). Needs feedback of W's shape that the rule uses as ``B`` itself.

    ``keep``: ``R⊥`` is the part of the layer's current feedback orthogonal to ``W`` (a random direction only
    where that part vanishes), so the feedback is turned to the angle θ and stays the same matrix otherwise.
    ``reference``: a matrix of W's shape to take the angle to instead of ``W`` (a placebo: held at θ to a fixed
    random matrix, the feedback's angle to ``W`` is left to the rule)."""
    b0 = layer.feedback_weight
    if b0 is None or b0.shape != layer.weight.shape:
        raise ValueError(f"{type(layer).__name__} under {layer.rule.name} has no feedback of W's shape to set")
    w = (layer.weight if reference is None else reference).detach().double().flatten()
    w_hat = w / w.norm()
    r = b0.detach().double().flatten().clone() if keep else None
    if r is not None:
        r -= (r @ w_hat) * w_hat
    if r is None or float(r.norm()) <= 1e-6 * float(b0.double().norm()):
        r = torch.randn(w.shape, generator=generator, dtype=torch.float64).to(w.device)
        r -= (r @ w_hat) * w_hat
    r_hat = r / r.norm()
    theta = math.radians(degrees)
    b = float(b0.double().norm()) * (math.cos(theta) * w_hat + math.sin(theta) * r_hat)
    b0.copy_(b.reshape(b0.shape).to(b0.dtype))
    return b0


@dataclass
class MLPRun:
    """One training run of an MLP ``[inputs, *hidden, classes]`` under ``rule``.

    ``feedback_angle``: set every hidden-to-hidden and output layer's feedback at this angle (degrees) to its
    initial weights (:func:`feedback_at_angle`); with ``hold_angle_every = k`` it is set again to the current
    weights every ``k`` steps, so the angle is held through training. ``angle_keeps_feedback``: each setting turns
    the layer's current feedback to the angle (``keep`` of :func:`feedback_at_angle`) instead of drawing a new
    direction orthogonal to ``W``. ``angle_reference = "random"``: the angle is taken to a fixed random matrix per
    layer (drawn once) instead of ``W`` — the placebo of the intervention. ``measure``: how many times, evenly over
    the second half of training, the angle between each hidden layer's update and its true gradient is measured.

    Training stops at a stated criterion when ``fit_target`` is given (``steps`` is then the cap): every
    ``check_every`` steps the training accuracy (on up to 4,096 training examples) is measured, and training
    stops when it reaches ``fit_target`` (``"fit"``) or when the training loss has not fallen by 1% over
    ``patience`` checks (``"plateau"``); ``"cap"`` when ``steps`` ran out first. The result says which, and after
    how many steps. The gradient angle is then averaged over the second half of the checks.
    """

    rule: str
    data: Dataset
    hidden: tuple[int, ...] = (128, 128)
    steps: int = 600
    batch: int = 64
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 0.0
    seed: int = 0
    init_scale: float = 1.0
    feedback_angle: float | None = None
    measure: int = 10
    activation: str = "relu"
    rule_options: dict | None = None
    device: str = "cpu"
    fit_target: float | None = None
    check_every: int = 100
    patience: int = 5
    hold_angle_every: int | None = None
    angle_keeps_feedback: bool = False
    angle_reference: str = "weights"

    def run(self) -> dict[str, Any]:
        start = time.perf_counter()
        x, y = self.data.x_train.flatten(1).to(self.device), self.data.y_train.to(self.device)
        torch.manual_seed(self.seed)
        base = MLP([x.shape[1], *self.hidden, self.data.num_classes], activation=self.activation,
                   init_scale=self.init_scale)
        model = falign.convert(base.to(self.device), self.rule, seed=self.seed, example_input=x[:2],
                               **(self.rule_options or {}))
        layers = [m for m in model.modules() if isinstance(m, FeedbackLayer)]
        angle_gen = torch.Generator().manual_seed(self.seed + 7)
        if self.angle_reference not in ("weights", "random"):
            raise ValueError(f"angle_reference must be 'weights' or 'random', got {self.angle_reference!r}")
        refs = [torch.randn(m.weight.shape, generator=angle_gen).to(m.weight.device)
                if self.angle_reference == "random" else None for m in layers]

        def set_angles() -> None:
            for layer, ref in zip(layers[1:], refs[1:]):
                feedback_at_angle(layer, self.feedback_angle, angle_gen, reference=ref, keep=self.angle_keeps_feedback)

        if self.feedback_angle is not None:
            set_angles()
        wb_start = _mean([v["angle"] for v in _weight_alignment_all(model).values()])
        opt = torch.optim.SGD(model.parameters(), lr=self.lr, momentum=self.momentum, weight_decay=self.weight_decay)
        train_step = falign.TrainStep(model, opt)
        target = train_step.uses_target
        names = {id(m): n for n, m in model.named_modules()}
        hidden = [names[id(m)] for m in layers[1:-1]] + [names[id(layers[0])]]  # every layer but the output's
        params = {n: p for n, p in model.named_parameters() if not n.endswith("feedback_weight")}
        criterion = self.fit_target is not None
        when = set() if criterion else \
            set(torch.linspace(self.steps // 2, self.steps - 1, max(1, self.measure)).round().long().tolist())
        angles: dict[str, list[float]] = {n: [] for n in hidden}
        checked: list[dict[str, float]] = []  # per check: angles by layer
        g = torch.Generator().manual_seed(self.seed + 11)
        check_x, check_y = x[:4096], y[:4096]
        stopped, losses, steps_run = "cap", [], self.steps
        for step in range(self.steps):
            if self.hold_angle_every and self.feedback_angle is not None and step and step % self.hold_angle_every == 0:
                set_angles()
            idx = torch.randint(0, len(y), (min(self.batch, len(y)),), generator=g)
            check = criterion and (step + 1) % self.check_every == 0

            def measure(loss: Tensor, check: bool = check) -> None:
                true = backprop_gradients(loss, params)
                row = {name: angle(params[f"{name}.weight"].grad, true[f"{name}.weight"]) for name in hidden}
                if check:
                    checked.append(row)
                else:
                    for name in hidden:
                        angles[name].append(row[name])

            train_step(x[idx], y[idx], measure=measure if step in when or check else None)
            if check:
                fit_loss, fit_acc = _loss_and_accuracy(model, check_x, check_y, target)
                losses.append(fit_loss)
                if not math.isfinite(fit_loss):
                    stopped, steps_run = "diverged", step + 1
                    break
                if fit_acc >= self.fit_target:
                    stopped, steps_run = "fit", step + 1
                    break
                if len(losses) > self.patience and losses[-1] > 0.99 * min(losses[: -self.patience]):
                    stopped, steps_run = "plateau", step + 1
                    break
        if criterion:
            late = checked[len(checked) // 2:]
            angles = {name: [r[name] for r in late] for name in hidden}
        x_test, y_test = self.data.x_test.flatten(1).to(self.device), self.data.y_test.to(self.device)
        train_acc, test_acc = accuracy(model, x, y), accuracy(model, x_test, y_test)
        scale = final_logit_scale(model, x, y)
        return {
            "rule": self.rule, "seed": self.seed, "classes": self.data.num_classes,
            "train acc": train_acc, "test acc": test_acc,
            "gradient angle": _mean([_mean(v) for v in angles.values()]),
            "weight-feedback angle start": wb_start,
            "weight-feedback angle": _mean([v["angle"] for v in _weight_alignment_all(model).values()]),
            "steps": steps_run, "stopped": stopped if criterion else "fixed", "logit scale": scale,
            "seconds": time.perf_counter() - start,
        }


def _weight_alignment_all(model: nn.Module) -> dict[str, dict[str, float]]:
    """Weight–feedback angles of every layer past the first (whose input is data), used yet or not."""
    layers = [m for m in model.modules() if isinstance(m, FeedbackLayer)]
    used = [(m, m._feedback_used) for m in layers]
    for m in layers[1:]:
        m._feedback_used = True
    try:
        return weight_alignment(model)
    finally:
        for m, flag in used:
            m._feedback_used = flag


def _mean(values) -> float:
    v = [x for x in values if x is not None and math.isfinite(x)]
    return sum(v) / len(v) if v else math.nan


@torch.no_grad()
def _loss_and_accuracy(model: nn.Module, x: Tensor, y: Tensor, target: bool) -> tuple[float, float]:
    was = model.training
    model.eval()
    if target:
        falign.set_target(model, y)
    out = model(x)
    model.train(was)
    return float(F.cross_entropy(out, y)), float((out.argmax(-1) == y).float().mean())


@torch.no_grad()
def accuracy(model: nn.Module, x: Tensor, y: Tensor, batch: int = 4096) -> float:
    was = model.training
    model.eval()
    correct = sum(int((model(x[i : i + batch]).argmax(-1) == y[i : i + batch]).sum()) for i in range(0, len(y), batch))
    model.train(was)
    return correct / max(1, len(y))
