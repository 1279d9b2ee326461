"""Per-step work of the rules (``brsf``'s redraw, ``wm``'s mirror steps) in any training loop.

:func:`attach` registers one optimiser step hook (``optimizer.register_step_post_hook``), so every
``optimizer.step()`` — in falign's trainer, in a plain loop, in PyTorch Lightning — runs the work of every
converted layer whose rule has some. :func:`step_rules` runs it by hand (a loop without a
``torch.optim`` optimiser). A layer of such a rule whose weights change while neither has run raises
at its next forward pass instead of silently training under another rule.

Example::

    model = falign.convert(net, "wm")
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    falign.attach(model, opt)
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from falign.convert import set_target, uses_target
from falign.errors import FalignError
from falign.functional import backprop_mode
from falign.nn.layers import FeedbackLayer
from falign.rules.base import FeedbackRule


class AttachError(FalignError, TypeError):
    """:func:`attach` was given something that runs no optimiser step hooks."""


# Modules registered anywhere in the process (``Module.__setattr__``, ``add_module``, ``Sequential.append``, ...): a
# step hook walks its model again only when this moved, not at every step (a walk of a LeNet costs ~70 µs). A layer
# put in place without registration (``ModuleList.insert``, edits of ``_modules``) is not seen: its per-step rule
# then fails loudly at its first forward pass after an unstepped change, as any layer without a hook does.
_registrations = 0


def _count_registration(module: nn.Module, name: str, submodule: nn.Module | None) -> None:
    global _registrations
    _registrations += 1


torch.nn.modules.module.register_module_module_registration_hook(_count_registration)


def _groups(model: nn.Module) -> list[tuple[Any, list[FeedbackLayer]]]:
    groups: dict[int, tuple[Any, list[FeedbackLayer]]] = {}
    for layer in model.modules():
        if isinstance(layer, FeedbackLayer) and layer.rule.per_step:
            groups.setdefault(id(layer.rule), (layer.rule, []))[1].append(layer)
    return list(groups.values())


def step_rules(model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> int:
    """Run every converted layer's per-step work once (what the hook of :func:`attach` does after each
    optimiser step); returns the number of layers that had some. ``optimizer``: the one that just stepped (kp's
    offset form reads its step; the other rules need none)."""
    return _run(_groups(model), optimizer)


def _run(groups: list[tuple[Any, list[FeedbackLayer]]], optimizer: torch.optim.Optimizer | None) -> int:
    count = 0
    with torch.no_grad():
        for rule, layers in groups:
            rule.after_step(layers, optimizer)
            for layer in layers:
                layer.mark_stepped()
            count += len(layers)
    return count


class StepHook:
    """Handle of :func:`attach`: ``remove()`` detaches the hook."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        self.model = model
        self._walked = (_registrations, _groups(model))
        self.layers = [layer for _, group in self._walked[1] for layer in group]
        # no layer with per-step work (fa, dfa, ...): no hook, nothing to run after each step (a layer given such
        # a rule later, by converting again, has no hook counted, so its first unstepped change fails loudly)
        self._handle: RemovableHandle | None = (optimizer.register_step_post_hook(self._after_step) if self.layers
                                                else None)
        # a pre-step hook only where a rule looks at the optimiser before its step (kp's offset form): brsf and wm
        # do not walk the model twice per step
        looks = any(type(rule).before_step is not FeedbackRule.before_step for rule, _ in self._walked[1])
        self._pre: RemovableHandle | None = (optimizer.register_step_pre_hook(self._before_step) if looks else None)
        for layer in self.layers:
            layer._step_hooks += 1

    def _groups(self) -> list[tuple[Any, list[FeedbackLayer]]]:
        """The model's per-step layers by rule, walked again only after a module registration."""
        if self._walked[0] != _registrations:
            self._walked = (_registrations, _groups(self.model))
        return self._walked[1]

    def _before_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        for rule, layers in self._groups():
            rule.before_step(layers, optimizer)

    def _after_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        _run(self._groups(), optimizer)

    def remove(self) -> None:
        if self._pre is not None:
            self._pre.remove()
            self._pre = None
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
            for layer in self.layers:
                layer._step_hooks -= 1


def attach(model: nn.Module, optimizer: torch.optim.Optimizer) -> StepHook:
    """Run the rules' per-step work after every ``optimizer.step()``; returns a handle with ``remove()``.

    Call it once, after building the optimiser over the converted model (for any rule: it does nothing
    for rules without per-step work). ``brsf`` redraws ``|R_t|``; ``wm`` takes its mirror steps. A wrapper
    that subclasses ``torch.optim.Optimizer`` without its step hooks and keeps the wrapped optimiser as
    ``.optimizer`` (HF accelerate's ``AcceleratedOptimizer``, from ``accelerator.prepare``) is attached
    through the optimiser it wraps, whose ``step()`` it calls.
    """
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise AttachError(f"attach needs a torch.optim.Optimizer, got {type(optimizer).__name__}; without one, "
                          f"call falign.step_rules(model) after each update")
    if not hasattr(optimizer, "_optimizer_step_post_hooks"):
        # a wrapper that never ran Optimizer.__init__ (accelerate's AcceleratedOptimizer): its step() runs no
        # hooks, the torch optimiser it wraps does
        inner = getattr(optimizer, "optimizer", None)
        if not isinstance(inner, torch.optim.Optimizer) or not hasattr(inner, "_optimizer_step_post_hooks"):
            raise AttachError(f"{type(optimizer).__name__} wraps an optimiser but runs no step hooks; pass the "
                              f"torch.optim.Optimizer it wraps to falign.attach, or call falign.step_rules(model) "
                              f"after each step")
        optimizer = inner
    return StepHook(model, optimizer)


class TrainStep:
    """One optimiser step of a converted model that cannot forget what the rules need: :func:`attach` once (the
    rules' per-step work after every step), the target given before every forward pass where a rule projects it
    (:func:`falign.set_target`), gradients zeroed, the loss's backward (in backprop mode when ``backprop``), then
    the update. The loops of falign's experiments and benchmarks are written with it.

    Args:
        model: a model returned by :func:`falign.convert`.
        optimizer: a ``torch.optim.Optimizer`` over its parameters.
        loss_fn: ``loss_fn(model(x), y)`` is the loss (default: cross-entropy).
        backprop: run every backward in backprop mode (``B = W``: the reference an experiment compares with).

    Calling it with ``(x, y)`` takes the step and returns the loss (detached). ``loss=`` gives the loss another
    way (a closure called after the target is set, e.g. a full-batch loss); ``measure=`` is called with the loss
    after the backward and before the update (the graph is kept for it: e.g. a second, backprop backward).

    Example::

        step = falign.TrainStep(model, torch.optim.SGD(model.parameters(), lr=0.01))
        for x, y in loader:
            loss = step(x, y)
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer,
                 loss_fn: Callable[[Tensor, Tensor], Tensor] | None = None, *, backprop: bool = False) -> None:
        self.model, self.optimizer = model, optimizer
        self.loss_fn = loss_fn if loss_fn is not None else nn.functional.cross_entropy
        self.backprop = backprop
        self.uses_target = uses_target(model)
        self.hook = attach(model, optimizer)

    def __call__(self, x: Tensor | None, y: Tensor, *, loss: Callable[[], Tensor] | None = None,
                 measure: Callable[[Tensor], None] | None = None) -> Tensor:
        self.optimizer.zero_grad(set_to_none=True)
        if self.uses_target:
            set_target(self.model, y)
        value = loss() if loss is not None else self.loss_fn(self.model(x), y)
        with backprop_mode() if self.backprop else contextlib.nullcontext():
            value.backward(retain_graph=measure is not None)
        if measure is not None:
            measure(value)
        self.optimizer.step()
        return value.detach()

    def remove(self) -> None:
        """Detach the rules' per-step work from the optimiser (:meth:`StepHook.remove`)."""
        self.hook.remove()
