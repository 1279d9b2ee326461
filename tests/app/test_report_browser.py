"""The HTML report in a real headless browser (slow; CI installs Debian's chromium-headless-shell before the slow
tests): it renders (a screenshot is taken), opens with the verdicts, its anchors land, and no raw TeX shows."""

from __future__ import annotations

import shutil
import subprocess

import pytest

from falign.app.experiments import reproduce
from tests.app.test_reproduce import _html_checks

BROWSERS = ("chromium-headless-shell", "chromium", "chromium-browser", "google-chrome")

pytestmark = pytest.mark.slow


def _browser() -> str:
    for name in BROWSERS:
        path = shutil.which(name)
        if path:
            return path
    pytest.skip(f"no headless browser here ({', '.join(BROWSERS)}); CI installs chromium-headless-shell")


def test_the_report_in_a_headless_browser(tmp_path):
    browser = _browser()
    results, paths = reproduce(tmp_path / "report", only=["conservation", "min_norm"], size="tiny", seeds=2,
                               progress=False)
    url = paths["html"].resolve().as_uri()
    flags = ["--no-sandbox", "--disable-gpu", "--hide-scrollbars"]
    shot = tmp_path / "report.png"
    subprocess.run([browser, *flags, f"--screenshot={shot}", "--window-size=1200,1600", url], check=True,
                   capture_output=True, timeout=120)
    assert shot.stat().st_size > 20_000  # a rendered page, not a blank one
    dom = subprocess.run([browser, *flags, "--dump-dom", url], check=True, capture_output=True, text=True,
                         timeout=120).stdout
    _html_checks(dom, [r.name for r in results])
    first_verdict, first_table = dom.index("Verdict:"), dom.index('id="conservation"')
    assert dom.index('id="summary"') < first_table and first_verdict > first_table
