"""Result types shared by the experiments (which produce them) and the report (which renders them)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class Table:
    """A named table: ``rows`` are dicts with the keys in ``columns``."""

    name: str
    columns: list[str]
    rows: list[dict[str, Any]]
    caption: str = ""


@dataclass
class Verdict:
    """A conclusion computed from numbers: ``supported`` and a sentence that quotes them."""

    supported: bool
    text: str

    @property
    def label(self) -> str:
        return "supported" if self.supported else "not supported"


@dataclass
class ExperimentResult:
    name: str
    title: str
    hypothesis: str
    setup: dict[str, Any]
    tables: list[Table]
    figures: list[Path]
    verdicts: list[Verdict]
    headline: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0
