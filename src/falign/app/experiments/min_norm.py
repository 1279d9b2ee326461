"""Experiment *minimum norm*: FA on an over-parameterised two-layer linear network (d > n, square loss)
converges, from initialisation scale ε → 0, to the minimum-norm interpolant ``W* = Yᵀ(XXᵀ)⁻¹X``.

Both layers' updates keep ``W₁`` in ``W₁(0) + span(rows of X)``, so the end-to-end map's component outside the
data's row space is ``W₂ W₁(0) P⊥ = O(ε)``: the relative distance ``‖W₂W₁ − W*‖ / ‖W*‖`` should fall in
proportion to ε, for fa as for bp, whatever the ratio d/n.

**Primary test** (declared before the run): for fa, on problems at several ratios d/n (n fixed, d = 2n, 4n, 8n at
the quick size) and every seed, the log–log slope of the relative distance against ε (each run trained until its
end-to-end map stops moving, cap reported). The effect is the slope, averaged over the (seed, d/n) problems, with
a t interval over them; the theory predicts 1. Judged by :func:`~falign.app.experiments.stats.judge`: supported when
the interval lies above 0, not supported when it lies below the smallest effect of interest, 0.5 (a distance
falling no faster than √ε); inconclusive when a run hit the cap.

**Control** (same test, must come out not supported): fa with weight decay λ on W₁ and W₂. Decay pulls the
component outside the row space to zero whatever ε, and the fixed point it reaches is a regularised solution, not
the minimum-norm interpolant: the distance no longer depends on ε (slope ≈ 0), so the min-norm property is absent.

**Secondary** (never change the verdict): bp through the same test; fa's slope equal to 1 within ±0.2 (its
interval inside [0.8, 1.2]); the slope at each d/n.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from typing import Any

import torch

import falign
from falign.app.experiments.base import Context
from falign.app.experiments.sources import PAPER_DATA
from falign.app.experiments.stats import judge, loglog_slope, mean_ci
from falign.app.plotting import pyplot, save_figure
from falign.app.results import INCONCLUSIVE, NOT_SUPPORTED, SUPPORTED, ExperimentResult, Table, Verdict, combine
from falign.models import TwoLayerLinear

NAME = "min_norm"
TITLE = "Minimum-norm solutions of two-layer linear networks"
HYPOTHESIS = ('Trained by fa from initialisation scale ε, an over-parameterised two-layer linear network (d > n, '
              'square loss) ends at a distance O(ε) from the minimum-norm interpolant Yᵀ(XXᵀ)⁻¹X at every ratio d/n: '
              'log(distance) against log(ε) has slope 1, as for backprop; with weight decay it does not.')
LR = 0.5
WEIGHT_DECAY = 0.05
MIN_EFFECT = 0.5  # smallest slope of interest
SLOPE_RANGE = (0.8, 1.2)  # secondary: the theory's slope 1
TOL = 1e-10  # converged: the end-to-end map moved by less than this (relative) over CHECK steps
CHECK = 100
SLOPE_DECIMALS = 4  # the distances are converged to ~TOL, so a slope's digits beyond these are rounding
CONTROL = f"fa + weight decay {WEIGHT_DECAY:g}"
ARMS = {"fa": ("fa", 0.0), "bp": ("bp", 0.0), CONTROL: ("fa", WEIGHT_DECAY)}  # arm → (rule, weight decay)


# ---- verdict functions (pure; tested on constructed inputs) -----------------------------------------------
def slope_test(slopes: Sequence[float], capped: int, claim: str, role: str = "primary") -> Verdict:
    """The primary test (and the control's, bp's): the mean over problems of the log–log slope of distance on ε,
    judged against 0 with smallest effect of interest ``MIN_EFFECT``; inconclusive when a run hit the cap (its
    distance is not its limit)."""
    if capped:
        return Verdict(INCONCLUSIVE, f"{capped} run(s) hit the step cap before converging", claim, role=role)
    if any(not math.isfinite(s) for s in slopes):
        return Verdict(INCONCLUSIVE, "a slope could not be fitted", claim, role=role)
    est = mean_ci(slopes, over="problems")
    return judge(est, claim, "log–log slope of distance on ε", MIN_EFFECT, role=role, spec=".3f")


def unit_slope_test(slopes: Sequence[float]) -> Verdict:
    """Secondary: the slope is the theory's 1 (O(ε), not a slower power): supported when its interval lies
    inside [0.8, 1.2], not supported when it lies outside, inconclusive when it straddles an end."""
    claim = "fa: the slope is 1 (distance O(ε))"
    est = mean_ci(slopes, over="problems")
    lo, hi = (est.value, est.value) if est.identical else (est.lo, est.hi)
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return Verdict(INCONCLUSIVE, "no interval", claim, role="secondary")
    a, b = SLOPE_RANGE
    status = SUPPORTED if a <= lo and hi <= b else NOT_SUPPORTED if hi < a or lo > b else INCONCLUSIVE
    return Verdict(status, f"slope {est.fmt('.3f')}, accepted range {a}–{b}", claim, role="secondary")


# ---- the experiment -----------------------------------------------------------------------------------------
def _params(ctx: Context) -> dict[str, Any]:
    """n, the ratios d/n, k, the epsilons and the step cap for the context's size (hidden width = d)."""
    return {"n": ctx.pick(8, 16, 32), "ratios": ctx.pick([4, 8], [2, 4, 8], [2, 4, 8]), "k": 3,
            "epsilons": ctx.pick([0.1, 0.01], [0.1, 0.01, 0.001], [0.1, 0.01, 0.001, 0.0001]),
            "cap": ctx.pick(5000, 30000, 100000)}


def units(ctx: Context) -> int:
    p = _params(ctx)
    return len(ARMS) * len(p["ratios"]) * len(p["epsilons"]) * ctx.seeds


def train(rule: str, x: torch.Tensor, y: torch.Tensor, eps: float, seed: int, cap: int,
          weight_decay: float = 0.0) -> dict[str, Any]:
    """Full-batch plain SGD (lr ``LR``) on ``½‖W₂W₁Xᵀ − Yᵀ‖²/n`` from scale ε, hidden width d, until the
    end-to-end map moves by less than ``TOL`` (relative) over ``CHECK`` steps (``converged``) or ``cap`` steps."""
    n, d = x.shape
    torch.manual_seed(1000 + seed)
    net = TwoLayerLinear(d, d, y.shape[1], init_scale=eps).to(torch.float64)
    model = falign.convert(torch.nn.Sequential(net), rule, seed=seed)[0]
    opt = torch.optim.SGD(model.parameters(), lr=LR, weight_decay=weight_decay)
    train_step = falign.TrainStep(model, opt, lambda out, target: 0.5 * (out - target).pow(2).sum() / n)
    prev, stopped, step = None, "cap", 0
    for step in range(1, cap + 1):
        train_step(x, y)
        if step % CHECK == 0:
            with torch.no_grad():
                now = model.end_to_end().clone()
            if prev is not None and float((now - prev).norm() / now.norm()) < TOL:
                stopped = "converged"
                break
            prev = now
    with torch.no_grad():
        final = float(0.5 * (model(x) - y).pow(2).sum() / n)
        w_star = y.T @ torch.linalg.solve(x @ x.T, x)  # k × d
        dist = float(torch.linalg.norm(model.end_to_end() - w_star) / torch.linalg.norm(w_star))
    return {"epsilon": eps, "relative distance": dist, "final loss": final, "steps": step, "stopped": stopped}


def problem(n: int, ratio: int, k: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """X ∈ R^(n×d), d = ratio·n, entries N(0, 1/d); Y ∈ R^(n×k) N(0, 1); one draw per (seed, ratio)."""
    d = ratio * n
    g = torch.Generator().manual_seed(seed * 1000 + ratio)
    x = torch.randn(n, d, generator=g, dtype=torch.float64) / d**0.5
    return x, torch.randn(n, k, generator=g, dtype=torch.float64)


def run(ctx: Context) -> ExperimentResult:
    start = time.perf_counter()
    p = _params(ctx)
    n, epsilons = p["n"], p["epsilons"]
    rows, cells = [], []  # every run; every (arm, seed, ratio) problem with its slope
    for seed in ctx.seed_list:
        for ratio in p["ratios"]:
            x, y = problem(n, ratio, p["k"], seed)
            for arm, (rule, wd) in ARMS.items():
                sweep = [train(rule, x, y, eps, seed, p["cap"], wd) for eps in epsilons]
                ctx.tick(len(epsilons))
                rows += [{"arm": arm, "seed": seed, "d/n": ratio, **r} for r in sweep]
                cells.append({"arm": arm, "seed": seed, "d/n": ratio,
                              "slope": round(loglog_slope(epsilons, [r["relative distance"] for r in sweep]).value,
                                             SLOPE_DECIMALS),
                              "capped": sum(r["stopped"] == "cap" for r in sweep)})

    def arm_cells(arm: str) -> list[dict[str, Any]]:
        return [c for c in cells if c["arm"] == arm]

    def test(arm: str, claim: str, role: str) -> Verdict:
        cs = arm_cells(arm)
        return slope_test([c["slope"] for c in cs], sum(c["capped"] for c in cs), claim, role)

    verdicts = [
        test("fa", "fa: distance to the minimum-norm interpolant falls with ε (every d/n)", "primary"),
        test(CONTROL, f"control ({CONTROL}): the same test", "control"),
        test("bp", "bp: the same test", "secondary"),
        unit_slope_test([c["slope"] for c in arm_cells("fa")]),
    ]
    estimates = {arm: mean_ci([c["slope"] for c in arm_cells(arm)], over="problems") for arm in ARMS}
    by_ratio = [{"arm": arm, "d/n": ratio, "problems": len(cs),
                 "slope": mean_ci([c["slope"] for c in cs]).fmt(".3f"),
                 **{f"distance at ε={e:g}": mean_ci([r["relative distance"] for r in rows if r["arm"] == arm
                                                     and r["d/n"] == ratio and r["epsilon"] == e]).fmt(".2e")
                    for e in epsilons},
                 "largest final loss": max(r["final loss"] for r in rows if r["arm"] == arm and r["d/n"] == ratio),
                 "most steps": max(r["steps"] for r in rows if r["arm"] == arm and r["d/n"] == ratio)}
                for arm in ARMS for ratio in p["ratios"]
                for cs in [[c for c in arm_cells(arm) if c["d/n"] == ratio]]]
    fig_path = _figure(ctx, rows, p)
    return ExperimentResult(
        NAME, TITLE, HYPOTHESIS,
        setup={"data": f"X ∈ R^(n×d) with N(0, 1/d) entries, Y ∈ R^(n×k) N(0, 1), one draw per seed and ratio; "
                       f"n={n}, d/n ∈ {p['ratios']}, k={p['k']}",
               "model": "x ↦ W₂W₁x, hidden width d, no bias, entries N(0, ε²/fan_in)",
               "loss": "½‖W₂W₁Xᵀ − Yᵀ‖² / n",
               "optimizer": f"full-batch plain SGD lr {LR}, until the end-to-end map moves < {TOL:g} (relative) "
                            f"over {CHECK} steps, cap {p['cap']}",
               "epsilons": epsilons, "seeds": ctx.seeds,
               "primary test": f"fa's log–log slope of distance on ε, mean over (seed, d/n) problems, judged against "
                               f"0 with smallest effect of interest {MIN_EFFECT}",
               "control": f"{CONTROL} (on W₁, W₂): the min-norm property is absent, expected slope ≈ 0"},
        tables=[Table("min_norm_summary", list(by_ratio[0]), by_ratio,
                      "Per arm and d/n: the log–log slope and the relative distance to the minimum-norm interpolant "
                      "at each ε, mean over seeds [95% CI]."),
                Table("min_norm", ["arm", "seed", "d/n", "epsilon", "relative distance", "final loss", "steps",
                                   "stopped"], rows, "Every run.")],
        figures=[fig_path], verdicts=verdicts,
        headline={"metric": "fa: slope of distance on ε over d/n (control: weight decay)",
                  "value": f"{estimates['fa'].fmt('.3f')} (control {estimates[CONTROL].fmt('.3f')})",
                  "verdict": combine(verdicts).status},
        seconds=time.perf_counter() - start, data="synthetic Gaussian regression", paper_data=PAPER_DATA[NAME],
    )


def _figure(ctx: Context, rows: list[dict[str, Any]], p: dict[str, Any]):
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4.8))
    styles = {"fa": "-", "bp": "--", CONTROL: ":"}
    for j, ratio in enumerate(p["ratios"]):
        for arm in ARMS:
            means = [mean_ci([r["relative distance"] for r in rows if r["arm"] == arm and r["d/n"] == ratio
                              and r["epsilon"] == e]).value for e in p["epsilons"]]
            ax.loglog(p["epsilons"], means, styles[arm], marker="o", color=f"C{j}", label=f"{arm}, d/n={ratio}")
    ax.set(xlabel="initialisation scale ε", ylabel="‖W₂W₁ − W*‖ / ‖W*‖ (mean over seeds)",
           title=f"n={p['n']}, k={p['k']}, hidden = d")
    ax.legend(fontsize=6.5, ncol=2, loc="center left")
    return save_figure(fig, ctx.figures / "min_norm.png")
