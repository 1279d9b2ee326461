"""Experiment *alignment dominance*: the loss-rate decomposition over training, and exponential convergence.

Under the rule's flow ``dL/dt = −‖∇_{W_L}L‖² − Σ_{l<L} ⟨∇_{W_l}L, G_l⟩ = −(1 + ρ)‖∇_{W_L}L‖²``. With square loss
``L = ‖E‖²/(2N)`` over ``N`` examples and the output layer's input features ``H̃`` (with a column of ones for
its bias), ``‖∇_{W_L}L‖² = ‖Eᵀ H̃‖²/N² ≥ (2/N) λ_min(H̃H̃ᵀ) L``, so

    −d log L / dt ≥ (1 + ρ) · (2/N) · λ_min(H̃H̃ᵀ)                                   (the bound)

and under dominance (``1 + ρ ≥ c > 0``) with full-rank features (``N ≤ width``) the loss decays exponentially.
Three tests, each able to fail, and one control built to fail them:

1. dominance holds (ρ ≥ −(1 − c), c = 0.1) in at least 90% of recorded steps, for every seed;
2. the loss decays exponentially, not as a power law: over the last three quarters of training (down to a loss
   of 1e-20, below which float64 rounding sets it) an exponential
   ``log L = a − r t`` fits better than a power law ``log L = a − k log t`` (ΔAIC ≥ 10 for every seed);
3. the loss falls at least as far as the bound says: the measured decay of log L over the run is at least 0.9×
   the bound integrated over time, ∫(1 + ρ)(2/N)λ_min dt, from the ρ and λ_min measured at every record;
4. control: FA with its output layer's feedback anti-aligned with W₀ (θ = 180°) and four times its norm, so the
   hidden layers move against their gradient — dominance is expected to fail and the verdict to flip.

The fraction of steps with dominance is also reported over a sweep of the margin c.
"""

from __future__ import annotations

import itertools
import math
import time
from functools import partial
from typing import Any

import numpy as np
import torch

import falign
from falign.convert import conversion_report
from falign.diagnostics import DiagnosticsRecorder
from falign.experiments.base import Context, float64_digits
from falign.experiments.flow import loss_of
from falign.experiments.runs import feedback_at_angle
from falign.experiments.sources import PAPER_DATA
from falign.experiments.stats import mean_ci
from falign.models import MLP
from falign.nn import FeedbackLayer
from falign.plotting import pyplot, save_figure
from falign.results import INCONCLUSIVE, ExperimentResult, Table, Verdict, combine

NAME = "dominance"
TITLE = "Alignment dominance and exponential convergence"
HYPOTHESIS = ("During fa/dfa/usf training the hidden layers' alignment terms ⟨∇_{W_l}L, G_l⟩ never cancel the output "
              "layer's gradient term (ρ ≥ −(1 − c)); with square loss and full-rank last-layer features the loss then "
              "decays exponentially, at least at the rate (1 + ρ)(2/N)λ_min(H̃H̃ᵀ).")
RULES = ["fa", "dfa", "usf"]
MARGIN = 0.1
MARGINS = [0.1, 0.25, 0.5, 0.75, 0.9]
MIN_FRACTION = 0.9
MIN_DELTA_AIC = 10.0
BOUND_SLACK = 0.9  # measured rate ≥ 0.9 × bound (a step of size η is not the flow)
FLOOR = 1e-20  # losses below this are float64 rounding, left out of fits
CONTROL = "fa, output feedback at 180° ×4"


# ---- verdict functions (pure; tested on constructed inputs) -----------------------------------------------
def fit_decay(steps: np.ndarray, losses: np.ndarray) -> dict[str, float]:
    """Fit ``log L`` against step with an exponential (``a − r t``) and a power law (``a − k log t``); both have
    two parameters, so ``ΔAIC = n log(RSS_power / RSS_exp)`` (positive: the exponential fits better)."""
    t, y = np.asarray(steps, float), np.log(np.asarray(losses, float))
    keep = np.isfinite(y) & (t > 0)
    t, y = t[keep], y[keep]
    if len(t) < 4:
        return {"rate": math.nan, "power": math.nan, "delta_aic": math.nan}
    exp = np.polyfit(t, y, 1)
    pw = np.polyfit(np.log(t), y, 1)
    rss_e = float(np.sum((y - np.polyval(exp, t)) ** 2)) + 1e-300
    rss_p = float(np.sum((y - np.polyval(pw, np.log(t))) ** 2)) + 1e-300
    return {"rate": float(-exp[0]), "power": float(-pw[0]), "delta_aic": float(len(t) * math.log(rss_p / rss_e))}


def dominance_verdict(fractions: list[float], who: str, control: bool = False) -> Verdict:
    """Dominance at margin c = 0.1 holds in ≥ 90% of recorded steps of every seed."""
    if not fractions:
        return Verdict(INCONCLUSIVE, "no step recorded", f"{who}: dominance", control)
    ci = mean_ci(fractions, bounds=(0, 1))
    return Verdict.of(min(fractions) >= MIN_FRACTION,
                      f"{who}: dominance (c = {MARGIN}) held in {ci.fmt('.0%')} of recorded steps (mean over "
                      f"{len(fractions)} seeds, 95% CI; lowest seed {min(fractions):.0%}; required ≥ "
                      f"{MIN_FRACTION:.0%} in every seed)", f"{who}: dominance", control)


def exponential_verdict(delta_aics: list[float], rates: list[float], who: str, control: bool = False) -> Verdict:
    """The exponential beats the power law by ΔAIC ≥ 10 in every seed, at a positive rate; not supported when
    a power law wins (ΔAIC ≤ −10) or the loss does not fall; otherwise inconclusive."""
    claim = f"{who}: exponential decay"
    fin = [d for d in delta_aics if math.isfinite(d)]
    if not fin:
        return Verdict(INCONCLUSIVE, f"{who}: no decay could be fitted", claim, control)
    text = (f"{who}: ΔAIC (power law − exponential) {min(fin):.0f}…{max(fin):.0f} over {len(fin)} seeds, rate "
            f"{mean_ci(rates).fmt('.2e')} per step (exponential preferred when ΔAIC ≥ {MIN_DELTA_AIC:g})")
    if all(d >= MIN_DELTA_AIC for d in fin) and all(r > 0 for r in rates) and len(fin) == len(delta_aics):
        return Verdict.of(True, text, claim, control)
    if any(d <= -MIN_DELTA_AIC for d in fin) or any(not r > 0 for r in rates):
        return Verdict.of(False, text, claim, control)
    return Verdict(INCONCLUSIVE, text + "; neither form clearly better", claim, control)


def bound_verdict(ratios: list[float], who: str) -> Verdict:
    """The loss fell at least 0.9× as far (in log) as the bound ∫(1 + ρ)(2/N)λ_min dt allows, in every seed;
    inconclusive when the integrated bound was not positive (no dominance or rank-deficient features)."""
    claim = f"{who}: decay at least the bound (1 + ρ)(2/N)λ_min(H̃H̃ᵀ)"
    fin = [f for f in ratios if math.isfinite(f)]
    if not fin or len(fin) < len(ratios):
        return Verdict(INCONCLUSIVE, f"{who}: the integrated bound was not positive", claim)
    return Verdict.of(min(fin) >= BOUND_SLACK,
                      f"{who}: measured decay of log L ÷ the integrated bound {mean_ci(fin).fmt('.3g')} (lowest seed "
                      f"{min(fin):.3g}; required ≥ {BOUND_SLACK} in every seed)", claim)


# ---- the experiment -----------------------------------------------------------------------------------------
def _params(ctx: Context) -> dict[str, Any]:
    return {"n": ctx.pick(8, 16, 16), "width": ctx.pick(64, 256, 512), "steps": ctx.pick(300, 6000, 12000),
            "every": ctx.pick(10, 40, 80), "lr": 0.02}


def units(ctx: Context) -> int:
    return (len(RULES) + 1) * ctx.seeds


def _features(model: torch.nn.Module, out_name: str):
    """A forward hook keeping the output layer's input (the last hidden layer's features)."""
    store: dict[str, torch.Tensor] = {}
    layer = model.get_submodule(out_name)
    handle = layer.register_forward_hook(lambda m, inp, out: store.__setitem__("h", inp[0].detach()))
    return store, handle, layer.bias is not None


def _square_loss(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    out = model(x)
    return loss_of(out, y, "mse"), out


def _one(ctx: Context, rule: str, seed: int, control: bool) -> dict[str, Any]:
    p = _params(ctx)
    x, y = float64_digits(p["n"], seed=seed)
    torch.manual_seed(seed)
    model = falign.convert(MLP([64, p["width"], p["width"], 10]).to(torch.float64), rule, seed=seed,
                           example_input=x[:2])
    out_name = conversion_report(model).output_layer
    if control:
        layer = model.get_submodule(out_name)
        assert isinstance(layer, FeedbackLayer)
        b = feedback_at_angle(layer, 180.0, torch.Generator().manual_seed(seed))
        b.mul_(4.0)
    rec = DiagnosticsRecorder(model, margin=MARGIN)
    opt = torch.optim.SGD(model.parameters(), lr=p["lr"])
    falign.attach(model, opt)
    store, handle, bias = _features(model, out_name)
    losses, records = [], []
    try:
        for step in range(p["steps"]):
            opt.zero_grad(set_to_none=True)
            if step % p["every"] == 0:
                loss, _, record = rec.step(partial(_square_loss, model, x, y), x)
                h = store["h"]
                h = torch.cat([h, torch.ones(len(h), 1, dtype=h.dtype)], 1) if bias else h
                lam = float(torch.linalg.eigvalsh(h @ h.T)[0])
                d = record["decomposition"]
                records.append({"step": step, "loss": float(loss), "rho": d["rho"], "output": d["output"],
                                "hidden": d["hidden"], "lambda_min": lam})
            else:
                loss = loss_of(model(x), y, "mse")
                loss.backward()
            losses.append(float(loss.detach()))
            opt.step()
            if not math.isfinite(losses[-1]) or losses[-1] > 1e6:
                break
    finally:
        handle.remove()
    ctx.tick(1)
    # fit and check only above float64's floor (a loss near 1e-30 is rounding, not decay)
    end = next((i for i, v in enumerate(losses) if v < FLOOR), len(losses))
    start = end // 4
    fit = fit_decay(np.arange(start, end), np.asarray(losses[start:end]))
    if len(losses) < p["steps"]:  # diverged
        fit = {"rate": -math.inf, "power": math.nan, "delta_aic": math.nan}
    rhos = np.array([r["rho"] if r["rho"] is not None else math.nan for r in records], float)
    by_margin = {c: float(np.mean(rhos >= -(1 - c))) for c in MARGINS}
    # measured rate over each recorded interval against the bound at its start
    n, lr = len(y), p["lr"]
    # measured decay against the bound integrated over the run (trapezoid between records), to the floor
    decay = bound_sum = 0.0
    for a, b in itertools.pairwise(records):
        if b["step"] >= end:
            break
        bound_sum += lr * (b["step"] - a["step"]) * sum((1 + r["rho"]) * (2 / n) * r["lambda_min"] for r in (a, b)) / 2
        decay += math.log(losses[a["step"]]) - math.log(losses[b["step"]])
    return {"rule": CONTROL if control else rule, "seed": seed, "records": records, "losses": losses,
            "dominance": by_margin[MARGIN], "by margin": by_margin, "fit": fit,
            "bound ratio": decay / bound_sum if bound_sum > 0 else math.nan,
            "lambda_min": float(np.median([r["lambda_min"] for r in records])),
            "min rho": float(np.nanmin(rhos)) if np.isfinite(rhos).any() else math.nan,
            "final loss": losses[-1]}


def run(ctx: Context) -> ExperimentResult:
    start = time.perf_counter()
    p = _params(ctx)
    runs = [_one(ctx, rule, seed, False) for rule in RULES for seed in ctx.seed_list]
    runs += [_one(ctx, "fa", seed, True) for seed in ctx.seed_list]
    verdicts: list[Verdict] = []
    summary = []
    for who in [*RULES, CONTROL]:
        rs = [r for r in runs if r["rule"] == who]
        control = who == CONTROL
        dom = dominance_verdict([r["dominance"] for r in rs], who, control)
        exp = exponential_verdict([r["fit"]["delta_aic"] for r in rs], [r["fit"]["rate"] for r in rs], who, control)
        if control:
            both = dom.status == exp.status == "supported"
            verdicts.append(Verdict.of(both, f"control — {dom.text}; {exp.text}",
                                       f"control ({CONTROL}): dominance and exponential decay", True))
        else:
            verdicts += [dom, exp, bound_verdict([r["bound ratio"] for r in rs], who)]
        summary.append({"rule": who, "seeds": len(rs),
                        **{f"dominance at c={c:g}": mean_ci([r["by margin"][c] for r in rs], bounds=(0, 1)).fmt(".0%")
                           for c in MARGINS},
                        "min ρ": min(r["min rho"] for r in rs),
                        "rate per step": mean_ci([r["fit"]["rate"] for r in rs]).fmt(".2e"),
                        "ΔAIC (power − exp)": mean_ci([r["fit"]["delta_aic"] for r in rs]).fmt(".0f"),
                        "decay ÷ bound": mean_ci([r["bound ratio"] for r in rs]).fmt(".3g"),
                        "median λ_min(H̃H̃ᵀ)": mean_ci([r["lambda_min"] for r in rs]).fmt(".3g"),
                        "final loss": mean_ci([r["final loss"] for r in rs]).fmt(".3g")})
    trace = [{"rule": r["rule"], "seed": r["seed"], **{k: rec[k] for k in ("step", "loss", "rho", "output", "hidden",
                                                                          "lambda_min")}}
             for r in runs for rec in r["records"]]
    fig_path = _figure(ctx, runs)
    head = combine(verdicts)
    return ExperimentResult(
        NAME, TITLE, HYPOTHESIS,
        setup={"model": f"MLP 64-{p['width']}-{p['width']}-10 ReLU with biases, float64",
               "data": f"{p['n']} sklearn digits (a seeded split per seed)",
               "loss": "square loss ½‖f(x) − onehot‖² (mean over examples)",
               "optimizer": f"full-batch plain SGD lr {p['lr']}, {p['steps']} steps", "rules": RULES,
               "seeds": ctx.seeds, "diagnostics": f"every {p['every']} steps; margins {MARGINS}",
               "control": f"{CONTROL}: the hidden layers' updates point against their gradients"},
        tables=[Table("dominance_summary", list(summary[0]), summary,
                      "Per rule, mean over seeds [95% CI]: fraction of recorded steps with dominance at each margin c, "
                      "the exponential rate and ΔAIC against a power law over the last three quarters, the measured "
                      "decay of log L divided by the integrated bound."),
                Table("dominance_trace", ["rule", "seed", "step", "loss", "rho", "output", "hidden", "lambda_min"],
                      trace, "The decomposition at every recorded step.")],
        figures=[fig_path], verdicts=verdicts,
        headline={"metric": "steps with dominance (fa, dfa, usf; control)",
                  "value": "; ".join(f"{s['rule']}: {s['dominance at c=0.1']}" for s in summary),
                  "verdict": head.status},
        seconds=time.perf_counter() - start, data="sklearn digits", paper_data=PAPER_DATA[NAME],
    )


def _figure(ctx: Context, runs: list[dict[str, Any]]):
    plt = pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    colors = {who: f"C{i}" for i, who in enumerate([*RULES, CONTROL])}
    for r in runs:
        label = r["rule"] if r["seed"] == 0 else None
        axes[0].semilogy(r["losses"], color=colors[r["rule"]], lw=0.8, label=label)
        steps = [x["step"] for x in r["records"]]
        axes[1].plot(steps, [x["rho"] for x in r["records"]], color=colors[r["rule"]], lw=0.8, label=label)
    axes[0].set(xlabel="step", ylabel="square loss (log scale)", title="convergence (every seed)")
    axes[1].axhline(-(1 - MARGIN), color="r", ls="--", label=f"−(1−c), c={MARGIN}")
    axes[1].set(xlabel="step", ylabel="ρ", title="dominance ratio ρ", yscale="symlog")
    for who in [*RULES, CONTROL]:
        rs = [r for r in runs if r["rule"] == who]
        axes[2].plot(MARGINS, [np.mean([r["by margin"][c] for r in rs]) for c in MARGINS], marker="o",
                     color=colors[who], label=who)
    axes[2].set(xlabel="margin c", ylabel="fraction of steps with ρ ≥ −(1 − c)", title="dominance by margin")
    for ax in axes:
        ax.legend(fontsize=7)
    return save_figure(fig, ctx.figures / "dominance.png")
