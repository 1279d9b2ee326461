"""Where and how big an experiment runs (:class:`Context`), and small helpers the experiments share."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from falign.app.experiments.sources import Catalog

SIZES = ("tiny", "quick", "full")


@dataclass
class Context:
    """Where and how big an experiment runs.

    ``size``: ``tiny`` (the test suite), ``quick`` (the default: minutes on a laptop CPU) or ``full``.
    ``seeds``: how many seeds every repeated measurement uses (at least 3 for intervals). ``catalog``: the
    datasets found on this machine (:func:`falign.app.experiments.sources.catalog`). ``tick`` advances the bar.
    """

    out: Path
    size: str = "quick"
    seeds: int = 3
    device: str = "cpu"
    tick: Callable[[int], None] = lambda n=1: None
    catalog: Catalog = field(default_factory=Catalog)
    scales: list[float] = field(default_factory=list)  # final logit scale of each classifier run (note_scale)

    def __post_init__(self) -> None:
        if self.size not in SIZES:
            raise ValueError(f"size must be one of {SIZES}, got {self.size!r}")
        self.out = Path(self.out)

    def pick(self, tiny: Any, quick: Any, full: Any) -> Any:
        return {"tiny": tiny, "quick": quick, "full": full}[self.size]

    @property
    def seed_list(self) -> list[int]:
        return list(range(self.seeds))

    @property
    def figures(self) -> Path:
        path = self.out / "figures"
        path.mkdir(parents=True, exist_ok=True)
        return path


@torch.no_grad()
def final_logit_scale(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor | None = None) -> float:
    """Median ``|z|`` of the model's outputs on up to 2,048 inputs ``x`` (``y``: the targets a direct rule with
    target projection needs) — the scale check of :mod:`falign.diagnostics.scale` at the end of a run."""
    import falign
    from falign.diagnostics.scale import logit_scale

    was = model.training
    model.eval()
    if y is not None and falign.uses_target(model):
        falign.set_target(model, y[:2048])
    out = model(x[:2048])
    model.train(was)
    return logit_scale(out)


def note_scale(ctx: Context, model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor | None = None) -> float:
    """Record a classifier run's final logit scale in ``ctx.scales`` (the reproduction's scale check)."""
    value = final_logit_scale(model, x, y)
    ctx.scales.append(value)
    return value


def scale_check(values: list[float]) -> str:
    """The reproduction's scale check over an experiment's classifier runs: one line for the report. A run whose
    final logit scale exceeds :data:`~falign.diagnostics.scale.FLAG_AT` (or is not finite) is a scale runaway:
    its accuracy rides on astronomical logits, and the line says so first, in capitals."""
    import math

    from falign.diagnostics.scale import FLAG_AT

    if not values:
        return ""
    bad = [v for v in values if not (math.isfinite(v) and v <= FLAG_AT)]
    largest = max(values, key=lambda v: v if math.isfinite(v) else math.inf)
    if bad:
        return (f"SCALE RUNAWAY: {len(bad)} of {len(values)} classifier runs end with a logit scale (median |z|) "
                f"above {FLAG_AT:g} (largest {largest:.3g}); their accuracies ride on logits at that scale")
    return (f"scale check: the final logit scale (median |z|) of all {len(values)} classifier runs is at most "
            f"{largest:.3g} (a runaway is flagged above {FLAG_AT:g})")


def float64_digits(n: int | None = None, seed: int = 0):
    """Digits as flat float64 ``(x, y)`` training tensors (first ``n`` examples), for flow experiments."""
    from falign.data import load_digits

    ds = load_digits(seed=seed)
    x, y = ds.x_train.flatten(1).to(torch.float64), ds.y_train
    return (x, y) if n is None else (x[:n], y[:n])
