"""Central's actor system: wiring, the embedding API and the EV_Central command.

Supervision tree (one_for_one)::

    central (top)
    ├─ ledger            LedgerActor: sessions + tickets, the money (SQLite)
    ├─ publisher         Publisher: driver_responses
    ├─ sessions          Supervisor of SessionActor "session:<id>" (temporary)
    ├─ monitor-conns     Supervisor of ServerConnection, one per Monitor (temporary)
    ├─ central           CentralActor: registry, states, authorisation, admin
    ├─ panel             PanelActor: renders snapshots
    ├─ router            SessionRouter: Engine records → session actors
    ├─ requests-pump     ConsumerPump driver_requests → central
    ├─ sessions-pump     ConsumerPump charging_session_data + _complete → router
    ├─ monitor-listener  Listener: Monitor sockets → monitor-conns
    └─ console           ConsoleReader: typed commands → central

Order matters: the ledger and central (which reloads live sessions and
recreates their actors) start before the pumps, so a replayed record always
finds its owner.
"""

from __future__ import annotations

import argparse
import csv
import logging
import time
from dataclasses import dataclass

from actors.central import CentralActor, CentralConfig
from actors.console import ConsoleReader
from actors.ledger import LedgerActor
from actors.panel import PanelActor
from actors.router import SessionRouter
from persistence import Repository
from supervisors import options as opt
from supervisors.logs import setup_logging
from supervisors.supervisor import ChildSpec, Supervisor, spawner_by_name
from supervisors.system import RunningSystem, run_until_signal, start_system
from transport.broker import BrokerUnavailable, KafkaSettings, ensure_topics
from transport.kafka import ConsumerPump, Publisher
from transport.listener import Listener
from transport.runtime import Directory

log = logging.getLogger("evcharging.central")


@dataclass(frozen=True, slots=True)
class CentralSystemConfig:
    """Everything EV_Central needs; each field is a flag."""

    port: int
    broker: str
    db_path: str = "central.db"
    host: str = "0.0.0.0"
    topic_prefix: str = ""
    enroll: str = "open"
    default_price: float = 0.30
    life_timeout: float = 2.5
    authorize_timeout: float = 5.0
    request_max_age: float = 10.0
    panel: str = "off"
    console: bool = False
    group_id: str = "evcharging-central"
    max_monitors: int = 5000


def seed_cps(db_path: str, path: str) -> int:
    """Load ``id,location,price`` lines (CSV) into Central's database."""
    n = 0
    with Repository(db_path) as repo, open(path, newline="") as f:
        for row in csv.reader(f):
            if not row or row[0].strip().startswith("#"):
                continue
            cp_id, location, price = (c.strip() for c in row[:3])
            repo.upsert_cp(cp_id, location, float(price))
            n += 1
    return n


#: Records per poll of the telemetry pump. A catching-up Central (after a restart, a burst)
#: gets more readings of each session per poll, and applies them as one (see SessionRouter).
SESSIONS_POLL_RECORDS = 2000


def start_central(config: CentralSystemConfig) -> RunningSystem:
    """Start Central in this process; returns once every child was started."""
    settings = KafkaSettings(bootstrap=config.broker, topic_prefix=config.topic_prefix)
    try:
        ensure_topics(settings, timeout=5.0)
    except BrokerUnavailable as exc:
        log.warning("%s — Central starts anyway and keeps retrying", exc)
    directory = Directory()
    central_cfg = CentralConfig(db_path=config.db_path, enroll=config.enroll, default_price=config.default_price,
                                life_timeout=config.life_timeout, authorize_timeout=config.authorize_timeout,
                                request_max_age=config.request_max_age)
    children = [
        ChildSpec("ledger", LedgerActor, (config.db_path,)),
        ChildSpec("publisher", Publisher, (settings,), {"component": "central"}),
        ChildSpec("sessions", Supervisor, ("sessions",), {"directory": directory, "max_restarts": 1000}),
        ChildSpec("monitor-conns", Supervisor, ("monitor-conns",), {"directory": directory, "max_restarts": 1000}),
        ChildSpec("central", CentralActor, (central_cfg, directory, spawner_by_name(directory, "sessions"))),
        ChildSpec("panel", PanelActor, (config.panel,)),
        ChildSpec("router", SessionRouter, (directory,)),
        ChildSpec("requests-pump", ConsumerPump, (settings, ("driver_requests",), "central", directory),
                  {"group_id": config.topic_prefix + config.group_id, "component": "central-requests"}),
        ChildSpec("sessions-pump", ConsumerPump,
                  (settings, ("charging_session_data", "charging_session_complete"), "router", directory),
                  {"group_id": config.topic_prefix + config.group_id + "-sessions", "component": "central-sessions",
                   "max_records": SESSIONS_POLL_RECORDS}),
        ChildSpec("monitor-listener", Listener,
                  (config.host, config.port, "central", directory, spawner_by_name(directory, "monitor-conns")),
                  {"max_connections": config.max_monitors, "component": "central-listener"}),
    ]
    if config.console:
        children.append(ChildSpec("console", ConsoleReader, ("central", directory)))
    return start_system("central", children, directory, max_restarts=10, period=30)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="EV_Central",
        description="Central of the EV charging network: CP registry, authorisation, billing, live panel.")
    opt.positional_or_env(p, "port", "EV_CENTRAL_PORT", "TCP port the Monitors connect to", type=int)
    opt.positional_or_env(p, "broker", "EV_BROKER", "Kafka bootstrap HOST:PORT")
    opt.add(p, "--db", default="central.db", help="SQLite database file")
    opt.add(p, "--host", default="0.0.0.0", help="address to listen on for Monitors")
    opt.add(p, "--topic-prefix", default="", help="prefix of every Kafka topic (isolation)")
    opt.add(p, "--enroll", default="open", choices=("open", "closed"), help="unknown CPs: enrol or deny")
    opt.add(p, "--default-price", default=0.30, type=float, help="€/kWh of a newly enrolled CP")
    opt.add(p, "--seed", default=None, help="CSV file of id,location,price to load at start")
    opt.add(p, "--life-timeout", default=2.5, type=float, help="seconds without a life message → DISCONNECTED")
    opt.add(p, "--authorize-timeout", default=5.0, type=float, help="seconds to wait for a CP's authorisation")
    opt.add(p, "--request-max-age", default=10.0, type=float,
            help="charge requests older than this (sent while Central was down) are denied")
    opt.add(p, "--panel", default="rich", choices=("rich", "text", "off"),
            help="live terminal panel; 'off' gives plain log lines")
    opt.add(p, "--group-id", default="evcharging-central", help="Kafka consumer group of Central (the topic prefix is prepended)")
    opt.add(p, "--log-file", default=None, help="file for detailed logs")
    opt.add(p, "--log-level", default="INFO", help="terminal log level")
    opt.add(p, "--no-console", action="store_true", default=False, help="do not read commands from stdin")
    return p


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    panel_on = args.panel == "rich"
    setup_logging("central", "", log_file=args.log_file, level=args.log_level, console=not panel_on)
    if args.seed:
        try:
            log.info("Loaded %d CPs from %s", seed_cps(args.db, args.seed), args.seed)
        except (OSError, ValueError, IndexError) as exc:
            log.error("Cannot load the CP seed file %s: %s", args.seed, exc)
            return 2
    config = CentralSystemConfig(
        port=args.port, broker=args.broker, db_path=args.db, host=args.host, topic_prefix=args.topic_prefix,
        enroll=args.enroll, default_price=args.default_price, life_timeout=args.life_timeout,
        authorize_timeout=args.authorize_timeout, request_max_age=args.request_max_age, panel=args.panel, console=not args.no_console,
        group_id=args.group_id)
    return run_until_signal(lambda: start_central(config), RunningSystem.stop, "Central", lambda s: _ready_line(s, config),
                            log)


READY = "Central is ready"  # the launcher waits for this line before starting drivers


def _ready_line(system: RunningSystem, config: CentralSystemConfig, timeout: float = 30.0) -> str:
    """Wait (bounded) until Central's Kafka consumers joined their groups; say so."""
    log.info("Central listening on %s:%d, Kafka at %s — joining the consumer groups", config.host, config.port,
             config.broker)
    started = time.monotonic()
    if system.wait_ready(timeout):
        return f"{READY}: Kafka consumers joined in {time.monotonic() - started:.1f} s"
    return (f"Central's Kafka consumers have not joined after {timeout:g} s — driver requests are answered "
            "as soon as they do")


if __name__ == "__main__":  # pragma: no cover
    import sys

    raise SystemExit(main(sys.argv[1:]))
