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

from typing import Any

import torch
from torch import Tensor, nn

from falign import functional as FF
from falign.rules import FeedbackInit, FeedbackRule, get_rule

__all__ = ["FAConv1d", "FAConv2d", "FAConv3d", "FALinear", "FeedbackLayer"]


class FeedbackLayer(nn.Module):
    """Mixin holding the rule, its options and ``feedback_weight`` (see the module docstring).

    Attributes:
        rule: the :class:`~falign.rules.FeedbackRule` instance.
        feedback_init: :class:`~falign.rules.FeedbackInit` (distribution and scale).
        feedback_seed: seed from which ``feedback_weight`` (and brsf's draws) are reproducible.
        dfa_output_features: ``n_out`` for ``dfa``; ``None`` otherwise.
        error_tap: the model's :class:`~falign.functional.ErrorTap` (``dfa`` only).
    """

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
        self._dfa_input_shape: tuple[int, ...] | None = None
        self._feedback_used = False
        self._parameters.pop("feedback_weight", None)
        self._buffers.pop("feedback_weight", None)
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
        return self.rule.forward(self, x)

    # Implemented by the concrete layers.
    def plain_forward(self, x: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def feedback_forward(self, x: Tensor, feedback: Tensor) -> Tensor:  # pragma: no cover
        raise NotImplementedError

    def direct_forward(self, x: Tensor, feedback: Tensor, tap: FF.ErrorTap | None) -> Tensor:
        raise NotImplementedError  # pragma: no cover

    def _check_tap(self, tap: FF.ErrorTap | None) -> FF.ErrorTap:
        if tap is None:
            raise RuntimeError(
                "this dfa layer has no error tap: convert the whole model with falign.convert(model, 'dfa'), "
                "or call falign.install_error_tap(model) on a model built from FA layers by hand"
            )
        return tap

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
    def _constructor_args(cls, module: nn.Module) -> dict[str, Any]:  # pragma: no cover
        raise NotImplementedError

    @classmethod
    def from_module(cls, module: nn.Module, **feedback_options: Any) -> FeedbackLayer:
        """A converted copy of ``module`` that *shares* its weight and bias parameters.

        ``feedback_options`` are those of :meth:`_setup_feedback` (rule, feedback_init,
        feedback_scale, seed, output_features, error_tap).
        """
        layer = cls(**cls._constructor_args(module), rule="bp", device="meta", dtype=module.weight.dtype)
        layer.weight = module.weight
        layer.bias = module.bias
        layer._setup_feedback(**feedback_options)
        layer.train(module.training)
        return layer


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

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *,
                 rule: str | FeedbackRule = "fa", feedback_init: str = "kaiming_uniform",
                 feedback_scale: float = 1.0, seed: int = 0, output_features: int | None = None,
                 error_tap: FF.ErrorTap | None = None, device=None, dtype=None) -> None:
        nn.Linear.__init__(self, in_features, out_features, bias, device=device, dtype=dtype)
        self._setup_feedback(rule, feedback_init, feedback_scale, seed, output_features, error_tap)

    @classmethod
    def _constructor_args(cls, module: nn.Module) -> dict[str, Any]:
        return {"in_features": module.in_features, "out_features": module.out_features,
                "bias": module.bias is not None}

    def plain_forward(self, x: Tensor) -> Tensor:
        return nn.functional.linear(x, self.weight, self.bias)

    def feedback_forward(self, x: Tensor, feedback: Tensor) -> Tensor:
        return FF.feedback_linear(x, self.weight, self.bias, feedback)

    def direct_forward(self, x: Tensor, feedback: Tensor, tap: FF.ErrorTap | None) -> Tensor:
        return FF.direct_feedback_linear(x, self.weight, self.bias, feedback, self._check_tap(tap))


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

    @classmethod
    def _constructor_args(cls, module: nn.Module) -> dict[str, Any]:
        return {
            "in_channels": module.in_channels, "out_channels": module.out_channels,
            "kernel_size": module.kernel_size, "stride": module.stride, "padding": module.padding,
            "dilation": module.dilation, "groups": module.groups, "bias": module.bias is not None,
            "padding_mode": module.padding_mode,
        }

    def plain_forward(self, x: Tensor) -> Tensor:
        return self._conv_forward(x, self.weight, self.bias)

    def feedback_forward(self, x: Tensor, feedback: Tensor) -> Tensor:
        pad, mode, padding = self._padding_plan()
        if pad is not None:
            x = nn.functional.pad(x, pad, mode=mode)
        return FF.feedback_conv(x, self.weight, self.bias, feedback, self.stride, padding,
                                self.dilation, self.groups)

    def direct_forward(self, x: Tensor, feedback: Tensor, tap: FF.ErrorTap | None) -> Tensor:
        pad, mode, padding = self._padding_plan()
        return FF.direct_feedback_conv(x, self.weight, self.bias, feedback, self._check_tap(tap), pad, mode,
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


class FAConv2d(_FAConvNd, nn.Conv2d):
    __doc__ = _CONV_DOC.format(n=2)


class FAConv3d(_FAConvNd, nn.Conv3d):
    __doc__ = _CONV_DOC.format(n=3)
