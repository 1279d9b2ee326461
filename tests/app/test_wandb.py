"""``falign train --wandb-project``: the run's scalars in Weights & Biases through the same logging seam as
TensorBoard (falign.app.train.logging), the W&B run continued on --resume, and a clear error without the package."""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import pytest

from falign.app.cli import main
from falign.app.train import TrainConfig
from falign.app.train.config import ConfigError
from falign.app.train.rundir import read_metrics
from falign.diagnostics import record_scalars

TINY = ["--epochs", "2", "--hidden", "16", "--diagnostics-every", "20", "--no-progress"]


class FakeRun:
    """What ``wandb.init`` returns, recording every call."""

    def __init__(self, **init) -> None:
        self.init = init
        self.id = init.get("id") or "fake0001"
        self.logged: list[tuple[int, dict]] = []
        self.summary: dict = {}
        self.finished = False

    def log(self, values: dict, step: int) -> None:
        self.logged.append((step, dict(values)))

    def finish(self) -> None:
        self.finished = True


@pytest.fixture
def fake_wandb(monkeypatch):
    runs: list[FakeRun] = []
    module = types.ModuleType("wandb")
    module.init = lambda **kw: runs.append(FakeRun(**kw)) or runs[-1]  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "wandb", module)
    monkeypatch.setattr("falign.app.train.config.wandb_installed", lambda: True)
    return runs


def test_wandb_receives_what_the_run_records(tmp_path, fake_wandb):
    out = tmp_path / "run"
    assert main(["train", "--out", str(out), "--wandb-project", "proj", *TINY]) == 0
    (run,) = fake_wandb
    assert run.init["project"] == "proj" and run.init["name"] == "run" and run.init["config"]["rule"] == "fa"
    assert run.finished and json.loads((out / "wandb.json").read_text()) == {"project": "proj", "id": "fake0001"}
    rows = read_metrics(out / "metrics.jsonl")
    epochs = [r for r in rows if r.get("event") == "epoch"]
    diagnostics = [r for r in rows if r.get("event") == "diagnostics"]
    logged_epochs = [(s, v) for s, v in run.logged if "epoch/test_acc" in v]
    assert [(s, v["epoch/test_acc"], v["epoch/train_loss"]) for s, v in logged_epochs] == [
        (r["step"], r["test_acc"], r["train_loss"]) for r in epochs]
    logged_diag = {s: v for s, v in run.logged if any(k.startswith("gradient_alignment/") for k in v)}
    assert sorted(logged_diag) == [r["step"] for r in diagnostics] and len(diagnostics) >= 2
    for r in diagnostics:
        want = {k: v for k, v in record_scalars(r).items() if k != "loss"}
        assert logged_diag[r["step"]] == pytest.approx(want)
    steps = [s for s, v in run.logged if "step/train_loss" in v]
    assert steps == list(range(epochs[-1]["step"]))  # every training step, once
    assert run.summary["final/test_acc"] == epochs[-1]["test_acc"]


def test_resume_continues_the_same_wandb_run(tmp_path, fake_wandb):
    out = tmp_path / "run"
    assert main(["train", "--out", str(out), "--wandb-project", "proj", *TINY[:1], "1", *TINY[2:]]) == 0
    assert main(["train", "--resume", str(out), "--epochs", "2", "--wandb-project", "proj", "--no-progress"]) == 0
    first, second = fake_wandb
    assert first.init["id"] is None and second.init["id"] == "fake0001" and second.init["resume"] == "allow"
    assert min(s for s, _ in second.logged) >= max(s for s, _ in first.logged)  # W&B steps never go back


def test_without_the_flag_no_wandb_run(tmp_path, fake_wandb):
    assert main(["train", "--out", str(tmp_path / "run"), *TINY]) == 0
    assert fake_wandb == [] and not (tmp_path / "run" / "wandb.json").exists()


def test_a_missing_wandb_package_is_named_before_training(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr("falign.app.train.config.wandb_installed", lambda: False)
    with pytest.raises(ConfigError, match=r"pip install 'falign\[wandb\]'"):
        TrainConfig(wandb_project="proj")
    assert main(["train", "--out", str(tmp_path / "run"), "--wandb-project", "proj", *TINY]) == 1
    assert "falign[wandb]" in capsys.readouterr().err and not (tmp_path / "run").exists()
    with pytest.raises(ConfigError, match="non-empty"):
        TrainConfig(wandb_project=" ")


def test_real_wandb_offline_writes_the_run(tmp_path, monkeypatch):
    pytest.importorskip("wandb", reason="the test extra installs wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    out = tmp_path / "run"
    assert main(["train", "--out", str(out), "--wandb-project", "proj", *TINY]) == 0
    run_id = json.loads((out / "wandb.json").read_text())["id"]
    (log,) = Path(tmp_path, "wandb").glob(f"offline-run-*-{run_id}/run-{run_id}.wandb")
    data = log.read_bytes()  # W&B's protobuf records hold the keys as plain bytes
    for key in (b"step/train_loss", b"epoch/test_acc", b"gradient_alignment/fc1", b"final/test_acc"):
        assert key in data, key
