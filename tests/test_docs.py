"""The documentation stays true: every Python block in README.md and docs/ runs, every `falign ...` command
in their shell blocks is accepted by the real parser, and the README's quickstart runs as written."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [*sorted((ROOT / "docs").rglob("*.md")), ROOT / "README.md"]


def blocks(page: Path, lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", page.read_text(), flags=re.S)


def commands(page: Path) -> list[str]:
    """The `falign ...` commands of a page's bash blocks (one per `&&`-separated part, comments dropped)."""
    found = []
    for block in blocks(page, "bash"):
        for line in block.splitlines():
            for part in line.split("#", 1)[0].split("&&"):
                part = part.strip()
                if part.startswith("falign "):
                    found.append(part)
    return found


@pytest.mark.parametrize("page", [p for p in PAGES if blocks(p, "python")], ids=lambda p: str(p.relative_to(ROOT)))
def test_every_python_block_runs(page):
    namespace: dict = {}
    with warnings.catch_warnings():  # Lightning's own notes (workers, loggers, its deprecations) are not ours
        warnings.filterwarnings("ignore", module=r"(lightning|lightning_fabric|typing_extensions)(\..*)?$")
        for block in blocks(page, "python"):  # a page's blocks run in order, sharing their names
            exec(compile(block, str(page), "exec"), namespace)


@pytest.mark.parametrize("page", [p for p in PAGES if commands(p)], ids=lambda p: str(p.relative_to(ROOT)))
def test_every_command_is_accepted_by_the_parser(page):
    from falign.app.cli import build_parser

    for command in commands(page):
        argv = shlex.split(command)[1:]
        try:
            args = build_parser().parse_args(argv)
        except SystemExit as exit_:  # --help prints and exits 0; a wrong option exits 2
            assert exit_.code == 0, f"{page.name}: `{command}` is refused by falign's parser"
            continue
        assert getattr(args, "func", None) is not None, f"{page.name}: `{command}` names no command"


def test_the_parser_check_can_fail():
    """The control: a command with an option falign does not have is refused."""
    from falign.app.cli import build_parser

    with pytest.raises(SystemExit) as exit_:
        build_parser().parse_args(["train", "--no-such-option"])
    assert exit_.value.code == 2


def test_the_readme_quickstart_runs_as_written(tmp_path):
    (quickstart,) = [b for b in blocks(ROOT / "README.md", "bash") if b.startswith("falign train --rule fa")]
    for line in quickstart.strip().splitlines():
        argv = shlex.split(line.split("#", 1)[0])
        result = subprocess.run([sys.executable, "-m", "falign", *argv[1:], *(["--no-progress"] if argv[1] == "train"
                                                                              else [])],
                                cwd=tmp_path, capture_output=True, text=True)
        assert result.returncode == 0, (line, result.stderr[-2000:])
    assert (tmp_path / "runs" / "compare" / "compare.png").stat().st_size > 20_000
    assert (tmp_path / "runs" / "compare" / "fa" / "alignment.png").is_file()
