"""Run under torchrun: for each case "rule:schedule:model[:feedback seed of the pipelined copy[:flags]]" (flags:
"bf16": both under torch.autocast; "partial": the batches have 12, 6 and 7 examples, as last partial batches that 4
microbatches do not divide), train 3 steps pipelined and on one process with the same microbatching
(falign.app.pipeline.accumulate), and print one JSON line per rank with the largest difference between this rank's
parameters and the single-process ones."""

from __future__ import annotations

import json
import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import falign
from falign.app.pipeline import Pipeline, accumulate
from falign.models.cnn import LeNet5


def build(kind: str, rule: str, seed: int = 3) -> nn.Module:
    torch.manual_seed(0)
    if kind == "mlp":
        net = nn.Sequential(nn.Flatten(), nn.Linear(20, 24), nn.Tanh(),
                            *[m for _ in range(4) for m in (nn.Linear(24, 24), nn.Tanh())], nn.Linear(24, 5))
    else:
        net = LeNet5(1, 5, 12)
    return falign.convert(net, rule, seed=seed)


def data(kind: str, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + step)
    shape = (12, 20) if kind == "mlp" else (12, 1, 12, 12)
    return torch.randn(shape, generator=g), torch.randint(0, 5, (12,), generator=g)


def optimizer(params) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=0.05, momentum=0.9, weight_decay=1e-3)


def case(rule: str, schedule: str, kind: str, m: int, pipeline_seed: int = 3, bf16: bool = False,
         sizes: tuple[int, ...] = (12, 12, 12)) -> dict[str, float]:
    ref = build(kind, rule)
    x0, y0 = data(kind, 0)
    if falign.uses_target(ref):
        falign.set_target(ref, y0[:2])
    with torch.no_grad():
        ref(x0[:2])  # direct rules size D at the first forward pass
    opt = optimizer(ref.parameters())
    falign.attach(ref, opt)
    model = build(kind, rule, pipeline_seed)  # another seed than the reference's: a negative control
    pipe = Pipeline(model, dist.get_world_size(), schedule=schedule, n_microbatches=m, example=x0)
    popt = optimizer(pipe.parameters())
    falign.attach(pipe.module, popt)
    for step, n in enumerate(sizes):
        x, y = data(kind, step)
        x, y = x[:n], y[:n]
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            opt.zero_grad()
            accumulate(ref, x, y, m, F.cross_entropy)
            popt.zero_grad()
            pipe.step(x, y)
        opt.step()
        popt.step()
        pipe.after_step()
    pipe.close()
    theirs = dict(ref.state_dict())
    worst = {"all": 0.0, "weight": 0.0}
    for k, v in pipe.stage_state().items():
        d = (v.double() - theirs[k].double()).abs().max().item() if v.numel() else 0.0
        worst["all"] = max(worst["all"], d)
        if k.endswith(".weight"):
            worst["weight"] = max(worst["weight"], d)
    return worst


def main() -> None:
    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    for spec in sys.argv[1:]:
        rule, schedule, kind, *extra = spec.split(":")
        flags = extra[1:]
        diff = case(rule, schedule, kind, m=4, pipeline_seed=int(extra[0]) if extra else 3, bf16="bf16" in flags,
                    sizes=(12, 6, 7) if "partial" in flags else (12, 12, 12))
        row = {"case": spec, "rank": dist.get_rank(), "max_abs_diff": diff["all"],
               "max_abs_diff_weights": diff["weight"]}
        print(json.dumps(row), flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
