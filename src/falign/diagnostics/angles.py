"""Angles between tensors, in float64, accurate near 0° and 180°."""

from __future__ import annotations

import math

import torch
from torch import Tensor


def inner(a: Tensor, b: Tensor, dim: int | tuple[int, ...] | None = None) -> Tensor:
    """``Σ a·b`` over all elements (``dim=None``) or over ``dim``, in float64 (operands converted first)."""
    a, b = a.detach().double(), b.detach().double()
    if dim is None:
        return torch.dot(a.reshape(-1), b.reshape(-1))
    return (a * b).sum(dim)


def angle(a: Tensor, b: Tensor) -> float:
    """The angle ``arccos(⟨a, b⟩ / (‖a‖ ‖b‖))`` in degrees between the flattened tensors.

    Computed as ``2·atan2(‖â − b̂‖, ‖â + b̂‖)`` on the unit vectors ``â = a/‖a‖``, ``b̂ = b/‖b‖`` in float64,
    which stays accurate where ``arccos`` of a rounded cosine does not: ``angle(a, c·a) = 0`` and
    ``angle(a, −c·a) = 180`` for any ``c > 0``. Returns ``nan`` (undefined) when either operand has zero or
    non-finite norm: a zero update is never reported as "aligned".

    Shape: ``a`` and ``b`` must have the same number of elements.
    """
    if a.numel() != b.numel():
        raise ValueError(f"angle needs operands with the same number of elements, got {a.numel()} and {b.numel()}")
    a64, b64 = a.detach().reshape(-1).double(), b.detach().reshape(-1).double()
    na, nb = torch.linalg.vector_norm(a64), torch.linalg.vector_norm(b64)
    if not (math.isfinite(float(na)) and math.isfinite(float(nb))) or float(na) == 0.0 or float(nb) == 0.0:
        return math.nan
    ua, ub = a64 / na, b64 / nb
    return math.degrees(2.0 * math.atan2(float(torch.linalg.vector_norm(ua - ub)),
                                         float(torch.linalg.vector_norm(ua + ub))))
