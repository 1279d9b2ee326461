"""`falign plot RUN [RUN ...]`: several runs in one figure, each figure naming its runs."""

from __future__ import annotations

import json

import pytest

from falign.app.cli import main
from falign.app.report.plots import plot_runs, run_label
from falign.app.train import TrainConfig, train
from falign.errors import FalignError


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    for rule, every in (("fa", 10), ("bp", 10), ("dfa", 0)):
        train(TrainConfig(rule=rule, epochs=2, hidden=(16,), diagnostics_every=every), root / rule, progress=False)
    return root


def test_two_runs_in_one_figure_and_each_run_its_own(runs, capsys):
    assert main(["plot", str(runs / "fa"), str(runs / "bp")]) == 0
    out = runs / "compare"
    printed = capsys.readouterr().out.split()
    assert str(out / "compare.png") == printed[0]
    assert (out / "compare.png").stat().st_size > 20_000
    for rule in ("fa", "bp"):
        assert {p.name for p in (out / rule).iterdir()} >= {"alignment.png", "scale.png"}
    # the same command again reuses its own folder
    assert main(["plot", str(runs / "fa"), str(runs / "bp")]) == 0


def test_labels_name_the_rule_model_and_data(runs):
    assert run_label(runs / "fa") == f"fa · mlp · digits — {runs / 'fa'}"
    config = json.loads((runs / "dfa" / "config.json").read_text())
    assert run_label(runs / "dfa").startswith(f"{config['rule']} · {config['model']} · {config['data']}")


def test_a_run_without_diagnostics_is_compared_on_loss_and_accuracy(runs, tmp_path):
    notes: list[str] = []
    paths = plot_runs([runs / "fa", runs / "dfa"], tmp_path / "cmp", warn=notes.append)
    assert paths[0].name == "compare.png"
    assert any("not every run has diagnostics" in n for n in notes)


def test_refusals(runs, tmp_path):
    with pytest.raises(FalignError, match="twice"):
        plot_runs([runs / "fa", runs / "fa"], tmp_path / "a")
    with pytest.raises(FalignError, match="not a folder"):
        plot_runs([runs / "fa", tmp_path / "missing"], tmp_path / "b")
    empty = tmp_path / "empty-run"
    empty.mkdir()
    (empty / "metrics.jsonl").write_text("")
    with pytest.raises(FalignError, match="no finished epoch"):
        plot_runs([runs / "fa", empty], tmp_path / "c")
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("my notes")
    with pytest.raises(FalignError, match="did not write"):
        plot_runs([runs / "fa", runs / "bp"], foreign)
    assert (foreign / "notes.txt").read_text() == "my notes"
