"""Experiment *conservation*: the per-neuron law holds under SGD, with drift O(η) over a fixed horizon.

ReLU MLP with biases on digits, plain full-batch float64 SGD at η, η/2, η/4, η/8 for the same time horizon
``T = η·steps``, every seed. Each (case, pair, seed) gives the log–log slope of the maximum per-neuron drift of
``Q`` against η: the law (exact conservation by the flow, a per-step violation O(η²)) predicts 1; a quantity that
nothing conserves drifts by the same amount at every η, slope ≈ 0.

**Primary test** (the FA-family rules only: ``fa``, ``usf``, ``dfa``'s last hidden layer): per seed, the smallest
slope over those rules' fits; mean over seeds with a t interval, judged by
:func:`~falign.app.experiments.stats.judge` against the margin 0.8 — the effect is ``slope − 0.8``, *supported* when
its interval lies above 0 (the drift shrinks at least like η^0.8), *not supported* when it lies below the
smallest effect of interest 0.2 (the slope provably under the law's 1, e.g. a drift that does not shrink).

**Controls** (the same test, built to fail it): the FA quantity of a network trained by backprop with its
feedback kept but unused (nothing conserves it), and ``fa`` with tanh (not positively homogeneous).

**Secondary:** backprop's own law (balancedness, Du, Hu & Lee 2018) by the same statistic; under practical
training (minibatch 32, float32) plain SGD keeps Q (its relative drift against a backprop copy's, log2 ratio,
smallest effect 1 = halved); momentum and Adam break the law's exactness (their drift against plain SGD's, log2
ratio, smallest effect 1 = doubled), with their drift as a share of the backprop copy's beside it. Momentum also
runs in the flow arm (table only): heavy-ball SGD tends to a rescaled gradient flow as η → 0, so its drift still
shrinks like η, but from a far larger value.
"""

from __future__ import annotations

import math
import time
from dataclasses import replace

import torch
from torch import nn

import falign
from falign.app.experiments.base import Context, float64_digits, note_scale
from falign.app.experiments.flow import sgd_flow
from falign.app.experiments.sources import PAPER_DATA
from falign.app.experiments.stats import judge, loglog_slope, mean_ci
from falign.app.plotting import pyplot, save_figure
from falign.app.results import CONTROL, INCONCLUSIVE, PRIMARY, SECONDARY, ExperimentResult, Table, Verdict, combine
from falign.diagnostics.law import conservation, drift, find_pairs

NAME = "conservation"
TITLE = "Conservation law under SGD"
HYPOTHESIS = ('For a neuron between two converted layers joined by ReLU, Q = ½(‖w_in‖² + b²) − ⟨B[:,k], W[:,k]⟩ is '
              "conserved by the FA-family rules' gradient flow (Robertson & Koyejo 2024, Thm 5.2); with SGD at step η "
              'the maximum per-neuron drift over a fixed horizon is O(η), so log(drift) against log(η) has slope 1.')
MARGIN = 0.8  # the slope the drift must provably exceed
MIN_EFFECT = 0.2  # MARGIN + MIN_EFFECT = 1, the law's slope
PRACTICAL = ["sgd", "sgd + momentum 0.9", "sgd + weight decay 5e-4", "adam"]
BREAKS = ["sgd + momentum 0.9", "adam"]  # judged: the law's exactness broken

# flow runs: (name, rule, activation, momentum, trained by backprop)
RUNS = [
    ("fa", "fa", "relu", 0.0, False),
    ("usf", "usf", "relu", 0.0, False),
    ("dfa", "dfa", "relu", 0.0, False),
    ("bp", "fa", "relu", 0.0, True),
    ("tanh (fa)", "fa", "tanh", 0.0, False),
    ("momentum 0.9 (fa)", "fa", "relu", 0.9, False),
]
# cases judged from them: (case, run, quantity, role); role "reported": in the tables only, not judged
CASES = [
    ("fa", "fa", "q", PRIMARY),
    ("usf", "usf", "q", PRIMARY),
    ("dfa", "dfa", "q", PRIMARY),
    ("bp: FA quantity", "bp", "q", CONTROL),
    ("tanh (fa)", "tanh (fa)", "q", CONTROL),
    ("bp: balancedness", "bp", "q_balanced", SECONDARY),
    ("momentum 0.9 (fa)", "momentum 0.9 (fa)", "q", "reported"),
]


def _mlp(width: int, activation: str, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    act = nn.ReLU if activation == "relu" else nn.Tanh
    return nn.Sequential(nn.Linear(64, width), act(), nn.Linear(width, width), act(),
                         nn.Linear(width, 10)).to(torch.float64)


def slope_verdict(smallest: list[float], case: str, role: str = PRIMARY) -> Verdict:
    """The drift of ``case``'s quantity is O(η): ``smallest`` holds, per seed, the smallest log–log slope of drift
    against η over the case's fits (rules and pairs). The effect ``slope − 0.8`` (mean over seeds, t interval),
    judged with a smallest effect of interest of 0.2 (the law's slope 1). Inconclusive when a slope could not be
    fitted (a drift was 0 or not finite)."""
    claim = f"{case}: the drift of the conserved quantity is O(η) (log–log slope against η at least {MARGIN:g})"
    if not smallest or not all(math.isfinite(s) for s in smallest):
        return Verdict(INCONCLUSIVE, "a drift slope could not be fitted (a drift was 0 or not finite)", claim,
                       role=role)
    est = mean_ci(smallest)
    shifted = replace(est, value=est.value - MARGIN, lo=est.lo - MARGIN, hi=est.hi - MARGIN)
    verdict = judge(shifted, claim, f"smallest drift slope − {MARGIN:g} ({case})", MIN_EFFECT, role=role, spec=".3f")
    verdict.text += f"; smallest slope {est.fmt('.3f')} (law: 1)"
    return verdict


def ratio_verdict(numerator: list[float], denominator: list[float], claim: str, what: str,
                  note: str = "") -> Verdict:
    """Secondary: ``log2(numerator ÷ denominator)`` paired by seed (mean over seeds, t interval), predicted > 0
    with a smallest effect of interest of 1 (a factor of 2)."""
    logs = [math.log2(a / b) if a > 0 and b > 0 else math.nan for a, b in zip(numerator, denominator)]
    verdict = judge(mean_ci(logs), claim, f"log2({what})", 1.0, role=SECONDARY, spec=".2f")
    if note:
        verdict.text += f"; {note}"
    return verdict


def _params(ctx: Context) -> tuple[int, int | None, float, list[float]]:
    """(width, examples, horizon, learning rates η, η/2, η/4, ...) for the context's size."""
    return (ctx.pick(16, 64, 128), ctx.pick(128, None, None), ctx.pick(2.0, 10.0, 20.0),
            [0.2 / 2**i for i in range(ctx.pick(3, 4, 5))])


def _practical_epochs(ctx: Context) -> int:
    return ctx.pick(1, 20, 50)


def units(ctx: Context) -> int:
    return (len(RUNS) * len(_params(ctx)[3]) + len(PRACTICAL) + 1) * ctx.seeds


def _practical(ctx: Context, seed: int, optimizer: str, backprop: bool = False) -> float:
    """Relative drift (max over neurons and pairs, at the end) of fa's Q under minibatch float32 training."""
    from falign.data import batches, epoch_order, load_digits

    ds = load_digits(seed=seed)
    x, y = ds.x_train.flatten(1), ds.y_train
    width = _params(ctx)[0]
    model = falign.convert(_mlp(width, "relu", seed).to(torch.float32), "fa", seed=seed, example_input=x[:2])
    pairs = find_pairs(model, x[:2])
    ref = conservation(pairs)
    params = [p for n, p in model.named_parameters() if not n.endswith("feedback_weight")]
    opt = {"sgd": lambda: torch.optim.SGD(params, lr=0.05),
           "sgd + momentum 0.9": lambda: torch.optim.SGD(params, lr=0.01, momentum=0.9),
           "sgd + weight decay 5e-4": lambda: torch.optim.SGD(params, lr=0.05, weight_decay=5e-4),
           "adam": lambda: torch.optim.Adam(params, lr=1e-3)}[optimizer]()
    train_step = falign.TrainStep(model, opt, backprop=backprop)
    for epoch in range(_practical_epochs(ctx)):
        for xb, yb in batches(x, y, 32, epoch_order(len(y), seed, epoch)):
            train_step(xb, yb)
    ctx.tick(1)
    note_scale(ctx, model, x)
    return max(drift(q, ref[k])["relative"] for k, q in conservation(pairs).items())


def run(ctx: Context) -> ExperimentResult:
    start = time.perf_counter()
    width, n, horizon, lrs = _params(ctx)
    rows, series = [], {}
    for seed in ctx.seed_list:
        x, y = float64_digits(n, seed=seed)
        for name, rule, act, momentum, backprop in RUNS:
            drifts: dict[tuple[str, str], list[float]] = {}  # (quantity, pair) → drift at each η
            relatives: dict[tuple[str, str], float] = {}
            for lr in lrs:
                model = falign.convert(_mlp(width, act, seed), rule, seed=seed, example_input=x[:2])
                result = sgd_flow(model, x, y, lr, horizon, momentum=momentum, backprop=backprop)
                for pair, d in result["drift"].items():
                    for quantity, prefix in (("q", ""), ("q_balanced", "balanced_")):
                        if f"{prefix}max_drift" in d:
                            drifts.setdefault((quantity, pair), []).append(d[f"{prefix}max_drift"])
                            relatives[quantity, pair] = d[f"{prefix}relative"]
                ctx.tick(1)
            for case, run_name, quantity, role in CASES:
                if run_name != name:
                    continue
                for (q, pair), values in drifts.items():
                    if q != quantity:
                        continue
                    row = {"case": case, "rule": "bp" if backprop else rule, "seed": seed, "pair": pair,
                           "quantity": "Q (feedback law)" if quantity == "q" else "balancedness", "role": role,
                           "slope": loglog_slope(lrs, values).value,
                           "relative drift at smallest η": relatives[q, pair]}
                    row.update({f"drift η={lr:g}": v for lr, v in zip(lrs, values)})
                    rows.append(row)
                    if seed == 0:
                        series[case, pair] = (values, role == PRIMARY)

    def smallest(cases: list[str]) -> list[float]:
        """Per seed, the smallest slope over the fits of ``cases``."""
        return [min((r["slope"] for r in rows if r["case"] in cases and r["seed"] == s), default=math.nan)
                for s in ctx.seed_list]

    family = [case for case, _, _, role in CASES if role == PRIMARY]
    verdicts = [slope_verdict(smallest(family), "FA-family rules (" + ", ".join(family) + ")", PRIMARY)]
    verdicts += [slope_verdict(smallest([case]), case, role) for case, _, _, role in CASES
                 if role in (CONTROL, SECONDARY)]

    practical_rows = []
    for seed in ctx.seed_list:
        control = _practical(ctx, seed, "sgd", backprop=True)
        for optimizer in PRACTICAL:
            rel = _practical(ctx, seed, optimizer)
            practical_rows.append({"training": optimizer, "seed": seed, "relative drift of Q": rel,
                                   "same under backprop": control, "ratio": rel / control})

    def drifts_of(optimizer: str, key: str = "relative drift of Q") -> list[float]:
        return [r[key] for r in practical_rows if r["training"] == optimizer]

    verdicts.append(ratio_verdict(
        drifts_of("sgd", "same under backprop"), drifts_of("sgd"),
        "under practical training (minibatch 32, float32, plain SGD) fa's Q stays near its start",
        "backprop copy's relative drift ÷ fa's under minibatch SGD"))
    for optimizer in BREAKS:
        verdicts.append(ratio_verdict(
            drifts_of(optimizer), drifts_of("sgd"),
            f"{optimizer} breaks the law: fa's Q drifts more than under plain SGD (minibatch 32, float32)",
            f"relative drift under {optimizer} ÷ under plain SGD",
            f"its drift is {mean_ci(drifts_of(optimizer, 'ratio')).fmt('.2f')} of a backprop copy's, which nothing "
            f"conserves (plain SGD: {mean_ci(drifts_of('sgd', 'ratio')).fmt('.3f')})"))

    ideal = {s: max(r["relative drift at smallest η"] for r in rows if r["case"] == "fa" and r["seed"] == s)
             for s in ctx.seed_list}
    practical_summary = [
        {"training": f"ideal flow: full batch, float64, η = {lrs[-1]:g}",
         "relative drift of Q": mean_ci(ideal.values()).fmt(".3g"),
         "ratio to backprop's": "—"},
        *[{"training": f"minibatch 32, float32, {opt}, {_practical_epochs(ctx)} epochs",
           "relative drift of Q": mean_ci(drifts_of(opt)).fmt(".3g"),
           "ratio to backprop's": mean_ci(drifts_of(opt, "ratio")).fmt(".3g")}
          for opt in PRACTICAL],
        {"training": "control: backprop, minibatch SGD (FA quantity, nothing conserves it)",
         "relative drift of Q": mean_ci(drifts_of("sgd", "same under backprop")).fmt(".3g"),
         "ratio to backprop's": "1"},
    ]

    fig_path = ctx.figures / "conservation_loglog.png"
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(9, 5))
    colors = {case: f"C{i}" for i, (case, *_) in enumerate(CASES)}
    pairs = list(dict.fromkeys(pair for _, pair in series))
    for (case, pair), (values, law) in series.items():
        ax.loglog(lrs, values, marker="os^v"[pairs.index(pair) % 4], color=colors[case], ls="-" if law else "--",
                  label=f"{case} {pair}")
    first = series[(CASES[0][0], pairs[0])][0] if (CASES[0][0], pairs[0]) in series else None
    if first:  # the claim: drift is O(η), a line of slope 1 on these axes
        ax.loglog(lrs, [0.5 * first[0] * lr / lrs[0] for lr in lrs], color="black", ls=":", lw=1.2,
                  label="slope 1 (drift ∝ η), a guide")
    ax.set_xticks(lrs, [f"{lr:g}" for lr in lrs])
    ax.minorticks_off()
    ax.set(xlabel="learning rate η", ylabel="max per-neuron drift of the conserved quantity",
           title=f"drift over a fixed horizon T={horizon:g}, seed 0 (solid: the FA-family rules judged)")
    ax.legend(fontsize=6, loc="center left", bbox_to_anchor=(1.01, 0.5))
    save_figure(fig, fig_path)
    columns = ["case", "rule", "seed", "pair", "quantity", "role", *[f"drift η={lr:g}" for lr in lrs],
               "slope", "relative drift at smallest η"]
    summary = []
    for case, _, _, role in CASES:
        rs = [r for r in rows if r["case"] == case]
        summary.append({"case": case, "role": role, "fits": len(rs),
                        "slope": mean_ci([r["slope"] for r in rs], over="fits").fmt(".3f"),
                        "smallest slope per seed": mean_ci(smallest([case])).fmt(".3f"),
                        "relative drift at smallest η":
                            mean_ci([r["relative drift at smallest η"] for r in rs], over="fits").fmt(".3g")})
    head = combine(verdicts)
    return ExperimentResult(
        NAME, TITLE, HYPOTHESIS,
        setup={"model": f"MLP 64-{width}-{width}-10, ReLU (tanh control), biases, float64 "
                        "(float32 in the practical arm)",
               "data": f"sklearn digits, {len(y)} training examples, full batch (a seeded split per seed)",
               "loss": "cross-entropy", "optimizer": "plain SGD (momentum 0.9 for that case)", "learning rates": lrs,
               "horizon T = η·steps": horizon, "seeds": ctx.seeds,
               "primary test": f"per seed the smallest drift slope over the FA-family fits; margin {MARGIN:g}, "
                               f"smallest effect of interest {MIN_EFFECT:g} (the law's slope 1)",
               "practical arm": f"minibatch 32, float32, {_practical_epochs(ctx)} epochs: {', '.join(PRACTICAL)} "
                                "(learning rates 0.05, 0.01, 0.05, 0.001)"},
        tables=[Table("conservation_summary", list(summary[0]), summary,
                      "Per case: the log–log slope of drift against η, mean over its fits (pairs × seeds) and, as "
                      "the test uses it, the smallest per seed, mean over seeds [95% CI]; role: primary (the "
                      "FA-family rules, judged together), control, secondary, or reported (not judged)."),
                Table("conservation_practical", ["training", "relative drift of Q", "ratio to backprop's"],
                      practical_summary, "Relative drift (max per-neuron drift ÷ the size of the terms that cancel) "
                      "of fa's Q at the end of training, mean over seeds [95% CI]: the ideal flow beside practical "
                      "training, and the same quantity in a backprop-trained copy, which nothing conserves."),
                Table("conservation", columns, rows, "Every fit: max per-neuron drift of each pair's quantity.")],
        figures=[fig_path], verdicts=verdicts,
        headline={"metric": "FA-family rules: smallest drift slope vs η (law: 1; margin 0.8)",
                  "value": mean_ci(smallest(family)).fmt(".3f"), "verdict": head.status},
        seconds=time.perf_counter() - start, data="sklearn digits", paper_data=PAPER_DATA[NAME],
    )
