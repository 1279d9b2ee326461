"""Probing a converted model: forward passes that measure it without training it.

Two things every measuring pass needs, in one place:

- :func:`probing` — while it is active, a converted layer's forward pass calls ``record(layer, x)`` and returns
  its result, instead of routing its input signal through the rule. :func:`falign.convert`'s probe of the first
  forward pass uses it to learn which layer produces the output and what each direct rule's ``D`` must be.
  The recurrent and attention layers ask :func:`active` to record their input projections the same way.
- :func:`measuring` — eval mode with gradients on for the pass, then every module's training flag and every
  converted layer's ``feedback_used`` put back as they were (no running statistic, dropout mask or flag of the
  training run changes).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

if TYPE_CHECKING:
    from falign.nn.layers import FeedbackLayer

Recorder = Callable[["FeedbackLayer", Tensor], Tensor]

_recorder: Recorder | None = None


def active() -> Recorder | None:
    """The recorder of the :func:`probing` block now running, or ``None`` outside one."""
    return _recorder


@contextlib.contextmanager
def probing(record: Recorder) -> Iterator[None]:
    """Within the block, every converted layer's forward pass returns ``record(layer, x)`` (nested blocks: the
    innermost recorder)."""
    global _recorder
    previous, _recorder = _recorder, record
    try:
        yield
    finally:
        _recorder = previous


@contextlib.contextmanager
def measuring(model: nn.Module) -> Iterator[None]:
    """Eval mode and gradients on for a measuring forward pass of ``model``; afterwards each module's training
    flag and each converted layer's ``feedback_used`` are as before."""
    modes = {m: m.training for m in model.modules()}
    used = {m: m.__dict__["_feedback_used"] for m in model.modules() if "_feedback_used" in m.__dict__}
    try:
        model.eval()
        with torch.enable_grad():
            yield
    finally:
        for m, mode in modes.items():
            m.training = mode
        for m, flag in used.items():
            m._feedback_used = flag
