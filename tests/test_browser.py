"""The operator web panel (transport/web/) in a real browser, against a real Central.

Headless Chromium from Debian's ``chromium`` package, driven by Playwright for
Python pointed at that executable (Playwright cannot download a browser here;
``EV_CHROMIUM`` may name another Chromium). Everything behind the page is real
and runs in this process: Central with API_Central on (HTTPS with the
certificate it makes on its first start, its own operator token), two CPs
each a real Engine and Monitor, a third CP that never connects, a real
driver app, and the broker of the test run. The weather alert is posted to
the API the way EV_W posts it.

Why one test: the scenario is one story an operator lives (a supply shows up
live, the operator stops the CP, a cold snap holds it, the operator's resume
is refused while it does, the thaw restores it), and it shares one Central and
one browser, which is what makes it take seconds. A missing Chromium fails the
test with how to install it: CI installs it (``make browser``), so the test
never skips.

The screenshots are test artifacts: written under the test's tmp dir and
copied to ``run/artifacts/`` in the repository (git-ignored); the paths are
printed.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import ssl
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from persistence import Repository
from supervisors.central_system import CentralSystemConfig, api_info, start_central
from supervisors.driver_system import DriverConfig, start_driver
from supervisors.engine_system import EngineConfig, engine_port, start_engine
from supervisors.monitor_system import MonitorConfig, start_monitor
from supervisors.system import RunningSystem
from tests.crash import crash
from tests.test_engine import ConsolePipe
from tests.waiting import wait_until
from transport.listener import ListenerPort

pytestmark = pytest.mark.broker

ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = ROOT / "run" / "artifacts"

#: The CPs: two real ones (an Engine and a Monitor each) and one that only exists in Central's database.
SUPPLIER, FAULTY, ABSENT = "MAD1", "OSL1", "VLC1"
CITY = "Madrid"  # the weather location SUPPLIER is in ("Madrid, Puerta del Sol" is in "Madrid")
#: ABSENT's location is an attack: markup that would run if the page inserted data as HTML.
HOSTILE = "Valencia, <img src=x onerror=\"document.title='pwned'\">"
SEED = {SUPPLIER: f"{CITY}, Puerta del Sol", FAULTY: "Oslo, Karl Johans gate", ABSENT: HOSTILE}
DRIVER = "driver7"

#: Playwright's waits (ms): each step of the story is a few Kafka round trips at most.
STEP_MS = 20_000

INSTALL_HINT = (
    "the browser test needs Chromium, and no `chromium` is on PATH (nor EV_CHROMIUM set). Install Debian's "
    "package with `sudo apt-get install -y chromium` (or `make browser`, which `make test` and .ci/run run "
    "first) and run the test again; it is not skipped, because CI installs it.")


def chromium_executable() -> str:
    """Debian's chromium (or ``EV_CHROMIUM``); a missing one fails the test with how to install it."""
    named = os.environ.get("EV_CHROMIUM", "")
    path = shutil.which(named) if named else shutil.which("chromium")
    if not path:
        pytest.fail(INSTALL_HINT if not named else f"EV_CHROMIUM={named!r} is not an executable; {INSTALL_HINT}",
                    pytrace=False)
    return path


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    """One headless Chromium for the module (a child process, not an actor)."""
    executable = chromium_executable()
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail("Playwright for Python is missing from the venv: `make venv` installs the test extras "
                    "(setup.cfg [test])", pytrace=False)
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=executable, args=["--no-sandbox"])
        yield b
        b.close()


# --------------------------------------------------------------------------- the network behind the page
@dataclass
class Api:
    """A client of API_Central over HTTPS that trusts Central's own certificate (as EV_W does)."""

    url: str
    token: str = field(repr=False)
    ca_path: str | None

    def post(self, path: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        req = urllib.request.Request(self.url + path, data=json.dumps(body).encode(), method="POST", headers={
            "Authorization": f"Bearer {self.token}", "Content-Type": "application/json"})
        context = ssl.create_default_context(cafile=self.ca_path) if self.ca_path else None
        try:
            with urllib.request.urlopen(req, timeout=10, context=context) as resp:
                return resp.status, json.loads(resp.read())
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read())


@dataclass
class Net:
    central: RunningSystem
    api: Api
    kafka: Any
    tmp: Path
    systems: list[RunningSystem]
    consoles: dict[str, ConsolePipe]

    def start_driver(self, *cp_ids: str) -> RunningSystem:
        services = self.tmp / f"{DRIVER}.services"
        services.write_text("".join(f"{cp}\n" for cp in cp_ids))
        system = start_driver(DriverConfig(broker=self.kafka.bootstrap, driver_id=DRIVER,
                                           topic_prefix=self.kafka.topic_prefix, services_file=str(services),
                                           console=False, request_timeout=10.0))
        self.systems.append(system)
        return system


@pytest.fixture
def net(kafka_settings, tmp_path: Path) -> Iterator[Net]:
    db = str(tmp_path / "central.db")
    with Repository(db) as repo:
        for cp_id, location in SEED.items():
            repo.upsert_cp(cp_id, location, 0.45)
    central = start_central(CentralSystemConfig(
        enroll="open",  # not about the CPs' credentials (tests/test_security_*.py are)
        port=0, host="127.0.0.1", broker=kafka_settings.bootstrap, db_path=db, topic_prefix=kafka_settings.topic_prefix,
        panel="off", console=False, panel_interval=0.2, api_port=0, api_host="127.0.0.1"))
    systems: list[RunningSystem] = []
    consoles: dict[str, ConsolePipe] = {}
    try:
        info = api_info(central)
        assert info is not None and info.tls, "Central started without API_Central"
        assert central.wait_ready(30), "Central's Kafka consumers did not join within 30 s"
        port = central.ask("monitor-listener", ListenerPort())
        for cp_id in (SUPPLIER, FAULTY):
            consoles[cp_id] = console = ConsolePipe()
            engine = start_engine(EngineConfig(
                broker=kafka_settings.bootstrap, topic_prefix=kafka_settings.topic_prefix, listen_host="127.0.0.1",
                listen_port=0, journal=str(tmp_path / f"{cp_id}.journal"), power_kw=150.0, tick=0.25,
                auto_plug=True, plug_delay=0.2, console=True, console_stream=console.stream))
            systems.append(engine)
            systems.append(start_monitor(MonitorConfig(
                engine_host="127.0.0.1", engine_port=engine_port(engine), central_host="127.0.0.1",
                central_port=port, cp_id=cp_id, location=SEED[cp_id], health_interval=0.2)))
        yield Net(central, Api(info.url, info.token, info.ca_path), kafka_settings, tmp_path, systems, consoles)
    finally:
        for system in reversed(systems):
            system.stop()
        central.stop()
        for console in consoles.values():
            console.close()


# --------------------------------------------------------------------------- the story
def test_the_panel_shows_a_live_supply_a_stop_and_a_weather_alert(net: Net, browser: Any, tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    from playwright.sync_api import expect

    expect.set_options(timeout=STEP_MS)
    context = browser.new_context(ignore_https_errors=True, viewport={"width": 1440, "height": 1000})
    try:
        # --- a wrong token: the page says so in a sentence and asks again (not a blank page)
        wrong = context.new_page()
        wrong.goto(net.api.url + "/#token=" + "not-the-operator-token-0000")
        expect(wrong.get_by_test_id("conn")).to_have_attribute("data-conn", "refused")
        expect(wrong.get_by_test_id("status")).to_contain_text("Central refused the token")
        expect(wrong.get_by_test_id("token-form")).to_be_visible()
        assert "token=" not in wrong.url
        # ... and the form takes the right one
        wrong.get_by_test_id("token-input").fill(net.api.token)
        wrong.get_by_test_id("token-submit").click()
        expect(wrong.get_by_test_id("conn")).to_have_attribute("data-conn", "live")
        expect(wrong.get_by_test_id("token-form")).to_be_hidden()
        wrong.close()

        # --- the right token, in the fragment: used, then removed from the address bar
        page = context.new_page()
        errors: list[str] = []
        page.on("console", lambda m: errors.append(f"{m.text} ({m.location.get('url', '')})")
                if m.type == "error" else None)
        page.on("pageerror", lambda exc: errors.append(f"uncaught: {exc}"))
        page.goto(net.api.url + "/#token=" + net.api.token)
        expect(page.get_by_test_id("conn")).to_have_attribute("data-conn", "live")
        assert page.url == net.api.url + "/", page.url  # the token left the address bar (and the history)
        assert page.evaluate("sessionStorage.length") == 1
        tile = page.locator(f'[data-testid="cp-tile"][data-cp="{SUPPLIER}"]')
        expect(tile).to_have_attribute("data-state", "ACTIVE")
        expect(tile.get_by_test_id("cp-state")).to_have_text("ACTIVE")
        absent = page.locator(f'[data-cp="{ABSENT}"]')
        expect(absent).to_have_attribute("data-state", "DISCONNECTED")
        # data is text, never markup: the hostile location shows as written, and nothing of it ran
        expect(absent.get_by_test_id("cp-location")).to_contain_text(HOSTILE)
        assert page.locator("main img").count() == 0 and page.title() == "EV Charging — Central panel"
        page.evaluate(f"document.querySelector('[data-cp=\"{SUPPLIER}\"]').dataset.probe = 'same-node'")

        # --- a module's fault: the faulty CP's Engine goes KO → a red BROKEN tile, first, and an alert
        net.consoles[FAULTY].type("k")
        broken = page.locator(f'[data-testid="cp-tile"][data-cp="{FAULTY}"]')
        expect(broken).to_have_attribute("data-state", "BROKEN")
        expect(broken.get_by_test_id("cp-fault")).to_be_visible()
        expect(page.locator('[data-testid="alert-broken"]')).to_contain_text(FAULTY)
        expect(page.get_by_test_id("count-BROKEN")).to_have_text("BROKEN 1")
        order = page.locator('[data-testid="cp-tile"]').evaluate_all("ts => ts.map(t => t.dataset.cp)")
        assert order[:2] == [FAULTY, ABSENT], order  # faults first: BROKEN, then DISCONNECTED

        # --- a driver charges: the tile turns SUPPLYING live, with kW, kWh, € and the driver
        net.start_driver(SUPPLIER)
        expect(tile).to_have_attribute("data-state", "SUPPLYING")
        expect(tile.get_by_test_id("cp-driver")).to_have_text(f"driver {DRIVER}")
        expect(tile.get_by_test_id("cp-kw")).to_have_text(re.compile(r"^[1-9]\d*\.\d kW$"))
        expect(tile.get_by_test_id("cp-eur")).to_have_text(re.compile(r"^\d+\.\d\d €$"))
        first = wait_until(lambda: _figure(tile, "cp-kwh", "kWh") or None, timeout=STEP_MS / 1000,
                           what="energy supplied")
        wait_until(lambda: _figure(tile, "cp-kwh", "kWh") > first and _figure(tile, "cp-eur", "€") > 0,
                   timeout=STEP_MS / 1000, what="the meter and the cost moving on the page")
        expect(page.locator(f'[data-testid="request-row"][data-driver="{DRIVER}"]')).to_contain_text(SUPPLIER)
        assert tile.get_attribute("data-probe") == "same-node"  # updated in place, never redrawn
        _screenshot(page, tmp_path, "panel-supplying.png")

        # --- the operator stops it: "Out of Order", the reason, and the API's sentence in the status line
        tile.get_by_test_id("cp-stop").click()
        expect(tile).to_have_attribute("data-state", "STOPPED")
        expect(tile.get_by_test_id("cp-state")).to_have_text("Out of Order")
        expect(tile.get_by_test_id("cp-reasons")).to_contain_text("operator")
        expect(page.get_by_test_id("status")).to_have_attribute("data-http", "200")
        assert SUPPLIER in page.get_by_test_id("status").inner_text()

        # --- a cold snap, posted to the API as EV_W does: the weather alert appears on the page
        status, answer = net.api.post("/api/weather/locations", {"location": CITY})
        assert status == 200, answer
        status, answer = net.api.post("/api/weather/alerts", {"location": CITY, "temperature_c": -3.5, "alert": True})
        assert status == 200, answer
        row = page.locator(f'[data-testid="weather-row"][data-location="{CITY}"]')
        expect(row).to_have_attribute("data-alert", "true")
        expect(row.get_by_test_id("weather-status")).to_contain_text("ALERT")
        expect(page.locator(f'[data-testid="alert-weather"][data-location="{CITY}"]')).to_contain_text(SUPPLIER)
        expect(tile.get_by_test_id("cp-reasons")).to_contain_text("weather")

        # --- the operator's resume is refused while the alert holds it (409), said in the status line
        tile.get_by_test_id("cp-resume").click()
        expect(page.get_by_test_id("status")).to_have_attribute("data-http", "409")
        expect(page.get_by_test_id("status")).to_contain_text("stays out of service: weather alert")
        expect(tile.get_by_test_id("cp-reasons")).to_have_text(re.compile(r"^Stopped: weather$"))
        expect(tile).to_have_attribute("data-state", "STOPPED")
        _screenshot(page, tmp_path, "panel-weather-alert.png")

        # --- the filter finds a CP by location; the header counts every CP by state
        page.get_by_test_id("filter").fill("oslo")
        expect(page.get_by_test_id("filter-count")).to_have_text("showing 1 of 3")
        expect(tile).to_be_hidden()
        page.get_by_test_id("filter").fill("")
        expect(tile).to_be_visible()

        # --- the thaw: the alert clears and, the operator's stop having been lifted, the CP is back
        status, answer = net.api.post("/api/weather/alerts", {"location": CITY, "temperature_c": 4.0, "alert": False})
        assert status == 200, answer
        expect(row).to_have_attribute("data-alert", "false")
        expect(tile).to_have_attribute("data-state", "ACTIVE")
        expect(page.locator('[data-testid="alert-weather"]')).to_have_count(0)
        expect(page.locator('[data-testid="message"]').first).to_be_visible()
        expect(page.locator('[data-testid="message"][data-fault="true"]').first).to_be_visible()  # the fault, in red

        # --- revoking a CP's keys asks first: cancelled, nothing is sent; confirmed, Central's answer shows
        page.once("dialog", lambda dialog: dialog.dismiss())
        absent.get_by_test_id("cp-revoke").click()
        expect(page.get_by_test_id("status")).to_contain_text(f"The keys of {ABSENT} were not revoked.")
        page.once("dialog", lambda dialog: dialog.accept())
        absent.get_by_test_id("cp-revoke").click()
        expect(page.get_by_test_id("status")).to_have_attribute("data-http", "200")
        expect(page.get_by_test_id("status")).to_contain_text(f"Revoking the keys of CP {ABSENT}")

        # --- API_Central's server restarts (its actor crashed): the page says so, reconnects, is live again
        page.evaluate("""() => { const conn = document.querySelector('[data-testid="conn"]');
            window.connSeen = []; new MutationObserver(() => window.connSeen.push(conn.textContent))
              .observe(conn, {childList: true, characterData: true, subtree: true}); }""")
        crash(net.central.get("api"))
        wait_until(lambda: any(t.startswith("disconnected — retrying in") for t in page.evaluate("window.connSeen")),
                   timeout=STEP_MS / 1000, interval=0.1, what="the page saying it is disconnected and retrying")
        expect(page.get_by_test_id("conn")).to_have_attribute("data-conn", "live")
        expect(tile).to_have_attribute("data-state", "ACTIVE")
        expect(broken).to_have_attribute("data-state", "BROKEN")
        path = _screenshot(page, tmp_path, "panel.png")
        with capsys.disabled():  # shown in `make test`'s output too, not only with -s
            print(f"\nscreenshots of the panel: {path} and {path.parent}/panel-*.png "
                  f"(copies in {ARTIFACTS})")

        # the only failed request the page may log is the refused resume (409), which it handles
        unexpected = [e for e in errors if not ("status of 409" in e and "/resume" in e)]
        assert not unexpected, unexpected
    finally:
        context.close()


def _figure(tile: Any, testid: str, unit: str) -> float:
    """A tile's number (``12.345 kWh``, ``0.56 €``); 0 when it does not show one."""
    match = re.fullmatch(rf"(\d+\.\d+) {unit}", tile.get_by_test_id(testid).inner_text())
    return float(match.group(1)) if match else 0.0


def _screenshot(page: Any, tmp_path: Path, name: str) -> Path:
    """A full-page screenshot under the test's tmp dir, copied to run/artifacts/ (git-ignored)."""
    path = tmp_path / name
    page.screenshot(path=str(path), full_page=True)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(path, ARTIFACTS / name)
    return path


def test_a_missing_chromium_fails_the_test_with_how_to_install_it(monkeypatch) -> None:
    monkeypatch.setenv("EV_CHROMIUM", "no-such-chromium-here")
    with pytest.raises(pytest.fail.Exception, match=r"apt-get install -y chromium"):
        chromium_executable()
