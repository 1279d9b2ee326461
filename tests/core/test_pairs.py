"""Conservation-law pairs follow the graph, not the order of execution."""

from __future__ import annotations

import torch
from torch import nn

import falign
from falign.diagnostics import conservation_assumptions, find_pairs


# ---- pairs follow the graph, not the order of execution ----------------------------------------------
class Branches(nn.Module):
    """q and k run one after the other on the same input: not a pair. A residual block: not a pair either."""

    def __init__(self) -> None:
        super().__init__()
        self.q, self.k = nn.Linear(4, 4), nn.Linear(4, 4)
        self.inner, self.outer = nn.Linear(4, 4), nn.Linear(4, 4)
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        h = torch.relu(self.q(x)) * torch.relu(self.k(x))
        h = h + self.outer(torch.relu(self.inner(h)))
        return self.head(torch.relu(h))


def test_find_pairs_pairs_only_layers_joined_by_an_elementwise_path():
    model = falign.convert(Branches(), "fa")
    reasons: dict[str, str] = {}
    pairs = find_pairs(model, torch.randn(2, 4), not_applicable=reasons)
    assert [p.key for p in pairs] == ["inner->outer"]
    assert "a Mul operation joins it" in reasons["inner"]  # q and k meet in a product
    assert "an Add operation" in reasons["head"]  # the residual addition
    assert "input is not produced" in reasons["q"]
    assumptions = conservation_assumptions(pairs, "fa", not_applicable=reasons)
    assert set(assumptions["pairs"]) == {"inner->outer"} and "k" in assumptions["not_applicable"]


def test_find_pairs_refuses_a_layer_whose_output_also_feeds_a_skip():
    class Skip(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 4)

        def forward(self, x):
            h = torch.relu(self.a(x))
            return self.b(h) + h

    reasons: dict[str, str] = {}
    assert find_pairs(falign.convert(Skip(), "fa"), torch.randn(2, 4), not_applicable=reasons) == []
    assert "also used elsewhere" in reasons["b"]
