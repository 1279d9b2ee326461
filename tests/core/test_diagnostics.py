"""Diagnostics against analytic cases, explicit computations and the conservation law's predictions."""

from __future__ import annotations

import copy
import itertools
import json
import math

import pytest
import torch
from torch import nn

import falign
from falign.app.experiments.flow import sgd_flow
from falign.data import load_digits
from falign.diagnostics import (
    DiagnosticsRecorder,
    angle,
    backprop_gradients,
    conservation_assumptions,
    find_pairs,
    gradient_alignment,
    loss_decomposition,
    weight_alignment,
)
from falign.functional import backprop_mode
from tests.conftest import with_target

DT = torch.float64


# ---- angles -----------------------------------------------------------------------------------
def test_angle_analytic_cases():
    a = torch.tensor([1.0, 2.0, -3.0])
    assert angle(a, a) == pytest.approx(0.0, abs=1e-6)
    assert angle(a, -a) == pytest.approx(180.0)
    assert angle(torch.tensor([1.0, 0.0]), torch.tensor([0.0, 5.0])) == pytest.approx(90.0)
    b = torch.tensor([0.5, -1.0, 4.0])
    assert angle(3.0 * a, 0.01 * b) == pytest.approx(angle(a, b))
    assert angle(a.reshape(3, 1), b) == pytest.approx(angle(a, b))
    assert math.isnan(angle(torch.zeros(3), a)) and math.isnan(angle(a, torch.zeros(3)))
    with pytest.raises(ValueError, match="same number of elements"):
        angle(torch.ones(2), torch.ones(3))


def mlp(act=nn.ReLU, widths=(64, 24, 24, 10), seed=1) -> nn.Sequential:
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(itertools.pairwise(widths)):
        layers.append(nn.Linear(a, b))
        if i < len(widths) - 2:
            layers.append(act())
    return nn.Sequential(*layers).to(DT)


@pytest.fixture(scope="module")
def digits():
    ds = load_digits()
    return ds.x_train[:256].to(DT), ds.y_train[:256]


# ---- alignment -----------------------------------------------------------------------------------
@pytest.mark.parametrize("rule", [r for r in falign.available_rules() if falign.get_rule(r).has_feedback])
def test_gradient_alignment_equals_explicit_computation(rule, digits):
    x, y = digits[0].flatten(1), digits[1]
    plain = mlp()
    model = falign.convert(plain, rule, seed=4)
    loss = nn.functional.cross_entropy(with_target(model, x, y), y)
    loss.backward(retain_graph=True)
    params = {n: p for n, p in model.named_parameters() if "feedback" not in n}
    true = backprop_gradients(loss, params)
    # explicit: plain autograd on an unconverted copy with the same weights
    reference = copy.deepcopy(plain)
    nn.functional.cross_entropy(reference(x), y).backward()
    for name, p in reference.named_parameters():
        torch.testing.assert_close(true[name], p.grad)
    rule_grads = {str(i): model[i].weight.grad for i in (0, 2, 4)}
    true_grads = {str(i): reference[i].weight.grad for i in (0, 2, 4)}
    got = gradient_alignment(rule_grads, true_grads)
    for key in got:
        a, b = rule_grads[key].flatten(), true_grads[key].flatten()
        explicit = math.degrees(math.acos(max(-1.0, min(1.0, float(a @ b / (a.norm() * b.norm()))))))
        assert got[key] == pytest.approx(explicit, abs=1e-6)
    assert got["4"] == pytest.approx(0.0, abs=1e-5)  # the output layer's gradient is the true one
    assert got["0"] > 1.0  # hidden layers are not aligned at initialisation


def test_backprop_mode_leaves_rule_state_alone():
    model = falign.convert(mlp(), "brsf", seed=0)
    x, y = torch.randn(8, 64, dtype=DT), torch.randint(0, 10, (8,))
    loss = nn.functional.cross_entropy(model(x), y)
    loss.backward(retain_graph=True)
    before = [l.feedback_weight.clone() for l in falign.feedback_layers(model)]
    with backprop_mode():
        torch.autograd.grad(loss, list(model.parameters())[:1], retain_graph=True)
    assert [l.rule_state["step"] for l in falign.feedback_layers(model)] == [0, 0, 0]  # draws follow steps
    for layer, b in zip(falign.feedback_layers(model), before):
        assert torch.equal(layer.feedback_weight, b)


def test_weight_alignment_only_for_used_feedback():
    model = falign.convert(mlp(), "fa", seed=0)
    assert weight_alignment(model) == {}  # no forward pass yet: no feedback has been used
    model(torch.randn(2, 64, dtype=DT, requires_grad=False)).sum().backward()
    wa = weight_alignment(model)
    assert set(wa) == {"2", "4"}  # layer 0's input is data: its B is never used
    for name, v in wa.items():
        layer = model[int(name)]
        assert v["angle"] == pytest.approx(angle(layer.weight, layer.feedback_weight))
        assert v["norm_ratio"] == pytest.approx(float(layer.feedback_weight.norm() / layer.weight.detach().norm()))
    with torch.no_grad():
        model[4].feedback_weight.copy_(-2.0 * model[4].weight)
    assert weight_alignment(model)["4"]["angle"] == pytest.approx(180.0)
    assert weight_alignment(model)["4"]["norm_ratio"] == pytest.approx(2.0)


# ---- conservation --------------------------------------------------------------------------------
def max_drift(result, key="max_drift"):
    return {pair: d[key] for pair, d in result["drift"].items() if key in d}


def run_flow(net_fn, rule, x, y, lr, horizon=10.0, backprop=False):
    model = falign.convert(net_fn(), rule, seed=0)
    return sgd_flow(model, x, y, lr, horizon, backprop=backprop)


def test_conservation_mlp_fa_drift_halves_with_learning_rate(digits):
    x, y = digits[0].flatten(1), digits[1]
    big, small = (run_flow(mlp, "fa", x, y, lr) for lr in (0.1, 0.05))
    assert small["final_loss"] < 1.5  # it really trained (from 2.3)
    for pair in ("0->2", "2->4"):
        ratio = small["drift"][pair]["max_drift"] / big["drift"][pair]["max_drift"]
        assert 0.4 < ratio < 0.6, (pair, ratio)
        assert small["drift"][pair]["relative"] < 1e-2
        # the balancedness of backprop is *not* what FA conserves
        assert small["drift"][pair]["balanced_max_drift"] > 10 * small["drift"][pair]["max_drift"]


def test_conservation_conv_per_channel(digits):
    x, y = digits

    def cnn():
        torch.manual_seed(2)
        return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 6, 3, padding=1), nn.ReLU(),
                             nn.MaxPool2d(2), nn.Flatten(), nn.Linear(6 * 16, 10)).to(DT)

    big, small = (run_flow(cnn, "fa", x, y, lr, horizon=10.0) for lr in (0.2, 0.1))
    assert small["final_loss"] < 2.0  # it really trained (from 2.3)
    assert set(small["drift"]) == {"0->2", "2->6"}  # conv->conv per channel, conv->(pool, flatten)->linear
    for pair in small["drift"]:
        ratio = small["drift"][pair]["max_drift"] / big["drift"][pair]["max_drift"]
        assert 0.4 < ratio < 0.6, (pair, ratio)
        assert small["drift"][pair]["relative"] < 1e-2


def test_conservation_under_backprop_balancedness_holds_fa_quantity_drifts(digits):
    x, y = digits[0].flatten(1), digits[1]
    big, small = (run_flow(mlp, "fa", x, y, lr, backprop=True) for lr in (0.1, 0.05))
    for pair in ("0->2", "2->4"):
        bal_ratio = small["drift"][pair]["balanced_max_drift"] / big["drift"][pair]["balanced_max_drift"]
        assert 0.4 < bal_ratio < 0.6
        assert small["drift"][pair]["balanced_relative"] < 1e-2
        fa_ratio = small["drift"][pair]["max_drift"] / big["drift"][pair]["max_drift"]
        assert fa_ratio > 0.9  # does not shrink with the rate: not conserved by backprop
        assert small["drift"][pair]["relative"] > 0.05


def test_conservation_fails_with_tanh(digits):
    x, y = digits[0].flatten(1), digits[1]
    big, small = (run_flow(lambda: mlp(nn.Tanh), "fa", x, y, lr) for lr in (0.1, 0.05))
    for pair in ("0->2", "2->4"):
        ratio = small["drift"][pair]["max_drift"] / big["drift"][pair]["max_drift"]
        assert ratio > 0.8, ratio  # halving the rate does not halve the drift


def test_conservation_dfa_last_hidden_layer_only(digits):
    x, y = digits[0].flatten(1), digits[1]
    big, small = (run_flow(mlp, "dfa", x, y, lr) for lr in (0.1, 0.05))
    assert "max_drift" not in small["drift"]["0->2"]  # D_2 is not of W_2's shape: no law there
    ratio = small["drift"]["2->4"]["max_drift"] / big["drift"]["2->4"]["max_drift"]
    assert 0.4 < ratio < 0.6


def test_assumptions_are_reported():
    model = falign.convert(mlp(nn.Tanh), "fa")
    pairs = find_pairs(model, torch.randn(2, 64, dtype=DT))
    a = conservation_assumptions(pairs, "fa", momentum=0.9)
    assert not a["holds"] and "momentum 0.9" in a["run_reasons"]
    assert any("not positively homogeneous (Tanh)" in r for r in a["pairs"]["0->2"]["reasons"])
    ok = conservation_assumptions(find_pairs(falign.convert(mlp(), "fa"), torch.randn(2, 64, dtype=DT)), "fa")
    assert ok["holds"]
    assert not conservation_assumptions(pairs, "kp")["holds"]


# ---- loss decomposition ---------------------------------------------------------------------------
@pytest.mark.parametrize("rule", falign.available_rules())
def test_decomposition_predicts_one_step_loss_change(rule, digits):
    x, y = digits[0].flatten(1), digits[1]
    model = falign.convert(mlp(), rule, seed=3)
    rec = DiagnosticsRecorder(model)
    _, _, record = rec.step(lambda: (nn.functional.cross_entropy(out := with_target(model, x, y), y), out), x)
    lr = 1e-4
    before = record["loss"]
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "feedback" not in n:
                p.sub_(lr * p.grad)
        after = float(nn.functional.cross_entropy(with_target(model, x, y), y))
    predicted = -lr * record["decomposition"]["sum"]
    assert abs((after - before) - predicted) / abs(after - before) < 0.01
    d = record["decomposition"]
    assert d["output"] > 0 and d["rho"] == pytest.approx(d["hidden"] / d["output"])


def test_decomposition_dominance_logic():
    g = {"a.weight": torch.tensor([1.0, 0.0]), "b.weight": torch.tensor([2.0])}
    true = {"a.weight": torch.tensor([-1.0, 0.0]), "b.weight": torch.tensor([1.0])}
    groups = {"a": ["a.weight"], "b": ["b.weight"]}
    d = loss_decomposition(g, true, groups, "b", margin=0.5)
    assert d["terms"] == {"a": -1.0, "b": 2.0} and d["rho"] == -0.5 and d["dominance"] is True
    d = loss_decomposition(g, true, groups, "b", margin=0.6)
    assert d["dominance"] is False
    zero = {"a.weight": torch.zeros(2), "b.weight": torch.zeros(1)}
    assert math.isnan(loss_decomposition(zero, zero, groups, "b")["rho"])
    with pytest.raises(ValueError, match="margin"):
        loss_decomposition(g, true, groups, "b", margin=0.0)


# ---- recorder in training, plots -----------------------------------------------------------------
def test_training_with_diagnostics_writes_rows_and_plots(tmp_path):
    from falign.app.report.plots import plot_run
    from falign.app.train import TrainConfig, read_metrics, train

    out = tmp_path / "run"
    cfg = TrainConfig(rule="fa", epochs=2, hidden=(32, 32), momentum=0.0, diagnostics_every=10)
    summary = train(cfg, out, progress=False)
    rows = read_metrics(out / "metrics.jsonl")
    diag = [r for r in rows if r["event"] == "diagnostics"]
    steps = summary["steps"]
    assert [r["step"] for r in diag] == list(range(0, steps, 10))
    assert set(diag[-1]["gradient_alignment"]) == {"fc1", "fc2", "fc3"}
    assert set(diag[-1]["conservation"]) == {"fc1->fc2", "fc2->fc3"}
    assert diag[0]["conservation"]["fc1->fc2"]["max_drift"] == 0.0
    json.dumps(diag)  # valid JSON (no NaN)
    assumptions = summary["conservation_assumptions"]
    assert assumptions["holds"] is True and assumptions["pairs"]["fc1->fc2"]["between"] == ["Relu"]
    paths = plot_run(out)
    assert [p.name for p in paths] == ["scale.png", "alignment.png", "conservation.png", "decomposition.png"]
    assert all(p.stat().st_size > 10_000 for p in paths)


def test_diagnostics_do_not_change_training(tmp_path):
    from falign.app.train import TrainConfig, load_checkpoint, train

    for rule in falign.available_rules():
        base = TrainConfig(rule=rule, epochs=1, hidden=(16,))
        train(base, tmp_path / f"a{rule}", progress=False)
        train(base.replace(diagnostics_every=3), tmp_path / f"b{rule}", progress=False)
        a = load_checkpoint(tmp_path / f"a{rule}" / "checkpoint.pt")["model"]
        b = load_checkpoint(tmp_path / f"b{rule}" / "checkpoint.pt")["model"]
        for k in a:
            assert torch.equal(a[k], b[k]), k


def test_cli_plot_without_diagnostics_is_clear(tmp_path, capsys):
    from falign.app.cli import main

    assert main(["train", "--out", str(tmp_path / "r"), "--epochs", "1", "--no-progress"]) == 0
    assert main(["plot", str(tmp_path / "r")]) == 0  # the scale records are always there: scale.png alone
    assert "train with --diagnostics-every K for alignment" in capsys.readouterr().err
    assert sorted(p.name for p in (tmp_path / "r" / "plots").glob("*.png")) == ["scale.png"]
    assert main(["train", "--out", str(tmp_path / "s"), "--epochs", "1", "--no-progress", "--scale-every", "0"]) == 0
    assert main(["plot", str(tmp_path / "s")]) == 1
    assert "no diagnostics rows: train with --diagnostics-every" in capsys.readouterr().err


def test_tensorboard_events_when_installed(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from falign.app.train import TrainConfig, train

    train(TrainConfig(epochs=1, hidden=(16,), diagnostics_every=20), tmp_path, progress=False)
    acc = EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    tags = acc.Tags()["scalars"]
    assert "epoch/test_acc" in tags and "gradient_alignment/fc1" in tags and "decomposition/fc2" in tags
