"""Angles between tensors."""

from __future__ import annotations

import math

import torch
from torch import Tensor


def inner(a: Tensor, b: Tensor, dim: int | tuple[int, ...] | None = None) -> Tensor:
    """``Σ a·b``, over all elements (``dim=None``) or over ``dim``, returned in float64.

    Float64 operands are summed in float64. Lower precisions avoid float64 copies of large tensors:
    a full sum is one BLAS dot in float32 (relative error ~1e-6, and two identical operands give
    bit-identical norms, so an angle of a tensor with itself is exactly 0); a sum over ``dim`` (per
    unit) forms the products in float32 and accumulates them in float64.
    """
    a, b = a.detach(), b.detach()
    if dim is None:
        a, b = a.reshape(-1), b.reshape(-1)
        if a.dtype != torch.float64:
            a, b = a.float(), b.float()
        return torch.dot(a, b).double()
    return (a * b).sum(dim, dtype=torch.float64)


def angle_from_inner(ab: float, aa: float, bb: float) -> float:
    """The angle in degrees from ``⟨a,b⟩, ‖a‖², ‖b‖²``; ``nan`` if a norm is zero."""
    denom = math.sqrt(aa) * math.sqrt(bb)
    if denom == 0.0 or not math.isfinite(denom):
        return math.nan
    return math.degrees(math.acos(max(-1.0, min(1.0, ab / denom))))


def angle(a: Tensor, b: Tensor) -> float:
    """``arccos(⟨a, b⟩ / (‖a‖ ‖b‖))`` in degrees, on the flattened tensors, accumulated in float64.

    Returns ``nan`` (undefined) when either operand has zero norm: a zero update is never reported
    as "aligned". Invariant to positive scaling of either operand; ``angle(a, -a) = 180``.

    Shape: ``a`` and ``b`` must have the same number of elements.
    """
    if a.numel() != b.numel():
        raise ValueError(f"angle needs operands with the same number of elements, got {a.numel()} and {b.numel()}")
    a, b = a.reshape(-1), b.reshape(-1)
    return angle_from_inner(float(inner(a, b)), float(inner(a, a)), float(inner(b, b)))
