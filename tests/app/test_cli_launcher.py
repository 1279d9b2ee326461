"""`falign --help` and `falign --version` answer without importing torch (the package imports it: seconds);
every command still reaches falign.app.cli."""

from __future__ import annotations

import os
import subprocess
import sys

import falign_cli

PROBE = ("import sys, falign_cli\n"
         "try:\n    falign_cli.main({args!r})\nexcept SystemExit:\n    pass\n"
         "print('TORCH-IMPORTED' if 'torch' in sys.modules else 'TORCH-NOT-IMPORTED')\n")


def _run(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", PROBE.format(args=args)], capture_output=True, text=True,
                          env={**os.environ, "PYTHONWARNINGS": "ignore"})


def test_help_and_version_do_not_import_torch():
    for args in (["--help"], ["--version"], []):
        result = _run(args)
        assert result.stdout.strip().endswith("TORCH-NOT-IMPORTED"), (args, result.stdout, result.stderr)
    assert "falign " in _run(["--version"]).stdout
    listed = _run(["--help"]).stdout
    for command, text in falign_cli.COMMANDS.items():
        assert command in listed and text in listed


def test_a_command_goes_on_to_the_full_cli():
    """The control: a command does import torch (it runs falign.app.cli)."""
    result = _run(["rules"])
    assert "fa " in result.stdout and result.stdout.strip().endswith("TORCH-IMPORTED")


def test_the_full_parser_lists_the_same_commands_and_version():
    from falign.app.cli import build_parser

    parser = build_parser()
    text = parser.format_help()
    for command, help_text in falign_cli.COMMANDS.items():
        assert command in text and help_text in text
    result = subprocess.run([sys.executable, "-m", "falign", "--version"], capture_output=True, text=True,
                            env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert result.returncode == 0 and result.stdout.strip() == f"falign {falign_cli.version()}"


def test_progress_off_a_terminal_is_ten_plain_lines(capsys):
    """pytest's captured stderr is not a terminal: no tqdm frames, one line per 10% (resumed bars count on)."""
    from falign.app.train.progress import progress_bar

    bar = progress_bar(1000, "demo")
    for _ in range(1000):
        bar.update(1)
    bar.close()
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 10 and lines[-1].startswith("demo: 1000/1000")
    resumed = progress_bar(100, "again", initial=55)
    for _ in range(45):
        resumed.update(1)
    assert len(capsys.readouterr().err.strip().splitlines()) == 5  # 60%, 70%, 80%, 90%, 100%


def test_reproduce_progress_is_weighted_by_measured_cost():
    """At the quick size the bar's total is the measured seconds; a costly experiment's unit weighs more."""
    from falign.app.experiments import QUICK_SECONDS, unit_costs

    units = {"conservation": 30, "multiclass": 200}
    cost = unit_costs(units)
    assert sum(cost[n] * units[n] for n in units) == QUICK_SECONDS["conservation"] + QUICK_SECONDS["multiclass"]
    assert set(QUICK_SECONDS) == set(__import__("falign.app.experiments", fromlist=["ORDER"]).ORDER)
