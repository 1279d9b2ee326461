"""Experiment *implicit alignment*: the conservation law determines how far each layer turns towards its feedback.

Summed over a layer's units the law reads ``⟨B_{l+1}, W_{l+1}⟩ = ½(‖W_l‖² + ‖b_l‖²) − Q(0)``, ``Q(0)`` its value
at initialisation. So the weight–feedback angle of layer ``l+1`` is predicted, without looking at how ``W_{l+1}``
and ``B_{l+1}`` meet, from the lower layer's size and ``Q(0)``:

    cos θ_pred = (½(‖W_l‖² + ‖b_l‖²) − Q(0)) / (‖B_{l+1}‖ ‖W_{l+1}‖)        (a cosine above 1 is no angle: 0°)

and from a small initialisation (``Q(0) ≈ 0``) it is forced below 90° as the lower layer grows.

**Primary test: the law predicts the measured angle.** ``fa`` with plain minibatch SGD on digits (ReLU MLP
64-w-w-10 with biases) at several initialisation scales, every seed: at the end of training, for each layer
whose feedback is used, ``|θ_measured − θ_pred|``; per seed the largest over layers and scales. The effect is
the headroom ``5° − largest error`` (a tolerance of 5°: half of the ~10° by which the init scale moved the top
layer's final angle in earlier runs), mean over seeds with a t interval, judged by
:func:`~falign.app.experiments.stats.judge`: *supported* when it lies above 0 (every error provably under 5°), *not
supported* below the smallest effect of interest 1° (every error provably over 4°). Precondition: every ``fa`` run
trained (test accuracy ≥ twice chance).

**Controls** (the same test, built to fail it): ``fa`` with tanh, where the law does not hold (FA still aligns,
by other means), and backprop training the same network with its feedback kept but unused (nothing learns by
feedback; as the lower layer grows the predicted cosine can exceed 1).

**Secondary:** the final angle (mean over layers) at init ×1 minus at the smallest scale, paired by seed; the
same difference for the controls is printed beside it, because a trend alone does not single out the law.
"""

from __future__ import annotations

import math
import time

import numpy as np
import torch

import falign
from falign.app.experiments.base import Context, note_scale
from falign.app.experiments.sources import PAPER_DATA
from falign.app.experiments.stats import Estimate, judge, mean_ci
from falign.app.plotting import pyplot, save_figure
from falign.app.results import CONTROL, INCONCLUSIVE, PRIMARY, SECONDARY, ExperimentResult, Table, Verdict, combine
from falign.data import batches, epoch_order, load_digits
from falign.diagnostics import find_pairs, pair_quantities
from falign.models import MLP

NAME = "implicit_alignment"
TITLE = "Implicit alignment from small initialisation"
HYPOTHESIS = ('Under fa with plain SGD and ReLU, the conservation law fixes ⟨B_{l+1}, W_{l+1}⟩ at '
              '½(‖W_l‖² + ‖b_l‖²) − Q(0), so the weight–feedback angle of each layer whose feedback is used is '
              'predicted from the lower layer\'s norm and Q(0) alone; from a small initialisation (Q(0) ≈ 0) that '
              'angle is forced below 90°.')
TOLERANCE = 5.0  # degrees: the law's prediction must be this close to the measured angle
MIN_EFFECT = 1.0  # degrees of headroom under the tolerance
MIN_TREND = 2.0  # degrees: the smallest init-scale effect on the final angle of interest

# (case, activation, trained by backprop, role)
CASES = [("fa", "relu", False, PRIMARY),
         ("tanh (fa)", "tanh", False, CONTROL),
         ("bp (feedback unused)", "relu", True, CONTROL)]


def predicted_angle(incoming: float, q0: float, norms: float) -> float:
    """The angle (degrees) the law predicts between ``W_{l+1}`` and ``B_{l+1}``: ``arccos((incoming − Q(0)) /
    norms)``, ``incoming = ½(‖W_l‖² + ‖b_l‖²)`` now and ``norms = ‖B_{l+1}‖‖W_{l+1}‖``; a cosine beyond ±1 (no
    angle satisfies the law) is clipped to 0° or 180°."""
    if not norms > 0:
        return math.nan
    return math.degrees(math.acos(max(-1.0, min(1.0, (incoming - q0) / norms))))


def layer_angles(pairs: list, q0: dict[str, float]) -> dict[str, tuple[float, float]]:
    """``{outgoing layer: (measured angle, predicted angle)}`` (degrees) for every pair whose outgoing layer has a
    feedback ``B`` of its weight's shape; ``q0`` the summed ``Q`` of each pair at initialisation."""
    out = {}
    for p in pairs:
        q = pair_quantities(p)
        if "coupling" not in q:
            continue
        w = p.layer_out.weight.detach().double()
        b = p.layer_out.current_feedback().detach().double()
        norms = float(w.norm() * b.norm())
        coupling, incoming = float(q["coupling"].sum()), float(q["incoming"].sum())
        out[p.name_out] = (predicted_angle(coupling, 0.0, norms), predicted_angle(incoming, q0[p.key], norms))
    return out


def prediction_verdict(errors: list[float], case: str = "fa", role: str = PRIMARY,
                       accuracies: list[float] | None = None, chance: float = 0.1) -> Verdict:
    """The law predicts the measured angle to within 5°: ``errors`` are, per seed, the largest ``|measured −
    predicted|`` (degrees) over layers and init scales; the effect ``5° − error`` (mean over seeds, t interval)
    judged with a smallest effect of interest of 1°. Inconclusive, for the primary, when a run did not train
    (test accuracy under twice ``chance``): an untrained net's angles say nothing."""
    claim = f"{case}: the conservation law predicts the final weight–feedback angle to within {TOLERANCE:g}°"
    if role == PRIMARY and accuracies is not None:
        worst = min(accuracies) if accuracies else math.nan
        if not worst >= 2 * chance:
            return Verdict(INCONCLUSIVE, f"a run did not train (lowest test accuracy {worst:.1%}, chance {chance:.0%})",
                           claim, role=role)
    err = mean_ci(errors, bounds=(0.0, 180.0))
    headroom = Estimate(TOLERANCE - err.value, TOLERANCE - err.hi, TOLERANCE - err.lo, err.n, err.level, err.se,
                        err.dof, err.identical, err.over)
    verdict = judge(headroom, claim, f"{TOLERANCE:g}° − largest |measured − predicted angle| ({case})", MIN_EFFECT,
                    role=role, spec=".2f", unit="°")
    verdict.text += f"; largest error {err.fmt('.2f', unit='°')}"
    return verdict


def trend_verdict(differences: list[float], others: dict[str, list[float]]) -> Verdict:
    """Secondary: fa's final angle (mean over layers) at init ×1 minus at the smallest scale, per seed (positive:
    the smaller initialisation ends better aligned); the same difference for each control is printed beside it."""
    verdict = judge(mean_ci(differences), "fa: a smaller initialisation ends better aligned",
                    "final angle at ×1 − at the smallest scale (fa)", MIN_TREND, role=SECONDARY, spec=".1f", unit="°")
    if others:
        estimates = {case: mean_ci(v) for case, v in others.items()}
        verdict.text += "; the same difference under the controls: " + ", ".join(
            f"{case} {est.fmt('.1f', unit='°')}" for case, est in estimates.items())
        shown = [case for case, est in estimates.items() if est.lo > 0 or (est.identical and est.value > 0)]
        if shown:
            verdict.text += f" ({', '.join(shown)} too, without the law: the trend alone does not single it out)"
    return verdict


def _params(ctx: Context) -> tuple[list[float], int, int]:
    """(init scales, width, epochs) for the context's size."""
    return (ctx.pick([1.0, 0.1], [1.0, 0.3, 0.1, 0.03], [1.0, 0.3, 0.1, 0.03, 0.01]), ctx.pick(32, 128, 256),
            ctx.pick(2, 40, 100))


def units(ctx: Context) -> int:
    scales, _, epochs = _params(ctx)
    return len(CASES) * len(scales) * epochs * ctx.seeds


def _train(ctx: Context, activation: str, backprop: bool, scale: float, seed: int, width: int, epochs: int,
           data, record: bool) -> dict:
    """One run: plain SGD (lr 0.05, batch 32) from ``init_scale = scale``; the final measured and predicted angles
    per layer, accuracies, and (``record``) both angles every 10 steps."""
    x, y = data.x_train.flatten(1), data.y_train
    torch.manual_seed(seed)
    model = falign.convert(MLP([x.shape[1], width, width, 10], activation=activation, init_scale=scale), "fa",
                           seed=seed, example_input=x[:2])
    opt = torch.optim.SGD([p for n, p in model.named_parameters() if not n.endswith("feedback_weight")], lr=0.05)
    train_step = falign.TrainStep(model, opt, backprop=backprop)
    pairs = find_pairs(model, x[:2])
    q0 = {p.key: float(pair_quantities(p)["q"].sum()) for p in pairs}
    history, step = [], 0
    for epoch in range(epochs):
        for xb, yb in batches(x, y, 32, epoch_order(len(y), seed, epoch)):
            if record and step % 10 == 0:
                history.append((step, layer_angles(pairs, q0)))
            train_step(xb, yb)
            step += 1
        ctx.tick(1)
    final = layer_angles(pairs, q0)
    note_scale(ctx, model, x)
    with torch.no_grad():
        train_acc = float((model(x).argmax(1) == y).float().mean())
        test_acc = float((model(data.x_test.flatten(1)).argmax(1) == data.y_test).float().mean())
    return {"final": final, "history": [*history, (step, final)], "train": train_acc, "test": test_acc}


def run(ctx: Context) -> ExperimentResult:
    start = time.perf_counter()
    scales, width, epochs = _params(ctx)
    shown_scale = scales[len(scales) // 2]
    ds = load_digits(seed=0)
    rows, histories = [], {}
    for case, activation, backprop, _ in CASES:
        for seed in ctx.seed_list:
            for scale in scales:
                record = seed == 0 and scale == shown_scale
                r = _train(ctx, activation, backprop, scale, seed, width, epochs, ds, record)
                if record:
                    histories[case] = r["history"]
                for layer, (measured, predicted) in r["final"].items():
                    rows.append({"case": case, "init scale": scale, "seed": seed, "layer": layer,
                                 "measured angle": measured, "predicted angle": predicted,
                                 "error": abs(measured - predicted), "train accuracy": r["train"],
                                 "test accuracy": r["test"]})

    def of(case: str, **match) -> list[dict]:
        return [r for r in rows if r["case"] == case and all(r[k] == v for k, v in match.items())]

    verdicts = []
    for case, _, _, role in CASES:
        errors = [max(r["error"] for r in of(case, seed=s)) for s in ctx.seed_list]
        accs = [r["test accuracy"] for r in of(case)] if role == PRIMARY else None
        verdicts.append(prediction_verdict(errors, case, role, accs))

    def trend(case: str) -> list[float]:
        return [float(np.mean([r["measured angle"] for r in of(case, seed=s, **{"init scale": max(scales)})])
                      - np.mean([r["measured angle"] for r in of(case, seed=s, **{"init scale": min(scales)})]))
                for s in ctx.seed_list]

    verdicts.append(trend_verdict(trend("fa"), {case: trend(case) for case, *_ in CASES[1:]}))

    summary = [{"case": case, "init scale": scale, "layer": layer, "runs": len(rs),
                "measured angle": mean_ci([r["measured angle"] for r in rs]).fmt(".1f"),
                "predicted angle": mean_ci([r["predicted angle"] for r in rs]).fmt(".1f"),
                "|error|": mean_ci([r["error"] for r in rs], bounds=(0.0, 180.0)).fmt(".2f"),
                "train accuracy": mean_ci([r["train accuracy"] for r in rs], bounds=(0, 1)).fmt(".3f"),
                "test accuracy": mean_ci([r["test accuracy"] for r in rs], bounds=(0, 1)).fmt(".3f")}
               for case, *_ in CASES for scale in scales
               for layer in dict.fromkeys(r["layer"] for r in of(case))
               for rs in [of(case, layer=layer, **{"init scale": scale})]]

    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8))
    import matplotlib.colors as mcolors

    scale_values = sorted({float(r["init scale"]) for r in rows})
    norm = mcolors.LogNorm(min(scale_values), max(scale_values)) if len(scale_values) > 1 and min(scale_values) > 0 \
        else mcolors.Normalize(min(scale_values) - 1, max(scale_values) + 1)
    points = None
    for (case, *_), marker in zip(CASES, "os^"):
        rs = of(case)
        points = axes[0].scatter([r["predicted angle"] for r in rs], [r["measured angle"] for r in rs],
                                 c=[float(r["init scale"]) for r in rs], cmap="viridis", norm=norm, marker=marker,
                                 s=18, label=f"{case} (marker)", edgecolors="none")
    if points is not None:
        fig.colorbar(points, ax=axes[0], label="initial weight scale (colour)")
    axes[0].plot([0, 95], [0, 95], color="grey", lw=0.8)
    axes[0].fill_between([0, 95], [-TOLERANCE, 95 - TOLERANCE], [TOLERANCE, 95 + TOLERANCE], color="grey",
                         alpha=0.15, label=f"±{TOLERANCE:g}°")
    axes[0].set(xlabel="angle predicted by the law (degrees)", ylabel="measured angle(W, B) (degrees)",
                title="end of training: every scale, seed and layer", xlim=(0, 95), ylim=(0, 95))
    legend = axes[0].legend(fontsize=7)
    for handle in legend.legend_handles[:len(CASES)]:  # the markers say the case; the colour is the scale
        handle.set_facecolor("k")
    for i, (case, history) in enumerate(histories.items()):
        layer = sorted(history[-1][1])[-1]
        steps = [s for s, a in history if layer in a]
        color = f"C{i}"
        axes[1].plot(steps, [a[layer][0] for _, a in history if layer in a], color=color, label=f"{case} measured")
        axes[1].plot(steps, [a[layer][1] for _, a in history if layer in a], color=color, ls="--",
                     label=f"{case} predicted")
    axes[1].axhline(90, color="grey", ls=":", lw=0.8)
    axes[1].set(xlabel="step", ylabel="angle (degrees)",
                title=f"top layer over training, init ×{shown_scale:g}, seed 0")
    axes[1].legend(fontsize=7)
    fig_path = save_figure(fig, ctx.figures / "implicit_alignment.png")

    head = combine(verdicts)
    fa_err = mean_ci([max(r["error"] for r in of("fa", seed=s)) for s in ctx.seed_list], bounds=(0.0, 180.0))
    return ExperimentResult(
        NAME, TITLE, HYPOTHESIS,
        setup={"model": f"MLP 64-{width}-{width}-10 with biases (ReLU; tanh for that control), all initial weights "
                        "× init scale",
               "rule": "fa, feedback seeded per seed; the backprop control trains the same converted network by "
                       "backprop, its feedback kept but unused",
               "data": "sklearn digits (seeded split 0)", "seeds": ctx.seeds,
               "optimizer": f"plain SGD lr 0.05, batch 32, {epochs} epochs (fixed: the law holds at every step)",
               "init scales": scales,
               "test": f"per seed the largest |measured − predicted angle| over layers and scales; tolerance "
                       f"{TOLERANCE:g}°, smallest effect of interest {MIN_EFFECT:g}° of headroom"},
        tables=[Table("implicit_alignment_summary", list(summary[0]), summary,
                      "Per case, init scale and layer whose feedback is used, mean over seeds [95% CI]: the final "
                      "weight–feedback angle measured and as the law predicts it from ½(‖W_l‖² + ‖b_l‖²) − Q(0), "
                      "their absolute difference, and accuracy."),
                Table("implicit_alignment_angles", ["case", "init scale", "seed", "layer", "measured angle",
                                                    "predicted angle", "error", "train accuracy", "test accuracy"],
                      rows, "Every run and layer at the end of training (degrees).")],
        figures=[fig_path], verdicts=verdicts,
        headline={"metric": f"fa: largest |measured − law-predicted angle| (tolerance {TOLERANCE:g}°)",
                  "value": fa_err.fmt(".2f", unit="°"), "verdict": head.status},
        seconds=time.perf_counter() - start, data="sklearn digits", paper_data=PAPER_DATA[NAME],
    )
