"""Figures of a run's diagnostics (``falign plot RUN_DIR``)."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from falign.app.plotting import pyplot, save_figure
from falign.errors import FalignError


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


def _legend(ax) -> None:
    """A legend beside the data, only where something is labelled."""
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7)


def _named(fig, name: str, extra: str = "", color: str = "k") -> None:
    """Put the run's name (and a warning line) above a figure."""
    text = "\n".join(t for t in (name, extra) if t)
    if text:
        fig.suptitle(text, fontsize=9, color=color)


def plot_alignment(rows: Sequence[dict[str, Any]], path: Path, name: str = "") -> Path:
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
        _legend(ax)
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
    _legend(ax)
    _named(fig, name)
    return save_figure(fig, path)


def plot_scale(records: Sequence[dict[str, Any]], runaway: dict[str, Any] | None, path: Path, name: str = "") -> Path:
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
        _legend(ax_)
    if runaway:
        _named(fig, name, f"SCALE RUNAWAY from step {runaway['began_step']} (flagged at {runaway['flagged_step']}: "
                          f"{runaway['reason']})", color="r")
    else:
        _named(fig, name)
    return save_figure(fig, path)


def plot_conservation(rows: Sequence[dict[str, Any]], path: Path, name: str = "") -> Path:
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
    _legend(ax)
    _named(fig, name)
    return save_figure(fig, path)


def plot_decomposition(rows: Sequence[dict[str, Any]], path: Path, name: str = "") -> Path:
    """Per-layer terms ⟨∇_{W_l}L, G_l⟩ of −dL/dt over steps, and the dominance ratio ρ."""
    plt = pyplot()
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(12, 4))
    for layer, (steps, values) in sorted(_series(rows, ["decomposition", "terms"]).items()):
        ax.plot(steps, values, label=layer)
    ax.axhline(0, color="grey", lw=0.8)
    ax.set(title="loss-rate decomposition  ⟨∇_{W_l}L, G_l⟩", xlabel="step", ylabel="term")
    _legend(ax)
    steps = [r["step"] for r in rows if r.get("decomposition", {}).get("rho") is not None]
    rho = [r["decomposition"]["rho"] for r in rows if r.get("decomposition", {}).get("rho") is not None]
    ax2.plot(steps, rho, color="k")
    if rows:
        c = rows[0]["decomposition"]["margin"]
        ax2.axhline(-(1 - c), color="r", ls="--", label=f"dominance threshold −(1−c), c={c}")
    ax2.set(title="ρ = (sum of the hidden layers' terms) / output term", xlabel="step", ylabel="ρ")
    _legend(ax2)
    _named(fig, name)
    return save_figure(fig, path)


def plot_run(run_dir: str | Path, out: str | Path | None = None,
             warn: Callable[[str], None] | None = None) -> list[Path]:
    """Write ``scale.png`` (from ``scale.jsonl``, a scale runaway marked and reported through ``warn``) and, for a
    run with diagnostics (``--diagnostics-every``), ``alignment.png``, ``conservation.png`` and
    ``decomposition.png``, into ``RUN_DIR/plots`` by default. A run with neither is an error.

    Lines of ``metrics.jsonl`` that are not JSON (a torn last line after a kill) are skipped and reported
    through ``warn``. ``out`` must be a new folder, an empty one or one that holds falign plots.
    """
    from falign.app.outdir import OutputDir
    from falign.app.train.rundir import read_metrics

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FalignError(f"{run_dir} is not a folder: give a run directory written by falign train")
    say = warn or (lambda text: None)
    metrics = run_dir / "metrics.jsonl"
    rows = [r for r in _metrics_rows(run_dir, say) if r.get("event") == "diagnostics"]
    skipped: list[str] = []
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
    name = run_label(run_dir)
    paths = [plot_scale(scale, runaway, out / "scale.png", name)] if scale else []
    if rows:
        paths += [plot_alignment(rows, out / "alignment.png", name),
                  plot_conservation(rows, out / "conservation.png", name),
                  plot_decomposition(rows, out / "decomposition.png", name)]
    return paths


def run_label(run_dir: str | Path) -> str:
    """``"fa · mlp · digits — runs/fa"``: the run's rule, model and data (from its ``config.json``) and folder."""
    run_dir = Path(run_dir)
    try:
        config = json.loads((run_dir / "config.json").read_text())
    except (OSError, ValueError):
        return str(run_dir)
    parts = [str(config.get(k)) for k in ("rule", "model", "data") if config.get(k) is not None]
    return f"{' · '.join(parts)} — {run_dir}" if parts else str(run_dir)


LINE_STYLES = ("-", "--", ":", "-.")


def _metrics_rows(run_dir: Path, warn: Callable[[str], None]) -> list[dict[str, Any]]:
    """Every row of a run's ``metrics.jsonl``; lines that are not JSON (a torn last line after a kill) are skipped
    and reported through ``warn``."""
    from falign.app.train.rundir import read_metrics

    metrics = run_dir / "metrics.jsonl"
    if not metrics.is_file():
        raise FalignError(f"{metrics} not found: {run_dir} is not a falign run directory")
    skipped: list[str] = []
    rows = read_metrics(metrics, skipped=skipped)
    for line in skipped:
        warn(f"skipped {line}")
    return rows


def plot_comparison(run_dirs: Sequence[str | Path], path: Path, warn: Callable[[str], None] | None = None) -> Path:
    """One figure of several runs: training loss and test accuracy per epoch, one colour per run (labelled with
    its rule, model and data), and — where every run recorded diagnostics — the gradient alignment of each
    layer (colour: run, line style: layer)."""
    say = warn or (lambda text: None)
    runs = [Path(r) for r in run_dirs]
    every = [_metrics_rows(run, lambda text, run=run: say(f"{run}: {text}")) for run in runs]
    epochs = [[r for r in rows if r.get("event") == "epoch"] for rows in every]
    for run, rows in zip(runs, epochs):
        if not rows:
            raise FalignError(f"{run / 'metrics.jsonl'} has no finished epoch yet: nothing to compare")
    diagnostics = [[r for r in rows if r.get("event") == "diagnostics"] for rows in every]
    with_angles = all(diagnostics)
    plt = pyplot()
    panels = 3 if with_angles else 2
    fig, axes = plt.subplots(1, panels, figsize=(5.5 * panels, 4.2))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (run, rows) in enumerate(zip(runs, epochs)):
        colour, style = colours[i % len(colours)], LINE_STYLES[(i // len(colours)) % len(LINE_STYLES)]
        label = run_label(run)
        x = [r["epoch"] for r in rows]
        axes[0].plot(x, [r.get("train_loss") for r in rows], color=colour, ls=style, label=label)
        axes[1].plot(x, [100 * r["test_acc"] if r.get("test_acc") is not None else None for r in rows],
                     color=colour, ls=style, label=label)
        if with_angles:
            for j, (layer, (steps, values)) in enumerate(sorted(_series(diagnostics[i],
                                                                         ["gradient_alignment"]).items())):
                axes[2].plot(steps, values, color=colour, ls=LINE_STYLES[j % len(LINE_STYLES)], lw=1.2,
                             label=f"{label.split(' — ')[0]}: {layer}")
    axes[0].set(title="training loss", xlabel="epoch", ylabel="loss (mean over the epoch)", yscale="log")
    axes[1].set(title="test accuracy", xlabel="epoch", ylabel="accuracy (%)")
    if with_angles:
        axes[2].axhline(90, color="grey", lw=0.8, ls="--")
        axes[2].set(title="rule update vs true gradient ∠(G_l, ∇L)", xlabel="step", ylabel="angle (degrees)",
                    ylim=(0, 180))
        axes[2].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0))
    else:
        say("not every run has diagnostics (train with --diagnostics-every K): compare.png shows loss and accuracy")
    fig.legend(*axes[0].get_legend_handles_labels(), loc="lower center", ncol=min(len(runs), 3), fontsize=8,
               bbox_to_anchor=(0.5, 0.0))
    fig.tight_layout(rect=(0, 0.06 + 0.04 * ((len(runs) - 1) // 3), 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_runs(run_dirs: Sequence[str | Path], out: str | Path | None = None,
              warn: Callable[[str], None] | None = None) -> list[Path]:
    """``falign plot RUN [RUN ...]``: one run's figures (:func:`plot_run`), or for several runs
    ``compare.png`` (:func:`plot_comparison`) in ``out`` (default: ``compare`` beside the first run) and each
    run's own figures in a sub-folder named after it."""
    from falign.app.outdir import OutputDir

    if len(run_dirs) == 1:
        return plot_run(run_dirs[0], out, warn)
    runs = [Path(r) for r in run_dirs]
    for run in runs:
        if not run.is_dir():
            raise FalignError(f"{run} is not a folder: give run directories written by falign train")
    if len({r.resolve() for r in runs}) < len(runs):
        raise FalignError("the same run is given twice")
    target = OutputDir(Path(out) if out is not None else runs[0].parent / "compare", "compare", "--out")
    folder = target.claim()
    paths = [plot_comparison(runs, folder / "compare.png", warn)]
    names: set[str] = set()
    for i, run in enumerate(runs):
        sub = run.name if run.name not in names else f"{run.name}-{i}"
        names.add(sub)
        try:
            paths += plot_run(run, folder / sub, warn)
        except FalignError as error:  # a run without diagnostics or scale records: compare.png still has it
            (warn or (lambda text: None))(f"{run}: {error}")
    return paths
