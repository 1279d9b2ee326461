"""Data-parallel training on PyTorch's engine: 2 CPU processes (gloo) equal one process, same global batch."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import falign
from falign.app.train import load_checkpoint, read_metrics

FAULTS = Path(__file__).parents[1] / "workers" / "faults.py"  # falign with the faults its environment names
ARGS = ["--data", "synthetic", "--train-subset", "384", "--hidden", "32,32", "--epochs", "2", "--batch-size", "64",
        "--lr", "0.05", "--no-progress"]


def run(args: list[str], nproc: int) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    if nproc == 1:
        cmd = [sys.executable, "-m", "falign", "train", *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               "-m", "falign", "train", *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)


# Rules whose data-parallel path has something of its own (the output-error tap, a per-step redraw or mirror
# step, a learned B) run by default; the others repeat bp's path and run with `pytest -m slow`.
DDP_DEFAULT = ("bp", "dfa", "brsf", "wm", "kp")


@pytest.mark.parametrize("rule", [r if r in DDP_DEFAULT else pytest.param(r, marks=pytest.mark.slow)
                                  for r in falign.available_rules()])
def test_two_processes_match_one_with_the_same_global_batch(tmp_path, rule):
    extra = ["--diagnostics-every", "3"] if falign.get_rule(rule).has_feedback else []
    one, two = tmp_path / "one", tmp_path / "two"
    r1 = run(["--rule", rule, *ARGS, *extra, "--out", str(one)], 1)
    assert r1.returncode == 0, r1.stderr[-2000:]
    r2 = run(["--rule", rule, *ARGS, *extra, "--out", str(two)], 2)
    assert r2.returncode == 0, r2.stderr[-2000:]
    a, b = load_checkpoint(one / "checkpoint.pt")["model"], load_checkpoint(two / "checkpoint.pt")["model"]
    for k in a:  # identical feedback (incl. brsf's redraws) and averaged gradients give the same weights
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-5, msg=k)
    m1 = [r for r in read_metrics(one / "metrics.jsonl") if r["event"] == "epoch"]
    m2 = [r for r in read_metrics(two / "metrics.jsonl") if r["event"] == "epoch"]
    assert [r["step"] for r in m1] == [r["step"] for r in m2]
    for r, s in zip(m1, m2):
        assert s["train_loss"] == pytest.approx(r["train_loss"], rel=1e-4)
        assert s["test_acc"] == pytest.approx(r["test_acc"], abs=1e-3)
    if extra:  # diagnostics come from rank 0 only, one row per diagnostics step
        d1 = [r for r in read_metrics(one / "metrics.jsonl") if r["event"] == "diagnostics"]
        d2 = [r for r in read_metrics(two / "metrics.jsonl") if r["event"] == "diagnostics"]
        assert [r["step"] for r in d1] == [r["step"] for r in d2]
        for r, s in zip(d1, d2):
            for layer, angle in r["gradient_alignment"].items():
                assert s["gradient_alignment"][layer] == pytest.approx(angle, abs=1e-2)
    assert "world_size" in (two / "versions.json").read_text()


def test_two_processes_resume(tmp_path):
    ref, crashed = tmp_path / "ref", tmp_path / "crashed"
    args = ["--rule", "fa", *ARGS, "--checkpoint-every", "4"]
    assert run([*args, "--out", str(ref)], 2).returncode == 0
    env_run = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(FAULTS), "train",
         *args, "--out", str(crashed)], capture_output=True, text=True, timeout=600,
        env={**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1", "FALIGN_TEST_KILL_AT_STEP": "9"})
    assert env_run.returncode != 0
    assert load_checkpoint(crashed / "checkpoint.pt")["step"] == 8
    resumed = run(["--resume", str(crashed), "--no-progress"], 2)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    a, b = load_checkpoint(ref / "checkpoint.pt")["model"], load_checkpoint(crashed / "checkpoint.pt")["model"]
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_torchrun_restarts_a_killed_rank_and_resumes_bit_identical(tmp_path):
    """torchrun --max-restarts=1: rank 0 is SIGKILLed at step 9 (after the step-8 checkpoint); torchrun restarts both
    workers, which continue the run from that checkpoint on their own and end with the weights of an
    uninterrupted run, bit for bit."""
    ref, crashed = tmp_path / "ref", tmp_path / "crashed"
    args = ["--rule", "fa", *ARGS, "--checkpoint-every", "4"]
    assert run([*args, "--out", str(ref)], 2).returncode == 0
    elastic = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "--max-restarts=1",
         str(FAULTS), "train", *args, "--out", str(crashed)], capture_output=True, text=True, timeout=600,
        env={**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1", "FALIGN_TEST_KILL_AT_STEP": "9"})
    assert elastic.returncode == 0, elastic.stderr[-3000:]
    resumes = read_metrics(crashed / "resumes.jsonl")
    assert len(resumes) == 1 and resumes[0]["step"] == 8, resumes
    a, b = load_checkpoint(ref / "checkpoint.pt")["model"], load_checkpoint(crashed / "checkpoint.pt")["model"]
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_torchrun_with_restarts_needs_out(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1", "--max-restarts=1",
         "-m", "falign", "train", *ARGS], capture_output=True, text=True, timeout=300, cwd=tmp_path,
        env={**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"})
    assert proc.returncode != 0 and "--out" in proc.stderr
    assert not (tmp_path / "runs").exists()
