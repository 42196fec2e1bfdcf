"""Drives the live web view in headless Chromium for tests/test_web.py, in its own process:
Playwright's synchronous API runs an asyncio loop, which the test process (where trio-asyncio
owns asyncio's loop policy) cannot host.

    python -m tests.browser_check URL SCREENSHOT PROFILE_DIR MIN_LIVE

Waits until the page shows live numbers (>= MIN_LIVE clients LIVE, a non-zero ingest rate, a
replay in progress), waits for later samples, takes the screenshot, and prints what it saw as
JSON on stdout. Exits non-zero (with the page's text) if the page never gets there.
"""

from __future__ import annotations

import json
import re
import sys
from typing import Any

from playwright.sync_api import Error as PlaywrightError
from playwright.sync_api import sync_playwright

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]

CELL = """([table, label, col]) => {
    const rows = [...document.querySelectorAll('#' + table + ' tbody tr')];
    const r = rows.find(r => r.cells[0].textContent.trim() === label);
    return r ? r.cells[col].textContent : '';
}"""

LIVE_NUMBERS = """(minLive) => {
    const live = document.querySelector('[data-state=LIVE]');
    const rows = [...document.querySelectorAll('#stages tbody tr')];
    const ing = rows.find(r => r.cells[0].textContent === 'events ingested');
    const rate = ing ? parseFloat(ing.cells[1].textContent.replace(/,/g, '')) : 0;
    return live && parseInt(live.textContent) >= minLive && rate > 0
        && parseInt(document.getElementById('nrep').textContent) >= 1;
}"""


def num(text: str) -> float:
    t = re.sub(r"[^0-9.\\-]", "", text or "")
    try:
        return float(t)
    except ValueError:
        return 0.0


def main(url: str, screenshot: str, profile: str, min_live: int) -> int:
    with sync_playwright() as p:
        ctx = p.chromium.launch_persistent_context(
            profile,
            executable_path=CHROMIUM,
            headless=True,
            args=CHROMIUM_ARGS,
            viewport={"width": 1400, "height": 900},
        )
        try:
            page = ctx.new_page()
            page.goto(url, timeout=60_000)
            try:
                page.wait_for_function(LIVE_NUMBERS, arg=min_live, timeout=90_000)
            except PlaywrightError as e:
                print(
                    f"the page never showed live numbers: {e}\n{page.inner_text('body')}",
                    file=sys.stderr,
                )
                page.screenshot(path=screenshot, full_page=True)
                return 1

            def cell(table: str, label: str, col: int) -> str:
                return str(page.evaluate(CELL, [table, label, col]))

            seen: dict[str, Any] = {
                "sample1": int(page.inner_text("#sample")),
                "ingested1": num(cell("stages", "events ingested", 2)),
                "ingest_rate1": num(cell("stages", "events ingested", 1)),
                "live1": int(page.inner_text("[data-state=LIVE]")),
            }
            # Later samples, still with events flowing; the screenshot right then.
            page.wait_for_function(
                f"(minLive) => parseInt(document.getElementById('sample').textContent) > {seen['sample1'] + 2}"
                " && (" + LIVE_NUMBERS + ")(minLive)",
                arg=min_live,
                timeout=60_000,
            )
            page.screenshot(path=screenshot, full_page=True)
            seen.update(
                sample2=int(page.inner_text("#sample")),
                ingest_rate2=num(cell("stages", "events ingested", 1)),
                ingested2=num(cell("stages", "events ingested", 2)),
                delivered2=num(cell("stages", "delivered to streams", 2)),
                replays=page.inner_text("#replays"),
                nrep=int(page.inner_text("#nrep")),
                problems=page.inner_text("#problems"),
                lags=page.inner_text("#lags"),
                updated=page.inner_text("#updated"),
            )
            print(json.dumps(seen))
            return 0
        finally:
            ctx.close()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])))
