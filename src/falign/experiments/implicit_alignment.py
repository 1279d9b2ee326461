"""Experiment *implicit alignment*: from small initialisation the conservation law forces alignment.

Summed over a layer's units the law reads ``⟨B_{l+1}, W_{l+1}⟩ = ½(‖W_l‖² + ‖b_l‖²) − Q(0)``. From a small
initialisation ``Q(0) ≈ 0``, so as the lower layer grows the upper layer's weights must turn towards
their feedback: ``⟨B, W⟩ > 0`` means an angle under 90°. Sweep the initialisation scale, train ``fa`` with
plain SGD, and watch ``angle(W_l, B_l)`` and the line ``⟨B_{l+1}, W_{l+1}⟩`` against ``½‖W_l‖²``.
"""

from __future__ import annotations

import math
import time

import numpy as np
import torch
import torch.nn.functional as F

import falign
from falign.data import batches, epoch_order, load_digits
from falign.diagnostics import find_pairs, pair_quantities, weight_alignment
from falign.experiments.base import Context
from falign.experiments.sources import PAPER_DATA
from falign.experiments.stats import mean_ci, spearman
from falign.models import MLP
from falign.plotting import pyplot, save_figure
from falign.results import INCONCLUSIVE, ExperimentResult, Table, Verdict, combine

NAME = "implicit_alignment"
TITLE = "Implicit alignment from small initialisation"
HYPOTHESIS = ('Under fa with plain SGD, ⟨B_{l+1}, W_{l+1}⟩ − ½(‖W_l‖² + ‖b_l‖²) stays at its initial value −Q(0), '
              'so the points (½‖W_l‖², ⟨B_{l+1}, W_{l+1}⟩) over training lie on a line of slope 1; from a smaller '
              'initialisation Q(0) is closer to 0, the upper layers are forced into alignment with their feedback '
              '(angle below 90°), and they end better aligned.')
SLOPE_RANGE = (0.9, 1.1)
ALPHA = 0.05


def line_verdict(slopes: list[float]) -> Verdict:
    """The law's line: every fitted slope (every init scale, pair and seed) in [0.9, 1.1]."""
    lo, hi = SLOPE_RANGE
    fin = [s for s in slopes if math.isfinite(s)]
    claim = "⟨B_(l+1), W_(l+1)⟩ − ½‖W_l‖² stays constant (a line of slope 1)"
    if not fin or len(fin) < len(slopes):
        return Verdict(INCONCLUSIVE, "a slope could not be fitted", claim)
    return Verdict.of(all(lo <= s <= hi for s in fin),
                      f"⟨B_(l+1), W_(l+1)⟩ against ½‖W_l‖² over training: slopes {min(fin):.3f}–{max(fin):.3f} over "
                      f"{len(fin)} fits (law: 1, accepted {lo}–{hi} for every fit)", claim)


def trend_verdict(scales: list[float], angles: list[float], accuracies: list[float], chance: float) -> Verdict:
    """Smaller initialisation → better final alignment, as a monotone trend over every init scale and seed:
    Spearman's ρ between scale and final weight–feedback angle positive with p < 0.05. Inconclusive unless
    every run trained (test accuracy at least twice chance): an untrained net's angles say nothing."""
    claim = "a smaller initialisation ends better aligned (monotone over every scale)"
    worst = min(accuracies) if accuracies else math.nan
    if not accuracies or not worst >= 2 * chance:
        return Verdict(INCONCLUSIVE, f"a run did not train (lowest test accuracy {worst:.1%}, chance {chance:.0%})",
                       claim)
    rho, p = spearman(scales, angles)
    if not math.isfinite(rho):
        return Verdict(INCONCLUSIVE, "too few runs for a rank correlation", claim)
    return Verdict.of(rho > 0 and p < ALPHA,
                      f"Spearman ρ(init scale, final angle) = {rho:.2f} (p = {p:.2g}) over {len(angles)} runs at "
                      f"{len(set(scales))} scales (supported when ρ > 0 with p < {ALPHA}); every run trained "
                      f"(lowest test accuracy {worst:.1%})", claim)


def _params(ctx: Context) -> tuple[list[float], int, int]:
    """(init scales, width, epochs) for the context's size."""
    return (ctx.pick([1.0, 0.1], [1.0, 0.3, 0.1, 0.03], [1.0, 0.3, 0.1, 0.03, 0.01]), ctx.pick(32, 128, 256),
            ctx.pick(2, 40, 100))


def units(ctx: Context) -> int:
    scales, _, epochs = _params(ctx)
    return len(scales) * epochs * ctx.seeds


def _record(model: torch.nn.Module, pairs: list, step: int) -> dict:
    """Weight–feedback angles and, per pair, (½‖W_l‖² + ½‖b_l‖², ⟨B_(l+1), W_(l+1)⟩) at this step."""
    point: dict = {"step": step, "angles": {k: v["angle"] for k, v in weight_alignment(model).items()}}
    for p in pairs:
        q = pair_quantities(p)
        point[p.key] = (float(q["incoming"].sum()), float(q["coupling"].sum()))
    return point


def run(ctx: Context) -> ExperimentResult:
    from scipy.stats import linregress

    start = time.perf_counter()
    scales, width, epochs = _params(ctx)
    lr, batch = 0.05, 32
    ds = load_digits(seed=0)
    x_all, y_all = ds.x_train.flatten(1), ds.y_train
    angle_rows, line_rows, histories = [], [], {}
    slopes: list[float] = []
    runs: list[dict] = []
    for seed, scale in ((seed, scale) for seed in ctx.seed_list for scale in scales):
        torch.manual_seed(seed)
        model = falign.convert(MLP([64, width, width, 10], init_scale=scale), "fa", seed=seed,
                               example_input=x_all[:2])
        opt = torch.optim.SGD(model.parameters(), lr=lr)
        falign.attach(model, opt)
        pairs = find_pairs(model, x_all[:2])
        history = []
        step = 0

        for epoch in range(epochs):
            order = epoch_order(len(y_all), seed, epoch)
            for xb, yb in batches(x_all, y_all, batch, order):
                opt.zero_grad(set_to_none=True)
                F.cross_entropy(model(xb), yb).backward()
                if step % 10 == 0:
                    history.append(_record(model, pairs, step))
                opt.step()
                step += 1
            ctx.tick(1)
        history.append(_record(model, pairs, step))
        if seed == 0:
            histories[scale] = history
        with torch.no_grad():
            test_acc = float((model(ds.x_test.flatten(1)).argmax(1) == ds.y_test).float().mean())
        last = history[-1]["angles"]
        runs.append({"seed": seed, "scale": scale, "angle": float(np.mean(list(last.values()))), "acc": test_acc,
                     "under 90": float(np.mean([a < 90 for a in last.values()]))})
        for layer, a in last.items():
            angle_rows.append({"init scale": scale, "seed": seed, "layer": layer,
                               "initial angle": history[0]["angles"].get(layer, math.nan),
                               "final angle": a, "test accuracy": test_acc})
        for p in pairs:
            xs = [h[p.key][0] for h in history]
            ys = [h[p.key][1] for h in history]
            fit = linregress(xs, ys)
            slope, intercept, r2 = float(fit.slope), float(fit.intercept), float(fit.rvalue) ** 2
            slopes.append(slope)
            line_rows.append({"init scale": scale, "seed": seed, "pair": p.key, "slope": slope,
                              "intercept (−Q(0))": intercept,
                              "R²": r2, "Q(0) sum": xs[0] - ys[0], "final ½‖W_l‖²": xs[-1]})
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for scale, history in histories.items():
        layers = sorted(history[-1]["angles"])
        for layer in layers:
            steps = [h["step"] for h in history if layer in h["angles"]]
            axes[0].plot(steps, [h["angles"][layer] for h in history if layer in h["angles"]],
                         label=f"×{scale:g} {layer}")
        key = pairs[-1].key
        axes[1].plot([h[key][0] for h in history], [h[key][1] for h in history], label=f"×{scale:g} {key}")
    axes[0].axhline(90, color="grey", ls="--", lw=0.8)
    axes[0].set(xlabel="step", ylabel="angle(W_l, B_l) (degrees)", title="weight–feedback alignment (fa)")
    axes[0].legend(fontsize=6)
    lim = max(max(h[pairs[-1].key][0] for h in hist) for hist in histories.values())
    axes[1].plot([0, lim], [0, lim], color="grey", ls=":", label="slope 1 through 0")
    axes[1].set(xlabel="½(‖W_l‖² + ‖b_l‖²)", ylabel="⟨B_(l+1), W_(l+1)⟩", title="the law: a line of slope 1")
    axes[1].legend(fontsize=6)
    fig_path = save_figure(fig, ctx.figures / "implicit_alignment.png")
    result_verdicts = [line_verdict(slopes),
                       trend_verdict([r["scale"] for r in runs], [r["angle"] for r in runs],
                                     [r["acc"] for r in runs], 1 / 10)]
    by_scale = [{"init scale": sc, "runs": len(rs), "final angle": mean_ci([r["angle"] for r in rs]).fmt(".1f"),
                 "layers under 90°": mean_ci([r["under 90"] for r in rs], bounds=(0, 1)).fmt(".0%"),
                 "test accuracy": mean_ci([r["acc"] for r in rs], bounds=(0, 1)).fmt(".3f")}
                for sc in scales for rs in [[r for r in runs if r["scale"] == sc]]]
    angle_of = {row["init scale"]: row["final angle"] for row in by_scale}
    head = combine(result_verdicts)
    return ExperimentResult(
        NAME, TITLE, HYPOTHESIS,
        setup={"model": f"MLP 64-{width}-{width}-10 ReLU with biases, all initial weights × init scale",
               "rule": "fa, feedback seeded per seed", "data": "sklearn digits (seeded split 0)",
               "seeds": ctx.seeds,
               "optimizer": f"plain SGD lr {lr}, batch {batch}, {epochs} epochs", "init scales": scales},
        tables=[Table("implicit_alignment_summary", list(by_scale[0]), by_scale,
                      "Per init scale, mean over seeds [95% CI]: final mean weight–feedback angle of the layers whose "
                      "feedback is used, the fraction of them under 90°, and test accuracy."),
                Table("implicit_alignment_angles", ["init scale", "seed", "layer", "initial angle", "final angle",
                                                    "test accuracy"], angle_rows,
                      "Weight–feedback angle of each layer whose feedback is used, first record and end."),
                Table("implicit_alignment_line", ["init scale", "seed", "pair", "slope", "intercept (−Q(0))", "R²",
                                                  "Q(0) sum", "final ½‖W_l‖²"], line_rows,
                      "Fit of ⟨B_(l+1), W_(l+1)⟩ against ½(‖W_l‖² + ‖b_l‖²) over training.")],
        figures=[fig_path], verdicts=result_verdicts,
        headline={"metric": "final angle, init ×1 → smallest",
                  "value": f"{angle_of[max(scales)]}° → {angle_of[min(scales)]}°", "verdict": head.status},
        seconds=time.perf_counter() - start, data="sklearn digits", paper_data=PAPER_DATA[NAME],
    )
