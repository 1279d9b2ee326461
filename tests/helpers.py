"""Small helpers shared by the tests."""

from __future__ import annotations

from pathlib import Path

from falign.app.cli import main
from falign.app.train import TrainConfig, Trainer


def cli(args: list[str], capsys) -> tuple[int, str]:
    code = main(args)
    captured = capsys.readouterr()
    return code, captured.out + captured.err


def quick_run(out: Path, **changes) -> dict:
    cfg = TrainConfig(hidden=(8,), epochs=1, **changes)
    return Trainer(cfg, out, progress=False).run()
