"""Nothing lost, nothing silent: every item of the data-loss / silent-result / crash review, one test each.

The destructive cases run inside pytest's temporary directories.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.utils.prune as prune
from torch import nn
from torch.nn.utils import parametrizations

import falign
from falign.app.cli import main
from falign.app.train import RunError, TrainConfig, Trainer
from falign.diagnostics import conservation_assumptions, find_pairs
from falign.models import MLP
from falign.nn import FALinear, FeedbackLayer
from falign.rules import Feedback, Signal
from tests.conftest import with_target
from tests.rule_reference import REFERENCE

RULES = falign.available_rules()
DT = torch.float64


def cli(args: list[str], capsys) -> tuple[int, str]:
    code = main(args)
    captured = capsys.readouterr()
    return code, captured.out + captured.err


def quick_run(out: Path, **changes) -> dict:
    cfg = TrainConfig(hidden=(8,), epochs=1, **changes)
    return Trainer(cfg, out, progress=False).run()


# ---- 1. --overwrite deletes only what a falign run wrote ---------------------------------------------------
def test_overwrite_refuses_a_folder_with_user_files(tmp_path, capsys):
    folder = tmp_path / "thesis"
    (folder / "sub").mkdir(parents=True)
    (folder / "thesis.tex").write_text("my thesis")
    (folder / "sub" / "data.csv").write_text("1,2")
    code, text = cli(["train", "--out", str(folder), "--overwrite", "--epochs", "1", "--no-progress"], capsys)
    assert code == 1 and "holds files falign did not write (sub/data.csv, thesis.tex)" in text
    assert (folder / "thesis.tex").read_text() == "my thesis" and (folder / "sub" / "data.csv").exists()


def test_overwrite_of_the_working_directory_keeps_it_and_its_files(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("notes.txt").write_text("keep me")
    code, text = cli(["train", "--out", ".", "--overwrite", "--epochs", "1", "--no-progress"], capsys)
    assert code == 1 and "notes.txt" in text
    assert Path("notes.txt").read_text() == "keep me"


def test_overwrite_replaces_a_run_and_only_its_files(tmp_path):
    run = tmp_path / "run"
    quick_run(run)
    (run / "plots").mkdir()
    (run / "plots" / "alignment.png").write_bytes(b"png")
    before = sorted(p.name for p in run.iterdir())
    assert "checkpoint.pt" in before and ".falign" in before
    with pytest.raises(RunError, match="already holds a run"):
        quick_run(run)
    Trainer(TrainConfig(hidden=(8,), epochs=2), run, progress=False, overwrite=True).run()
    assert json.loads((run / "config.json").read_text())["epochs"] == 2
    assert not (run / "plots").exists()  # a run's own plots went with it
    (run / "mine.txt").write_text("x")  # a user file inside a run directory blocks --overwrite
    with pytest.raises(falign.app.outdir.OutputError, match=r"mine\.txt"):
        Trainer(TrainConfig(hidden=(8,), epochs=1), run, progress=False, overwrite=True).run()
    assert (run / "mine.txt").exists() and (run / "checkpoint.pt").exists()


def test_a_run_written_before_markers_is_resumed_but_never_overwritten(tmp_path):
    run = tmp_path / "old"
    quick_run(run)
    (run / ".falign").unlink()
    before = (run / "checkpoint.pt").read_bytes()
    with pytest.raises(falign.app.outdir.OutputError, match=r"no \.falign marker"):  # its files are not known falign's
        Trainer(TrainConfig(hidden=(8,), epochs=1), run, progress=False, overwrite=True).run()
    assert (run / "checkpoint.pt").read_bytes() == before
    Trainer(TrainConfig(), run, progress=False, resume=True, changes={"epochs": 2}).run()  # named by --resume
    assert json.loads((run / "summary.json").read_text())["epochs_completed"] == 2


def test_every_writing_command_refuses_foreign_folders(tmp_path, capsys):
    foreign = tmp_path / "papers"
    foreign.mkdir()
    (foreign / "draft.md").write_text("draft")
    run = tmp_path / "run"
    Trainer(TrainConfig(hidden=(8,), epochs=1, diagnostics_every=5), run, progress=False).run()
    for args in (["reproduce", "--out", str(foreign), "--only", "min_norm", "--size", "tiny", "--no-progress"],
                 ["plot", str(run), "--out", str(foreign)],
                 ["bench", "accuracy", "--out", str(foreign), "--docs", ""]):
        code, text = cli(args, capsys)
        assert code == 1 and "draft.md" in text, (args, text)
    assert (foreign / "draft.md").read_text() == "draft" and sorted(os.listdir(foreign)) == ["draft.md"]


# ---- 2. failed starts leave nothing; outputs are checked before the work --------------------------------
def test_a_run_that_fails_to_start_leaves_nothing_and_the_retry_works(tmp_path, capsys):
    out = tmp_path / "run"
    code, text = cli(["train", "--data", "mnist", "--data-dir", str(tmp_path / "nowhere"), "--out", str(out),
                      "--no-progress"], capsys)
    assert code == 1 and not out.exists()
    code, text = cli(["train", "--epochs", "1", "--hidden", "8", "--out", str(out), "--no-progress"], capsys)
    assert code == 0, text


def test_bench_speed_checks_its_json_path_before_running(tmp_path, capsys, monkeypatch):
    from falign.app.bench import speed

    def never(*args, **kwargs):
        raise AssertionError("the benchmark ran before its output path was checked")

    monkeypatch.setattr(speed, "bench_model", never)
    code, text = cli(["bench", "speed", "--json", str(tmp_path / "missing" / "x.json")], capsys)
    assert code == 1 and "does not exist" in text


# ---- 3. shared modules are converted at every use -------------------------------------------------------
def test_a_module_used_three_times_is_converted_everywhere_and_stays_shared():
    lin = nn.Linear(4, 4)
    net = nn.Sequential(nn.ModuleList([lin] * 3))

    class Repeat(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.blocks = net[0]

        def forward(self, x):
            for block in self.blocks:
                x = torch.relu(block(x))
            return x

    model = falign.convert(Repeat(), "fa")
    assert [type(b).__name__ for b in model.blocks] == ["FALinear"] * 3
    assert model.blocks[0] is model.blocks[1] is model.blocks[2]
    report = falign.conversion_report(model)
    assert report.converted == ["blocks.0", "blocks.1", "blocks.2"]
    assert [r.note for r in report.layers][1:] == ["same module as 'blocks.0'"] * 2
    x = torch.randn(3, 4, requires_grad=True)
    model(x).sum().backward()
    b = model.blocks[0].feedback_weight
    assert not torch.allclose(b, model.blocks[0].weight)  # the input signal used B at every use


def test_one_module_under_two_names_is_one_converted_layer():
    class Twice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.encoder = nn.Linear(5, 5)
            self.alias = self.encoder
            self.head = nn.Linear(5, 2)

        def forward(self, x):
            return self.head(self.alias(self.encoder(x)))

    model = falign.convert(Twice(), "fa")
    assert model.encoder is model.alias and isinstance(model.alias, FALinear)
    assert falign.conversion_report(model).converted == ["encoder", "alias", "head"]
    assert len(falign.feedback_layers(model)) == 2


# ---- 4. a module with its own parameters: children converted, everything listed -------------------------
class LayerScale(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(6, 6), nn.Linear(6, 6)
        self.gamma = nn.Parameter(torch.full((6,), 0.5))

    def forward(self, x):
        return x + self.gamma * self.fc2(torch.relu(self.fc1(x)))


def test_own_parameters_stay_exact_and_children_are_converted():
    net = nn.Sequential(LayerScale(), nn.Linear(6, 3))
    model = falign.convert(net, "fa", unsupported="backprop")
    assert isinstance(model[0].fc1, FALinear) and isinstance(model[0].fc2, FALinear)
    report = falign.conversion_report(model)
    assert report.converted == ["0.fc1", "0.fc2", "1"]
    assert report.unsupported == ["0"] and "gamma" in report.layers[0].note


def test_conversion_error_lists_every_unsupported_module_at_once():
    net = nn.Sequential(LayerScale(), nn.GRUCell(6, 6), nn.LSTMCell(6, 6), nn.Linear(6, 2))
    with pytest.raises(falign.ConversionError) as err:
        falign.convert(net, "fa")
    text = str(err.value)
    assert "3 module(s)" in text and "'0' (LayerScale" in text and "'1' (GRUCell" in text and "'2' (LSTMCell" in text


def test_opaque_attention_is_listed_with_its_out_projection():
    class OwnAttention(nn.MultiheadAttention):  # a subclass with its own forward stays opaque
        def forward(self, *args, **kwargs):
            return super().forward(*args, **kwargs)

    model = falign.convert(nn.Sequential(nn.Linear(4, 4), OwnAttention(4, 2)), "fa", unsupported="backprop")
    note = falign.conversion_report(model).layers[-1].note
    assert "out_proj.weight" in note and type(model[1].out_proj) is not FALinear


# ---- 5. pairs follow the graph, not the order of execution ----------------------------------------------
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


# ---- 6. --resume refuses conflicting flags --------------------------------------------------------------
def test_resume_refuses_conflicting_flags_and_records_allowed_changes(tmp_path, capsys):
    run = tmp_path / "run"
    base = ["--hidden", "8", "--no-progress"]
    assert cli(["train", "--epochs", "1", "--out", str(run), *base], capsys)[0] == 0
    code, text = cli(["train", "--resume", str(run), "--epochs", "5", "--rule", "dfa", "--lr", "0.5"], capsys)
    assert code == 1 and "--lr 0.5" in text and "--rule 'dfa'" in text and "conflict" in text
    code, text = cli(["train", "--resume", str(run), "--epochs", "2", "--lr", "0.01", *base], capsys)
    assert code == 0, text  # a flag equal to the saved value is no conflict
    assert json.loads((run / "config.json").read_text())["epochs"] == 2
    summary = json.loads((run / "summary.json").read_text())
    assert summary["epochs_completed"] == 2 and summary["resumes"][0]["changes"] == {"epochs": [1, 2]}


def test_resume_cannot_shorten_or_reshape_the_schedule(tmp_path, capsys):
    run = tmp_path / "run"
    assert cli(["train", "--epochs", "2", "--hidden", "8", "--lr-schedule", "step", "--out", str(run),
                "--no-progress"], capsys)[0] == 0
    code, text = cli(["train", "--resume", str(run), "--epochs", "4"], capsys)
    assert code == 1 and "learning-rate schedule" in text


# ---- 7. hooks on the original layer survive conversion ---------------------------------------------------
@pytest.mark.parametrize("inplace", [False, True])
def test_forward_hooks_and_pre_hooks_are_carried_over(inplace):
    net = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    seen = []
    net[0].register_forward_pre_hook(lambda m, args: seen.append("pre"))
    handle = net[0].register_forward_hook(lambda m, args, out: seen.append("post"))
    model = falign.convert(net, "fa", inplace=inplace)
    model(torch.randn(2, 3))
    assert seen.count("pre") >= 1 and seen.count("post") >= 1
    if inplace:
        handle.remove()  # the user's handle still works: it is the same hook dictionary
        seen.clear()
        model(torch.randn(2, 3))
        assert seen == ["pre"]


# ---- 8. wm's mirror_step follows convert's options; kp's B follows W's trainability ---------------------
def test_mirror_step_uses_the_options_given_to_convert():
    net = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    model = falign.convert(net, "wm", lr=0.01, decay=0.02)
    b0 = model[2].feedback_weight.clone()
    falign.rules.mirror_step(model, generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(0)
    torch.randn(128, 8, generator=g)  # layer 0 draws its noise first
    x = torch.randn(128, 8, generator=g)
    y = x @ model[2].weight.detach().T
    torch.testing.assert_close(model[2].feedback_weight, 0.98 * b0 + 0.01 * y.T @ x / 128)


def test_mirror_step_arguments_override_per_call():
    model = falign.convert(nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2)), "wm", lr=0.01, decay=0.01)
    b0 = model[2].feedback_weight.clone()
    falign.rules.mirror_step(model, lr=0.5, decay=0.5)
    assert (model[2].feedback_weight - b0).norm() / b0.norm() > 0.2


def test_kp_feedback_is_frozen_with_its_weight():
    model = falign.convert(nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 2)), "kp")
    model[2].weight.requires_grad_(False)
    opt = torch.optim.SGD(model.parameters(), lr=0.5, weight_decay=0.1)
    b0 = model[2].feedback_weight.detach().clone()
    for _ in range(3):
        opt.zero_grad()
        model(torch.randn(5, 4)).pow(2).sum().backward()
        opt.step()
    assert model[2].feedback_weight.grad is None and torch.equal(model[2].feedback_weight.detach(), b0)
    assert model[0].feedback_weight.grad is not None  # the trained layer's B still learns


# ---- 9. dfa never reuses a stale output error -----------------------------------------------------------
def test_dfa_submodule_called_alone_after_a_step_raises():
    model = falign.convert(MLP([4, 8, 8, 3]), "dfa")
    model(torch.randn(5, 4)).sum().backward()  # one full step: an error was recorded
    h = torch.randn(5, 8, requires_grad=True)
    with pytest.raises(RuntimeError, match="outside a forward pass of the converted model"):
        model.fc2(h).sum().backward()
    with falign.functional.backprop_mode():  # true gradients of a submodule alone still work
        model.fc2(h).sum().backward()


def test_dfa_two_forward_passes_each_use_their_own_error():
    model = falign.convert(MLP([4, 8, 3]), "dfa", seed=1)
    x1, x2 = torch.randn(5, 4), torch.randn(5, 4)
    a = model(x1)
    b = model(x2)
    (b.pow(2).sum()).backward()
    grad_b = model.fc1.weight.grad.clone()
    model.zero_grad()
    reference = copy.deepcopy(model)
    reference(x2).pow(2).sum().backward()
    torch.testing.assert_close(grad_b, reference.fc1.weight.grad)
    a.sum().backward()  # a's own error, not b's
    assert model.fc1.weight.grad is not None


# ---- 10./11. brsf: layout-independent draws, no side effects outside optimiser steps --------------------
def test_brsf_draws_do_not_depend_on_memory_layout():
    net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 4 * 4, 2))
    a = falign.convert(net, "brsf", seed=3)
    b = falign.convert(net, "brsf", seed=3).to(memory_format=torch.channels_last)
    for model in (a, b):
        falign.step_rules(model)
    assert not b[0].feedback_weight.is_contiguous()
    torch.testing.assert_close(a[0].feedback_weight, b[0].feedback_weight, rtol=0, atol=0)


def test_input_gradients_leave_brsf_state_unchanged():
    model = falign.convert(MLP([4, 8, 8, 3]), "brsf")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(6, 4, requires_grad=True)
    for _ in range(3):  # saliency maps: input gradients only
        torch.autograd.grad(model(x).max(1).values.sum(), x)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_the_python_guide_documents_input_gradients_and_backprop_mode():
    guide = (Path(__file__).parents[1] / "docs" / "guides" / "python.md").read_text()
    assert "input gradients" in guide and "backprop_mode()" in guide


# ---- 12. the output layer is the one that produces the output ------------------------------------------
def test_output_layer_found_from_the_forward_pass():
    class HeadFirst(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.head = nn.Linear(8, 3)
            self.body = nn.Linear(4, 8)

        def forward(self, x):
            return self.head(torch.relu(self.body(x)))

    class AutoEncoder(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.decoder = nn.Conv2d(4, 1, 3, padding=1)
            self.encoder = nn.Conv2d(1, 4, 3, padding=1)

        def forward(self, x):
            return self.decoder(torch.relu(self.encoder(x)))

    for net, x, expected in ((HeadFirst(), torch.randn(2, 4), "head"), (AutoEncoder(), torch.randn(2, 1, 5, 5),
                                                                         "decoder")):
        model = falign.convert(net, "fa", output_signal="backprop")
        model(x)
        report = falign.conversion_report(model)
        assert report.output_layer == expected
        assert getattr(model, expected).rule.name == "bp"
        other = [r for r in report.layers if r.name != expected]
        assert all("output" not in r.note for r in other)


# ---- 13. an empty experiment selection is an error ------------------------------------------------------
def test_reproduce_only_empty_is_an_error(tmp_path, capsys):
    code, text = cli(["reproduce", "--only", "", "--out", str(tmp_path / "r")], capsys)
    assert code == 1 and "--only names no experiment" in text and not (tmp_path / "r").exists()


# ---- 14. double backward (gradient penalties) follows the rule's formula --------------------------------
def _straight_through(x, weight, bias, feedback):
    """``x Wᵀ + b`` whose gradient to ``x`` is ``g B`` (plain autograd, an independent construction)."""
    feedback = feedback.detach()
    return x.detach() @ weight.T + bias + (x @ feedback.T - (x @ feedback.T).detach())


@pytest.mark.parametrize("rule", RULES)
def test_gradient_penalty_double_backward_follows_the_rule(rule):
    """A penalty on the input signal, ``‖∂L/∂x‖²``, differentiated once more: every backward pass through the
    network (the first one, and the second one through the graph it built) uses the rule (formulas from the
    reference table; backprop's is plain autograd)."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)).double()
    model = falign.convert(net, rule, seed=2, example_input=torch.randn(1, 5, dtype=DT))
    x = torch.randn(4, 5, dtype=DT, requires_grad=True)
    target = torch.randn(4, 3, dtype=DT)
    if falign.uses_target(model):
        falign.set_target(model, target)
    loss = (model(x) - target).pow(2).sum()
    (gx,) = torch.autograd.grad(loss, x, create_graph=True)
    penalty = gx.pow(2).sum()
    if penalty.requires_grad:
        penalty.backward()

    ref, entry = copy.deepcopy(net), REFERENCE[rule]
    xr = x.detach().clone().requires_grad_()
    if falign.get_rule(rule).feedback is Feedback.NONE:
        (gx_ref,) = torch.autograd.grad((ref(xr) - target).pow(2).sum(), xr, create_graph=True)
    elif entry.projected is not None:  # the hidden input signal is q·D₂, the first layer's q·D₀
        h = torch.tanh(ref[0](xr))
        o = _straight_through(h, ref[2].weight, ref[2].bias, model[2].feedback_weight)
        e = torch.autograd.grad((o - target).pow(2).sum(), o, create_graph=True)[0]
        gx_ref = entry.projected(e, target) @ model[0].feedback_weight
    else:
        h = torch.tanh(_straight_through(xr, ref[0].weight, ref[0].bias, entry.matrix(model[0])))
        o = _straight_through(h, ref[2].weight, ref[2].bias, entry.matrix(model[2]))
        (gx_ref,) = torch.autograd.grad((o - target).pow(2).sum(), xr, create_graph=True)
    torch.testing.assert_close(gx.detach(), gx_ref.detach())
    penalty_ref = gx_ref.pow(2).sum()
    if penalty_ref.requires_grad:
        penalty_ref.backward()
    # (a rule whose input signal does not depend on the weights gives the penalty no gradient at all)
    torch.testing.assert_close(model[0].weight.grad, ref[0].weight.grad)
    torch.testing.assert_close(model[2].weight.grad, ref[2].weight.grad)


# ---- 15. unbatched inputs, empty batches, sequence downsampling -----------------------------------------
@pytest.mark.parametrize("rule", RULES)
def test_unbatched_and_empty_batches_backpropagate(rule):
    conv = nn.Sequential(nn.Conv2d(2, 3, 3), nn.ReLU(), nn.Flatten(0), nn.Linear(3 * 4 * 4, 2))
    model = falign.convert(conv, rule)
    x = torch.randn(2, 6, 6, requires_grad=True)
    one = torch.tensor(0)  # the class of the one unbatched example (for rules that project the target)
    torch.testing.assert_close(with_target(model, x, one), conv(x))
    with_target(model, x, one).sum().backward()
    assert x.grad is not None and x.grad.shape == x.shape
    mlp = falign.convert(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3)), rule)
    v = torch.randn(4, requires_grad=True)
    with_target(mlp, v, one).sum().backward()
    assert v.grad.shape == (4,)
    for net, shape in ((MLP([4, 8, 3]), (0, 4)), (nn.Sequential(nn.Conv2d(2, 3, 3), nn.ReLU(), nn.Flatten(),
                                                                 nn.Linear(3 * 4 * 4, 2)), (0, 2, 6, 6))):
        model = falign.convert(net, rule, example_input=torch.randn(1, *shape[1:]))
        empty = torch.randn(shape, requires_grad=True)
        with_target(model, empty).sum().backward()
        assert empty.grad.shape == shape


def test_dfa_with_sequence_downsampling_trains():
    class Downsample(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inp = nn.Linear(6, 8)
            self.pool = nn.AvgPool1d(2)
            self.out = nn.Linear(8, 3)

        def forward(self, x):  # (N, 10, 6) -> (N, 5, 3)
            h = torch.relu(self.inp(x))
            return self.out(self.pool(h.transpose(1, 2)).transpose(1, 2))

    model = falign.convert(Downsample(), "dfa")
    x = torch.randn(4, 10, 6)
    model(x).pow(2).sum().backward()
    assert model.out.direct_mode == "per-position" and model.inp.direct_mode == "per-sample"
    assert tuple(model.inp.feedback_weight.shape) == (5 * 3, 6)
    assert torch.isfinite(model.inp.weight.grad).all()


# ---- 16. parametrized, pruned, subclassed and lazy layers ----------------------------------------------
def _mlp():
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))


def _pruned():
    net = _mlp()
    prune.l1_unstructured(net[2], "weight", 0.5)
    return net


def _spectral():
    net = _mlp()
    parametrizations.spectral_norm(net[2])
    return net


def _weight_norm():
    net = _mlp()
    parametrizations.weight_norm(net[2])
    return net


class PlainSubclass(nn.Linear):
    """A subclass that only adds an attribute."""

    tag = "mine"


def _subclass():
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), PlainSubclass(8, 3))


def _lazy_after_call():
    net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.LazyLinear(3))
    net(torch.randn(1, 4))
    return net


@pytest.mark.parametrize("build", [_pruned, _spectral, _weight_norm, _subclass, _lazy_after_call])
@pytest.mark.parametrize("rule", [r for r in RULES if falign.get_rule(r).has_feedback and falign.get_rule(r).signal
                                  is Signal.LAYER])
def test_special_linear_layers_convert_and_follow_the_rule(build, rule):
    torch.manual_seed(0)
    net = build()
    model = falign.convert(net, rule, seed=1)
    special = model[2]
    assert isinstance(special, FeedbackLayer) and isinstance(special, type(net[2]))
    x = torch.randn(5, 4)
    torch.testing.assert_close(model(x), net(x))
    # the input signal of the special layer follows the rule's formula g·B (B of its effective weight)
    h = torch.relu(model[0](x)).detach().requires_grad_()
    g = torch.randn(5, 3)
    special(h).backward(g)
    b = REFERENCE[rule].matrix(special)
    torch.testing.assert_close(h.grad, g @ b)
    assert not torch.allclose(b, special.weight)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    falign.attach(model, opt)
    losses = []
    for _ in range(20):
        opt.zero_grad()
        loss = model(x).pow(2).mean()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < losses[0]


def test_pruned_mask_still_applies_after_conversion():
    net = _pruned()
    model = falign.convert(net, "fa")
    mask = model[2].weight_mask
    assert torch.equal(model[2].weight == 0, mask == 0) and int((mask == 0).sum()) == 12
    model(torch.randn(3, 4)).sum().backward()
    assert torch.equal(model[2].weight_orig.grad[mask == 0], torch.zeros(12))  # pruned weights get no update


def test_subclass_with_its_own_forward_and_an_uninitialised_lazy_layer_are_clear_errors():
    class Scaled(nn.Linear):
        def forward(self, x):
            return 2 * super().forward(x)

    with pytest.raises(falign.ConversionError, match=r"Scaled.*overrides forward"):
        falign.convert(nn.Sequential(Scaled(3, 3), nn.Linear(3, 2)), "fa")
    with pytest.raises(falign.ConversionError, match="lazy layer not initialised yet: run one forward pass"):
        falign.convert(nn.Sequential(nn.LazyLinear(3), nn.Linear(3, 2)), "fa")


def test_jit_trace_records_the_forward_and_warns_that_its_backward_is_backprop():
    model = falign.convert(_mlp(), "fa", example_input=torch.randn(2, 4))
    x = torch.randn(2, 4)
    with pytest.warns(falign.nn.TracedBackpropWarning, match="backward is backprop"):
        with warnings.catch_warnings():
            for category in (DeprecationWarning, FutureWarning):  # torch 2.9+ deprecates jit.trace (2.14: Future)
                warnings.filterwarnings("ignore", category=category)
            traced = torch.jit.trace(model, x)
    torch.testing.assert_close(traced(x), model(x))
    guide = (Path(__file__).parents[1] / "docs" / "guides" / "python.md").read_text()
    assert "torch.jit.trace" in guide


# ---- 17. every CLI path ends in a clear message --------------------------------------------------------
def test_every_cli_error_path_is_a_clear_message(tmp_path, capsys):
    run = tmp_path / "run"
    Trainer(TrainConfig(hidden=(8,), epochs=1, diagnostics_every=5), run, progress=False).run()
    a_file = tmp_path / "file.txt"
    a_file.write_text("not a folder")

    def broken(content: str) -> Path:
        bad = tmp_path / f"bad{len(list(tmp_path.iterdir()))}"
        Trainer(TrainConfig(hidden=(8,), epochs=1), bad, progress=False).run()
        (bad / "config.json").write_text(content)
        return bad

    cases = [
        (["train", "--resume", str(broken("{bad"))], "is not valid JSON"),
        (["train", "--resume", str(broken("[1, 2]"))], "must hold a JSON object"),
        (["train", "--resume", str(broken('{"epochs": "three"}'))], "epochs must be an integer, got 'three'"),
        (["train", "--out", str(a_file)], "is a file, not a folder"),
        (["train", "--resume", str(a_file)], "is a file, not a run directory"),
        (["train", "--out", "/dev/null"], "is a file, not a folder"),
        (["plot", str(run), "--out", str(a_file)], "is a file, not a folder"),
        (["plot", str(a_file)], "is not a folder"),
        (["reproduce", "--out", str(a_file)], "is a file, not a folder"),
        (["bench", "speed", "--models", "nonsense"], "unknown nonsense"),
        (["bench", "speed", "--rules", "nonsense"], "unknown nonsense"),
        (["bench", "speed", "--repeats", "0"], "--repeats must be >= 1"),
        (["bench", "speed", "--device", "tpu"], "unknown --device 'tpu'"),
        (["bench", "speed", "--device", "meta"], "falign benchmarks run on cpu or cuda"),
        (["bench", "speed", "--device", "nonsense"], "unknown --device 'nonsense'"),
    ]
    if not torch.cuda.is_available():
        cases.append((["bench", "speed", "--device", "cuda"], "torch.cuda.is_available() is False"))
        cases.append((["train", "--device", "cuda", "--out", str(tmp_path / "c")], "torch.cuda.is_available()"))
    for args, message in cases:
        code, text = cli(args, capsys)
        assert code == 1 and message in text and "Traceback" not in text, (args, text)


def test_plot_skips_a_torn_last_line_and_says_so(tmp_path, capsys):
    run = tmp_path / "run"
    Trainer(TrainConfig(hidden=(8,), epochs=1, diagnostics_every=5), run, progress=False).run()
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"event": "diagnostics", "st')  # a kill in the middle of a write
    code, text = cli(["plot", str(run)], capsys)
    assert code == 0 and "skipped" in text and "not a JSON object" in text
    assert (run / "plots" / "alignment.png").exists()


def test_cli_subprocess_has_no_traceback_for_a_bad_resume(tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / ".falign").write_text('{"kind": "run"}')
    (bad / "config.json").write_text("{bad")
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "falign", "train", "--resume", str(bad)], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 1 and "Traceback" not in done.stderr and "not valid JSON" in done.stderr
    assert time.perf_counter() - start < 120
