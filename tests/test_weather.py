"""EV_W, the weather office (issue #12): providers, the weather actor, and Central acting on its alerts.

Real parts throughout: a local fake OpenWeather (stdlib ``http.server`` on a real
socket, answering OpenWeather's own JSON shape, and on demand 401, 404, 429, 5xx,
garbage, an oversized body, a slow or dripping answer), real weather files, and
for the end-to-end part a real Central system in this process with its HTTPS API
(a real certificate, the real token), EV_W's real actor system talking to it.
"""

from __future__ import annotations

import json
import os
import threading
import time
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from tests.waiting import wait_until
from transport.weather_providers import (
    MAX_BODY,
    FileProvider,
    OpenWeatherProvider,
    ProviderError,
    load_api_key,
)

API_KEY = "0123456789abcdef0123456789abcdef"


# --- a fake OpenWeather --------------------------------------------------------------------------
def openweather_json(city: str, temp: Any) -> dict[str, Any]:
    """A current-weather answer in OpenWeather's shape (``units=metric``)."""
    return {
        "coord": {"lon": -3.7026, "lat": 40.4165},
        "weather": [{"id": 800, "main": "Clear", "description": "clear sky", "icon": "01d"}],
        "base": "stations",
        "main": {"temp": temp, "feels_like": temp, "temp_min": temp, "temp_max": temp, "pressure": 1021,
                 "humidity": 60, "sea_level": 1021, "grnd_level": 940},
        "visibility": 10000, "wind": {"speed": 2.57, "deg": 240}, "clouds": {"all": 0}, "dt": 1700000000,
        "sys": {"type": 2, "id": 2007545, "country": "ES", "sunrise": 1699946000, "sunset": 1699982000},
        "timezone": 3600, "id": 3117735, "name": city, "cod": 200,
    }


@dataclass
class FakeOpenWeather:
    """OpenWeather's ``/data/2.5/weather`` on a local port. ``temps``: city (any case) -> °C
    (or a list: one value per request, the last one stays);
    ``behaviour``: city -> what to answer instead ("401", "404", "429", "500", "garbage",
    "no-temp", "nan", "string-temp", "absurd", "oversized", "oversized-chunked", "slow", "drip")."""

    key: str = API_KEY
    temps: dict[str, Any] = field(default_factory=dict)
    behaviour: dict[str, str] = field(default_factory=dict)
    requests: list[dict[str, str]] = field(default_factory=list)
    release: threading.Event = field(default_factory=threading.Event)
    server: ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        assert self.server is not None
        host, port = self.server.server_address[:2]
        return f"http://{host}:{port}/data/2.5/weather"

    def count(self, city: str) -> int:
        return sum(1 for r in self.requests if r.get("q", "").casefold() == city.casefold())

    def set(self, city: str, temp: Any) -> None:
        self.temps[city.casefold()] = temp

    def start(self) -> FakeOpenWeather:
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:  # quiet
                pass

            def do_GET(self) -> None:
                parts = urllib.parse.urlsplit(self.path)
                query = dict(urllib.parse.parse_qsl(parts.query))
                fake.requests.append(query)
                city = query.get("q", "")
                if parts.path != "/data/2.5/weather":
                    return self._json(404, {"cod": "404", "message": "Internal error"})
                if query.get("appid") != fake.key:
                    return self._json(401, {"cod": 401, "message": "Invalid API key. Please see https://"
                                                                  "openweathermap.org/faq#error401 for more info."})
                what = fake.behaviour.get(city.casefold(), "")
                if what == "429":
                    return self._json(429, {"cod": 429, "message": "Too many requests"}, {"Retry-After": "2"})
                if what == "500":
                    return self._json(500, {"cod": 500, "message": "Internal error"})
                if what == "garbage":
                    return self._raw(200, b"<html>this is not json\x00\xff</html>")
                if what == "no-temp":
                    return self._json(200, {"cod": 200, "main": {"humidity": 3}, "name": city})
                if what == "nan":
                    return self._raw(200, b'{"main": {"temp": NaN}, "cod": 200}')
                if what == "string-temp":
                    return self._json(200, openweather_json(city, "-5"))
                if what == "absurd":
                    return self._json(200, openweather_json(city, -5000.0))
                if what == "oversized":
                    return self._raw(200, b'{"main": {"temp": 1}, "pad": "' + b"x" * (MAX_BODY * 4) + b'"}')
                if what == "oversized-chunked":
                    return self._chunked(b'{"main": {"temp": 1}, "pad": "' + b"x" * (MAX_BODY * 4) + b'"}')
                if what == "slow":
                    fake.release.wait(10)
                    return self._json(200, openweather_json(city, 1.0))
                if what == "drip":
                    return self._drip(json.dumps(openweather_json(city, 1.0)).encode())
                if city.casefold() not in fake.temps:
                    return self._json(404, {"cod": "404", "message": "city not found"})
                temp = fake.temps[city.casefold()]
                if isinstance(temp, list):  # a script: one value per request, the last one then stays
                    temp = temp.pop(0) if len(temp) > 1 else temp[0]
                return self._json(200, openweather_json(city, temp))

            def _json(self, status: int, body: Any, headers: dict[str, str] | None = None) -> None:
                self._raw(status, json.dumps(body).encode(), headers)

            def _raw(self, status: int, data: bytes, headers: dict[str, str] | None = None) -> None:
                self.send_response(status)
                self.send_header("Content-Type", "application/json; charset=utf-8")
                self.send_header("Content-Length", str(len(data)))
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                try:
                    self.wfile.write(data)
                except OSError:
                    pass

            def _chunked(self, data: bytes) -> None:
                self.send_response(200)
                self.send_header("Transfer-Encoding", "chunked")
                self.end_headers()
                try:
                    for i in range(0, len(data), 8192):
                        chunk = data[i:i + 8192]
                        self.wfile.write(f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n")
                    self.wfile.write(b"0\r\n\r\n")
                except OSError:
                    pass

            def _drip(self, data: bytes) -> None:
                self.send_response(200)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                try:
                    for byte in data:
                        if fake.release.wait(0.2):
                            return
                        self.wfile.write(bytes([byte]))
                        self.wfile.flush()
                except OSError:
                    pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, args=(0.05,), name="fake-openweather", daemon=True).start()
        return self

    def stop(self) -> None:
        self.release.set()
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()


@pytest.fixture
def openweather() -> Iterator[FakeOpenWeather]:
    fake = FakeOpenWeather().start()
    yield fake
    fake.stop()


# --- OpenWeatherProvider ------------------------------------------------------------------------
def test_openweather_reads_main_temp_in_metric_units(openweather: FakeOpenWeather) -> None:
    openweather.set("Madrid", 12.5)
    openweather.set("Oslo", -3)
    provider = OpenWeatherProvider(API_KEY, openweather.url, timeout=2)
    assert provider.read("Madrid").temperature_c == 12.5
    oslo = provider.read("oslo")
    assert oslo.ok and oslo.temperature_c == -3.0
    sent = openweather.requests[0]
    assert sent == {"q": "Madrid", "appid": API_KEY, "units": "metric"}
    assert API_KEY not in repr(provider) and API_KEY not in provider.description


@pytest.mark.parametrize(("behaviour", "words"), [
    ("500", "failing (500)"),
    ("garbage", "not valid JSON"),
    ("no-temp", "no temperature"),
    ("nan", "not valid JSON"),
    ("string-temp", "no temperature"),
    ("absurd", "outside -100 to 70"),
    ("oversized", "larger than"),
    ("oversized-chunked", "larger than"),
])
def test_openweather_hostile_answers_are_errors_not_readings(openweather: FakeOpenWeather, behaviour: str,
                                                              words: str) -> None:
    openweather.behaviour["madrid"] = behaviour
    reading = OpenWeatherProvider(API_KEY, openweather.url, timeout=2).read("Madrid")
    assert reading.temperature_c is None and not reading.ok
    assert reading.error is not None and words in reading.error


def test_openweather_wrong_key_and_unknown_city(openweather: FakeOpenWeather, caplog: pytest.LogCaptureFixture) -> None:
    openweather.set("Madrid", 10)
    wrong = "ffffffffffffffffffffffffffffffff"
    reading = OpenWeatherProvider(wrong, openweather.url, timeout=2).read("Madrid")
    assert reading.temperature_c is None and "refused the API key (401)" in (reading.error or "")
    assert wrong not in (reading.error or "")
    unknown = OpenWeatherProvider(API_KEY, openweather.url, timeout=2).read("Atlantis")
    assert unknown.temperature_c is None and "does not know the city 'Atlantis' (404)" in (unknown.error or "")
    assert API_KEY not in caplog.text and wrong not in caplog.text


def test_openweather_rate_limit_pauses_calls(openweather: FakeOpenWeather) -> None:
    openweather.behaviour["madrid"] = "429"
    provider = OpenWeatherProvider(API_KEY, openweather.url, timeout=2)
    first = provider.read("Madrid")
    assert "rate limit" in (first.error or "") and "2 s" in (first.error or "")
    second = provider.read("Madrid")  # within Retry-After: OpenWeather is not called again
    assert "slow down (429)" in (second.error or "")
    assert openweather.count("Madrid") == 1
    openweather.behaviour.clear()
    openweather.set("Madrid", 4)
    assert wait_until(lambda: provider.read("Madrid").ok, timeout=6, interval=0.2)


@pytest.mark.parametrize("behaviour", ["slow", "drip"])
def test_openweather_slow_answers_time_out_within_the_deadline(openweather: FakeOpenWeather, behaviour: str) -> None:
    openweather.behaviour["madrid"] = behaviour
    provider = OpenWeatherProvider(API_KEY, openweather.url, timeout=0.6)
    started = time.monotonic()
    reading = provider.read("Madrid")
    took = time.monotonic() - started
    assert reading.temperature_c is None and "did not answer within 0.6 s" in (reading.error or "")
    assert took < 2.0, f"a {behaviour} answer held the call {took:.1f} s"


def test_openweather_unreachable_server_is_an_error() -> None:
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    reading = OpenWeatherProvider(API_KEY, f"http://127.0.0.1:{port}/data/2.5/weather", timeout=1).read("Madrid")
    assert reading.temperature_c is None and "cannot reach OpenWeather" in (reading.error or "")


def test_openweather_refuses_bad_settings() -> None:
    for url in ("ftp://x/y", "not a url", "https://api.example/weather?appid=leak", "https://u:p@api.example/w"):
        with pytest.raises(ProviderError):
            OpenWeatherProvider(API_KEY, url)
    with pytest.raises(ProviderError):
        OpenWeatherProvider("", "https://api.example/w")


def test_api_key_from_file_or_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    key_file = tmp_path / "ow.key"
    key_file.write_text(API_KEY + "\n")
    key_file.chmod(0o600)
    assert load_api_key(str(key_file)) == API_KEY
    monkeypatch.setenv("OPENWEATHER_API_KEY", "abcabcabcabcabcabcabcabcabcabcab")
    assert load_api_key("") == "abcabcabcabcabcabcabcabcabcabcab"
    monkeypatch.delenv("OPENWEATHER_API_KEY")
    with pytest.raises(ProviderError, match="no OpenWeather API key"):
        load_api_key("")
    with pytest.raises(ProviderError, match="cannot read"):
        load_api_key(str(tmp_path / "missing"))
    key_file.write_text("has spaces in it\n")
    with pytest.raises(ProviderError, match="not a key") as err:
        load_api_key(str(key_file))
    assert "has spaces" not in str(err.value)


# --- FileProvider ---------------------------------------------------------------------------------
def test_file_provider_values_sequences_and_comments(tmp_path: Path) -> None:
    path = tmp_path / "weather.txt"
    path.write_text("# the demo's weather\n"
                    "Madrid: 5, 2, -1, -3, 4   # a cold snap\n"
                    "\n"
                    "Barcelona : 14\n"
                    "Oslo: 1, -2, ...\n"
                    "Madrid, Puerta del Sol: 9\n")
    provider = FileProvider(path)
    assert [provider.read("Madrid").temperature_c for _ in range(7)] == [5, 2, -1, -3, 4, 4, 4]
    assert [provider.read("  BARCELONA ").temperature_c for _ in range(2)] == [14, 14]
    assert [provider.read("Oslo").temperature_c for _ in range(5)] == [1, -2, 1, -2, 1]
    assert provider.read("Madrid, Puerta del Sol").temperature_c == 9
    missing = provider.read("Lisbon")
    assert missing.temperature_c is None and "no line for 'Lisbon' in the weather file" in (missing.error or "")


def test_file_provider_rereads_the_file_and_restarts_an_edited_sequence(tmp_path: Path) -> None:
    path = tmp_path / "weather.txt"
    path.write_text("Madrid: 5, 2, -1\nOslo: 3, 2, 1\n")
    provider = FileProvider(path)
    assert provider.read("Madrid").temperature_c == 5
    assert provider.read("Oslo").temperature_c == 3
    path.write_text("Madrid: 10, 11\nOslo: 3, 2, 1\n")  # Madrid edited, Oslo unchanged
    assert provider.read("Madrid").temperature_c == 10
    assert provider.read("Oslo").temperature_c == 2


def test_file_provider_reports_garbled_lines_once_and_reads_the_rest(tmp_path: Path,
                                                                      caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "weather.txt"
    path.write_bytes(
        b"Madrid: 7\n"
        b"this line has no colon\n"
        b"Oslo: cold\n"
        b"Paris: nan\n"
        b"Rome: 1e999\n"
        b"Vigo: 3,,4\n"
        b": 12\n"
        b"Lyon: " + b"1, " * 2000 + b"1\n"
        b"Bern\x00: 5\n"
        b"\xff\xfe: 3\n"
        b"Madrid: 99\n"
        b"Kyiv: -4\n"
    )
    provider = FileProvider(path)
    with caplog.at_level("WARNING", logger="evcharging.weather"):
        assert provider.read("Madrid").temperature_c == 7  # the first line of a city wins
        assert provider.read("Kyiv").temperature_c == -4
        for city, words in [("Oslo", "'cold' is not a number"), ("Paris", "not a temperature"),
                            ("Rome", "not a temperature"), ("Vigo", "empty one")]:
            reading = provider.read(city)
            assert reading.temperature_c is None and words in (reading.error or ""), (city, reading)
        assert provider.read("Lyon").temperature_c is None
        first = caplog.text
        provider.read("Madrid")
    for number in (2, 3, 4, 5, 6, 7, 8, 9, 10, 11):
        assert f"line {number}:" in first, number
    assert caplog.text.count("line 2:") == 1  # reported once per content, not at every poll


def test_file_provider_refuses_unreadable_oversized_and_special_files(tmp_path: Path) -> None:
    assert "cannot read the weather file" in (FileProvider(tmp_path / "none.txt").read("Madrid").error or "")
    big = tmp_path / "big.txt"
    big.write_bytes(b"Madrid: 1\n" + b"# padding\n" * 10000)
    assert "larger than" in (FileProvider(big).read("Madrid").error or "")
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    started = time.monotonic()
    assert "not a regular file" in (FileProvider(fifo).read("Madrid").error or "")
    assert time.monotonic() - started < 1.0  # a FIFO with no writer never blocks a poll
    assert "not a regular file" in (FileProvider(tmp_path).read("Madrid").error or "")


# --- EV_W and a real Central with its HTTPS API ----------------------------------------------------
#: CP id -> location: two in Madrid, one in Barcelona, one in Bergen (no watched city at first).
CPS = {"MAD1": "Madrid, Puerta del Sol", "MAD2": "Madrid, Atocha", "BCN1": "Barcelona, Diagonal",
       "BRG1": "Bergen"}
POLL = 0.4  # EV_W's --interval in these tests


class LiveMonitor:
    """A FakeMonitor kept alive by its own thread: a life message every second, and every frame
    Central sends (its stop and resume orders) read, so ACKed, as a Monitor does."""

    def __init__(self, port: int, cp_id: str) -> None:
        from tests.fakes import FakeMonitor

        self.monitor = FakeMonitor(port, cp_id)
        assert self.monitor.register().status == "accepted"
        self.monitor.heartbeat(True)
        self._halt = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"monitor-{cp_id}", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        next_beat = time.monotonic() + 1.0
        while not self._halt.is_set():
            try:
                self.monitor.client.recv(timeout=0.1)
            except TimeoutError:
                pass
            except Exception:
                return
            if time.monotonic() >= next_beat:
                next_beat += 1.0
                try:
                    self.monitor.heartbeat(True)
                except Exception:
                    return

    def close(self) -> None:
        self._halt.set()
        self._thread.join(5)
        self.monitor.close()


@dataclass
class Office:
    """A real Central (its API on HTTPS), FakeMonitors keeping its CPs ACTIVE, a fake OpenWeather,
    and EV_W's real actor system between them."""

    central: Any
    api: Any  # a CentralApiClient of the operator
    info: Any  # Central's ApiInfo
    openweather: FakeOpenWeather
    monitors: dict[str, Any]
    tmp: Path
    central_db: str
    weather: Any = None  # EV_W's RunningSystem

    def state(self, cp_id: str) -> tuple[str, list[str]]:
        cp = self.api.cp(cp_id)
        return cp["state"], sorted(cp["stop_reasons"])

    def location(self, name: str) -> dict[str, Any] | None:
        return next((w for w in self.api.weather() if w["location"].casefold() == name.casefold()), None)

    def snapshot(self) -> Any:
        from actors.weather import WeatherStatus

        return self.weather.ask("weather", WeatherStatus())

    def start_weather(self, **overrides: Any) -> Any:
        from supervisors.weather_system import WeatherSystemConfig, start_weather

        key_file = self.tmp / "openweather.key"
        key_file.write_text(API_KEY + "\n")
        key_file.chmod(0o600)
        token_file = self.tmp / "api-token-for-ev-w"
        token_file.write_text(self.info.token + "\n")
        token_file.chmod(0o600)
        values: dict[str, Any] = dict(
            central_url=self.info.url, central_ca=self.info.ca_path, api_token_file=str(token_file),
            provider="openweather", openweather_url=self.openweather.url, openweather_key_file=str(key_file),
            interval=POLL, provider_timeout=1.0, central_timeout=3.0, watch="Madrid;Barcelona")
        values.update(overrides)
        self.weather = start_weather(WeatherSystemConfig(**values))
        return self.weather


@pytest.fixture
def office(kafka_settings: Any, tmp_path: Path, openweather: FakeOpenWeather) -> Iterator[Office]:
    from persistence import Repository
    from supervisors.central_system import CentralSystemConfig, api_info, start_central
    from transport.api_client import CentralApiClient
    from transport.listener import ListenerPort

    db = str(tmp_path / "central.db")
    with Repository(db) as repo:
        for cp_id, location in CPS.items():
            repo.upsert_cp(cp_id, location, 0.40)
    config = CentralSystemConfig(enroll="open", port=0, host="127.0.0.1", broker=kafka_settings.bootstrap,
                                 db_path=db, topic_prefix=kafka_settings.topic_prefix, life_timeout=60.0,
                                 panel_interval=0.1, api_port=0, api_host="127.0.0.1")
    central = start_central(config)
    office = None
    try:
        info = api_info(central)
        assert info is not None and info.tls
        port = central.ask("monitor-listener", ListenerPort())
        monitors = {}
        for cp_id in CPS:
            monitors[cp_id] = LiveMonitor(port, cp_id)
        api = CentralApiClient(info.url, info.token, info.ca_path, timeout=5)
        openweather.set("Madrid", 5.0)
        openweather.set("Barcelona", 15.0)
        openweather.set("Bergen", 8.0)
        openweather.set("Oslo", 2.0)
        office = Office(central, api, info, openweather, monitors, tmp_path, db)
        wait_until(lambda: {cp["cp_id"]: cp["state"] for cp in api.cps()} == dict.fromkeys(CPS, "ACTIVE"),
                   what="every CP ACTIVE in the API's view")
        yield office
    finally:
        if office is not None and office.weather is not None:
            office.weather.stop()
        if office is not None:
            for m in office.monitors.values():
                m.close()
        central.stop()


def alert_reading(office: Office, location: str) -> tuple[bool, float | None] | None:
    """(alert, the reading that set it) as Central stored it: it stores a location's reading only
    when its alert state changes."""
    from persistence import Repository

    with Repository(office.central_db) as repo:
        rec = next((r for r in repo.weather_locations() if r.location.casefold() == location.casefold()), None)
    return None if rec is None else (rec.alert, rec.temperature_c)


@pytest.mark.broker
def test_freeze_stops_the_city_within_one_poll_thaw_restores_and_operator_stops_hold(office: Office) -> None:
    from transport.api_client import ApiRefused

    office.start_weather()
    wait_until(lambda: (office.location("Madrid") or {}).get("temperature_c") == 5.0, what="Madrid's reading")
    assert office.state("MAD1") == ("ACTIVE", [])
    # freeze: the first freezing reading (the next poll's) puts both Madrid CPs out of service.
    # Each answer is colder than the one before, so the alert's stored reading tells which one set it.
    office.openweather.set("Madrid", [-2.5 - 0.25 * i for i in range(200)])
    wait_until(lambda: office.state("MAD1")[0] == office.state("MAD2")[0] == "STOPPED", timeout=5,
               interval=0.05, what="Madrid's CPs STOPPED")
    assert alert_reading(office, "Madrid") == (True, -2.5), "the first freezing reading did not stop them"
    assert office.state("MAD1") == ("STOPPED", ["weather"])
    assert office.state("BCN1") == ("ACTIVE", []) and office.state("BRG1") == ("ACTIVE", [])
    madrid = office.location("Madrid")
    assert madrid is not None and madrid["alert"] and madrid["temperature_c"] <= -2.5
    assert sorted(madrid["cp_ids"]) == ["MAD1", "MAD2"]
    # the operator stops MAD2 as well, and cannot resume MAD1 while the alert holds it
    assert office.api.stop("MAD2")["status"] == "ok"
    wait_until(lambda: office.state("MAD2") == ("STOPPED", ["operator", "weather"]), what="MAD2 held twice")
    with pytest.raises(ApiRefused) as refused:
        office.api.resume("MAD1")
    assert refused.value.status == 409
    # thaw: the first warm reading brings MAD1 back; MAD2 stays out of service for the operator
    office.openweather.set("Madrid", [3.0 + 0.25 * i for i in range(200)])
    wait_until(lambda: office.state("MAD1") == ("ACTIVE", []), timeout=5, interval=0.05, what="MAD1 ACTIVE")
    assert alert_reading(office, "Madrid") == (False, 3.0), "the first warm reading did not restore it"
    assert office.state("MAD2") == ("STOPPED", ["operator"])
    for _ in range(3):  # more warm polls do not undo the operator's stop either
        n = office.snapshot().polls
        wait_until(lambda n=n: office.snapshot().polls > n, what="one more poll")
    assert office.state("MAD2") == ("STOPPED", ["operator"])
    assert office.api.resume("MAD2")["status"] == "ok"
    wait_until(lambda: office.state("MAD2") == ("ACTIVE", []), what="MAD2 resumed by the operator")
    assert office.weather.alive


def madrid_error(office: Office) -> str:
    return (office.location("Madrid") or {}).get("error") or ""


@pytest.mark.broker
def test_provider_errors_are_reported_and_change_nothing(office: Office, caplog: pytest.LogCaptureFixture) -> None:
    office.openweather.set("Madrid", -1.0)
    office.start_weather(provider_timeout=0.6)
    wait_until(lambda: office.state("MAD1") == ("STOPPED", ["weather"]), what="Madrid frozen")
    fake = office.openweather
    cases: list[tuple[str, Any, str]] = [
        ("wrong key", lambda: setattr(fake, "key", "another-key-entirely"), "refused the API key (401)"),
        ("unknown city", lambda: fake.temps.pop("madrid"), "does not know the city"),
        ("rate limit", lambda: fake.behaviour.__setitem__("madrid", "429"), "429"),
        ("garbage", lambda: fake.behaviour.__setitem__("madrid", "garbage"), "not valid JSON"),
        ("oversized", lambda: fake.behaviour.__setitem__("madrid", "oversized"), "larger than"),
        ("absurd", lambda: fake.behaviour.__setitem__("madrid", "absurd"), "outside -100 to 70"),
        ("timeout", lambda: fake.behaviour.__setitem__("madrid", "slow"), "did not answer within 0.6 s"),
    ]
    for what, breakage, words in cases:
        fake.key, fake.behaviour = API_KEY, {}
        fake.set("Madrid", -1.0)
        wait_until(lambda: not madrid_error(office), timeout=8, what=f"Madrid readable before {what}")
        breakage()
        wait_until(lambda words=words: words in madrid_error(office), timeout=8, what=f"Central told of {what}")
        madrid = office.location("Madrid")
        assert madrid is not None and madrid["alert"] and madrid["temperature_c"] == -1.0, what
        assert office.state("MAD1") == ("STOPPED", ["weather"]), what
        assert office.state("BCN1") == ("ACTIVE", []), what
        assert office.weather.alive, what
    fake.key, fake.behaviour = API_KEY, {}
    fake.set("Madrid", 6.0)
    wait_until(lambda: office.state("MAD1") == ("ACTIVE", []), timeout=8, what="MAD1 back after the errors")
    assert madrid_error(office) == ""
    assert API_KEY not in caplog.text and office.info.token not in caplog.text


@pytest.mark.broker
def test_readings_go_on_through_a_central_outage_and_a_restart_and_reach_central_afterwards(office: Office) -> None:
    from tests.faults import TcpProxy

    with TcpProxy("127.0.0.1", office.info.port, name="api") as proxy:
        url = office.info.url.replace(f":{office.info.port}", f":{proxy.listen_port}")
        office.start_weather(central_url=url, central_timeout=1.0)
        wait_until(lambda: office.snapshot().central_reachable, what="EV_W reaches Central")
        wait_until(lambda: (office.location("Madrid") or {}).get("temperature_c") == 5.0, what="a first reading")
        proxy.cut("reset")
        wait_until(lambda: office.snapshot().central_reachable is False, timeout=8, what="EV_W sees the outage")
        office.openweather.set("Madrid", -4.0)  # it freezes while Central cannot be told
        asked = office.openweather.count("Madrid")
        wait_until(lambda: office.openweather.count("Madrid") >= asked + 3, timeout=8,
                   what="readings going on from the cached list")
        snap = office.snapshot()
        madrid = next(s for s in snap.locations if s.location == "Madrid")
        assert madrid.temperature_c == -4.0 and madrid.alert and not madrid.delivered
        assert office.state("MAD1") == ("ACTIVE", [])  # Central has not heard of it yet
        # the weather actor dies meanwhile: its supervisor restarts it, and the new one polls the
        # same cached cities (the cache belongs to the system), although Central still cannot say
        old = office.weather.get("weather")
        old.stop()
        wait_until(lambda: office.weather.get("weather") not in (None, old), what="the weather actor restarted")
        asked = office.openweather.count("Madrid")
        wait_until(lambda: office.openweather.count("Madrid") >= asked + 2, timeout=8,
                   what="the restarted actor reading the cached cities")
        assert sorted(s.location for s in office.snapshot().locations) == ["Barcelona", "Madrid"]
        proxy.restore()
        wait_until(lambda: office.state("MAD1") == ("STOPPED", ["weather"]), timeout=8,
                   what="the alert delivered once Central answers")
        assert office.snapshot().central_reachable


@pytest.mark.broker
def test_wrong_operator_token_is_reported_and_ev_w_keeps_polling(office: Office,
                                                                 caplog: pytest.LogCaptureFixture) -> None:
    from actors.operations import WeatherView

    bad = office.tmp / "wrong-token"
    bad.write_text("not-the-operator-token-at-all\n")
    bad.chmod(0o600)
    office.start_weather(api_token_file=str(bad))
    wait_until(lambda: office.openweather.count("Madrid") >= 2, what="readings despite the refusals")
    snap = office.snapshot()
    # The first refusal is the 401, said once when Central stops answering; by now the snapshot may
    # already show the lock-out (429) that repeated wrong tokens earn, depending on how many polls ran.
    assert "refused EV_W's operator token (401)" in caplog.text
    assert snap.central_reachable is False and ("(401)" in (snap.central_error or "")
                                                or "(429)" in (snap.central_error or ""))
    madrid = next(s for s in snap.locations if s.location == "Madrid")
    assert not madrid.delivered and "not-the-operator-token" not in caplog.text
    # Central took nothing from it (asked of Central's actor: its API now refuses this address)
    assert office.central.ask("central", WeatherView()) == []
    # Central locks the address out (429) after repeated wrong tokens; EV_W then waits instead of hammering
    wait_until(lambda: "(429)" in (office.snapshot().central_error or ""), timeout=10, what="the lock-out seen")
    assert office.central.ask("central", WeatherView()) == [] and office.weather.alive


@pytest.mark.broker
def test_add_and_remove_cities_while_running_from_the_menu_and_the_api(office: Office) -> None:
    from actors.console import ConsoleLine

    office.start_weather(watch="Madrid")
    wait_until(lambda: office.api.weather_locations() == ["Madrid"], what="Madrid watched at Central")
    console = office.weather.get("weather")
    # the menu: add Bergen (its CP follows Bergen's weather from now on)
    office.openweather.set("Bergen", -3.0)
    console.tell(ConsoleLine("add Bergen"))
    wait_until(lambda: "Bergen" in office.api.weather_locations(), what="Bergen added through Central's API")
    wait_until(lambda: office.state("BRG1") == ("STOPPED", ["weather"]), timeout=5, what="BRG1 stopped by the frost")
    # the API: an operator adds Oslo; EV_W reads it from the next poll on
    assert office.api.watch_location("Oslo")["status"] == "ok"
    wait_until(lambda: office.openweather.count("Oslo") >= 1, timeout=5, what="EV_W reading Oslo")
    wait_until(lambda: (office.location("Oslo") or {}).get("temperature_c") == 2.0, what="Oslo's reading at Central")
    # the menu: remove Bergen: its alert is cleared, its CP back in service, no more readings of it
    console.tell(ConsoleLine("remove bergen"))
    wait_until(lambda: "Bergen" not in office.api.weather_locations(), what="Bergen removed")
    wait_until(lambda: office.state("BRG1") == ("ACTIVE", []), what="BRG1 back once Bergen is not watched")
    asked = office.openweather.count("Bergen")
    n = office.snapshot().polls
    wait_until(lambda: office.snapshot().polls >= n + 3, what="three more polls")
    assert office.openweather.count("Bergen") == asked
    assert office.state("BRG1") == ("ACTIVE", [])
    # the API: the operator removes Oslo; EV_W drops it
    assert office.api.unwatch_location("Oslo")["status"] == "ok"
    wait_until(lambda: all(s.location != "Oslo" for s in office.snapshot().locations), what="Oslo dropped")
    assert sorted(s.location for s in office.snapshot().locations) == ["Madrid"]


@pytest.mark.broker
def test_menu_answers_and_refuses_hostile_input(office: Office, caplog: pytest.LogCaptureFixture) -> None:
    from actors.console import ConsoleLine

    office.start_weather(watch="Madrid")
    wait_until(lambda: office.api.weather_locations() == ["Madrid"], what="Madrid watched at Central")
    wait_until(lambda: any(s.read_at for s in office.snapshot().locations), what="a first reading")
    console = office.weather.get("weather")
    with caplog.at_level("INFO", logger="evcharging.weather"):
        for line in ("help", "list", "add " + "x" * 500, "add Bad\x07City", "remove ", "dance"):
            console.tell(ConsoleLine(line))
        wait_until(lambda: "Unknown command 'dance'" in caplog.text, what="the menu's answers")
    text = caplog.text
    assert "add CITY" in text and "1 watched location(s):" in text and "Madrid: 5.0 °C" in text
    assert "at most 64 characters" in text and "control characters" in text
    n = office.snapshot().polls
    wait_until(lambda: office.snapshot().polls >= n + 2, what="two more polls")
    assert office.api.weather_locations() == ["Madrid"]
    assert office.weather.alive


@pytest.mark.broker
def test_file_provider_cold_snap_stops_and_restores_the_city(office: Office, caplog: pytest.LogCaptureFixture) -> None:
    script = office.tmp / "weather.txt"
    script.write_text("# a scripted cold snap\n"
                      "Madrid: 4, 1, -1, -2, 3, ...\n"
                      "Barcelona: 15\n"
                      "Bergen => 4\n")
    office.start_weather(provider="file", weather_file=str(script), interval=0.3)
    seen: set[tuple[str, tuple[str, ...]]] = set()

    def observe() -> bool:
        state, reasons = office.state("MAD1")
        seen.add((state, tuple(reasons)))
        return ("STOPPED", ("weather",)) in seen and ("ACTIVE", ()) in seen and state == "ACTIVE" \
            and len(seen) >= 2 and office.snapshot().readings > 10
    wait_until(observe, timeout=15, interval=0.05, what="MAD1 stopped by the cold snap and restored")
    assert office.state("BCN1") == ("ACTIVE", [])
    assert "line 4: not 'City: temperature'" in caplog.text


# --- the launcher: evcharging up starts the API and EV_W ---------------------------------------------
def test_demo_weather_file_has_a_cold_snap_on_the_first_city(tmp_path: Path) -> None:
    from supervisors.launcher import COLD_SNAP, cp_catalogue, demo_weather
    from transport.weather_providers import FileProvider

    cities, text = demo_weather(cp_catalogue(12))
    assert cities == ["Madrid", "Barcelona", "Valencia", "Alicante", "Sevilla", "Bilbao", "Zaragoza", "Málaga"]
    path = tmp_path / "weather.txt"
    path.write_text(text, encoding="utf-8")
    provider = FileProvider(path)
    madrid = [provider.read("Madrid").temperature_c for _ in range(2 * len(COLD_SNAP))]
    frozen = [t for t in madrid if t is not None and t <= 0]
    assert frozen and len(frozen) < len(madrid) and madrid[0] is not None and madrid[0] > 0  # stop, then restore
    assert all(provider.read(city).ok and (provider.read(city).temperature_c or 0) > 0 for city in cities[1:])


@pytest.mark.slow
@pytest.mark.broker
def test_launcher_starts_the_api_and_ev_w_and_the_cold_snap_stops_and_restores(tmp_path: Path, broker: Any) -> None:
    from supervisors.launcher import Network, NetworkSpec, panel_lines

    script = tmp_path / "weather.txt"
    script.write_text("Madrid: 3, -1, -2, 4, ...\nBarcelona: 14\n")
    spec = NetworkSpec(run_dir=tmp_path / "run", cps=2, drivers=0, broker=broker.bootstrap, topic_prefix="wx.",
                       panel="off", security="off", api="on", weather="file", weather_file=str(script),
                       weather_interval=0.5)
    with Network(spec) as net:
        api = net.api()
        wait_until(lambda: api.weather_locations() == ["Barcelona", "Madrid"], timeout=30, what="EV_W's cities")
        seen: set[tuple[str, tuple[str, ...]]] = set()

        def observe() -> bool:
            cp = api.cp("MAD1")
            seen.add((cp["state"], tuple(cp["stop_reasons"])))
            return ("STOPPED", ("weather",)) in seen and cp["state"] == "ACTIVE"
        wait_until(observe, timeout=30, interval=0.1, what="MAD1 stopped by the cold snap, then restored")
        assert api.cp("BCN2")["stop_reasons"] == []
        token = net.api_token()
        lines = "\n".join(panel_lines(net, show_token=False))
        assert net.api_url + "/" in lines and str(net.api_token_file) in lines and token not in lines
        assert (net.api_token_file.stat().st_mode & 0o777) == 0o600
        assert all(token not in " ".join(p.cmd) for p in net.procs.values())
        run_dir = net.run_dir
    for path in run_dir.glob("*.log"):
        assert token not in path.read_text(errors="replace"), path.name


@pytest.mark.broker
def test_a_long_winded_provider_error_still_reaches_central(office: Office) -> None:
    """A weather file deep in a long path makes long error sentences: they are cut to what the API takes."""
    deep = office.tmp / ("d" * 120) / ("e" * 120)
    deep.mkdir(parents=True)
    script = deep / "weather.txt"
    script.write_text("Madrid: -1\nBarcelona: \x1b[31mred\n")
    office.start_weather(provider="file", weather_file=str(script))
    wait_until(lambda: "is not a number (line 2" in ((office.location("Barcelona") or {}).get("error") or ""),
               what="Barcelona's error at Central")
    error = (office.location("Barcelona") or {})["error"]
    assert len(error) <= 300 and "\x1b" not in error
    wait_until(lambda: office.state("MAD1") == ("STOPPED", ["weather"]), what="Madrid read from the same file")
