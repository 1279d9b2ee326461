"""What a learning rule is: its capabilities as class data, its options, and its one formula for ``B``.

A rule is a small object that a converted layer (:mod:`falign.nn`) *asks*; it never reaches into the
layer. The layer asks for the initial feedback tensor, for ``B`` at given weights (the same formula
serves the backward pass and the diagnostics), and, for the direct rules, for the shape of ``D`` and the
quantity the backward projects. Everything else in falign — ``convert``, the trainer, the command line,
the diagnostics, the tests — reads the class data below and never compares rule names.

Class data of every rule:

==================  =============================================================================
``name``            registry name (the public name)
``summary``         one line, with the source
``feedback``        :class:`Feedback`: how B changes (none / fixed / follows sign(W) / redrawn each
                    step / learned)
``signal``          :class:`Signal`: what a hidden layer's input receives (``g·B`` layer by layer,
                    the output error projected, or the target projected)
``law``             :class:`Law`: whether the conservation law holds exactly under this rule
``feedback_is_parameter``  the feedback is an ``nn.Parameter`` trained by the optimiser (kp, dkp)
``step_work``       what the rule does after each optimiser step (empty: nothing); run by the hook of
                    :func:`falign.attach`
``Options``         a frozen dataclass of the rule's options, validated in ``__post_init__``
==================  =============================================================================
"""

from __future__ import annotations

import dataclasses
import enum
import math
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol

import torch
from torch import Tensor

FEEDBACK_INITS = ("kaiming_uniform", "kaiming_normal", "xavier_uniform", "xavier_normal")


class FeedbackLayer(Protocol):
    """What a rule may use of the converted layer that asks it — the rule–layer contract, implemented by
    :class:`falign.nn.FeedbackLayer` (declared here so that rules never import the layers)."""

    weight: Tensor
    feedback_weight: Tensor | None
    feedback_seed: int
    feedback_init: FeedbackInit
    rule_state: dict[str, Any]
    direct_shape: tuple[int, ...] | None

    def scratch(self, key: str, like: Tensor, shape: tuple[int, ...] | None = None,
                dtype: torch.dtype | None = None) -> Tensor:
        """A reusable work tensor of the layer (not state)."""
        ...

    def register_buffer(self, name: str, tensor: Tensor | None, persistent: bool = True) -> None:
        """Register a tensor the layer's ``state_dict`` carries."""
        ...

    def mark_stepped(self) -> None:
        """Record that the rule's per-step work has run for the layer's current weights."""
        ...


class Feedback(enum.Enum):
    """How a rule's feedback matrix changes during training."""

    NONE = "none (B = W)"
    FIXED = "fixed"
    SIGN = "follows sign(W)"
    REDRAWN = "redrawn every step"
    LEARNED = "learned"


class Signal(enum.Enum):
    """What the input of a hidden layer receives in the backward pass."""

    LAYER = "g·B, layer by layer"
    OUTPUT_ERROR = "e·D, the output error projected"
    TARGET = "t·P, the target projected"


class Law(enum.Enum):
    """Whether the conservation law of Robertson & Koyejo (2024) holds exactly under gradient flow."""

    EXACT = "exact"
    LAST_HIDDEN = "exact for the last hidden layer"
    BALANCEDNESS = "backprop's balancedness (Du et al. 2018)"
    NONE = "does not hold"


@dataclass(frozen=True)
class NoOptions:
    """A rule without options."""


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
    """Base class of a learning rule (one subclass per module in :mod:`falign.rules`).

    ``rule = Rule(**options)`` validates the options into ``rule.options`` (an instance of the rule's
    ``Options`` dataclass). See the module docstring for the class data.
    """

    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    feedback: ClassVar[Feedback] = Feedback.FIXED
    signal: ClassVar[Signal] = Signal.LAYER
    law: ClassVar[Law] = Law.NONE
    feedback_is_parameter: bool = False  # class data; a rule's options may change it for its instance (kp's forms)
    step_work: str = ""
    Options: ClassVar[type] = NoOptions

    def __init__(self, **options: Any) -> None:
        known = {f.name for f in dataclasses.fields(self.Options)}
        unknown = sorted(set(options) - known)
        if unknown:
            listed = ", ".join(sorted(known)) or "none"
            raise TypeError(f"unknown option(s) {', '.join(unknown)} for rule {self.name!r} (its options: {listed})")
        for f in dataclasses.fields(self.Options):
            if f.name in options:
                _check_option_type(self.name, f, options[f.name])
        self.options = self.Options(**options)

    # -- capabilities read by the rest of falign ---------------------------------------------------------
    @property
    def has_feedback(self) -> bool:
        """Whether converted layers keep a ``feedback_weight``."""
        return self.feedback is not Feedback.NONE

    @property
    def per_step(self) -> bool:
        """Whether the rule has work to do after every optimiser step."""
        return bool(self.step_work)

    @property
    def direct(self) -> bool:
        """Whether a hidden layer's signal comes straight from the output (error or target)."""
        return self.signal is not Signal.LAYER

    @property
    def depends_on_weight(self) -> bool:
        """Whether ``B`` is a function of the current ``W`` (built in the backward from the saved ``W``)."""
        return self.feedback in (Feedback.SIGN, Feedback.REDRAWN)

    # -- the feedback matrix ---------------------------------------------------------------------------
    def feedback_shape(self, layer: FeedbackLayer) -> tuple[int, ...] | None:
        """Shape of ``feedback_weight``; ``None`` while it cannot be known yet (direct rules before the
        first forward pass)."""
        return tuple(layer.weight.shape)

    def initial_feedback(self, layer: FeedbackLayer, shape: tuple[int, ...], init: FeedbackInit,
                         generator: torch.Generator) -> Tensor:
        """The initial ``feedback_weight`` tensor for ``layer`` (CPU)."""
        return init.sample(shape, generator, layer.weight.dtype)

    def matrix(self, layer: FeedbackLayer, weight: Tensor, out: Tensor | None = None) -> Tensor:
        """``B`` (or ``D``) at the weights ``weight``: the one formula used by the backward pass and by the
        diagnostics. ``out`` is a scratch tensor the result may be written into. Default: the stored
        ``feedback_weight`` itself."""
        assert layer.feedback_weight is not None, f"{self.name} keeps no feedback matrix"
        return layer.feedback_weight

    # -- per-layer state -------------------------------------------------------------------------------
    def register_state(self, layer: FeedbackLayer) -> None:
        """Register the rule's own per-layer buffers (saved in ``state_dict``)."""

    def after_load(self, layer: FeedbackLayer) -> None:
        """Refresh Python-side state after ``load_state_dict``."""

    @property
    def state_id(self) -> str:
        """What a layer's state records as its rule (:data:`RULE_KEY`): the name, and the form where a rule's
        options change what its state means (kp's offset form keeps ``D_0``, not ``B``)."""
        return self.name

    def supports_optimizer(self, name: str) -> bool:
        """Whether the rule trains correctly under the optimiser ``name`` (``"sgd"``, ``"adam"``; default: any)."""
        return True

    def before_step(self, layers: list[FeedbackLayer], optimizer: torch.optim.Optimizer | None = None) -> None:
        """What the rule must see of the optimiser before its step (kp's offset form; default: nothing)."""

    def after_step(self, layers: list[FeedbackLayer], optimizer: torch.optim.Optimizer | None = None) -> None:
        """The rule's work after each optimiser step (rules with ``step_work``), for its layers."""

    def __repr__(self) -> str:
        fields = dataclasses.fields(self.Options)
        args = ", ".join(f"{f.name}={getattr(self.options, f.name)!r}" for f in fields)
        return f"{type(self).__name__}({args})"


def _check_option_type(rule: str, f: dataclasses.Field, value: Any) -> None:
    """Refuse an option value of the wrong type: a bool is not a number (``steps=true`` is not 1), a
    fractional number is not an integer, a number is finite."""
    kind = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", "")
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind == "int":
        ok, want = number and isinstance(value, int), "an integer"
    elif kind == "float":
        ok, want = number and math.isfinite(value), "a finite number"
    elif kind == "bool":
        ok, want = isinstance(value, bool), "true or false"
    else:
        return
    if not ok:
        raise TypeError(f"option {f.name} of rule {rule!r} must be {want}, got {value!r}")


def option_help(rule: type[FeedbackRule]) -> list[tuple[str, Any, str]]:
    """``(name, default, help)`` of each option of a rule class (``falign rules`` prints them)."""
    return [(f.name, f.default, f.metadata.get("help", "")) for f in dataclasses.fields(rule.Options)]


RULE_KEY = "feedback_rule"
"""The buffer that names a layer's rule in its ``state_dict`` (:attr:`FeedbackRule.state_id`'s UTF-8 bytes,
``uint8``), on every layer with feedback: a state saved under one rule (or form) and loaded into a model converted
with another is refused (:class:`falign.LoadedStateMismatch`, also under ``strict=False``; the message says how to
load the weights alone) instead of silently giving one rule's feedback to another."""


def rule_name_tensor(name: str) -> torch.Tensor:
    """:data:`RULE_KEY`'s value for the rule ``name``."""
    return torch.tensor(list(name.encode()), dtype=torch.uint8)


def rule_name_of(value: torch.Tensor) -> str:
    """The rule name a :data:`RULE_KEY` tensor holds."""
    return bytes(value.tolist()).decode(errors="replace")


SEED_KEY = "feedback_rng_seed"
"""The buffer that carries a layer's feedback seed in its ``state_dict``, for the rules whose per-step draws depend
on it (brsf's redraws, wm's mirror noise): a model loaded from a saved state continues with the saved run's
draws, not with those of the seed it was converted with."""


def register_seed_state(layer: FeedbackLayer) -> None:
    """Register :data:`SEED_KEY` (the layer's feedback seed, as a 63-bit integer) on ``layer``."""
    layer.register_buffer(SEED_KEY, torch.tensor(int(layer.feedback_seed) % 2**63, dtype=torch.int64))


def load_seed_state(layer: FeedbackLayer) -> None:
    """After ``load_state_dict``: the layer draws with the loaded seed from now on."""
    saved = getattr(layer, SEED_KEY, None)
    if saved is not None and int(saved) != int(layer.feedback_seed) % 2**63:
        layer.feedback_seed = int(saved)
