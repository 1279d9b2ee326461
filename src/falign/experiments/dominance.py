"""Experiment *alignment dominance*: the loss-rate decomposition over training, and convergence.

Under the rule's flow ``dL/dt = −‖∇_{W_L}L‖² − Σ_{l<L} ⟨∇_{W_l}L, G_l⟩``. When the alignment terms never
cancel more than ``1 − c`` of the output-layer term (``ρ ≥ −(1 − c)``), ``dL/dt ≤ −c‖∇_{W_L}L‖²``; with square
loss and last-layer features of full rank this is a Polyak–Łojasiewicz inequality, so the loss decays
exponentially. A small task (fewer examples than hidden units) makes the features separable.
"""

from __future__ import annotations

import math
import time
from functools import partial

import numpy as np
import torch

import falign
from falign.diagnostics import DiagnosticsRecorder
from falign.experiments.base import Context, float64_digits, linear_fit
from falign.experiments.flow import full_batch_loss, loss_of
from falign.models import MLP
from falign.plotting import pyplot, save_figure
from falign.results import ExperimentResult, Table, Verdict

NAME = "dominance"
TITLE = "Alignment dominance and exponential convergence"
HYPOTHESIS = ('During fa/dfa training the alignment terms ⟨∇_{W_l}L, G_l⟩ of hidden layers do not cancel the output'
              " layer's gradient term (ρ ≥ −(1 − c)), and on a task whose last-layer features are separable the "
              'square loss then decays exponentially.')
MARGIN = 0.1
MIN_FRACTION = 0.9
MIN_R2 = 0.9


def verdicts(fractions: dict[str, float], fits: dict[str, tuple[float, float]]) -> list[Verdict]:
    """Dominance supported when it holds in at least 90% of recorded steps for every rule; exponential
    decay when log(loss) against step has a negative slope with R² ≥ 0.9 for every rule."""
    dom = all(f >= MIN_FRACTION for f in fractions.values())
    text = ", ".join(f"{r}: {f:.0%}" for r, f in fractions.items())
    exp_ok = all(s < 0 and r2 >= MIN_R2 for s, r2 in fits.values())
    fit_text = ", ".join(f"{r}: rate {-s:.2e}/step, R² {r2:.3f}" for r, (s, r2) in fits.items())
    return [Verdict(dom, f"dominance (c = {MARGIN}) held in {text} of recorded steps (required ≥ {MIN_FRACTION:.0%})"),
            Verdict(exp_ok, f"log-loss is linear in the step where dominance holds ({fit_text}; required slope < 0, "
                            f"R² ≥ {MIN_R2})")]


RULES = ["fa", "dfa"]


def _params(ctx: Context) -> tuple[int, int, int, int]:
    """(examples, width, steps, record every) for the context's size."""
    return ctx.pick(40, 200, 400), ctx.pick(64, 256, 512), ctx.pick(100, 1500, 4000), ctx.pick(10, 25, 50)


def units(ctx: Context) -> int:
    return len(RULES) * math.ceil(_params(ctx)[2] / 100)


def _forward(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    out = model(x)
    return loss_of(out, y, "mse"), out


def run(ctx: Context) -> ExperimentResult:
    start = time.perf_counter()
    n, width, steps, every = _params(ctx)
    lr = 0.05
    rules = RULES
    x, y = float64_digits(n)
    rows, curves = [], {}
    fractions, fits = {}, {}
    for rule in rules:
        torch.manual_seed(0)
        model = falign.convert(MLP([64, width, width, 10]).to(torch.float64), rule, seed=0)
        rec = DiagnosticsRecorder(model, margin=MARGIN)
        opt = torch.optim.SGD(model.parameters(), lr=lr)
        falign.attach(model, opt)
        losses, records = [], []
        for step in range(steps):
            opt.zero_grad(set_to_none=True)
            if step % every == 0:
                loss, _, record = rec.step(partial(_forward, model, x, y), x)
                records.append((step, record))
            else:
                loss = full_batch_loss(model, x, y, "mse")
                loss.backward()
            losses.append(float(loss.detach()))
            opt.step()
            if step % 100 == 0:
                ctx.tick(1)
        held = [r["decomposition"]["dominance"] for _, r in records]
        fractions[rule] = float(np.mean([bool(h) for h in held]))
        half = steps // 2
        slope, _, r2 = linear_fit(np.arange(half, steps), np.log(np.maximum(losses[half:], 1e-300)))
        fits[rule] = (slope, r2)
        curves[rule] = (losses, records)
        for step, r in records:
            d = r["decomposition"]
            rows.append({"rule": rule, "step": step, "loss": r["loss"], "output term": d["output"],
                         "hidden terms": d["hidden"], "rho": d["rho"], "dominance": d["dominance"],
                         "predicted dL/dt": -d["sum"]})
    plt = pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    for rule, (losses, records) in curves.items():
        axes[0].semilogy(losses, label=rule)
        steps_r = [s for s, _ in records]
        axes[1].plot(steps_r, [r["decomposition"]["output"] for _, r in records], label=f"{rule} output term")
        axes[1].plot(steps_r, [r["decomposition"]["hidden"] for _, r in records], ls="--",
                     label=f"{rule} hidden terms")
        axes[2].plot(steps_r, [r["decomposition"]["rho"] for _, r in records], label=rule)
    axes[0].set(xlabel="step", ylabel="square loss (log scale)", title="convergence")
    axes[1].set(xlabel="step", ylabel="⟨∇L, G⟩", title="loss-rate decomposition", yscale="symlog")
    axes[2].axhline(-(1 - MARGIN), color="r", ls="--", label=f"−(1−c), c={MARGIN}")
    axes[2].set(xlabel="step", ylabel="ρ", title="dominance ratio ρ")
    for ax in axes:
        ax.legend(fontsize=7)
    fig_path = save_figure(fig, ctx.figures / "dominance.png")
    summary = [{"rule": r, "fraction of steps with dominance": fractions[r], "log-loss slope per step": fits[r][0],
                "R² of log-loss fit (second half)": fits[r][1], "final loss": curves[r][0][-1],
                "min rho": float(np.nanmin([row["rho"] if row["rho"] is not None else math.nan
                                            for row in rows if row["rule"] == r]))} for r in rules]
    result_verdicts = verdicts(fractions, fits)
    return ExperimentResult(
        NAME, TITLE, HYPOTHESIS,
        setup={"model": f"MLP 64-{width}-{width}-10 ReLU, float64", "data": f"first {n} sklearn digits (split seed 0)",
               "loss": "square loss ½‖f(x) − onehot‖² (mean over examples)",
               "optimizer": f"full-batch plain SGD lr {lr}, {steps} steps", "rules": rules,
               "diagnostics": f"every {every} steps, margin c = {MARGIN}"},
        tables=[Table("dominance_summary", list(summary[0]), summary, "Per rule: dominance and the exponential fit."),
                Table("dominance_trace", ["rule", "step", "loss", "output term", "hidden terms", "rho", "dominance",
                                          "predicted dL/dt"], rows, "The decomposition at every recorded step.")],
        figures=[fig_path], verdicts=result_verdicts,
        headline={"metric": "steps with dominance (fa, dfa)",
                  "value": ", ".join(f"{fractions[r]:.0%}" for r in rules),
                  "verdict": "supported" if all(v.supported for v in result_verdicts) else "not supported"},
        seconds=time.perf_counter() - start,
    )
