"""A model's state carries what its rule needs to continue exactly (issue 26): train k steps, save model and
optimiser with torch.save, load (weights_only=True) into a model converted with another seed and initialisation,
continue — bit-identical to the uninterrupted run, for every registered rule, in a plain loop."""

from __future__ import annotations

import io
import warnings

import pytest
import torch
from torch import nn

import falign
from falign.rules.base import SEED_KEY


def _cnn() -> nn.Module:
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 5))


def _mlp() -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.Tanh(), nn.Linear(16, 5))


class _Sequence(nn.Module):
    """Attention + LSTM + a head on the last step: its layers see (N, T, D) inputs."""

    def __init__(self) -> None:
        super().__init__()
        self.att = nn.MultiheadAttention(8, 2, batch_first=True)
        self.rnn = nn.LSTM(8, 8, batch_first=True)
        self.head = nn.Linear(8, 5)

    def forward(self, x):
        x = x.reshape(x.shape[0], 8, 8)
        h = self.att(x, x, x, need_weights=False)[0]
        return self.head(self.rnn(h)[0][:, -1])


MODELS = {"cnn": _cnn, "mlp": _mlp, "attention+lstm": _Sequence}


def _step(model, opt, x, y):
    opt.zero_grad()
    if falign.uses_target(model):
        falign.set_target(model, y)
    nn.functional.cross_entropy(model(x), y).backward()
    opt.step()


def _resumed_difference(rule: str, arch, drop: tuple[str, ...] = ()) -> float:
    torch.manual_seed(0)
    a = falign.convert(arch(), rule, seed=3)
    opt_a = torch.optim.SGD(a.parameters(), lr=0.05, momentum=0.9)
    falign.attach(a, opt_a)
    g = torch.Generator().manual_seed(1)
    data = [(torch.randn(8, 1, 8, 8, generator=g), torch.randint(0, 5, (8,), generator=g)) for _ in range(6)]
    for x, y in data[:3]:
        _step(a, opt_a, x, y)
    buffer = io.BytesIO()
    state = {k: v for k, v in a.state_dict().items() if not k.endswith(drop)} if drop else a.state_dict()
    torch.save({"model": state, "optimizer": opt_a.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    torch.manual_seed(123)  # another initialisation and another feedback seed
    b = falign.convert(arch(), rule, seed=7)
    b.load_state_dict(saved["model"])
    opt_b = torch.optim.SGD(b.parameters(), lr=0.05, momentum=0.9)
    opt_b.load_state_dict(saved["optimizer"])
    falign.attach(b, opt_b)
    for x, y in data[3:]:
        _step(a, opt_a, x, y)
        _step(b, opt_b, x, y)
    return max(float((p - q).abs().max()) for p, q in zip(a.state_dict().values(), b.state_dict().values())
               if p.dtype.is_floating_point)


CASES = [pytest.param(rule, name, marks=pytest.mark.xfail(
            strict=True, raises=RuntimeError,
            reason="issue 26: a direct rule's mode (per-sample) is not in the state_dict, and a fresh model "
                   "loaded before its first forward pass guesses per-position"))
         if name == "attention+lstm" and falign.get_rule(rule).direct else (rule, name)
         for rule in falign.available_rules() for name in MODELS]


@pytest.mark.parametrize("rule,model", CASES)
def test_resume_from_a_saved_state_is_bit_identical(rule, model):
    assert _resumed_difference(rule, MODELS[model]) == 0.0


@pytest.mark.parametrize("rule", [r for r in falign.available_rules() if falign.get_rule(r).per_step])
def test_a_state_without_the_seed_loads_with_a_warning_and_then_differs(rule):
    """The negative control: an earlier falign's state (no seed key) loads, says what it could not restore, and the
    run then continues with other draws than the saved one."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        difference = _resumed_difference(rule, _cnn, drop=(SEED_KEY,))
    notes = [w for w in caught if SEED_KEY in str(w.message)]
    assert notes and "earlier falign" in str(notes[0].message)
    assert difference > 1e-4
