"""Loss-rate decomposition and alignment dominance (Robertson & Koyejo, ICML 2024, §5).

Under the rule's flow ``Ẇ_l = −G_l`` the loss changes at

    dL/dt = −Σ_l ⟨∇_{W_l} L, G_l⟩.

The output layer's ``G_L`` is its true gradient, so its term ``‖∇_{W_L} L‖²`` is never negative (the
*gradient* component); hidden layers' terms are the *alignment* components and can have either sign.
With ``ρ = Σ_{l<L} ⟨∇_{W_l} L, G_l⟩ / ‖∇_{W_L} L‖²``, alignment dominance with margin ``c`` holds at a
step when ``ρ ≥ −(1 − c)``, which gives ``dL/dt ≤ −c ‖∇_{W_L} L‖²``. Every raw term is returned so any
stricter definition can be computed from the logs.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from torch import Tensor

from falign.diagnostics.angles import inner


def _dot(a: Tensor, b: Tensor) -> float:
    return float(inner(a, b))


def loss_decomposition(rule_grads: Mapping[str, Tensor], true_grads: Mapping[str, Tensor],
                       groups: Mapping[str, Sequence[str]], output: str, margin: float = 0.1) -> dict[str, Any]:
    """Per-group terms ``⟨∇L, G⟩`` summed over the group's parameters, and the dominance test.

    Args:
        rule_grads: parameter name → the rule's gradient ``G``.
        true_grads: parameter name → the true gradient ``∇L``.
        groups: group name (a layer) → its parameter names (weight, bias). Parameters of layers
            without feedback (normalisation) go in a group of their own; they count as alignment terms.
        output: the output layer's group.
        margin: ``c`` in ``(0, 1]``.

    Returns:
        ``{"terms": {group: float}, "output": float, "hidden": float, "sum": float, "rho": float,
        "dominance": bool | None, "margin": c}``; ``-sum`` is the predicted ``dL/dt`` (``-η·sum`` the
        loss change of one SGD step of size η). ``rho`` is undefined (``nan``) when the output
        gradient is zero.
    """
    if not 0 < margin <= 1:
        raise ValueError(f"margin c must be in (0, 1], got {margin}")
    if output not in groups:
        raise KeyError(f"output group {output!r} not among {list(groups)}")
    terms = {g: sum(_dot(true_grads[p], rule_grads[p]) for p in params if p in rule_grads and p in true_grads)
             for g, params in groups.items()}
    out_term = terms[output]
    hidden = sum(v for g, v in terms.items() if g != output)
    rho = hidden / out_term if out_term > 0 else math.nan
    return {
        "terms": terms, "output": out_term, "hidden": hidden, "sum": out_term + hidden,
        "rho": rho, "dominance": None if math.isnan(rho) else bool(rho >= -(1.0 - margin)), "margin": margin,
    }
