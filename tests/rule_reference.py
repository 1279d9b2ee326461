"""The reference table of the tests: every registered rule's defining formula, written out from its
publication with plain tensors (never through falign's code path).

Each entry says, for a converted layer ``L`` whose input receives the signal:

- ``matrix(L)``: the rules whose signal travels layer by layer send ``g·B`` (Linear) or the transposed
  convolution of ``g`` with ``B`` (conv); this is ``B``.
- ``projected(e, t)``: the direct rules send ``q·D_L`` with ``q`` this function of the output error ``e``
  and the one-hot target ``t`` (both ``(N, n_out)``).
- ``exact(L, is_output_layer)``: set the stored feedback so that the rule computes backprop's signal
  (``B = W``), where the rule allows it; ``None`` where it cannot (the signal is not a function of W).
- ``feedback_grad(L, g, x, e)``: the gradient the stored feedback receives (``None``: it receives none).
- ``seeded``: the initial feedback is drawn from the seed (``usf``'s is a constant).
- ``train``: ``TrainConfig`` settings the rule's publication trains with, where the default MLP recipe
  (ReLU, SGD with momentum) does not suit it (used by the accuracy check).

A registered rule without an entry here fails ``test_rule_triad.py::test_every_rule_has_a_reference``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor


@dataclass(frozen=True)
class Reference:
    matrix: Callable[[object], Tensor] | None = None
    projected: Callable[[Tensor, Tensor], Tensor] | None = None
    exact: Callable[[object, bool], bool] | None = None
    feedback_grad: Callable[[object, Tensor, Tensor, Tensor], Tensor | None] = lambda L, g, x, e: None
    seeded: bool = True
    train: dict = field(default_factory=dict)


def _w(L) -> Tensor:
    return L.weight.detach()


def _m(L) -> Tensor:
    return L.feedback_weight.detach()


def _copy(L, value: Tensor) -> bool:
    with torch.no_grad():
        L.feedback_weight.copy_(value)
    return True


def _local_grad(L, g: Tensor, x: Tensor, e: Tensor) -> Tensor:
    """``gᵀx`` of a Linear layer (what W itself receives)."""
    return g.reshape(-1, g.shape[-1]).T @ x.reshape(-1, x.shape[-1])


def _usf_matrix(L) -> Tensor:
    s = L.feedback_init.std(tuple(_w(L).shape))
    assert torch.all(_m(L) == s), "usf: every magnitude is the init's standard deviation"
    return s * torch.sign(_w(L))


def _random_sign_matrix(L) -> Tensor:
    assert torch.all(_m(L) >= 0), "magnitudes are non-negative"
    return _m(L) * torch.sign(_w(L))


REFERENCE: dict[str, Reference] = {
    # backprop: B = W (Rumelhart et al. 1986)
    "bp": Reference(matrix=_w, exact=lambda L, out: True, seeded=False),
    # feedback alignment: fixed random B (Lillicrap et al. 2016)
    "fa": Reference(matrix=_m, exact=lambda L, out: _copy(L, _w(L))),
    # sign-concordant feedback (Liao, Leibo & Poggio 2016): s·sign(W), |R|⊙sign(W), |R_t|⊙sign(W)
    "usf": Reference(matrix=_usf_matrix, exact=lambda L, out: _copy(L, _w(L).abs()), seeded=False),
    "frsf": Reference(matrix=_random_sign_matrix, exact=lambda L, out: _copy(L, _w(L).abs())),
    "brsf": Reference(matrix=_random_sign_matrix, exact=lambda L, out: _copy(L, _w(L).abs())),
    # Kolen-Pollack (Akrout et al. 2019): B receives W's gradient
    "kp": Reference(matrix=_m, exact=lambda L, out: _copy(L, _w(L)), feedback_grad=_local_grad),
    # weight mirror (Akrout et al. 2019): B a buffer taught by mirror steps
    "wm": Reference(matrix=_m, exact=lambda L, out: _copy(L, _w(L))),
    # direct feedback alignment (Nøkland 2016): e·D_l; exact for the output layer's input when D = W
    "dfa": Reference(projected=lambda e, t: e, exact=lambda L, out: out and _copy(L, _w(L))),
    # direct Kolen-Pollack (Webster, Choi & Ahn 2021): e·D_l, D_l receives eᵀx_l
    "dkp": Reference(projected=lambda e, t: e, exact=lambda L, out: out and _copy(L, _w(L)),
                     feedback_grad=lambda L, g, x, e: e.T @ x),
    # direct random target projection (Frenkel, Lefebvre & Bol 2021): t·P_l, t the one-hot target (÷ N);
    # no setting of P makes it backprop (the signal does not depend on W or on the error)
    "drtp": Reference(projected=lambda e, t: t / t.shape[0], exact=None, train={"activation": "tanh"}),
}
