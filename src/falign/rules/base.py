"""The rule interface shared by every learning rule, and feedback initialisation.

A rule is a small stateless object that a converted layer (:mod:`falign.nn`) consults in its
``forward``. It decides three things: which feedback tensor the layer keeps (``feedback_weight``),
which matrix ``B`` the backward pass uses at this step, and which autograd function runs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import torch
from torch import Tensor

from falign.functional import FeedbackSource

if TYPE_CHECKING:
    from falign.nn.layers import FeedbackLayer

FEEDBACK_INITS = ("kaiming_uniform", "kaiming_normal", "xavier_uniform", "xavier_normal")


def mix_seed(*parts: int) -> int:
    """Deterministic 63-bit seed from integers (splitmix64 chained over the parts)."""
    z = 0x9E3779B97F4A7C15
    mask = (1 << 64) - 1
    for p in parts:
        z = (z + (int(p) & mask) + 0x9E3779B97F4A7C15) & mask
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
        z = z ^ (z >> 31)
    return z & ((1 << 63) - 1)


@dataclass(frozen=True)
class FeedbackInit:
    """How feedback matrices are drawn.

    ``kind``:
      - ``kaiming_uniform`` (default): ``U(-a, a)``, ``a = scale/√fan_in``, as ``nn.Linear``'s own weights;
      - ``kaiming_normal``: ``N(0, 2·scale²/fan_in)``;
      - ``xavier_uniform`` / ``xavier_normal``: Glorot, ``std = scale·√(2/(fan_in+fan_out))``.

    ``fan_in``/``fan_out`` are read off the feedback matrix as off a weight of the same shape
    (``shape[1]·receptive field`` and ``shape[0]·receptive field``).
    """

    kind: str = "kaiming_uniform"
    scale: float = 1.0

    def __post_init__(self) -> None:
        if self.kind not in FEEDBACK_INITS:
            raise ValueError(f"unknown feedback_init {self.kind!r}; choose one of {', '.join(FEEDBACK_INITS)}")
        if not (self.scale > 0 and math.isfinite(self.scale)):
            raise ValueError(f"feedback_scale must be a positive finite number, got {self.scale}")

    @property
    def uniform(self) -> bool:
        return self.kind.endswith("uniform")

    def std(self, shape: torch.Size | tuple[int, ...]) -> float:
        """Standard deviation of the entries for a matrix of this shape."""
        receptive = math.prod(shape[2:]) if len(shape) > 2 else 1
        fan_in, fan_out = shape[1] * receptive, shape[0] * receptive
        if self.kind == "kaiming_uniform":
            return self.scale / math.sqrt(fan_in) / math.sqrt(3.0)
        if self.kind == "kaiming_normal":
            return self.scale * math.sqrt(2.0 / fan_in)
        return self.scale * math.sqrt(2.0 / (fan_in + fan_out))

    def sample(self, shape, generator: torch.Generator, dtype=torch.float32) -> Tensor:
        """Draw a matrix on the CPU (so a seed gives the same values on every device)."""
        std = self.std(shape)
        out = torch.empty(shape, dtype=dtype)
        if self.uniform:
            bound = std * math.sqrt(3.0)
            return out.uniform_(-bound, bound, generator=generator)
        return out.normal_(0.0, std, generator=generator)


class FeedbackRule:
    """Base class of a learning rule. Subclasses live one per module in :mod:`falign.rules`.

    Class attributes:
        name: the registry name.
        has_feedback: whether converted layers keep a ``feedback_weight``.
        learned: whether ``feedback_weight`` is a trained ``nn.Parameter`` (Kolen–Pollack).
        sign_concordant: ``B = |feedback_weight| ⊙ sign(W)`` (the sign-symmetry family).
        per_step: the rule has work to do after every optimiser step (:meth:`after_step`), which
            :func:`falign.attach` installs as an optimiser step hook.
    """

    name: ClassVar[str] = ""
    has_feedback: ClassVar[bool] = True
    learned: ClassVar[bool] = False
    sign_concordant: ClassVar[bool] = False
    per_step: ClassVar[bool] = False
    step_work: ClassVar[str] = ""
    summary: ClassVar[str] = ""

    def feedback_shape(self, layer: FeedbackLayer) -> tuple[int, ...] | None:
        """Shape of ``feedback_weight``; ``None`` while it cannot be known yet (lazy DFA conv)."""
        return tuple(layer.weight.shape)

    def initial_feedback(self, layer: FeedbackLayer, shape: tuple[int, ...], init: FeedbackInit,
                         generator: torch.Generator) -> Tensor:
        """The initial ``feedback_weight`` tensor for ``layer`` (CPU, layer's dtype)."""
        return init.sample(shape, generator, layer.weight.dtype)

    def wrap_feedback(self, tensor: Tensor) -> Tensor:
        """Buffer (default) or ``nn.Parameter`` (learned rules) holding ``feedback_weight``."""
        return tensor

    def register_state(self, layer: FeedbackLayer) -> None:
        """Register any extra per-layer state the rule needs (buffers)."""

    def after_load(self, layer: FeedbackLayer) -> None:
        """Refresh Python-side state after ``load_state_dict``."""

    def after_step(self, layers: list[FeedbackLayer]) -> None:
        """The rule's work after each optimiser step, for every layer using this rule (``per_step`` rules;
        run by the hook of :func:`falign.attach`)."""

    def current_feedback(self, layer: FeedbackLayer) -> Tensor:
        """The ``B`` the backward pass uses at the current weights, without advancing any state."""
        return layer.feedback_weight.detach()

    def feedback(self, layer: FeedbackLayer) -> FeedbackSource:
        """What the forward pass hands to the autograd function: ``B`` itself, or a function
        ``W ↦ B`` run in the backward pass (sign rules, whose ``B`` derives from ``W``)."""
        return self.current_feedback(layer)

    def needs_signal(self, x: Tensor) -> bool:
        return torch.is_grad_enabled() and x.requires_grad

    def forward(self, layer: FeedbackLayer, x: Tensor) -> Tensor:
        """Run ``layer`` on ``x``: the feedback path when the input needs a signal, else plain."""
        if self.needs_signal(x):
            layer._feedback_used = True
            return layer.feedback_forward(x, self.feedback(layer))
        return layer.plain_forward(x)

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"
