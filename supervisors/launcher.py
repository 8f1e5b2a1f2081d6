"""``evcharging up``: a whole network on one machine, each component its own OS process.

:class:`Network` is also the Python API the failure-injection tests use: it
starts the broker, the registry, Central, CPs (Engine + Monitor) and drivers
as separate processes with their own log files, and can kill (SIGKILL), stop
and restart any one of them by name (``registry``, ``central``,
``engine:MAD1``, ``monitor:MAD1``, ``driver:d1``).

Security is on by default (``--security on``): the launcher starts
``EV_Registry`` with a fresh admin token (in its environment, never argv),
registers every CP and driver through its HTTPS API
(:mod:`supervisors.provision`), and gives each program its credential file
(``<run>/credentials/*.json``, 0600); Central runs with ``--enroll
registry``. ``--security off`` is the development mode: no registry,
``--enroll open``, nothing authenticated or sealed.

``evcharging up`` (and ``make demo``) also start API_Central, Central's HTTPS
API and web panel (``--api on``), and EV_W, the weather office (``--weather
file``): EV_W reads a weather file written into the run directory, in which
the first CP's city goes through a cold snap every 48 s (at the default
4 s interval), so the demo shows that city's CPs going out of service
("weather") and coming back. The launcher makes the operator token (random,
``<run>/api-token``, 0600: Central and EV_W read that file, it is never an
argument) and prints the panel's URL and that file's path, never the token:
a terminal is often shared or recorded. ``--show-token`` prints a URL with the
token in its fragment (``https://HOST:PORT/#token=…``: the fragment never
leaves the browser; the page moves it into the tab's session storage), for a
terminal that only you see. The browser warns about Central's self-signed
certificate (``<run>/api-cert.pem``; Central logs its fingerprint). As an API
(:class:`Network`, the tests) both are off unless asked for.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import os
import secrets
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Final

from persistence import Repository
from supervisors import options as opt
from supervisors.central_system import API_CERT_FILE, API_TOKEN_FILE, CentralSystemConfig
from supervisors.central_system import READY as CENTRAL_READY
from supervisors.driver_system import DriverConfig
from supervisors.engine_system import EngineConfig
from supervisors.logs import setup_logging
from supervisors.settings import add_arguments, from_args, inherit, internal, setting
from supervisors.weather_system import WeatherSystemConfig
from transport.broker import BrokerUnavailable, KafkaSettings, LocalBroker, ensure_topics, free_port, wait_for_port

log = logging.getLogger("evcharging.launcher")

#: CP ids, locations and prices of the demo network (Spanish cities, as the assignment).
CITIES = [
    ("MAD1", "Madrid, Puerta del Sol", 0.35), ("BCN2", "Barcelona, Diagonal", 0.38),
    ("VLC3", "Valencia, Port", 0.32), ("ALC4", "Alicante, Universidad", 0.30),
    ("SEV5", "Sevilla, Triana", 0.33), ("BIO6", "Bilbao, Abando", 0.36),
    ("ZAR7", "Zaragoza, Delicias", 0.31), ("MAL8", "Málaga, Centro", 0.34),
]


#: The demo's cold snap (°C, one value per EV_W poll, then again): the first CP's city freezes for
#: four polls, so its CPs go out of service and come back, every twelve polls.
COLD_SNAP: Final = (9, 7, 4, 2, 1, -1, -2, -3, -1, 2, 5, 8)
#: The other demo cities' steady temperatures (°C), in CITIES order.
MILD: Final = (14, 17, 19, 18, 12, 15, 20)


def city_of(location: str) -> str:
    """The city of a CP's location ("Madrid, Puerta del Sol" is in Madrid): what EV_W watches."""
    return location.split(",", 1)[0].strip()


def demo_weather(cps: list[tuple[str, str, float]]) -> tuple[list[str], str]:
    """The cities EV_W watches in a demo (those of the demo's named CPs) and its weather file's text:
    a cold snap on the first city, steady mild weather elsewhere."""
    named = {loc for _, loc, _ in CITIES}
    cities = list(dict.fromkeys(city_of(loc) for _, loc, _ in cps if loc in named))
    lines = ["# EV_W's weather for this run (evcharging up): 'City: t1, t2, ...' gives one value per poll,",
             "# '...' repeats the sequence. At or below 0 °C a city's CPs go out of service. Edit me while it runs."]
    for i, city in enumerate(cities):
        values = COLD_SNAP if i == 0 else (MILD[(i - 1) % len(MILD)],)
        lines.append(f"{city}: {', '.join(str(v) for v in values)}{', ...' if len(values) > 1 else ''}")
    return cities, "\n".join(lines) + "\n"


def cp_catalogue(n: int) -> list[tuple[str, str, float]]:
    """``n`` CPs: the demo cities first, then numbered ones."""
    out = list(CITIES[:n])
    out.extend((f"CP{i + 1:03d}", f"Site {i + 1}", 0.30 + (i % 7) * 0.01) for i in range(len(out), n))
    return out


@dataclass
class NetworkSpec:
    """What ``evcharging up`` starts; each field is a flag but the extra arguments and the fault-injection knobs.

    The timings it passes on to the programs take their defaults from the programs' configs.
    """

    run_dir: Path | None = setting(None, help="where logs, databases and journals go (default run/<time>)")
    cps: int = setting(3, help="number of charging points")
    drivers: int = setting(2, help="number of drivers")
    services: int = setting(10, help="services (CP requests) per driver")
    broker: str | None = setting(None, parse=opt.bootstrap,
                                 help="use this Kafka HOST:PORT instead of starting a local broker")
    host: str = setting("127.0.0.1", help="address every component listens on")
    security: str = setting("on", choices=("on", "off"),
                            help="on: a registry, credentials for every CP and driver, authenticated and sealed "
                                 "traffic; off: development mode (Central --enroll open)")
    topic_prefix: str = setting("", help="prefix of every Kafka topic")
    supply_seconds: float = setting(5.0, help="how long each unattended supply lasts")
    plug_delay: float = inherit(EngineConfig, "plug_delay", help="seconds before a CP plugs the vehicle in by itself")
    pause: float = inherit(DriverConfig, "pause", help="seconds a driver waits between services")
    power_kw: float = setting(22.0, help="charging power of every CP")
    tick: float = inherit(EngineConfig, "tick", help="seconds between two telemetry records of a CP")
    panel: str = setting("auto", choices=("auto", "rich", "text", "off"),
                         help="Central's panel in this terminal (auto: rich on a terminal, off otherwise)")
    life_timeout: float = inherit(CentralSystemConfig, "life_timeout",
                                  help="Central: seconds without a life message → DISCONNECTED")
    ready_timeout: float = setting(30.0, help="seconds to wait for Central's Kafka consumers before starting the "
                                              "drivers")
    api: str = setting("off", cli_default="on", choices=("on", "off"),
                       help="API_Central, Central's HTTPS API and web panel (on: its URL and the path of the "
                            "operator token's file are printed; embedded: off)")
    weather: str = setting("off", cli_default="file", choices=("file", "openweather", "off"),
                           help="EV_W, the weather office (needs --api on): 'file' reads --weather-file, "
                                "'openweather' the real service (key from OPENWEATHER_API_KEY or "
                                "EV_OPENWEATHER_KEY_FILE); embedded: off")
    weather_file: str = setting("", help="EV_W's weather file (default: one written into the run directory, "
                                         "with a cold snap on the first CP's city)")
    weather_interval: float = inherit(WeatherSystemConfig, "interval", help="EV_W: seconds between two polls")
    ocpp_chargers: int = setting(0, help="simulated OCPP 1.6J chargers (EV_OCPP_SIM) joining through EV_OCPP, "
                                         "next to the --cps native ones")
    extra_central: list[str] = internal(default_factory=list)
    extra_engine: list[str] = internal(default_factory=list)
    extra_monitor: list[str] = internal(default_factory=list)
    extra_driver: list[str] = internal(default_factory=list)
    # Fault-injection knobs (tests/faults.py puts TCP proxies in these places):
    broker_port: int = internal(0)  # port of the local broker (0: a free one)
    broker_advertised_port: int | None = internal(None)  # the port the local broker advertises (a proxy in front)
    monitor_central: dict[str, str] = internal(default_factory=dict)  # cp_id -> HOST:PORT its Monitor uses for Central
    monitor_engine: dict[str, str] = internal(default_factory=dict)  # cp_id -> HOST:PORT its Monitor uses for Engine
    component_broker: dict[str, str] = internal(default_factory=dict)  # "engine:MAD1", "central", ... -> bootstrap
    central_console: bool = internal(False)  # Central reads its console from a pipe: Network.central_command()

    def resolve(self) -> NetworkSpec:
        """Fill in what depends on the moment (run_dir: run/<time>; panel auto: rich on a terminal); returns self."""
        if self.run_dir is None:
            self.run_dir = Path("run") / time.strftime("%Y%m%d-%H%M%S")
        if self.panel == "auto":
            self.panel = "rich" if sys.stdout.isatty() else "off"
        return self


def python_cmd(program: str, *args: str) -> list[str]:
    """The command line of one of our programs, run by this interpreter."""
    return [sys.executable, "-m", "supervisors.cli", program, *args]


@dataclass
class Proc:
    name: str
    cmd: list[str]
    log_path: Path
    popen: subprocess.Popen[bytes] | None = None
    log_file: IO[bytes] | None = None
    stdin: int | None = subprocess.DEVNULL


class Network:
    """A network of OS processes (see the module docstring)."""

    def __init__(self, spec: NetworkSpec) -> None:
        self.spec = spec.resolve()
        assert spec.run_dir is not None
        self.run_dir = spec.run_dir
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.broker: LocalBroker | None = None
        self.bootstrap = spec.broker or ""
        self.central_port = free_port(spec.host)
        self.db_path = self.run_dir / "central.db"
        self.cps = cp_catalogue(spec.cps)
        self.engine_ports: dict[str, int] = {}
        self.procs: dict[str, Proc] = {}
        self._central_log_offset = 0  # where the current Central run starts in its detail log
        self.secure = spec.security == "on"
        self.credentials_dir = self.run_dir / "credentials"
        self.registry_port = free_port(spec.host) if self.secure else 0
        self.registry_url = f"https://{spec.host}:{self.registry_port}"
        self.registry_ca = self.run_dir / "registry-cert.pem"  # EV_Registry makes it next to the database
        self._registry_token = secrets.token_urlsafe(32)  # the admin token: environment only, never argv or logs
        self._registry_client: Any = None
        self._verifiers: dict[str, bytes] = {}
        if spec.weather != "off" and spec.api != "on":
            raise ValueError("EV_W reaches Central through its API: --weather needs --api on")
        self.api_port = free_port(spec.host) if spec.api == "on" else 0
        self.api_url = f"https://{spec.host}:{self.api_port}"
        self.api_token_file = self.run_dir / API_TOKEN_FILE  # Central's own default name, next to its database
        self.api_ca = self.run_dir / API_CERT_FILE  # Central makes it next to its database
        self.weather_cities: list[str] = []
        self.ocpp_port = free_port(spec.host) if spec.ocpp_chargers else 0
        self.ocpp_cps = [(f"OCPP{i + 1:02d}", f"OCPP site {i + 1}", 0.30) for i in range(spec.ocpp_chargers)]

    # --- lifecycle --------------------------------------------------------------
    def start(self, with_drivers: bool = True) -> Network:
        if not self.bootstrap:
            self.broker = LocalBroker(host=self.spec.host, port=self.spec.broker_port,
                                      advertised_port=self.spec.broker_advertised_port,
                                      log_path=self.run_dir / "broker.log").start()
            self.bootstrap = self.broker.bootstrap
        ensure_topics(KafkaSettings(self.bootstrap, self.spec.topic_prefix))
        if self.secure:
            self.start_registry()
            from supervisors.provision import provision

            provision(self.registry(), self.cps + self.ocpp_cps, [f"driver{i + 1}" for i in range(self.spec.drivers)],
                      self.credentials_dir)
        self.start_central()
        for cp_id, _, _ in self.cps:
            self.start_engine(cp_id)
            self.start_monitor(cp_id)
        if self.ocpp_cps:
            self.start_ocpp()
            self.start_ocpp_sim()
        if self.spec.weather != "off":
            self.start_weather()
        if with_drivers and not self.wait_central_ready():
            log.warning("Central has not said it is ready after %.0f s; starting the drivers anyway "
                        "(their first requests may go unanswered)", self.spec.ready_timeout)
        if with_drivers:
            for i in range(self.spec.drivers):
                self.start_driver(f"driver{i + 1}")
        return self

    def stop(self) -> None:
        """SIGTERM everything (drivers and CPs first, Central last), then SIGKILL stragglers."""
        order = [n for n in self.procs if n.startswith("driver:")] + \
                ["ocpp-sim"] + [n for n in self.procs if n.startswith(("monitor:", "engine:"))] + \
                ["ocpp", "weather", "central", "registry"]
        for name in order:
            self.signal(name, signal.SIGTERM)
        deadline = time.monotonic() + 10
        for name in order:
            p = self.procs.get(name)
            if p and p.popen:
                try:
                    p.popen.wait(max(0.1, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    p.popen.kill()
                    p.popen.wait(5)
            if p and p.popen and p.popen.stdin:
                p.popen.stdin.close()
            if p and p.log_file:
                p.log_file.close()
                p.log_file = None
        if self.broker is not None:
            self.broker.stop()

    def __enter__(self) -> Network:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # --- components --------------------------------------------------------------
    def _common(self, name: str) -> list[str]:
        args = ["--log-file", str(self.run_dir / f"{name.replace(':', '-')}.detail.log")]
        if self.spec.topic_prefix and not name.startswith(("monitor:", "registry", "weather")):  # no Kafka
            args += ["--topic-prefix", self.spec.topic_prefix]
        return args

    def start_registry(self) -> Proc:
        """EV_Registry on Central's database file (its certificate and token files go next to it)."""
        from supervisors.provision import wait_for_registry

        cmd = python_cmd("registry", "--db", str(self.db_path), "--host", self.spec.host,
                         "--port", str(self.registry_port), *self._common("registry"))
        proc = self._spawn("registry", cmd, env={"EV_REGISTRY_TOKEN": self._registry_token})
        try:
            wait_for_registry(self.registry_url, self.registry_ca, 30.0)
        except RuntimeError as exc:
            raise RuntimeError(f"{exc}; see {proc.log_path}") from None
        return proc

    def registry(self) -> Any:
        """A client of the running registry (admin token included)."""
        from transport.registry_api import RegistryClient

        if self._registry_client is None:
            self._registry_client = RegistryClient(self.registry_url, self._registry_token, str(self.registry_ca))
        return self._registry_client

    def credential(self, kind: str, ident: str) -> Path:
        """The credential file of a CP or driver, registering it first when it has none."""
        from supervisors.provision import credential_path, provision

        path = credential_path(self.credentials_dir, kind, ident)
        if not path.exists():
            cps = [c for c in self.cps if c[0] == ident] or [(ident, ident, 0.30)] if kind == "cp" else []
            provision(self.registry(), cps, [ident] if kind == "driver" else [], self.credentials_dir)
        return path

    def driver_verifier(self, driver_id: str) -> bytes | None:
        """A registered driver's verifier (registering it first), for tools that sign as it; None when
        security is off."""
        if not self.secure:
            return None
        if driver_id not in self._verifiers:
            from transport.security import load_credential

            cred = load_credential("driver", driver_id, file=self.credential("driver", driver_id))
            assert cred is not None
            self._verifiers[driver_id] = cred.verifier()
        return self._verifiers[driver_id]

    def start_central(self) -> Proc:
        seed = self.run_dir / "cps.csv"
        with open(seed, "w", newline="", encoding="utf-8") as f:
            csv.writer(f).writerows(self.cps + self.ocpp_cps)
        trust = ["--enroll", "registry"] if self.secure else ["--enroll", "open", "--seed", str(seed)]
        cmd = python_cmd("central", str(self.central_port), self.broker_for("central"), "--db", str(self.db_path),
                         "--host", self.spec.host, *trust, *self._api_args(), "--panel", self.spec.panel,
                         "--life-timeout", str(self.spec.life_timeout),
                         *([] if self.spec.central_console else ["--no-console"]),
                         *self._common("central"), *self.spec.extra_central)
        detail = self.run_dir / "central.detail.log"
        self._central_log_offset = detail.stat().st_size if detail.exists() else 0
        proc = self._spawn("central", cmd, inherit_stdout=self.spec.panel == "rich",
                           stdin_pipe=self.spec.central_console)
        if not wait_for_port(self.spec.host, self.central_port, 20):
            raise RuntimeError(f"Central did not listen on {self.spec.host}:{self.central_port}; see {proc.log_path}")
        if self.api_port and not wait_for_port(self.spec.host, self.api_port, 20):
            raise RuntimeError(f"Central's API did not listen on {self.spec.host}:{self.api_port}; see {proc.log_path}")
        return proc

    def _api_args(self) -> list[str]:
        """Central's API flags: on this network's port with the launcher's token file, or off (Central's
        command line would otherwise open its default port)."""
        if not self.api_port:
            return ["--api-port", "off"]
        if not self.api_token_file.exists():
            from transport.http_common import write_private

            write_private(self.api_token_file, (secrets.token_urlsafe(32) + "\n").encode())
        return ["--api-port", str(self.api_port), "--api-host", self.spec.host,
                "--api-token-file", str(self.api_token_file)]

    def api_token(self) -> str:
        """The operator token of Central's API (for the tests and ``--show-token``; never logged)."""
        return self.api_token_file.read_text(encoding="utf-8").strip()

    def api(self) -> Any:
        """A client of Central's API (operator token included)."""
        from transport.api_client import CentralApiClient

        return CentralApiClient(self.api_url, self.api_token(), str(self.api_ca))

    def weather_file(self) -> Path:
        """EV_W's weather file: ``spec.weather_file``, or the demo's, written into the run directory once."""
        cities, text = demo_weather(self.cps)
        self.weather_cities = cities
        if self.spec.weather_file:
            return Path(self.spec.weather_file)
        path = self.run_dir / "weather.txt"
        if not path.exists():
            path.write_text(text, encoding="utf-8")
        return path

    def start_weather(self) -> Proc:
        """EV_W on Central's API, watching the demo's cities (the list then lives in Central)."""
        provider = ["--provider", "file", "--weather-file", str(self.weather_file())] \
            if self.spec.weather == "file" else ["--provider", "openweather"]
        if self.spec.weather != "file":
            self.weather_cities = demo_weather(self.cps)[0]
        cmd = python_cmd("weather", "--central-url", self.api_url, "--central-ca", str(self.api_ca),
                         "--api-token-file", str(self.api_token_file), *provider,
                         "--interval", str(self.spec.weather_interval), "--watch", ";".join(self.weather_cities),
                         "--no-console", *self._common("weather"))
        return self._spawn("weather", cmd)

    def start_ocpp(self) -> Proc:
        """EV_OCPP, the OCPP 1.6J gateway (docs/ocpp.md), between the simulated chargers and Central."""
        cmd = python_cmd("ocpp", f"{self.spec.host}:{self.central_port}", self.broker_for("ocpp"),
                         "--listen", f"{self.spec.host}:{self.ocpp_port}",
                         "--journal", str(self.run_dir / "ocpp.journal"),
                         "--security", "basic" if self.secure else "none", *self._common("ocpp"))
        proc = self._spawn("ocpp", cmd)
        if not wait_for_port(self.spec.host, self.ocpp_port, 20):
            raise RuntimeError(f"EV_OCPP did not listen on {self.spec.host}:{self.ocpp_port}; see {proc.log_path}")
        return proc

    def start_ocpp_sim(self) -> Proc:
        """Simulated OCPP chargers (the ``ocpp`` library's client) with their registry credentials."""
        ids = [cp for cp, _, _ in self.ocpp_cps]
        for cp in ids:
            self._credential_args("cp", cp, "--x")  # registers it when security is on
        cmd = python_cmd("ocpp-sim", f"ws://{self.spec.host}:{self.ocpp_port}/ocpp", "--chargers", ",".join(ids),
                         *(["--credential-dir", str(self.credentials_dir)] if self.secure else []),
                         "--power-kw", str(self.spec.power_kw), "--meter-interval", str(self.spec.tick),
                         "--supply-seconds", str(self.spec.supply_seconds),
                         "--log-file", str(self.run_dir / "ocpp-sim.detail.log"))  # no Kafka: no --topic-prefix
        return self._spawn("ocpp-sim", cmd)

    def central_command(self, text: str) -> None:
        """Type one line at the running Central's console (``stop all``, ``close S…``); needs
        ``spec.central_console`` (otherwise Central reads no console at all)."""
        if not self.spec.central_console:
            raise RuntimeError("Central was started without a console (NetworkSpec.central_console)")
        p = self.procs["central"]
        if p.popen is None or p.popen.stdin is None or p.popen.poll() is not None:
            raise RuntimeError("Central is not running")
        p.popen.stdin.write(text.strip().encode() + b"\n")
        p.popen.stdin.flush()

    def wait_central_ready(self, timeout: float | None = None) -> bool:
        """Wait until the running Central says its Kafka consumers joined (bounded); True if it did.

        A group join takes seconds (more on a busy machine); a driver started
        before it would see its first requests time out.
        """
        detail = self.run_dir / "central.detail.log"
        deadline = time.monotonic() + (self.spec.ready_timeout if timeout is None else timeout)
        central = self.procs["central"].popen
        while time.monotonic() < deadline and central is not None:
            try:
                with open(detail, "rb") as f:
                    f.seek(self._central_log_offset)
                    if CENTRAL_READY.encode() in f.read():
                        return True
            except OSError:
                pass
            try:
                central.wait(0.05)
                return False  # Central exited
            except subprocess.TimeoutExpired:
                pass
        return False

    def start_engine(self, cp_id: str) -> Proc:
        port = self.engine_ports.setdefault(cp_id, free_port(self.spec.host))
        cmd = python_cmd("engine", self.broker_for(f"engine:{cp_id}"), "--listen", f"{self.spec.host}:{port}",
                         "--cp-id", cp_id,
                         "--journal", str(self.run_dir / f"engine-{cp_id}.journal.db"), "--auto-plug",
                         "--plug-delay", str(self.spec.plug_delay), "--supply-seconds", str(self.spec.supply_seconds),
                         "--power-kw", str(self.spec.power_kw), "--tick", str(self.spec.tick), "--no-console",
                         *self._credential_args("cp", cp_id, "--credential-file"),
                         *self._common(f"engine:{cp_id}"), *self.spec.extra_engine)
        proc = self._spawn(f"engine:{cp_id}", cmd)
        wait_for_port(self.spec.host, port, 20)
        return proc

    def start_monitor(self, cp_id: str) -> Proc:
        location = next((loc for cp, loc, _ in self.cps if cp == cp_id), cp_id)
        engine = self.spec.monitor_engine.get(cp_id, f"{self.spec.host}:{self.engine_ports[cp_id]}")
        central = self.spec.monitor_central.get(cp_id, f"{self.spec.host}:{self.central_port}")
        cmd = python_cmd("monitor", engine, central, cp_id, "--location", location,
                         *self._credential_args("cp", cp_id, "--credential-file"),
                         *self._common(f"monitor:{cp_id}"), *self.spec.extra_monitor)
        return self._spawn(f"monitor:{cp_id}", cmd)

    def services_file(self, driver_id: str, index: int) -> Path:
        path = self.run_dir / f"{driver_id}.services"
        if not path.exists():
            ids = [cp for cp, _, _ in self.cps + self.ocpp_cps]
            lines = [ids[(index + k) % len(ids)] for k in range(self.spec.services)]
            path.write_text("\n".join(lines) + "\n", encoding="utf-8")
        return path

    def start_driver(self, driver_id: str) -> Proc:
        index = int("".join(ch for ch in driver_id if ch.isdigit()) or "0")
        cmd = python_cmd("driver", self.broker_for(f"driver:{driver_id}"), driver_id,
                         "--services", str(self.services_file(driver_id, index)),
                         "--pause", str(self.spec.pause), "--exit-when-done", "--no-console",
                         "--results-json", str(self.run_dir / f"{driver_id}.results.json"),
                         *self._credential_args("driver", driver_id, "--secret-file"),
                         *self._common(f"driver:{driver_id}"), *self.spec.extra_driver)
        return self._spawn(f"driver:{driver_id}", cmd)

    def _credential_args(self, kind: str, ident: str, flag: str) -> list[str]:
        return [flag, str(self.credential(kind, ident))] if self.secure else []

    def broker_for(self, name: str) -> str:
        """The Kafka bootstrap component ``name`` is given (``spec.component_broker`` or the network's).

        Kafka clients only bootstrap there: they then connect to what the
        broker advertises, so a proxy given here must also be what it advertises.
        """
        return self.spec.component_broker.get(name, self.bootstrap)

    def _spawn(self, name: str, cmd: list[str], inherit_stdout: bool = False, stdin_pipe: bool = False,
               env: dict[str, str] | None = None) -> Proc:
        old = self.procs.get(name)
        if old and old.popen and old.popen.poll() is None:
            raise RuntimeError(f"{name} is already running (pid {old.popen.pid})")
        log_path = self.run_dir / f"{name.replace(':', '-')}.log"
        log_file = open(log_path, "ab")  # noqa: SIM115 -- the child's output while it runs; closed in stop()
        child_env = dict(os.environ, PYTHONUNBUFFERED="1", **(env or {}))
        stdin = subprocess.PIPE if stdin_pipe else subprocess.DEVNULL
        popen = subprocess.Popen(cmd, stdin=stdin, stdout=None if inherit_stdout else log_file,
                                 stderr=log_file, env=child_env)
        proc = Proc(name, cmd, log_path, popen, log_file, stdin)
        self.procs[name] = proc
        log.debug("started %s (pid %d): %s", name, popen.pid, " ".join(cmd))
        return proc

    # --- fault injection -----------------------------------------------------------
    def signal(self, name: str, sig: int) -> None:
        p = self.procs.get(name)
        if p and p.popen and p.popen.poll() is None:
            p.popen.send_signal(sig)

    def kill(self, name: str) -> None:
        """SIGKILL one component (no cleanup at all, like a pulled plug)."""
        p = self.procs[name]
        assert p.popen is not None
        p.popen.kill()
        p.popen.wait(10)
        if p.popen.stdin:
            p.popen.stdin.close()

    def restart(self, name: str) -> Proc:
        kind, _, ident = name.partition(":")
        if kind == "registry":
            return self.start_registry()
        if kind == "central":
            return self.start_central()
        if kind == "engine":
            return self.start_engine(ident)
        if kind == "monitor":
            return self.start_monitor(ident)
        if kind == "driver":
            return self.start_driver(ident)
        if kind == "weather":
            return self.start_weather()
        raise ValueError(f"unknown component {name!r}")

    def pid(self, name: str) -> int:
        """The OS process id of a running component (for /proc reads such as its memory)."""
        p = self.procs[name]
        assert p.popen is not None
        return p.popen.pid

    def alive(self, name: str) -> bool:
        p = self.procs.get(name)
        return bool(p and p.popen and p.popen.poll() is None)

    def drivers_running(self) -> list[str]:
        return [n for n in self.procs if n.startswith("driver:") and self.alive(n)]

    # --- results -------------------------------------------------------------------
    def summary(self) -> dict[str, Any]:
        """Sessions, tickets, totals and per-driver results, from Central's DB and the drivers' files."""
        with Repository(self.db_path) as repo:
            tickets = repo.tickets()
            stats = repo.stats()
            sessions = [repo.get_session(t.session_id) for t in tickets]
            cps = {c.cp_id: {"state": c.state, "price_eur_kwh": c.price_eur_kwh} for c in repo.list_cps()}
        drivers = {}
        for name in sorted(self.procs):
            if name.startswith("driver:"):
                ident = name.split(":", 1)[1]
                path = self.run_dir / f"{ident}.results.json"
                drivers[ident] = json.loads(path.read_text()) if path.exists() else None
        return {
            "sessions": stats["sessions"],
            "tickets": [
                {"session_id": t.session_id, "driver_id": t.driver_id, "cp_id": t.cp_id, "energy_kwh": t.energy_kwh,
                 "price_eur_kwh": t.price_eur_kwh, "cost_eur": t.cost_eur, "end_reason": t.end_reason}
                for t in tickets
            ],
            "completed_sessions": [s.session_id for s in sessions if s and s.status == "completed"],
            "totals": {"tickets": len(tickets), "energy_kwh": round(sum(t.energy_kwh for t in tickets), 6),
                       "cost_eur": round(sum(t.cost_eur for t in tickets), 2)},
            "cps": cps,
            "drivers": drivers,
            "run_dir": str(self.run_dir),
        }


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="evcharging", description="Run a whole EV charging network on this machine.")
    sub = p.add_subparsers(dest="command", required=True)
    up = sub.add_parser("up", help="start broker, Central, CPs and drivers as separate processes")
    add_arguments(up, NetworkSpec)
    opt.add(up, "--until-idle", action="store_true", default=False,
            help="exit when every driver finished its services")
    opt.add(up, "--summary-json", default=None, help="write the run's summary here (with --until-idle)")
    opt.add(up, "--show-token", action="store_true", default=False,
            help="also print the web panel's URL with the operator token in it (…/#token=…): only on a terminal "
                 "nobody else sees; by default only the token file's path is printed")
    return p


def panel_lines(net: Network, show_token: bool) -> list[str]:
    """What ``evcharging up`` tells the person about the web panel: its URL and where the token is."""
    url = net.api_url + "/"
    lines = [f"Web panel: {url} (operator token in {net.api_token_file}; Central's certificate is self-signed: "
             f"{net.api_ca})"]
    if net.spec.weather != "off":
        where = f"the weather file {net.weather_file()}" if net.spec.weather == "file" else "OpenWeather"
        lines.append(f"EV_W watches {', '.join(net.weather_cities) or 'no city'} from {where}"
                     + (f"; {net.weather_cities[0]} has a cold snap" if net.spec.weather == "file"
                        and not net.spec.weather_file and net.weather_cities else ""))
    if not show_token:
        lines.append("Give --show-token to print a URL that logs in (only on a terminal nobody else sees)")
    return lines


def main(argv: list[str]) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    spec = from_args(NetworkSpec, args).resolve()
    assert spec.run_dir is not None
    if spec.weather != "off" and spec.api != "on":
        parser.error("EV_W reaches Central through its API: --weather needs --api on (or --weather off)")
    run_dir, panel = spec.run_dir, spec.panel
    setup_logging("evcharging", "", log_file=run_dir / "launcher.log")
    net = Network(spec)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        log.info("Starting a network of %d CPs and %d drivers; logs in %s", spec.cps, spec.drivers, run_dir)
        net.start()
        if panel != "rich":
            log.info("Central listens on %s:%d, Kafka at %s", spec.host, net.central_port, net.bootstrap)
        if spec.api == "on":
            for line in panel_lines(net, args.show_token):
                log.info("%s", line)
            if args.show_token:  # to the terminal only: never into launcher.log
                print(f"Web panel, logged in: {net.api_url}/#token={net.api_token()}", flush=True)
        while not stop.wait(0.25):
            if args.until_idle and not net.drivers_running():
                break
            if not net.alive("central"):
                log.error("Central exited; see %s", net.procs["central"].log_path)
                break
        code = 0
    except (BrokerUnavailable, RuntimeError, OSError) as exc:
        log.error("Cannot start the network: %s", exc)
        code = 1
    finally:
        summary = None
        try:
            if net.db_path.exists():
                summary = net.summary()
        except Exception as exc:
            log.error("Cannot read the run's summary: %s", exc)
        net.stop()
    if summary is not None:
        t = summary["totals"]
        log.info("Run finished: %d tickets, %.3f kWh, %.2f € — details in %s", t["tickets"], t["energy_kwh"],
                 t["cost_eur"], run_dir)
        if args.summary_json:
            Path(args.summary_json).write_text(json.dumps(summary, indent=2), encoding="utf-8")
    return code
