"""Figures of a run's diagnostics (``falign plot RUN_DIR``)."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from falign.errors import FalignError
from falign.plotting import pyplot, save_figure


def _series(rows: Sequence[dict[str, Any]], path: Sequence[str]) -> dict[str, tuple[list[int], list[float]]]:
    """``{key: (steps, values)}`` of ``row[path...][key]`` over diagnostics rows (``None`` skipped)."""
    out: dict[str, tuple[list[int], list[float]]] = {}
    for row in rows:
        node: Any = row
        for part in path:
            node = node.get(part, {}) if isinstance(node, dict) else {}
        for key, value in node.items():
            if isinstance(value, dict):
                value = value.get("angle", value.get("max_drift"))
            if value is None:
                continue
            steps, values = out.setdefault(key, ([], []))
            steps.append(row["step"])
            values.append(value)
    return out


def plot_alignment(rows: Sequence[dict[str, Any]], path: Path) -> Path:
    """Weight, gradient and error-signal alignment angles over steps, one line per layer (never only an average),
    and the effective rank of each layer's error signal (rule solid, backprop dashed). A gradient angle whose
    backprop reference was rounding noise is undefined and left out (a gap), never drawn."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 4, figsize=(20, 4))
    for ax, (kind, title) in zip(axes, (("weight_alignment", "weight vs feedback  ∠(W_l, B_l)"),
                                        ("gradient_alignment", "rule update vs true gradient  ∠(G_l, ∇L)"),
                                        ("signal_alignment", "error signal vs backprop  ∠(δ_rule, δ_bp)"))):
        for layer, (steps, values) in sorted(_series(rows, [kind]).items()):
            ax.plot(steps, values, label=layer)
        ax.axhline(90, color="grey", lw=0.8, ls="--")
        ax.set(title=title, xlabel="step", ylim=(0, 180), ylabel="angle (degrees)")
        ax.legend(fontsize=7)
    undefined = sorted({layer for r in rows if isinstance(r.get("reference"), dict)
                        for layer, v in r["reference"].items() if v.get("used") == "undefined"})
    if undefined:
        axes[1].set_title(axes[1].get_title() + f"\nreference undefined (rounding noise): {', '.join(undefined)}",
                          fontsize=8)
    ax = axes[3]
    bp = _series(rows, ["signal_rank_bp"])
    for layer, (steps, values) in sorted(_series(rows, ["signal_rank"]).items()):
        line, = ax.plot(steps, values, label=layer)
        if layer in bp:
            ax.plot(*bp[layer], ls="--", color=line.get_color(), lw=0.8)
    ax.set(title="effective rank of δ_l (rule solid, backprop dashed)", xlabel="step", ylabel="exp(entropy of σ)")
    ax.legend(fontsize=7)
    return save_figure(fig, path)


def plot_scale(records: Sequence[dict[str, Any]], runaway: dict[str, Any] | None, path: Path) -> Path:
    """Loss and logit scale, per-layer weight norms and per-layer activation RMS over steps (log scale), with a
    scale runaway's start and flag marked (:func:`falign.diagnostics.scale.find_runaway`)."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    steps = [r["step"] for r in records]
    ax = axes[0]
    ax.plot(steps, [r.get("logit_scale") for r in records], label="logit scale (median |z|)")
    ax.plot(steps, [r.get("loss") for r in records], label="train loss (batch)")
    ax.set(title="loss and logit scale", xlabel="step", yscale="log")
    for ax_, key, title in ((axes[1], "weights", "weight norm ‖W_l‖"), (axes[2], "activations", "activation RMS")):
        for layer in dict.fromkeys(k for r in records for k in (r.get(key) or {})):
            ax_.plot(steps, [(r.get(key) or {}).get(layer) for r in records], label=layer)
        ax_.set(title=title, xlabel="step", yscale="log")
    for ax_ in axes:
        if runaway:
            ax_.axvline(runaway["began_step"], color="r", ls="--", lw=0.8)
            ax_.axvline(runaway["flagged_step"], color="r", lw=0.8)
        ax_.legend(fontsize=7)
    if runaway:
        fig.suptitle(f"SCALE RUNAWAY from step {runaway['began_step']} (flagged at {runaway['flagged_step']}: "
                     f"{runaway['reason']})", color="r")
    return save_figure(fig, path)


def plot_conservation(rows: Sequence[dict[str, Any]], path: Path) -> Path:
    """Maximum per-neuron drift of Q since the first record, per layer pair (and backprop's law)."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    for pair, (steps, values) in sorted(_series(rows, ["conservation"]).items()):
        ax.plot(steps, values, label=f"{pair}  Q (feedback law)")
    balanced: dict[str, tuple[list[int], list[float]]] = {}
    for row in rows:
        for pair, v in row.get("conservation", {}).items():
            if v.get("balanced_max_drift") is not None:
                s, vals = balanced.setdefault(pair, ([], []))
                s.append(row["step"])
                vals.append(v["balanced_max_drift"])
    for pair, (steps, values) in sorted(balanced.items()):
        ax.plot(steps, values, ls=":", label=f"{pair}  balancedness (backprop law)")
    ax.set(title="conservation law: max_k |Q_k(t) − Q_k(0)|", xlabel="step", ylabel="drift")
    ax.legend(fontsize=7)
    return save_figure(fig, path)


def plot_decomposition(rows: Sequence[dict[str, Any]], path: Path) -> Path:
    """Per-layer terms ⟨∇_{W_l}L, G_l⟩ of −dL/dt over steps, and the dominance ratio ρ."""
    plt = pyplot()
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(12, 4))
    for layer, (steps, values) in sorted(_series(rows, ["decomposition", "terms"]).items()):
        ax.plot(steps, values, label=layer)
    ax.axhline(0, color="grey", lw=0.8)
    ax.set(title="loss-rate decomposition  ⟨∇_{W_l}L, G_l⟩", xlabel="step", ylabel="term")
    ax.legend(fontsize=7)
    steps = [r["step"] for r in rows if r.get("decomposition", {}).get("rho") is not None]
    rho = [r["decomposition"]["rho"] for r in rows if r.get("decomposition", {}).get("rho") is not None]
    ax2.plot(steps, rho, color="k")
    if rows:
        c = rows[0]["decomposition"]["margin"]
        ax2.axhline(-(1 - c), color="r", ls="--", label=f"dominance threshold −(1−c), c={c}")
    ax2.set(title="ρ = Σ_{l<L} terms / output term", xlabel="step", ylabel="ρ")
    ax2.legend(fontsize=7)
    return save_figure(fig, path)


def plot_run(run_dir: str | Path, out: str | Path | None = None,
             warn: Callable[[str], None] | None = None) -> list[Path]:
    """Write ``scale.png`` (from ``scale.jsonl``, a scale runaway marked and reported through ``warn``) and, for a
    run with diagnostics (``--diagnostics-every``), ``alignment.png``, ``conservation.png`` and
    ``decomposition.png``, into ``RUN_DIR/plots`` by default. A run with neither is an error.

    Lines of ``metrics.jsonl`` that are not JSON (a torn last line after a kill) are skipped and reported
    through ``warn``. ``out`` must be a new folder, an empty one or one that holds falign plots.
    """
    from falign.outdir import OutputDir
    from falign.train.rundir import read_metrics

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FalignError(f"{run_dir} is not a folder: give a run directory written by falign train")
    metrics = run_dir / "metrics.jsonl"
    if not metrics.is_file():
        raise FalignError(f"{metrics} not found: {run_dir} is not a falign run directory")
    skipped: list[str] = []
    rows = [r for r in read_metrics(metrics, skipped=skipped) if r.get("event") == "diagnostics"]
    for line in skipped:
        (warn or (lambda text: None))(f"skipped {line}")
    say = warn or (lambda text: None)
    scale_file = run_dir / "scale.jsonl"
    scale = [r for r in (read_metrics(scale_file, skipped=skipped) if scale_file.is_file() else [])
             if isinstance(r.get("step"), int)]
    if not rows and not scale:
        raise FalignError(f"{metrics} has no diagnostics rows: train with --diagnostics-every K")
    runaway = None
    if scale:
        from falign.diagnostics.scale import find_runaway

        try:
            classes = int(json.loads((run_dir / "summary.json").read_text()).get("num_classes") or 10)
        except (OSError, ValueError):
            classes = 10
        runaway = find_runaway(scale, classes)
        if runaway:
            say(f"SCALE RUNAWAY: began at step {runaway['began_step']}, flagged at {runaway['flagged_step']} "
                f"({runaway['reason']}); angles and accuracy of this run do not mean what they usually do")
    if not rows:
        say("no diagnostics rows: only scale.png (train with --diagnostics-every K for alignment, conservation "
            "and the decomposition)")
    for row in rows:  # rows falign did not write (edited, another tool's) fail here, not inside matplotlib
        fields = ("weight_alignment", "gradient_alignment", "signal_alignment", "conservation", "decomposition")
        if (not isinstance(row.get("step"), int) or not all(isinstance(row.get(f, {}), dict) for f in fields)
                or not isinstance(row.get("decomposition", {}).get("margin"), (int, float))):
            raise FalignError(f"{metrics}: a diagnostics row at step {row.get('step')!r} lacks the fields falign "
                              f"writes (an integer step; {', '.join(fields)} as objects; decomposition.margin)")
    target = OutputDir(Path(out) if out is not None else run_dir / "plots", "plots", "--out")
    out = target.claim()
    paths = [plot_scale(scale, runaway, out / "scale.png")] if scale else []
    if rows:
        paths += [plot_alignment(rows, out / "alignment.png"), plot_conservation(rows, out / "conservation.png"),
                  plot_decomposition(rows, out / "decomposition.png")]
    return paths
