"""`falign bench speed` several times: each variant's median ratio to plain PyTorch and its range over the runs,
against the CPU targets. Prints a Markdown table (pasted into docs/benchmarks.md).

Run:  python benchmarks/speed_runs.py                  # 3 runs of: falign bench speed --repeats 100 --warmup 10
      python benchmarks/speed_runs.py --runs 5 --models mlp
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

import torch

from falign.app.bench import speed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--models", default="mlp,lenet")
    parser.add_argument("--repeats", type=int, default=100)
    parser.add_argument("--rules", default=None, help="as falign bench speed --rules (default: every rule)")
    args = parser.parse_args()
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.runs):
            out = Path(tmp) / f"run{i}.json"
            speed.main(["--models", args.models, "--repeats", str(args.repeats), "--warmup", "10", "--json", str(out)]
                       + ([] if args.rules is None else ["--rules", args.rules]))
            runs.append(json.loads(out.read_text()))
    machine = runs[0]["machine"]
    print(f"\n`python benchmarks/speed_runs.py --runs {args.runs} --models {args.models}` ({args.runs} runs of `falign "
          f"bench speed --repeats {args.repeats} --warmup 10`), {machine}, torch {torch.__version__}.\n")
    print("| model | variant | × torch, median of runs | range | target | met | ms (median) | "
          "memory beyond bp + feedback, MiB |")
    print("|---|---|---|---|---|---|---|---|")
    for row in runs[0]["rows"]:
        key = (row["model"], row["variant"])
        rows = [next(r for r in run["rows"] if (r["model"], r["variant"]) == key) for run in runs]
        ratios = sorted(r["ratio"] for r in rows)
        median = statistics.median(ratios)
        target = row["target"]
        met = "" if target is None else ("yes" if median <= target else "NO")
        ms = statistics.median(r["median_ms"] for r in rows)
        print(f"| {row['model']} (b={row['batch']}) | {row['variant']} | {median:.3f} | "
              f"{ratios[0]:.3f}–{ratios[-1]:.3f} | {'' if target is None else f'≤{target}'} | {met} | {ms:.2f} | "
              f"{row['memory_over_bp_plus_feedback_mib']:+.1f} |")


if __name__ == "__main__":
    main()
