"""The live page in a real browser: headless Chromium (Debian's ``chromium``) loads a running
worker's page, runs its script, and shows the list the worker published for the user picked;
a screenshot goes to the report directory."""

from __future__ import annotations

import re
import shutil
import subprocess

import pytest

from tests.integration.conftest import Harness, CATALOG, items_of
from tests.integration.reliability import report_dir
from workers.stack import free_port

pytestmark = [pytest.mark.integration, pytest.mark.kafka, pytest.mark.slow]


def chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        found = shutil.which(name)
        if found:
            return found
    pytest.skip("no headless browser on PATH (Debian's package `chromium`; .ci/run installs it)")


def headless(binary: str, url: str, *args: str) -> subprocess.CompletedProcess:
    # virtual time lets the page's script fetch its data and draw before the dump or screenshot
    return subprocess.run([binary, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                           "--hide-scrollbars", "--virtual-time-budget=6000", *args, url],
                          capture_output=True, text=True, timeout=120)


def test_browser_shows_the_live_page_with_a_list_the_worker_published(stack, tmp_path):
    binary = chromium()
    port = free_port()
    h = Harness(stack, tmp_path, metrics_port=port)
    try:
        h.catalog(CATALOG)
        events = [h.click("live-ann", i, scene="home") for i in items_of("jazz")[:3]]
        events += [h.query("live-ann", "late night jazz piano", scene="home"),
                   h.click("live-ann", items_of("cooking")[0], scene="tv")]
        out = h.run(events)
        home, tv = out[events[3]["event_id"]], out[events[4]["event_id"]]
        url = f"http://127.0.0.1:{port}/?user=live-ann"
        dom = headless(binary, url, "--dump-dom")
        assert dom.returncode == 0, dom.stderr[-2000:]
        html = dom.stdout
        assert 'data-user="live-ann"' in html, html[-3000:]
        # the page shows both scenes' lists, item for item, in the order the worker published them
        for scene, msg in (("home", home), ("tv", tv)):
            block = re.search(rf'data-scene="{scene}".*?</table>', html, re.S)
            assert block, scene
            shown = re.findall(r'data-item="([^"]+)"', block.group(0))
            assert shown == [i["item_id"] for i in msg["items"]], scene
        assert "matches your search" in html and "late night jazz piano" in html  # a reason, the history
        assert re.search(r'<span style="width:110px">jazz</span>', html)  # the interest bars
        shot = report_dir() / "live-page.png"
        shot.parent.mkdir(parents=True, exist_ok=True)
        png = headless(binary, url, f"--screenshot={shot}", "--window-size=1400,1100")
        assert png.returncode == 0, png.stderr[-2000:]
        assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    finally:
        h.close()
