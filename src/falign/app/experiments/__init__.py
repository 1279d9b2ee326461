"""The paper's experiments (Robertson & Koyejo, ICML 2024), one module each, and ``reproduce``.

Each module has ``NAME``, ``TITLE``, ``HYPOTHESIS``, ``units(ctx)`` (progress units), ``run(ctx)`` returning an
:class:`~falign.app.results.ExperimentResult`, and verdict functions that turn its numbers into verdicts
(supported / not supported / inconclusive, with the reason), tested on constructed inputs.
"""

from __future__ import annotations

import importlib
import platform
import time
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

from falign.app.experiments.base import Context, scale_check
from falign.app.results import ExperimentResult
from falign.errors import FalignError

ORDER = ("conservation", "implicit_alignment", "dominance", "multiclass", "benign_overfitting", "min_norm")
EXPERIMENTS: dict[str, ModuleType] = {name: importlib.import_module(f"falign.app.experiments.{name}") for name in ORDER}
# Seconds each experiment took at the quick size with 3 seeds (`falign reproduce`, Fashion-MNIST hidden, this
# project's 2-core CPU, 2026-12-04): the progress bar weighs each experiment's units by its cost per unit, so its
# estimate of the time left does not swing as cheap and costly experiments follow each other.
QUICK_SECONDS = {"conservation": 53, "implicit_alignment": 56, "dominance": 65, "multiclass": 162,
                 "benign_overfitting": 141, "min_norm": 63}


def unit_costs(quick_units: dict[str, int]) -> dict[str, float]:
    """Estimated seconds per progress unit of each experiment: its measured quick-size time over its units at the
    quick size with 3 seeds (``quick_units``)."""
    return {name: QUICK_SECONDS[name] / max(1, units) for name, units in quick_units.items()}


def reproduce(out: str | Path, *, only: Sequence[str] | None = None, size: str = "quick", seeds: int = 3,
              device: str = "cpu", progress: bool = True,
              data_dir: str | Path | None = None) -> tuple[list[ExperimentResult], dict[str, Path]]:
    """Run the experiments (all, or ``only``) into ``out`` and write the report; returns the results and
    the report's paths. Every dataset (``data_dir``) is found and checked before any training starts."""
    from falign.app.experiments.sources import catalog
    from falign.app.outdir import OutputDir
    from falign.app.report.report import write_report
    from falign.app.train.progress import progress_bar
    from falign.app.train.rundir import versions

    if only is not None and not list(only):
        raise FalignError("no experiment selected (only= is empty)")
    names = list(only) if only is not None else list(EXPERIMENTS)
    unknown = [n for n in names if n not in EXPERIMENTS]
    if unknown:
        raise FalignError(f"unknown experiment(s) {', '.join(unknown)}; choose from {', '.join(EXPERIMENTS)}")
    if seeds < 1:
        raise FalignError(f"--seeds must be at least 1, got {seeds}")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise FalignError(f"--device {device}: no CUDA device is available here (use --device cpu)")
    target = OutputDir(out, "report", "--out")
    target.check()
    data = catalog(data_dir)  # a malformed dataset fails here, before any training and before writing
    out = target.claim()
    start = time.perf_counter()
    probe = Context(out, size, seeds, device, catalog=data)
    quick = Context(out, "quick", 3, device, catalog=data)
    cost = unit_costs({n: EXPERIMENTS[n].units(quick) for n in names})
    total = sum(cost[n] * EXPERIMENTS[n].units(probe) for n in names)
    bar = progress_bar(total, "reproduce", progress, percent=True)
    results = []
    try:
        for name in names:
            torch.manual_seed(0)
            ctx = Context(out, size, seeds, device, tick=lambda n=1, c=cost[name]: bar.update(n * c), catalog=data)
            if hasattr(bar, "set_description"):
                bar.set_description(f"reproduce: {name}")
            result = EXPERIMENTS[name].run(ctx)
            result.scale_check = scale_check(ctx.scales)
            results.append(result)
    finally:
        bar.close()
    default_seeds = 5 if size == "full" else 3
    flags = {"quick": "", "full": " --full", "tiny": " --size tiny"}[size]
    flags += f" --seeds {seeds}" if seeds != default_seeds else ""
    flags += f" --data-dir {data_dir}" if data_dir is not None else ""
    meta: dict[str, Any] = {
        "command": f"falign reproduce{flags}" + (f" --only {','.join(names)}" if only else ""),
        "rerun": f"falign reproduce{flags}",
        "size": size, "seeds": seeds, "device": device,
        "datasets found": data.describe(),
        "wall time (s)": round(time.perf_counter() - start, 1),
        "machine": f"{platform.machine()}, {torch.get_num_threads()} threads",
        **{f"version {k}": v for k, v in versions().items()},
    }
    return results, write_report(results, out, meta, notes=data.notes)


__all__ = ["EXPERIMENTS", "Context", "ExperimentResult", "reproduce"]
