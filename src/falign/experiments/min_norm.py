"""Experiment *minimum norm*: FA on an over-parameterised two-layer linear network (d > n, square loss)
converges, from initialisation scale ε → 0, to the minimum-norm interpolant ``W* = Yᵀ(XXᵀ)⁻¹X``.

Both layers' updates keep ``W₁`` in ``W₁(0) + span(rows of X)``, so the end-to-end map's component outside
the data's row space is ``W₂ W₁(0) P⊥ = O(ε)``: the relative distance ``‖W₂W₁ − W*‖ / ‖W*‖`` should fall in
proportion to ε (log–log slope ≈ 1), for fa as for bp.
"""

from __future__ import annotations

import time

import torch

import falign
from falign.experiments.base import Context, loglog_slope
from falign.models import TwoLayerLinear
from falign.plotting import pyplot, save_figure
from falign.results import ExperimentResult, Table, Verdict

NAME = "min_norm"
TITLE = "Minimum-norm solutions of two-layer linear networks"
HYPOTHESIS = ('Trained by fa from initialisation scale ε, an over-parameterised two-layer linear network (d > n, '
              'square loss) ends at a distance O(ε) from the minimum-norm interpolant Yᵀ(XXᵀ)⁻¹X: log(distance) '
              'against log(ε) has slope 1, as for backprop.')
SLOPE_RANGE = (0.8, 1.2)


def verdicts(slopes: dict[str, float], final_losses: dict[str, float]) -> list[Verdict]:
    """Supported when every rule's slope is in [0.8, 1.2] (and every run interpolated, loss < 1e-8)."""
    lo, hi = SLOPE_RANGE
    ok = all(lo <= s <= hi for s in slopes.values()) and all(v < 1e-8 for v in final_losses.values())
    text = ", ".join(f"{r}: {s:.2f}" for r, s in slopes.items())
    return [Verdict(ok, f"slope of log relative distance to the minimum-norm interpolant against log ε: {text} "
                        f"(expected 1, accepted {lo}–{hi}); largest final training loss "
                        f"{max(final_losses.values()):.1e} (required < 1e-8)")]


def _params(ctx: Context) -> tuple[tuple[int, int, int, int], list[float], int]:
    """((d, n, k, hidden), epsilons, max steps) for the context's size."""
    return (ctx.pick((40, 10, 2, 40), (100, 20, 3, 100), (200, 40, 5, 200)),
            ctx.pick([0.1, 0.01], [0.1, 0.01, 0.001], [0.1, 0.01, 0.001, 0.0001]), ctx.pick(4000, 40000, 100000))


def units(ctx: Context) -> int:
    return 2 * len(_params(ctx)[1])


def run(ctx: Context) -> ExperimentResult:
    start = time.perf_counter()
    (d, n, k, hidden), epsilons, max_steps = _params(ctx)
    lr = 0.1
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, d, generator=g, dtype=torch.float64) / d**0.5
    y = torch.randn(n, k, generator=g, dtype=torch.float64)
    w_star = y.T @ torch.linalg.solve(x @ x.T, x)  # k × d
    rows, slopes, finals = [], {}, {}
    for rule in ("fa", "bp"):
        dists = []
        for eps in epsilons:
            torch.manual_seed(1)
            net = TwoLayerLinear(d, hidden, k, init_scale=eps).to(torch.float64)
            model = falign.convert(torch.nn.Sequential(net), rule, seed=0)[0]
            opt = torch.optim.SGD(model.parameters(), lr=lr)
            falign.attach(model, opt)
            loss_value = float("nan")
            for step in range(max_steps):
                opt.zero_grad(set_to_none=True)
                loss = 0.5 * (model(x) - y).pow(2).sum() / n
                loss.backward()
                opt.step()
                if step % 500 == 0:
                    loss_value = float(loss.detach())
                    if loss_value < 1e-20:
                        break
            with torch.no_grad():
                loss_value = float(0.5 * (model(x) - y).pow(2).sum() / n)
            dist = float(torch.linalg.norm(model.end_to_end() - w_star) / torch.linalg.norm(w_star))
            dists.append(dist)
            rows.append({"rule": rule, "epsilon": eps, "relative distance": dist, "final loss": loss_value,
                         "steps": step + 1})
            finals[f"{rule} ε={eps:g}"] = loss_value
            ctx.tick(1)
        slopes[rule] = loglog_slope(epsilons, dists)
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4.5))
    for rule in ("fa", "bp"):
        sub = [r for r in rows if r["rule"] == rule]
        ax.loglog([r["epsilon"] for r in sub], [r["relative distance"] for r in sub], marker="o",
                  label=f"{rule} (slope {slopes[rule]:.2f})")
    ax.set(xlabel="initialisation scale ε", ylabel="‖W₂W₁ − W*‖ / ‖W*‖", title=f"d={d}, n={n}, k={k}, hidden={hidden}")
    ax.legend()
    fig_path = save_figure(fig, ctx.figures / "min_norm.png")
    result_verdicts = verdicts(slopes, finals)
    return ExperimentResult(
        NAME, TITLE, HYPOTHESIS,
        setup={"data": f"X ∈ R^(n×d) with N(0, 1/d) entries, Y ∈ R^(n×k) N(0, 1), seed 0; d={d}, n={n}, k={k}",
               "model": f"x ↦ W₂W₁x, hidden {hidden}, no bias, entries N(0, ε²/fan_in), seed 1",
               "loss": "½‖W₂W₁Xᵀ − Yᵀ‖² / n", "optimizer": f"full-batch plain SGD lr {lr}, up to {max_steps} steps",
               "epsilons": epsilons},
        tables=[Table("min_norm", ["rule", "epsilon", "relative distance", "final loss", "steps"], rows,
                      "Relative distance of the end-to-end map to the minimum-norm interpolant.")],
        figures=[fig_path], verdicts=result_verdicts,
        headline={"metric": "distance slope vs ε (fa, bp)", "value": f"{slopes['fa']:.2f}, {slopes['bp']:.2f}",
                  "verdict": result_verdicts[0].label},
        seconds=time.perf_counter() - start,
    )
