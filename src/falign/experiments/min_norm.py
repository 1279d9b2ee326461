"""Experiment *minimum norm*: FA on an over-parameterised two-layer linear network (d > n, square loss)
converges, from initialisation scale ε → 0, to the minimum-norm interpolant ``W* = Yᵀ(XXᵀ)⁻¹X``.

Both layers' updates keep ``W₁`` in ``W₁(0) + span(rows of X)``, so the end-to-end map's component outside
the data's row space is ``W₂ W₁(0) P⊥ = O(ε)``: the relative distance ``‖W₂W₁ − W*‖ / ‖W*‖`` should fall in
proportion to ε (log–log slope ≈ 1), for fa as for bp.
"""

from __future__ import annotations

import math
import time

import torch

import falign
from falign.experiments.base import Context
from falign.experiments.sources import PAPER_DATA
from falign.experiments.stats import loglog_slope, mean_ci
from falign.models import TwoLayerLinear
from falign.plotting import pyplot, save_figure
from falign.results import INCONCLUSIVE, ExperimentResult, Table, Verdict, combine

NAME = "min_norm"
TITLE = "Minimum-norm solutions of two-layer linear networks"
HYPOTHESIS = ('Trained by fa from initialisation scale ε, an over-parameterised two-layer linear network (d > n, '
              'square loss) ends at a distance O(ε) from the minimum-norm interpolant Yᵀ(XXᵀ)⁻¹X: log(distance) '
              'against log(ε) has slope 1, as for backprop.')
RULES = ["fa", "bp"]
SLOPE_RANGE = (0.8, 1.2)
TOLERANCE = 0.01
MAX_LOSS = 1e-8
CONTROL_EPS = 1.0


def slope_verdict(rule: str, slopes: list[float], final_losses: list[float]) -> Verdict:
    """Distance O(ε): every seed's log–log slope in [0.8, 1.2]; inconclusive unless every run interpolated."""
    lo, hi = SLOPE_RANGE
    claim = f"{rule}: distance to the minimum-norm interpolant is O(ε)"
    if not final_losses or max(final_losses) >= MAX_LOSS:
        return Verdict(INCONCLUSIVE, f"{rule}: a run did not interpolate (largest final loss "
                                     f"{max(final_losses, default=math.nan):.1e}, required < {MAX_LOSS:g})", claim)
    fin = [s for s in slopes if math.isfinite(s)]
    if not fin or len(fin) < len(slopes):
        return Verdict(INCONCLUSIVE, f"{rule}: a slope could not be fitted", claim)
    return Verdict.of(all(lo <= s <= hi for s in fin),
                      f"{rule}: slope of log distance on log ε {mean_ci(fin).fmt('.2f')} over {len(fin)} seeds "
                      f"(range {min(fin):.2f}–{max(fin):.2f}; expected 1, accepted {lo}–{hi} for every seed)", claim)


def tolerance_verdict(who: str, eps: float, distances: list[float], control: bool = False) -> Verdict:
    """The absolute check: at ε the relative distance to the minimum-norm interpolant is below 1% in every
    seed. Judged the same way for the control (a standard-scale start, which the theory does not cover)."""
    claim = f"{who}: within {TOLERANCE:.0%} of the minimum-norm interpolant at ε = {eps:g}"
    if not distances:
        return Verdict(INCONCLUSIVE, "no run", claim, control)
    return Verdict.of(max(distances) < TOLERANCE,
                      f"{who}: relative distance at ε = {eps:g}: {mean_ci(distances).fmt('.2e')} (largest "
                      f"{max(distances):.2e}; required < {TOLERANCE:g} in every seed)", claim, control)


def _params(ctx: Context) -> tuple[tuple[int, int, int, int], list[float], int]:
    """((d, n, k, hidden), epsilons, max steps) for the context's size."""
    return (ctx.pick((40, 10, 2, 40), (100, 20, 3, 100), (200, 40, 5, 200)),
            ctx.pick([0.1, 0.01], [0.1, 0.01, 0.001], [0.1, 0.01, 0.001, 0.0001]), ctx.pick(4000, 40000, 100000))


def units(ctx: Context) -> int:
    return 2 * (len(_params(ctx)[1]) + 1) * ctx.seeds


def _train(rule: str, x, y, hidden: int, eps: float, seed: int, lr: float, max_steps: int, w_star) -> dict:
    n, d = x.shape
    torch.manual_seed(1000 + seed)
    net = TwoLayerLinear(d, hidden, y.shape[1], init_scale=eps).to(torch.float64)
    model = falign.convert(torch.nn.Sequential(net), rule, seed=seed)[0]
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    falign.attach(model, opt)
    step = 0
    for step in range(max_steps):
        opt.zero_grad(set_to_none=True)
        loss = 0.5 * (model(x) - y).pow(2).sum() / n
        loss.backward()
        opt.step()
        if step % 500 == 0 and float(loss.detach()) < 1e-20:
            break
    with torch.no_grad():
        final = float(0.5 * (model(x) - y).pow(2).sum() / n)
    dist = float(torch.linalg.norm(model.end_to_end() - w_star) / torch.linalg.norm(w_star))
    return {"rule": rule, "seed": seed, "epsilon": eps, "relative distance": dist, "final loss": final,
            "steps": step + 1}


def run(ctx: Context) -> ExperimentResult:
    start = time.perf_counter()
    (d, n, k, hidden), epsilons, max_steps = _params(ctx)
    lr = 0.1
    rows = []
    for seed in ctx.seed_list:
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(n, d, generator=g, dtype=torch.float64) / d**0.5
        y = torch.randn(n, k, generator=g, dtype=torch.float64)
        w_star = y.T @ torch.linalg.solve(x @ x.T, x)  # k × d
        for rule in RULES:
            for eps in [*epsilons, CONTROL_EPS]:
                rows.append(_train(rule, x, y, hidden, eps, seed, lr, max_steps, w_star))
                ctx.tick(1)
    result_verdicts: list[Verdict] = []
    slopes: dict[str, list[float]] = {}
    for rule in RULES:
        sweep = [r for r in rows if r["rule"] == rule and r["epsilon"] in epsilons]
        slopes[rule] = [loglog_slope(epsilons, [r["relative distance"] for r in sweep if r["seed"] == s]).value
                        for s in ctx.seed_list]
        result_verdicts.append(slope_verdict(rule, slopes[rule], [r["final loss"] for r in sweep]))
        result_verdicts.append(tolerance_verdict(rule, min(epsilons), [r["relative distance"] for r in sweep
                                                                       if r["epsilon"] == min(epsilons)]))
    result_verdicts.append(tolerance_verdict(f"control (fa from ε = {CONTROL_EPS:g})", CONTROL_EPS,
                                             [r["relative distance"] for r in rows
                                              if r["rule"] == "fa" and r["epsilon"] == CONTROL_EPS], control=True))
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4.5))
    for rule in RULES:
        eps_all = [*epsilons, CONTROL_EPS]
        means = [mean_ci([r["relative distance"] for r in rows if r["rule"] == rule and r["epsilon"] == e]).value
                 for e in eps_all]
        ax.loglog(eps_all, means, marker="o", label=f"{rule} (slope {mean_ci(slopes[rule]).value:.2f})")
    ax.axhline(TOLERANCE, color="grey", ls="--", lw=0.8, label=f"tolerance {TOLERANCE:g}")
    ax.set(xlabel="initialisation scale ε", ylabel="‖W₂W₁ − W*‖ / ‖W*‖ (mean over seeds)",
           title=f"d={d}, n={n}, k={k}, hidden={hidden}")
    ax.legend()
    fig_path = save_figure(fig, ctx.figures / "min_norm.png")
    summary = [{"rule": rule, "epsilon": e, "runs": len(rs),
                "relative distance": mean_ci([r["relative distance"] for r in rs]).fmt(".2e"),
                "largest final loss": f"{max(r['final loss'] for r in rs):.1e}"}
               for rule in RULES for e in [*epsilons, CONTROL_EPS]
               for rs in [[r for r in rows if r["rule"] == rule and r["epsilon"] == e]]]
    head = combine(result_verdicts)
    return ExperimentResult(
        NAME, TITLE, HYPOTHESIS,
        setup={"data": f"X ∈ R^(n×d) with N(0, 1/d) entries, Y ∈ R^(n×k) N(0, 1), drawn per seed; d={d}, n={n}, k={k}",
               "model": f"x ↦ W₂W₁x, hidden {hidden}, no bias, entries N(0, ε²/fan_in)",
               "loss": "½‖W₂W₁Xᵀ − Yᵀ‖² / n", "optimizer": f"full-batch plain SGD lr {lr}, up to {max_steps} steps",
               "epsilons": epsilons, "seeds": ctx.seeds,
               "control": f"fa from ε = {CONTROL_EPS:g} (a standard-scale start): expected outside the tolerance"},
        tables=[Table("min_norm_summary", ["rule", "epsilon", "runs", "relative distance", "largest final loss"],
                      summary, "Relative distance of the end-to-end map to the minimum-norm interpolant, mean over "
                               "seeds [95% CI]."),
                Table("min_norm", ["rule", "seed", "epsilon", "relative distance", "final loss", "steps"], rows,
                      "Every run.")],
        figures=[fig_path], verdicts=result_verdicts,
        headline={"metric": "distance slope vs ε (fa, bp)",
                  "value": ", ".join(mean_ci(slopes[r]).fmt(".2f") for r in RULES), "verdict": head.status},
        seconds=time.perf_counter() - start, data="synthetic Gaussian regression", paper_data=PAPER_DATA[NAME],
    )
