"""Accuracy benchmark against BioTorch's published LeNet / Fashion-MNIST error table.

BioTorch's setup (its ``Benchmarks.md``): LeNet on 32×32 inputs (falign's ``lenet`` pads 28×28 images
by 2, the same shapes; ``--resize 32`` resizes as BioTorch does), SGD momentum 0.9, weight decay 1e-3, batch 64
(BioTorch drops the last partial batch: ``--drop-last``), the learning rate divided by 10 at 50% and 75% of
training, 100 epochs; the error reported is that of the best epoch on the 10k test images. The CPU-feasible
default here keeps everything but the number of epochs; ``--full`` uses 100.

BioTorch publishes no Fashion-MNIST learning rate (its CIFAR-10 LeNet configurations tune it per rule, from 0.1
for bp to 0.0001 for dfa), so by default (``--lr auto``) the lr is chosen per rule without the test set: 5,000
training images are held out as a validation split (``--val-size``), every lr of ``--lr-grid`` (half-decades 0.1
… 0.0001) is trained for ``--tune-epochs`` (the same schedule, compressed; 20 epochs with ``--full``), and the
lr with the lowest validation error is kept (a run flagged as a scale runaway counts as chance); the full schedule
then runs at it. Each run
reports BioTorch's figure of merit (best epoch on the test images: test-selected, optimistic) and the test error
at the epoch of the best validation error. ``--lr 0.01`` (one lr for every rule) or ``--lr fa=0.001,dfa=0.0001``
skip the tuning; ``--lr-from DIR`` reuses an earlier bench's choice (e.g. for more seeds, ``--first-seed``).

Each run is an ordinary ``falign train`` run (its directory holds config.json, metrics.jsonl, scale.jsonl).
``falign bench accuracy`` writes ``tuning.csv``, ``lr.json``, ``results.csv`` (one row per run) and
``summary.csv``; with ``--docs FILE`` it also regenerates the accuracy section of that Markdown file (in the
repository: ``--docs docs/benchmarks.md``).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import platform
import re
import time
from pathlib import Path

import numpy as np
import torch

from falign.app.outdir import OutputDir, check_file
from falign.app.train import DivergenceError, TrainConfig, Trainer, read_metrics
from falign.app.train.progress import progress_bar
from falign.errors import FalignError

RULES = ["bp", "fa", "dfa", "usf", "brsf", "frsf", "kp", "wm"]
BASELINE = "frozen-hidden"  # depth utility: LeNet with everything but the output layer frozen at random init
# Top-1 error %, LeNet on Fashion-MNIST, SGD, 100 epochs (BioTorch Benchmarks.md; ../shared/DESIGN.md §6).
PUBLISHED = {"bp": 9.20, "fa": 13.06, "dfa": 12.81, "usf": 9.69, "brsf": 10.02, "frsf": 9.61}
BEGIN, END = "<!-- accuracy:begin -->", "<!-- accuracy:end -->"
FULL_BEGIN, FULL_END = "<!-- accuracy-full:begin -->", "<!-- accuracy-full:end -->"  # the 100-epoch table


def markers(epochs: int) -> tuple[str, str]:
    """The docs section of a schedule: the short CPU one and the published 100-epoch one are kept apart."""
    return (FULL_BEGIN, FULL_END) if epochs >= 100 else (BEGIN, END)


GRID = (0.1, 0.0316, 0.01, 0.00316, 0.001, 0.000316, 0.0001)  # half-decades, 1e-1 … 1e-4
VAL_SIZE = 5000
INITS = ("falign", "biotorch")


def bench_config(rule: str, seed: int, *, epochs: int, lr: float, data_dir: str | None, device: str,
                 val_size: int = 0, resize: int | None = None, drop_last: bool = False,
                 init: str = "falign") -> TrainConfig:
    """The config of one benchmark run (BioTorch's LeNet setup); a bad value is a ConfigError. ``init``:
    ``falign`` (PyTorch's layer defaults, B kaiming_uniform) or ``biotorch`` (W and B xavier_uniform, biases 0)."""
    baseline = rule == BASELINE
    if init not in INITS:
        raise FalignError(f"unknown init {init!r}; choose one of {', '.join(INITS)}")
    bt = init == "biotorch"
    return TrainConfig(rule="bp" if baseline else rule, freeze_hidden=baseline, model="lenet", data="fashion-mnist",
                       data_dir=data_dir, epochs=epochs,
                       batch_size=64, optimizer="sgd", lr=lr, momentum=0.9, weight_decay=1e-3,
                       lr_schedule="step", lr_milestones=(0.5, 0.75), seed=seed, device=device,
                       val_size=val_size, resize=resize, drop_last=drop_last,
                       weight_init="xavier" if bt else "torch", feedback_init="xavier_uniform" if bt else
                       "kaiming_uniform")


def _init(cfg: TrainConfig) -> str:
    return "biotorch" if cfg.weight_init == "xavier" and cfg.feedback_init == "xavier_uniform" else "falign"


def _train(cfg: TrainConfig, run_dir: Path) -> tuple[str, list[dict], dict]:
    """Train one config; its status, epoch rows and summary (a diverged run has status ``diverged``)."""
    try:
        Trainer(cfg, run_dir, progress=False, overwrite=True).run()
        status = "completed"
    except DivergenceError:
        status = "diverged"
    metrics = run_dir / "metrics.jsonl"  # a run that diverged in its first epoch has none
    rows = [r for r in read_metrics(metrics) if r["event"] == "epoch"] if metrics.exists() else []
    try:
        summary = json.loads((run_dir / "summary.json").read_text())
    except (OSError, ValueError):
        summary = {}
    return status, rows, summary


def _err(acc: float | None) -> float:
    return math.nan if acc is None else 100 * (1 - acc)


def _flags(summary: dict) -> str:
    """The run's scale-stability flag (``summary.json``'s ``scale``), as one table cell."""
    scale = summary.get("scale") or {}
    runaway = scale.get("runaway")
    return f"runaway from step {runaway['began_step']}" if runaway else ""


def _name(cfg: TrainConfig) -> str:
    return BASELINE if cfg.freeze_hidden else cfg.rule


def _result_row(cfg: TrainConfig, status: str, rows: list[dict], summary: dict, run_dir: Path,
                lr_source: str, seconds: float) -> dict:
    done = status == "completed" and bool(rows)
    picked = summary.get("val_selected") or {}
    return {"rule": _name(cfg), "seed": cfg.seed, "epochs": cfg.epochs, "status": status,
            "final error %": _err(rows[-1]["test_acc"]) if done else math.nan,
            "best-epoch error %": _err(max(r["test_acc"] for r in rows)) if done else math.nan,
            "val-selected error %": _err(picked.get("test_acc")) if done else math.nan,
            "val-selected epoch": picked.get("epoch", ""), "lr": cfg.lr, "lr chosen by": lr_source,
            "val size": cfg.val_size, "input": _input(cfg.resize), "drop last": cfg.drop_last,
            "init": _init(cfg), "flags": _flags(summary), "seconds": seconds, "run": str(run_dir)}


def _input(resize: int | None) -> str:
    return "28x28 padded to 32" if resize is None else f"resized to {resize}x{resize}"


def tune(out: Path, *, rules: list[str], grid: tuple[float, ...], epochs: int, seeds: int, val_size: int,
         data_dir: str | None, device: str, resize: int | None = None, drop_last: bool = False,
         init: str = "falign", progress: bool = True) -> list[dict]:
    """The tuning stage: every (rule, lr in ``grid``, seed) trained for ``epochs`` (the same step schedule,
    compressed) on the training images less ``val_size`` held out; one row per run with its best validation
    error. The test images are evaluated by the trainer but never read here."""
    rows = []
    bar = progress_bar(len(rules) * len(grid) * seeds * epochs, "bench accuracy: tuning lr", progress)
    try:
        for rule in rules:
            for lr in grid:
                for seed in range(seeds):
                    cfg = bench_config(rule, seed, epochs=epochs, lr=lr, data_dir=data_dir, device=device,
                                       val_size=val_size, resize=resize, drop_last=drop_last, init=init)
                    run_dir = out / "tune" / f"{rule}-lr{lr:g}-s{seed}"
                    status, epoch_rows, summary = _train(cfg, run_dir)
                    bar.update(epochs)
                    val = [_err(r["val_acc"]) for r in epoch_rows] if status == "completed" else []
                    rows.append({"rule": rule, "init": init, "lr": lr, "seed": seed, "epochs": epochs,
                                 "status": status,
                                 "best val error %": min(val) if val else math.nan,
                                 "final val error %": val[-1] if val else math.nan,
                                 "flags": _flags(summary), "run": str(run_dir)})
    finally:
        bar.close()
    return rows


def select(tuning: list[dict]) -> dict[str, dict]:
    """Per rule, the lr of the lowest mean best-validation error over its tuning seeds; a diverged run, and one
    flagged as a scale runaway (its accuracy rides on logits at astronomical scale), count as chance (90%).
    Returns ``{rule: {"lr", "val error %", "chosen by"}}``."""
    chosen: dict[str, dict] = {}
    for rule in dict.fromkeys(r["rule"] for r in tuning):
        scores = {}
        for lr in dict.fromkeys(r["lr"] for r in tuning if r["rule"] == rule):
            runs = [r for r in tuning if r["rule"] == rule and r["lr"] == lr]
            scores[lr] = float(np.mean([90.0 if math.isnan(r["best val error %"]) or r.get("flags")
                                        else r["best val error %"] for r in runs]))
        lr = min(scores, key=lambda k: (scores[k], -k))  # ties: the larger lr
        epochs = tuning[0]["epochs"]
        chosen[rule] = {"lr": lr, "val error %": scores[lr],
                        "chosen by": f"validation ({len(scores)}-point grid, {epochs}-epoch schedule)"}
    return chosen


def run_accuracy(out: Path, *, rules: list[str], seeds: int, epochs: int, lrs: dict[str, dict],
                 data_dir: str | None, device: str, val_size: int = 0, resize: int | None = None,
                 drop_last: bool = False, first_seed: int = 0, init: str = "falign",
                 progress: bool = True) -> list[dict]:
    """Train every (rule, seed) at the rule's lr (``lrs[rule]["lr"]``) and return one result row per run."""
    rows = []
    bar = progress_bar(len(rules) * seeds * epochs, "bench accuracy", progress)
    try:
        for rule in rules:
            for seed in range(first_seed, first_seed + seeds):
                cfg = bench_config(rule, seed, epochs=epochs, lr=lrs[rule]["lr"], data_dir=data_dir, device=device,
                                   val_size=val_size, resize=resize, drop_last=drop_last, init=init)
                run_dir = out / "runs" / f"{rule}-s{seed}"
                start = time.perf_counter()
                status, epoch_rows, summary = _train(cfg, run_dir)
                bar.update(epochs)
                rows.append(_result_row(cfg, status, epoch_rows, summary, run_dir, lrs[rule]["chosen by"],
                                        time.perf_counter() - start))
    finally:
        bar.close()
    return rows


def _std(a: np.ndarray) -> float:
    return float(a.std(ddof=1)) if len(a) > 1 else math.nan  # one seed: no spread to report


def _mean_std(mean: float, std: float) -> str:
    if math.isnan(mean):
        return "—"
    return f"{mean:.2f}" if math.isnan(std) else f"{mean:.2f} ± {std:.2f}"


def _rows_of_folder(folder: Path) -> list[dict]:
    """Result rows of the finished runs in a ``falign bench accuracy --out`` folder (``runs/<rule>-s<seed>``), read
    from each run's config, metrics and summary (and the folder's ``lr.json``: how each rule's lr was chosen): a
    bench interrupted before writing results.csv keeps its finished runs; unfinished ones are skipped."""
    try:
        sources = json.loads((folder / "lr.json").read_text())
    except (OSError, ValueError):
        sources = {}
    rows = []
    for run in sorted((folder / "runs").glob("*")):
        try:
            summary = json.loads((run / "summary.json").read_text())
            config = json.loads((run / "config.json").read_text())
        except (OSError, ValueError):
            continue
        epochs = [r for r in read_metrics(run / "metrics.jsonl") if r["event"] == "epoch"]
        cfg = TrainConfig.from_dict({k: v for k, v in config.items()})
        source = sources.get(_name(cfg), {}).get("chosen by", "given")
        rows.append(_result_row(cfg, summary.get("status", "unknown"), epochs, summary, run, source,
                                float(summary.get("wall_time_s", 0.0))))
    return rows


_NUMBERS = ("final error %", "best-epoch error %", "val-selected error %", "lr", "seconds")


def read_results(paths: list[str]) -> list[dict]:
    """The rows of ``results.csv`` files, or of the finished runs in ``--out`` folders, written by earlier runs of
    ``falign bench accuracy``, in the order given (a rule in several places: every row counts). Files written
    before the lr was recorded read as lr 0.01, "given" (the only lr the bench then used)."""
    rows: list[dict] = []
    for path in paths:
        if Path(path).is_dir():
            found = _rows_of_folder(Path(path))
            if not found:
                raise FalignError(f"--summarize {path}: no finished run under {Path(path) / 'runs'}")
            rows += found
            continue
        if not Path(path).is_file():
            raise FalignError(f"--summarize {path}: no such file")
        with open(path, newline="") as f:
            for row in csv.DictReader(f):
                try:
                    old = {"lr": 0.01, "lr chosen by": "given", "val-selected error %": math.nan, "val size": 0,
                           "input": _input(None), "drop last": False, "flags": "",
                           "init": "falign"}
                    row = {**old, **{k: v for k, v in row.items() if v is not None}}
                    rows.append({**row, "seed": int(row["seed"]), "epochs": int(row["epochs"]),
                                 **{k: float(row[k]) for k in _NUMBERS}})
                except (KeyError, ValueError) as err:
                    raise FalignError(
                        f"--summarize {path}: not a results.csv of falign bench accuracy ({err})") from None
    if not rows:
        raise FalignError(f"--summarize {' '.join(paths)}: no result rows")
    if len({r["epochs"] for r in rows}) > 1:
        raise FalignError("--summarize: the files hold runs of different lengths "
                          f"({sorted({r['epochs'] for r in rows})} epochs); combine runs of one schedule")
    return rows


def summarize(rows: list[dict]) -> list[dict]:
    """One row per (rule, lr, how the lr was chosen, input, init): mean and std over its seeds."""
    out = []
    key = lambda r: (r["rule"], float(r["lr"]), r["lr chosen by"], r["input"], str(r["drop last"]),  # noqa: E731
                     r.get("init") or "falign")
    for group in dict.fromkeys(key(r) for r in rows):
        all_runs = [r for r in rows if key(r) == group]
        sub = [r for r in all_runs if r["status"] == "completed"] or all_runs
        cols = {c: np.array([float(r[c]) for r in sub]) for c in ("final error %", "best-epoch error %",
                                                                    "val-selected error %")}
        diverged = sum(r["status"] == "diverged" for r in all_runs)
        flagged = sum(bool(r.get("flags")) for r in all_runs)
        out.append({"rule": group[0], "lr": group[1], "lr chosen by": group[2], "input": group[3],
                    "drop last": group[4], "init": group[5], "seeds": len(all_runs), "diverged": diverged,
                    "flagged": flagged,
                    "epochs": all_runs[0]["epochs"],
                    **{f"{c} mean": float(v.mean()) for c, v in cols.items()},
                    **{f"{c} std": _std(v) for c, v in cols.items()},
                    "BioTorch published %": PUBLISHED.get(group[0], math.nan)})
    return out


def write_csv(rows: list[dict], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def _lr_cell(s: dict) -> str:
    lr = s["lr"]
    return f"{lr:g} ({s['lr chosen by']})" if not math.isnan(lr) else "not recorded"


def tuning_markdown(tuning: list[dict], chosen: dict[str, dict]) -> list[str]:
    """The tuning stage as a table: best validation error % per rule and lr (mean over tuning seeds)."""
    grid = sorted({r["lr"] for r in tuning}, reverse=True)
    lines = ["| rule | " + " | ".join(f"lr {lr:g}" for lr in grid) + " | chosen |",
             "|---|" + "---|" * (len(grid) + 1)]
    for rule in dict.fromkeys(r["rule"] for r in tuning):
        cells = []
        for lr in grid:
            runs = [r for r in tuning if r["rule"] == rule and r["lr"] == lr]
            errs = [r["best val error %"] for r in runs]
            cell = ("diverged" if all(math.isnan(e) for e in errs) else f"{np.nanmean(errs):.2f}") if runs else ""
            if any(r.get("flags") for r in runs):
                cell += " (runaway)"
            cells.append(f"**{cell}**" if lr == chosen[rule]["lr"] else cell)
        lines.append(f"| {rule} | " + " | ".join(cells) + f" | {chosen[rule]['lr']:g} |")
    return lines


def markdown(summary: list[dict], epochs: int, machine: str, seconds: float, command: str | None = None,
             tuning: list[dict] | None = None) -> str:
    short = epochs < 100
    begin, end = markers(epochs)
    rules = list(dict.fromkeys(s["rule"] for s in summary))
    rules_flag = "" if rules == RULES else f" --rules {','.join(rules)}"
    seeds = sorted({s["seeds"] for s in summary})
    spread = (f"mean ± std over {seeds[0]} seeds" if seeds[0] > 1 and len(seeds) == 1
              else "one seed (no spread)" if seeds == [1] else "mean ± std over the seeds in the table's seeds column")
    command = command or (f"`falign bench accuracy{' --full' if not short else ''}{rules_flag} --seeds "
                          f"{summary[0]['seeds']} --epochs {epochs}` on {machine} in {seconds / 60:.1f} min")
    val_note = ("The runs with a validation split train on the 60,000 training images less the held-out ones "
                "(BioTorch trains on all 60,000) and report two test errors: *best epoch* is BioTorch's figure of "
                "merit (the best epoch on the 10k test images: selected on the test set, so optimistic); "
                "*validation-selected* is the test error at the epoch of the best validation error (selected "
                "without the test set). *final* is the last epoch.")
    lines = [
        begin,
        "## Accuracy: LeNet on Fashion-MNIST against BioTorch's published errors"
        + ("" if short else ", the published 100-epoch schedule"),
        "",
        f"Generated by {command}. Top-1 test error in %, {spread}. Setup as BioTorch's: SGD momentum 0.9, "
        f"weight decay 1e-3, batch 64, the lr divided by 10 at 50% and 75% of training, the 10k test images. "
        f"The lr column says each row's initial lr and how it was chosen: *validation* is the tuning stage of "
        f"`falign bench accuracy` (below), *given* a fixed `--lr`. BioTorch publishes no Fashion-MNIST lr; its "
        f"CIFAR-10 LeNet configurations tune it per rule. {val_note}",
        "",
    ]
    if short:
        lines += [f"**This schedule is shorter than the published one: {epochs} epochs here, 100 in BioTorch's "
                  f"table.** Expect higher errors than published; `falign bench accuracy --full` runs the "
                  f"100-epoch schedule.", ""]
    lines += ["| rule | lr (chosen by) | input | seeds | best-epoch error % (test-selected) | validation-selected "
              "error % | final error % | BioTorch published % (100 epochs) | best-epoch − published, points | "
              "flags |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for s in summary:
        pub = s["BioTorch published %"]
        note = f" ({s['diverged']} of {s['seeds']} seeds diverged, excluded)" if s["diverged"] else ""
        if s["diverged"] == s["seeds"]:
            best = picked = final = "diverged (every seed)"
        else:
            best = _mean_std(s["best-epoch error % mean"], s["best-epoch error % std"]) + note
            picked = _mean_std(s["val-selected error % mean"], s["val-selected error % std"])
            final = _mean_std(s["final error % mean"], s["final error % std"])
        flags = f"{s['flagged']} of {s['seeds']} runs: scale runaway" if s["flagged"] else ""
        input_ = (s["input"] + (", drop_last" if str(s["drop last"]) == "True" else "")
                  + (", BioTorch init" if s.get("init") == "biotorch" else ""))
        gap = s["best-epoch error % mean"] - pub
        gap_cell = "—" if math.isnan(gap) else f"{gap:+.2f}".replace("-", "−")
        lines.append(f"| {s['rule']} | {_lr_cell(s)} | {input_} | {s['seeds']} | {best} | {picked} | {final} | "
                     f"{'—' if math.isnan(pub) else f'{pub:.2f}'} | {gap_cell} | {flags} |")
    lines += ["", "BioTorch publishes no kp or wm row."]
    if any(s.get("init") == "biotorch" for s in summary):
        lines += ["", "*BioTorch init* (`--init biotorch`): every forward weight W and feedback matrix B drawn "
                      "xavier_uniform and every bias 0, as BioTorch's feedback layers; the other rows keep "
                      "PyTorch's layer defaults for W and the biases and draw B kaiming_uniform (falign's default)."]
    if BASELINE in rules:
        lines += ["", f"*{BASELINE}* is the depth-utility baseline: the same LeNet with every layer but the output "
                      "layer frozen at its random initialisation, only the output layer trained (`falign train "
                      "--freeze-hidden`). A rule whose error is not clearly below it has not made its hidden layers "
                      "useful."]
    if tuning:
        tuning = [{**r, "rule": r["rule"] + (" (BioTorch init)" if r.get("init") == "biotorch" else "")}
                  for r in tuning]
        chosen = select(tuning)
        t_epochs, t_seeds = tuning[0]["epochs"], len({r["seed"] for r in tuning})
        lines += ["", f"Tuning stage: best validation error % per lr ({t_epochs}-epoch schedule with the same "
                      f"milestones, {t_seeds} seed{'s' if t_seeds > 1 else ''}, mean), the chosen lr in bold; the "
                      "test images are not read to choose.", "", *tuning_markdown(tuning, chosen)]
    lines.append(end)
    return "\n".join(lines)


def update_docs(path: Path, section: str, begin: str = BEGIN, end: str = END) -> None:
    """Replace the section of ``path`` between ``begin`` and ``end``, or append it."""
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    if begin in text and end in text:
        text = re.sub(re.escape(begin) + ".*?" + re.escape(end), lambda m: section, text, flags=re.S)
    else:
        text = text.rstrip() + "\n\n" + section + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def _lr_spec(text: str, rules: list[str]) -> dict[str, dict] | None:
    """``--lr``: ``auto`` (None: tune), one number for every rule, or ``rule=lr,...`` (every rule named)."""
    if text == "auto":
        return None
    try:
        if "=" not in text:
            return {rule: {"lr": float(text), "chosen by": "given"} for rule in rules}
        given = {k.strip(): float(v) for k, v in (item.split("=", 1) for item in text.split(","))}
    except ValueError:
        raise FalignError(f"--lr {text!r}: give auto, a number, or rule=lr pairs such as fa=0.001,dfa=0.0001") from None
    missing = [r for r in rules if r not in given]
    if missing:
        raise FalignError(f"--lr {text!r} names no lr for {', '.join(missing)}")
    return {rule: {"lr": given[rule], "chosen by": "given"} for rule in rules}


def _lr_from(path: str, rules: list[str]) -> dict[str, dict]:
    """The lr per rule chosen by an earlier bench: its ``lr.json`` (or the folder holding it)."""
    file = Path(path) / "lr.json" if Path(path).is_dir() else Path(path)
    try:
        chosen = json.loads(file.read_text())
    except (OSError, ValueError) as err:
        raise FalignError(f"--lr-from {path}: cannot read an lr.json of falign bench accuracy ({err})") from None
    missing = [r for r in rules if r not in chosen]
    if missing:
        raise FalignError(f"--lr-from {path}: no lr for {', '.join(missing)} (it has {', '.join(chosen)})")
    return {r: {**chosen[r], "lr": float(chosen[r]["lr"])} for r in rules}


def _grid(text: str) -> tuple[float, ...]:
    try:
        grid = tuple(float(t) for t in text.split(","))
    except ValueError:
        raise FalignError(f"--lr-grid {text!r}: comma-separated numbers, e.g. 0.1,0.01,0.001") from None
    if not grid or any(not (math.isfinite(g) and g > 0) for g in grid):
        raise FalignError(f"--lr-grid {text!r}: every lr must be a positive number")
    return grid


def build_parser(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--rules", default=",".join(RULES),
                        help=f"comma-separated rules (default: all eight); {BASELINE} adds the depth-utility baseline "
                             "(hidden layers frozen at random init, the output layer trained)")
    parser.add_argument("--seeds", type=int, default=3, help="seeds per rule (default: 3)")
    parser.add_argument("--first-seed", type=int, default=0,
                        help="seeds run are first-seed … first-seed + seeds − 1 (default: 0): split one table's "
                             "seeds over processes or days, then merge them with --summarize")
    parser.add_argument("--epochs", type=int, default=None, help="epochs (default: 5; --full: 100)")
    parser.add_argument("--full", action="store_true", help="BioTorch's published 100-epoch schedule")
    parser.add_argument("--lr", default="auto",
                        help="initial lr: auto (default: tuned per rule on a validation split, see --lr-grid), one "
                             "number for every rule (e.g. 0.01), or rule=lr pairs (fa=0.001,dfa=0.0001)")
    parser.add_argument("--lr-grid", default=",".join(f"{g:g}" for g in GRID),
                        help="the lrs the tuning stage tries (default: half-decades 0.1 … 0.0001)")
    parser.add_argument("--tune-epochs", type=int, default=None,
                        help="epochs of each tuning run, the same schedule compressed (default: 1; --full: 20, where 5 "
                             "chose lrs fastest early but worse or unstable over 100 epochs: docs/benchmarks.md)")
    parser.add_argument("--tune-seeds", type=int, default=1, help="seeds per tuning lr (default: 1)")
    parser.add_argument("--tune-only", action="store_true",
                        help="stop after the tuning stage (tuning.csv, lr.json); a later bench runs the full "
                             "schedule at its choice with --lr-from")
    parser.add_argument("--lr-from", default=None, metavar="LR_JSON",
                        help="use the lrs an earlier bench chose (its --out folder or lr.json) instead of tuning")
    parser.add_argument("--val-size", type=int, default=None,
                        help=f"training images held out for validation (default: {VAL_SIZE}; 0 trains on all "
                             "60,000 and needs a given --lr)")
    parser.add_argument("--resize", type=int, default=None, metavar="SIDE",
                        help="resize images to SIDE×SIDE by bilinear interpolation (BioTorch: 32) instead of "
                             "padding 28×28 in the first conv")
    parser.add_argument("--drop-last", action="store_true", help="drop each epoch's last partial batch (BioTorch)")
    parser.add_argument("--init", choices=INITS, default="falign",
                        help="falign (default: PyTorch's layer defaults, B kaiming_uniform) or biotorch (W and B "
                             "xavier_uniform, biases 0, as BioTorch's feedback layers)")
    parser.add_argument("--data-dir", default=None, help="Fashion-MNIST IDX folder")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--out", default="runs/bench-accuracy", help="run directories and CSVs")
    parser.add_argument("--docs", default=None, metavar="FILE",
                        help="also regenerate the accuracy section of this Markdown file, e.g. --docs "
                             "docs/benchmarks.md in the repository (default: no file is changed)")
    parser.add_argument("--summarize", nargs="+", metavar="RESULTS", default=None,
                        help="train nothing: print the table (and regenerate the --docs section) from the results.csv "
                             "files or --out folders (their finished runs) of earlier runs, e.g. rules run on "
                             "different days or machines; a folder's tuning.csv is shown too")
    parser.add_argument("--no-progress", action="store_true")
    return parser


def _read_tuning(paths: list[str]) -> list[dict]:
    rows: list[dict] = []
    for path in paths:
        file = Path(path) / "tuning.csv" if Path(path).is_dir() else Path(path).parent / "tuning.csv"
        if file.is_file():
            with open(file, newline="") as f:
                rows += [{**r, "lr": float(r["lr"]), "seed": int(r["seed"]), "epochs": int(r["epochs"]),
                          "best val error %": float(r["best val error %"])} for r in csv.DictReader(f)]
    return rows


def run(args: argparse.Namespace) -> None:
    from falign.app.bench.speed import bench_device, names

    rules = names(args.rules, [*RULES, BASELINE], "rules")
    if args.device != "auto":
        bench_device(args.device)  # cuda where there is none fails before the folder is claimed
    if args.seeds < 1 or args.first_seed < 0 or args.tune_seeds < 1:
        raise FalignError(f"--seeds and --tune-seeds must be at least 1 and --first-seed at least 0, got "
                          f"{args.seeds}, {args.tune_seeds} and {args.first_seed}")
    epochs = args.epochs if args.epochs is not None else 100 if args.full else 5
    tune_epochs = args.tune_epochs if args.tune_epochs is not None else 20 if args.full else 1
    for flag, value in (("--epochs", epochs), ("--tune-epochs", tune_epochs)):
        if value < 1:
            raise FalignError(f"{flag} must be at least 1, got {value}")
    if args.docs:
        check_file(args.docs, "--docs")
    if args.summarize:
        rows = read_results(args.summarize)
        order = [*RULES, BASELINE]
        rows.sort(key=lambda r: order.index(r["rule"]) if r["rule"] in order else len(order))  # stable: bench order
        epochs = rows[0]["epochs"]
        hours = sum(r["seconds"] for r in rows) / 60
        section = markdown(summarize(rows), epochs, "", 0.0, tuning=_read_tuning(args.summarize), command=(
            f"`falign bench accuracy --summarize {' '.join(args.summarize)}` from runs of "
            f"`falign bench accuracy{' --full' if epochs >= 100 else ''} --epochs {epochs}` ({hours:.0f} min of "
            f"training in all; each folder's runs list their rules, seeds and lr)"))
        begin, end = markers(epochs)
        if args.docs:
            update_docs(Path(args.docs), section, begin, end)
        print(section.replace(begin, "").replace(end, "").strip())
        return
    from falign.data import load_dataset

    lrs = _lr_from(args.lr_from, rules) if args.lr_from else _lr_spec(args.lr, rules)
    val_size = args.val_size if args.val_size is not None else VAL_SIZE
    if args.tune_only and lrs is not None:
        raise FalignError("--tune-only runs the tuning stage, which --lr and --lr-from skip: give one or the other")
    if lrs is None and val_size == 0:
        raise FalignError("--val-size 0 leaves no validation split to tune the lr on: give --lr (a number or "
                          "rule=lr pairs) or --lr-from, or keep a validation split")
    grid = _grid(args.lr_grid)
    for rule in rules:  # every run's config is valid (--lr, --epochs, ...) before the folder is claimed
        for lr in grid if lrs is None else (lrs[rule]["lr"],):
            bench_config(rule, args.seeds - 1, epochs=epochs, lr=lr, data_dir=args.data_dir, device=args.device,
                         val_size=val_size, resize=args.resize, drop_last=args.drop_last, init=args.init)
    target = OutputDir(args.out, "bench", "--out")
    target.check()
    load_dataset("fashion-mnist", data_dir=args.data_dir, val_size=val_size, resize=args.resize)  # fails early
    out = target.claim()
    start = time.perf_counter()
    common = dict(data_dir=args.data_dir, device=args.device, val_size=val_size, resize=args.resize,
                  drop_last=args.drop_last, init=args.init, progress=not args.no_progress)
    tuning: list[dict] = []
    if lrs is None:
        tuning = tune(out, rules=rules, grid=grid, epochs=tune_epochs, seeds=args.tune_seeds, **common)
        write_csv(tuning, out / "tuning.csv")
        lrs = select(tuning)
    (out / "lr.json").write_text(json.dumps(lrs, indent=1))
    if args.tune_only:
        print("\n".join(tuning_markdown(tuning, lrs)))
        print(f"\nlr per rule: {out / 'lr.json'}; run the full schedule at it with --lr-from {out}")
        return
    rows = run_accuracy(out, rules=rules, seeds=args.seeds, epochs=epochs, lrs=lrs, first_seed=args.first_seed,
                        **common)
    seconds = time.perf_counter() - start
    summary = summarize(rows)
    write_csv(rows, out / "results.csv")
    write_csv(summary, out / "summary.csv")
    device = "cuda" if (args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())) else "cpu"
    machine = (torch.cuda.get_device_name(0) if device == "cuda"
               else f"{platform.machine()} CPU, {torch.get_num_threads()} threads")
    section = markdown(summary, epochs, machine, seconds, tuning=tuning)
    begin, end = markers(epochs)
    if args.docs:
        update_docs(Path(args.docs), section, begin, end)
    print(section.replace(begin, "").replace(end, "").strip())
    print(f"\nresults: {out / 'results.csv'}, {out / 'summary.csv'}" + (f"; updated {args.docs}" if args.docs else ""))
