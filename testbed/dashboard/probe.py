"""Drives the dashboard page in a real headless Chromium (Selenium, the system's chromium-driver) and reads
what it shows: the browser test and `benchmarks/bench_dashboard.py` share this. Needs the `dev` extra.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

CHROMIUM_FLAGS = (
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-default-apps",
    "--disable-extensions",
    "--disable-dev-shm-usage",
    "--window-size=1400,1500",
)
# The page's own state, read in one script call (cheap enough to poll a few times a second).
READ_PAGE = """
const rows = {};
for (const tr of document.querySelectorAll('#clusters tbody tr')) {
  const link = tr.querySelector('td.link');
  rows[tr.dataset.cluster] = {state: link.dataset.state, seq: link.dataset.seq};
}
const sats = {};
for (const c of document.querySelectorAll('#sats circle')) {
  sats[c.dataset.sat] = [c.getAttribute('cx'), c.getAttribute('cy')];
}
return {
  wall: Date.now() / 1000, rows: rows, sats: sats,
  commits: document.getElementById('commits').textContent,
  clock: document.getElementById('clock-now').textContent,
  serving: document.querySelectorAll('#links line').length,
  events: document.querySelectorAll('#events li').length,
  rendered: window.emsfl ? window.emsfl.rendered : {},
  firstRenderMs: window.emsfl ? window.emsfl.firstRenderMs : null,
};
"""


def find_chromium() -> tuple[str, str] | None:
    """(browser, driver) paths of the system's Chromium, or None where it is not installed."""
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    return (browser, driver) if browser and driver else None


def new_driver(profile_dir: Path | None = None) -> Any:
    """A headless Chromium with a fresh profile, browser console and network (performance) logs on."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    found = find_chromium()
    if found is None:
        raise RuntimeError("no chromium/chromedriver on PATH (apt-get install chromium chromium-driver)")
    browser, driver = found
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    profile = profile_dir or Path(tempfile.mkdtemp(prefix="emsfl-chromium-"))
    options.add_argument(f"--user-data-dir={profile}")
    options.set_capability("goog:loggingPrefs", {"browser": "ALL", "performance": "ALL"})
    return webdriver.Chrome(service=Service(executable_path=driver), options=options)


@dataclass
class PageSamples:
    """What the page showed over time (polled), and its own render records."""

    samples: list[dict[str, Any]] = field(default_factory=list)
    rendered: dict[str, dict[str, Any]] = field(default_factory=dict)  # "cluster:seq" -> {wall, state}
    first_render_ms: float | None = None


class PagePoller(threading.Thread):
    """Reads the page every `every_s` seconds until stopped (one WebDriver session: one thread uses it)."""

    def __init__(self, driver: Any, every_s: float = 0.5) -> None:
        super().__init__(daemon=True)
        self.driver, self.every_s = driver, every_s
        self.result = PageSamples()
        self._stop_event = threading.Event()
        self.lock = threading.Lock()

    def run(self) -> None:
        while not self._stop_event.wait(self.every_s):
            self.read_once()

    def read_once(self) -> dict[str, Any]:
        with self.lock:
            page = self.driver.execute_script(READ_PAGE)
        self.result.samples.append({k: v for k, v in page.items() if k != "rendered"})
        self.result.rendered.update(page["rendered"])
        if page["firstRenderMs"] is not None:
            self.result.first_render_ms = page["firstRenderMs"]
        return dict(page)

    def stop(self) -> PageSamples:
        self._stop_event.set()
        if self.ident is not None:  # polled by its own thread (else by the caller's read_once)
            self.join(10)
        self.read_once()
        return self.result


def wait_for(driver: Any, script: str, timeout_s: float, what: str) -> Any:
    """Poll a JavaScript expression until it is truthy."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = driver.execute_script(f"return {script};")
        if value:
            return value
        time.sleep(0.2)
    raise TimeoutError(f"page never showed {what} within {timeout_s:.0f} s")


def console_errors(driver: Any) -> list[dict[str, Any]]:
    """Browser console entries at level SEVERE (errors, failed loads, CSP violations)."""
    return [e for e in driver.get_log("browser") if e.get("level") == "SEVERE"]


BROWSER_UI_SCHEMES = ("chrome", "chrome-untrusted", "devtools")


def requested_urls(driver: Any) -> list[str]:
    """Every URL a web page asked the network for (Chromium's performance log: Network.requestWillBeSent).

    Requests of the browser's own UI documents (its new-tab page, loading while the test opens ours) are left out:
    they are Chromium's, not a page's."""
    urls = []
    for entry in driver.get_log("performance"):
        message = json.loads(entry["message"])["message"]
        if message.get("method") != "Network.requestWillBeSent":
            continue
        params = message["params"]
        if urlsplit(str(params.get("documentURL", ""))).scheme in BROWSER_UI_SCHEMES:
            continue
        urls.append(str(params["request"]["url"]))
    return urls


def foreign_requests(urls: list[str], own_origin: str) -> list[str]:
    """URLs of any host but the dashboard's own (data: and about: URLs never leave the browser)."""
    own = urlsplit(own_origin).netloc
    return [u for u in urls if urlsplit(u).scheme not in ("data", "about", "blob") and urlsplit(u).netloc != own]


def link_event_delays(orbit_events: list[dict[str, Any]], rendered: dict[str, dict[str, Any]]) -> list[float]:
    """Seconds from each link event (the orbit's log: wall time of the publish) to the page showing it."""
    delays = []
    for e in orbit_events:
        if e.get("event") not in ("link_up", "link_down", "handover") or "seq" not in e:
            continue
        shown = rendered.get(f"{e['cluster']}:{e['seq']}")
        if shown is not None:
            delays.append(float(shown["wall"]) - float(e["wall"]))
    return delays


def p95(values: list[float]) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))]
