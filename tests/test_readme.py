"""The README's commands and example stay true."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def code_blocks(lang: str) -> list[str]:
    text = (ROOT / "README.md").read_text()
    return re.findall(rf"```{lang}\n(.*?)```", text, flags=re.S)


def test_readme_opens_with_the_two_commands_and_ci_runs_the_test_command():
    main_cmd, test_cmd = (b.strip() for b in code_blocks("bash")[:2])
    assert main_cmd.startswith("python3 -m venv .venv") and "torch==2.13.0" in main_cmd
    assert test_cmd.startswith("python3 -m venv .venv") and test_cmd.endswith("pytest")
    assert "torch==2.13.0" in test_cmd
    assert test_cmd in (ROOT / ".ci" / "run").read_text()
    text = (ROOT / "README.md").read_text()
    assert text.index(main_cmd) < text.index(test_cmd) < text.index("## ")


def test_readme_python_example_runs():
    (example,) = code_blocks("python")[:1]
    exec(compile(example, "README.md", "exec"), {})


def test_readme_findings_are_a_pasted_findings_md():
    """The README's summary of `falign reproduce` is findings.md of a run, pasted by falign.app.report.readme:
    a table with one row per experiment and one primary-verdict line per experiment, consistent with it."""
    from falign.app.experiments import EXPERIMENTS
    from falign.app.report.readme import block_text
    from falign.app.results import STATUSES

    text = (ROOT / "README.md").read_text()
    for block in ("nofmnist", "fmnist"):
        found = block_text(text, block)
        rows = [line for line in found.splitlines() if line.startswith("| ") and not line.startswith("| experiment")]
        table = {cells[0]: cells[1] for cells in ([c.strip() for c in r.strip("|").split(" | ")] for r in rows)}
        lines = dict(re.findall(r"^- \*\*(\w+)\*\* — ([a-z ]+):", found, flags=re.M))
        assert list(table) == list(EXPERIMENTS) == list(lines), block
        assert table == lines and set(table.values()) <= set(STATUSES), block


def test_paste_findings_replaces_only_its_block():
    from falign.app.report.readme import paste

    readme = "a\n<!-- findings:x -->\nold\n<!-- /findings:x -->\nb\n<!-- findings:y -->\nkeep\n<!-- /findings:y -->\n"
    new = paste(readme, "new table\n", "x")
    assert new == readme.replace("old", "new table")
    with pytest.raises(ValueError, match="findings:x"):
        paste("no markers", "t", "x")
