"""Converted layers: ``nn.Linear`` / ``nn.Conv{1,2,3}d`` whose backward follows a learning rule.

Each layer is a subclass of the PyTorch layer it replaces, so weights, ``state_dict`` keys and
``isinstance`` checks are unchanged. The rule (a small object from :mod:`falign.rules`) decides the
backward; the layer keeps the rule's feedback matrix in ``feedback_weight``:

- ``fa``, ``wm``: a buffer of W's shape (``B``); ``kp``: an ``nn.Parameter`` of W's shape;
- ``usf``, ``frsf``, ``brsf``: a buffer of W's shape with the magnitudes ``M``, ``B = M ⊙ sign(W)``;
- ``dfa``: a buffer ``D`` of shape ``(n_out, in_features)`` (conv: ``(n_out, C·H·W)`` of the input,
  created at the first forward);
- ``bp``: ``None``.

A buffer is saved in ``state_dict``, follows ``.to()`` and is not in ``parameters()``. Assign a new
tensor of the same shape, or write into it in place, to set the feedback by hand.
"""

from __future__ import annotations

import copy
import warnings
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from falign import functional as FF
from falign.rules import FeedbackInit, FeedbackRule, get_rule

__all__ = ["FAConv1d", "FAConv2d", "FAConv3d", "FALinear", "FeedbackLayer", "TracedBackpropWarning"]


_PROBE: Any = None  # set by falign.convert's probe of the first forward pass (see _probe_forward)


class TracedBackpropWarning(UserWarning):
    """A converted model was traced with ``torch.jit.trace``: the trace's backward is backprop."""


def _warn_traced() -> None:
    warnings.warn(
        "torch.jit.trace of a falign model records the plain forward pass: the traced module computes the same "
        "outputs, but its backward is backprop, not the rule. Trace for inference or export; train the eager "
        "model.", TracedBackpropWarning, stacklevel=3)


def _compiling() -> bool:
    return torch.compiler.is_compiling()


class FeedbackLayer(nn.Module):
    """Base class of the converted layers: the rule, its options and ``feedback_weight`` (see the module
    docstring). A concrete layer also derives from the PyTorch layer it stands for (``torch_base``).

    Attributes:
        rule: the :class:`~falign.rules.FeedbackRule` instance.
        feedback_init: :class:`~falign.rules.FeedbackInit` (distribution and scale).
        feedback_seed: seed from which ``feedback_weight`` (and brsf's draws) are reproducible.
        dfa_output_features: ``n_out`` for ``dfa``; ``None`` otherwise.
        error_tap: the model's :class:`~falign.functional.ErrorTap` (``dfa`` only).
    """

    torch_base: ClassVar[type[nn.Module]]
    rule: FeedbackRule
    feedback_init: FeedbackInit
    feedback_seed: int
    feedback_weight: Tensor | None
    weight: Tensor
    bias: Tensor | None

    def _setup_feedback(
        self,
        rule: str | FeedbackRule = "fa",
        feedback_init: str = "kaiming_uniform",
        feedback_scale: float = 1.0,
        seed: int = 0,
        output_features: int | None = None,
        error_tap: FF.ErrorTap | None = None,
    ) -> None:
        self.rule = get_rule(rule)
        self.feedback_init = FeedbackInit(feedback_init, feedback_scale)
        self.feedback_seed = int(seed)
        self.dfa_output_features = output_features
        self.error_tap = error_tap
        self.dfa_mode = FF.PER_POSITION
        self.dfa_shape: tuple[int, ...] | None = (
            (output_features, self.weight.shape[1]) if output_features is not None and self.weight.dim() == 2 else None)
        self._feedback_used = False
        self._step_key: tuple[int, ...] | None = None
        self._step_hooks = 0
        for name in ("feedback_weight", "feedback_step"):  # a layer converted again starts afresh
            self._parameters.pop(name, None)
            self._buffers.pop(name, None)
        if not self.rule.has_feedback:
            self.register_buffer("feedback_weight", None)
        else:
            self._assign_feedback(self.weight.new_empty(0))
            self.reset_feedback()
        self.rule.register_state(self)

    def reset_parameters(self) -> None:
        """Re-initialise the weights as the PyTorch layer does, and redraw the feedback."""
        super().reset_parameters()  # type: ignore[misc]
        if hasattr(self, "rule"):
            self.reset_feedback()

    def _assign_feedback(self, tensor: Tensor) -> None:
        wrapped = self.rule.wrap_feedback(tensor)
        if isinstance(wrapped, nn.Parameter):
            self._buffers.pop("feedback_weight", None)
            self.register_parameter("feedback_weight", wrapped)
        else:
            self.register_buffer("feedback_weight", wrapped)

    @torch.no_grad()
    def reset_feedback(self) -> None:
        """(Re)draw ``feedback_weight`` from ``feedback_init`` and ``feedback_seed``.

        Leaves it empty while its shape is unknown (``dfa`` conv before the first forward).
        """
        if not self.rule.has_feedback:
            return
        shape = self.rule.feedback_shape(self)
        if shape is None:
            return
        generator = torch.Generator().manual_seed(self.feedback_seed)
        dtype = torch.float64 if self.weight.dtype == torch.float64 else torch.float32
        value = self.rule.initial_feedback(self, shape, self.feedback_init, generator).to(dtype)
        value = value.to(device=self.weight.device, dtype=self.weight.dtype)
        current = self.feedback_weight
        if current is not None and current.shape == value.shape and current.device == value.device:
            current.copy_(value)
        else:
            self._assign_feedback(value)

    def current_feedback(self) -> Tensor | None:
        """The ``B`` (or ``D``) the backward uses at the current weights; ``None`` for ``bp``."""
        if not self.rule.has_feedback:
            return None
        return self.rule.current_feedback(self)

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

    def forward(self, x: Tensor) -> Tensor:
        if _PROBE is not None:
            return _PROBE(self, x)
        if torch.jit.is_tracing():
            _warn_traced()
            return self.plain_forward(x)
        if self.rule.per_step and not self._step_hooks and torch.is_grad_enabled() and not _compiling():
            self._check_stepped()
        return self.rule.forward(self, x)

    # -- per-step work (falign.attach) ----------------------------------------------------------------
    def _params_key(self) -> tuple[int, ...]:
        return tuple(p._version for name, p in self.named_parameters() if not name.endswith("feedback_weight"))

    def mark_stepped(self) -> None:
        """Record that the rule's per-step work has run for the current weights (called by the step hook
        of :func:`falign.attach` and by hand-run per-step functions such as ``wm``'s ``mirror_step``)."""
        self._step_key = self._params_key()

    def _check_stepped(self) -> None:
        """A per-step rule whose weights changed without its per-step work having run fails loudly."""
        key = self._params_key()
        if self._step_key is None:
            self._step_key = key
        elif key != self._step_key:
            raise RuntimeError(
                f"{self.rule.name}: the weights of this layer changed (an optimiser step) but the rule's per-step "
                f"work ({self.rule.step_work}) did not run. Call "
                f"falign.attach(model, optimizer) once after building the optimizer, so every optimizer.step() "
                f"runs it, or run falign.step_rules(model) yourself after each step")

    # Implemented by the concrete layers.
    def plain_forward(self, x: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def feedback_forward(self, x: Tensor, feedback: Tensor) -> Tensor:  # pragma: no cover
        raise NotImplementedError

    def direct_forward(self, x: Tensor, feedback: Tensor, session: FF.ErrorSession | None, mode: str) -> Tensor:
        raise NotImplementedError  # pragma: no cover

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        key = prefix + "feedback_weight"
        current = self.feedback_weight
        incoming = state_dict.get(key)
        if current is not None and current.numel() == 0 and incoming is not None and incoming.numel() > 0:
            self._assign_feedback(current.new_empty(incoming.shape))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self.rule.after_load(self)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, rule={self.rule.name}"

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
    def convert_in_place(cls, module: nn.Module, **feedback_options: Any) -> FeedbackLayer:
        """Turn ``module`` itself into a converted layer (its class changes; parameters, buffers, hooks,
        parametrizations and attributes stay as they are). ``feedback_options``: :meth:`_setup_feedback`."""
        if not isinstance(module, cls.torch_base):
            raise TypeError(f"{cls.__name__} converts {cls.torch_base.__name__} modules, got {type(module).__name__}")
        module.__class__ = cls.converted_class(type(module))
        assert isinstance(module, FeedbackLayer)
        module._setup_feedback(**feedback_options)
        return module

    @classmethod
    def from_module(cls, module: nn.Module, **feedback_options: Any) -> FeedbackLayer:
        """A converted copy of ``module`` that *shares* its parameters and buffers (``module`` is unchanged).

        ``feedback_options`` are those of :meth:`_setup_feedback` (rule, feedback_init,
        feedback_scale, seed, output_features, error_tap).
        """
        new = copy.copy(module)
        for name, value in vars(module).items():  # own containers (parameters, buffers, hooks), shared entries
            if isinstance(value, (dict, set)):
                setattr(new, name, copy.copy(value))
        return cls.convert_in_place(new, **feedback_options)


_CONVERTED_CLASSES: dict[tuple[type, type], type] = {}


class FALinear(FeedbackLayer, nn.Linear):
    """``nn.Linear`` whose input gradient follows a learning rule.

    ``y = x Wᵀ + b``; backward ``∂x = g B`` (``B`` from the rule), ``∂W = gᵀ x``, ``∂b = Σ g``.

    Args:
        in_features, out_features, bias, device, dtype: as ``nn.Linear``.
        rule: registry name or rule instance (default ``"fa"``).
        feedback_init, feedback_scale: see :class:`~falign.rules.FeedbackInit`.
        seed: seed of this layer's feedback matrix.
        output_features: ``n_out`` for ``dfa``.

    Shape:
        - Input: ``(*, in_features)``; Output: ``(*, out_features)``.
        - ``feedback_weight``: ``(out_features, in_features)``; ``dfa``: ``(n_out, in_features)``.

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
        self._setup_feedback(rule, feedback_init, feedback_scale, seed, output_features, error_tap)

    def plain_forward(self, x: Tensor) -> Tensor:
        return nn.functional.linear(x, self.weight, self.bias)

    def feedback_forward(self, x: Tensor, feedback: Tensor) -> Tensor:
        return FF.feedback_linear(x, self.weight, self.bias, feedback)

    def direct_forward(self, x: Tensor, feedback: Tensor, session: FF.ErrorSession | None, mode: str) -> Tensor:
        return FF.direct_feedback_linear(x, self.weight, self.bias, feedback, session, mode)


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
        self._setup_feedback(rule, feedback_init, feedback_scale, seed, output_features, error_tap)

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
        return None, "constant", list(self.padding)

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() == len(self.kernel_size) + 1:  # unbatched (C, *spatial), as the PyTorch layer accepts
            return super().forward(x.unsqueeze(0)).squeeze(0)
        return super().forward(x)

    def plain_forward(self, x: Tensor) -> Tensor:
        return self._conv_forward(x, self.weight, self.bias)

    def feedback_forward(self, x: Tensor, feedback: Tensor) -> Tensor:
        pad, mode, padding = self._padding_plan()
        if pad is not None:
            x = nn.functional.pad(x, pad, mode=mode)
        return FF.feedback_conv(x, self.weight, self.bias, feedback, self.stride, padding,
                                self.dilation, self.groups)

    def direct_forward(self, x: Tensor, feedback: Tensor, session: FF.ErrorSession | None, mode: str) -> Tensor:
        pad, pad_mode, padding = self._padding_plan()
        return FF.direct_feedback_conv(x, self.weight, self.bias, feedback, session, pad, pad_mode,
                                       self.stride, padding, self.dilation, self.groups)


_CONV_DOC = """``nn.Conv{n}d`` whose input gradient is the transposed convolution with the rule's ``B``.

    ``FAConv{n}d(in_channels, out_channels, kernel_size, stride=1, padding=0, dilation=1, groups=1,
    bias=True, padding_mode='zeros', *, rule='fa', feedback_init=..., feedback_scale=1.0, seed=0,
    output_features=None, device=None, dtype=None)``.

    Every ``nn.Conv{n}d`` option works: stride, dilation, groups, ``padding`` as ints, ``'same'`` or
    ``'valid'``, every ``padding_mode``, with or without bias. The weight and bias gradients are
    backprop's local ones. Feedback options as :class:`FALinear`.

    Shape:
        - Input ``(N, C_in, *spatial)``, output ``(N, C_out, *spatial_out)`` as ``nn.Conv{n}d``.
        - ``feedback_weight``: W's shape; ``dfa``: ``(n_out, C_in·∏spatial)``, created at the first forward.
    """


class FAConv1d(_FAConvNd, nn.Conv1d):
    __doc__ = _CONV_DOC.format(n=1)
    torch_base = nn.Conv1d


class FAConv2d(_FAConvNd, nn.Conv2d):
    __doc__ = _CONV_DOC.format(n=2)
    torch_base = nn.Conv2d


class FAConv3d(_FAConvNd, nn.Conv3d):
    __doc__ = _CONV_DOC.format(n=3)
    torch_base = nn.Conv3d
