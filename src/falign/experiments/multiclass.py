"""Experiment *multi-class*: does better alignment make feedback alignment better on hard multi-class tasks?

The paper's central empirical claim (Robertson & Koyejo 2024, §6): FA falls behind backprop as the number of
classes grows, and better alignment with the true gradient improves it. Three tests, each able to fail:

(a) **FA's gap to BP grows with n.** Random n-class subsets (seeded draws, the same examples per class and the
    same number of optimiser steps whatever n), FA and BP on the same subset and seed; the slope of the gap
    against log n must have an interval above 0. Inconclusive when BP is at chance or at ceiling.
(b) **Within n, better-aligned runs have smaller gaps.** Across the feedback rules (fa, dfa, usf, frsf, kp with
    weight decay, wm) at the same n: the slope of the gap on the hidden layers' gradient angle once each n's
    own level is removed (``gap ~ angle + C(n)``); adding any per-n offset to gap or angle cannot change it, so
    the number of classes, which moves both, cannot produce it.
(c) **Intervention.** FA with its feedback set at a chosen angle θ to the initial weights (norm unchanged), at a
    small and a large n: accuracy must fall as θ grows, more at the large n; and the conservation law's
    small-initialisation mechanism (an init-scale sweep) must raise accuracy at the large n.

The data: a synthetic 100-class task (three Gaussian clusters per class in 20 dimensions) on which BP is well
above chance and below ceiling from about 20 classes; digits; Fashion-MNIST when installed; CIFAR-100 and
Tiny-ImageNet (the paper's data) through ``--data-dir``.
"""

from __future__ import annotations

import math
import time
from typing import Any

import numpy as np

import falign
from falign.data import Dataset, load_digits, many_class_subset
from falign.data.base import standardize
from falign.experiments.base import Context
from falign.experiments.runs import MLPRun
from falign.experiments.sources import PAPER_DATA
from falign.experiments.stats import mean_ci, slope_ci, within_strata_slope
from falign.plotting import pyplot, save_figure
from falign.results import INCONCLUSIVE, ExperimentResult, Table, Verdict, combine

NAME = "multiclass"
TITLE = "Multi-class performance and alignment"
HYPOTHESIS = ("Feedback alignment falls behind backprop as the number of classes n grows, and better alignment with "
              "the true gradient closes the gap: (a) FA's gap to BP grows with n; (b) at the same n, runs with "
              "better gradient alignment have smaller gaps; (c) setting FA's feedback closer to the weights "
              "(or starting from a smaller initialisation) raises its accuracy, more at large n.")
RULES = ["bp", "fa", "dfa", "usf", "frsf", "kp", "wm"]
BASELINE = "bp"  # the design: every gap is to backprop on the same subset and seed
# Kolen-Pollack-style rules (feedback trained by the optimiser) need weight decay: W − B shrinks by (1 − ηλ)
# per step, and without it the feedback never comes to mirror the weights
LEARNED_WEIGHT_DECAY = 0.01
ANGLES = [0, 30, 60, 75, 90]
SCALES = [1.0, 0.3, 0.1]
CEILING = 0.99


def _config(ctx: Context) -> dict[str, Any]:
    return {
        "synthetic_n": ctx.pick([5, 20], [5, 10, 20, 50, 100], [5, 10, 20, 50, 100]),
        "per_class": ctx.pick((20, 10), (40, 20), (60, 40)),
        "steps": ctx.pick(60, 500, 2000),
        "hidden": ctx.pick((32, 32), (128, 128), (256, 256)),
        "rules": ctx.pick(["bp", "fa", "kp"], RULES, RULES),
        "angles": ctx.pick([0, 90], ANGLES, ANGLES),
        "scales": ctx.pick([1.0, 0.1], SCALES, [1.0, 0.3, 0.1, 0.03]),
        "small_large": ctx.pick((5, 20), (5, 100), (5, 100)),
        "real_rules": ctx.pick(["bp", "fa"], ["bp", "fa", "dfa", "usf"], RULES),
        "digits_n": ctx.pick([3, 10], [3, 6, 10], [3, 6, 10]),
        "image_n": ctx.pick([3, 10], [5, 20, 50], [5, 20, 50, 100]),
        "image_steps": ctx.pick(40, 400, 2000),
    }


def _datasets(ctx: Context) -> list[tuple[str, list[int], Any, dict]]:
    """``(name, class counts, subset(n, seed) -> Dataset, run options)`` for every dataset this run uses."""
    cfg = _config(ctx)
    per_train, per_test = cfg["per_class"]
    out: list[tuple[str, list[int], Any, dict]] = [(
        "synthetic-100", cfg["synthetic_n"],
        lambda n, seed: many_class_subset(n, per_class_train=per_train, per_class_test=per_test, seed=seed),
        {"steps": cfg["steps"], "hidden": cfg["hidden"], "rules": cfg["rules"]})]
    digits = load_digits(seed=0)
    out.append(("digits", cfg["digits_n"], lambda n, seed: _random_classes(digits, n, seed, 100),
                {"steps": cfg["image_steps"], "hidden": cfg["hidden"], "rules": cfg["real_rules"]}))
    cat = ctx.catalog
    for name, full in (("fashion-mnist", cat.fashion), ("cifar100", cat.cifar100)):
        if full is not None:
            ns = cfg["digits_n"] if full.num_classes <= 10 else [n for n in cfg["image_n"] if n <= full.num_classes]
            out.append((name, ns,
                        lambda n, seed, full=full: _random_classes(full, n, seed, ctx.pick(20, 100, 300)),
                        {"steps": cfg["image_steps"], "hidden": cfg["hidden"], "rules": cfg["real_rules"]}))
    if cat.tiny is not None:
        tiny = cat.tiny
        per = ctx.pick(10, 100, 300)

        def tiny_subset(n: int, seed: int) -> Dataset:
            import torch

            classes = torch.randperm(len(tiny.classes), generator=torch.Generator().manual_seed(seed))[:n].tolist()
            ds = tiny.subset(classes, per, 50, seed, size=32)
            x_tr, x_te = standardize(ds.x_train, ds.x_test)
            return Dataset(ds.name, x_tr, ds.y_train, x_te, ds.y_test, n, info=ds.info)

        out.append(("tiny-imagenet", [n for n in cfg["image_n"] if n <= len(tiny.classes)] or [len(tiny.classes)],
                    tiny_subset,
                    {"steps": cfg["image_steps"], "hidden": cfg["hidden"], "rules": cfg["real_rules"]}))
    return out


def _random_classes(ds: Dataset, n: int, seed: int, per_class: int) -> Dataset:
    """A random ``n``-class subset (seeded), ``per_class`` training examples of each, relabelled 0…n−1."""
    import torch

    g = torch.Generator().manual_seed(1000 + seed)
    classes = torch.randperm(ds.num_classes, generator=g)[:n].sort().values
    remap = torch.full((ds.num_classes,), -1, dtype=torch.long)
    remap[classes] = torch.arange(n)
    keep_tr, keep_te = [], []
    for c in classes.tolist():
        pool = torch.nonzero(ds.y_train == c).flatten()
        keep_tr.append(pool[torch.randperm(len(pool), generator=g)[:per_class]])
        keep_te.append(torch.nonzero(ds.y_test == c).flatten())
    tr, te = torch.cat(keep_tr).sort().values, torch.cat(keep_te).sort().values
    return Dataset(ds.name, ds.x_train[tr], remap[ds.y_train[tr]], ds.x_test[te], remap[ds.y_test[te]], n,
                   info={**ds.info, "classes": classes.tolist()})


def _has_feedback(rule: str) -> bool:
    return falign.get_rule(rule).has_feedback


def units(ctx: Context) -> int:
    cfg = _config(ctx)
    main = sum(len(ns) * len(opts["rules"]) for _, ns, _, opts in _datasets(ctx)) * ctx.seeds
    intervention = 2 * (len(cfg["angles"]) + len(cfg["scales"]) - 1) * ctx.seeds
    return main + intervention


# ---- verdicts (pure functions of the numbers; tested on constructed inputs) --------------------------------
def gap_growth_verdict(dataset: str, ns: list[int], gaps: list[float], bp_acc_large: float, chance: float) -> Verdict:
    """(a) The slope of FA's gap on log n has an interval above 0. Inconclusive if BP at the largest n is
    within 2× chance (it did not learn) or at ceiling (≥ 99%: no room for a gap)."""
    claim = f"{dataset}: FA's gap to BP grows with n"
    if not math.isfinite(bp_acc_large) or bp_acc_large <= 2 * chance or bp_acc_large >= CEILING:
        return Verdict(INCONCLUSIVE, f"BP's test accuracy at the largest n is {bp_acc_large:.1%} (chance "
                                     f"{chance:.1%}): the task is "
                                     f"{'at ceiling' if bp_acc_large >= CEILING else 'not learned'}"
                                     f", so a gap cannot show", claim)
    slope = slope_ci(np.log(ns), gaps)
    if not math.isfinite(slope.value):
        return Verdict(INCONCLUSIVE, f"{dataset}: too few points to fit a slope", claim)
    return Verdict.of(slope.lo > 0, f"{dataset}: slope of FA's gap (accuracy points) on log n: "
                                    f"{slope.fmt('.2f', 100)} per e-fold of n (95% CI; supported when the interval "
                                    f"lies above 0)", claim)


def within_n_verdict(dataset: str, angles: list[float], gaps: list[float], ns: list[int]) -> Verdict:
    """(b) The slope of the gap on the gradient angle within each n (``gap ~ angle + C(n)``) has an interval
    above 0: at the same n, the better-aligned runs are the ones closer to BP."""
    claim = f"{dataset}: at the same n, better-aligned runs have smaller gaps"
    est = within_strata_slope(angles, gaps, ns)
    if not math.isfinite(est.value):
        return Verdict(INCONCLUSIVE, f"{dataset}: too few runs per n ({len(gaps)} over {len(set(ns))} values of n)",
                       claim)
    return Verdict.of(est.lo > 0, f"{dataset}: within-n slope of the gap on the hidden layers' gradient angle: "
                                  f"{est.fmt('.3f', 100)} accuracy points per degree over {est.n} runs (95% CI; "
                                  f"supported when above 0)", claim)


def intervention_verdicts(acc: dict[int, dict[float, list[float]]], small: int, large: int) -> list[Verdict]:
    """(c) At the large n, accuracy falls as θ grows (slope on θ with an interval below 0); the fall from θ = 0°
    to the widest θ is larger at the large n than at the small one (paired by seed, interval above 0)."""
    out = []
    thetas = sorted(acc[large])
    xs = [t for t in thetas for _ in acc[large][t]]
    ys = [a for t in thetas for a in acc[large][t]]
    slope = slope_ci(xs, ys)
    out.append(Verdict.of(math.isfinite(slope.hi) and slope.hi < 0,
                          f"n = {large}: slope of FA's test accuracy on the feedback angle θ: "
                          f"{slope.fmt('.3f', 100)} points per degree (supported when below 0)",
                          f"setting the feedback closer to W raises FA's accuracy at n = {large}"))
    lo_t, hi_t = thetas[0], thetas[-1]
    fall = {n: [a - b for a, b in zip(acc[n][lo_t], acc[n][hi_t])] for n in (small, large)}
    diff = mean_ci([f_l - f_s for f_l, f_s in zip(fall[large], fall[small])])
    out.append(Verdict.of(diff.lo > 0 if math.isfinite(diff.lo) else False,
                          f"accuracy lost from θ = {lo_t:g}° to {hi_t:g}°: "
                          f"{mean_ci(fall[large]).fmt('.1f', 100)} points "
                          f"at n = {large}, {mean_ci(fall[small]).fmt('.1f', 100)} at n = {small}; difference "
                          f"{diff.fmt('.1f', 100)} (supported when above 0)",
                          f"the effect of alignment is larger at n = {large} than at n = {small}"))
    return out


def init_scale_verdict(acc_by_scale: dict[float, list[float]], n: int) -> Verdict:
    """Smaller initialisation raises FA's accuracy at the large n: slope of accuracy on log10(scale) < 0."""
    xs = [math.log10(s) for s in sorted(acc_by_scale) for _ in acc_by_scale[s]]
    ys = [a for s in sorted(acc_by_scale) for a in acc_by_scale[s]]
    slope = slope_ci(xs, ys)
    return Verdict.of(math.isfinite(slope.hi) and slope.hi < 0,
                      f"n = {n}: slope of FA's test accuracy on log10(init scale): {slope.fmt('.1f', 100)} points "
                      f"per decade (supported when below 0: smaller initialisation, better accuracy)",
                      f"a smaller initialisation raises FA's accuracy at n = {n}")


# ---- the experiment ---------------------------------------------------------------------------------------
def _one(ctx: Context, data: Dataset, rule: str, seed: int, opts: dict, **extra: Any) -> dict[str, Any]:
    decay = LEARNED_WEIGHT_DECAY if falign.get_rule(rule).feedback_is_parameter else 0.0
    row = MLPRun(rule, data, hidden=opts["hidden"], steps=opts["steps"], seed=seed, weight_decay=decay,
                 device=ctx.device, **extra).run()
    ctx.tick(1)
    return row


def run(ctx: Context) -> ExperimentResult:
    start = time.perf_counter()
    cfg = _config(ctx)
    runs: list[dict[str, Any]] = []
    datasets = _datasets(ctx)
    subsets: dict[tuple[str, int, int], Dataset] = {}
    for name, ns, subset, opts in datasets:
        for n in ns:
            for seed in ctx.seed_list:
                data = subsets[(name, n, seed)] = subset(n, seed)
                for rule in opts["rules"]:
                    runs.append({"dataset": name, "n": n, **_one(ctx, data, rule, seed, opts)})
    bp = {(r["dataset"], r["n"], r["seed"]): r["test acc"] for r in runs if r["rule"] == BASELINE}
    for r in runs:
        r["gap to bp"] = bp[(r["dataset"], r["n"], r["seed"])] - r["test acc"]

    verdicts: list[Verdict] = []
    for name, ns, _, _opts in datasets:
        mine = [r for r in runs if r["dataset"] == name]
        fa = [r for r in mine if r["rule"] == "fa"]
        large = max(ns)
        bp_large = mean_ci([r["test acc"] for r in mine if r["rule"] == BASELINE and r["n"] == large]).value
        verdicts.append(gap_growth_verdict(name, [r["n"] for r in fa], [r["gap to bp"] for r in fa], bp_large,
                                           1.0 / large))
        rule_runs = [r for r in mine if _has_feedback(r["rule"])]  # bp's gap is 0 by definition
        verdicts.append(within_n_verdict(name, [r["gradient angle"] for r in rule_runs],
                                         [r["gap to bp"] for r in rule_runs], [r["n"] for r in rule_runs]))

    # (c) interventions on the synthetic task at a small and a large n
    small, large = cfg["small_large"]
    synth_opts = datasets[0][3]
    by_angle: dict[int, dict[float, list[float]]] = {}
    by_scale: dict[int, dict[float, list[float]]] = {}
    intervention_rows = []
    for n in (small, large):
        by_angle[n] = {t: [] for t in cfg["angles"]}
        by_scale[n] = {s: [] for s in cfg["scales"]}
        for seed in ctx.seed_list:
            data = subsets.get(("synthetic-100", n, seed)) or many_class_subset(
                n, per_class_train=cfg["per_class"][0], per_class_test=cfg["per_class"][1], seed=seed)
            for theta in cfg["angles"]:
                row = _one(ctx, data, "fa", seed, synth_opts, feedback_angle=float(theta))
                by_angle[n][theta].append(row["test acc"])
                intervention_rows.append({"n": n, "intervention": f"feedback at {theta}° to W₀", "seed": seed,
                                          **{k: row[k] for k in ("test acc", "gradient angle",
                                                                 "weight-feedback angle start")}})
            for scale in cfg["scales"]:
                fa_row = next((r for r in runs if r["dataset"] == "synthetic-100" and r["n"] == n and r["rule"] == "fa"
                               and r["seed"] == seed), None) if scale == 1.0 else None
                row = fa_row or _one(ctx, data, "fa", seed, synth_opts, init_scale=scale)
                by_scale[n][scale].append(row["test acc"])
                intervention_rows.append({"n": n, "intervention": f"init scale ×{scale:g}", "seed": seed,
                                          **{k: row[k] for k in ("test acc", "gradient angle",
                                                                 "weight-feedback angle start")}})
    verdicts += intervention_verdicts(by_angle, small, large)
    verdicts.append(init_scale_verdict(by_scale[large], large))

    kp_rows = [r for r in runs if r["rule"] == "kp"]
    kp_start = mean_ci([r["weight-feedback angle start"] for r in kp_rows])
    kp_end = mean_ci([r["weight-feedback angle"] for r in kp_rows])

    summary = _summary(runs)
    inter_summary = _intervention_summary(intervention_rows)
    figures = _figures(ctx, runs, by_angle, small, large)
    tables = [
        Table("multiclass_summary", ["dataset", "n", "rule", "runs", "test acc", "gap to bp", "gradient angle",
                                     "weight-feedback angle"], summary,
              "Mean over seeds with 95% t intervals: test accuracy, gap to BP on the same subset and seed (accuracy "
              "points), hidden layers' gradient angle averaged over the second half of training, and the final "
              "weight–feedback angle."),
        Table("multiclass_intervention", ["n", "intervention", "runs", "test acc", "gradient angle"], inter_summary,
              "FA on the synthetic task with its feedback set at θ to the initial weights (norm unchanged), and from "
              "smaller initialisations: mean over seeds [95% CI]."),
        Table("multiclass_runs", ["dataset", "n", "seed", "rule", "test acc", "train acc", "gap to bp",
                                  "gradient angle", "weight-feedback angle start", "weight-feedback angle"], runs,
              "Every run."),
    ]
    head = combine(verdicts)
    fa_gaps = {r["n"]: mean_ci([x["gap to bp"] for x in runs if x["dataset"] == "synthetic-100" and x["rule"] == "fa"
                                and x["n"] == r["n"]]) for r in runs if r["dataset"] == "synthetic-100"}
    data_used = ", ".join(name for name, *_ in datasets)
    return ExperimentResult(
        NAME, TITLE, HYPOTHESIS,
        {"datasets": data_used, "model": f"MLP, hidden {cfg['hidden']}, ReLU, SGD lr 0.05 momentum 0.9, batch 64",
         "steps": f"{cfg['steps']} (synthetic), {cfg['image_steps']} (images) optimiser steps, whatever n",
         "examples per class": f"{cfg['per_class'][0]} train / {cfg['per_class'][1]} test (synthetic)",
         "seeds": ctx.seeds, "class subsets": "random, one seeded draw per seed",
         "kp": f"weight decay {LEARNED_WEIGHT_DECAY}: its weight–feedback angle went from {kp_start.fmt('.1f')}° "
              f"to {kp_end.fmt('.1f')}°"},
        tables, figures, verdicts,
        headline={"metric": "FA's gap to BP by n (synthetic)",
                  "value": ", ".join(f"n={n}: {fa_gaps[n].fmt('.1f', 100)}" for n in sorted(fa_gaps)[::2]),
                  "verdict": head.status},
        seconds=time.perf_counter() - start, data=data_used, paper_data=PAPER_DATA[NAME])


def _summary(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    keys = list(dict.fromkeys((r["dataset"], r["n"], r["rule"]) for r in runs))
    out = []
    for dataset, n, rule in keys:
        rs = [r for r in runs if (r["dataset"], r["n"], r["rule"]) == (dataset, n, rule)]
        out.append({"dataset": dataset, "n": n, "rule": rule, "runs": len(rs),
                    "test acc": mean_ci([r["test acc"] for r in rs], bounds=(0, 1)).fmt(".3f"),
                    "gap to bp": mean_ci([r["gap to bp"] for r in rs]).fmt(".1f", 100),
                    "gradient angle": mean_ci([r["gradient angle"] for r in rs]).fmt(".1f"),
                    "weight-feedback angle": mean_ci([r["weight-feedback angle"] for r in rs]).fmt(".1f")})
    return out


def _intervention_summary(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    keys = list(dict.fromkeys((r["n"], r["intervention"]) for r in rows))
    return [{"n": n, "intervention": what, "runs": len(rs),
             "test acc": mean_ci([r["test acc"] for r in rs], bounds=(0, 1)).fmt(".3f"),
             "gradient angle": mean_ci([r["gradient angle"] for r in rs]).fmt(".1f")}
            for n, what in keys for rs in [[r for r in rows if (r["n"], r["intervention"]) == (n, what)]]]


def _figures(ctx: Context, runs, by_angle, small: int, large: int) -> list:
    plt = pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    synth = [r for r in runs if r["dataset"] == "synthetic-100"]
    for rule in dict.fromkeys(r["rule"] for r in synth):
        if not _has_feedback(rule):
            continue
        ns = sorted({r["n"] for r in synth})
        gaps = [mean_ci([r["gap to bp"] for r in synth if r["rule"] == rule and r["n"] == n]) for n in ns]
        axes[0].errorbar(ns, [100 * g.value for g in gaps],
                         yerr=[[100 * (g.value - g.lo) if math.isfinite(g.lo) else 0 for g in gaps],
                               [100 * (g.hi - g.value) if math.isfinite(g.hi) else 0 for g in gaps]],
                         marker="o", capsize=3, label=rule)
    axes[0].set(xscale="log", xlabel="classes n", ylabel="gap to BP (accuracy points)",
                title="(a) the gap to BP grows with n (synthetic)")
    axes[0].legend(fontsize=7)
    rs = [r for r in synth if _has_feedback(r["rule"])]
    by_n = {n: [r for r in rs if r["n"] == n] for n in {r["n"] for r in rs}}
    for n, group in sorted(by_n.items()):
        a = np.array([r["gradient angle"] for r in group])
        g = np.array([r["gap to bp"] for r in group])
        axes[1].scatter(a - a.mean(), 100 * (g - g.mean()), s=14, label=f"n={n}")
    axes[1].set(xlabel="gradient angle − its mean at this n (°)", ylabel="gap − its mean at this n (points)",
                title="(b) within n: alignment and gap")
    axes[1].legend(fontsize=7)
    for n, style in ((small, "--"), (large, "-")):
        thetas = sorted(by_angle[n])
        means = [mean_ci(by_angle[n][t]) for t in thetas]
        axes[2].errorbar(thetas, [m.value for m in means],
                         yerr=[[m.value - m.lo if math.isfinite(m.lo) else 0 for m in means],
                               [m.hi - m.value if math.isfinite(m.hi) else 0 for m in means]],
                         ls=style, marker="o", capsize=3, label=f"n={n}")
    axes[2].set(xlabel="feedback angle θ to W₀ (°)", ylabel="FA test accuracy", title="(c) intervention")
    axes[2].legend(fontsize=7)
    return [save_figure(fig, ctx.figures / "multiclass.png")]
