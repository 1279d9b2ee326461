"""The report of ``falign reproduce``: ``report.md``, ``report.html``, ``tables/*.csv``, ``figures/*.png``.

Every number in the report is rendered from the same rows as the CSVs (``format_value``), and every
verdict is computed by the experiment from its numbers.
"""

from __future__ import annotations

import csv
import html
import math
import os
import re
from collections.abc import Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from falign.app.results import (
    CONTROL,
    PRIMARY,
    SECONDARY,
    SUPPORTED,
    ExperimentResult,
    Table,
)

MAX_ROWS = 40


def format_value(value: Any) -> str:
    """How a table cell is written in the report (the CSV keeps full precision)."""
    if value is None:
        return "—"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return "—" if not math.isfinite(value) else f"{value:.4g}"
    return str(value)


def write_csv(table: Table, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(table.columns)
        for row in table.rows:
            writer.writerow([_csv_value(row.get(c)) for c in table.columns])
    return path


def _csv_value(value: Any) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return ""
    return repr(value) if isinstance(value, float) else str(value)


def _shown(table: Table) -> tuple[list[dict[str, Any]], str]:
    if len(table.rows) <= MAX_ROWS:
        return table.rows, ""
    return table.rows[:MAX_ROWS], f"first {MAX_ROWS} of {len(table.rows)} rows; all in tables/{table.name}.csv"


def markdown_table(columns: Sequence[str], rows: Sequence[dict[str, Any]]) -> str:
    def cell(text: str) -> str:
        return text.replace("|", "\\|")

    lines = ["| " + " | ".join(cell(c) for c in columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(format_value(r.get(c))) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def headline_rows(results: Sequence[ExperimentResult]) -> list[dict[str, Any]]:
    rows = []
    for r in results:
        secondary = [v for v in r.verdicts if v.role == SECONDARY]
        controls = [v for v in r.verdicts if v.control]
        others = []
        if secondary:
            others.append(f"secondary {sum(v.status == SUPPORTED for v in secondary)}/{len(secondary)} supported")
        if controls:
            others.append(f"controls failed as built {sum(v.as_expected for v in controls)}/{len(controls)}")
        rows.append({"experiment": r.name, "primary test": r.headline.get("metric", ""),
                     "value": r.headline.get("value", ""), "verdict": r.verdict.status,
                     "secondary; controls": "; ".join(others) or "—", "data": r.data or "—",
                     "seconds": round(r.seconds, 1)})
    return rows


HEADLINE_COLUMNS = ["experiment", "primary test", "value", "verdict", "secondary; controls", "data", "seconds"]

LEGEND = ("Each experiment declares one **primary** test before it runs, with the effect it predicts and the smallest "
          "effect that would matter; the experiment's verdict is that test's. *Supported*: the 95% interval excludes "
          "0 in the predicted direction. *Not supported*: the interval excludes the smallest effect of interest, or "
          "shows the opposite sign. *Inconclusive*: neither (the power the design had to detect the smallest effect "
          "is stated), or a precondition failed (a run did not converge, a task was at ceiling). **Secondary** tests "
          "are reported beside it and never change it. A **control** runs the primary test on a case where the "
          "mechanism is absent and must come out not supported; a control that passes turns a supported primary "
          "into inconclusive. Values that were equal on every seed are written \"all 3 seeds: x\", without an "
          "interval.")


def _ordered(r: ExperimentResult) -> list:
    order = {PRIMARY: 0, SECONDARY: 1, CONTROL: 2}
    return sorted(r.verdicts, key=lambda v: order[v.role])


def _kind(v) -> str:
    if not v.control:
        return v.role
    return "control" + (" (failed as built to)" if v.as_expected else " (did NOT fail as built to)")


def _verdict_lines(r: ExperimentResult) -> list[str]:
    head = r.verdict
    lines = [f"**Verdict: {head.status}** — {head.text}", ""]
    for v in _ordered(r):
        claim = f"{v.claim}: " if v.claim and not v.text.startswith(v.claim) else ""
        lines.append(f"- {_kind(v)} — **{v.status}**: {claim}{v.text}")
    return lines


def findings_markdown(results: Sequence[ExperimentResult]) -> str:
    """The summary the README carries (``findings.md``): the headline table and each experiment's primary
    verdict with its reason, exactly as this run computed them."""
    cols = ["experiment", "verdict", "primary test", "value", "secondary; controls", "data"]
    rows = headline_rows(results)
    lines = [markdown_table(cols, rows), ""]
    for r in results:
        lines.append(f"- **{r.name}** — {r.verdict.status}: {r.verdict.text}")
        broken = [v for v in r.verdicts if v.control and not v.as_expected]
        for v in broken:
            lines.append(f"  - control did not fail as built to: {v.claim or v.text}")
        if r.scale_check.startswith("SCALE RUNAWAY"):  # shown here only when it fires (report.md always has it)
            lines.append(f"  - {r.scale_check}")
    return "\n".join(lines) + "\n"


def _data_line(r: ExperimentResult) -> str:
    if not r.data:
        return ""
    return f"**Data.** This run used {r.data}; the paper used {r.paper_data}." if r.paper_data else \
        f"**Data.** {r.data}."


def write_report(results: Sequence[ExperimentResult], out: Path, meta: dict[str, Any],
                 notes: Sequence[str] = ()) -> dict[str, Path]:
    """Write the CSVs, ``report.md`` and ``report.html`` into ``out``; returns their paths. ``notes``: lines
    about the data (a dataset that was not found and what ran instead)."""
    out = Path(out)
    for r in results:
        for t in r.tables:
            write_csv(t, out / "tables" / f"{t.name}.csv")
    headline = Table("headline", HEADLINE_COLUMNS, headline_rows(results))
    write_csv(headline, out / "tables" / "headline.csv")
    md = _markdown(results, headline, out, meta, notes)
    (out / "report.md").write_text(md)
    (out / "report.html").write_text(_html(results, headline, out, meta, notes))
    (out / "findings.md").write_text(findings_markdown(results))
    return {"markdown": out / "report.md", "html": out / "report.html", "tables": out / "tables",
            "findings": out / "findings.md"}


def _rel(path: Path, out: Path) -> str:
    return os.path.relpath(path, out).replace(os.sep, "/")


def _setup_lines(r: ExperimentResult) -> list[str]:
    return [f"- {k}: {v}" for k, v in r.setup.items()]


def _markdown(results: Sequence[ExperimentResult], headline: Table, out: Path, meta: dict[str, Any],
              notes: Sequence[str] = ()) -> str:
    parts = ["# falign reproduce: Robertson & Koyejo (ICML 2024), *Implicit Regularization in Feedback Alignment "
             "Learning Mechanisms for Neural Networks*", ""]
    parts += [f"- {k}: {v}" for k, v in meta.items()]
    parts += ["", "## Summary", "", markdown_table(headline.columns, headline.rows), ""]
    parts += [LEGEND, ""]
    if notes:
        parts += ["## Data", "", *[f"- {n}" for n in notes], ""]
    for r in results:
        parts += [f"## {r.title} (`{r.name}`)", "", f"**Hypothesis.** {r.hypothesis}", ""]
        if r.data:
            parts += [_data_line(r), ""]
        parts += ["**Setup.**", ""]
        parts += _setup_lines(r)
        parts += ["", f"Rerun: `{meta.get('rerun', 'falign reproduce')} --only {r.name}`", ""]
        for fig in r.figures:
            parts += [f"![{fig.stem}]({_rel(fig, out)})", ""]
        for t in r.tables:
            rows, note = _shown(t)
            parts += [f"**Table `{t.name}`.** {t.caption} (CSV: `tables/{t.name}.csv`)", "",
                      markdown_table(t.columns, rows), ""]
            if note:
                parts += [f"*{note}*", ""]
        parts += _verdict_lines(r)
        if r.scale_check:
            parts += ["", f"*{r.scale_check}*"]
        parts.append("")
    return "\n".join(parts)


COLLAPSE_AFTER = 12  # tables longer than this are folded (<details>) in the HTML report


def tex_to_html(text: str) -> str:
    """Escape ``text`` for HTML and render the TeX-style indices it uses (``W_{l+1}``, ``x^{2}``, ``θ_0``) as
    sub- and superscripts, so that no raw TeX reaches the page."""
    out = html.escape(str(text))
    out = re.sub(r"_\{([^{}]*)\}", r"<sub>\1</sub>", out)
    out = re.sub(r"\^\{([^{}]*)\}", r"<sup>\1</sup>", out)
    out = re.sub(r"(?<=[A-Za-zα-ωΑ-Ω∇)])_([A-Za-z0-9α-ω])(?![A-Za-z0-9_])", r"<sub>\1</sub>", out)
    return out.replace("\\", "")


def _html(results: Sequence[ExperimentResult], headline: Table, out: Path, meta: dict[str, Any],
          notes: Sequence[str] = ()) -> str:
    """``report.html`` from its Jinja2 template: the verdicts first (a summary with the paper's claim beside
    each verdict, then per experiment its verdict before its evidence), a table of contents with anchors,
    long tables folded, controls that behaved as designed shown as such."""
    import jinja2
    from markupsafe import Markup

    env = jinja2.Environment(loader=jinja2.FileSystemLoader(Path(__file__).parent / "templates"),
                             autoescape=True, undefined=jinja2.StrictUndefined, keep_trailing_newline=True)
    env.filters["tex"] = lambda text: Markup(tex_to_html(text))
    env.filters["fmt"] = format_value
    env.filters["slug"] = lambda status: status.replace(" ", "-")
    views = [SimpleNamespace(name=r.name, title=r.title, hypothesis=r.hypothesis, verdict=r.verdict,
                             ordered=_ordered(r), scale_check=r.scale_check, data=r.data,
                             data_line=_data_line(r).replace("**", ""), setup=r.setup, tables=r.tables,
                             figure_paths=[{"src": _rel(f, out), "alt": f.stem} for f in r.figures])
             for r in results]
    summary = list(zip(views, headline.rows))
    return env.get_template("report.html.j2").render(
        results=views, summary=summary, legend=LEGEND.replace("**", "").replace("*", ""), notes=list(notes),
        meta=meta, rerun=meta.get("rerun", "falign reproduce"), max_rows=MAX_ROWS, collapse_after=COLLAPSE_AFTER)
