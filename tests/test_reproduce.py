"""`falign reproduce`: every experiment end to end at a tiny size, verdict logic, report vs CSVs."""

from __future__ import annotations

import csv
import math
import re

import pytest

from falign.experiments import (
    EXPERIMENTS,
    benign_overfitting,
    conservation,
    dominance,
    implicit_alignment,
    min_norm,
    multiclass,
    reproduce,
)
from falign.experiments.base import linear_fit, loglog_slope, spearman
from falign.report.report import format_value


@pytest.fixture(scope="module")
def tiny_report(tmp_path_factory):
    out = tmp_path_factory.mktemp("reproduce")
    results, paths = reproduce(out, size="tiny", seeds=2, progress=False)
    return out, results, paths


def test_every_experiment_runs_and_reports(tiny_report):
    out, results, paths = tiny_report
    assert [r.name for r in results] == list(EXPERIMENTS)
    md = paths["markdown"].read_text()
    html = paths["html"].read_text()
    for r in results:
        assert r.verdicts and all(v.text for v in r.verdicts)
        assert f"## {r.title} (`{r.name}`)" in md and r.name in html
        assert r.hypothesis in md
        for fig in r.figures:
            assert fig.is_file() and fig.stat().st_size > 5_000
            assert f"]({fig.relative_to(out).as_posix()})" in md
        for t in r.tables:
            assert (out / "tables" / f"{t.name}.csv").is_file()
        for v in r.verdicts:
            assert f"**{v.label}**: {v.text}" in md
    assert (out / "multiclass" / "runs").is_dir()  # ordinary run directories, rerunnable


def _markdown_tables(md: str) -> dict[str, list[list[str]]]:
    """Tables of the report keyed by the CSV they cite."""
    tables: dict[str, list[list[str]]] = {}
    blocks = re.findall(r"\(CSV: `tables/(\w+)\.csv`\)\n\n((?:\|.*\|\n)+)", md)
    for name, block in blocks:
        lines = [line for line in block.strip().splitlines() if not re.fullmatch(r"\|(---\|)+", line)]
        tables[name] = [[c.strip().replace("\\|", "|") for c in re.split(r"(?<!\\)\|", line)[1:-1]] for line in lines]
    return tables


def test_report_numbers_equal_the_csvs(tiny_report):
    out, results, paths = tiny_report
    md_tables = _markdown_tables(paths["markdown"].read_text())
    assert set(md_tables) == {t.name for r in results for t in r.tables}
    for name, rows in md_tables.items():
        with open(out / "tables" / f"{name}.csv") as f:
            csv_rows = list(csv.reader(f))
        assert rows[0] == csv_rows[0], name
        assert len(rows) - 1 == min(len(csv_rows) - 1, 40), name  # long tables show their first 40 rows
        for md_row, csv_row in zip(rows[1:], csv_rows[1:]):
            for md_cell, csv_cell in zip(md_row, csv_row):
                assert md_cell == _rendered(csv_cell), (name, md_cell, csv_cell)


def _rendered(csv_cell: str) -> str:
    """What the report must show for a CSV cell: floats at 4 significant digits, the rest as written."""
    words = {"": "—", "True": "yes", "False": "no"}
    if csv_cell in words:
        return words[csv_cell]
    if re.fullmatch(r"-?\d+", csv_cell):
        return csv_cell
    try:
        return format_value(float(csv_cell))
    except ValueError:
        return csv_cell


def test_statistics_helpers():
    assert loglog_slope([1, 2, 4], [3, 6, 12]) == pytest.approx(1.0)
    assert loglog_slope([1, 2, 4], [5, 5, 5]) == pytest.approx(0.0, abs=1e-12)
    assert math.isnan(loglog_slope([1, 2], [0, 1]))
    slope, intercept, r2 = linear_fit([0, 1, 2], [1, 3, 5])
    assert (slope, intercept, r2) == pytest.approx((2.0, 1.0, 1.0))
    rho, p = spearman([1, 2, 3, 4, 5, 6, 7, 8], [8, 7, 6, 5, 4, 3, 2, 1])
    assert rho == pytest.approx(-1.0) and p < 0.01
    rho, p = spearman([1, 2, 3, 4, 5, 6], [2, 1, 4, 3, 6, 5])
    assert 0 < rho < 1 and p > 0.05


def test_conservation_verdict_logic():
    good, bad = conservation.verdicts([1.0, 0.97], [0.02, -0.1]), conservation.verdicts([0.0, 1.0], [1.0])
    assert [v.supported for v in good] == [True, True]
    assert [v.supported for v in bad] == [False, False]
    assert "0.97–1.00" in good[0].text
    assert conservation.verdicts([1.0], [], (1.0, 200.0))[-1].supported
    assert not conservation.verdicts([1.0], [], (1.0, 2.0))[-1].supported


def test_implicit_alignment_verdict_logic():
    ok = implicit_alignment.verdicts([0.99, 1.01], {1.0: 80.0, 0.03: 40.0}, 1.0)
    assert [v.supported for v in ok] == [True, True]
    bad = implicit_alignment.verdicts([0.5], {1.0: 40.0, 0.03: 80.0}, 0.5)
    assert [v.supported for v in bad] == [False, False]


def test_dominance_verdict_logic():
    ok = dominance.verdicts({"fa": 1.0}, {"fa": (-1e-3, 0.99)})
    assert [v.supported for v in ok] == [True, True]
    bad = dominance.verdicts({"fa": 0.5}, {"fa": (1e-3, 0.2)})
    assert [v.supported for v in bad] == [False, False]


def test_multiclass_verdict_logic():
    assert multiclass.verdicts({"synthetic": (-0.6, 0.001)})[0].supported
    assert not multiclass.verdicts({"synthetic": (0.6, 0.001)})[0].supported
    assert not multiclass.verdicts({"synthetic": (-0.2, 0.4)})[0].supported
    assert not multiclass.verdicts({"synthetic": (math.nan, math.nan)})[0].supported


def test_benign_overfitting_verdict_logic():
    ok = {"noisy train acc": 0.99, "memorised flipped": 0.95, "final test acc": 0.80, "peak test acc": 0.82}
    drop = dict(ok, **{"final test acc": 0.70})
    underfit = dict(ok, **{"noisy train acc": 0.80})
    v = benign_overfitting.verdicts({"bp": ok, "fa": drop, "usf": underfit})
    assert [x.supported for x in v] == [True, False, False]


def test_min_norm_verdict_logic():
    assert min_norm.verdicts({"fa": 1.0, "bp": 0.99}, {"a": 1e-12})[0].supported
    assert not min_norm.verdicts({"fa": 0.0, "bp": 1.0}, {"a": 1e-12})[0].supported
    assert not min_norm.verdicts({"fa": 1.0, "bp": 1.0}, {"a": 1e-3})[0].supported


def test_cli_reproduce_only_and_errors(tmp_path, capsys):
    from falign.cli import main

    assert main(["reproduce", "--size", "tiny", "--only", "min_norm", "--out", str(tmp_path), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "min_norm" in out and "report:" in out and (tmp_path / "report.html").is_file()
    assert main(["reproduce", "--only", "nope", "--out", str(tmp_path), "--no-progress"]) == 1
    assert "unknown experiment(s) nope" in capsys.readouterr().err
