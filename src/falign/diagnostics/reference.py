"""Is the backprop reference worth comparing against? Reference validity and the effective rank of error signals.

*Reference validity.* An alignment angle compares the rule's update with backprop's gradient ``∇_W L``. Where
that gradient is (nearly) zero — e.g. a layer whose contribution a terminal LayerNorm removes — the float32
value is rounding noise and its angle to anything is meaningless. :func:`choose_reference` compares the float32
reference ``g₃₂`` with the same gradient computed by a float64 copy of the model, ``g₆₄``: with
``e = ‖g₃₂ − g₆₄‖ / ‖g₆₄‖`` the float32 reference is used when ``e ≤ tol`` (1%); otherwise the float64 one,
when its own error, estimated as ``e · ε₆₄/ε₃₂`` (rounding errors scale with the unit roundoff), is ``≤ tol``;
otherwise the reference is *undefined* and the angle is reported as ``nan``, never as a number (Hao, Wan & Zhai,
arXiv 2606.21126: a reference gradient at the numerical floor).

*Effective rank* (Roy & Vetterli, 2007) of a layer's error signal ``δ`` of shape ``(N, *)`` flattened to
``(N, d)``: ``exp(H(p))`` with ``p_i = σ_i / Σ σ_j`` the normalised singular values and ``H`` the Shannon entropy;
1 for a rank-one signal, ``min(N, d)`` for one with equal singular values. Boeshertz, Pascanu & Clopath (arXiv
2606.11123) trace FA's failure to scale to the collapse of this rank.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

TOL = 1e-2
EPS32 = float(torch.finfo(torch.float32).eps)
EPS64 = float(torch.finfo(torch.float64).eps)


def choose_reference(g32: Tensor, g64: Tensor, tol: float = TOL) -> tuple[Tensor, dict[str, Any]]:
    """The reference gradient to measure angles against, and what was found.

    Returns ``(reference, info)``: ``reference`` is ``g32``, ``g64`` or a zero tensor (undefined: every angle to
    it is ``nan``); ``info = {"norm": ‖g₆₄‖, "float32_error": e, "used": "float32" | "float64" | "undefined"}``.
    Shapes: ``g32`` and ``g64`` alike.
    """
    a, b = g32.detach().double(), g64.detach().double()
    norm = float(torch.linalg.vector_norm(b))
    diff = float(torch.linalg.vector_norm(a - b))
    err = diff / norm if norm > 0 else (0.0 if diff == 0 else math.inf)
    if norm == 0 and diff == 0:
        used = "undefined"  # exactly zero in both precisions: no direction to compare with
    elif err <= tol:
        used = "float32"
    elif err * EPS64 / EPS32 <= tol:
        used = "float64"
    else:
        used = "undefined"
    ref = {"float32": g32, "float64": g64}.get(used, torch.zeros_like(g32))
    return ref, {"norm": norm, "float32_error": err if math.isfinite(err) else None, "used": used}


def effective_rank(signal: Tensor) -> float:
    """``exp(H(σ/Σσ))`` of ``signal`` flattened to ``(N, d)``; ``nan`` for an all-zero or non-finite signal."""
    s0 = signal.detach()
    if s0.numel() == 0:  # an empty batch (e.g. a rank's share of a short last batch) has no signal
        return math.nan
    m = (s0[:, None] if s0.dim() == 1 else s0.reshape(s0.shape[0], -1)).double()
    if not bool(torch.isfinite(m).all()):
        return math.nan
    s = torch.linalg.svdvals(m)
    total = float(s.sum())
    if total == 0:
        return math.nan
    p = s / total
    p = p[p > 0]
    return float(torch.exp(-(p * p.log()).sum()))
