"""Pipeline benchmark: the direct rules' unlocked schedule against backprop's GPipe, 1F1B and zero-bubble (zbv).

``falign bench pipeline`` starts K = 2 processes of one thread each (``torch.distributed.run``, gloo) and, for a
deep MLP (784 → 8 × 1024 → 10, batch 128) and a CNN (four 3×3 convolutions and two Linear layers on 28×28
inputs, batch 64), trains with each schedule on the same cut (:func:`falign.app.pipeline.plan`), M = 4
microbatches, SGD:

- **step time**: the mean of 10 steps between two barriers, repeated (median and range reported);
- **bubble** of each stage: ``1 − busy / step time``, where ``busy`` is the time the stage's own forward and
  backward passes of the M microbatches take on that process with no communication (measured in the same
  process, the same way for every schedule);
- **bytes** each stage sends per step (activations, input gradients, dfa's broadcast output errors).

A cost model of each schedule from the measured per-stage forward (F) and backward (B) time per microbatch and
the time C of one message (a ping-pong of one boundary activation):

- GPipe and 1F1B: ``(M + K − 1)·max(F + B) + 2(K − 1)·C + O`` (a flush per step: the bubble (K−1)/(M+K−1));
- zero-bubble (ZB-H1 bound of Qi et al., 2023, with the backward split evenly into its input and weight
  halves): ``M·max(F + B) + (K − 1)·max F + 2(K − 1)·C + O``;
- unlocked (a stage waits only for its input and the output error, and overlaps the next step's forward
  passes with the later stages' backward): ``M·max(F + B) + C + O``,

with O the slowest stage's optimiser step (measured alone too).

It is checked against the K = 2 measurements (the error is printed beside them), then used for K = 2 … 16 with
the measured single-process compute split evenly over K stages and M = 2K microbatches of a fixed batch:
the modelled speed-up over one process (same rule) and the ratio of dfa's unlocked step to backprop's best schedule.
Writes ``results.json``, ``summary.json`` and ``pipeline.png`` (with the ``plot`` extra) into ``--out``; with
``--docs FILE`` (in the repository: ``--docs docs/benchmarks.md``) the pipeline section of that Markdown file and
its figure ``figures/pipeline.png`` beside it instead.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from falign.app.pipeline import LAYER_SCHEDULES

VARIANTS = (("bp", "gpipe"), ("bp", "1f1b"), ("bp", "zbv"), ("dfa", "unlocked"), ("drtp", "unlocked"))
MODELS = {"mlp": 128, "cnn": 64}
BEGIN, END = "<!-- pipeline:begin -->", "<!-- pipeline:end -->"
KS = (2, 4, 8, 16)
LINESTYLE = {"gpipe": "--", "1f1b": "-", "zbv": "-", "unlocked": "-."}  # gpipe and 1f1b model alike: both show


def build(name: str) -> nn.Module:
    """The benchmark's models, plain ``nn.Sequential`` chains."""
    torch.manual_seed(0)
    if name == "mlp":
        widths = [784] + [1024] * 8
        layers: list[nn.Module] = [nn.Flatten()]
        for a, b in itertools.pairwise(widths):
            layers += [nn.Linear(a, b), nn.ReLU()]
        return nn.Sequential(*layers, nn.Linear(1024, 10))
    return nn.Sequential(
        nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(64 * 7 * 7, 256), nn.ReLU(), nn.Linear(256, 10))


def data(name: str) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    n = MODELS[name]
    return torch.randn(n, 1, 28, 28, generator=g), torch.randint(0, 10, (n,), generator=g)


# -- cost model ----------------------------------------------------------------------------------------
def model_step(schedule: str, f: list[float], b: list[float], m: int, c: float, o: float = 0.0) -> float:
    """Modelled step time of ``schedule`` for per-stage forward ``f`` and backward ``b`` times per microbatch,
    ``m`` microbatches, message time ``c`` and optimiser step ``o`` (the slowest stage's; formulas in the module
    docstring)."""
    k = len(f)
    busy = max(fi + bi for fi, bi in zip(f, b))
    if schedule in ("gpipe", "1f1b"):
        return (m + k - 1) * busy + 2 * (k - 1) * c + o
    if schedule == "zbv":
        return m * busy + (k - 1) * max(f) + 2 * (k - 1) * c + o
    if schedule == "unlocked":
        return m * busy + c + o
    raise ValueError(f"unknown schedule {schedule!r}")


def scaled(schedule: str, f_total: float, b_total: float, k: int, c: float, o_total: float = 0.0) -> float:
    """Modelled step time on ``k`` stages: the single-process forward/backward time of the batch and its optimiser
    step split evenly over ``k`` stages and ``2k`` microbatches."""
    m = 2 * k
    return model_step(schedule, [f_total / (m * k)] * k, [b_total / (m * k)] * k, m, c, o_total / k)


# -- the worker (one per process) ----------------------------------------------------------------------
def _local_times(pipe, x: torch.Tensor, repeats: int = 5) -> tuple[float, float]:
    """Forward and forward+backward time of this rank's chunks for one microbatch, no communication."""
    import falign

    mb = x.shape[0] // pipe.m
    inputs = [x[:mb]]
    with torch.no_grad(), falign.functional.backprop_mode():
        for chunk in pipe.chunks[:-1]:
            inputs.append(chunk(inputs[-1]))
    fwd, both = [], []
    for _ in range(repeats):
        tf = tb = 0.0
        for i in pipe.mine:
            inp = inputs[i].detach().requires_grad_(i > 0 and pipe.schedule_name != "unlocked")
            t0 = time.perf_counter()
            if pipe.tap is not None:
                pipe.tap.begin()
            out = pipe.chunks[i](inp)
            session = pipe.tap.close() if pipe.tap is not None else None
            t1 = time.perf_counter()
            if session is not None:
                session.error = torch.randn(mb, *pipe.output_tail)
                session.target = torch.zeros(mb, dtype=torch.long)
            if i + 1 < len(pipe.chunks) and pipe.schedule_name == "unlocked":
                grad = pipe.next_first.direct_input_signal(session, out.shape)
            else:
                grad = torch.randn_like(out)
            out.backward(grad)
            t2 = time.perf_counter()
            tf += t1 - t0
            tb += t2 - t1
        fwd.append(tf)
        both.append(tb)
    for p in pipe.parameters():
        p.grad = None
    return statistics.median(fwd), statistics.median(both)


def _optimizer_time(pipe, opt, repeats: int = 5) -> float:
    """This rank's optimiser step (with the rule's per-step work), gradients of ones."""
    for p in pipe.parameters():
        p.grad = torch.ones_like(p) * 1e-6
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        opt.step()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _ping(pipe, x: torch.Tensor, repeats: int = 20) -> float:
    """One-way time of one boundary activation between rank 0 and rank 1 (half a ping-pong)."""
    import torch.distributed as dist

    import falign

    mb = x.shape[0] // pipe.m
    with torch.no_grad(), falign.functional.backprop_mode():
        t = pipe.chunks[0](x[:mb]).contiguous()
    times = []
    for _ in range(repeats):
        dist.barrier()
        t0 = time.perf_counter()
        if pipe.rank == 0:
            dist.send(t, 1)
            dist.recv(t, 1)
        elif pipe.rank == 1:
            dist.recv(t, 0)
            dist.send(t, 0)
        times.append((time.perf_counter() - t0) / 2)
    return statistics.median(times)


def worker(args: argparse.Namespace) -> None:
    import torch.distributed as dist

    import falign
    from falign.app.pipeline import Pipeline

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    results = []
    for model_name in args.models.split(","):
        x, y = data(model_name)
        for rule, schedule in VARIANTS:
            model = falign.convert(build(model_name), rule, seed=0)
            pipe = Pipeline(model, dist.get_world_size(), schedule=schedule, n_microbatches=args.microbatches,
                            example=x)
            opt = torch.optim.SGD(pipe.parameters(), lr=1e-3, momentum=0.9)
            falign.attach(pipe.module, opt)

            def step(pipe=pipe, opt=opt, x=x, y=y):
                opt.zero_grad(set_to_none=True)
                pipe.step(x, y)
                opt.step()
                pipe.after_step()

            for _ in range(args.warmup):
                step()
            pipe.close()
            dist.barrier()
            repeats = []
            pipe.bytes_sent = 0
            for _ in range(args.repeats):
                dist.barrier()
                t0 = time.perf_counter()
                for _ in range(args.steps):
                    step()
                pipe.close()
                dist.barrier()
                repeats.append((time.perf_counter() - t0) / args.steps)
            sent = pipe.bytes_sent / (args.repeats * args.steps)
            f, fb = _local_times(pipe, x)
            c = _ping(pipe, x)
            o = _optimizer_time(pipe, opt)
            mine = {"rank": rank, "forward_s": f, "backward_s": fb, "optimizer_s": o, "bytes_per_step": sent,
                    "ping_s": c,
                    "step_s": repeats, "cuts": pipe.cuts, "chunks": pipe.describe()}
            parts: list[Any] = [None] * dist.get_world_size()
            dist.all_gather_object(parts, mine)
            if rank == 0:
                results.append({"model": model_name, "rule": rule, "schedule": schedule, "microbatches": pipe.m,
                                "batch": MODELS[model_name], "ranks": parts})
                print(f"{model_name} {rule} {schedule}: {statistics.median(repeats) * 1e3:.1f} ms/step", flush=True)
            pipe.close()
            dist.barrier()
    if rank == 0:
        Path(args.results).write_text(json.dumps(results, indent=1))
    dist.destroy_process_group()


# -- the report ----------------------------------------------------------------------------------------
def summarize(results: list[dict]) -> list[dict]:
    rows = []
    for r in results:
        ranks = sorted(r["ranks"], key=lambda p: p["rank"])
        step = statistics.median(ranks[0]["step_s"])
        spread = [min(ranks[0]["step_s"]), max(ranks[0]["step_s"])]
        f = [p["forward_s"] for p in ranks]
        b = [p["backward_s"] for p in ranks]
        m = r["microbatches"]
        c = statistics.median(p["ping_s"] for p in ranks)
        o = [p["optimizer_s"] for p in ranks]
        modelled = model_step(r["schedule"], f, b, m, c, max(o))
        rows.append({**{k: r[k] for k in ("model", "rule", "schedule", "microbatches", "batch")},
                     "step_ms": step * 1e3, "range_ms": [s * 1e3 for s in spread],
                     "bubble": [max(0.0, 1 - (m * (fi + bi) + oi) / step) for fi, bi, oi in zip(f, b, o)],
                     "optimizer_ms": [v * 1e3 for v in o],
                     "bytes_per_step": [p["bytes_per_step"] for p in ranks],
                     "modelled_ms": modelled * 1e3, "forward_ms": [v * 1e3 for v in f],
                     "backward_ms": [v * 1e3 for v in b], "message_ms": c * 1e3})
    for model in dict.fromkeys(r["model"] for r in rows):
        sub = [r for r in rows if r["model"] == model]
        best = min((r for r in sub if r["schedule"] in LAYER_SCHEDULES), key=lambda r: r["step_ms"])
        for r in sub:
            r["vs_bp_best"] = r["step_ms"] / best["step_ms"]
            r["bp_best"] = best["schedule"]
    return rows


def projection(rows: list[dict]) -> list[dict]:
    """Modelled step times for K = 2…16 from the measured K = 2 compute: a rule's forward and backward time of the
    whole batch on one process (summed over the two stages, the median over that rule's schedules)."""
    out = []
    for model in dict.fromkeys(r["model"] for r in rows):
        sub = [r for r in rows if r["model"] == model]
        compute = {}
        for rule in dict.fromkeys(r["rule"] for r in sub):
            mine = [r for r in sub if r["rule"] == rule]
            compute[rule] = (statistics.median(sum(r["forward_ms"]) * r["microbatches"] for r in mine),
                             statistics.median(sum(r["backward_ms"]) * r["microbatches"] for r in mine),
                             statistics.median(sum(r["optimizer_ms"]) for r in mine))
        message = statistics.median(r["message_ms"] for r in sub)
        for r in sub:
            f_total, b_total, o_total = compute[r["rule"]]
            for k in KS:
                t = scaled(r["schedule"], f_total, b_total, k, message, o_total)
                out.append({"model": model, "rule": r["rule"], "schedule": r["schedule"], "K": k, "step_ms": t,
                            "speedup": (f_total + b_total + o_total) / t})
    for model in dict.fromkeys(p["model"] for p in out):
        for k in KS:
            here = [p for p in out if p["model"] == model and p["K"] == k]
            best = min(p["step_ms"] for p in here if p["schedule"] in LAYER_SCHEDULES)
            for p in here:
                p["vs_bp_best"] = p["step_ms"] / best
    return out


def figure(proj: list[dict], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    models = list(dict.fromkeys(p["model"] for p in proj))
    fig, axes = plt.subplots(2, len(models), figsize=(5 * len(models), 6.4), squeeze=False)
    for col, model in enumerate(models):
        for rule, schedule in VARIANTS:
            pts = [p for p in proj if p["model"] == model and p["rule"] == rule and p["schedule"] == schedule]
            for row, key in enumerate(("speedup", "vs_bp_best")):
                axes[row][col].plot([p["K"] for p in pts], [p[key] for p in pts], marker="o",
                                    linestyle=LINESTYLE[schedule],
                                    label=f"{rule} {schedule}")
        axes[0][col].plot(KS, KS, color="grey", linestyle=":", label="ideal (K×)")
        axes[0][col].set_title(model)
        axes[0][col].set_ylabel("modelled speed-up over one process")
        axes[1][col].set_ylabel("step time ÷ bp's best schedule")
        for ax in (axes[0][col], axes[1][col]):
            ax.set_xscale("log", base=2)
            ax.set_xticks(KS, [str(k) for k in KS])
            ax.set_xlabel("pipeline stages K (M = 2K microbatches)")
            ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def markdown(rows: list[dict], proj: list[dict], seconds: float, figure_path: str | None) -> str:
    machine = f"{platform.machine()} CPU, 2 processes × 1 thread, torch {torch.__version__}"
    lines = [BEGIN, "## Pipeline stages: dfa's unlocked schedule against backprop's GPipe, 1F1B and zero-bubble", "",
             f"Generated by `falign bench pipeline` on {machine} in {seconds / 60:.1f} min. K = 2 stages (one "
             "per process, gloo), the same cut for every schedule, M = 4 microbatches, SGD. Step time: mean of "
             "10 steps between barriers, median (range) of the repeats. Bubble: 1 − (the stage's own forward + "
             "backward time for the M microbatches and its optimiser step, measured alone) / step time. Bytes: "
             "sent by each stage per step. Model: the cost model of `falign bench pipeline --help` from the "
             "measured per-stage times.", "",
             "| model | rule | schedule | ms / step | × bp's best | bubble stage 0 / 1 | MiB sent stage 0 / 1 | "
             "modelled ms (error) |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        err = (r["modelled_ms"] - r["step_ms"]) / r["step_ms"] * 100
        lines.append(
            f"| {r['model']} (b={r['batch']}) | {r['rule']} | {r['schedule']} | {r['step_ms']:.1f} "
            f"({r['range_ms'][0]:.1f}–{r['range_ms'][1]:.1f}) | {r['vs_bp_best']:.2f} | "
            f"{' / '.join(f'{b:.2f}' for b in r['bubble'])} | "
            f"{' / '.join(f'{v / 2**20:.2f}' for v in r['bytes_per_step'])} | {r['modelled_ms']:.1f} ({err:+.0f}%) |")
    lines += ["", "Modelled for K stages (the measured compute split evenly, M = 2K microbatches of the same batch, "
              "the measured message time): step time of each schedule relative to backprop's best schedule at that "
              "K, and in brackets the speed-up over one process training with the same rule.", "",
              "| model | rule | schedule | " + " | ".join(f"K={k}: × bp best (speed-up)" for k in KS) + " |",
              "|---|---|---|" + "---|" * len(KS)]
    for model in dict.fromkeys(p["model"] for p in proj):
        for rule, schedule in VARIANTS:
            pts = [p for p in proj if p["model"] == model and p["rule"] == rule and p["schedule"] == schedule]
            if pts:
                lines.append(f"| {model} | {rule} | {schedule} | " + " | ".join(
                    f"{p['vs_bp_best']:.2f} ({p['speedup']:.1f}×)" for p in pts) + " |")
    if figure_path:
        lines += ["", f"![modelled speed-up]({figure_path})"]
    lines.append(END)
    return "\n".join(lines)


def build_parser(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--models", default="mlp,cnn", help="comma-separated: mlp (8 × 1024), cnn (default: both)")
    parser.add_argument("--microbatches", type=int, default=4, help="microbatches per batch (default: 4)")
    parser.add_argument("--steps", type=int, default=10, help="steps per timed repeat (default: 10)")
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats (default: 5)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first (default: 3)")
    parser.add_argument("--out", default="runs/bench-pipeline", help="results.json and pipeline.png")
    parser.add_argument("--docs", default=None, metavar="FILE",
                        help="also regenerate the pipeline section of this Markdown file (and figures/pipeline.png "
                             "beside it), e.g. --docs docs/benchmarks.md in the repository (default: no file is "
                             "changed)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--results", default=None, help=argparse.SUPPRESS)
    return parser


def run(args: argparse.Namespace) -> None:
    from falign.app.bench.accuracy import update_docs
    from falign.app.outdir import OutputDir, check_file
    from falign.errors import FalignError

    if args.worker:
        worker(args)
        return
    from falign.app.bench.speed import names

    models = names(args.models, list(MODELS), "models")
    for name, value, low in (("--microbatches", args.microbatches, 1), ("--steps", args.steps, 1),
                             ("--repeats", args.repeats, 1), ("--warmup", args.warmup, 0)):
        if value < low:
            raise FalignError(f"{name} must be at least {low}, got {value}")
    if args.docs:
        check_file(args.docs, "--docs")
    target = OutputDir(args.out, "bench", "--out")
    target.check()
    out = target.claim()
    results = out / "results.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "falign",
           "bench", "pipeline", "--worker", "--results", str(results), "--models", ",".join(models),
           "--microbatches", str(args.microbatches), "--steps", str(args.steps), "--repeats", str(args.repeats),
           "--warmup", str(args.warmup)]
    start = time.perf_counter()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(cmd, env=env, stdout=None, stderr=subprocess.PIPE, text=True)
    if proc.returncode != 0:
        raise FalignError(f"the benchmark's processes failed:\n{proc.stderr[-3000:]}")
    seconds = time.perf_counter() - start
    rows = summarize(json.loads(results.read_text()))
    proj = projection(rows)
    (out / "summary.json").write_text(json.dumps({"measured": rows, "modelled": proj}, indent=1))
    fig_rel = None
    if args.docs:
        fig_path = Path(args.docs).parent / "figures" / "pipeline.png"
        fig_path.parent.mkdir(parents=True, exist_ok=True)
        if figure(proj, fig_path):
            fig_rel = "figures/pipeline.png"
    elif figure(proj, out / "pipeline.png"):
        fig_rel = str(out / "pipeline.png")
    section = markdown(rows, proj, seconds, fig_rel)
    if args.docs:
        update_docs(Path(args.docs), section, BEGIN, END)
    print(section.replace(BEGIN, "").replace(END, "").strip())
    print(f"\nresults: {results}" + (f"; updated {args.docs}" if args.docs else ""))
