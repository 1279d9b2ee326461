"""Figures of a run's diagnostics (``falign plot RUN_DIR``)."""

from __future__ import annotations

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
    """Weight, gradient and error-signal alignment angles over steps, one line per layer."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(15, 4), sharey=True)
    for ax, (kind, title) in zip(axes, (("weight_alignment", "weight vs feedback  ∠(W_l, B_l)"),
                                        ("gradient_alignment", "rule update vs true gradient  ∠(G_l, ∇L)"),
                                        ("signal_alignment", "error signal vs backprop  ∠(δ_rule, δ_bp)"))):
        for layer, (steps, values) in sorted(_series(rows, [kind]).items()):
            ax.plot(steps, values, label=layer)
        ax.axhline(90, color="grey", lw=0.8, ls="--")
        ax.set(title=title, xlabel="step", ylim=(0, 180))
        ax.legend(fontsize=7)
    axes[0].set_ylabel("angle (degrees)")
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
    """Write ``alignment.png``, ``conservation.png`` and ``decomposition.png`` for a run directory
    (into ``RUN_DIR/plots`` by default). The run needs diagnostics (``--diagnostics-every``).

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
    if not rows:
        raise FalignError(f"{metrics} has no diagnostics rows: train with --diagnostics-every K")
    for row in rows:  # rows falign did not write (edited, another tool's) fail here, not inside matplotlib
        fields = ("weight_alignment", "gradient_alignment", "signal_alignment", "conservation", "decomposition")
        if (not isinstance(row.get("step"), int) or not all(isinstance(row.get(f, {}), dict) for f in fields)
                or not isinstance(row.get("decomposition", {}).get("margin"), (int, float))):
            raise FalignError(f"{metrics}: a diagnostics row at step {row.get('step')!r} lacks the fields falign "
                              f"writes (an integer step; {', '.join(fields)} as objects; decomposition.margin)")
    target = OutputDir(Path(out) if out is not None else run_dir / "plots", "plots", "--out")
    out = target.claim()
    return [plot_alignment(rows, out / "alignment.png"), plot_conservation(rows, out / "conservation.png"),
            plot_decomposition(rows, out / "decomposition.png")]
