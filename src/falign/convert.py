"""``falign.convert``: turn any ``nn.Module`` into one trained by a feedback-alignment-family rule.

Conversion is driven by :data:`LAYER_MAP`, a ``{PyTorch layer type: converted layer type}`` map.
Every module whose *exact* type is in the map is replaced by its converted counterpart, sharing the
same weight and bias parameters. Everything else keeps backpropagating, by this policy:

- modules without parameters of their own (activations, pooling, dropout, flatten, containers,
  residual additions written in ``forward``) pass signals on by the ordinary chain rule;
- normalisation layers and ``PReLU`` (per-channel affine or elementwise parameters, no weight
  transport) keep their exact gradients: :data:`KEPT_ON_BACKPROP`;
- any other module with parameters (``nn.LSTM``, ``nn.MultiheadAttention``'s packed projection,
  ``nn.Embedding``, a user subclass of ``nn.Linear`` with its own ``forward``, ...) raises
  :class:`ConversionError` naming it, unless ``unsupported="backprop"`` leaves it on backprop. Its
  children are then left alone too (``MultiheadAttention`` reads ``out_proj.weight`` directly).

:func:`conversion_report` tells afterwards what was converted and what was left on backprop.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor, nn

from falign.errors import FalignError
from falign.functional import ErrorTap
from falign.nn.layers import FAConv1d, FAConv2d, FAConv3d, FALinear, FeedbackLayer
from falign.rules import FeedbackRule, get_rule, mix_seed

__all__ = [
    "KEPT_ON_BACKPROP",
    "LAYER_MAP",
    "ConversionError",
    "ConversionReport",
    "conversion_report",
    "convert",
    "feedback_layers",
    "install_error_tap",
]

LAYER_MAP: dict[type[nn.Module], type[FeedbackLayer]] = {
    nn.Linear: FALinear,
    nn.Conv1d: FAConv1d,
    nn.Conv2d: FAConv2d,
    nn.Conv3d: FAConv3d,
}

KEPT_ON_BACKPROP: tuple[type[nn.Module], ...] = (
    nn.modules.batchnorm._BatchNorm,
    nn.modules.instancenorm._InstanceNorm,
    nn.LayerNorm,
    nn.GroupNorm,
    nn.PReLU,
)
if hasattr(nn, "RMSNorm"):  # torch >= 2.4
    KEPT_ON_BACKPROP = (*KEPT_ON_BACKPROP, nn.RMSNorm)


class ConversionError(FalignError, TypeError):
    """A module with parameters that no converted layer can stand in for."""


@dataclass
class LayerRecord:
    """One line of a :class:`ConversionReport`."""

    name: str
    type: str
    status: str  # "converted", "kept-backprop", "unsupported-backprop"
    rule: str
    note: str = ""


@dataclass
class ConversionReport:
    """What :func:`convert` did, layer by layer (``str(report)`` is a table)."""

    rule: str
    output_layer: str | None
    layers: list[LayerRecord] = field(default_factory=list)

    @property
    def converted(self) -> list[str]:
        return [r.name for r in self.layers if r.status == "converted"]

    @property
    def left_on_backprop(self) -> list[str]:
        """Modules with parameters that kept plain backprop (normalisation or unsupported)."""
        return [r.name for r in self.layers if r.status != "converted"]

    @property
    def unsupported(self) -> list[str]:
        return [r.name for r in self.layers if r.status == "unsupported-backprop"]

    def __str__(self) -> str:
        rows = [("layer", "type", "status", "rule", "note")]
        rows += [(r.name, r.type, r.status, r.rule, r.note) for r in self.layers]
        widths = [max(len(row[i]) for row in rows) for i in range(5)]
        return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows)


def _has_own_parameters(module: nn.Module) -> bool:
    return any(p is not None for p in module._parameters.values())


def _walk(module: nn.Module, prefix: str, map_: dict, records: list, found: list, unsupported: str) -> None:
    for name, child in module.named_children():
        full = f"{prefix}.{name}" if prefix else name
        if type(child) in map_ or isinstance(child, FeedbackLayer):
            found.append((module, name, full, child))
        elif isinstance(child, KEPT_ON_BACKPROP):
            records.append(LayerRecord(full, type(child).__name__, "kept-backprop", "bp",
                                       "normalisation/elementwise parameters: exact gradient"))
        elif _has_own_parameters(child):
            params = ", ".join(k for k, v in child._parameters.items() if v is not None)
            if unsupported == "error":
                raise ConversionError(
                    f"cannot convert {full!r} ({type(child).__name__}, parameters: {params}): falign has no "
                    f"feedback version of this layer. Pass unsupported='backprop' to leave it on backprop "
                    f"(its parameters then get exact gradients), or add it to layer_map="
                )
            records.append(LayerRecord(full, type(child).__name__, "unsupported-backprop", "bp",
                                       f"no feedback version; parameters {params} trained by backprop"))
        else:
            _walk(child, full, map_, records, found, unsupported)


def convert(
    model: nn.Module,
    rule: str | FeedbackRule = "fa",
    *,
    feedback_init: str = "kaiming_uniform",
    feedback_scale: float = 1.0,
    seed: int = 0,
    output_signal: str = "rule",
    output_layer: str | None = None,
    output_features: int | None = None,
    unsupported: str = "error",
    layer_map: dict[type[nn.Module], type[FeedbackLayer]] | None = None,
    inplace: bool = False,
    **rule_options: Any,
) -> nn.Module:
    """Convert every Linear/Conv layer of ``model`` to ``rule``; returns the converted model.

    Args:
        model: any ``nn.Module`` (nested, ``Sequential``, residual, ...).
        rule: a name from :func:`falign.available_rules` or a rule instance.
        feedback_init, feedback_scale: distribution and scale of feedback matrices
            (:class:`~falign.rules.FeedbackInit`).
        seed: every feedback matrix is reproducible from it (layer ``i`` uses ``mix_seed(seed, i)``).
        output_signal: ``"rule"`` (default) or ``"backprop"``: whether the output layer's *input
            signal* uses the rule or ``g W``. Its weight gradient is always the true local one.
        output_layer: name of the output layer (default: the last converted layer in module order).
        output_features: ``n_out`` for ``dfa`` (default: ``out_features`` of the last ``nn.Linear``).
        unsupported: ``"error"`` (default) or ``"backprop"`` for parameterised layers with no
            feedback version.
        layer_map: extra ``{type: converted type}`` entries, e.g. for a user's ``nn.Linear`` subclass.
        inplace: modify ``model`` itself instead of a deep copy.
        **rule_options: options of the rule's constructor (e.g. ``wm``'s mirror ``lr``).

    Returns:
        The converted model (``model`` itself when ``inplace``). Weights are unchanged.

    Example::

        >>> net = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))
        >>> fa_net = falign.convert(net, "fa", seed=0)
        >>> print(falign.conversion_report(fa_net))
    """
    rule_obj = get_rule(rule, **rule_options)
    if output_signal not in ("rule", "backprop"):
        raise ValueError(f"output_signal must be 'rule' or 'backprop', got {output_signal!r}")
    if unsupported not in ("error", "backprop"):
        raise ValueError(f"unsupported must be 'error' or 'backprop', got {unsupported!r}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"convert expects an nn.Module, got {type(model).__name__}")
    map_ = {**LAYER_MAP, **(layer_map or {})}
    if not inplace:
        model = copy.deepcopy(model)
    if type(model) in map_:
        raise ConversionError("convert a model that contains the layer (e.g. nn.Sequential(layer)), "
                              "not a bare layer; or use FALinear.from_module")

    records: list[LayerRecord] = []
    found: list[tuple[nn.Module, str, str, nn.Module]] = []
    _walk(model, "", map_, records, found, unsupported)
    if not found:
        raise ConversionError(f"{type(model).__name__} contains no layer falign can convert "
                              f"(types: {', '.join(t.__name__ for t in map_)})")
    names = [full for _, _, full, _ in found]
    if output_layer is None:
        output_layer = names[-1]
    elif output_layer not in names:
        raise ValueError(f"output_layer {output_layer!r} is not a convertible layer; candidates: {names}")

    tap = None
    if rule_obj.name == "dfa":
        if output_features is None:
            linears = [c for *_, c in found if isinstance(c, nn.Linear)]
            if not linears:
                raise ValueError("dfa needs the model's output size: pass output_features= (the model has "
                                 "no nn.Linear to read it from)")
            output_features = linears[-1].out_features
        tap = ErrorTap()

    for index, (parent, attr, full, child) in enumerate(found):
        layer_rule = rule_obj
        note = ""
        if full == output_layer and output_signal == "backprop":
            layer_rule, note = get_rule("bp"), "output layer: input signal by backprop"
        elif full == output_layer:
            note = "output layer"
        target = type(child) if isinstance(child, FeedbackLayer) else map_[type(child)]
        new = target.from_module(
            child, rule=layer_rule, feedback_init=feedback_init, feedback_scale=feedback_scale,
            seed=mix_seed(seed, index), output_features=output_features if layer_rule.name == "dfa" else None,
            error_tap=tap if layer_rule.name == "dfa" else None,
        )
        setattr(parent, attr, new)
        records.append(LayerRecord(full, type(child).__name__, "converted", layer_rule.name, note))

    for key, hook in list(model._forward_hooks.items()):  # a re-converted dfa model drops its old tap
        if isinstance(hook, _ErrorTapHook):
            del model._forward_hooks[key]
    order = {name: i for i, (name, *_) in enumerate(model.named_modules())}
    records.sort(key=lambda r: order.get(r.name, len(order)))
    model.falign_report = ConversionReport(rule_obj.name, output_layer, records)
    if tap is not None:
        install_error_tap(model, tap, output_features)
    return model


class _ErrorTapHook:
    """Forward hook on the model's root: passes the output through the DFA error tap."""

    def __init__(self, tap: ErrorTap, output_features: int | None) -> None:
        self.tap = tap
        self.output_features = output_features

    def __call__(self, module: nn.Module, inputs: Any, output: Any) -> Tensor:
        if not isinstance(output, Tensor):
            raise TypeError(f"dfa needs the model to return one tensor, got {type(output).__name__}")
        n = self.output_features
        if n is not None and output.dim() > 0 and output.shape[-1] != n and output[0].numel() != n:
            raise ValueError(f"dfa: the model's output has shape {tuple(output.shape)} but the feedback "
                             f"matrices were built for {n} output features; pass output_features= to convert")
        return self.tap.attach(output)


def install_error_tap(model: nn.Module, tap: ErrorTap | None = None, output_features: int | None = None) -> ErrorTap:
    """Attach a DFA :class:`~falign.functional.ErrorTap` to ``model``'s output and its dfa layers.

    :func:`convert` does this; call it yourself for a model assembled from ``FALinear(rule='dfa')``.
    """
    tap = tap or ErrorTap()
    for layer in feedback_layers(model):
        if layer.rule.name == "dfa":
            layer.error_tap = tap
    model.register_forward_hook(_ErrorTapHook(tap, output_features))
    return tap


def feedback_layers(model: nn.Module) -> list[FeedbackLayer]:
    """Every converted layer of ``model``, in module order."""
    return [m for m in model.modules() if isinstance(m, FeedbackLayer)]


def conversion_report(model: nn.Module) -> ConversionReport:
    """What :func:`convert` did to ``model``: converted layers, rules, what stayed on backprop.

    Example::

        >>> report = falign.conversion_report(model)
        >>> report.converted, report.left_on_backprop
    """
    report = getattr(model, "falign_report", None)
    if not isinstance(report, ConversionReport):
        raise ValueError("this model was not produced by falign.convert")
    return report

