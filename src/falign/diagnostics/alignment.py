"""Alignment between a rule and backprop: weights vs feedback, rule gradients vs true gradients,
error signals vs backprop's error signals (Robertson & Koyejo, ICML 2024, §3)."""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import Tensor, nn

from falign.diagnostics.angles import angle, inner
from falign.functional import backprop_mode
from falign.nn.layers import FeedbackLayer


def named_feedback_layers(model: nn.Module) -> dict[str, FeedbackLayer]:
    return {name: m for name, m in model.named_modules() if isinstance(m, FeedbackLayer)}


def weight_alignment(model: nn.Module) -> dict[str, dict[str, float]]:
    """Per converted layer whose feedback is used (``layer.feedback_used``) and has W's shape:
    ``{"angle": angle(W_l, B_l) in degrees, "norm_ratio": ‖B_l‖ / ‖W_l‖}``, with ``B_l`` the matrix the
    backward uses at the current weights (``layer.current_feedback()``).

    Layers whose input never needs a signal (the first layer on data), ``bp`` layers, and DFA
    matrices of another shape than W are left out: there is no ``B`` to align.
    """
    out: dict[str, dict[str, float]] = {}
    for name, layer in named_feedback_layers(model).items():
        if not layer.feedback_used:
            continue
        b = layer.current_feedback()
        if b is None or b.shape != layer.weight.shape:
            continue
        w = layer.weight.detach()
        ww, bb = float(inner(w, w)), float(inner(b, b))
        ratio = math.sqrt(bb / ww) if ww > 0 else math.nan
        out[name] = {"angle": angle(w, b), "norm_ratio": ratio}
    return out


def backprop_gradients(loss: Tensor, params: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """True gradients ``∇_θ L`` at the weights and batch that produced ``loss``.

    One extra vector-Jacobian product through the *same* graph with every feedback function in
    :func:`~falign.functional.backprop_mode`: call ``loss.backward(retain_graph=True)`` first for the
    rule's gradients, then this. No second forward pass and no copy of the model.
    """
    names = list(params)
    with backprop_mode():
        grads = torch.autograd.grad(loss, [params[n] for n in names], retain_graph=True, allow_unused=True)
    return {n: (torch.zeros_like(params[n]) if g is None else g) for n, g in zip(names, grads)}


def gradient_alignment(rule_grads: Mapping[str, Tensor], true_grads: Mapping[str, Tensor]) -> dict[str, float]:
    """``angle(G_l, ∇_{W_l} L)`` per entry: the rule's weight gradient (the direction its update
    follows) against the true gradient at the same weights and batch. Keys present in both."""
    return {k: angle(rule_grads[k], true_grads[k]) for k in rule_grads if k in true_grads}


def error_signal_alignment(rule_signals: Mapping[str, Tensor], true_signals: Mapping[str, Tensor]) -> dict[str, float]:
    """``angle(δ_l^rule, δ_l^bp)`` over the whole batch, with ``δ_l = ∂L/∂(layer output)`` (shape
    ``(N, *)``) as the rule and backprop deliver it. A layer whose signal is all zero (e.g. every unit
    inactive) is undefined (``nan``), not aligned."""
    return {k: angle(rule_signals[k], true_signals[k]) for k in rule_signals if k in true_signals}
