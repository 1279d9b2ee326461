"""``brsf``: batchwise random-magnitude sign-concordant feedback (Liao, Leibo & Poggio, AAAI 2016).

``B_t = |R_t| ⊙ sign(W)`` with ``R_t`` redrawn at every training step (every backward pass that
sends a signal to the layer's input; the draw happens there, so two forward passes before one
backward pass are safe). The draw for step ``t`` is a pure function of the layer's feedback seed and ``t``,
so runs are reproducible, identical across data-parallel ranks and resume exactly. The step count is
the buffer ``feedback_step``; ``feedback_weight`` holds the magnitudes of the latest draw.

Magnitudes follow the feedback initialisation: for the uniform inits ``|R| ~ U(0, a)``; on the CPU
this is drawn at 16-bit resolution (``a·(k + ½)/2¹⁶``, k uniform) because a full-precision draw would
cost more than the step itself; for the normal inits ``|R|`` is half-normal.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from falign.rules.base import FeedbackInit, mix_seed
from falign.rules.sign import SignConcordantRule


def _fill_uniform16(out: Tensor, bound: float, generator: torch.Generator, words: Tensor) -> None:
    """Fill ``out`` (CPU, contiguous) with ``bound·(k+½)/65536``, k uniform on 0..65535.

    ``words`` is an int64 scratch tensor of ``ceil(numel/4)`` entries: 64 random bits give 4 draws.
    """
    n = out.numel()
    words.random_(-(2**63), None, generator=generator)
    out.view(-1).copy_(words.view(torch.int16)[:n])
    out.add_(32768.5).mul_(bound / 65536.0)


class BatchwiseRandomSignFeedback(SignConcordantRule):
    name = "brsf"
    summary = "batchwise random-magnitude sign-concordant feedback: B_t = |R_t|⊙sign(W) (Liao et al. 2016)"

    def initial_feedback(self, layer, shape, init, generator):
        return init.sample(shape, generator, layer.weight.dtype).abs_()

    def register_state(self, layer) -> None:
        layer.register_buffer("feedback_step", torch.zeros((), dtype=torch.int64))
        layer._feedback_step = 0

    def after_load(self, layer) -> None:
        layer._feedback_step = int(layer.feedback_step)

    def redraw(self, layer) -> None:
        """Draw the magnitudes of the next step into ``feedback_weight`` and advance the step."""
        init: FeedbackInit = layer.feedback_init
        m = layer.feedback_weight
        std = init.std(tuple(m.shape))
        generator = torch.Generator(device=m.device)
        generator.manual_seed(mix_seed(layer.feedback_seed, layer._feedback_step))
        with torch.no_grad():
            if init.uniform and m.device.type == "cpu" and m.is_contiguous():
                words = layer.scratch("words", m, ((m.numel() + 3) // 4,), torch.int64)
                _fill_uniform16(m, std * math.sqrt(3.0), generator, words)
            elif init.uniform:
                m.uniform_(0.0, std * math.sqrt(3.0), generator=generator)
            else:
                m.normal_(0.0, std, generator=generator).abs_()
        layer._feedback_step += 1
        layer.feedback_step.fill_(layer._feedback_step)

    def backward_feedback(self, layer, weight: Tensor) -> Tensor:
        self.redraw(layer)
        return super().backward_feedback(layer, weight)
