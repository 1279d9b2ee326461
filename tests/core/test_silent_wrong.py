"""Silent wrong results that now are right or loud.

- data-parallel training uses the global batch also for a last batch that does not divide by the ranks;
- a per-step rule whose weights change behind its back (``.data`` writes, ``torch.func.functional_call``)
  raises at the next forward pass;
- the root module's own parameters are checked and reported like any child's;
- ``torch.func`` transforms work on every torch version falign declares.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from torch import nn

import falign
from falign.app.train import load_checkpoint, read_metrics
from falign.convert import ConversionError
from falign.errors import StepWorkSkipped

# 195 = 3 × 64 + 3: the last global batch of each epoch has 3 examples, fewer than 4 ranks (one gets none)
ARGS = ["--data", "synthetic", "--train-subset", "195", "--hidden", "16,16", "--epochs", "2", "--batch-size", "64",
        "--lr", "0.05", "--no-progress"]


def _train(args: list[str], nproc: int) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "falign", "train", *args] if nproc == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "-m", "falign",
        "train", *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    """The single-process run of a rule, trained once per module."""
    runs: dict[str, object] = {}

    def get(rule: str):
        if rule not in runs:
            out = tmp_path_factory.mktemp(f"one_{rule}")
            proc = _train(["--rule", rule, *ARGS, "--out", str(out)], 1)
            assert proc.returncode == 0, proc.stderr[-2000:]
            runs[rule] = out
        return runs[rule]
    return get


@pytest.mark.parametrize(("rule", "nproc", "extra"), [
    ("bp", 2, []), pytest.param("bp", 4, [], marks=pytest.mark.slow), ("dfa", 4, ["--diagnostics-every", "3"]),
    pytest.param("kp", 4, [], marks=pytest.mark.slow), pytest.param("wm", 4, [], marks=pytest.mark.slow),
])
def test_data_parallel_last_batch_is_the_global_batch(tmp_path, one_process, rule, nproc, extra):
    """A data size that does not divide by batch × ranks: 2 and 4 ranks end with one process's weights and
    metrics (every example weighs 1/batch), and a rank left without examples neither diverges nor stalls."""
    one = one_process(rule)
    many = tmp_path / "many"
    proc = _train(["--rule", rule, *ARGS, *extra, "--out", str(many)], nproc)
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = load_checkpoint(one / "checkpoint.pt")["model"], load_checkpoint(many / "checkpoint.pt")["model"]
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-6, atol=1e-6, msg=k)
    m1 = [r for r in read_metrics(one / "metrics.jsonl") if r["event"] == "epoch"]
    m2 = [r for r in read_metrics(many / "metrics.jsonl") if r["event"] == "epoch"]
    assert [r["step"] for r in m1] == [r["step"] for r in m2] == [4, 8]
    for r, s in zip(m1, m2):
        assert s["train_loss"] == pytest.approx(r["train_loss"], rel=1e-5)
        assert s["train_acc"] == pytest.approx(r["train_acc"], abs=1e-9)


# -- per-step work skipped behind the guard's back (item 5) ----------------------------------------------------
def _per_step_model(rule: str) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    model = falign.convert(nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3)), rule, seed=0)
    return model, torch.randn(5, 6), torch.randint(0, 3, (5,))


def _data_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> None:
    model.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    for p in model.parameters():
        if p.grad is not None:
            p.data -= 0.1 * p.grad  # no version counter moves


@pytest.mark.parametrize("rule", ["wm", "brsf"])
def test_data_writes_without_the_per_step_work_raise_at_the_next_forward(rule):
    model, x, y = _per_step_model(rule)
    _data_step(model, x, y)
    with pytest.raises(StepWorkSkipped, match=r"per-step work .* did not run\. Call falign\.attach"):
        model(x)
    with torch.no_grad():  # evaluation needs no per-step work
        model(x)


@pytest.mark.parametrize("rule", ["wm", "brsf"])
def test_data_writes_with_step_rules_run_the_per_step_work(rule):
    model, x, y = _per_step_model(rule)
    before = model[2].feedback_weight.detach().clone()
    for _ in range(3):
        _data_step(model, x, y)
        falign.step_rules(model)
    model(x)
    assert not torch.equal(model[2].feedback_weight.detach(), before)  # wm mirrored, brsf redrew


@pytest.mark.parametrize("rule", ["wm", "brsf"])
def test_attached_optimizer_runs_the_per_step_work(rule):
    model, x, y = _per_step_model(rule)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    falign.attach(model, opt)
    before = model[2].feedback_weight.detach().clone()
    for _ in range(3):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    assert not torch.equal(model[2].feedback_weight.detach(), before)


@pytest.mark.parametrize("rule", ["wm", "brsf"])
def test_functional_call_training_loop_without_the_per_step_work_raises(rule):
    model, x, y = _per_step_model(rule)
    params = {k: v.detach() for k, v in model.named_parameters() if "feedback" not in k}
    buffers = dict(model.named_buffers())

    def loss(p):
        return nn.functional.cross_entropy(torch.func.functional_call(model, {**p, **buffers}, (x,)), y)

    grads = torch.func.grad(loss)(params)
    loss(params)  # the same weights again: fine
    params = {k: v - 0.1 * grads[k] for k, v in params.items()}
    with pytest.raises(StepWorkSkipped, match="functional_call"):
        torch.func.grad(loss)(params)


# -- the root module's own parameters (item 6) -----------------------------------------------------------------
class RootWeight(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.l1 = nn.Linear(4, 8)
        self.W = nn.Parameter(torch.randn(3, 8))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.l1(x)) @ self.W.t()


class TinyViT(nn.Module):
    """timm's VisionTransformer layout: ``cls_token`` and ``pos_embed`` on the root."""

    def __init__(self, embeddings_child: bool = False) -> None:
        super().__init__()
        self.patch_embed = nn.Conv2d(3, 8, 4, stride=4)
        holder = nn.Module() if embeddings_child else self
        holder.cls_token = nn.Parameter(torch.zeros(1, 1, 8))
        holder.pos_embed = nn.Parameter(torch.zeros(1, 5, 8))
        if embeddings_child:  # HF's layout: the same parameters on a ViTEmbeddings child
            self.embeddings = holder
        self.head = nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        holder = self.embeddings if hasattr(self, "embeddings") else self
        tokens = self.patch_embed(x).flatten(2).transpose(1, 2)
        tokens = torch.cat([holder.cls_token.expand(len(x), -1, -1), tokens], 1) + holder.pos_embed
        return self.head(tokens[:, 0])


@pytest.mark.parametrize(("make", "params"), [(RootWeight, "W"), (TinyViT, "cls_token, pos_embed")])
def test_root_parameters_are_refused_like_a_childs(make, params):
    with pytest.raises(ConversionError, match=rf"'\(root\)' \({make.__name__}, parameters: {params}\)"):
        falign.convert(make(), "fa")


def test_root_parameters_are_reported_like_a_childs_under_unsupported_backprop():
    report = falign.conversion_report(falign.convert(RootWeight(), "fa", unsupported="backprop"))
    root = next(r for r in report.layers if r.name == "(root)")
    assert (root.type, root.status, root.rule) == ("RootWeight", "unsupported-backprop", "bp")
    assert "parameters W trained by backprop" in root.note
    assert report.unsupported == ["(root)"] and report.converted == ["l1"]
    # timm's root-level tokens are reported exactly as HF's ViTEmbeddings child holding the same parameters
    timm = falign.conversion_report(falign.convert(TinyViT(), "fa", unsupported="backprop"))
    hf = falign.conversion_report(falign.convert(TinyViT(embeddings_child=True), "fa", unsupported="backprop"))
    (a,), (b,) = [[(r.status, r.note) for r in rep.layers if r.status != "converted"] for rep in (timm, hf)]
    assert a == b == ("unsupported-backprop", "no feedback version; parameters cls_token, pos_embed trained by "
                                              "backprop")


# -- torch.func on every declared torch version (item 12) ------------------------------------------------------
@pytest.mark.parametrize("rule", ["fa", "dfa", "kp", "wm"])
def test_torch_func_grad_and_vmap_run_the_rule(rule):
    """On torch 2.14 ``Function.apply`` is a C method without ``__func__``: the transforms' path must not need it."""
    torch.manual_seed(0)
    model = falign.convert(nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3)), rule, seed=0,
                           example_input=torch.randn(2, 6))
    x, y = torch.randn(4, 6), torch.randint(0, 3, (4,))
    params = {k: v.detach() for k, v in model.named_parameters() if "feedback" not in k}
    buffers = dict(model.named_buffers())

    def loss(p, xb, yb):
        return nn.functional.cross_entropy(torch.func.functional_call(model, {**p, **buffers}, (xb,)), yb)

    grads = torch.func.grad(loss)(params, x, y)
    nn.functional.cross_entropy(model(x), y).backward()
    for k, g in grads.items():
        torch.testing.assert_close(g, dict(model.named_parameters())[k].grad, msg=k)
    per_example = torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0, 0))(params, x[:, None], y[:, None])
    for k, g in per_example.items():
        torch.testing.assert_close(g.mean(0), grads[k], msg=k)


@pytest.mark.parametrize("rule", ["wm", "brsf"])
def test_a_cast_or_move_is_not_taken_for_a_skipped_step(rule):
    """.double() / .to() convert the weights without a training step: no StepWorkSkipped (the guard's copy is of
    the old dtype; it used to compare the bits across dtypes and raise)."""
    model, x, y = _per_step_model(rule)
    model(x).sum().backward()
    model.double()
    model(x.double())  # no error
    _data_step(model, x.double(), y)
    with pytest.raises(StepWorkSkipped):  # and the guard still works after the cast
        model(x.double())


def test_numpy_integer_seeds_are_seeds():
    import numpy as np

    a = falign.convert(nn.Sequential(nn.Linear(4, 3)), "fa", seed=np.int64(3))
    b = falign.convert(nn.Sequential(nn.Linear(4, 3)), "fa", seed=3)
    assert torch.equal(a[0].feedback_weight, b[0].feedback_weight)
