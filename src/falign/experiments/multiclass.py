"""Experiment *multi-class*: does better gradient alignment go with better multi-class performance?

n-class sweeps on seeded synthetic tasks and on Fashion-MNIST (digits where Fashion-MNIST is absent),
for bp, fa, dfa, usf, frsf and kp over several seeds. Each run is an ordinary ``falign train`` run
(its directory under ``multiclass/runs``) with diagnostics; the mean angle between each hidden layer's
rule gradient and the true gradient is averaged over all recorded steps.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np

from falign.data.idx import FASHION_MNIST_DIR, FILES
from falign.experiments.base import Context, mean_std, spearman
from falign.plotting import pyplot, save_figure
from falign.results import ExperimentResult, Table, Verdict
from falign.train import TrainConfig, Trainer, read_metrics

NAME = "multiclass"
TITLE = "Multi-class performance and gradient alignment"
HYPOTHESIS = ('Across feedback-alignment-family rules, runs whose hidden-layer updates are better aligned with the '
              'true gradient (smaller angle) reach higher test accuracy on multi-class tasks (Robertson & Koyejo '
              "2024, §6): Spearman's correlation between mean gradient angle and test accuracy is negative.")
RULES = ["bp", "fa", "dfa", "usf", "frsf", "kp"]
ALPHA = 0.05


def fashion_available() -> bool:
    folder = Path(FASHION_MNIST_DIR)
    return all((folder / f).is_file() or (folder / f"{f}.gz").is_file() for f in FILES.values())


def verdicts(correlations: dict[str, tuple[float, float]]) -> list[Verdict]:
    """Supported for a dataset when the pooled Spearman ρ (angle vs accuracy, FA-family runs) is negative
    with permutation p < 0.05."""
    out = []
    for dataset, (rho, p) in correlations.items():
        ok = math.isfinite(rho) and rho < 0 and p < ALPHA
        out.append(Verdict(ok, f"{dataset}: Spearman ρ = {rho:.2f} (permutation p = {p:.3g}) between mean hidden "
                               f"gradient angle and test accuracy; expected negative with p < {ALPHA}"))
    return out


def _sweeps(ctx: Context) -> list[tuple[str, dict, list[int]]]:
    synthetic_n = ctx.pick([2, 5], [2, 5, 10, 20, 50, 100], [2, 5, 10, 20, 50, 100])
    real = "fashion-mnist" if fashion_available() else "digits"
    real_n = ctx.pick([2, 5], [2, 5, 10], [2, 5, 10])
    if real == "fashion-mnist":
        real_cfg = {"data": real, "hidden": ctx.pick((32, 32), (256, 256), (512, 512)),
                    "train_subset": ctx.pick(1000, 6000, None), "epochs": ctx.pick(1, 5, 20)}
    else:
        real_cfg = {"data": real, "hidden": ctx.pick((32, 32), (256, 256), (512, 512)), "epochs": ctx.pick(2, 20, 40)}
    synth_cfg = {"data": "synthetic", "hidden": ctx.pick((32, 32), (128, 128), (256, 256)),
                 "epochs": ctx.pick(2, 10, 30)}
    return [("synthetic", synth_cfg, synthetic_n), (real, real_cfg, real_n)]


def units(ctx: Context) -> int:
    return sum(len(ns) for _, _, ns in _sweeps(ctx)) * len(RULES) * ctx.seeds


def run(ctx: Context) -> ExperimentResult:
    start = time.perf_counter()
    seeds = list(range(ctx.seeds))
    run_root = ctx.out / "multiclass" / "runs"
    records = []
    sweeps = _sweeps(ctx)
    for dataset, cfg, ns in sweeps:
        for n in ns:
            for rule in RULES:
                for seed in seeds:
                    fields = dict(cfg, rule=rule, seed=seed, model="mlp", batch_size=64, optimizer="sgd", lr=0.02,
                                  device=ctx.device,
                                  momentum=0.9, diagnostics_every=ctx.pick(5, 20, 50))
                    if dataset == "synthetic":
                        fields["synthetic_classes"] = n
                    else:
                        fields["n_classes"] = n
                    out = run_root / f"{dataset}-n{n}-{rule}-s{seed}"
                    trainer = Trainer(TrainConfig(**fields), out, progress=False, overwrite=True)
                    summary = trainer.run()
                    rows = read_metrics(out / "metrics.jsonl")
                    hidden = [layer for layer in rows[0]["gradient_alignment"] if layer != "fc3"]
                    angles = {layer: float(np.mean([r["gradient_alignment"][layer] for r in rows
                                                    if r["event"] == "diagnostics"
                                                    and r["gradient_alignment"].get(layer) is not None]))
                              for layer in hidden}
                    records.append({"dataset": dataset, "n": n, "rule": rule, "seed": seed,
                                    "test_acc": summary["final"]["test_acc"], "angles": angles, "run": str(out)})
                    ctx.tick(1)
    acc_rows, align_rows = [], []
    for dataset, _, ns in sweeps:
        for n in ns:
            for rule in RULES:
                group = [r for r in records if r["dataset"] == dataset and r["n"] == n and r["rule"] == rule]
                m, s = mean_std([r["test_acc"] for r in group])
                acc_rows.append({"dataset": dataset, "n": n, "rule": rule, "test acc mean": m, "test acc std": s,
                                 "seeds": len(group)})
                row = {"dataset": dataset, "n": n, "rule": rule}
                for layer in group[0]["angles"]:
                    row[f"angle {layer}"] = mean_std([r["angles"][layer] for r in group])[0]
                row["angle mean"] = float(np.mean([np.mean(list(r["angles"].values())) for r in group]))
                align_rows.append(row)
    corr_rows, pooled = [], {}
    for dataset, _, ns in sweeps:
        fam = [r for r in records if r["dataset"] == dataset and r["rule"] != "bp"]
        angle = [float(np.mean(list(r["angles"].values()))) for r in fam]
        rho, p = spearman(angle, [r["test_acc"] for r in fam])
        pooled[dataset] = (rho, p)
        corr_rows.append({"dataset": dataset, "scope": "pooled over n", "spearman rho": rho, "p": p, "runs": len(fam)})
        within = []
        for n in ns:
            sub = [r for r in fam if r["n"] == n]
            r_n, p_n = spearman([float(np.mean(list(r["angles"].values()))) for r in sub], [r["test_acc"] for r in sub])
            within.append(r_n)
            corr_rows.append({"dataset": dataset, "scope": f"n = {n}", "spearman rho": r_n, "p": p_n, "runs": len(sub)})
        corr_rows.append({"dataset": dataset, "scope": "mean of within-n", "spearman rho": float(np.nanmean(within)),
                          "p": math.nan, "runs": len(fam)})
    plt = pyplot()
    fig, axes = plt.subplots(2, 2, figsize=(12, 9))
    for col, (dataset, _, _ns) in enumerate(sweeps):
        ax = axes[0, col]
        for rule in RULES:
            rows = [r for r in acc_rows if r["dataset"] == dataset and r["rule"] == rule]
            ax.errorbar([r["n"] for r in rows], [r["test acc mean"] for r in rows],
                        yerr=[r["test acc std"] for r in rows], marker="o", capsize=3, label=rule)
        ax.set(xscale="log", xlabel="number of classes n", ylabel="test accuracy", title=f"{dataset}: accuracy vs n")
        ax.legend(fontsize=7)
        ax = axes[1, col]
        for rule in RULES[1:]:
            fam = [r for r in records if r["dataset"] == dataset and r["rule"] == rule]
            ax.scatter([float(np.mean(list(r["angles"].values()))) for r in fam], [r["test_acc"] for r in fam],
                       label=rule, s=14)
        rho, p = pooled[dataset]
        ax.set(xlabel="mean hidden gradient angle (degrees)", ylabel="test accuracy",
               title=f"{dataset}: Spearman ρ = {rho:.2f} (p = {p:.2g})")
        ax.legend(fontsize=7)
    fig_path = save_figure(fig, ctx.figures / "multiclass.png")
    result_verdicts = verdicts(pooled)
    align_cols = ["dataset", "n", "rule", *[k for k in align_rows[0] if k.startswith("angle ")]]
    return ExperimentResult(
        NAME, TITLE, HYPOTHESIS,
        setup={"sweeps": {d: {"n": ns, **{k: v for k, v in c.items() if k != "data"}} for d, c, ns in sweeps},
               "rules": RULES, "seeds": seeds,
               "training": "falign train: MLP, SGD lr 0.02 momentum 0.9, batch 64; run directories under "
                           "multiclass/runs (each holds its config.json)"},
        tables=[Table("multiclass_accuracy", ["dataset", "n", "rule", "test acc mean", "test acc std", "seeds"],
                      acc_rows, "Test accuracy (mean ± std over seeds)."),
                Table("multiclass_alignment", align_cols, align_rows,
                      "Mean angle (degrees) between each hidden layer's rule gradient and the true gradient."),
                Table("multiclass_correlation", ["dataset", "scope", "spearman rho", "p", "runs"], corr_rows,
                      "Spearman correlation of mean gradient angle and test accuracy over FA-family runs.")],
        figures=[fig_path], verdicts=result_verdicts,
        headline={"metric": "Spearman ρ(angle, accuracy)",
                  "value": ", ".join(f"{d} {rho:.2f}" for d, (rho, _) in pooled.items()),
                  "verdict": "supported" if all(v.supported for v in result_verdicts) else "not supported"},
        seconds=time.perf_counter() - start,
    )
