"""Accuracy benchmark against BioTorch's published LeNet / Fashion-MNIST error table.

BioTorch's setup (its ``Benchmarks.md``): LeNet on 32×32 inputs (falign's ``lenet`` pads 28×28 images
by 2, the same shapes), SGD momentum 0.9, weight decay 1e-3, batch 64, the learning rate divided by 10
at 50% and 75% of training, 100 epochs; the error reported is that of the best epoch on the 10k test
images. The CPU-feasible default here keeps everything but the number of epochs; ``--full`` uses 100.
Each run is an ordinary ``falign train`` run (its directory holds config.json and metrics.jsonl).

``falign bench accuracy`` writes ``results.csv`` (one row per run) and ``summary.csv``; with ``--docs FILE`` it
also regenerates the accuracy section of that Markdown file (in the repository: ``--docs docs/benchmarks.md``).
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

from falign.errors import FalignError
from falign.outdir import OutputDir, check_file
from falign.train import DivergenceError, TrainConfig, Trainer, read_metrics
from falign.train.progress import progress_bar

RULES = ["bp", "fa", "dfa", "usf", "brsf", "frsf", "kp", "wm"]
# Top-1 error %, LeNet on Fashion-MNIST, SGD, 100 epochs (BioTorch Benchmarks.md; ../shared/DESIGN.md §6).
PUBLISHED = {"bp": 9.20, "fa": 13.06, "dfa": 12.81, "usf": 9.69, "brsf": 10.02, "frsf": 9.61}
BEGIN, END = "<!-- accuracy:begin -->", "<!-- accuracy:end -->"
FULL_BEGIN, FULL_END = "<!-- accuracy-full:begin -->", "<!-- accuracy-full:end -->"  # the 100-epoch table


def markers(epochs: int) -> tuple[str, str]:
    """The docs section of a schedule: the short CPU one and the published 100-epoch one are kept apart."""
    return (FULL_BEGIN, FULL_END) if epochs >= 100 else (BEGIN, END)


def bench_config(rule: str, seed: int, *, epochs: int, lr: float, data_dir: str | None, device: str) -> TrainConfig:
    """The config of one benchmark run (BioTorch's LeNet setup); a bad value is a ConfigError."""
    return TrainConfig(rule=rule, model="lenet", data="fashion-mnist", data_dir=data_dir, epochs=epochs,
                       batch_size=64, optimizer="sgd", lr=lr, momentum=0.9, weight_decay=1e-3,
                       lr_schedule="step", lr_milestones=(0.5, 0.75), seed=seed, device=device)


def run_accuracy(out: Path, *, rules: list[str], seeds: int, epochs: int, lr: float, data_dir: str | None,
                 device: str, progress: bool = True) -> list[dict]:
    """Train every (rule, seed) and return one result row per run."""
    rows = []
    bar = progress_bar(len(rules) * seeds * epochs, "bench accuracy", progress)
    try:
        for rule in rules:
            for seed in range(seeds):
                cfg = bench_config(rule, seed, epochs=epochs, lr=lr, data_dir=data_dir, device=device)
                run_dir = out / "runs" / f"{rule}-s{seed}"
                start = time.perf_counter()
                try:
                    Trainer(cfg, run_dir, progress=False, overwrite=True).run()
                    status = "completed"
                except DivergenceError:
                    status = "diverged"
                epochs_rows = [r for r in read_metrics(run_dir / "metrics.jsonl") if r["event"] == "epoch"]
                bar.update(epochs)
                done = status == "completed"
                rows.append({"rule": rule, "seed": seed, "epochs": epochs, "status": status,
                             "final error %": 100 * (1 - epochs_rows[-1]["test_acc"]) if done else math.nan,
                             "best-epoch error %": (100 * (1 - max(r["test_acc"] for r in epochs_rows))
                                                    if done else math.nan),
                             "seconds": time.perf_counter() - start, "run": str(run_dir)})
    finally:
        bar.close()
    return rows


def _std(a: np.ndarray) -> float:
    return float(a.std(ddof=1)) if len(a) > 1 else math.nan  # one seed: no spread to report


def _mean_std(mean: float, std: float) -> str:
    return f"{mean:.2f}" if math.isnan(std) else f"{mean:.2f} ± {std:.2f}"


def _rows_of_folder(folder: Path) -> list[dict]:
    """Result rows of the finished runs in a ``falign bench accuracy --out`` folder (``runs/<rule>-s<seed>``), read
    from each run's config, metrics and summary: a bench interrupted before writing results.csv keeps its
    finished runs; unfinished ones are skipped."""
    rows = []
    for run in sorted((folder / "runs").glob("*")):
        try:
            summary = json.loads((run / "summary.json").read_text())
            config = json.loads((run / "config.json").read_text())
        except (OSError, ValueError):
            continue
        epochs = [r for r in read_metrics(run / "metrics.jsonl") if r["event"] == "epoch"]
        done = summary.get("status") == "completed" and bool(epochs)
        rows.append({"rule": config["rule"], "seed": int(config["seed"]), "epochs": int(config["epochs"]),
                     "status": summary.get("status", "unknown"),
                     "final error %": 100 * (1 - epochs[-1]["test_acc"]) if done else math.nan,
                     "best-epoch error %": 100 * (1 - max(r["test_acc"] for r in epochs)) if done else math.nan,
                     "seconds": float(summary.get("wall_time_s", 0.0)), "run": str(run)})
    return rows


def read_results(paths: list[str]) -> list[dict]:
    """The rows of ``results.csv`` files, or of the finished runs in ``--out`` folders, written by earlier runs of
    ``falign bench accuracy``, in the order given (a rule in several places: every row counts)."""
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
                    rows.append({**row, "seed": int(row["seed"]), "epochs": int(row["epochs"]),
                                 "final error %": float(row["final error %"]),
                                 "best-epoch error %": float(row["best-epoch error %"]),
                                 "seconds": float(row["seconds"])})
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
    out = []
    for rule in dict.fromkeys(r["rule"] for r in rows):
        all_runs = [r for r in rows if r["rule"] == rule]
        sub = [r for r in all_runs if r["status"] == "completed"] or all_runs
        final = np.array([r["final error %"] for r in sub])
        best = np.array([r["best-epoch error %"] for r in sub])
        diverged = sum(r["status"] == "diverged" for r in all_runs)
        out.append({"rule": rule, "seeds": len(all_runs), "diverged": diverged, "epochs": all_runs[0]["epochs"],
                    "final error % mean": float(final.mean()), "final error % std": _std(final),
                    "best-epoch error % mean": float(best.mean()), "best-epoch error % std": _std(best),
                    "BioTorch published %": PUBLISHED.get(rule, math.nan)})
    return out


def write_csv(rows: list[dict], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def markdown(summary: list[dict], epochs: int, lr: float, machine: str, seconds: float,
             command: str | None = None) -> str:
    short = epochs < 100
    begin, end = markers(epochs)
    rules = [s["rule"] for s in summary]
    rules_flag = "" if rules == RULES else f" --rules {','.join(rules)}"
    seeds = sorted({s["seeds"] for s in summary})
    spread = (f"mean ± std over {seeds[0]} seeds" if seeds[0] > 1 and len(seeds) == 1
              else "one seed (no spread)" if seeds == [1] else f"mean ± std over {'/'.join(map(str, seeds))} seeds")
    command = command or (f"`falign bench accuracy{' --full' if not short else ''}{rules_flag} --seeds "
                          f"{summary[0]['seeds']} --epochs {epochs}` on {machine} in {seconds / 60:.1f} min")
    lines = [
        begin,
        "## Accuracy: LeNet on Fashion-MNIST against BioTorch's published errors"
        + ("" if short else ", the published 100-epoch schedule"),
        "",
        f"Generated by {command}. Top-1 test error in %, {spread}. Setup as BioTorch's: SGD momentum 0.9, "
        f"weight decay 1e-3, batch 64, lr "
        f"{lr:g} divided by 10 at 50% and 75% of training, the 10k test images; *best epoch* mirrors BioTorch's "
        f"report (the best epoch on those images), *final* is the last epoch.",
        "",
    ]
    if short:
        lines += [f"**This schedule is shorter than the published one: {epochs} epochs here, 100 in BioTorch's "
                  f"table.** Expect higher errors than published; `falign bench accuracy --full` runs the "
                  f"100-epoch schedule.", ""]
    lines += ["| rule | falign best-epoch error % | falign final error % | BioTorch published % (100 epochs) |",
              "|---|---|---|---|"]
    for s in summary:
        pub = s["BioTorch published %"]
        note = f" ({s['diverged']} of {s['seeds']} seeds diverged, excluded)" if s["diverged"] else ""
        if s["diverged"] == s["seeds"]:
            ours_best = ours_final = "diverged (every seed)"
        else:
            ours_best = _mean_std(s["best-epoch error % mean"], s["best-epoch error % std"]) + note
            ours_final = _mean_std(s["final error % mean"], s["final error % std"])
        lines.append(f"| {s['rule']} | {ours_best} | {ours_final} | {'—' if math.isnan(pub) else f'{pub:.2f}'} |")
    lines += ["", "BioTorch publishes no kp or wm row.", end]
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


def build_parser(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--rules", default=",".join(RULES), help="comma-separated rules (default: all eight)")
    parser.add_argument("--seeds", type=int, default=3, help="seeds per rule (default: 3)")
    parser.add_argument("--epochs", type=int, default=None, help="epochs (default: 5; --full: 100)")
    parser.add_argument("--full", action="store_true", help="BioTorch's published 100-epoch schedule")
    parser.add_argument("--lr", type=float, default=0.01, help="initial learning rate (default: 0.01)")
    parser.add_argument("--data-dir", default=None, help="Fashion-MNIST IDX folder")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--out", default="runs/bench-accuracy", help="run directories and CSVs")
    parser.add_argument("--docs", default=None, metavar="FILE",
                        help="also regenerate the accuracy section of this Markdown file, e.g. --docs "
                             "docs/benchmarks.md in the repository (default: no file is changed)")
    parser.add_argument("--summarize", nargs="+", metavar="RESULTS", default=None,
                        help="train nothing: print the table (and regenerate the --docs section) from the results.csv "
                             "files or --out folders (their finished runs) of earlier runs, e.g. rules run on "
                             "different days or machines")
    parser.add_argument("--no-progress", action="store_true")
    return parser


def run(args: argparse.Namespace) -> None:
    from falign.bench.speed import bench_device, names

    rules = names(args.rules, list(RULES), "rules")
    if args.device != "auto":
        bench_device(args.device)  # cuda where there is none fails before the folder is claimed
    if args.seeds < 1:
        raise FalignError(f"--seeds must be at least 1, got {args.seeds}")
    epochs = args.epochs if args.epochs is not None else 100 if args.full else 5
    if epochs < 1:
        raise FalignError(f"--epochs must be at least 1, got {epochs}")
    if args.docs:
        check_file(args.docs, "--docs")
    if args.summarize:
        rows = read_results(args.summarize)
        rows.sort(key=lambda r: RULES.index(r["rule"]) if r["rule"] in RULES else len(RULES))  # stable: bench order
        epochs = rows[0]["epochs"]
        hours = sum(r["seconds"] for r in rows) / 60
        section = markdown(summarize(rows), epochs, args.lr, "", 0.0, command=(
            f"`falign bench accuracy --summarize {' '.join(args.summarize)}` from runs of "
            f"`falign bench accuracy{' --full' if epochs >= 100 else ''} --epochs {epochs}` ({hours:.0f} min of "
            f"training in all; each file's runs list their rules and seeds; `falign bench accuracy"
            f"{' --full' if epochs >= 100 else ''} --seeds 1` runs every rule in one go)"))
        begin, end = markers(epochs)
        if args.docs:
            update_docs(Path(args.docs), section, begin, end)
        print(section.replace(begin, "").replace(end, "").strip())
        return
    from falign.data import load_dataset

    for rule in rules:  # every run's config is valid (--lr, --epochs, ...) before the folder is claimed
        bench_config(rule, args.seeds - 1, epochs=epochs, lr=args.lr, data_dir=args.data_dir, device=args.device)
    target = OutputDir(args.out, "bench", "--out")
    target.check()
    load_dataset("fashion-mnist", data_dir=args.data_dir)  # a missing or malformed file fails before any work
    out = target.claim()
    start = time.perf_counter()
    rows = run_accuracy(out, rules=rules, seeds=args.seeds, epochs=epochs, lr=args.lr, data_dir=args.data_dir,
                        device=args.device, progress=not args.no_progress)
    seconds = time.perf_counter() - start
    summary = summarize(rows)
    write_csv(rows, out / "results.csv")
    write_csv(summary, out / "summary.csv")
    device = "cuda" if (args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())) else "cpu"
    machine = (torch.cuda.get_device_name(0) if device == "cuda"
               else f"{platform.machine()} CPU, {torch.get_num_threads()} threads")
    section = markdown(summary, epochs, args.lr, machine, seconds)
    begin, end = markers(epochs)
    if args.docs:
        update_docs(Path(args.docs), section, begin, end)
    print(section.replace(begin, "").replace(end, "").strip())
    print(f"\nresults: {out / 'results.csv'}, {out / 'summary.csv'}" + (f"; updated {args.docs}" if args.docs else ""))
