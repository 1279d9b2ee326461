"""Architecture benchmark: attention and recurrent models under every rule, against backprop.

Models (plain PyTorch, :mod:`falign.models.sequence`, converted by ``falign.convert``):

- ``vit``: a small Vision Transformer (7×7 patches of Fashion-MNIST; 2×2 patches of the 8×8 digits when
  Fashion-MNIST is not installed), class token, 2 pre-norm encoder layers of width 64, 4 heads;
- ``row-lstm`` / ``row-gru``: the image read row by row (one row per time step), 64 hidden units;
- ``char-lm``: a character-level LSTM language model (embedding 32, 128 hidden units) on the Python standard
  library's own sources (the first 400 kB of its ``.py`` files in sorted order; the last 10% held out), next
  character accuracy on held-out windows of 64 characters.

For each model and rule: test accuracy (mean ± std over ``--seeds`` seeds, the same steps, batch and Adam
learning rate for every rule), and the step time of one training step against the unconverted model, timed
in interleaved rounds, each variant's timed step its second in a row (median over ``--repeats`` steps,
``falign.app.bench.speed.timed_rounds``), with the memory columns of ``falign bench speed``.

Run:  falign bench architectures                 # every rule, 3 seeds; prints the table
      falign bench architectures --docs docs/benchmarks.md   # and rewrites its section of that file
      falign bench architectures --models vit --rules bp,fa --seeds 1
"""

from __future__ import annotations

import argparse
import math
import platform
import statistics
import sysconfig
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import falign
from falign.app.bench import accuracy
from falign.app.bench.speed import bench_device, names, state_bytes, step_peak_bytes, timed_rounds
from falign.app.outdir import check_file
from falign.app.train.progress import progress_bar
from falign.errors import FalignError
from falign.models.sequence import CharLM, PatchViT, RowRNN

MODELS = ("vit", "row-lstm", "row-gru", "char-lm")
BEGIN, END = "<!-- architectures:begin -->", "<!-- architectures:end -->"
TARGET = 1.10  # the target for fa's step time on each new layer, × plain PyTorch


# ---- tasks -----------------------------------------------------------------------------------------------
class Task:
    """A model builder, training and test data, and how a batch's loss and accuracy are computed."""

    def __init__(self, name: str, build, train: tuple[torch.Tensor, torch.Tensor],
                 test: tuple[torch.Tensor, torch.Tensor], steps: int, batch: int, lr: float, source: str,
                 unsupported: str = "error"):
        self.name, self.build, self.train, self.test = name, build, train, test
        self.steps, self.batch, self.lr, self.source = steps, batch, lr, source
        self.unsupported = unsupported  # falign.convert's: "backprop" for parameters without a feedback version

    @staticmethod
    def loss(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1))

    @torch.no_grad()
    def accuracy(self, model: nn.Module) -> float:
        model.eval()
        x, y = self.test
        device = next(model.parameters()).device
        correct = sum(int((model(x[i:i + 500].to(device)).argmax(-1).cpu() == y[i:i + 500]).sum())
                      for i in range(0, len(x), 500))
        model.train()
        return correct / y.numel()


def _images(train_size: int, test_size: int) -> tuple[str, int, tuple, tuple]:
    from falign.data import DatasetMissing, load_dataset

    try:
        data = load_dataset("fashion-mnist", train_subset=train_size)
        name = "Fashion-MNIST"
    except DatasetMissing as err:
        print(f"Fashion-MNIST is not installed ({err}): the image models train on digits instead", flush=True)
        data = load_dataset("digits")
        name = "digits (Fashion-MNIST not installed)"
    side = math.isqrt(data.x_train[0].numel())
    flat = lambda x: x.reshape(x.shape[0], side * side).float()  # noqa: E731
    return (name, side, (flat(data.x_train), data.y_train), (flat(data.x_test[:test_size]), data.y_test[:test_size]))


def stdlib_text(limit: int = 400_000) -> str:
    """The first ``limit`` characters of the standard library's ``.py`` files (sorted paths), ASCII only."""
    root = Path(sysconfig.get_paths()["stdlib"])
    chunks, size = [], 0
    for path in sorted(root.glob("*.py")):
        text = path.read_text(encoding="utf-8", errors="replace").encode("ascii", "replace").decode()
        chunks.append(text)
        size += len(text)
        if size >= limit:
            break
    if size == 0:
        raise FalignError(f"no Python sources found under {root} for the char-lm task")
    return "".join(chunks)[:limit]


def _char_task(context: int = 64) -> tuple[int, tuple, tuple]:
    text = stdlib_text()
    vocab = sorted(set(text))
    index = {c: i for i, c in enumerate(vocab)}
    ids = torch.tensor([index[c] for c in text], dtype=torch.long)
    split = int(0.9 * len(ids))

    def windows(seq: torch.Tensor, stride: int) -> tuple[torch.Tensor, torch.Tensor]:
        starts = torch.arange(0, len(seq) - context - 1, stride)
        x = torch.stack([seq[s:s + context] for s in starts.tolist()])
        y = torch.stack([seq[s + 1:s + context + 1] for s in starts.tolist()])
        return x, y

    return len(vocab), windows(ids[:split], context // 2), windows(ids[split:], context)


def make_tasks(models: list[str], steps_scale: float = 1.0) -> list[Task]:
    tasks = []
    if any(m != "char-lm" for m in models):
        source, side, train, test = _images(10_000, 2_000)
        classes = int(train[1].max()) + 1
        patch = 7 if side == 28 else 2
        steps = lambda n: max(1, int(n * steps_scale))  # noqa: E731
        if "vit" in models:
            # the class token and positions (parameters of the model itself, added to the tokens) stay on backprop
            tasks.append(Task("vit", lambda: PatchViT(side, patch, classes), train, test, steps(300), 64, 1e-3,
                              source, unsupported="backprop"))
        if "row-lstm" in models:
            tasks.append(Task("row-lstm", lambda: RowRNN(side, classes, nn.LSTM), train, test, steps(300), 64, 3e-3,
                              source))
        if "row-gru" in models:
            tasks.append(Task("row-gru", lambda: RowRNN(side, classes, nn.GRU), train, test, steps(300), 64, 3e-3,
                              source))
    if "char-lm" in models:
        vocab, train, test = _char_task()
        tasks.append(Task("char-lm", lambda: CharLM(vocab), train, (test[0][:400], test[1][:400]),
                          max(1, int(200 * steps_scale)), 32, 3e-3, "Python standard library sources"))
    return tasks


# ---- training and timing ---------------------------------------------------------------------------------
def train_once(task: Task, rule: str, seed: int, device: torch.device) -> float:
    """Train ``task``'s model under ``rule`` from ``seed``; the test accuracy."""
    torch.manual_seed(seed)
    model = falign.convert(task.build(), rule, seed=seed, unsupported=task.unsupported).to(device)
    train_step = falign.TrainStep(model, torch.optim.Adam(model.parameters(), lr=task.lr), task.loss)
    x, y = task.train
    g = torch.Generator().manual_seed(seed)
    for _ in range(task.steps):
        idx = torch.randint(0, len(x), (task.batch,), generator=g)
        loss = train_step(x[idx].to(device), y[idx].to(device))
    if not math.isfinite(float(loss)):
        return math.nan
    return task.accuracy(model)


def time_steps(task: Task, rules: list[str], repeats: int, device: torch.device) -> dict[str, dict[str, float]]:
    """Median step time of each rule and of the unconverted model (round-robin), and the memory columns."""
    torch.manual_seed(0)
    base = task.build().to(device)
    x, y = task.train[0][:task.batch].to(device), task.train[1][:task.batch].to(device)
    variants: dict[str, nn.Module] = {"torch": base}
    for rule in rules:
        variants[rule] = falign.convert(base, rule, seed=0, unsupported=task.unsupported)
    steps, opts = {}, {}
    for name, model in variants.items():
        opt = torch.optim.SGD(model.parameters(), lr=1e-3)
        if name != "torch":
            falign.attach(model, opt)
        target = name != "torch" and falign.uses_target(model)

        def step(model=model, opt=opt, target=target) -> None:
            opt.zero_grad(set_to_none=True)
            if target:
                falign.set_target(model, y)
            task.loss(model(x), y).backward()
            opt.step()

        steps[name], opts[name] = step, opt  # written out (not falign.TrainStep): the timed calls, nothing else
    for _ in range(3):
        for s in steps.values():
            s()
    memory = {k: (state_bytes(variants[k], opts[k]), step_peak_bytes(s, device)) for k, s in steps.items()}
    times = timed_rounds(steps, repeats, device)
    base_median = statistics.median(times["torch"])
    base_total = sum(memory["torch"])
    out = {}
    for k, ts in times.items():
        feedback = sum(layer.feedback_weight.numel() * layer.feedback_weight.element_size()
                       for layer in falign.feedback_layers(variants[k]) if layer.feedback_weight is not None)
        out[k] = {"median_ms": statistics.median(ts) * 1e3, "ratio": statistics.median(ts) / base_median,
                  "feedback_mib": feedback / 2**20,
                  "beyond_mib": (sum(memory[k]) - base_total - feedback) / 2**20}
    return out


def run_benchmark(models: list[str], rules: list[str], seeds: int, repeats: int, device: torch.device,
                  steps_scale: float = 1.0, progress: bool = True, timing_runs: int = 3) -> list[dict[str, Any]]:
    tasks = make_tasks(models, steps_scale)
    bar = progress_bar(len(tasks) * len(rules) * seeds, "bench architectures", progress)
    rows = []
    try:
        for task in tasks:
            runs = [time_steps(task, rules, repeats, device) for _ in range(timing_runs)]
            timing = {}
            for rule in rules:  # the median run of each rule, and the range of its ratio over the runs
                ordered = sorted((r[rule] for r in runs), key=lambda t: t["ratio"])
                timing[rule] = {**ordered[len(ordered) // 2], "ratio_min": ordered[0]["ratio"],
                                "ratio_max": ordered[-1]["ratio"], "timing_runs": timing_runs}
            for rule in rules:
                accs = []
                for seed in range(seeds):
                    accs.append(train_once(task, rule, seed, device))
                    bar.update(1)
                rows.append({"model": task.name, "data": task.source, "rule": rule, "seeds": seeds,
                             "steps": task.steps, "accuracies": accs, **timing[rule]})
    finally:
        bar.close()
    return rows


def _mean_std(values: list[float]) -> tuple[float, float]:
    a = np.asarray(values, dtype=float)
    return float(np.mean(a)), (float(np.std(a, ddof=1)) if len(a) > 1 else math.nan)


def markdown(rows: list[dict], machine: str, repeats: int, seconds: float, command: str) -> str:
    lines = [BEGIN, "## Attention and recurrent models: accuracy and step time per rule", "",
             f"`{command}` on {machine}, torch {torch.__version__}, {seconds / 60:.0f} min. Accuracy: test "
             "accuracy (%) after the same number of Adam steps for every rule, mean ± std over seeds; Δ bp: the "
             "difference of the means. Step: median step time (forward, loss, backward, optimiser step, the rule's "
             f"per-step work) over {repeats} interleaved rounds (each variant's timed step its second in a row), "
             "× the unconverted PyTorch model (median of "
             f"{rows[0].get('timing_runs', 1)} timing runs, and their range); memory beyond: "
             "(state + step peak) − (PyTorch's) − the feedback matrices, MiB (≤ 0: no memory beyond backprop's "
             f"plus the feedback). Target for fa: ≤ {TARGET}×.", ""]
    for model in dict.fromkeys(r["model"] for r in rows):
        sub = [r for r in rows if r["model"] == model]
        lines += [f"### {model} — {sub[0]['data']}, {sub[0]['steps']} steps", "",
                  "| rule | accuracy % | Δ bp | step ms | × torch | range | feedback MiB | memory beyond, MiB |",
                  "|---|---|---|---|---|---|---|---|"]
        bp = next((_mean_std(r["accuracies"])[0] for r in sub if r["rule"] == "bp"), math.nan)
        for r in sub:
            mean, std = _mean_std(r["accuracies"])
            delta = "" if r["rule"] == "bp" or math.isnan(bp) else f"{100 * (mean - bp):+.1f}"
            spread = "" if math.isnan(std) else f" ± {100 * std:.1f}"
            lines.append(f"| {r['rule']} | {100 * mean:.1f}{spread} (n={r['seeds']}) | {delta} | "
                         f"{r['median_ms']:.1f} | {r['ratio']:.2f} | "
                         f"{r.get('ratio_min', r['ratio']):.2f}–{r.get('ratio_max', r['ratio']):.2f} | "
                         f"{r['feedback_mib']:.2f} | "
                         f"{r['beyond_mib']:+.1f} |")
        lines.append("")
    lines.append(END)
    return "\n".join(lines)


def update_docs(path: Path, section: str) -> None:
    """Replace this benchmark's section of ``path`` (between its markers), or append it."""
    accuracy.update_docs(path, section, BEGIN, END)


def build_parser(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--models", default=",".join(MODELS), help=f"comma-separated, from {', '.join(MODELS)}")
    parser.add_argument("--rules", default=",".join(falign.available_rules()),
                        help="comma-separated rules (default: every registered rule; bp is the reference)")
    parser.add_argument("--seeds", type=int, default=3, help="training runs per model and rule (default 3)")
    parser.add_argument("--repeats", type=int, default=30, help="timed steps per variant (default 30)")
    parser.add_argument("--timing-runs", type=int, default=3,
                        help="independent timing runs per model (the table gives their median and range; default 3)")
    parser.add_argument("--steps-scale", type=float, default=1.0,
                        help="multiply every model's number of training steps (default 1)")
    parser.add_argument("--device", default="cpu", help="auto, cpu or cuda[:i] (default: cpu)")
    parser.add_argument("--docs", default=None, metavar="FILE",
                        help="also regenerate this benchmark's section of this Markdown file, e.g. --docs "
                             "docs/benchmarks.md in the repository (default: no file is changed)")
    parser.add_argument("--no-progress", action="store_true")
    return parser


def run(args: argparse.Namespace) -> None:
    models = names(args.models, list(MODELS), "models")
    rules = names(args.rules, falign.available_rules(), "rules")
    if args.seeds < 1 or args.repeats < 1 or args.timing_runs < 1 or not 0 < args.steps_scale < math.inf:
        raise FalignError(f"--seeds and --repeats must be >= 1 and --steps-scale a finite number > 0; got "
                          f"{args.seeds}, {args.repeats}, {args.steps_scale}")
    device = bench_device(args.device)
    if args.docs:
        check_file(args.docs, "--docs")
    start = time.perf_counter()
    rows = run_benchmark(models, rules, args.seeds, args.repeats, device, args.steps_scale, not args.no_progress,
                         args.timing_runs)
    machine = (torch.cuda.get_device_name(device) if device.type == "cuda"
               else f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads")
    command = "falign bench architectures" + "".join(
        f" --{k.replace('_', '-')} {v}" for k, v in (("models", args.models), ("rules", args.rules),
                                                    ("seeds", args.seeds), ("repeats", args.repeats),
                                                    ("timing_runs", args.timing_runs),
                                                    ("steps_scale", args.steps_scale))
        if str(v) != str(build_parser(argparse.ArgumentParser()).get_default(k)))
    section = markdown(rows, machine, args.repeats, time.perf_counter() - start, command)
    print(section)
    if args.docs:
        update_docs(Path(args.docs), section)
        print(f"\nupdated {args.docs}")
