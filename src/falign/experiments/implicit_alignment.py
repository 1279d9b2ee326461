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
from falign.experiments.base import Context, linear_fit
from falign.models import MLP
from falign.plotting import pyplot, save_figure
from falign.results import ExperimentResult, Table, Verdict

NAME = "implicit_alignment"
TITLE = "Implicit alignment from small initialisation"
HYPOTHESIS = ('Under fa with plain SGD, ⟨B_{l+1}, W_{l+1}⟩ − ½(‖W_l‖² + ‖b_l‖²) stays at its initial value −Q(0), '
              'so the points (½‖W_l‖², ⟨B_{l+1}, W_{l+1}⟩) over training lie on a line of slope 1; from a smaller '
              'initialisation Q(0) is closer to 0, the upper layers are forced into alignment with their feedback '
              '(angle below 90°), and they end better aligned.')
SLOPE_RANGE = (0.9, 1.1)


def verdicts(slopes: list[float], final_angle_by_scale: dict[float, float],
             fraction_under_90_smallest: float) -> list[Verdict]:
    """Supported when every fitted slope is in [0.9, 1.1]; when the mean final angle at the smallest
    scale is below the one at the largest and every layer ends under 90° at the smallest scale."""
    lo, hi = SLOPE_RANGE
    fin = [s for s in slopes if math.isfinite(s)]
    ok = bool(fin) and len(fin) == len(slopes) and all(lo <= s <= hi for s in fin)
    first = Verdict(ok, f"⟨B_(l+1), W_(l+1)⟩ against ½‖W_l‖² over training: slopes {min(fin):.3f}–{max(fin):.3f} "
                        f"(law: 1, accepted {lo}–{hi})" if fin else "no slope could be fitted")
    scales = sorted(final_angle_by_scale)
    small, large = final_angle_by_scale[scales[0]], final_angle_by_scale[scales[-1]]
    aligned = small < large and fraction_under_90_smallest == 1.0
    angles = ", ".join(f"×{s:g}: {final_angle_by_scale[s]:.1f}°" for s in reversed(scales))
    second = Verdict(aligned, f"final mean weight–feedback angle by init scale ({angles}); "
                              f"{fraction_under_90_smallest:.0%} of layers under 90° at ×{scales[0]:g}")
    return [first, second]


def _params(ctx: Context) -> tuple[list[float], int, int]:
    """(init scales, width, epochs) for the context's size."""
    return (ctx.pick([1.0, 0.1], [1.0, 0.3, 0.1, 0.03], [1.0, 0.3, 0.1, 0.03, 0.01]), ctx.pick(32, 128, 256),
            ctx.pick(2, 40, 100))


def units(ctx: Context) -> int:
    scales, _, epochs = _params(ctx)
    return len(scales) * epochs


def _record(model: torch.nn.Module, pairs: list, step: int) -> dict:
    """Weight–feedback angles and, per pair, (½‖W_l‖² + ½‖b_l‖², ⟨B_(l+1), W_(l+1)⟩) at this step."""
    point: dict = {"step": step, "angles": {k: v["angle"] for k, v in weight_alignment(model).items()}}
    for p in pairs:
        q = pair_quantities(p)
        point[p.key] = (float(q["incoming"].sum()), float(q["coupling"].sum()))
    return point


def run(ctx: Context) -> ExperimentResult:
    start = time.perf_counter()
    scales, width, epochs = _params(ctx)
    lr, batch = 0.05, 32
    ds = load_digits(seed=0)
    x_all, y_all = ds.x_train.flatten(1), ds.y_train
    angle_rows, line_rows, histories = [], [], {}
    slopes, final_angle, under90 = [], {}, {}
    for scale in scales:
        torch.manual_seed(0)
        model = falign.convert(MLP([64, width, width, 10], init_scale=scale), "fa", seed=0)
        opt = torch.optim.SGD(model.parameters(), lr=lr)
        falign.attach(model, opt)
        pairs = find_pairs(model, x_all[:2])
        history = []
        step = 0

        for epoch in range(epochs):
            order = epoch_order(len(y_all), 0, epoch)
            for xb, yb in batches(x_all, y_all, batch, order):
                opt.zero_grad(set_to_none=True)
                F.cross_entropy(model(xb), yb).backward()
                if step % 10 == 0:
                    history.append(_record(model, pairs, step))
                opt.step()
                step += 1
            ctx.tick(1)
        history.append(_record(model, pairs, step))
        histories[scale] = history
        test_acc = float((model(ds.x_test.flatten(1)).argmax(1) == ds.y_test).float().mean())
        last = history[-1]["angles"]
        final_angle[scale] = float(np.mean(list(last.values())))
        under90[scale] = float(np.mean([a < 90 for a in last.values()]))
        for layer, a in last.items():
            angle_rows.append({"init scale": scale, "layer": layer,
                               "initial angle": history[0]["angles"].get(layer, math.nan),
                               "final angle": a, "test accuracy": test_acc})
        for p in pairs:
            xs = [h[p.key][0] for h in history]
            ys = [h[p.key][1] for h in history]
            slope, intercept, r2 = linear_fit(xs, ys)
            slopes.append(slope)
            line_rows.append({"init scale": scale, "pair": p.key, "slope": slope, "intercept (−Q(0))": intercept,
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
    result_verdicts = verdicts(slopes, final_angle, under90[min(scales)])
    return ExperimentResult(
        NAME, TITLE, HYPOTHESIS,
        setup={"model": f"MLP 64-{width}-{width}-10 ReLU with biases, all initial weights × init scale",
               "rule": "fa, feedback seed 0", "data": "sklearn digits (seeded split 0)",
               "optimizer": f"plain SGD lr {lr}, batch {batch}, {epochs} epochs", "init scales": scales},
        tables=[Table("implicit_alignment_angles", ["init scale", "layer", "initial angle", "final angle",
                                                    "test accuracy"], angle_rows,
                      "Weight–feedback angle of each layer whose feedback is used, first record and end."),
                Table("implicit_alignment_line", ["init scale", "pair", "slope", "intercept (−Q(0))", "R²",
                                                  "Q(0) sum", "final ½‖W_l‖²"], line_rows,
                      "Fit of ⟨B_(l+1), W_(l+1)⟩ against ½(‖W_l‖² + ‖b_l‖²) over training.")],
        figures=[fig_path], verdicts=result_verdicts,
        headline={"metric": "final angle, init ×1 → smallest",
                  "value": f"{final_angle[max(scales)]:.1f}° → {final_angle[min(scales)]:.1f}°",
                  "verdict": "supported" if all(v.supported for v in result_verdicts) else "not supported"},
        seconds=time.perf_counter() - start,
    )
