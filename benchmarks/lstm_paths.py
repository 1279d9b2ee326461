"""What each way of running a converted ``nn.LSTM``'s backward costs on this CPU, against plain ``nn.LSTM``.

One LSTM layer (T = 28 steps, batch 64, 28 inputs, 64 hidden: the row-LSTM of ``falign bench architectures``),
forward + backward of a fixed output gradient, round-robin in one process, median over ``--repeats`` steps, as a
multiple of plain PyTorch; ``--runs`` independent runs give the median and the range. Paths, all fa:

- ``falign``: the converted layer as it runs by default (one call of ``torch._VF.lstm``, what ``nn.LSTM`` runs:
  oneDNN's layer op as autograd's own node, the saved ``W_ih``, ``W_hh`` swapped for ``B``);
- ``falign layer loop``: falign's own loop over layers calling oneDNN's layer op under the same hooks (the path of
  packed input and the other cases one call cannot take; before 2026-12-06, the default);
- ``falign function``: the same ops inside falign's autograd Function (``falign.functional._FAST = False``: the
  path taken under torch.func, torch.compile, other saved-tensor hooks, kp);
- ``falign python``: the Python backward through time (``falign.nn.recurrent.USE_FUSED = False``, the reference);
- ``op alone``: ``aten::mkldnn_rnn_layer`` called directly under the same hooks, no module around it — the
  floor falign's own Python sits on.

Run:  python benchmarks/lstm_paths.py                 # 3 runs of 200 steps
      python benchmarks/lstm_paths.py --runs 5 --threads 1
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch
from torch import nn

import falign
import falign.functional as FF
from falign.nn import recurrent


def one_run(repeats: int) -> dict[str, float]:
    torch.manual_seed(0)
    steps, batch, inputs, hidden = 28, 64, 28, 64
    plain = nn.LSTM(inputs, hidden)
    converted = falign.convert(nn.Sequential(nn.LSTM(inputs, hidden)), "fa", seed=0)[0]
    x = torch.randn(steps, batch, inputs, requires_grad=True)
    g = torch.randn(steps, batch, hidden)
    weights = [p.detach().clone().requires_grad_() for p in plain.parameters()]
    feedback = [torch.randn_like(weights[0]), torch.randn_like(weights[1])]
    h0 = torch.zeros(batch, hidden)

    def op_alone() -> torch.Tensor:
        swaps = [FF._Swap(weights[0], feedback[0], None), FF._Swap(weights[1], feedback[1], None)]
        (out, *_), _ = FF._swap_saved_call(torch.ops.aten.mkldnn_rnn_layer, swaps, x, *weights, h0, h0, False, [],
                                           recurrent._LSTM_MODE, hidden, 1, True, False, False, True, detach=True)
        return out

    def flags(fast: bool, fused: bool):
        def call() -> torch.Tensor:
            FF._FAST, recurrent.USE_FUSED = fast, fused
            try:
                return converted(x)[0]
            finally:
                FF._FAST, recurrent.USE_FUSED = True, True
        return call

    def layer_loop() -> torch.Tensor:
        whole = recurrent._FARNNBase._whole_lstm
        recurrent._FARNNBase._whole_lstm = lambda self, i, h: None  # type: ignore[method-assign]
        try:
            return converted(x)[0]
        finally:
            recurrent._FARNNBase._whole_lstm = whole  # type: ignore[method-assign]

    paths = {"torch": lambda: plain(x)[0], "falign": flags(True, True), "falign layer loop": layer_loop,
             "falign function": flags(False, True), "falign python": flags(True, False), "op alone": op_alone}
    times: dict[str, list[float]] = {k: [] for k in paths}
    for i in range(repeats + 20):
        for name, path in paths.items():
            t0 = time.perf_counter()
            path().backward(g)
            elapsed = time.perf_counter() - t0
            x.grad = None
            if i >= 20:
                times[name].append(elapsed)
    base = statistics.median(times["torch"])
    return {k: statistics.median(v) / base for k, v in times.items()} | {"torch ms": base * 1e3}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=200)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if not recurrent.fused_lstm_available():
        raise SystemExit("this torch has no usable oneDNN LSTM layer ops: nothing to compare")
    runs = [one_run(args.repeats) for _ in range(args.runs)]
    print(f"`python benchmarks/lstm_paths.py --runs {args.runs} --repeats {args.repeats} --threads {args.threads}` "
          f"on {platform.machine()}, torch {torch.__version__}; plain nn.LSTM forward + backward "
          f"{statistics.median(r['torch ms'] for r in runs):.2f} ms (median of runs).\n")
    print("| path | × nn.LSTM, median of runs | range |")
    print("|---|---|---|")
    for name in ("falign", "falign layer loop", "falign function", "falign python", "op alone"):
        ratios = sorted(r[name] for r in runs)
        print(f"| {name} | {statistics.median(ratios):.3f} | {ratios[0]:.3f}–{ratios[-1]:.3f} |")


if __name__ == "__main__":
    main()
