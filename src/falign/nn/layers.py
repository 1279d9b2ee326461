"""Converted layers: ``nn.Linear`` / ``nn.Conv{1,2,3}d`` whose backward follows a learning rule.

Each layer is a subclass of the PyTorch layer it replaces, so weights, ``state_dict`` keys and
``isinstance`` checks are unchanged. The layer asks its rule (a small object from :mod:`falign.rules`)
what to do; the rule answers from its class data and its one formula for ``B``. The layer keeps the
rule's feedback matrix in ``feedback_weight``:

- rules with fixed, sign-following or mirrored feedback: a buffer of W's shape (``B``, or the magnitudes
  ``M`` of ``B = M ⊙ sign(W)``); rules whose feedback is trained by the optimiser: an ``nn.Parameter``;
- the direct rules: ``D`` of shape ``(n_out, in)`` or ``(E, C·H·W)``, created at the first forward pass;
- ``bp``: ``None``.

A buffer is saved in ``state_dict``, follows ``.to()`` and is not in ``parameters()``. Assign a new
tensor of the same shape, or write into it in place, to set the feedback by hand.
"""

from __future__ import annotations

import contextlib
import copy
import math
import warnings
from typing import Any, ClassVar, cast

import numpy as np
import torch
from torch import Tensor, nn

from falign import functional as FF
from falign.errors import FalignError, LoadedStateMismatch, StepWorkSkipped
from falign.nn import probe as _probe
from falign.rules import FeedbackInit, FeedbackRule, get_rule
from falign.rules.base import RULE_KEY, SEED_KEY, rule_name_of, rule_name_tensor
from falign.rules.direct import DirectRule

__all__ = ["FAConv1d", "FAConv2d", "FAConv3d", "FALinear", "FeedbackLayer", "TracedBackpropWarning"]

PLAIN, MATRIX, DIRECT = "plain", "matrix", "direct"  # the routes of FeedbackLayer.route


class LateFeedbackError(FalignError, RuntimeError):
    """A direct rule's learned feedback would be made after a wrapper (DDP) has fixed the model's parameters."""


def _inside_ddp() -> bool:
    """Whether a ``DistributedDataParallel`` forward pass is running (it sets this class attribute)."""
    return getattr(nn.parallel.DistributedDataParallel, "_active_ddp_module", None) is not None


class TracedBackpropWarning(UserWarning):
    """A converted model was traced with ``torch.jit.trace``: the trace's backward is backprop."""


def _warn_traced() -> None:
    warnings.warn(
        "torch.jit.trace of a falign model records the plain forward pass: the traced module computes the same "
        "outputs, but its backward is backprop, not the rule. Trace for inference or export; train the eager "
        "model.", TracedBackpropWarning, stacklevel=3)


class FeedbackLayer(nn.Module):
    """Base class of the converted layers: the rule, its feedback options and ``feedback_weight``. A
    concrete layer also derives from the PyTorch layer it stands for (``torch_base``).

    Attributes:
        rule: the :class:`~falign.rules.FeedbackRule` instance.
        feedback_init: :class:`~falign.rules.FeedbackInit` (distribution and scale).
        feedback_seed: seed from which ``feedback_weight`` (and brsf's draws) are reproducible.
        error_tap: the model's :class:`~falign.functional.ErrorTap` (direct rules only).
        direct_mode, direct_shape: how a direct rule's ``D`` is applied and its shape (once known).
        rule_state: a dictionary that belongs to the rule (per-layer values it keeps between calls).
    """

    torch_base: ClassVar[type[nn.Module]]
    rule: FeedbackRule
    feedback_init: FeedbackInit
    feedback_seed: int
    feedback_weight: Tensor | None
    weight: Tensor
    bias: Tensor | None

    def setup_feedback(self, rule: str | FeedbackRule = "fa", init: FeedbackInit | None = None, seed: int = 0,
                       error_tap: FF.ErrorTap | None = None, output_features: int | None = None) -> None:
        """Attach ``rule`` to this layer and draw its feedback (a layer converted again starts afresh).

        ``output_features``: for a direct rule on a Linear layer built by hand, ``n_out`` of a per-position
        ``D`` (made at once instead of at the first forward pass).
        """
        self.rule = get_rule(rule)
        r = self.rule  # what the forward pass asks on every call, read once from the rule's class data
        self._capabilities = (r.direct, r.per_step, r.has_feedback, r.depends_on_weight, r.feedback_is_parameter)
        self.feedback_init = init or FeedbackInit()
        self.feedback_seed = int(seed)
        self.error_tap = error_tap
        self.rule_state: dict[str, Any] = {}
        self.direct_mode = FF.PER_POSITION
        self.direct_shape: tuple[int, ...] | None = None
        self._output_features: int | None = None
        if self.rule.direct and output_features is not None and self.weight.dim() == 2:
            self.direct_shape = (int(output_features), self.weight.shape[1])
        self._direct_planned = not self.rule.direct or self.direct_shape is not None
        self._feedback_used = False
        self._step_key: tuple[int, ...] | None = None
        self._step_values: list[Tensor] | None = None
        self._step_hooks = 0
        for name in _STATE_NAMES:
            self._parameters.pop(name, None)
            self._buffers.pop(name, None)
        if not self.rule.has_feedback:
            self.register_buffer("feedback_weight", None)
        else:
            self._assign_feedback(self.weight.new_empty(0))
            self.register_buffer(RULE_KEY, rule_name_tensor(self.rule.state_id).to(self.weight.device))
            self.reset_feedback()
        self.rule.register_state(self)

    def reset_parameters(self) -> None:
        """Re-initialise the weights as the PyTorch layer does, and redraw the feedback."""
        super().reset_parameters()  # type: ignore[misc]
        if hasattr(self, "rule"):
            self.reset_feedback()

    def _assign_feedback(self, tensor: Tensor) -> None:
        if self.rule.feedback_is_parameter:
            self._buffers.pop("feedback_weight", None)
            self.register_parameter("feedback_weight", nn.Parameter(tensor))
        else:
            self.register_buffer("feedback_weight", tensor)

    @torch.no_grad()
    def reset_feedback(self) -> None:
        """(Re)draw ``feedback_weight`` from ``feedback_init`` and ``feedback_seed``.

        Leaves it empty while its shape is unknown (a direct rule before the first forward pass).
        """
        if not self.rule.has_feedback:
            return
        shape = self.rule.feedback_shape(self)
        if shape is None:
            return
        generator = torch.Generator().manual_seed(self.feedback_seed)
        value = self.rule.initial_feedback(self, shape, self.feedback_init, generator)
        value = value.to(device=self.weight.device, dtype=self.weight.dtype)
        current = self.feedback_weight
        if current is not None and current.shape == value.shape and current.device == value.device:
            current.copy_(value)
        elif isinstance(current, nn.Parameter):
            current.data = value  # the same Parameter object: an optimiser built before this still holds it
        else:
            self._assign_feedback(value)

    def current_feedback(self) -> Tensor | None:
        """The ``B`` (or ``D``) the backward uses at the current weights; ``None`` for ``bp``."""
        if not self.rule.has_feedback:
            return None
        return self.rule.matrix(self, self.weight.detach()).detach()

    def scratch(self, key: str, like: Tensor, shape: tuple[int, ...] | None = None,
                dtype: torch.dtype | None = None) -> Tensor:
        """A reusable work tensor (not state: not saved, rebuilt after a device or dtype change)."""
        shape = tuple(like.shape) if shape is None else shape
        dtype = like.dtype if dtype is None else dtype
        store = self.__dict__.setdefault("_scratch", {})
        buf = store.get(key)
        if buf is None or tuple(buf.shape) != shape or buf.dtype != dtype or buf.device != like.device:
            buf = store[key] = torch.empty(shape, dtype=dtype, device=like.device)
        return buf

    @property
    def feedback_used(self) -> bool:
        """Whether a forward pass of this layer has routed its input signal through the feedback."""
        return self._feedback_used

    # -- the forward pass: the layer asks, the rule answers --------------------------------------------
    def forward(self, x: Tensor) -> Tensor:
        record = _probe.active()
        if record is not None:  # a measuring pass (falign.nn.probe.probing)
            return record(self, x)
        if torch.jit.is_tracing():
            _warn_traced()
            return self.plain_forward(x)
        kind, source = self.route(x)
        if kind is PLAIN:
            return self.plain_forward(x)
        if kind is MATRIX:
            return self.feedback_forward(x, source)
        return self.direct_forward(x, *source)

    def route(self, x: Tensor, signal: bool | None = None) -> tuple[str, Any]:
        """How the input signal of this call is made: ``(PLAIN, None)`` (no signal needed, or ``bp``),
        ``(MATRIX, B or W ↦ B)``, or ``(DIRECT, (D, session, mode, projector))``. Runs the checks of a call
        (per-step work done, a direct rule's ``D`` planned) and marks the feedback as used. Layers that
        compute their own backward (the recurrent layers' ``W_hh``) ask this too, with ``x`` a tensor of the
        input's shape and ``signal`` whether the input needs a gradient (default ``x.requires_grad``)."""
        direct, per_step, has_feedback, from_weight, parameter = self._capabilities
        if per_step and not self._step_hooks and torch.is_grad_enabled() and not torch.compiler.is_compiling():
            self._check_stepped()
        if direct and not self._direct_planned:
            self._plan_direct(x)
        if not has_feedback or not torch.is_grad_enabled():
            return PLAIN, None
        signal = x.requires_grad if signal is None else signal
        # feedback trained by the optimiser gets its gradient whenever its weight is trained (also where the
        # input needs no signal, as W's own gradient is computed there too)
        learns = parameter and self.weight.requires_grad
        if not signal and not learns:
            return PLAIN, None
        if signal and not self._feedback_used:  # nn.Module.__setattr__ costs ~1 µs: only on the change
            self._feedback_used = True
        if from_weight:
            if torch.compiler.is_compiling():  # B from the forward's W, inside the graph: no graph break
                return MATRIX, self.rule.matrix(self, self.weight.detach())
            return MATRIX, self._matrix_in_backward
        feedback = self.rule.matrix(self, self.weight)
        if parameter and not learns:
            feedback = feedback.detach()
        if direct:
            session = None if self.error_tap is None else self.error_tap.current
            return DIRECT, (feedback, session, self.direct_mode, self._projected)
        return MATRIX, feedback

    def _matrix_in_backward(self, weight: Tensor) -> Tensor:
        """``B`` from the ``W`` saved by the forward pass: into a scratch buffer, or out of place under
        ``create_graph`` (a double backward), so ``g·B`` stays differentiable."""
        if torch.is_grad_enabled():
            return self.rule.matrix(self, weight)
        return self.rule.matrix(self, weight, out=self.scratch("feedback", weight))

    def _plan_direct(self, x: Tensor) -> None:
        if self.rule.feedback_is_parameter and _inside_ddp() and self._feedback().numel() == 0:
            raise LateFeedbackError(
                f"{self.rule.name}: the model was wrapped in DistributedDataParallel before its first forward pass, "
                f"where {self.rule.name} makes the feedback matrices D it trains, so DDP cannot synchronise them; "
                f"run one forward pass of the converted model (or convert with example_input=) before building "
                f"the optimiser and the DistributedDataParallel wrapper")
        sizes = None if self.error_tap is None else self.error_tap.output_sizes
        if sizes is None and self.direct_shape is None:
            raise RuntimeError(
                f"{self.rule.name}: this layer does not know the model's output size yet. Convert the whole model "
                f"with falign.convert(model, {self.rule.name!r}) and call the model (not the layer on its own), or "
                f"build the layer with output_features= and call falign.install_error_tap(model)")
        rule, current = self._direct_rule(), self._feedback()
        loaded = current.numel() > 0  # D came with a loaded state: check it, keep it
        if sizes is not None:
            mode, shape = rule.plan(self, x, sizes)
            if loaded and tuple(current.shape) != tuple(shape):
                raise LoadedStateMismatch(
                    f"{self.rule.name}: the loaded feedback_weight (D) of this layer has shape "
                    f"{tuple(current.shape)}, but on this input (shape {tuple(x.shape)}) and this "
                    f"model's output the layer needs D of shape {tuple(shape)} ({mode}): the state was saved from "
                    f"another model, another output size or another rule")
            self.direct_mode, self.direct_shape = mode, shape
            self._output_features = sizes[0] // max(1, math.prod(sizes[1]))
        self._direct_planned = True
        if not loaded:
            self.reset_feedback()

    def direct_input_signal(self, session: FF.ErrorSession | None, x_shape: torch.Size | tuple[int, ...]) -> Tensor:
        """Under a direct rule, the signal this layer's backward sends its input ``x`` (of shape ``x_shape``):
        ``q D`` with ``q`` the output error of ``session`` (or its target), exactly as the backward computes
        it. A pipeline stage computes its output's signal with the next stage's first layer
        (:mod:`falign.app.pipeline`), so no backward message travels between stages."""
        feedback = self._feedback()
        return FF._project(self._projected(session, feedback.shape[0]), feedback, torch.Size(x_shape),
                           self.direct_mode)

    def _projected(self, session: FF.ErrorSession | None, n_out: int) -> Tensor:
        """The rule's projected quantity for the model's output features (``D`` of a per-sample layer has
        more rows: every output position's features)."""
        if self._output_features is None and self.error_tap is not None and self.error_tap.output_sizes:
            per_sample, positions = self.error_tap.output_sizes
            self._output_features = per_sample // max(1, math.prod(positions))
        return self._direct_rule().projected(session, self._output_features or n_out)

    def _direct_rule(self) -> DirectRule:
        assert isinstance(self.rule, DirectRule), f"{self.rule.name} is not a direct rule"
        return self.rule

    def _feedback(self) -> Tensor:
        """``feedback_weight``, for the code paths of rules that have one."""
        assert self.feedback_weight is not None, f"{self.rule.name} keeps no feedback matrix"
        return self.feedback_weight

    # -- per-step work (falign.attach) -----------------------------------------------------------------
    def _params_key(self) -> tuple[int, ...]:
        if not self._modules:  # a layer without submodules (no parametrization): its own parameters, no walk
            return tuple(p._version for name, p in self._parameters.items()
                         if p is not None and name != "feedback_weight")
        return tuple(p._version for name, p in self.named_parameters() if not name.endswith("feedback_weight"))

    def _weights(self) -> list[Tensor]:
        """The layer's own parameters as they are now (a ``torch.func`` transform's wrappers taken off)."""
        return [_unwrapped(p) for name, p in self.named_parameters() if not name.endswith("feedback_weight")]

    def mark_stepped(self) -> None:
        """Record that the rule's per-step work has run for the current weights (called by the step hook
        of :func:`falign.attach` and by hand-run per-step functions such as ``wm``'s ``mirror_step``).
        Without the hook, the weights' values are kept too: the check of the next forward pass compares them,
        since writes through ``.data`` and ``torch.func.functional_call`` leave the version counters alone."""
        state = self.__dict__  # plain attributes: nn.Module.__setattr__'s checks cost ~3 µs a write, per layer and step
        state["_step_key"] = self._params_key()
        if self._step_hooks:
            state["_step_values"] = None
            return
        with _outside_transforms():
            state["_step_values"] = _snapshot(self._weights(), self._step_values)

    def _check_stepped(self) -> None:
        """A per-step rule whose weights changed without its per-step work having run fails loudly."""
        key = self._params_key()
        if self._step_key is None:
            self._step_key = key
        with _outside_transforms():
            moved = self._step_values is not None and any(
                a.dtype != b.dtype or a.device != b.device for a, b in zip(self._weights(), self._step_values))
            if self._step_values is None or moved:  # first check, or cast / moved (.double(), .to()): new copy
                self._step_values = _snapshot(self._weights(), None)
                if key == self._step_key or moved:
                    self._step_key = key
                    return
            changed = key != self._step_key or _changed(self._weights(), self._step_values)
        if changed:
            raise StepWorkSkipped(
                f"{self.rule.name}: the weights of this layer changed (an optimiser step, a write through .data, "
                f"new weights given to torch.func.functional_call) but the rule's per-step work "
                f"({self.rule.step_work}) did not run. Call falign.attach(model, optimizer) once after building "
                f"the optimizer, so every optimizer.step() runs it, or run falign.step_rules(model) yourself after "
                f"each update of the model's own parameters (a loop that passes other weights to "
                f"torch.func.functional_call at every call cannot run this rule's per-step work: use a rule "
                f"without it, or keep the weights in the model)")

    # -- implemented by the concrete layers ------------------------------------------------------------
    def plain_forward(self, x: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def feedback_forward(self, x: Tensor, feedback: FF.FeedbackSource) -> Tensor:  # pragma: no cover
        raise NotImplementedError

    def direct_forward(self, x: Tensor, feedback: Tensor, session: FF.ErrorSession | None, mode: str,
                       projector: FF.Projector) -> Tensor:  # pragma: no cover
        raise NotImplementedError

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        missing = args[2] if len(args) > 2 else kwargs.get("missing_keys")  # PyTorch's order: metadata, strict, missing
        saved_rule = state_dict.get(prefix + RULE_KEY)
        if self.rule.has_feedback and saved_rule is not None and rule_name_of(saved_rule) != self.rule.state_id:
            saved = rule_name_of(saved_rule)
            raise LoadedStateMismatch(
                f"{prefix.rstrip('.') or 'the layer'}: the state was saved with rule {saved!r}, and this layer uses "
                f"{self.rule.state_id!r}. Convert the model with that rule (and form) to continue that run; to start "
                f"{self.rule.name} from its weights instead, load the state without its feedback entries: "
                f"model.load_state_dict({{k: v for k, v in state.items() if 'feedback' not in k}}, strict=False)")
        key = prefix + "feedback_weight"
        current = self.feedback_weight
        incoming = state_dict.get(key)
        if current is not None and current.numel() == 0 and incoming is not None and incoming.numel() > 0:
            self._assign_feedback(current.new_empty(incoming.shape))
            if self.rule.direct and self.direct_shape is None:
                self.direct_shape = tuple(incoming.shape)
        elif self.rule.direct and current is not None and current.numel() > 0 and incoming is not None \
                and incoming.numel() == 0:  # saved before D was made (right after convert): made again from the seed
            if isinstance(current, nn.Parameter):
                current.data = current.new_empty(0)  # the same Parameter object: an optimiser holds it
            else:
                self._assign_feedback(current.new_empty(0))
        if self.rule.direct and incoming is not None:
            # how D is applied (per position or per sample) follows from the input and the model's output, not
            # from D's shape: it is planned again at the next forward pass, which checks the loaded D against it
            self._direct_planned = False
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        if isinstance(missing, list) and prefix + RULE_KEY in missing:  # saved before the rule was in it: unchecked
            missing.remove(prefix + RULE_KEY)
        if isinstance(missing, list) and prefix + SEED_KEY in missing:  # a state saved before the seed was in it
            missing.remove(prefix + SEED_KEY)
            warnings.warn(f"{prefix}{SEED_KEY} is not in the loaded state (saved by an earlier falign): this "
                          f"{self.rule.name} layer's later draws use the seed it was converted with "
                          f"({self.feedback_seed}), which may not be the saved run's", stacklevel=2)
        self.rule.after_load(self)

    def __getstate__(self) -> dict[str, Any]:
        """A copy (``copy.deepcopy``, pickling) has no optimiser hook of :func:`falign.attach` (the hook holds the
        original's layers), so its check that per-step work ran is on, as in a freshly converted layer."""
        state = dict(super().__getstate__())
        state.update(_step_hooks=0, _step_key=None, _step_values=None)
        state.pop("_scratch", None)
        return state

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, rule={self.rule.name}"

    # -- conversion ------------------------------------------------------------------------------------
    @classmethod
    def converted_class(cls, base: type[nn.Module]) -> type[FeedbackLayer]:
        """The converted class for a module of type ``base``: ``cls`` itself for the exact PyTorch layer,
        else a subclass of both (a parametrized layer, a user subclass without its own ``forward``)."""
        if issubclass(base, cls):
            return base
        if base is cls.torch_base:
            return cls
        key = (cls, base)
        if key not in _CONVERTED_CLASSES:
            _CONVERTED_CLASSES[key] = type(f"{cls.__name__[:2]}{base.__name__}", (cls, base),
                                           {"__module__": base.__module__, "__doc__": cls.__doc__})
        return _CONVERTED_CLASSES[key]

    @classmethod
    def convert_in_place(cls, module: nn.Module, **options: Any) -> FeedbackLayer:
        """Turn ``module`` itself into a converted layer (its class changes; parameters, buffers, hooks,
        parametrizations and attributes stay as they are). ``options``: those of :meth:`setup_feedback`."""
        if not isinstance(module, cls.torch_base):
            raise TypeError(f"{cls.__name__} converts {cls.torch_base.__name__} modules, got {type(module).__name__}")
        module.__class__ = cls.converted_class(type(module))
        assert isinstance(module, FeedbackLayer)
        module.setup_feedback(**options)
        return module

    @classmethod
    def from_module(cls, module: nn.Module, **options: Any) -> FeedbackLayer:
        """A converted copy of ``module`` that *shares* its parameters and buffers (``module`` is unchanged).
        ``options``: those of :meth:`setup_feedback`."""
        new = copy.copy(module)
        for name, value in vars(module).items():  # own containers (parameters, buffers, hooks), shared entries
            if isinstance(value, (dict, set)):
                setattr(new, name, copy.copy(value))
        return cls.convert_in_place(new, **options)

    def unconverted_class(self) -> type[nn.Module]:
        """The class this layer had before conversion."""
        cls = type(self)
        if cls in _CONVERTED_CLASSES.values():
            return cast(type[nn.Module], next(b for b in cls.__bases__ if not issubclass(b, FeedbackLayer)))
        return self.torch_base

    def unconvert_in_place(self) -> nn.Module:
        """Turn this layer back into the module it was converted from: same object, same parameters and
        hooks; the feedback matrix and the rule's state are removed."""
        cls = self.unconverted_class()
        for name in _STATE_NAMES:
            self._parameters.pop(name, None)
            self._buffers.pop(name, None)
            self._non_persistent_buffers_set.discard(name)
        for name in _LAYER_ATTRIBUTES:
            self.__dict__.pop(name, None)
        self.__class__ = cls  # type: ignore[assignment]  # back to the class it was converted from
        return self


def _outside_transforms() -> contextlib.AbstractContextManager:
    """Inside a ``torch.func`` transform, a context where tensor operations are not lifted into it (copies and
    comparisons of plain values); elsewhere nothing."""
    return torch._C._DisableFuncTorch() if torch._C._are_functorch_transforms_active() else contextlib.nullcontext()


def _unwrapped(t: Tensor) -> Tensor:
    """``t`` without the wrappers of ``torch.func`` transforms (``grad``, ``vmap``), for reading its values."""
    while torch._C._functorch.is_functorch_wrapped_tensor(t):
        t = torch._C._functorch.get_unwrapped(t)
    return t


_INTS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _changed(now: list[Tensor], saved: list[Tensor]) -> bool:
    """Whether a weight's bits differ from its saved copy (so NaN equals NaN). A weight batched by ``vmap`` has
    another shape and is not compared. On the CPU NumPy compares, four times faster than ``torch.equal``."""
    for a, b in zip(now, saved):
        if a.shape != b.shape:
            continue  # batched by vmap
        ints = None if a.is_complex() else _INTS.get(a.element_size())
        if ints is None:
            same = torch.equal(a, b)
        else:
            a, b = a.detach().view(ints), b.view(ints)
            same = np.array_equal(a.numpy(), b.numpy()) if a.device.type == "cpu" else torch.equal(a, b)
        if not same:
            return True
    return False


def _snapshot(weights: list[Tensor], previous: list[Tensor] | None) -> list[Tensor]:
    """Copies of ``weights``, into the buffers of ``previous`` where they fit."""
    if previous is None or [w.shape for w in weights] != [p.shape for p in previous]:
        return [w.detach().clone() for w in weights]
    for p, w in zip(previous, weights):
        p.copy_(w.detach())
    return previous


_CONVERTED_CLASSES: dict[tuple[type, type], type] = {}
# a rule's entries in a layer's state_dict
_STATE_NAMES = ("feedback_weight", "feedback_step", "feedback_offset", SEED_KEY, RULE_KEY)
_LAYER_ATTRIBUTES = ("rule", "_capabilities", "feedback_init", "feedback_seed", "error_tap", "rule_state",
                     "direct_mode", "direct_shape", "_direct_planned", "_output_features", "_feedback_used",
                     "_step_key", "_step_values", "_step_hooks", "_scratch")


def _feedback_args(rule, feedback_init: str, feedback_scale: float, seed: int,
                   output_features: int | None, error_tap: FF.ErrorTap | None) -> dict[str, Any]:
    return {"rule": rule, "init": FeedbackInit(feedback_init, feedback_scale), "seed": seed,
            "output_features": output_features, "error_tap": error_tap}


class FALinear(FeedbackLayer, nn.Linear):  # type: ignore[misc]  # bias: the mixin's Optional
    """``nn.Linear`` whose input gradient follows a learning rule.

    ``y = x Wᵀ + b``; backward ``∂x = g B`` (``B`` from the rule), ``∂W = gᵀ x``, ``∂b = Σ g``.

    Args:
        in_features, out_features, bias, device, dtype: as ``nn.Linear``.
        rule: registry name or rule instance (default ``"fa"``).
        feedback_init, feedback_scale: see :class:`~falign.rules.FeedbackInit`.
        seed: seed of this layer's feedback matrix.
        output_features: ``n_out`` of a direct rule's ``D`` for a layer used outside ``falign.convert``.

    Shape:
        - Input: ``(*, in_features)``; Output: ``(*, out_features)``.
        - ``feedback_weight``: ``(out_features, in_features)``; direct rules: ``(n_out, in_features)``.

    Example::

        >>> layer = FALinear(20, 30, rule="fa", seed=1)
        >>> layer(torch.randn(8, 5, 20)).shape
        torch.Size([8, 5, 30])
    """

    torch_base = nn.Linear

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *,
                 rule: str | FeedbackRule = "fa", feedback_init: str = "kaiming_uniform",
                 feedback_scale: float = 1.0, seed: int = 0, output_features: int | None = None,
                 error_tap: FF.ErrorTap | None = None, device=None, dtype=None) -> None:
        nn.Linear.__init__(self, in_features, out_features, bias, device=device, dtype=dtype)
        self.setup_feedback(**_feedback_args(rule, feedback_init, feedback_scale, seed, output_features, error_tap))

    def plain_forward(self, x: Tensor) -> Tensor:
        return nn.functional.linear(x, self.weight, self.bias)

    def feedback_forward(self, x: Tensor, feedback: FF.FeedbackSource) -> Tensor:
        return FF.feedback_linear(x, self.weight, self.bias, feedback)

    def direct_forward(self, x, feedback, session, mode, projector) -> Tensor:
        return FF.direct_feedback_linear(x, self.weight, self.bias, feedback, session, mode, projector)


class _FAConvNd(FeedbackLayer):
    """Shared code of the converted convolutions (padding modes, 'same', groups, dilation)."""

    padding_mode: str
    kernel_size: tuple[int, ...]
    stride: tuple[int, ...]
    dilation: tuple[int, ...]
    groups: int
    padding: str | tuple[int, ...]
    _reversed_padding_repeated_twice: list[int]

    def __init__(self, *args: Any, rule: str | FeedbackRule = "fa", feedback_init: str = "kaiming_uniform",
                 feedback_scale: float = 1.0, seed: int = 0, output_features: int | None = None,
                 error_tap: FF.ErrorTap | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)  # the nn.ConvNd constructor, positional arguments as there
        self.setup_feedback(**_feedback_args(rule, feedback_init, feedback_scale, seed, output_features, error_tap))

    def _padding_plan(self) -> tuple[list[int] | None, str, list[int]]:
        """(explicit F.pad amounts or None, F.pad mode, numeric symmetric conv padding)."""
        n = len(self.kernel_size)
        if self.padding_mode != "zeros":
            return list(self._reversed_padding_repeated_twice), self.padding_mode, [0] * n
        if self.padding == "valid":
            return None, "constant", [0] * n
        if self.padding == "same":
            totals = [d * (k - 1) for d, k in zip(self.dilation, self.kernel_size)]
            if all(t % 2 == 0 for t in totals):
                return None, "constant", [t // 2 for t in totals]
            return list(self._reversed_padding_repeated_twice), "constant", [0] * n
        return None, "constant", list(cast(tuple[int, ...], self.padding))  # not a string here

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() == len(self.kernel_size) + 1:  # unbatched (C, *spatial), as the PyTorch layer accepts
            return super().forward(x.unsqueeze(0)).squeeze(0)
        return super().forward(x)

    def plain_forward(self, x: Tensor) -> Tensor:
        return self._conv_forward(x, self.weight, self.bias)  # type: ignore[operator]  # nn.ConvNd's own

    def feedback_forward(self, x: Tensor, feedback: FF.FeedbackSource) -> Tensor:
        pad, mode, padding = self._padding_plan()
        if pad is not None:
            x = nn.functional.pad(x, pad, mode=mode)
        return FF.feedback_conv(x, self.weight, self.bias, feedback, self.stride, padding,
                                self.dilation, self.groups)

    def direct_forward(self, x, feedback, session, mode, projector) -> Tensor:
        pad, pad_mode, padding = self._padding_plan()
        return FF.direct_feedback_conv(x, self.weight, self.bias, feedback, session, pad, pad_mode,
                                       self.stride, padding, self.dilation, self.groups, projector)


_CONV_DOC = """``nn.Conv{n}d`` whose input gradient is the transposed convolution with the rule's ``B``.

    ``FAConv{n}d(in_channels, out_channels, kernel_size, stride=1, padding=0, dilation=1, groups=1,
    bias=True, padding_mode='zeros', *, rule='fa', feedback_init=..., feedback_scale=1.0, seed=0,
    device=None, dtype=None)``.

    Every ``nn.Conv{n}d`` option works: stride, dilation, groups, ``padding`` as ints, ``'same'`` or
    ``'valid'``, every ``padding_mode``, with or without bias, batched or unbatched input. The weight and
    bias gradients are backprop's local ones. Feedback options as :class:`FALinear`.

    Shape:
        - Input ``(N, C_in, *spatial)`` or ``(C_in, *spatial)``, output as ``nn.Conv{n}d``.
        - ``feedback_weight``: W's shape; direct rules: ``(E, C_in·∏spatial)``, made at the first forward.
    """


class FAConv1d(_FAConvNd, nn.Conv1d):  # type: ignore[misc]  # padding_mode: the mixin's str
    __doc__ = _CONV_DOC.format(n=1)
    torch_base = nn.Conv1d


class FAConv2d(_FAConvNd, nn.Conv2d):  # type: ignore[misc]  # padding_mode: the mixin's str
    __doc__ = _CONV_DOC.format(n=2)
    torch_base = nn.Conv2d


class FAConv3d(_FAConvNd, nn.Conv3d):  # type: ignore[misc]  # padding_mode: the mixin's str
    __doc__ = _CONV_DOC.format(n=3)
    torch_base = nn.Conv3d


class _FAConvTransposeNd(FeedbackLayer):
    """Shared code of the converted transposed convolutions (stride, padding, output_padding, groups, dilation,
    ``output_size=`` at call time)."""

    kernel_size: tuple[int, ...]
    stride: tuple[int, ...]
    padding: tuple[int, ...]
    dilation: tuple[int, ...]
    output_padding: tuple[int, ...]
    groups: int

    def __init__(self, *args: Any, rule: str | FeedbackRule = "fa", feedback_init: str = "kaiming_uniform",
                 feedback_scale: float = 1.0, seed: int = 0, output_features: int | None = None,
                 error_tap: FF.ErrorTap | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)  # the nn.ConvTransposeNd constructor, positional arguments as there
        self.setup_feedback(**_feedback_args(rule, feedback_init, feedback_scale, seed, output_features, error_tap))

    def forward(self, x: Tensor, output_size: list[int] | None = None) -> Tensor:
        n = len(self.kernel_size)
        unbatched = x.dim() == n + 1
        if unbatched:  # (C, *spatial), as the PyTorch layer accepts
            x = x.unsqueeze(0)
        self._call_output_size = output_size
        try:
            out = FeedbackLayer.forward(self, x)
        finally:
            self._call_output_size = None
        return out.squeeze(0) if unbatched else out

    def _opad(self, x: Tensor) -> list[int]:
        n = len(self.kernel_size)
        opad = self._output_padding  # nn.ConvTransposeNd's own
        return list(opad(x, getattr(self, "_call_output_size", None), list(self.stride),  # type: ignore[operator]
                         list(self.padding), list(self.kernel_size), n, list(self.dilation)))

    def plain_forward(self, x: Tensor) -> Tensor:
        conv = (nn.functional.conv_transpose1d, nn.functional.conv_transpose2d,
                nn.functional.conv_transpose3d)[len(self.kernel_size) - 1]  # (these autocast as PyTorch's layer)
        return conv(x, self.weight, self.bias, self.stride, self.padding, self._opad(x), self.groups, self.dilation)

    def feedback_forward(self, x: Tensor, feedback: FF.FeedbackSource) -> Tensor:
        return FF.feedback_conv(x, self.weight, self.bias, feedback, self.stride, self.padding, self.dilation,
                                self.groups, transposed=True, output_padding=self._opad(x))

    def direct_forward(self, x, feedback, session, mode, projector) -> Tensor:
        return FF.direct_feedback_conv(x, self.weight, self.bias, feedback, session, None, "constant",
                                       self.stride, self.padding, self.dilation, self.groups, projector,
                                       transposed=True, output_padding=self._opad(x))


_CONV_T_DOC = """``nn.ConvTranspose{n}d`` whose input gradient is the convolution with the rule's ``B``.

    ``FAConvTranspose{n}d(in_channels, out_channels, kernel_size, stride=1, padding=0, output_padding=0,
    groups=1, bias=True, dilation=1, padding_mode='zeros', *, rule='fa', ...)``; called as
    ``layer(x, output_size=None)``. A transposed convolution's input gradient is the ordinary convolution
    of the output gradient with ``W``; the rule puts ``B`` (W's shape, ``(C_in, C_out/groups, *kernel)``) in
    its place. Weight and bias gradients are backprop's local ones. Feedback options as :class:`FALinear`.
    """


class FAConvTranspose1d(_FAConvTransposeNd, nn.ConvTranspose1d):  # type: ignore[misc]  # padding: the mixin's
    __doc__ = _CONV_T_DOC.format(n=1)
    torch_base = nn.ConvTranspose1d


class FAConvTranspose2d(_FAConvTransposeNd, nn.ConvTranspose2d):  # type: ignore[misc]  # padding: the mixin's
    __doc__ = _CONV_T_DOC.format(n=2)
    torch_base = nn.ConvTranspose2d


class FAConvTranspose3d(_FAConvTransposeNd, nn.ConvTranspose3d):  # type: ignore[misc]  # padding: the mixin's
    __doc__ = _CONV_T_DOC.format(n=3)
    torch_base = nn.ConvTranspose3d
