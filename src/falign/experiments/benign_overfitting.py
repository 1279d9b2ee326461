"""Experiment *benign overfitting*: fitting noisy labels without losing clean test accuracy.

A 4,000-example subset of Fashion-MNIST (digits' training set where Fashion-MNIST is absent) with 20% of
its labels flipped to another class; bp, fa and usf train an MLP long enough to fit the noisy labels.
Per epoch: accuracy on the noisy training labels, the fraction of flipped examples predicted as their
*noisy* label (memorisation), and accuracy on the clean test set.
"""

from __future__ import annotations

import time

import torch

import falign
from falign.data import batches, epoch_order
from falign.experiments.base import Context
from falign.experiments.multiclass import fashion_available
from falign.plotting import pyplot, save_figure
from falign.results import ExperimentResult, Table, Verdict
from falign.train import TrainConfig, evaluate
from falign.train.trainer import build_run, loss_fn, make_optimizer

NAME = "benign_overfitting"
TITLE = "Benign overfitting with label noise"
HYPOTHESIS = ('Trained long enough on a 4,000-example subset with 20% of labels flipped, feedback-alignment rules, '
              'like backprop, fit the noisy training labels (memorising the flipped ones) while clean test accuracy'
              ' stays near its best (Robertson & Koyejo 2024, §6).')
FIT_MIN = 0.95
MAX_DROP = 0.05


def verdicts(summary: dict[str, dict[str, float]]) -> list[Verdict]:
    """Per rule: supported when noisy-label training accuracy reaches 95% and the final test accuracy is
    within 5 points of its best over training."""
    out = []
    for rule, s in summary.items():
        ok = s["noisy train acc"] >= FIT_MIN and s["peak test acc"] - s["final test acc"] <= MAX_DROP
        out.append(Verdict(ok, f"{rule}: fits {s['noisy train acc']:.1%} of the noisy training labels (memorises "
                               f"{s['memorised flipped']:.1%} of the flipped ones); test accuracy ends at "
                               f"{s['final test acc']:.1%}, {100 * (s['peak test acc'] - s['final test acc']):.1f} "
                               f"points below its best {s['peak test acc']:.1%} (required: fit ≥ {FIT_MIN:.0%}, drop ≤ "
                               f"{100 * MAX_DROP:.0f} points)"))
    return out


@torch.no_grad()
def _memorised(model, x, noisy, clean) -> float:
    flipped = noisy != clean
    if not flipped.any():
        return 0.0
    model.eval()
    pred = torch.cat([model(xb).argmax(-1) for xb, _ in batches(x[flipped], noisy[flipped], 1000)])
    model.train()
    return float((pred == noisy[flipped]).float().mean())


RULES = ["bp", "fa", "usf"]


def _params(ctx: Context) -> tuple[str, int | None, int, tuple[int, int]]:
    """(dataset, train subset, epochs, hidden widths) for the context's size."""
    data = "fashion-mnist" if fashion_available() else "digits"
    subset = ctx.pick(500, 4000, 4000) if data == "fashion-mnist" else None
    return data, subset, ctx.pick(3, 60, 200), ctx.pick((64, 64), (512, 512), (1024, 1024))


def units(ctx: Context) -> int:
    return len(RULES) * _params(ctx)[2]


def run(ctx: Context) -> ExperimentResult:
    start = time.perf_counter()
    data, subset, epochs, hidden = _params(ctx)
    rules = RULES
    rows, summary, curves = [], {}, {}
    for rule in rules:
        cfg = TrainConfig(rule=rule, data=data, train_subset=subset, label_noise=0.2, hidden=hidden, epochs=epochs,
                          batch_size=64, lr=0.01, momentum=0.9, seed=0)
        ds, model = build_run(cfg, torch.device(ctx.device))
        opt = make_optimizer(cfg, model)
        falign.attach(model, opt)
        curve = []
        for epoch in range(epochs):
            for xb, yb in batches(ds.x_train, ds.y_train, cfg.batch_size, epoch_order(len(ds.y_train), 0, epoch)):
                opt.zero_grad(set_to_none=True)
                loss_fn(cfg, model(xb), yb).backward()
                opt.step()
            _, noisy_acc = evaluate(model, cfg, ds.x_train, ds.y_train)
            _, test_acc = evaluate(model, cfg, ds.x_test, ds.y_test)
            mem = _memorised(model, ds.x_train, ds.y_train, ds.clean_y_train)
            row = {"rule": rule, "epoch": epoch + 1, "noisy train acc": noisy_acc, "memorised flipped": mem,
                   "clean test acc": test_acc}
            rows.append(row)
            curve.append(row)
            ctx.tick(1)
        curves[rule] = curve
        summary[rule] = {"noisy train acc": curve[-1]["noisy train acc"],
                         "memorised flipped": curve[-1]["memorised flipped"],
                         "final test acc": curve[-1]["clean test acc"],
                         "peak test acc": max(r["clean test acc"] for r in curve)}
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for rule, curve in curves.items():
        ep = [r["epoch"] for r in curve]
        axes[0].plot(ep, [r["noisy train acc"] for r in curve], label=f"{rule} train (noisy labels)")
        axes[0].plot(ep, [r["memorised flipped"] for r in curve], ls=":", label=f"{rule} flipped memorised")
        axes[1].plot(ep, [r["clean test acc"] for r in curve], label=rule)
    axes[0].set(xlabel="epoch", ylabel="accuracy", title=f"{data}: fitting 20% noisy labels")
    axes[1].set(xlabel="epoch", ylabel="clean test accuracy", title="test accuracy")
    for ax in axes:
        ax.legend(fontsize=7)
    fig_path = save_figure(fig, ctx.figures / "benign_overfitting.png")
    summary_rows = [{"rule": r, **s} for r, s in summary.items()]
    result_verdicts = verdicts(summary)
    return ExperimentResult(
        NAME, TITLE, HYPOTHESIS,
        setup={"data": f"{data}, {'random ' + str(subset) + '-example subset' if subset else 'all training examples'}, "
                       f"20% symmetric label noise (seed 0), clean test set",
               "model": f"MLP {'-'.join(map(str, hidden))} ReLU", "rules": rules,
               "optimizer": f"SGD lr 0.01 momentum 0.9, batch 64, {epochs} epochs"},
        tables=[Table("benign_overfitting_summary", ["rule", "noisy train acc", "memorised flipped", "final test acc",
                                                     "peak test acc"], summary_rows, "End of training."),
                Table("benign_overfitting_curves", ["rule", "epoch", "noisy train acc", "memorised flipped",
                                                    "clean test acc"], rows, "Per epoch.")],
        figures=[fig_path], verdicts=result_verdicts,
        headline={"metric": "noisy-train / clean-test acc (bp, fa, usf)",
                  "value": "; ".join(f"{s['noisy train acc']:.0%}/{s['final test acc']:.0%}" for s in summary.values()),
                  "verdict": "supported" if all(v.supported for v in result_verdicts) else "not supported"},
        seconds=time.perf_counter() - start,
    )
