"""nn.Embedding under every rule: kept as it is (its input is indices, its gradient already local), named so
in the report, and weight tying with the output layer kept with both gradient contributions."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import falign
from tests.conftest import with_target

RULES = falign.available_rules()


class TinyLM(nn.Module):
    """Embedding → Linear → ReLU → output Linear, optionally tied to the embedding."""

    def __init__(self, vocab: int = 11, dim: int = 6, tie: bool = True) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.hidden = nn.Linear(dim, dim)
        self.out = nn.Linear(dim, vocab, bias=False)
        if tie:
            self.out.weight = self.emb.weight

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.out(torch.relu(self.hidden(self.emb(idx))))


@pytest.mark.parametrize("rule", RULES)
def test_embedding_converts_as_is_and_is_named(rule):
    torch.manual_seed(0)
    model = falign.convert(TinyLM(tie=False), rule, seed=0)
    assert type(model.emb) is nn.Embedding
    record = next(r for r in falign.conversion_report(model).layers if r.name == "emb")
    assert record.status == "kept-backprop" and "indices" in record.note
    idx = torch.randint(0, 11, (5,))
    loss = nn.functional.cross_entropy(with_target(model, idx, idx), idx)
    loss.backward()
    assert model.emb.weight.grad is not None and torch.isfinite(model.emb.weight.grad).all()


@pytest.mark.parametrize("rule", RULES)
def test_tied_weight_gets_both_gradients(rule):
    """The tied Parameter's gradient is the output layer's local gradient gᵀh plus the signal that reaches the
    embedding's output, added to the rows looked up — each captured from the run itself."""
    torch.manual_seed(0)
    model = falign.convert(TinyLM(tie=True), rule, seed=0)
    assert model.out.weight is model.emb.weight
    notes = {r.name: r.note for r in falign.conversion_report(model).layers}
    assert "tied to out.weight" in notes["emb"] and "tied to emb.weight" in notes["out"]
    idx = torch.randint(0, 11, (7,))
    captured = {}

    def keep(name):
        def hook(module, inputs, output):
            captured[f"{name} input"] = inputs[0].detach()
            output.register_hook(lambda g: captured.__setitem__(name, g))
        return hook

    model.emb.register_forward_hook(keep("emb"))
    model.out.register_forward_hook(keep("out"))
    loss = nn.functional.cross_entropy(with_target(model, idx, idx), idx)
    loss.backward()
    expected = captured["out"].T @ captured["out input"]  # the output layer's local weight gradient
    expected = expected.index_add(0, idx, captured["emb"])  # plus the embedding's rows
    torch.testing.assert_close(model.emb.weight.grad, expected, rtol=1e-5, atol=1e-6)
    assert captured["emb"].abs().sum() > 0 or not falign.get_rule(rule).has_feedback


def test_tied_weight_is_one_parameter_for_the_optimiser():
    model = falign.convert(TinyLM(tie=True), "fa", seed=0)
    params = list(model.parameters())
    assert sum(p is model.emb.weight for p in params) == 1


def test_diagnostics_run_on_an_embedding_model():
    torch.manual_seed(0)
    model = falign.convert(TinyLM(tie=True), "fa", seed=0)
    rec = falign.diagnostics.DiagnosticsRecorder(model)
    idx = torch.randint(0, 11, (9,))

    def loss_and_output():
        out = model(idx)
        return nn.functional.cross_entropy(out, idx), out

    _, _, record = rec.step(loss_and_output, idx)
    assert set(record["gradient_alignment"]) == {"hidden", "out"}
    assert record["decomposition"]["output"] > 0  # the output layer is found through the tie
