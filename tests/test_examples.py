"""Every script in examples/ runs (small sizes)."""

from __future__ import annotations

import runpy
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def _load(name: str) -> dict:
    return runpy.run_path(str(EXAMPLES / name), run_name="example")


def test_plain_loop_with_live_diagnostics(capsys):
    records = _load("plain_loop_diagnostics.py")["main"](steps=40, every=20)
    assert [r["step"] for r in records] == [0, 20, 40]
    assert set(records[-1]["gradient_alignment"]) == {"0", "2", "4"}
    assert "∠(update, gradient)" in capsys.readouterr().out


def test_lightning_module_with_the_falign_callback(tmp_path, capsys):
    pytest.importorskip("lightning.pytorch", reason="the test extra installs lightning")
    last = _load("lightning_callback.py")["main"](epochs=1, every=5, out=str(tmp_path / "pl"))
    assert last["step"] % 5 == 0 and set(last["gradient_alignment"]) == {"0", "2"}
    header = (tmp_path / "pl" / "metrics.csv").read_text().splitlines()[0]
    assert "falign/gradient_alignment/0" in header


def test_fa_vs_bp_one_figure(tmp_path):
    paths = _load("fa_vs_bp.py")["main"](epochs=2, out=str(tmp_path / "cmp"))
    assert paths[0].name == "compare.png" and paths[0].stat().st_size > 20_000


def test_every_example_is_tested():
    tested = {"plain_loop_diagnostics.py", "lightning_callback.py", "fa_vs_bp.py"}
    assert {p.name for p in EXAMPLES.glob("*.py")} == tested
