"""Debian's chromium under Playwright, for the tests that drive the Studio's pages in a browser.

Playwright is imported only when a browser is launched: a module that also has tests without
one skips just its browser tests when the test extra is missing (``pytest.importorskip``).
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from helpers import REPO

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--headless",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]

needs_chromium = pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="needs Debian's chromium (scripts/test.sh installs it)")


@contextmanager
def chromium() -> Iterator[Any]:
    """A headless chromium (a Playwright ``Browser``), closed at the end."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            browser.close()


@contextmanager
def shots_on_failure(context: Any, shots: Path) -> Iterator[None]:
    """When a step fails, what each page of the Playwright ``context`` showed: shots/failure-<n>.png."""
    try:
        yield
    except BaseException:
        for number, page in enumerate(context.pages):
            page.screenshot(path=shots / f"failure-{number}.png")
        raise


def artifacts(name: str) -> Path:
    """test-artifacts/<name>/, emptied: where a browser test leaves its screenshots."""
    folder = REPO / "test-artifacts" / name
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    return folder
