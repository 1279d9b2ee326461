"""Pipeline mode (falign.app.pipeline): the cut, the checks, and 2- and 3-process training that equals one process
with the same microbatching, bit for bit, for every rule and schedule."""

from __future__ import annotations

import itertools
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import falign
from falign.app.pipeline import PipelineError, chain, microbatches, plan, plan_cuts
from falign.app.train import TrainConfig, load_checkpoint
from falign.app.train.config import ConfigError
from falign.models.cnn import LeNet5

WORKER = Path(__file__).parents[1] / "workers" / "pipeline_equal.py"
ENV = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}


def mlp(rule: str, depth: int = 4) -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(8, 16), nn.ReLU(),
                        *[m for _ in range(depth - 2) for m in (nn.Linear(16, 16), nn.ReLU())], nn.Linear(16, 3))
    return falign.convert(net, rule)


def torchrun(nproc: int, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
                           *args], capture_output=True, text=True, env=ENV, timeout=timeout)


# -- the cut ---------------------------------------------------------------------------------------------
def test_chain_flattens_nested_sequentials_and_refuses_other_graphs():
    names = [n for n, _ in chain(LeNet5(1, 10, 28))]
    assert names[:3] == ["features.0", "features.1", "features.2"] and names[-1] == "classifier.5"

    class Residual(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 4)

        def forward(self, x):
            return x + self.b(self.a(x))

    with pytest.raises(PipelineError, match="has its own forward"):
        chain(Residual())


def test_plan_cuts_minimises_the_largest_stage_against_brute_force():
    g = torch.Generator().manual_seed(0)
    for trial in range(30):
        n = int(torch.randint(3, 9, (1,), generator=g))
        costs = (torch.rand(n, generator=g) * 10).tolist()
        allowed = [i for i in range(1, n) if torch.rand(1, generator=g) < 0.7]
        k = min(3, len(allowed) + 1)
        cuts = plan_cuts(costs, k, allowed)

        def worst(starts, n=n, costs=costs):
            bounds = [*starts, n]
            return max(sum(costs[a:b]) for a, b in itertools.pairwise(bounds))

        best = min(worst([0, *c]) for c in itertools.combinations(sorted(allowed), k - 1))
        assert cuts[0] == 0 and set(cuts[1:]) <= set(allowed)
        assert worst(cuts) == pytest.approx(best), (trial, costs, allowed)


def test_plan_checks_rule_schedule_and_size():
    x = torch.randn(4, 8)
    with pytest.raises(PipelineError, match="for the direct rules"):
        plan(mlp("fa"), 2, "unlocked", x)
    with pytest.raises(PipelineError, match="trains with --pipeline-schedule unlocked"):
        plan(mlp("dfa"), 2, "1f1b", x)
    with pytest.raises(PipelineError, match="zbv splits each backward"):
        plan(mlp("kp"), 2, "zbv", x)
    with pytest.raises(PipelineError, match=r"into 6 stages: it has 8 modules in its chain and 3 places to cut"):
        plan(mlp("dfa"), 6, "auto", x)  # a direct stage begins with a Linear layer, never right after Flatten
    with pytest.raises(PipelineError, match="at least 2"):
        plan(mlp("fa"), 1, "auto", x)
    assert plan(mlp("dfa"), 2, "auto", x).schedule == "unlocked"
    assert plan(mlp("fa"), 2, "auto", x).schedule == "1f1b"
    layout = plan(mlp("dfa", depth=6), 3, "auto", x)
    links = layout.links
    assert all(isinstance(links[c][1], falign.nn.FeedbackLayer) for c in layout.cuts[1:])
    with pytest.raises(PipelineError, match="equal microbatches"):
        microbatches(torch.zeros(10, 2), 4)


def test_config_checks_pipeline_flags():
    with pytest.raises(ConfigError, match="for pipeline mode"):
        TrainConfig(pipeline_schedule="gpipe")
    with pytest.raises(ConfigError, match="equal microbatches"):
        TrainConfig(pipeline_stages=2, batch_size=30)  # default M = 4
    with pytest.raises(ConfigError, match="diagnostics are not recorded"):
        TrainConfig(pipeline_stages=2, diagnostics_every=5)
    TrainConfig(pipeline_stages=2, batch_size=32)


def test_pipeline_needs_a_process_group_of_as_many_ranks():
    from falign.app.pipeline import Pipeline

    with pytest.raises(PipelineError, match="needs a process group"):
        Pipeline(mlp("fa"), 2, example=torch.randn(2, 8))


def test_pipeline_is_the_class_of_its_schedule(monkeypatch):
    """``Pipeline(...)`` builds the class of the schedule it plans (PyTorch's schedules for fa, the unlocked one
    for dfa); a subclass asked to run the other schedule is refused."""
    from falign.app import pipeline

    built = []
    monkeypatch.setattr(pipeline.Pipeline, "__init__", lambda self, *a, **k: built.append(type(self)))
    pipeline.Pipeline(mlp("fa"), 2, example=torch.randn(2, 8))
    pipeline.Pipeline(mlp("dfa"), 2, example=torch.randn(2, 8))
    assert built == [pipeline.TorchSchedulePipeline, pipeline.UnlockedPipeline]
    monkeypatch.undo()
    with pytest.raises(PipelineError, match="UnlockedPipeline does not run the 1f1b schedule"):
        pipeline.UnlockedPipeline(mlp("fa"), 2, example=torch.randn(2, 8))


# -- same updates ----------------------------------------------------------------------------------------
def _cases(output: str) -> dict[tuple[str, int], dict]:
    rows = [json.loads(m) for m in re.findall(r'\{"case"[^}]*\}', output)]  # two ranks' lines may interleave
    return {(r["case"], r["rank"]): r for r in rows}


TWO = ["bp:gpipe:mlp", "bp:1f1b:mlp", "bp:zbv:mlp", "fa:gpipe:mlp", "fa:1f1b:mlp", "fa:zbv:mlp", "usf:1f1b:mlp",
       "frsf:zbv:mlp", "brsf:1f1b:mlp", "brsf:zbv:mlp", "kp:1f1b:mlp", "kp:gpipe:lenet", "wm:1f1b:mlp",
       "wm:zbv:mlp", "fa:1f1b:lenet", "dfa:unlocked:mlp", "dkp:unlocked:mlp", "drtp:unlocked:mlp",
       "dfa:unlocked:lenet", "dkp:unlocked:lenet", "drtp:unlocked:lenet",
       # under bfloat16 autocast (activations cross in float32, so sender and receiver agree on the size)
       "dfa:unlocked:mlp:3:bf16", "dkp:unlocked:lenet:3:bf16", "drtp:unlocked:mlp:3:bf16", "fa:1f1b:mlp:3:bf16",
       # batches of 12, 6, 7 (4 microbatches asked: 6 splits into 3, 7 into 1, which 1F1B runs in GPipe's order)
       "bp:gpipe:mlp:3:partial", "fa:1f1b:mlp:3:partial", "fa:zbv:mlp:3:partial", "wm:1f1b:lenet:3:partial",
       "dfa:unlocked:mlp:3:partial", "dkp:unlocked:lenet:3:partial", "drtp:unlocked:mlp:3:partial"]
CONTROLS = ["dfa:unlocked:mlp:4", "fa:1f1b:mlp:4"]  # the pipelined copy has other feedback: it must differ


def test_every_rule_and_schedule_on_two_processes_equals_one_process_bit_for_bit():
    assert {c.split(":")[0] for c in TWO} == set(falign.available_rules())
    proc = torchrun(2, str(WORKER), *TWO, *CONTROLS)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = _cases(proc.stdout)
    for case in TWO:
        for rank in (0, 1):
            assert got[(case, rank)]["max_abs_diff"] == 0.0, got[(case, rank)]
    for case in CONTROLS:
        assert max(got[(case, r)]["max_abs_diff_weights"] for r in (0, 1)) > 1e-3, case


def test_three_stages_equal_one_process():
    cases = ["bp:1f1b:mlp", "fa:zbv:mlp", "kp:1f1b:mlp", "wm:gpipe:mlp", "dfa:unlocked:mlp", "dkp:unlocked:mlp",
             "drtp:unlocked:lenet"]
    proc = torchrun(3, str(WORKER), *cases)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = _cases(proc.stdout)
    for case in cases:
        for rank in (0, 1, 2):
            assert got[(case, rank)]["max_abs_diff"] == 0.0, got[(case, rank)]


# -- falign train --pipeline-stages ----------------------------------------------------------------------
ARGS = ["--data", "synthetic", "--train-subset", "256", "--hidden", "32,32,32", "--epochs", "2", "--batch-size",
        "32", "--lr", "0.05", "--no-progress"]


def train(nproc: int, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """``falign train`` under torchrun; with ``env``, through tests/workers/faults.py (the faults it names)."""
    entry = [str(Path(__file__).parents[1] / "workers" / "faults.py")] if env else ["-m", "falign"]
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           f"--nproc_per_node={nproc}", *entry, "train", *args], capture_output=True,
                          text=True, env={**ENV, **(env or {})}, timeout=600)


@pytest.mark.parametrize("rule", ["dfa", pytest.param("fa", marks=pytest.mark.slow)])
def test_train_in_pipeline_mode_checkpoints_and_resumes_bit_identical(tmp_path, rule):
    ref, crashed = tmp_path / "ref", tmp_path / "crashed"
    args = ["--rule", rule, *ARGS, "--pipeline-stages", "2", "--checkpoint-every", "5"]
    done = train(2, *args, "--out", str(ref))
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((ref / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["steps"] == 16
    # one stage's process dies mid-run (rank 1 only): no half-written checkpoint, the step-10 one resumes
    killed = train(2, *args, "--out", str(crashed),
                   env={"FALIGN_TEST_KILL_AT_STEP": "12", "FALIGN_TEST_KILL_RANK": "1"})
    assert killed.returncode != 0
    saved = load_checkpoint(crashed / "checkpoint.pt")
    assert saved["step"] == 10 and saved["pipeline"]["stages"] == 2
    resumed = train(2, "--resume", str(crashed), "--no-progress")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a, b = load_checkpoint(ref / "checkpoint.pt")["model"], load_checkpoint(crashed / "checkpoint.pt")["model"]
    assert "fc1.weight" in a and "fc4.weight" in a  # the whole model's keys, gathered from both stages
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("rule", ["dfa", "fa"])
def test_a_pipelined_run_trains_on_every_example_as_one_process_does(tmp_path, rule):
    """250 examples in batches of 32: the last batch (26) splits into 2 microbatches of 13. The pipelined run takes
    the single-process run's steps and ends at its weights (to float rounding: microbatch means are summed in
    another order); the negative control, one process without the last batch (--drop-last, what pipeline mode did
    before), ends elsewhere."""
    args = ["--rule", rule, *ARGS, "--train-subset", "250"]
    runs = {name: tmp_path / name for name in ("pipe", "one", "dropped")}
    done = train(2, *args, "--pipeline-stages", "2", "--out", str(runs["pipe"]))
    assert done.returncode == 0, done.stderr[-3000:]
    for name, extra in (("one", []), ("dropped", ["--drop-last"])):
        proc = subprocess.run([sys.executable, "-m", "falign", "train", *args, *extra, "--out", str(runs[name])],
                              capture_output=True, text=True, env=ENV, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
    steps = {n: json.loads((d / "summary.json").read_text())["steps"] for n, d in runs.items()}
    assert steps == {"pipe": 16, "one": 16, "dropped": 14}
    weights = {n: load_checkpoint(d / "checkpoint.pt")["model"] for n, d in runs.items()}

    def gap(a: str, b: str) -> float:
        return max(float((weights[a][k] - weights[b][k]).abs().max()) for k in weights[a]
                   if weights[a][k].dtype.is_floating_point)

    assert gap("pipe", "one") < 1e-5
    assert gap("dropped", "one") > 1e-3


def test_train_refuses_a_model_it_cannot_cut_and_a_wrong_process_count(tmp_path):
    resnet = train(2, "--rule", "fa", "--model", "resnet20", "--data", "digits", "--pipeline-stages", "2",
                   "--epochs", "1", "--batch-size", "32", "--no-progress", "--out", str(tmp_path / "r"))
    assert resnet.returncode != 0 and "has its own forward" in resnet.stderr
    assert not (tmp_path / "r").exists()
    wrong = train(2, "--rule", "dfa", *ARGS, "--pipeline-stages", "4", "--out", str(tmp_path / "w"))
    assert wrong.returncode != 0 and "runs one stage per process" in wrong.stderr



# -- falign bench pipeline -------------------------------------------------------------------------------
def test_cost_model_formulas():
    from falign.app.bench.pipeline import model_step, scaled

    f, b, c = [1.0, 1.0], [2.0, 2.0], 0.5
    assert model_step("gpipe", f, b, 4, c) == pytest.approx((4 + 1) * 3 + 2 * 0.5)  # bubble (K-1)/(M+K-1)
    assert model_step("1f1b", f, b, 4, c) == model_step("gpipe", f, b, 4, c)
    assert model_step("zbv", f, b, 4, c) == pytest.approx(4 * 3 + 1 * 1 + 2 * 0.5)
    assert model_step("unlocked", f, b, 4, c) == pytest.approx(4 * 3 + 0.5)
    assert model_step("gpipe", [1.0, 3.0], [2.0, 2.0], 4, 0.0) == pytest.approx(5 * 5)  # the slowest stage sets it
    # K stages share the work evenly: with free messages the unlocked schedule scales by K, GPipe loses its bubble
    assert (16.0 + 32.0) / scaled("unlocked", 16.0, 32.0, 16, 0.0) == pytest.approx(16.0)
    assert scaled("gpipe", 16.0, 32.0, 4, 0.0) / scaled("unlocked", 16.0, 32.0, 4, 0.0) == pytest.approx(11 / 8)
    with pytest.raises(ValueError):
        model_step("pipedream", f, b, 4, c)


def test_bench_pipeline_writes_its_table_and_figure(tmp_path):
    docs = tmp_path / "bench.md"
    docs.write_text("# Benchmarks\n")
    proc = subprocess.run([sys.executable, "-m", "falign", "bench", "pipeline", "--models", "cnn", "--steps", "1",
                           "--repeats", "1", "--warmup", "0", "--out", str(tmp_path / "out"), "--docs", str(docs)],
                          capture_output=True, text=True, env=ENV, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = docs.read_text()
    for variant in ("| bp | gpipe |", "| bp | 1f1b |", "| bp | zbv |", "| dfa | unlocked |", "| drtp | unlocked |"):
        assert variant in text
    assert "K=16" in text and (tmp_path / "figures" / "pipeline.png").is_file()
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    for row in summary["measured"]:
        assert len(row["bubble"]) == 2 and all(0.0 <= b <= 1.0 for b in row["bubble"])
        if row["rule"] == "drtp":  # nothing travels backwards
            assert row["bytes_per_step"][1] == 0.0
        elif row["rule"] == "dfa":  # only the output errors, far smaller than the activations sent forward
            assert 0.0 < row["bytes_per_step"][1] < row["bytes_per_step"][0] / 10
        else:  # bp sends each microbatch's input gradient back: as many bytes as the activations forward
            assert row["bytes_per_step"][0] == row["bytes_per_step"][1] > 0
