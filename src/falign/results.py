"""Result types shared by the experiments (which produce them) and the report (which renders them)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SUPPORTED, NOT_SUPPORTED, INCONCLUSIVE = "supported", "not supported", "inconclusive"
STATUSES = (SUPPORTED, NOT_SUPPORTED, INCONCLUSIVE)


@dataclass
class Table:
    """A named table: ``rows`` are dicts with the keys in ``columns``."""

    name: str
    columns: list[str]
    rows: list[dict[str, Any]]
    caption: str = ""


@dataclass
class Verdict:
    """A conclusion computed from numbers: its status, the sub-claim it judges, and the reason quoting them.

    ``status`` is ``supported``, ``not supported`` or ``inconclusive`` (a precondition of the test was not met;
    the reason says which). A *control* applies the same test to a case built to fail it (tanh for the
    conservation law, anti-aligned feedback for dominance, ...): it is expected to come out ``not supported``.
    """

    status: str
    text: str
    claim: str = ""
    control: bool = False

    def __post_init__(self) -> None:
        if self.status not in STATUSES:
            raise ValueError(f"verdict status must be one of {STATUSES}, got {self.status!r}")

    @classmethod
    def of(cls, ok: bool, text: str, claim: str = "", control: bool = False) -> Verdict:
        return cls(SUPPORTED if ok else NOT_SUPPORTED, text, claim, control)

    @property
    def label(self) -> str:
        return self.status

    @property
    def as_expected(self) -> bool:
        """A claim is as expected when supported; a control when not supported."""
        return self.status == (NOT_SUPPORTED if self.control else SUPPORTED)


def combine(verdicts: Sequence[Verdict]) -> Verdict:
    """An experiment's headline verdict from all its sub-verdicts.

    Supported when every claim is supported and every control fails as built to; not supported when a claim
    is not supported; inconclusive when a claim is inconclusive, or a control did not fail (then the test
    could not have failed either, and a pass says nothing).
    """
    claims = [v for v in verdicts if not v.control]
    controls = [v for v in verdicts if v.control]
    broken = [v for v in controls if v.status == SUPPORTED]
    if not claims:
        return Verdict(INCONCLUSIVE, "no claim was tested")
    if broken:
        names = "; ".join(v.claim or v.text for v in broken)
        return Verdict(INCONCLUSIVE, f"a negative control did not fail ({names}): the test cannot tell here")
    failed = [v for v in claims if v.status == NOT_SUPPORTED]
    if failed:
        return Verdict(NOT_SUPPORTED, "; ".join(v.claim or v.text for v in failed) + ": not supported")
    open_ = [v for v in (*claims, *controls) if v.status == INCONCLUSIVE]
    if open_:
        return Verdict(INCONCLUSIVE, "; ".join(v.claim or v.text for v in open_) + ": inconclusive")
    return Verdict(SUPPORTED, f"all {len(claims)} claims supported, {len(controls)} control(s) failed as built to")


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
    data: str = ""
    paper_data: str = ""

    @property
    def verdict(self) -> Verdict:
        return combine(self.verdicts)
