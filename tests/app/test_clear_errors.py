"""Inputs that used to end in a traceback or be accepted silently get one clear
error (before any output folder is claimed, where they can be checked), and third-party seams (accelerate's
optimiser wrapper, a user's DDP wrapper, ``torch.jit.trace``, forward hooks) work or say what to do."""

from __future__ import annotations

import json
import re
import shutil
import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch import nn

import falign
from falign.app.cli import main
from falign.app.train import TrainConfig, train
from falign.errors import FalignError

SMALL = ["--hidden", "8", "--epochs", "1", "--no-progress"]


def cli(argv: list[str], capsys: pytest.CaptureFixture) -> tuple[int, str]:
    """Run ``falign ARGV`` in-process: its exit code and stderr (an uncaught exception fails the test)."""
    rc = main(argv)
    return rc, capsys.readouterr().err


# -- item 10: refused before anything is written ---------------------------------------------------------
@pytest.mark.parametrize(("argv", "message"), [
    (["--rule", "wm", "--rule-option", "steps=1.5"], r"option steps of rule 'wm' must be an integer, got 1\.5"),
    (["--rule", "wm", "--rule-option", "steps=true"], r"option steps of rule 'wm' must be an integer, got True"),
    (["--rule", "wm", "--rule-option", "lr=Infinity"], r"option lr of rule 'wm' must be a finite number"),
    (["--model", "lenet", "--data", "synthetic"], r"model 'lenet' needs square images .* or --model mlp"),
    (["--feedback-scale", "inf"], r"feedback_scale must be a finite number > 0, got inf"),
    (["--seed", "1180591620717411303424"], r"seed must be an integer in \[0, 2\*\*63 - 1\]"),
    (["--data-dir", "/nonexistent"], r"--data-dir does not apply to --data digits"),
    (["--data", "synthetic", "--data-dir", "/tmp"], r"--data-dir does not apply to --data synthetic"),
    (["--hidden", "100000000,100000000"], r"model 'mlp' has [\d,]+ parameters: training it needs about .* GiB .* "
                                          r"choose smaller widths \(--hidden\)"),
])
def test_bad_train_input_is_refused_before_the_folder_is_claimed(tmp_path, capsys, argv, message):
    out = tmp_path / "run"
    rc, err = cli(["train", *SMALL, *argv, "--out", str(out)], capsys)
    assert rc == 1 and "falign train: error:" in err
    assert re.search(message, err), err
    assert not out.exists()


def test_model_size_is_checked_without_allocating():
    from falign.models.registry import ModelError, build_model, check_size

    with torch.device("meta"):
        big = nn.Linear(100_000, 75_000)
    with pytest.raises(ModelError, match=r"has 7,500,075,000 parameters: training it needs about 111\.8 GiB .* "
                                         r"this machine has 1\.0 GiB"):
        check_size(big, "mlp", memory=2**30)
    check_size(build_model("mlp", (64,), 10, hidden=(256, 256)), "mlp")  # an ordinary model passes


def test_bench_accuracy_bad_values_are_refused_before_the_folder_is_claimed(tmp_path, capsys):
    for argv, message in ((["--lr", "-1"], "lr must be a positive number, got -1.0"),
                          (["--epochs", "0"], "--epochs must be at least 1, got 0")):  # 0 used to run 5 epochs
        out = tmp_path / "bench"
        rc, err = cli(["bench", "accuracy", "--rules", "bp", "--seeds", "1", *argv, "--out", str(out), "--docs", "",
                       "--no-progress"], capsys)
        assert rc == 1 and message in err, err
        assert not out.exists()


# -- item 8: resume --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("runs") / "run"
    train(TrainConfig(epochs=1, hidden=(8,)), out, progress=False)
    return out


@pytest.fixture
def run_copy(finished_run, tmp_path) -> Path:
    out = tmp_path / "run"
    shutil.copytree(finished_run, out)
    return out


def test_resume_with_a_rule_option_says_it_conflicts(run_copy, capsys):
    rc, err = cli(["train", "--resume", str(run_copy), "--rule-option", "decay=0.2", "--no-progress"], capsys)
    assert rc == 1 and "--rule-option {'decay': 0.2} (the run has {}) conflicts with the saved run" in err, err


@pytest.mark.parametrize("tamper", ["model only", "no optimizer", "empty model", "other model"])
def test_tampered_checkpoint_is_a_clear_error_naming_the_file(run_copy, capsys, tamper):
    path = run_copy / "checkpoint.pt"
    state = torch.load(path, weights_only=True)
    if tamper == "model only":
        state = {"model": {}}
    elif tamper == "no optimizer":
        del state["optimizer"]
    elif tamper == "empty model":
        state["model"] = {}
    else:
        state["model"] = {k: torch.zeros(3, *v.shape[1:]) for k, v in state["model"].items()}
    torch.save(state, path)
    before = (run_copy / "summary.json").read_bytes()
    rc, err = cli(["train", "--resume", str(run_copy), "--epochs", "2", "--no-progress"], capsys)
    assert rc == 1 and f"falign train: error: {path}: " in err, err
    assert ("not a checkpoint of a falign run" in err) or ("does not fit this run's model or optimiser" in err)
    assert (run_copy / "summary.json").read_bytes() == before


def test_edited_config_json_is_refused_on_resume(run_copy, capsys):
    config = json.loads((run_copy / "config.json").read_text())
    config["lr"] = 5
    (run_copy / "config.json").write_text(json.dumps(config))
    rc, err = cli(["train", "--resume", str(run_copy), "--epochs", "2", "--no-progress"], capsys)
    assert rc == 1 and "config.json was changed after the checkpoint was written: lr 5 (the checkpoint has 0.01)" in err
    config["lr"] = 0.01  # restored: the run resumes
    (run_copy / "config.json").write_text(json.dumps(config))
    rc, err = cli(["train", "--resume", str(run_copy), "--epochs", "2", "--no-progress"], capsys)
    assert rc == 0, err


# -- item 11: third-party seams --------------------------------------------------------------------------
class AcceleratedLike(torch.optim.Optimizer):
    """A stand-in for HF accelerate's ``AcceleratedOptimizer``: a ``torch.optim.Optimizer`` subclass that never
    runs ``Optimizer.__init__`` (no step hooks of its own), keeps the wrapped optimiser as ``.optimizer`` and
    delegates to it."""

    def __init__(self, optimizer: torch.optim.Optimizer) -> None:
        self.optimizer = optimizer

    @property
    def param_groups(self):
        return self.optimizer.param_groups

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none)

    def step(self, closure=None):
        return self.optimizer.step(closure)


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3))


def test_attach_to_an_accelerate_style_wrapper_runs_the_per_step_work():
    model = falign.convert(_mlp(), "wm")
    opt = AcceleratedLike(torch.optim.SGD(model.parameters(), lr=0.1))
    falign.attach(model, opt)
    before = model[0].feedback_weight.clone()
    for _ in range(2):  # the second forward raises if the mirror steps did not run after the first step
        opt.zero_grad()
        nn.functional.cross_entropy(model(torch.randn(8, 6)), torch.randint(0, 3, (8,))).backward()
        opt.step()
    assert not torch.equal(model[0].feedback_weight, before)


def test_attach_to_a_wrapper_without_hooks_says_what_to_pass():
    class Opaque(torch.optim.Optimizer):
        def __init__(self) -> None:
            pass

    with pytest.raises(FalignError, match=r"pass the torch\.optim\.Optimizer it wraps to falign\.attach"):
        falign.attach(falign.convert(_mlp(), "wm"), Opaque())


@pytest.fixture
def process_group(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_dkp_wrapped_in_ddp_before_its_first_forward_names_the_remedy(process_group):
    x, y = torch.randn(5, 6), torch.randint(0, 3, (5,))
    wrapped = nn.parallel.DistributedDataParallel(falign.convert(_mlp(), "dkp"))
    with pytest.raises(FalignError, match=r"wrapped in DistributedDataParallel before its first forward pass.*"
                                          r"example_input="):
        wrapped(x)
    fixed = nn.parallel.DistributedDataParallel(falign.convert(_mlp(), "dkp", example_input=x))  # the remedy
    nn.functional.cross_entropy(fixed(x), y).backward()
    assert all(p.grad is not None for p in fixed.parameters())


@pytest.mark.parametrize("rule", ["fa", "dfa", "dkp"])
def test_jit_trace_of_a_model_straight_from_convert(rule):
    model = falign.convert(_mlp(), rule)
    x = torch.randn(5, 6)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", falign.nn.layers.TracedBackpropWarning)
        traced = torch.jit.trace(model, x)
    torch.testing.assert_close(traced(x), model(x))
    assert falign.conversion_report(model).output_layer == "2"  # the eager model probed at its own first call
    nn.functional.cross_entropy(model(x), torch.randint(0, 3, (5,))).backward()


@pytest.mark.parametrize("rule", ["fa", "dfa"])
def test_probe_pass_runs_the_hooks_that_shape_the_model(rule):
    """The first-call probe runs with the model's forward hooks (a pre-hook that flattens the input defines the
    model): it finds the output layer and sizes D from what the layers really receive. Hooks see that first
    call twice (documented); convert with example_input= to probe before registering hooks."""
    model = falign.convert(_mlp(), rule)
    model[0].register_forward_pre_hook(lambda m, args: (args[0].flatten(1),))
    calls = {"out": 0}  # a hook of the output layer (the probe runs the root's forward, its children's calls)
    model[2].register_forward_hook(lambda *a: calls.__setitem__("out", calls["out"] + 1))
    x = torch.randn(4, 2, 3, requires_grad=True)
    model(x).sum().backward()  # without the pre-hook in the probe: "mat1 and mat2 shapes cannot be multiplied"
    assert falign.conversion_report(model).output_layer == "2" and x.grad.shape == x.shape
    first = 2 if rule == "dfa" else 1
    assert calls["out"] == first
    model(x)
    assert calls["out"] == first + 1
    early = falign.convert(_mlp(), rule, example_input=torch.randn(4, 6))
    early[2].register_forward_hook(lambda *a: calls.__setitem__("out", calls["out"] + 1))
    early(torch.randn(4, 6))
    assert calls["out"] == first + 2


# -- found by benchmarks/adversarial.py beyond the list -----------------------------------------
def test_tampered_checkpoint_counters_are_refused(run_copy, capsys):
    path = run_copy / "checkpoint.pt"
    state = torch.load(path, weights_only=True)
    torch.save({**state, "step": "seven"}, path)  # used to end in "can only concatenate str"
    rc, err = cli(["train", "--resume", str(run_copy), "--epochs", "2", "--no-progress"], capsys)
    assert rc == 1 and f"{path}: its step entry is not what falign writes" in err, err


def test_resume_of_a_trained_run_without_its_checkpoint_is_refused(run_copy, capsys):
    (run_copy / "checkpoint.pt").unlink()  # used to start again from step 0 silently, replacing metrics.jsonl
    metrics = (run_copy / "metrics.jsonl").read_bytes()
    rc, err = cli(["train", "--resume", str(run_copy), "--epochs", "2", "--no-progress"], capsys)
    assert rc == 1 and "has no checkpoint.pt to continue from" in err and "--overwrite" in err, err
    assert (run_copy / "metrics.jsonl").read_bytes() == metrics


@pytest.mark.parametrize(("argv", "message"), [
    (["--out", ""], "--out is empty"),  # used to write into the current folder
    (["--lr-milestones", "0.3"], "--lr-milestones applies only to --lr-schedule step"),  # used to be ignored
])
def test_train_flags_that_did_nothing_are_refused(tmp_path, monkeypatch, capsys, argv, message):
    monkeypatch.chdir(tmp_path)
    rc, err = cli(["train", *SMALL, *argv], capsys)
    assert rc == 1 and message in err, err
    assert list(tmp_path.iterdir()) == []


def test_plot_of_rows_falign_did_not_write_is_a_clear_error(run_copy, capsys):
    (run_copy / "metrics.jsonl").write_text('{"event": "diagnostics", "step": 1}\n')  # used to be a KeyError
    rc, err = cli(["plot", str(run_copy)], capsys)
    assert rc == 1 and "lacks the fields falign writes" in err, err


@pytest.mark.parametrize(("argv", "message"), [
    (["speed", "--json", ""], "--json is empty"),  # used to be ignored
    (["speed", "--json", "USER"], "exists and is not falign's output of this kind"),  # used to be replaced
    (["accuracy", "--rules", ","], "--rules ',': unknown (empty)"),  # used to be an IndexError
    (["accuracy", "--rules", "fa", "--device", "cuda", "--out", "OUT"], "--device cuda was asked for"),
    (["architectures", "--steps-scale", "inf"], "--steps-scale a finite number > 0"),
    (["pipeline", "--models", ","], "--models ',': unknown (empty)"),
])
def test_bench_values_are_refused_before_any_work(tmp_path, capsys, argv, message):
    if torch.cuda.is_available() and "cuda" in argv:
        pytest.skip("a CUDA device is here")
    user = tmp_path / "notes.txt"
    user.write_text("mine\n")
    argv = [str(user) if a == "USER" else str(tmp_path / "out") if a == "OUT" else a for a in argv]
    rc, err = cli(["bench", *argv, "--docs", ""] if argv[0] != "speed" else ["bench", *argv], capsys)
    assert rc == 1 and message in err, err
    assert user.read_text() == "mine\n" and not (tmp_path / "out").exists()


def test_bench_speed_replaces_its_own_earlier_json(tmp_path):
    from falign.app.bench.speed import _is_speed_json
    from falign.app.outdir import check_file

    earlier = tmp_path / "speed.json"
    earlier.write_text(json.dumps({"machine": "m", "torch": "t", "rows": []}))
    assert check_file(earlier, "--json", replaces=_is_speed_json) == earlier


@pytest.mark.parametrize("seed", [2**70, 0.5, -1, True])
def test_convert_refuses_seeds_that_would_alias_another(seed):
    with pytest.raises((TypeError, ValueError), match=r"seed must be an integer in \[0, 2\*\*63 - 1\]"):
        falign.convert(_mlp(), "fa", seed=seed)
