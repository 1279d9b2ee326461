"""``kp``: Kolen–Pollack learned feedback (Kolen & Pollack 1994; Akrout et al., NeurIPS 2019).

``feedback_weight`` is an ``nn.Parameter`` that receives exactly the gradient of ``W``
(``∂B = gᵀ x``) at every step, and only while ``W`` itself is trained: a frozen weight
(``weight.requires_grad_(False)``) freezes its feedback too. With weight decay λ in the optimiser both
decay alike, so ``W_t − B_t = (1 − ηλ)^t (W_0 − B_0) → 0`` under SGD: the feedback comes to mirror the
weights. Build the optimiser *after* converting so that it sees the feedback parameters.

**The offset form** (``falign.convert(net, "kp", form="offset")``). ``W`` and ``B`` receive the same gradient, so
under ``torch.optim.SGD`` (learning rate η_t, momentum μ, dampening τ, Nesterov or not, weight decay λ) their
difference ``D = W − B`` evolves by the weight decay alone, linearly: ``D_t = a_t D_0``, with the scalar recurrence
of SGD's own update applied to ``D`` (momentum buffer ``c``: ``c ← λa`` at the first step, then
``c ← μc + (1 − τ)λa``; step ``s = λa + μc`` with Nesterov, else ``c``, or ``λa`` without momentum; ``a ← a − η s``).
So ``B_t = W_t − a_t D_0`` is computed from ``W`` in the backward pass (``feedback_weight`` holds ``D_0``; ``a_t``
and ``c_t`` are in the ``feedback_offset`` buffer), and ``B`` needs no gradient, no optimiser state and no update:
the same training as the parameter form, to float rounding, at less cost. It needs ``falign.attach(model,
optimizer)`` with a plain ``torch.optim.SGD`` (any other optimiser is refused at its first step: use the parameter
form there), and assumes ``W`` changes only by that optimiser's steps (an edit of ``W`` alone moves ``B`` with it).
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from falign.rules.base import Feedback, FeedbackRule

FORMS = ("parameter", "offset")

# (optimizer → id(rule) → (the optimiser's groups, layers, their (layer, parameter, group))): kept while the groups
# and the layer list are the same, so the offset form's two walks per step do not map every parameter again
_MINE: weakref.WeakKeyDictionary[torch.optim.Optimizer, dict[int, tuple[Any, Any, list]]] = weakref.WeakKeyDictionary()


@dataclass(frozen=True)
class KolenPollackOptions:
    """Options of ``kp`` (``--rule-option form=offset`` on the command line)."""

    form: str = field(default="parameter", metadata={
        "help": "parameter: B is an nn.Parameter the optimiser trains (any optimiser); offset: B = W − a_t·D_0 from "
                "W, a_t following torch.optim.SGD's step (plain SGD only; no optimiser state for B)"})

    def __post_init__(self) -> None:
        if self.form not in FORMS:
            raise ValueError(f"kp's form must be one of {', '.join(FORMS)}, got {self.form!r}")


class KolenPollack(FeedbackRule):
    name = "kp"
    summary = "Kolen-Pollack: B trained with W's gradient and weight decay (Akrout et al. 2019)"
    feedback = Feedback.LEARNED
    feedback_is_parameter = True
    Options = KolenPollackOptions

    def __init__(self, **options) -> None:
        super().__init__(**options)
        self.offset = self.options.form == "offset"
        if self.offset:
            self.feedback_is_parameter = False
            self.step_work = "advance a_t of B = W − a_t·D_0 by the SGD step"

    def supports_optimizer(self, name: str) -> bool:
        return not self.offset or name == "sgd"

    @property
    def depends_on_weight(self) -> bool:
        return self.offset  # the offset form builds B from the forward's W in the backward pass

    def initial_feedback(self, layer, shape, init, generator):
        b0 = init.sample(shape, generator, layer.weight.dtype)  # the parameter form's B_0, the same draw
        if not self.offset:
            return b0
        if "offset" in layer.rule_state:
            self._set_offset(layer, 1.0, 0.0, 0)
        return layer.weight.detach().to("cpu", b0.dtype) - b0  # D_0 = W_0 − B_0

    def register_state(self, layer) -> None:
        if self.offset:
            layer.register_buffer("feedback_offset", torch.tensor([1.0, 0.0], dtype=torch.float64))
            layer.register_buffer("feedback_step", torch.zeros((), dtype=torch.int64))
            layer.rule_state["offset"] = (1.0, 0.0, 0)

    def after_load(self, layer) -> None:
        if self.offset:
            a, c = (float(v) for v in layer.feedback_offset.tolist())
            layer.rule_state["offset"] = (a, c, int(layer.feedback_step))

    @staticmethod
    def _set_offset(layer, a: float, c: float, steps: int) -> None:
        layer.rule_state["offset"] = (a, c, steps)
        layer.feedback_offset.copy_(torch.tensor([a, c], dtype=torch.float64))
        layer.feedback_step.fill_(steps)

    def matrix(self, layer, weight: Tensor, out: Tensor | None = None) -> Tensor:
        """``B = W − a_t·D_0`` (offset form), or the stored ``B``."""
        if not self.offset:
            return super().matrix(layer, weight, out)
        d0 = layer.feedback_weight
        if d0.dtype != weight.dtype:  # under autocast W is the lower precision
            d0 = d0.to(weight.dtype)
        if not torch.compiler.is_compiling():  # eager: a_t as a number (two tensor ops fewer per layer and step)
            alpha = -layer.rule_state["offset"][0]
            return torch.add(weight, d0, alpha=alpha) if out is None else torch.add(weight, d0, alpha=alpha, out=out)
        a = layer.feedback_offset[0].to(weight.dtype)  # a tensor: torch.compile does not specialise on it
        if out is None:
            return torch.addcmul(weight, d0, a, value=-1)
        return torch.addcmul(weight, d0, a, value=-1, out=out)

    @property
    def state_id(self) -> str:
        return "kp:offset" if self.offset else "kp"

    @staticmethod
    def _parameter(layer) -> Tensor:
        """The parameter the optimiser updates for ``layer``'s weight (a view's is its owner's packed parameter,
        of which the view's weight is a block: the same settings and the same recurrence apply)."""
        if getattr(type(layer), "weight_source", None) is None:  # on the class: no nn.Module.__getattr__ miss
            return layer.weight
        return getattr(layer._owner, layer.weight_source()[0])

    def _mine(self, layers, optimizer) -> list[tuple[Any, Tensor, dict]]:
        """``(layer, parameter, group)`` of the layers whose weight ``optimizer`` trains."""
        if optimizer is None:
            return []
        key = tuple((id(g), len(g["params"])) for g in optimizer.param_groups)
        store = _MINE.setdefault(optimizer, {})
        cached = store.get(id(self))
        if cached is not None and cached[0] == key and cached[1] is layers \
                and all(self._parameter(layer) is param for layer, param, _ in cached[2]):
            return cached[2]
        groups = {id(p): g for g in optimizer.param_groups for p in g["params"]}
        mine = []
        for layer in layers:
            param = self._parameter(layer)
            if id(param) in groups:
                mine.append((layer, param, groups[id(param)]))
        store[id(self)] = (key, layers, mine)
        return mine

    def before_step(self, layers, optimizer: torch.optim.Optimizer | None = None) -> None:
        """Note for each layer whether SGD's momentum buffer of its weight exists yet (SGD starts it at the step)."""
        if self.offset and optimizer is not None:
            for layer, param, _ in self._mine(layers, optimizer):
                layer.rule_state["fresh_buffer"] = optimizer.state.get(param, {}).get("momentum_buffer") is None

    def after_step(self, layers, optimizer: torch.optim.Optimizer | None = None) -> None:
        if not self.offset:
            return
        mine = self._mine(layers, optimizer)
        if optimizer is None or (mine and type(optimizer) is not torch.optim.SGD):
            got = "no optimiser (falign.step_rules without one)" if optimizer is None else type(optimizer).__name__
            raise TypeError(f"kp's offset form follows torch.optim.SGD's step, and got {got}: attach the model to a "
                            f"plain torch.optim.SGD with falign.attach(model, optimizer), or use kp's parameter form "
                            f"(the default) with any other optimiser")
        moved, values = [], []
        for layer, param, group in mine:
            if param.grad is None:  # this step did not move W (SGD skips it too)
                continue
            lr, mu, tau, wd = (float(group[k]) for k in ("lr", "momentum", "dampening", "weight_decay"))
            a, c, steps = layer.rule_state["offset"]
            g = wd * a  # the gradient's part in D: λD (the data gradients cancel)
            if mu:  # SGD starts its momentum buffer at the gradient, then accumulates with dampening
                c = g if layer.rule_state.pop("fresh_buffer", steps == 0) else mu * c + (1 - tau) * g
                s = g + mu * c if group["nesterov"] else c
            else:
                s = g
            layer.rule_state["offset"] = (a - lr * s, c, steps + 1)
            moved.append(layer)
            values.append((a - lr * s, c))
        self._write_offsets(moved, values)

    @staticmethod
    def _write_offsets(layers: list, values: list[tuple[float, float]]) -> None:
        """``feedback_offset ← (a_t, c_t)`` and ``feedback_step += 1`` for each layer: on the CPU through numpy (a
        tensor call costs ~10 µs right after a step, a numpy write ~1 µs; nothing reads these buffers' version
        counters), elsewhere in three ``_foreach`` calls for all layers."""
        on_cpu = [layer.feedback_offset.device.type == "cpu" and layer.feedback_offset.dtype == torch.float64
                  for layer in layers]
        for layer, (a, c), cpu in zip(layers, values, on_cpu):
            if cpu:
                offset = layer.feedback_offset.numpy()
                offset[0], offset[1] = a, c
                layer.feedback_step.numpy()[()] += 1
        rest = [(layer, v) for layer, v, cpu in zip(layers, values, on_cpu) if not cpu]
        if rest:
            torch._foreach_copy_([layer.feedback_offset for layer, _ in rest],
                                 list(torch.tensor([v for _, v in rest], dtype=torch.float64).unbind(0)))
            torch._foreach_add_([layer.feedback_step for layer, _ in rest], 1)
