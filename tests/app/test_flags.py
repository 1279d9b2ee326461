"""Diagnostics that flag a run that is not what it seems: scale runaway, reference validity, effective
rank of error signals, depth utility. Each flag has a case where it must fire and one where it must stay silent."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

import falign
from falign.app.train import TrainConfig, train
from falign.diagnostics import DiagnosticsRecorder
from falign.diagnostics.reference import choose_reference, effective_rank
from falign.diagnostics.scale import find_runaway, logit_scale


# ---- scale runaway: the pure rule ------------------------------------------------------------------------------
def rec(step, scale, loss=1.0, w=1.0):
    return {"step": step, "loss": loss, "logit_scale": scale, "weights": {"a": 1.0, "b": w}}


def test_runaway_fires_with_the_step_it_began_and_stays_silent_on_a_converging_run():
    converging = [rec(s, sc) for s, sc in zip(range(0, 500, 50), (0.1, 1, 3, 8, 12, 15, 16, 16, 17, 17))]
    assert find_runaway(converging, 10) is None
    # above the onset (100) from step 200 on, with one dip back to 50 at 250: the stretch that leads to the flag
    # starts at 300
    run = [rec(s, sc, w=sc) for s, sc in zip(range(0, 500, 50), (0.1, 1, 3, 30, 150, 50, 200, 600, 5e4, 1e9))]
    found = find_runaway(run, 10)
    assert found["began_step"] == 300 and found["flagged_step"] == 400
    assert "logit scale" in found["reason"] and found["weight_growth"]["b"] == pytest.approx(5e4 / 0.1)
    assert found["weight_growth"]["a"] == 1.0


def test_runaway_from_the_loss_or_non_finite_values_and_repeated_steps():
    by_loss = [rec(0, 1), rec(50, 2, loss=2.0), rec(100, 5, loss=40.0)]  # 40 > 10·ln 10 = 23.0
    found = find_runaway(by_loss, 10)
    assert found["began_step"] == found["flagged_step"] == 100 and "train loss" in found["reason"]
    assert find_runaway([rec(0, 1), rec(50, 2, loss=20.0)], 10) is None  # below 10·ln 10
    assert find_runaway([rec(0, 1), rec(50, float("nan"))], 10)["flagged_step"] == 50
    # a resumed run repeats steps: the last record of a step counts
    assert find_runaway([rec(0, 1), rec(50, 5e3), rec(50, 5)], 10) is None
    assert logit_scale(torch.tensor([[1.0, -3.0], [2.0, -10.0]])) == pytest.approx(2.0)


# ---- scale runaway: real runs ------------------------------------------------------------------------------------
def lenet(rule, lr, **kw):
    return TrainConfig(rule=rule, model="lenet", data="fashion-mnist", train_subset=12800, epochs=1, batch_size=64,
                       lr=lr, momentum=0.9, weight_decay=1e-3, scale_every=10, **kw)


@pytest.mark.needs_fashion_mnist
def test_dfa_at_lr_001_on_lenet_is_flagged_and_bp_is_not(tmp_path):
    dfa = train(lenet("dfa", 0.01), tmp_path / "dfa", progress=False)
    found = dfa["scale"]["runaway"]
    assert found is not None, dfa["scale"]
    assert 0 < found["began_step"] <= found["flagged_step"] < 200
    growth = found["weight_growth"]  # geometric growth toward the output: the output layer grew the most
    assert growth["classifier.5"] == max(growth.values())
    bp = train(lenet("bp", 0.01), tmp_path / "bp", progress=False)
    assert bp["scale"]["runaway"] is None and bp["scale"]["records"] == 20
    rows = [json.loads(line) for line in (tmp_path / "bp" / "scale.jsonl").read_text().splitlines()]
    assert set(rows[0]["weights"]) == set(rows[0]["activations"]) == set(growth)
    assert max(r["logit_scale"] for r in rows) < 100


def test_a_runaway_on_digits_is_flagged_without_fashion_mnist(tmp_path):
    # an MLP on digits at a step size far past stability: the logits blow up within the first epoch
    blown = train(TrainConfig(rule="dfa", epochs=1, lr=0.5, momentum=0.9, init_scale=3.0, scale_every=5,
                              on_divergence="skip-batch"), tmp_path / "a", progress=False)
    assert blown["scale"]["runaway"] is not None, blown["scale"]
    calm = train(TrainConfig(rule="bp", epochs=1, lr=0.01, scale_every=5), tmp_path / "b", progress=False)
    assert calm["scale"]["runaway"] is None


# ---- reference validity ------------------------------------------------------------------------------------------
class MeanBranch(nn.Module):
    """A residual branch that writes one number along the all-ones direction, which LayerNorm removes exactly:
    backprop's gradient for its weight is zero in exact arithmetic, rounding noise in floating point."""

    def __init__(self, width):
        super().__init__()
        self.proj = nn.Linear(width, 1)

    def forward(self, x):
        return x + self.proj(x).expand_as(x)


class Block(nn.Module):
    def __init__(self, width):
        super().__init__()
        self.fc = nn.Linear(width, width)

    def forward(self, x):
        return x + torch.relu(self.fc(x))


def terminal_layernorm_mlp(mean_branch: bool):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(12, 32), Block(32), MeanBranch(32) if mean_branch else Block(32),
                         nn.LayerNorm(32, elementwise_affine=False), nn.Linear(32, 4))


def record_of(model, rule):
    net = falign.convert(model, rule, seed=0)
    rec = DiagnosticsRecorder(net)
    x, y = torch.randn(64, 12, generator=torch.Generator().manual_seed(1)), torch.arange(64) % 4

    def loss_out():
        out = net(x)
        return nn.functional.cross_entropy(out, y), out

    _, _, record = rec.step(loss_out, x, lambda m: nn.functional.cross_entropy(m(x.double()), y))
    return record


def test_a_reference_at_the_floating_point_floor_is_undefined_not_an_angle():
    record = record_of(terminal_layernorm_mlp(True), "fa")
    ref = record["reference"]
    assert ref["2.proj"]["used"] == "undefined", ref["2.proj"]
    assert math.isnan(record["gradient_alignment"]["2.proj"])  # no angle against noise
    assert ref["2.proj"]["norm"] < 1e-12  # float64: the exact zero up to rounding
    # every other layer's reference is a real gradient, measured in float32
    assert {k: v["used"] for k, v in ref.items() if k != "2.proj"} == {k: "float32" for k in ref if k != "2.proj"}
    assert all(math.isfinite(record["gradient_alignment"][k]) for k in ref if k != "2.proj")


def test_reference_check_is_silent_on_bp_and_on_the_model_without_the_branch():
    for mean_branch, rule in ((True, "bp"), (False, "bp"), (False, "fa")):
        record = record_of(terminal_layernorm_mlp(mean_branch), rule)
        used = {k: v["used"] for k, v in record["reference"].items()}
        expect_undefined = {"2.proj"} if mean_branch else set()
        assert {k for k, u in used.items() if u != "float32"} == expect_undefined, (mean_branch, rule, used)


def test_choose_reference_cases():
    g = torch.randn(20, 30, dtype=torch.float64)
    ref, info = choose_reference(g.float(), g)
    assert info["used"] == "float32" and info["float32_error"] < 1e-6 and ref.dtype == torch.float32
    # a real gradient that float32 resolves only to 10%: the float64 one is used
    noisy = (g + 0.1 * torch.randn_like(g) * g.norm() / math.sqrt(g.numel())).float()
    assert choose_reference(noisy, g)[1]["used"] == "float64"
    # float32 noise against a float64 value 1e9 times smaller: both are noise
    assert choose_reference(torch.randn(5, 5) * 1e-8, torch.randn(5, 5, dtype=torch.float64) * 1e-17)[1]["used"] \
        == "undefined"
    assert choose_reference(torch.zeros(3), torch.zeros(3, dtype=torch.float64))[1]["used"] == "undefined"


# ---- effective rank ------------------------------------------------------------------------------------------------
def test_effective_rank_analytic_cases():
    u, v = torch.randn(64, 1, dtype=torch.float64), torch.randn(1, 40, dtype=torch.float64)
    assert effective_rank(u @ v) == pytest.approx(1.0, abs=1e-6)  # rank one
    q, _ = torch.linalg.qr(torch.randn(40, 40, dtype=torch.float64))
    assert effective_rank(q[:10]) == pytest.approx(10.0, rel=1e-9)  # ten equal singular values
    two = torch.diag(torch.tensor([3.0, 1.0]))  # p = (3/4, 1/4): exp(H) = 4 / 3^(3/4)
    assert effective_rank(two) == pytest.approx(4 / 3 ** 0.75, rel=1e-9)
    assert math.isnan(effective_rank(torch.zeros(4, 4)))
    assert math.isnan(effective_rank(torch.zeros(0, 3, 5)))  # a data-parallel rank left without examples
    assert effective_rank(torch.randn(8, 2, 3, 3)) <= 8  # (N, C, H, W) flattened per example


def test_recorder_reports_the_rank_of_each_error_signal():
    # a linear network under dfa: every hidden layer's signal is e·D_l, and the output error e = softmax − onehot
    # has rows summing to zero, so its rank is at most C − 1 = 3
    torch.manual_seed(0)
    linear = nn.Sequential(nn.Linear(12, 32), nn.Linear(32, 32), nn.Linear(32, 4))
    ranks = record_of(linear, "dfa")["signal_rank"]
    assert set(ranks) == {"0", "1", "2"} and all(r <= 3 + 1e-6 for r in ranks.values()), ranks
    # with ReLUs and residual blocks backprop's hidden signals are not confined to those 3 directions
    ranks_bp = record_of(terminal_layernorm_mlp(False), "fa")["signal_rank_bp"]
    assert ranks_bp["4"] <= 3 + 1e-6 and ranks_bp["1.fc"] > 10, ranks_bp


# ---- the reproduction's scale check ----------------------------------------------------------------------------
def test_scale_check_of_the_reproduction_fires_on_a_runaway_and_shows_in_the_findings():
    from falign.app.experiments.base import final_logit_scale, scale_check
    from falign.app.report.report import findings_markdown
    from falign.app.results import SUPPORTED, ExperimentResult, Verdict

    assert scale_check([]) == ""
    calm = scale_check([3.0, 12.5, 7.0])
    assert calm.startswith("scale check:") and "12.5" in calm
    loud = scale_check([3.0, 4e17, float("nan")])
    assert loud.startswith("SCALE RUNAWAY: 2 of 3")
    verdict = Verdict(SUPPORTED, "as claimed", role="primary")
    result = ExperimentResult("x", "X", "h", {}, [], [], [verdict], scale_check=loud)
    assert loud in findings_markdown([result])
    result.scale_check = calm
    assert calm not in findings_markdown([result])  # the findings show the check only when it fires
    net = nn.Linear(3, 2)
    with torch.no_grad():
        net.weight.fill_(1e4)
    assert final_logit_scale(net, torch.ones(5, 3)) > 1e3


def test_summary_digest_counts_undefined_references_per_layer(tmp_path):
    from falign.app.train.trainer import _diagnostics_digest

    rows = [{"event": "epoch"},
            {"event": "diagnostics", "reference": {"a": {"used": "undefined"}, "b": {"used": "float32"}},
             "signal_rank": {"a": 1.0}, "signal_rank_bp": {"a": 2.0}},
            {"event": "diagnostics", "reference": {"a": {"used": "undefined"}, "b": {"used": "float64"}},
             "signal_rank": {"a": 1.5}, "signal_rank_bp": {"a": 2.5}}]
    digest = _diagnostics_digest(rows)
    assert digest["reference_undefined"] == {"a": 2} and digest["reference_float64"] == {"b": 1}
    assert digest["signal_rank_last"] == {"a": 1.5} and digest["records"] == 2
    assert _diagnostics_digest([{"event": "epoch"}]) is None
    summary = train(TrainConfig(rule="fa", epochs=1, hidden=(16,), diagnostics_every=20), tmp_path / "r",
                    progress=False)
    assert summary["diagnostics"]["reference_undefined"] == {}  # a plain MLP: every reference is a real gradient
    assert set(summary["diagnostics"]["signal_rank_last"]) == {"fc1", "fc2"}


def test_the_reference_check_can_be_switched_off(tmp_path):
    from falign.app.train import read_metrics

    train(TrainConfig(rule="fa", epochs=1, hidden=(16,), diagnostics_every=20, reference_check=False),
          tmp_path / "r", progress=False)
    rows = [r for r in read_metrics(tmp_path / "r" / "metrics.jsonl") if r["event"] == "diagnostics"]
    assert rows and all(r["reference"] == "not checked" for r in rows)
