"""The README's commands and example stay true."""

from __future__ import annotations

import re
from pathlib import Path

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
