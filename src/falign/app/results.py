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


PRIMARY, SECONDARY, CONTROL = "primary", "secondary", "control"
ROLES = (PRIMARY, SECONDARY, CONTROL)


@dataclass
class Verdict:
    """A conclusion computed from numbers: its status, the claim it judges, its role, and the reason quoting
    the numbers (the estimate, its interval, the smallest effect of interest and the design's power).

    ``status`` is ``supported`` (the interval excludes 0 in the predicted direction), ``not supported`` (the
    interval excludes the smallest effect of interest, or shows the opposite sign) or ``inconclusive`` (neither,
    or a precondition failed; the reason says which). ``role``: each experiment declares one ``primary`` test,
    whose verdict is the experiment's; ``secondary`` tests are reported beside it and never change it; a
    ``control`` applies the primary test to a case where the mechanism is absent (tanh for the conservation law,
    anti-aligned feedback for dominance, ...) and is expected to come out ``not supported``.
    """

    status: str
    text: str
    claim: str = ""
    control: bool = False
    role: str = ""

    def __post_init__(self) -> None:
        if self.status not in STATUSES:
            raise ValueError(f"verdict status must be one of {STATUSES}, got {self.status!r}")
        if not self.role:
            self.role = CONTROL if self.control else SECONDARY
        if self.role not in ROLES:
            raise ValueError(f"verdict role must be one of {ROLES}, got {self.role!r}")
        self.control = self.role == CONTROL

    @classmethod
    def of(cls, ok: bool, text: str, claim: str = "", control: bool = False, role: str = "") -> Verdict:
        """A pass/fail check (a consistency check, or a precondition): ``supported`` or ``not supported``."""
        return cls(SUPPORTED if ok else NOT_SUPPORTED, text, claim, control, role)

    @property
    def primary(self) -> bool:
        return self.role == PRIMARY

    @property
    def label(self) -> str:
        return self.status

    @property
    def as_expected(self) -> bool:
        """A claim is as expected when supported; a control when not supported."""
        return self.status == (NOT_SUPPORTED if self.control else SUPPORTED)


def combine(verdicts: Sequence[Verdict]) -> Verdict:
    """An experiment's headline verdict: its one primary test's.

    Secondary tests never change it. A control that did not fail the primary test as built to makes a
    *supported* primary *inconclusive* (the test could not have failed, so its pass says nothing).
    """
    primary = [v for v in verdicts if v.primary]
    if len(primary) != 1:
        return Verdict(INCONCLUSIVE, f"{len(primary)} primary tests declared (one is needed)", role=PRIMARY)
    head = primary[0]
    broken = [v for v in verdicts if v.control and not v.as_expected]
    if head.status == SUPPORTED and broken:
        names = "; ".join(v.claim or v.text for v in broken)
        return Verdict(INCONCLUSIVE, f"{head.text} — but a control did not fail as built to ({names}): the test "
                       f"cannot tell here", head.claim, role=PRIMARY)
    return head


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
    scale_check: str = ""

    @property
    def verdict(self) -> Verdict:
        return combine(self.verdicts)
