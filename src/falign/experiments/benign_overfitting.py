"""Experiment *benign overfitting*: does feedback alignment interpolate noisy labels as harmlessly as backprop?

Robertson & Koyejo (2024) train FA to fit a random 4,000-example subset of MNIST with 20% label noise and
discuss benign overfitting. Two arms, each against a clean-label baseline, over seeds, never selecting on the
test set (every number is the one at interpolation, or at the step cap):

- **A (known optimum).** Two Gaussian classes ``±μ + N(0, I_d)`` with ``p = 0.2`` of the training labels
  flipped; the clean Bayes error is ``Φ(−‖μ‖)``. A wide two-layer ReLU network from a small initialisation is
  trained by full-batch gradient descent until it fits every noisy training label (≥ 99.5%, with a step cap),
  over a grid of dimension and separation. A run is *benign* when its clean test error is within 1 point of
  the Bayes error, *catastrophic* when it is past halfway from the Bayes error to chance, *tempered* between
  (Mallinar et al. 2022's terms). The grid holds cells where backprop's overfitting is benign and cells where
  it is not, so the comparison can fail.
- **B (the paper's setting).** A random 4,000-example subset (MNIST with ``--data-dir``; Fashion-MNIST when
  installed; digits' whole training set otherwise) with 20% symmetric noise, every rule trained to
  interpolation with a cap. Δ = (test error with noise) − (test error without), Δ/p, and the fraction of the
  flipped labels memorised along training.

Verdict: FA interpolates and Δ_FA ≤ Δ_BP + 2 points (interval), and FA is benign wherever backprop is in arm A.
"""

from __future__ import annotations

import math
import time
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import falign
from falign.data import Dataset, add_label_noise, load_digits, subsample_train
from falign.experiments.base import Context
from falign.experiments.runs import accuracy
from falign.experiments.sources import PAPER_DATA
from falign.experiments.stats import mean_ci
from falign.models import MLP
from falign.plotting import pyplot, save_figure
from falign.results import INCONCLUSIVE, NOT_SUPPORTED, SUPPORTED, ExperimentResult, Table, Verdict, combine

NAME = "benign_overfitting"
TITLE = "Benign overfitting with label noise"
HYPOTHESIS = ("Trained to interpolate noisy labels, feedback alignment overfits as benignly as backprop: its test "
              "error rises over the clean-label baseline by no more than backprop's (Δ_FA ≤ Δ_BP + 2 points), and "
              "it is benign wherever backprop is on a Gaussian task with a known Bayes error.")
NOISE = 0.2
INTERPOLATED = 0.995
DELTA_MARGIN = 0.02
BENIGN_MARGIN = 0.01


def classify(test_error: float, bayes: float, chance: float = 0.5) -> str:
    """Mallinar et al. (2022)'s terms for an interpolating classifier's clean test error: ``benign`` within
    1 point of the Bayes error, ``catastrophic`` past halfway from it to chance, ``tempered`` between."""
    if test_error <= bayes + BENIGN_MARGIN:
        return "benign"
    if test_error >= (bayes + chance) / 2:
        return "catastrophic"
    return "tempered"


def bayes_error(separation: float) -> float:
    """``Φ(−‖μ‖)``: the error of the best classifier of ``±μ + N(0, I)`` (equal priors, clean labels)."""
    return 0.5 * math.erfc(separation / math.sqrt(2))


# ---- verdicts -------------------------------------------------------------------------------------------
def delta_verdict(delta_fa: list[float], delta_bp: list[float], fa_interpolated: bool, bp_interpolated: bool,
                  data: str) -> Verdict:
    """Arm B: supported when the interval of Δ_FA − Δ_BP (paired by seed) lies at or below 2 points; not
    supported when it lies above; inconclusive when it straddles 2 points or a rule did not interpolate."""
    claim = f"{data}: FA's overfitting costs no more than backprop's (Δ_FA ≤ Δ_BP + 2 points)"
    if not (fa_interpolated and bp_interpolated):
        who = " and ".join(r for r, ok in (("fa", fa_interpolated), ("bp", bp_interpolated)) if not ok)
        return Verdict(INCONCLUSIVE, f"{who} did not fit every noisy label within the step cap: no interpolation, "
                                     f"nothing to say about benign overfitting", claim)
    diff = mean_ci([a - b for a, b in zip(delta_fa, delta_bp)])
    text = (f"Δ_FA − Δ_BP = {diff.fmt('.1f', 100)} points (Δ_FA {mean_ci(delta_fa).fmt('.1f', 100)}, Δ_BP "
            f"{mean_ci(delta_bp).fmt('.1f', 100)}; 95% CI over seeds; supported when the interval ends at or below "
            f"{100 * DELTA_MARGIN:.0f})")
    if not math.isfinite(diff.hi):
        return Verdict(INCONCLUSIVE, text + ": too few seeds for an interval", claim)
    if diff.hi <= DELTA_MARGIN:
        return Verdict(SUPPORTED, text, claim)
    if diff.lo > DELTA_MARGIN:
        return Verdict(NOT_SUPPORTED, text, claim)
    return Verdict(INCONCLUSIVE, text + ": the interval straddles the margin", claim)


def grid_verdict(cells: dict[tuple[int, float], dict[str, str]]) -> Verdict:
    """Arm A: FA is benign in every cell where backprop is; inconclusive unless the grid has both cells where
    backprop is benign and cells where it is not (else the comparison could not fail)."""
    claim = "Gaussian grid: FA is benign wherever backprop is"
    bp_benign = [c for c, v in cells.items() if v.get("bp") == "benign"]
    bp_other = [c for c, v in cells.items() if v.get("bp") not in ("benign", None)]
    if not bp_benign or not bp_other:
        return Verdict(INCONCLUSIVE, f"backprop is benign in {len(bp_benign)} of {len(cells)} cells: the grid needs "
                                     f"cells of both kinds", claim)
    misses = [c for c in bp_benign if cells[c].get("fa") != "benign"]
    cell = ", ".join(f"d={d}, ‖μ‖={r:g}" for d, r in misses)
    return Verdict.of(not misses, f"backprop benign in {len(bp_benign)} cells, not in {len(bp_other)}; FA benign in "
                                  f"{len(bp_benign) - len(misses)} of backprop's benign cells"
                                  + (f" (not in {cell})" if misses else ""), claim)


# ---- arm A ----------------------------------------------------------------------------------------------
def _gaussian(d: int, separation: float, n: int, test: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    mu = torch.zeros(d)
    mu[0] = separation

    def draw(k: int):
        y = torch.randint(0, 2, (k,), generator=g)
        return (2 * y - 1).float()[:, None] * mu + torch.randn(k, d, generator=g), y

    x_tr, y_tr = draw(n)
    x_te, y_te = draw(test)
    noisy = y_tr.clone()
    flip = torch.randperm(n, generator=g)[: round(NOISE * n)]
    noisy[flip] = 1 - noisy[flip]
    return x_tr, noisy, x_te, y_te


def _fit_gaussian(rule: str, d: int, separation: float, seed: int, cfg: dict, device: str = "cpu") -> dict[str, Any]:
    x, y, x_te, y_te = (t.to(device) for t in _gaussian(d, separation, cfg["n"], cfg["test"], seed))
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(d, cfg["width"]), nn.ReLU(), nn.Linear(cfg["width"], 2))
    with torch.no_grad():
        for p in net.parameters():
            p.mul_(0.1)  # a small initialisation
    model = falign.convert(net.to(device), rule, seed=seed, example_input=x[:2])
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    falign.attach(model, opt)
    target = falign.uses_target(model)
    step, fit = 0, 0.0
    for step in range(1, cfg["cap"] + 1):
        opt.zero_grad(set_to_none=True)
        if target:
            falign.set_target(model, y)
        F.cross_entropy(model(x), y).backward()
        opt.step()
        if step % 50 == 0:
            fit = accuracy(model, x, y)
            if fit >= INTERPOLATED:
                break
    fit = accuracy(model, x, y)
    return {"train fit": fit, "interpolated": fit >= INTERPOLATED, "steps": step,
            "test error": 1 - accuracy(model, x_te, y_te)}


# ---- arm B ----------------------------------------------------------------------------------------------
def _arm_b_data(ctx: Context) -> tuple[Dataset, str]:
    cat = ctx.catalog
    size = ctx.pick(400, 4000, 4000)
    for ds in (cat.mnist, cat.fashion):
        if ds is not None:
            return subsample_train(ds, size, 0), f"{ds.name}, random {size}-example subset"
    digits = load_digits(seed=0)
    if ctx.size == "tiny":
        digits = subsample_train(digits, 400, 0)
    return digits, f"digits (all {len(digits.y_train)} training examples; neither MNIST nor Fashion-MNIST is here)"


def _fit_images(ctx: Context, rule: str, data: Dataset, noise: float, seed: int, cfg: dict) -> dict[str, Any]:
    ds = add_label_noise(data, noise, seed)
    dev = ctx.device
    x, y, clean = ds.x_train.flatten(1).to(dev), ds.y_train.to(dev), ds.clean_y_train.to(dev)
    flipped = y != clean
    torch.manual_seed(seed)
    model = falign.convert(MLP([x.shape[1], cfg["width"], cfg["width"], ds.num_classes]).to(dev), rule, seed=seed,
                           example_input=x[:2])
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    falign.attach(model, opt)
    target = falign.uses_target(model)
    g = torch.Generator().manual_seed(seed)
    curve, step, fit = [], 0, 0.0
    for step in range(1, cfg["cap"] + 1):
        idx = torch.randint(0, len(y), (128,), generator=g)
        opt.zero_grad(set_to_none=True)
        if target:
            falign.set_target(model, y[idx])
        F.cross_entropy(model(x[idx]), y[idx]).backward()
        opt.step()
        if step % cfg["check"] == 0:
            with torch.no_grad():
                pred = model(x).argmax(-1)
            fit = float((pred == y).float().mean())
            memorised = float((pred[flipped] == y[flipped]).float().mean()) if flipped.any() else math.nan
            curve.append({"step": step, "fit": fit, "memorised": memorised})
            if fit >= INTERPOLATED:
                break
    ctx.tick(1)
    return {"rule": rule, "seed": seed, "noise": noise, "train fit": fit, "interpolated": fit >= INTERPOLATED,
            "steps": step, "test error": 1 - accuracy(model, ds.x_test.flatten(1).to(dev), ds.y_test.to(dev)),
            "memorised flipped": curve[-1]["memorised"] if curve else math.nan, "curve": curve}


def _config(ctx: Context) -> dict[str, Any]:
    return {
        "dims": ctx.pick([10, 300], [10, 1000], [10, 100, 1000, 3000]),
        "separations": ctx.pick([1.0, 6.0], [1.0, 3.0, 6.0], [1.0, 2.0, 3.0, 4.0, 6.0]),
        "gauss": {"n": 200, "test": ctx.pick(500, 2000, 5000), "width": ctx.pick(128, 512, 1024),
                  "cap": ctx.pick(300, 3000, 10000)},
        "grid_rules": ctx.pick(["bp", "fa"], ["bp", "fa", "usf"], ["bp", "fa", "usf", "dfa"]),
        "rules": ctx.pick(["bp", "fa"], ["bp", "fa", "usf"], ["bp", "fa", "usf", "dfa", "kp"]),
        "images": {"width": ctx.pick(64, 256, 1024), "cap": ctx.pick(200, 3000, 20000),
                   "check": ctx.pick(50, 100, 200)},
    }


def units(ctx: Context) -> int:
    cfg = _config(ctx)
    return ctx.seeds * (len(cfg["dims"]) * len(cfg["separations"]) * len(cfg["grid_rules"]) + 2 * len(cfg["rules"]))


def run(ctx: Context) -> ExperimentResult:
    start = time.perf_counter()
    cfg = _config(ctx)
    grid_rows, cells = [], {}
    for d in cfg["dims"]:
        for sep in cfg["separations"]:
            bayes = bayes_error(sep)
            cells[(d, sep)] = {}
            for rule in cfg["grid_rules"]:
                fits = [_fit_gaussian(rule, d, sep, seed, cfg["gauss"], ctx.device) for seed in ctx.seed_list]
                ctx.tick(len(fits))
                err = mean_ci([f["test error"] for f in fits], bounds=(0, 1))
                interpolated = all(f["interpolated"] for f in fits)
                kind = classify(err.value, bayes) if interpolated else "did not interpolate"
                cells[(d, sep)][rule] = kind
                grid_rows.append({"d": d, "separation ‖μ‖": sep, "Bayes error": round(bayes, 4), "rule": rule,
                                  "clean test error": err.fmt(".3f"), "interpolated (all seeds)": interpolated,
                                  "steps": max(f["steps"] for f in fits), "overfitting": kind})
    data, data_text = _arm_b_data(ctx)
    runs = [_fit_images(ctx, rule, data, noise, seed, cfg["images"])
            for rule in cfg["rules"] for noise in (NOISE, 0.0) for seed in ctx.seed_list]
    by = {(r["rule"], r["noise"]): [x for x in runs if (x["rule"], x["noise"]) == (r["rule"], r["noise"])]
          for r in runs}
    deltas = {rule: [n["test error"] - c["test error"] for n, c in zip(by[(rule, NOISE)], by[(rule, 0.0)])]
              for rule in cfg["rules"]}
    interp = {rule: all(r["interpolated"] for r in by[(rule, NOISE)]) for rule in cfg["rules"]}
    verdicts = [delta_verdict(deltas["fa"], deltas["bp"], interp["fa"], interp["bp"], data.name),
                grid_verdict(cells)]
    b_rows = []
    for rule in cfg["rules"]:
        noisy, clean = by[(rule, NOISE)], by[(rule, 0.0)]
        delta = mean_ci(deltas[rule])
        b_rows.append({
            "rule": rule, "interpolated (all seeds)": interp[rule],
            "steps to fit (max)": max(r["steps"] for r in noisy),
            "test error, clean labels": mean_ci([r["test error"] for r in clean], bounds=(0, 1)).fmt(".3f"),
            "test error, 20% noise": mean_ci([r["test error"] for r in noisy], bounds=(0, 1)).fmt(".3f"),
            "Δ (points)": delta.fmt(".1f", 100), "Δ / p": mean_ci([x / NOISE for x in deltas[rule]]).fmt(".2f"),
            "flipped labels memorised": mean_ci([r["memorised flipped"] for r in noisy], bounds=(0, 1)).fmt(".3f"),
        })
    figures = _figures(ctx, by, cfg["rules"])
    head = combine(verdicts)
    return ExperimentResult(
        NAME, TITLE, HYPOTHESIS,
        {"arm A": f"±μ + N(0, I_d), d ∈ {cfg['dims']}, ‖μ‖ ∈ {cfg['separations']}, 200 training examples, "
                  f"{round(100 * NOISE)}% flipped, 2-layer ReLU width {cfg['gauss']['width']} at init ×0.1, full-batch "
                  f"GD lr 0.5 to ≥ {INTERPOLATED:.1%} fit (cap {cfg['gauss']['cap']} steps)",
         "arm B": f"{data_text}; {round(100 * NOISE)}% symmetric noise and a clean baseline; "
                  f"MLP 2×{cfg['images']['width']}, "
                  f"SGD lr 0.05 momentum 0.9 batch 128 to ≥ {INTERPOLATED:.1%} fit (cap {cfg['images']['cap']} steps)",
         "seeds": ctx.seeds, "selection": "none: every error is at interpolation (or at the cap)"},
        [Table("benign_arm_b", list(b_rows[0]), b_rows,
               "Arm B: test errors at interpolation with and without label noise, Δ = noisy − clean, and the "
               "fraction of flipped training labels the network predicts as flipped (memorised); mean [95% CI]."),
         Table("benign_grid", list(grid_rows[0]), grid_rows,
               "Arm A: clean test error of the interpolating network against the Bayes error Φ(−‖μ‖); benign ≤ Bayes "
               "+ 1 point, catastrophic ≥ halfway to chance.")],
        figures, verdicts,
        headline={"metric": "Δ test error from 20% noise (bp; fa)",
                  "value": f"{mean_ci(deltas['bp']).fmt('.1f', 100)}; {mean_ci(deltas['fa']).fmt('.1f', 100)} pts",
                  "verdict": head.status},
        seconds=time.perf_counter() - start, data=f"Gaussian grid; {data_text}", paper_data=PAPER_DATA[NAME])


def _figures(ctx: Context, by: dict, rules: list[str]) -> list:
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    for rule in rules:
        for run in by[(rule, NOISE)][:1]:
            steps = [p["step"] for p in run["curve"]]
            axes[0].plot(steps, [p["fit"] for p in run["curve"]], label=f"{rule}")
            axes[1].plot(steps, [p["memorised"] for p in run["curve"]], label=f"{rule}")
    axes[0].set(xlabel="step", ylabel="fit to the noisy labels", title="fitting 20% noisy labels (seed 0)")
    axes[1].set(xlabel="step", ylabel="fraction of flipped labels memorised", title="memorisation of the noise")
    for ax in axes:
        ax.legend(fontsize=7)
    return [save_figure(fig, ctx.figures / "benign_overfitting.png")]
