"""``brsf``: batchwise random-magnitude sign-concordant feedback (Liao, Leibo & Poggio, AAAI 2016).

``B_t = |R_t| ⊙ sign(W)`` with ``R_t`` redrawn after every optimiser step (by the step hook that
:func:`falign.attach` installs), so every update uses a fresh draw. Draw ``t`` is a pure function of
the layer's feedback seed and ``t`` (the number of optimiser steps taken), whatever the tensor's memory
layout, so runs are reproducible, identical across data-parallel ranks and resume exactly. Forward and
backward passes never draw: evaluating a model, or computing input gradients of it, changes nothing.
``feedback_step`` (a buffer) is ``t``; ``feedback_weight`` holds ``|R_t|``.

Magnitudes follow the feedback initialisation: for the uniform inits ``|R| ~ U(0, a)``; on the CPU
this is drawn at 8-bit resolution — ``a·(k + ½)/256`` with ``k`` uniform on 0…255, mean ``a/2`` and
variance ``a²/12·(1 − 1/256²)`` — because the redraw is the rule's whole extra cost: one random bit per
bit of the result, eight draws from each 64-bit word, then one byte-to-float pass (a float32 uniform draw
costs several times more, and the 16-bit draw of earlier versions twice as many random words). The CPU's
words come from numpy's SFC64 generator seeded (through numpy's ``SeedSequence``) with the layer's seed mixed
with ``t``: less time than torch's CPU generator (Mersenne Twister) for the same words (0.72 against 1.17 ms for
1.86 M bytes, ``benchmarks/elementwise_costs.py``), and a stream numpy
keeps stable across its versions (earlier falign versions drew them with torch's generator: other draws, the same
distribution). For the normal inits ``|R|`` is half-normal (torch's generator).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

from falign.rules.base import Feedback, FeedbackInit, load_seed_state, register_seed_state
from falign.rules.sign import SignConcordantRule
from falign.seeding import mix_seed


def _fill_uniform8(out: Tensor, bound: float, seed: int) -> None:
    """Fill ``out`` (CPU, contiguous) with ``bound·(k+½)/256``, k uniform on 0..255: ``ceil(numel/8)`` 64-bit
    words of numpy's SFC64 seeded with ``seed``, each giving 8 draws (its bytes in memory order)."""
    n = out.numel()
    words = np.random.SFC64(seed).random_raw(_words(n))
    out.view(-1).copy_(torch.from_numpy(words.view(np.uint8)[:n]))
    out.add_(0.5).mul_(bound / 256.0)


def _words(n: int) -> int:
    """Random 64-bit words for ``n`` 8-bit draws."""
    return (n + 7) // 8


def draw_magnitudes(out: Tensor, init: FeedbackInit, seed: int, step: int) -> Tensor:
    """Fill ``out`` with ``|R_step|`` for a layer with feedback seed ``seed``.

    The values depend only on (shape, init, seed, step, device type): a non-contiguous ``out`` (e.g.
    ``channels_last``) receives the same values, in logical order, as a contiguous one.
    """
    std = init.std(tuple(out.shape))
    target = out if out.is_contiguous() else torch.empty(out.shape, dtype=out.dtype, device=out.device)
    with torch.no_grad():
        if init.uniform and out.device.type == "cpu":
            _fill_uniform8(target, std * math.sqrt(3.0), mix_seed(seed, step))
            if target is not out:
                out.copy_(target)
            return out
        generator = torch.Generator(device=out.device)
        generator.manual_seed(mix_seed(seed, step))
        if init.uniform:
            target.uniform_(0.0, std * math.sqrt(3.0), generator=generator)
        else:
            target.normal_(0.0, std, generator=generator).abs_()
        if target is not out:
            out.copy_(target)
    return out


class BatchwiseRandomSignFeedback(SignConcordantRule):
    name = "brsf"
    summary = "batchwise random-magnitude sign-concordant feedback: B_t = |R_t|⊙sign(W) (Liao et al. 2016)"
    feedback = Feedback.REDRAWN
    step_work = "redraw |R_t|"

    def initial_feedback(self, layer, shape, init, generator):
        if "step" in layer.rule_state:  # redrawn from scratch (reset_parameters): back to step 0
            self._set_step(layer, 0)
        return draw_magnitudes(torch.empty(shape, dtype=layer.weight.dtype), init, layer.feedback_seed, 0)

    def register_state(self, layer) -> None:
        layer.register_buffer("feedback_step", torch.zeros((), dtype=torch.int64))
        layer.rule_state["step"] = 0
        register_seed_state(layer)  # the draws are named by (seed, step): both travel in the state_dict

    def after_load(self, layer) -> None:
        layer.rule_state["step"] = int(layer.feedback_step)
        load_seed_state(layer)

    @staticmethod
    def _set_step(layer, step: int) -> None:
        layer.rule_state["step"] = step
        layer.feedback_step.fill_(step)

    def redraw(self, layer) -> None:
        """Advance to the next step's magnitudes ``|R_{t+1}|`` in ``feedback_weight``."""
        step = layer.rule_state["step"] + 1
        draw_magnitudes(layer.feedback_weight, layer.feedback_init, layer.feedback_seed, step)
        self._set_step(layer, step)

    def after_step(self, layers, optimizer=None) -> None:
        for layer in layers:
            self.redraw(layer)
