"""Crashes, resume, safe loading, divergence and bad input: each fault and what it gets."""

from __future__ import annotations

import fcntl
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import falign
from falign.app.cli import main
from falign.app.train import (
    CheckpointError,
    DivergenceError,
    RunError,
    TrainConfig,
    Trainer,
    load_checkpoint,
    read_metrics,
    train,
)

BASE = ["--hidden", "32", "--epochs", "3", "--checkpoint-every", "7", "--diagnostics-every", "10", "--no-progress"]


def falign_cli(args: list[str], env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "falign", *args], capture_output=True, text=True,
                          env={**os.environ, "PYTHONWARNINGS": "ignore", **(env or {})}, timeout=300)


FAULTS = Path(__file__).parents[1] / "workers" / "faults.py"


def faulty_cli(args: list[str], env: dict) -> subprocess.CompletedProcess:
    """``falign`` with the faults of ``env`` injected (tests/workers/faults.py)."""
    return subprocess.run([sys.executable, str(FAULTS), *args], capture_output=True, text=True,
                          env={**os.environ, "PYTHONWARNINGS": "ignore", **env}, timeout=300)


def same_run(a: Path, b: Path) -> None:
    assert (a / "metrics.jsonl").read_bytes() == (b / "metrics.jsonl").read_bytes()
    sa, sb = load_checkpoint(a / "checkpoint.pt")["model"], load_checkpoint(b / "checkpoint.pt")["model"]
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


# rules with per-step work (redraws, mirror steps with the global RNG) are the ones a resume can get wrong
@pytest.mark.parametrize("rule", [r for r in falign.available_rules() if falign.get_rule(r).per_step])
def test_sigkill_mid_epoch_then_resume_is_bit_exact(tmp_path, rule):
    ref, crashed = tmp_path / "ref", tmp_path / "crashed"
    assert falign_cli(["train", "--rule", rule, *BASE, "--out", str(ref)]).returncode == 0
    killed = faulty_cli(["train", "--rule", rule, *BASE, "--out", str(crashed)],
                        env={"FALIGN_TEST_KILL_AT_STEP": "60"})  # epoch 2 of 3 (43 steps each)
    assert killed.returncode == -9
    assert load_checkpoint(crashed / "checkpoint.pt")["step"] == 56
    resumed = falign_cli(["train", "--resume", str(crashed), "--no-progress"])
    assert resumed.returncode == 0, resumed.stderr
    same_run(ref, crashed)


def test_crash_inside_checkpoint_write_keeps_previous_checkpoint(tmp_path):
    ref, crashed = tmp_path / "ref", tmp_path / "crashed"
    assert falign_cli(["train", *BASE, "--out", str(ref)]).returncode == 0
    killed = faulty_cli(["train", *BASE, "--out", str(crashed)], env={"FALIGN_TEST_KILL_IN_CHECKPOINT": "14"})
    assert killed.returncode == -9
    assert list(crashed.glob(".checkpoint.pt.*.tmp"))  # the interrupted write never replaced the file
    assert load_checkpoint(crashed / "checkpoint.pt")["step"] == 7
    assert falign_cli(["train", "--resume", str(crashed), "--no-progress"]).returncode == 0
    assert not list(crashed.glob(".*.tmp"))
    same_run(ref, crashed)


@pytest.fixture
def checkpoint(tmp_path) -> Path:
    train(TrainConfig(epochs=1, hidden=(8,)), tmp_path / "run", progress=False)
    return tmp_path / "run" / "checkpoint.pt"


def test_truncated_and_tampered_checkpoints_name_the_file(checkpoint):
    data = checkpoint.read_bytes()
    checkpoint.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=rf"{checkpoint}: cannot read the checkpoint"):
        load_checkpoint(checkpoint)
    tampered = bytearray(data)
    for i in range(len(data) // 3, len(data) // 3 + 64):
        tampered[i] ^= 0xFF
    checkpoint.write_bytes(bytes(tampered))
    with pytest.raises(CheckpointError, match=str(checkpoint)):
        load_checkpoint(checkpoint)
    with pytest.raises(CheckpointError, match="checkpoint not found"):
        load_checkpoint(checkpoint.with_name("missing.pt"))


class _Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_checkpoint_crafted_to_execute_code_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"model": {}, "payload": _Payload(marker)}, path)
    with pytest.raises(CheckpointError, match=rf"{path}: refused to load"):
        load_checkpoint(path)
    assert not marker.exists()


def test_divergence_stops_with_step_and_rule_and_keeps_last_good_checkpoint(tmp_path, capsys):
    out = tmp_path / "run"
    code = main(["train", "--rule", "fa", "--lr", "1e6", "--momentum", "0", "--checkpoint-every", "1",
                 "--out", str(out), "--no-progress", "--epochs", "1"])
    err = capsys.readouterr().err
    assert code == 1 and "at step" in err and "under rule 'fa'" in err and "last good checkpoint" in err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "diverged"
    state = load_checkpoint(out / "checkpoint.pt")
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())
    assert state["step"] < 43


def test_skip_batch_policy_skips_only_bad_batches(tmp_path):
    class Poisoned(Trainer):
        def setup(self) -> None:
            super().setup()
            self.dataset.x_train[5] = float("nan")  # one bad example poisons one batch per epoch

    cfg = TrainConfig(epochs=2, hidden=(16,), on_divergence="skip-batch")
    summary = Poisoned(cfg, tmp_path / "skip", progress=False).run()
    rows = read_metrics(tmp_path / "skip" / "metrics.jsonl")
    assert summary["status"] == "completed" and [r["skipped_batches"] for r in rows] == [1, 1]
    with pytest.raises(DivergenceError, match="at step"):
        Poisoned(cfg.replace(on_divergence="stop"), tmp_path / "stop", progress=False).run()


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--rule", "xx"], "invalid choice: 'xx'"),
        (["--model", "vgg"], "invalid choice: 'vgg'"),
        (["--data", "imagenet"], "invalid choice: 'imagenet'"),
        (["--bogus-option", "1"], "unrecognized arguments: --bogus-option"),
        (["--lr", "-0.1"], "lr must be a positive number"),
        (["--n-classes", "12"], "n_classes must be between 2 and 10 for digits"),
        (["--label-noise", "1.5"], r"label noise rate must be in \[0, 1\)"),
        (["--epochs", "0"], "epochs must be >= 1"),
        (["--batch-size", "0"], "batch_size must be >= 1"),
        (["--data", "mnist"], "put the four IDX files in a folder and pass --data-dir"),
    ],
)
def test_bad_cli_input_gets_a_clear_message(tmp_path, capsys, argv, message):
    """In-process (an exception other than argparse's exit fails the test); the subprocess test below checks
    one of them as a user's shell sees it."""
    from falign.app.cli import main

    try:
        rc = main(["train", *argv, "--out", str(tmp_path / "r"), "--no-progress"])
    except SystemExit as exit_:  # argparse's own usage errors
        rc = exit_.code
    err = capsys.readouterr().err
    assert rc != 0
    assert re.search(message, err), err
    assert not (tmp_path / "r").exists()


def test_bad_cli_input_in_a_real_process_has_no_traceback(tmp_path):
    result = falign_cli(["train", "--lr", "-0.1", "--out", str(tmp_path / "r"), "--no-progress"])
    assert result.returncode != 0 and "lr must be a positive number" in result.stderr
    assert "Traceback" not in result.stderr


def test_bad_dataset_files_via_cli(tmp_path):
    folder = tmp_path / "idx"
    folder.mkdir()
    for name in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
                 "t10k-labels-idx1-ubyte"):
        (folder / name).write_bytes(b"\x01\x02\x03\x04garbage")
    result = falign_cli(["train", "--data", "fashion-mnist", "--data-dir", str(folder), "--out", str(tmp_path / "r")])
    assert result.returncode == 1 and "not an IDX file (bad magic" in result.stderr and str(folder) in result.stderr


def test_unknown_config_keys_are_listed():
    from falign.app.train import ConfigError

    with pytest.raises(ConfigError, match=r"unknown config key.*learning_rate, optimiser"):
        TrainConfig.from_dict({"learning_rate": 0.1, "optimiser": "sgd"})


def test_existing_run_and_locked_run_are_refused(tmp_path):
    out = tmp_path / "run"
    train(TrainConfig(epochs=1, hidden=(8,)), out, progress=False)
    with pytest.raises(RunError, match=r"already holds a run; pass --resume .* or --overwrite"):
        train(TrainConfig(epochs=1, hidden=(8,)), out, progress=False)
    with open(out / ".lock", "w") as held:  # another process writing this run
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        for kwargs in ({"resume": True}, {"overwrite": True}):
            with pytest.raises(RunError, match="locked by another falign process"):
                train(TrainConfig(epochs=1, hidden=(8,)), out, progress=False, **kwargs)
    with pytest.raises(RunError, match="no run to resume"):
        Trainer(TrainConfig(), tmp_path / "empty", resume=True, progress=False).run()
