"""`falign reproduce`: every experiment end to end at a tiny size, the report against its CSVs, and every verdict
function on constructed inputs that must pass and inputs that must fail."""

from __future__ import annotations

import csv
import math
import re

import numpy as np
import pytest
import torch

import falign
from falign.app.experiments import (
    EXPERIMENTS,
    dominance,
    min_norm,
    multiclass,
    reproduce,
)
from falign.app.experiments.runs import feedback_at_angle
from falign.app.experiments.stats import judge, loglog_slope, mean_ci, power, slope_ci, spearman, within_strata_slope
from falign.app.report.report import format_value
from falign.app.results import INCONCLUSIVE, NOT_SUPPORTED, SUPPORTED, Verdict, combine


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
        assert r.verdicts and all(v.text and v.status in (SUPPORTED, NOT_SUPPORTED, INCONCLUSIVE) for v in r.verdicts)
        assert f"## {r.title} (`{r.name}`)" in md and r.name in html
        assert r.hypothesis in md
        assert r.data and r.paper_data and f"the paper used {r.paper_data}" in md
        assert f"**Verdict: {r.verdict.status}**" in md
        for fig in r.figures:
            assert fig.is_file() and fig.stat().st_size > 5_000
            assert f"]({fig.relative_to(out).as_posix()})" in md
        for t in r.tables:
            assert (out / "tables" / f"{t.name}.csv").is_file()
        for v in r.verdicts:
            assert f"**{v.status}**" in md and v.text in md
        # every experiment that trains classifiers checks their final logit scale (min_norm: linear regression)
        assert (r.scale_check == "") == (r.name == "min_norm"), (r.name, r.scale_check)
        assert r.scale_check.startswith(("scale check:", "SCALE RUNAWAY:")) or not r.scale_check
        assert r.scale_check in md
    with open(out / "tables" / "headline.csv") as f:
        head = {row["experiment"]: row["verdict"] for row in csv.DictReader(f)}
    assert head == {r.name: r.verdict.status for r in results}  # the headline combines every sub-verdict


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
                # a float is shown at 4 significant digits; text (an interval, a number already formatted) as is
                assert md_cell in (_rendered(csv_cell), csv_cell), (name, md_cell, csv_cell)


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


# ---- the verdicts' algebra and statistics ----------------------------------------------------------------
def test_combine_takes_the_primary_and_a_passing_control_voids_it():
    ok, bad, open_ = (Verdict(SUPPORTED, "a", role="primary"), Verdict(NOT_SUPPORTED, "b", role="primary"),
                      Verdict(INCONCLUSIVE, "c", role="primary"))
    second_bad = Verdict(NOT_SUPPORTED, "s")  # secondary by default
    failed_control, passed_control = Verdict(NOT_SUPPORTED, "k", control=True), Verdict(SUPPORTED, "k", control=True)
    assert combine([ok, second_bad, second_bad, failed_control]).status == SUPPORTED  # secondaries never flip it
    assert combine([bad, failed_control]).status == NOT_SUPPORTED
    assert combine([open_, Verdict(SUPPORTED, "s")]).status == INCONCLUSIVE
    assert combine([ok, passed_control]).status == INCONCLUSIVE  # a control that passes: the test cannot tell
    assert combine([bad, passed_control]).status == NOT_SUPPORTED
    assert combine([failed_control, Verdict(SUPPORTED, "s")]).status == INCONCLUSIVE  # no primary declared
    assert combine([ok, ok]).status == INCONCLUSIVE  # two primaries: not one declared test
    with pytest.raises(ValueError):
        Verdict("maybe", "x")
    with pytest.raises(ValueError):
        Verdict(SUPPORTED, "x", role="tertiary")


@pytest.mark.parametrize(("values", "expected"), [
    ([3.0, 4.0, 5.0], SUPPORTED),  # interval excludes 0 in the predicted direction
    ([0.1, 0.2, 0.15], SUPPORTED),  # ... also when smaller than the smallest effect of interest (said so)
    ([-3.0, -4.0, -5.0], NOT_SUPPORTED),  # the opposite sign
    ([0.5, 0.6, 0.7, 0.55, 0.65, 0.6, 0.62, 0.58], SUPPORTED),
    ([-0.2, 0.1, 0.05, -0.1, 0.0, 0.1, -0.05, 0.08], NOT_SUPPORTED),  # excludes the smallest effect (2)
    ([-1.0, 0.0, 2.0], INCONCLUSIVE),  # contains 0 and 2: never "not supported"
    ([0.0, 5.0, -5.0], INCONCLUSIVE),
    ([1.0, 1.0, 1.0], SUPPORTED),  # no spread, beyond 0 in the predicted direction
    ([0.0, 0.0, 0.0], NOT_SUPPORTED),  # no spread, short of the smallest effect
    ([2.0], INCONCLUSIVE),  # no interval
])
def test_judge_three_values(values, expected):
    v = judge(mean_ci(values), "claim", "gap", min_effect=2.0)
    assert v.status == expected, v.text
    assert v.primary
    flipped = judge(mean_ci([-x for x in values]), "claim", "gap", min_effect=2.0, direction=-1)
    assert flipped.status == expected  # a predicted decrease is judged the same way
    if expected == INCONCLUSIVE and len(values) > 1:
        assert "power to detect 2" in v.text and "contains both 0 and 2" in v.text


def test_no_zero_width_intervals_and_power():
    same = mean_ci([1.0, 1.0, 1.0])
    assert same.identical and same.fmt(".0%") == "all 3 seeds: 100%" and "[" not in str(same)
    assert not same.excludes_zero
    wide, narrow = mean_ci([0.0, 2.0, 4.0]), mean_ci([1.9, 2.0, 2.1])
    assert power(narrow, 1.0) > 0.9 > power(wide, 1.0) and power(wide, 1.0) < power(wide, 10.0)
    big = mean_ci(list(np.linspace(-1, 1, 200)))
    assert 0.6 < power(big, 0.1) < 0.75  # se ≈ 0.041: 0.1 is 2.4 se away, 1.96 needed: Φ(0.47) ≈ 0.68
    assert math.isnan(power(same, 1.0))


def test_statistics():
    assert loglog_slope([1, 2, 4], [3, 6, 12]).value == pytest.approx(1.0)
    assert math.isnan(loglog_slope([1, 2], [0, 1]).value)
    est = slope_ci([0, 1, 2, 3, 4], [1, 3.1, 4.9, 7.2, 9])
    assert est.lo < 2 < est.hi and est.excludes_zero
    assert not slope_ci([0, 1, 2, 3, 4], [1, -1, 1, -1, 1]).excludes_zero
    m = mean_ci([0.9, 1.0, 1.1])
    assert m.value == pytest.approx(1.0) and m.lo < 1 < m.hi
    assert mean_ci([0.9, 1.0, 1.0], bounds=(0, 1)).hi == 1.0
    rho, p = spearman([1, 2, 3, 4, 5, 6, 7, 8], [8, 7, 6, 5, 4, 3, 2, 1])
    assert rho == pytest.approx(-1.0) and p < 0.01


def test_within_strata_slope_ignores_per_stratum_offsets():
    """The confound the stratified statistic removes: a per-n offset on accuracy and angle changes nothing."""
    rng = np.random.default_rng(0)
    strata = np.repeat([5, 20, 100], 12)
    angle = rng.normal(60, 5, len(strata))
    gap = 0.002 * angle + rng.normal(0, 0.004, len(strata))
    base = within_strata_slope(angle, gap, strata)
    offset = {5: (0.0, 0.0), 20: (15.0, 0.2), 100: (-30.0, 0.5)}
    shifted = within_strata_slope(angle + np.array([offset[s][0] for s in strata]),
                                  gap + np.array([offset[s][1] for s in strata]), strata)
    assert shifted.value == pytest.approx(base.value) and shifted.lo == pytest.approx(base.lo)
    assert base.lo > 0
    # the pooled relation of offsets alone (angle and gap both move with n, nothing within n) gives no slope
    pooled_only = within_strata_slope(np.array([offset[s][0] for s in strata]) + rng.normal(0, 5, len(strata)),
                                      np.array([offset[s][1] for s in strata]) + rng.normal(0, 0.004, len(strata)),
                                      strata)
    assert not pooled_only.excludes_zero


# ---- multiclass: its verdicts are tested in tests/app/test_reproduce_mc.py ----------------------------------
@pytest.mark.parametrize("theta", [0.0, 30.0, 75.0, 90.0, 180.0])
def test_feedback_at_angle_is_exact(theta):
    torch.manual_seed(0)
    model = falign.convert(torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3)),
                           "fa", seed=0, example_input=torch.randn(2, 6))
    layer = model[2]
    norm = float(layer.feedback_weight.norm())
    b = feedback_at_angle(layer, theta, torch.Generator().manual_seed(1))
    w = layer.weight.detach().double().flatten()
    cos = float(b.double().flatten() @ w / (b.double().norm() * w.norm()))
    assert math.degrees(math.acos(max(-1.0, min(1.0, cos)))) == pytest.approx(theta, abs=1e-3)
    assert float(b.norm()) == pytest.approx(norm, rel=1e-5)
    assert b is layer.feedback_weight


# ---- dominance, min_norm (their tests: tests/app/test_reproduce_dm.py) ------------------------------------------
def test_dominance_and_min_norm_declare_one_primary_and_a_control(tiny_report):
    _, results, _ = tiny_report
    for name in (dominance.NAME, min_norm.NAME):
        roles = [v.role for v in next(r for r in results if r.name == name).verdicts]
        assert roles.count("primary") == 1 and roles.count("control") == 1


# ---- conservation, implicit alignment, min-norm ----------------------------------------------------------


def test_cli_reproduce_only_and_errors(tmp_path, capsys):
    from falign.app.cli import main

    assert main(["reproduce", "--size", "tiny", "--only", "min_norm", "--out", str(tmp_path), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "min_norm" in out and "report:" in out and (tmp_path / "report.html").is_file()
    assert main(["reproduce", "--only", "nope", "--out", str(tmp_path), "--no-progress"]) == 1
    assert "unknown experiment(s) nope" in capsys.readouterr().err
    if not torch.cuda.is_available():  # asked for a device it cannot have: an error, not a silent CPU run
        assert main(["reproduce", "--device", "cuda", "--out", str(tmp_path / "c"), "--no-progress"]) == 1
        assert "no CUDA device" in capsys.readouterr().err and not (tmp_path / "c").exists()


def test_training_runs_use_the_contexts_device(monkeypatch):
    """multiclass and benign_overfitting pass ctx.device to every run (checked on the CPU by recording it)."""
    from falign.app.experiments import runs

    seen = []
    original = runs.MLPRun.run

    def spy(self):
        seen.append(self.device)
        return original(self)

    monkeypatch.setattr(runs.MLPRun, "run", spy)
    data = multiclass.many_class_subset(3, per_class_train=5, per_class_test=2, seed=0)
    ctx = multiclass.Context("/tmp/unused", "tiny", 1, device="cpu:0")  # not the default "cpu"
    multiclass._one(ctx, data, "fa", 0, {"hidden": (8,), "steps": 3})
    assert seen == ["cpu:0"]


def _html_checks(html: str, names: list[str]) -> None:
    from html.parser import HTMLParser

    ids, hrefs = [], []

    class Collect(HTMLParser):
        def handle_starttag(self, tag, attrs):
            a = dict(attrs)
            if "id" in a:
                ids.append(a["id"])
            if tag == "a" and a.get("href", "").startswith("#"):
                hrefs.append(a["href"][1:])

    Collect().feed(html)
    assert len(ids) == len(set(ids)) and set(hrefs) <= set(ids)  # every anchor link lands
    for name in names:
        assert name in ids
        section = html[html.index(f'id="{name}"'):]
        section = section[:section.index("</section>")]
        assert section.index("Verdict:") < section.index("The evidence")  # the verdict first
        assert "<table" not in section[:section.index("The evidence")]
    assert "_{" not in html and "^{" not in html  # no raw TeX


def test_the_html_report_opens_with_the_verdicts(tiny_report):
    _, results, paths = tiny_report
    html = paths["html"].read_text()
    _html_checks(html, [r.name for r in results])
    assert html.index('id="summary"') < html.index(f'id="{results[0].name}"')
    assert "the paper's claim" in html
    for r in results:  # a control that failed as built to is shown as such, not as a red "not supported"
        for v in r.verdicts:
            if v.control and v.as_expected:
                assert "control-ok" in html


def test_html_report_folds_long_tables_and_flags_a_broken_control(tmp_path):
    """Constructed results: a 30-row table is folded, a 5-row one is not; a control that did NOT fail as built to is
    shown in red (the negative case of the check above); indices render as sub/superscripts."""
    from falign.app.report.report import write_report
    from falign.app.results import ExperimentResult, Table, Verdict

    long = Table("long", ["seed", "‖W_{l+1}‖"], [{"seed": i, "‖W_{l+1}‖": i / 3} for i in range(30)], "per seed")
    short = Table("short", ["x"], [{"x": 1}], "one row")
    verdicts = [Verdict(SUPPORTED, "slope 1.0 [0.9, 1.1]", "law", role="primary"),
                Verdict(SUPPORTED, "tanh drifts too", "control: tanh", control=True)]
    result = ExperimentResult("demo", "A demo", "Q_k is conserved under W_{l+1}", {"η": "0.1"}, [long, short], [],
                              verdicts, headline={"metric": "slope", "value": 1.0})
    paths = write_report([result], tmp_path, {"rerun": "falign reproduce"})
    html = paths["html"].read_text()
    _html_checks(html, ["demo"])
    assert html.count("<details>") == 1 and "30 rows" in html
    assert "control-broken" in html and "did NOT fail as built to" in html
    assert "W<sub>l+1</sub>" in html
    assert result.verdict.status == INCONCLUSIVE  # the broken control voids the supported primary
