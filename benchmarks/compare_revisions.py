"""Step time of two git revisions of falign on this machine, runs alternated so drifts hit both alike.

Each round runs ``falign bench speed`` (the step-time benchmark, each rule against plain PyTorch in the same
process) once per revision, from a temporary worktree of that revision, and keeps the per-rule ratios;
the table gives, per rule and model, the median and range of the ratio over the rounds for each revision.

Run:  python benchmarks/compare_revisions.py BASE [HEAD] --rounds 3 --repeats 100 [--rules fa,kp] [--models mlp]
(HEAD defaults to the working tree.)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_bench(src: Path, args: argparse.Namespace, out: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": str(src / "src"), "PYTHONWARNINGS": "ignore"}
    cmd = [sys.executable, "-m", "falign", "bench", "speed", "--repeats", str(args.repeats), "--warmup", "10",
           "--models", args.models, "--json", str(out)]
    if args.rules:
        cmd += ["--rules", args.rules]
    subprocess.run(cmd, check=True, env=env, cwd=src, capture_output=True, text=True)
    return json.loads(out.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("base")
    parser.add_argument("head", nargs="?", default=None, help="a revision (default: the working tree)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=100)
    parser.add_argument("--models", default="mlp,lenet")
    parser.add_argument("--rules", default="")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        trees = {}
        for label, rev in (("base", args.base), ("head", args.head)):
            if rev is None:
                trees[label] = (ROOT, "working tree")
                continue
            path = Path(tmp) / label
            subprocess.run(["git", "worktree", "add", "--detach", str(path), rev], check=True, cwd=ROOT,
                           capture_output=True)
            trees[label] = (path, rev)
        ratios: dict[tuple[str, str, str], list[float]] = {}
        machine = ""
        try:
            for r in range(args.rounds):
                for label, (path, _) in trees.items():
                    result = run_bench(path, args, Path(tmp) / f"{label}-{r}.json")
                    machine = result["machine"]
                    for row in result["rows"]:
                        if row["variant"] != "torch" and not row["compiled"]:
                            ratios.setdefault((row["model"], row["variant"], label), []).append(row["ratio"])
        finally:
            for path, _ in trees.values():
                if path != ROOT:
                    subprocess.run(["git", "worktree", "remove", "--force", str(path)], cwd=ROOT, capture_output=True)
    print(f"# step time × plain PyTorch, {machine}; median [min–max] over {args.rounds} alternated rounds of "
          f"{args.repeats} steps")
    print(f"| model | rule | base ({trees['base'][1]}) | head ({trees['head'][1]}) |")
    print("|---|---|---|---|")
    for model, rule in dict.fromkeys((m, v) for m, v, _ in ratios):
        cells = []
        for label in ("base", "head"):
            vals = ratios.get((model, rule, label), [])
            cells.append(f"{statistics.median(vals):.3f} [{min(vals):.3f}–{max(vals):.3f}]" if vals else "—")
        print(f"| {model} | {rule} | {cells[0]} | {cells[1]} |")


if __name__ == "__main__":
    main()
