"""The trainer's run directory and the `falign train` command line."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

import falign
from falign.app.cli import main
from falign.app.train import ConfigError, RunError, TrainConfig, Trainer, load_checkpoint, read_metrics, train


def test_run_directory_contents(tmp_path):
    out = tmp_path / "run"
    summary = train(TrainConfig(rule="dfa", epochs=3, hidden=(32,)), out, progress=False)
    assert {p.name for p in out.iterdir()} >= {"config.json", "versions.json", "metrics.jsonl",
                                               "checkpoint.pt", "summary.json"}
    config = json.loads((out / "config.json").read_text())
    assert config["rule"] == "dfa" and config["seed"] == 0 and config["hidden"] == [32]
    versions = json.loads((out / "versions.json").read_text())
    assert versions["torch"] == torch.__version__ and versions["falign"] == falign.__version__
    rows = read_metrics(out / "metrics.jsonl")
    assert [r["epoch"] for r in rows] == [1, 2, 3]
    assert all(0 <= r["test_acc"] <= 1 and r["train_loss"] > 0 for r in rows)
    assert summary["status"] == "completed" and summary["final"]["test_acc"] == rows[-1]["test_acc"]
    state = load_checkpoint(out / "checkpoint.pt")
    assert "fc1.feedback_weight" in state["model"] and state["step"] == summary["steps"]


def test_refuses_existing_run_without_overwrite(tmp_path):
    cfg = TrainConfig(epochs=1, hidden=(8,))
    train(cfg, tmp_path, progress=False)
    with pytest.raises(RunError, match=r"already holds a run; pass --resume .* or --overwrite"):
        train(cfg, tmp_path, progress=False)
    train(cfg, tmp_path, progress=False, overwrite=True)


@pytest.mark.parametrize(
    ("changes", "message"),
    [({"rule": "nope"}, "unknown rule 'nope'"), ({"lr": -1.0}, "lr must be a positive"),
     ({"label_noise": 1.0}, r"noise rate must be in \[0, 1\)"), ({"model": "vit"}, "unknown model"),
     ({"momentum": 1.5}, "momentum")],
)
def test_config_errors(changes, message):
    with pytest.raises(ConfigError, match=message):
        TrainConfig(**changes)
    with pytest.raises(ConfigError, match="unknown config key"):
        TrainConfig.from_dict({"lr": 0.1, "learning_rate": 0.1})


def test_cli_default_train_prints_table(tmp_path, capsys):
    code = main(["train", "--out", str(tmp_path / "r"), "--epochs", "2", "--no-progress"])
    out = capsys.readouterr().out
    assert code == 0
    assert "fa / mlp / digits" in out and "test acc" in out and str(tmp_path / "r") in out


def test_cli_bad_input_is_one_line_error(tmp_path, capsys):
    assert main(["train", "--out", str(tmp_path), "--lr", "-2", "--no-progress"]) == 1
    assert "error: lr must be a positive number" in capsys.readouterr().err
    assert main(["train", "--out", str(tmp_path), "--data", "mnist", "--no-progress"]) == 1
    assert "--data-dir" in capsys.readouterr().err


def test_cli_entry_point_help_has_example():
    result = subprocess.run([sys.executable, "-m", "falign", "train", "--help"], capture_output=True, text=True,
                            env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert result.returncode == 0 and "examples:" in result.stdout and "--rule" in result.stdout


def test_trainer_applies_wm_mirror_steps(tmp_path):
    trainer = Trainer(TrainConfig(rule="wm", epochs=1, hidden=(16,)), tmp_path, progress=False)
    trainer.run()
    layers = falign.feedback_layers(trainer.model)
    for layer in layers:
        cos = torch.nn.functional.cosine_similarity(layer.weight.flatten(), layer.feedback_weight.flatten(), 0)
        assert cos > 0.5
