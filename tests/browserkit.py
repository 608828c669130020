"""A real headless browser for the console and app-shell tests.

Debian's Chromium (`/usr/bin/chromium`, installed by the Makefile from the distribution's
packages) driven by Playwright's asyncio API, so the host under test can share the test's
event loop. Nothing is downloaded at run time: Playwright is pointed at the system browser
(`executable_path`) and `playwright install` is never run.
"""
from __future__ import annotations

import os
import shutil
from contextlib import asynccontextmanager
from pathlib import Path
from typing import AsyncIterator

from playwright.async_api import Browser, async_playwright

CHROMIUM = os.environ.get("TENANTFLEET_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
# The README's screenshots of the console pages are written here by the test run.
SCREENSHOTS = Path(__file__).resolve().parent.parent / "docs" / "screenshots"


@asynccontextmanager
async def chromium() -> AsyncIterator[Browser]:
    """Launch the system Chromium headless; fails loudly (not a skip) when it is missing."""
    if not Path(CHROMIUM).exists():
        raise RuntimeError(f"{CHROMIUM} not found: `make install` installs Debian's chromium "
                           "(as root: apt-get install -y chromium chromium-driver)")
    async with async_playwright() as pw:
        browser = await pw.chromium.launch(
            executable_path=CHROMIUM, headless=True,
            args=["--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"])
        try:
            yield browser
        finally:
            await browser.close()
