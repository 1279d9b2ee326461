"""Paste a run's ``findings.md`` into the README, between its two findings markers, so the README's summary is
what ``falign reproduce`` printed and never written by hand::

    python -m falign.app.report.readme runs/reproduce/findings.md README.md [--block nofmnist]
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path


def markers(block: str) -> tuple[str, str]:
    return f"<!-- findings:{block} -->", f"<!-- /findings:{block} -->"


def paste(readme: str, findings: str, block: str) -> str:
    """``readme`` with the text between ``<!-- findings:BLOCK -->`` and ``<!-- /findings:BLOCK -->`` replaced by
    ``findings``; a ``ValueError`` when the markers are missing."""
    start, end = markers(block)
    pattern = re.compile(re.escape(start) + r"\n.*?" + re.escape(end), re.S)
    if not pattern.search(readme):
        raise ValueError(f"the README has no {start} … {end} block")
    return pattern.sub(lambda _: f"{start}\n{findings.rstrip()}\n{end}", readme, count=1)


def block_text(readme: str, block: str) -> str:
    start, end = markers(block)
    match = re.search(re.escape(start) + r"\n(.*?)" + re.escape(end), readme, re.S)
    if match is None:
        raise ValueError(f"the README has no {start} … {end} block")
    return match.group(1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("findings", type=Path)
    parser.add_argument("readme", type=Path)
    parser.add_argument("--block", default="nofmnist", help="which block (nofmnist, fmnist)")
    args = parser.parse_args(argv)
    args.readme.write_text(paste(args.readme.read_text(), args.findings.read_text(), args.block))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
