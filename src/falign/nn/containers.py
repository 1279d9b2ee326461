"""Converted *containers*: PyTorch modules that hold several weight matrices and compute with them in their
own ``forward`` (``nn.MultiheadAttention``, ``nn.RNN``/``nn.GRU``/``nn.LSTM``).

Such a module keeps its parameters (same names, same ``state_dict`` keys) and gains one
:class:`FeedbackView` per weight matrix whose transpose the backward pass would transport, in a
``ModuleDict`` named ``feedback``. A view is a full :class:`~falign.nn.FeedbackLayer` — the rule, its
``feedback_weight``, its seed, its per-step work, the diagnostics — whose ``weight`` is a *reference* to
the container's parameter (or a block of rows of it, for a packed q/k/v in-projection), never a copy.
So ``state_dict`` gains ``feedback.<view>.feedback_weight`` entries and nothing else.
"""

from __future__ import annotations

from typing import Any, ClassVar, cast

from torch import Tensor, nn

from falign import functional as FF
from falign.nn.layers import _CONVERTED_CLASSES, FeedbackLayer

__all__ = ["FeedbackContainer", "FeedbackView"]

Rows = tuple[int, int] | None


class FeedbackView(FeedbackLayer):
    """The feedback of one weight matrix that a converted container holds.

    ``weight`` is ``owner.<weight_name>`` (rows ``start:stop`` of it when ``weight_rows`` is given) and
    ``bias`` likewise; ``view(x)`` computes ``x Wᵀ + b`` with the rule's input signal, as
    :class:`~falign.nn.FALinear` does. The owner is referenced, not registered: the view has no
    parameters of its own except a learned feedback (``kp``).

    Shape:
        - ``feedback_weight``: the shape of the (block of the) weight; direct rules: ``(E, in)``.
    """

    torch_base = nn.Module

    def __init__(self, owner: nn.Module, weight: tuple[str, Rows], bias: tuple[str, Rows] | None,
                 **options: Any) -> None:
        nn.Module.__init__(self)
        self.__dict__["_owner"] = owner  # a plain reference (a registered one would be a cycle of modules)
        self.weight_name, self.weight_rows = weight
        self.bias_name: str | None
        self.bias_rows: Rows
        self.bias_name, self.bias_rows = bias if bias is not None else (None, None)
        self.setup_feedback(**options)

    @staticmethod
    def _take(tensor: Tensor | None, rows: Rows) -> Tensor | None:
        if tensor is None or rows is None:
            return tensor
        return tensor[rows[0]:rows[1]]

    @property
    def weight(self) -> Tensor:  # type: ignore[override]
        weight = self._take(getattr(self._owner, self.weight_name), self.weight_rows)
        assert weight is not None
        return weight

    @property
    def bias(self) -> Tensor | None:  # type: ignore[override]
        if self.bias_name is None:
            return None
        return self._take(getattr(self._owner, self.bias_name), self.bias_rows)

    def weight_source(self) -> tuple[str, Rows]:
        """``(parameter name on the owner, rows)`` of this view's weight (the diagnostics read gradients
        of that block of the owner's parameter)."""
        return self.weight_name, self.weight_rows

    def _params_key(self) -> tuple[int, ...]:
        owner = self._owner
        names = (self.weight_name, self.bias_name)
        return tuple(getattr(owner, n)._version for n in names if n is not None and getattr(owner, n) is not None)

    def plain_forward(self, x: Tensor) -> Tensor:
        return nn.functional.linear(x, self.weight, self.bias)

    def feedback_forward(self, x: Tensor, feedback: FF.FeedbackSource) -> Tensor:
        return FF.feedback_linear(x, self.weight, self.bias, feedback)

    def direct_forward(self, x, feedback, session, mode, projector) -> Tensor:
        return FF.direct_feedback_linear(x, self.weight, self.bias, feedback, session, mode, projector)

    def extra_repr(self) -> str:
        rows = "" if self.weight_rows is None else f"[{self.weight_rows[0]}:{self.weight_rows[1]}]"
        return f"{self.weight_name}{rows} {tuple(self.weight.shape)}, rule={self.rule.name}"


class FeedbackContainer(nn.Module):
    """Base of the converted containers: conversion in place, the ``feedback`` views, unconversion."""

    torch_base: ClassVar[type[nn.Module]]
    feedback: nn.ModuleDict

    def view_specs(self) -> dict[str, tuple[tuple[str, Rows], tuple[str, Rows] | None]]:
        """``{view name: ((weight parameter, rows), (bias parameter, rows) or None)}``."""
        raise NotImplementedError

    def setup_feedback(self, **options: Any) -> None:
        """One :class:`FeedbackView` per transported weight, seeds ``mix_seed(seed, i)`` in order; a container
        converted again starts afresh. ``options``: those of :meth:`FeedbackLayer.setup_feedback`."""
        from falign.seeding import mix_seed

        seed = int(options.pop("seed", 0))
        self._modules.pop("feedback", None)
        views = {name: FeedbackView(self, weight, bias, seed=mix_seed(seed, i), **options)
                 for i, (name, (weight, bias)) in enumerate(self.view_specs().items())}
        self.feedback = nn.ModuleDict(views)
        self.convert_children(seed=mix_seed(seed, len(views)), **options)

    def convert_children(self, **options: Any) -> None:
        """Convert the layers this container calls as modules (attention's ``out_proj``)."""

    @property
    def rule(self):
        views = self._modules["feedback"]
        cached = self.__dict__.get("_rule_of")  # (views, rule): read at every forward pass, walked once per set
        if cached is None or cached[0] is not views:
            cached = self.__dict__["_rule_of"] = (views, next(iter(views.values())).rule)
        return cached[1]

    # the same class derivation as the converted layers (a subclass of both for a user's subclass)
    converted_class = classmethod(FeedbackLayer.converted_class.__func__)  # type: ignore[attr-defined,var-annotated]

    @classmethod
    def convert_in_place(cls, module: nn.Module, **options: Any) -> FeedbackContainer:
        """Turn ``module`` itself into the converted container (its class changes; parameters, buffers and
        hooks stay) and give it its views. ``options``: those of :meth:`FeedbackLayer.setup_feedback`."""
        if not isinstance(module, cls.torch_base):
            raise TypeError(f"{cls.__name__} converts {cls.torch_base.__name__} modules, got {type(module).__name__}")
        module.__class__ = cls.converted_class(type(module))
        assert isinstance(module, FeedbackContainer)
        module.setup_feedback(**options)
        return module

    def unconverted_class(self) -> type[nn.Module]:
        cls = type(self)
        if cls in _CONVERTED_CLASSES.values():
            return cast(type[nn.Module], next(b for b in cls.__bases__ if not issubclass(b, FeedbackContainer)))
        return self.torch_base

    def unconvert_in_place(self) -> nn.Module:
        """The module this container was converted from again: the views go, parameters and hooks stay."""
        self._modules.pop("feedback", None)
        for child in self.children():
            if isinstance(child, FeedbackLayer):
                child.unconvert_in_place()
        self.__class__ = self.unconverted_class()  # type: ignore[assignment]  # the class before conversion
        return self
