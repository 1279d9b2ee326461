"""How the step-time benchmarks time a variant: its second step in a row, in interleaved rounds."""

from __future__ import annotations

import torch

from falign.app.bench.speed import timed_rounds


def _steps(clock: list[float]):
    """Two fake variants on a fake clock: a step right after the other variant's costs 5× its own (the caches
    another model left behind), a step after its own costs its own."""
    last: list[str | None] = [None]

    def step(name: str, cost: float):
        def run() -> None:
            clock[0] += cost * (5 if last[0] != name else 1)
            last[0] = name
        return run

    return {"a": step("a", 1.0), "b": step("b", 2.0)}


def test_each_variant_is_timed_on_its_second_step_in_a_row():
    clock = [0.0]
    times = timed_rounds(_steps(clock), 4, torch.device("cpu"), clock=lambda: clock[0])
    assert times == {"a": [1.0] * 4, "b": [2.0] * 4}


def test_the_control_a_plain_round_robin_measures_the_neighbour_instead():
    clock = [0.0]
    steps = _steps(clock)
    times: dict[str, list[float]] = {k: [] for k in steps}
    for _ in range(4):
        for key, step in steps.items():
            t0 = clock[0]
            step()
            times[key].append(clock[0] - t0)
    assert times == {"a": [5.0] * 4, "b": [10.0] * 4}  # every step timed after the other variant's
