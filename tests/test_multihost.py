"""Multi-host deployment (SPEC §6).

Two parts:

* the deployment files: ``docker-compose.yml`` (every program, EV_W and EV_OCPP included) is read (with PyYAML, noting
  what YAML 1.1 and 1.2 read differently) and every service is checked
  against the real programs — each ``EV_*`` variable is a flag's twin of the
  program the service runs, the environment alone makes a complete command
  line, ``depends_on`` targets, health checks, volumes and Kafka's listeners
  agree; the ``Dockerfile`` copies and installs what the services run; and
  ``docker compose config`` validates the file where a Compose is installed;
* three hosts on one machine (network namespaces, tests/netns.py): Kafka
  (Tansu, advertising host 1's address) and Central on host 1, two CPs on
  host 2, drivers on host 3. Supplies complete across them, then host 2's
  link is cut (5 s, and 12 s) in the middle of supplies: Central marks the
  CPs DISCONNECTED and refuses a driver who comes along meanwhile, they come
  back ACTIVE, and each supply in progress ends in exactly one ticket
  (SPEC §3). Needs root; skipped with the reason otherwise. Also: the
  broker-advertises-loopback pitfall, and a regression test for Central
  crashing on a frame from a connection that had just closed (found by the
  long cut).
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import sqlite3
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from configparser import ConfigParser
from pathlib import Path
from typing import Any

import pytest
import yaml

from persistence import bill_cents
from supervisors import options
from supervisors.launcher import python_cmd
from tests import fault_matrix
from tests.netns import Lab, unavailable
from tests.waiting import wait_until

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"


# =====================================================================================
# docker-compose.yml through PyYAML, noting what YAML 1.1 and YAML 1.2 read differently.
# =====================================================================================
class ComposeLoader(yaml.SafeLoader):
    """PyYAML's safe loader (YAML 1.1, as docker-compose 1.x reads) that also refuses duplicate keys (Compose v2
    does) and notes the plain scalars YAML 1.2 (Compose v2) reads differently: ``on``/``off``/``yes``/``no``
    (booleans in 1.1, strings in 1.2) and integers such as ``010`` or ``1:30`` (octal and base 60 in 1.1)."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self.ambiguous: list[str] = []

    def construct_yaml_bool(self, node: yaml.ScalarNode) -> bool:
        if node.value.lower() not in ("true", "false"):
            self.ambiguous.append(node.value)
        return super().construct_yaml_bool(node)

    def construct_yaml_int(self, node: yaml.ScalarNode) -> int:
        if not re.fullmatch(r"[-+]?(0|[1-9][0-9]*)", node.value):
            self.ambiguous.append(node.value)
        return super().construct_yaml_int(node)

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue  # keys a merge brings in may be overridden
            key = self.construct_object(key_node, deep=True)
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep)


ComposeLoader.add_constructor("tag:yaml.org,2002:bool", ComposeLoader.construct_yaml_bool)
ComposeLoader.add_constructor("tag:yaml.org,2002:int", ComposeLoader.construct_yaml_int)


def load_yaml(text: str) -> tuple[Any, list[str]]:
    """The document and the plain scalars that YAML 1.1 and 1.2 readers would read differently."""
    loader = ComposeLoader(text)
    try:
        return loader.get_single_data(), loader.ambiguous
    finally:
        loader.dispose()


# --- compose helpers --------------------------------------------------------------------
_VAR = re.compile(r"\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?-)([^}]*))?\}|\$([A-Za-z_][A-Za-z0-9_]*)")


def interpolate(value: Any, env: dict[str, str], missing: list[str] | None = None) -> Any:
    """Compose's ${VAR}, ${VAR:-default}, ${VAR-default} and $$, with ``env`` as the shell's environment."""
    if isinstance(value, dict):
        return {k: interpolate(v, env, missing) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env, missing) for v in value]
    if not isinstance(value, str):
        return value

    def sub(m: re.Match[str]) -> str:
        if m.group(0) == "$$":
            return "$"
        name = m.group(1) or m.group(4)
        op, default = m.group(2), m.group(3)
        if name in env and (env[name] != "" or op != ":-"):
            return env[name]
        if op is None and missing is not None:
            missing.append(name)
        return default or ""

    return _VAR.sub(sub, value)


def env_map(service: dict[str, Any]) -> dict[str, str]:
    """A service's environment as strings (list or mapping form)."""
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) if "=" in item else (item, "") for item in env)
    return {k: ("" if v is None else str(v).lower() if isinstance(v, bool) else str(v)) for k, v in env.items()}


def console_scripts() -> dict[str, str]:
    cfg = ConfigParser()
    cfg.read(ROOT / "setup.cfg", encoding="utf-8")
    lines = cfg["options.entry_points"]["console_scripts"].strip().splitlines()
    return {name.strip(): target.strip() for name, _, target in (line.partition("=") for line in lines)}


def program_module(script: str) -> Any:
    """The *_system module of a console script (its build_parser is the program's parser)."""
    import importlib

    target = console_scripts()[script]  # e.g. supervisors.cli:central_main
    kind = target.rsplit(":", 1)[1].removesuffix("_main")
    return importlib.import_module({"central": "supervisors.central_system", "engine": "supervisors.engine_system",
                                    "monitor": "supervisors.monitor_system", "registry": "supervisors.registry_system",
                                    "driver": "supervisors.driver_system", "weather": "supervisors.weather_system",
                                    "ocpp": "supervisors.ocpp_system", "ocpp_sim": "supervisors.ocpp_sim"}[kind])


def accepted_env(parser: Any) -> set[str]:
    """Every EV_* variable a program reads: flag twins and the positionals' own names."""
    names = set()
    for action in parser._actions:
        longs = [s for s in action.option_strings if s.startswith("--")]
        if longs and longs[0] != "--help":
            names.add(options.env_name(longs[0]))
        names.update(re.findall(r"\benv (EV_[A-Z0-9_]+)", action.help or ""))
    return names


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    data, _ = load_yaml(COMPOSE.read_text(encoding="utf-8"))
    return data


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return interpolate(compose["services"], {})  # as `docker compose up` sees them with an empty environment


APP_SCRIPTS = ("EV_Central", "EV_CP_E", "EV_CP_M", "EV_Driver", "EV_Registry", "EV_W", "EV_OCPP", "EV_OCPP_SIM")


def test_the_compose_file_reads_the_same_in_yaml_1_1_and_1_2() -> None:
    data, ambiguous = load_yaml(COMPOSE.read_text(encoding="utf-8"))
    assert not ambiguous, (f"quote {ambiguous}: YAML 1.1 readers (docker-compose 1.x) and YAML 1.2 ones "
                           "(Compose v2) read them differently")
    assert isinstance(data, dict) and isinstance(data.get("services"), dict) and data["services"]


def test_the_compose_loader_flags_what_yaml_1_1_and_1_2_read_differently() -> None:
    text = """
x-a: &a
  build: .   # a comment
  environment: &e
    A: "1"
    B: 'it''s # not a comment'
s:
  one:
    <<: *a
    environment:
      <<: *e
      A: "2"
      C: ${X:-d}
    command: ["python", "-c", "print('a, b: [c]')"]
    depends_on: {x: {condition: service_healthy}}
    ports:
      - "1:2"
      - name: x
        n: 3
"""
    data, ambiguous = load_yaml(text)
    one = data["s"]["one"]
    assert one["build"] == "." and one["environment"] == {"A": "2", "B": "it's # not a comment", "C": "${X:-d}"}
    assert one["command"] == ["python", "-c", "print('a, b: [c]')"]
    assert one["depends_on"] == {"x": {"condition": "service_healthy"}}
    assert one["ports"] == ["1:2", {"name": "x", "n": 3}]
    assert ambiguous == []
    assert interpolate(one["environment"], {"X": "y"})["C"] == "y" and interpolate("${X:-d}", {}) == "d"
    assert load_yaml("a: off\nb: true\nc: 010\nd: 1:30\ne: 10\n")[1] == ["off", "010", "1:30"]
    with pytest.raises(yaml.YAMLError, match="duplicate key 'b'"):
        load_yaml("a:\n  b: 1\n  b: 2\n")


def test_every_app_service_runs_a_program_whose_flags_its_environment_names(
        services: dict[str, dict[str, Any]], monkeypatch: pytest.MonkeyPatch) -> None:
    scripts = console_scripts()
    checked = set()
    for name, svc in services.items():
        if "build" not in svc:
            continue  # Kafka: the official image
        assert svc["build"] in (".", {"context": "."}), f"{name}: every program is built from the one Dockerfile"
        command = svc.get("command")
        assert isinstance(command, list) and command, f"{name}: command must be an exec-form list"
        env = env_map(svc)
        if command[0] not in APP_SCRIPTS:
            assert command[0] == "python" and name in ("kafka-init", "provision"), f"{name}: runs {command[0]!r}"
            if name == "provision":  # its flags: python -m supervisors.provision, env read by os.environ
                from supervisors import provision

                src = Path(provision.__file__).read_text(encoding="utf-8")
                unknown = sorted(k for k in env if k.startswith("EV_") and f'"{k}"' not in src)
                assert not unknown, f"provision sets {unknown}, which supervisors/provision.py does not read"
            continue
        assert command[0] in scripts, f"{name}: {command[0]} is not an installed console script"
        module = program_module(command[0])
        accepted = accepted_env(module.build_parser())
        unknown = sorted(k for k in env if k.startswith("EV_") and k not in accepted)
        assert not unknown, f"{name} ({command[0]}) sets {unknown}, which it does not read; it reads {sorted(accepted)}"
        # The environment alone (plus the command's own arguments) must make a complete, valid command line.
        for key in [k for k in os.environ if k.startswith("EV_")]:
            monkeypatch.delenv(key)
        for key, value in env.items():
            monkeypatch.setenv(key, value)
        try:
            args = module.build_parser().parse_args(command[1:])
        except SystemExit as exc:
            pytest.fail(f"{name}: {command[0]} rejects the service's environment {env} (exit {exc.code})")
        if hasattr(module, "config_from_args"):
            problem = module.check_config(module.config_from_args(args))
            assert problem is None, f"{name}: {problem}"
        if command[0] == "EV_Central":
            assert args.no_console, f"{name}: a container has no terminal: set EV_NO_CONSOLE"
            assert args.panel != "rich", f"{name}: the rich panel needs a terminal: set EV_PANEL to off or text"
            assert args.db.startswith("/data/"), f"{name}: Central's database must be on its volume"
        if command[0] == "EV_CP_E":
            assert args.no_console and args.auto_plug, f"{name}: an Engine in a container runs unattended"
            assert args.journal and args.journal.startswith("/data/"), f"{name}: the journal must be on the volume"
            assert args.listen[0] == "0.0.0.0", f"{name}: the Engine must listen on all interfaces"
        if command[0] == "EV_Driver" and args.services:
            mounted = {m.split(":")[1]: m.split(":")[0] for m in svc.get("volumes", []) if m.startswith("./")}
            folder = next((t for t in mounted if args.services.startswith(t + "/")), None)
            assert folder, f"{name}: {args.services} is not in a mounted folder"
            local = ROOT / mounted[folder] / args.services[len(folder) + 1:]
            assert module.read_services(local), f"{name}: {local} has no CP ids"
        checked.add(command[0])
    assert checked == set(APP_SCRIPTS), f"compose runs {sorted(checked)}; every program should be there"


def test_compose_wiring_depends_on_volumes_healthchecks_and_kafka_listeners(
        compose: dict[str, Any], services: dict[str, dict[str, Any]]) -> None:
    missing: list[str] = []
    interpolate(compose, {}, missing)
    assert not missing, f"variables without a default (compose up would need a .env): {missing}"
    volumes = set((compose.get("volumes") or {}).keys())
    used_volumes = set()
    for name, svc in services.items():
        deps = svc.get("depends_on") or {}
        deps = {d: {"condition": "service_started"} for d in deps} if isinstance(deps, list) else deps
        for dep, spec in deps.items():
            assert dep in services and dep != name, f"{name} depends on unknown service {dep!r}"
            condition = spec.get("condition", "service_started")
            assert condition in ("service_started", "service_healthy", "service_completed_successfully")
            if condition == "service_healthy":
                assert "healthcheck" in services[dep], f"{name} waits for {dep} to be healthy: it has no healthcheck"
            if condition == "service_completed_successfully":
                assert services[dep].get("restart") == "no", f"{dep} must run once (restart: \"no\")"
        assert svc.get("restart") in ("no", "unless-stopped", "always", "on-failure"), f"{name}: restart policy"
        for mount in svc.get("volumes", []):
            source, target = mount.split(":")[:2]
            assert target.startswith("/"), f"{name}: {mount}"
            if source.startswith((".", "/")):
                assert (ROOT / source).exists(), f"{name}: bind mount {source} does not exist"
            else:
                assert source in volumes, f"{name}: volume {source} is not declared at the top level"
                used_volumes.add(source)
        check = svc.get("healthcheck")
        if check:
            test = check["test"]
            assert test[0] in ("CMD", "CMD-SHELL"), f"{name}: healthcheck test {test}"
            if test[:3] == ["CMD", "python", "-c"]:
                compile(test[3], f"{name} healthcheck", "exec")
    assert used_volumes == volumes, f"declared but unused volumes: {volumes - used_volumes}"

    # Kafka: listeners, advertised addresses and the clients' bootstrap agree.
    kafka = env_map(services["kafka"])
    listeners = dict(entry.split("://") for entry in kafka["KAFKA_LISTENERS"].split(","))
    advertised = dict(entry.split("://") for entry in kafka["KAFKA_ADVERTISED_LISTENERS"].split(","))
    protocols = dict(p.split(":") for p in kafka["KAFKA_LISTENER_SECURITY_PROTOCOL_MAP"].split(","))
    assert set(listeners) == set(protocols) and set(advertised) <= set(listeners)
    assert kafka["KAFKA_CONTROLLER_LISTENER_NAMES"] in listeners
    assert kafka["KAFKA_CONTROLLER_LISTENER_NAMES"] not in advertised
    assert kafka["KAFKA_INTER_BROKER_LISTENER_NAME"] in advertised
    voter = kafka["KAFKA_CONTROLLER_QUORUM_VOTERS"].split("@")[1]
    controller_port = listeners[kafka["KAFKA_CONTROLLER_LISTENER_NAMES"]].split(":")[-1]
    assert voter == f"{services['kafka']['hostname']}:{controller_port}"
    assert kafka["KAFKA_LOG_DIRS"] in [m.split(":")[1] for m in services["kafka"]["volumes"]], \
        "Kafka's log.dirs must be its volume (the image's default is /tmp)"
    cluster_id = kafka["CLUSTER_ID"]
    assert len(base64.urlsafe_b64decode(cluster_id + "==")) == 16 and len(cluster_id) == 22, "CLUSTER_ID: a base64 UUID"
    assert kafka["KAFKA_AUTO_CREATE_TOPICS_ENABLE"] == "false" and "kafka-init" in services
    internal = advertised[kafka["KAFKA_INTER_BROKER_LISTENER_NAME"]]
    external_port = advertised["EXTERNAL"].rsplit(":", 1)[1]
    published = [p.split(":") for p in services["kafka"]["ports"]]
    assert [external_port, listeners["EXTERNAL"].rsplit(":", 1)[1]] in published, \
        "the published port must be the advertised EXTERNAL port (mapped to the EXTERNAL listener)"
    raw_advertised = env_map(compose["services"]["kafka"])["KAFKA_ADVERTISED_LISTENERS"]
    assert "EXTERNAL://${KAFKA_ADVERTISED" in raw_advertised, "the external advertised address must be settable"

    # Each program's addresses point at the service that serves them.
    for name, svc in services.items():
        env, command = env_map(svc), svc.get("command") or [""]
        if "EV_BROKER" in env:
            assert env["EV_BROKER"] == internal, f"{name}: EV_BROKER must default to Kafka's internal listener"
            assert "kafka-init" in (svc.get("depends_on") or {}) or name == "kafka-init" or command[0] == "EV_Driver"
        if command[0] == "EV_CP_M":
            engine_host, engine_port = env["EV_ENGINE"].rsplit(":", 1)
            engine = env_map(services[engine_host])
            assert engine_port == engine["EV_LISTEN"].rsplit(":", 1)[1], f"{name}: wrong Engine port"
            assert env["EV_CP_ID"] == engine["EV_CP_ID"], f"{name}: Monitor and Engine disagree on the CP id"
            central_host, central_port = env["EV_CENTRAL"].rsplit(":", 1)
            assert central_host in services and central_port == env_map(services[central_host])["EV_CENTRAL_PORT"]
            raw = env_map(compose["services"][name])["EV_CENTRAL"]
            assert raw.startswith("${EV_CENTRAL:-"), f"{name}: Central's address must be settable (CPs elsewhere)"
        if command[0] == "EV_OCPP":
            central_host, central_port = env["EV_CENTRAL"].rsplit(":", 1)
            assert central_host in services and central_port == env_map(services[central_host])["EV_CENTRAL_PORT"]
            assert env["EV_JOURNAL"].startswith("/data/") and any(
                m.split(":")[1] == "/data" for m in svc["volumes"]), f"{name}: the journal must be on a volume"
            listen_host, listen_port = env["EV_LISTEN"].rsplit(":", 1)
            assert listen_host == "0.0.0.0" and [p.split(":")[1] for p in svc["ports"]] == [listen_port]
        if command[0] == "EV_OCPP_SIM":
            url = re.fullmatch(r"ws://([a-z0-9-]+):(\d+)/(.*)", env["EV_OCPP_URL"])
            assert url, f"{name}: EV_OCPP_URL {env['EV_OCPP_URL']!r}"
            gateway = env_map(services[url.group(1)])
            assert url.group(2) == gateway["EV_LISTEN"].rsplit(":", 1)[1], f"{name}: wrong gateway port"
            assert "/" + url.group(3) == gateway.get("EV_PATH_PREFIX", "/ocpp/"), f"{name}: wrong path"
            provisioned = " ".join(services["provision"]["command"])
            for charger in env["EV_CHARGERS"].split(","):
                assert f"--cp {charger}=" in provisioned, f"{name}: charger {charger} is not provisioned"
            assert env["EV_CREDENTIAL_DIR"] in [m.split(":")[1] for m in svc["volumes"]]
        if command[0] == "EV_W":
            central_env = env_map(services["central"])
            assert env["EV_CENTRAL_URL"] == f"https://central:{central_env['EV_API_PORT']}", f"{name}: Central's API"
            assert "central" in central_env["EV_API_CERT_NAMES"].split(","), \
                "Central's self-signed API certificate must name the host EV_W calls it by"
            db_dir = central_env["EV_DB"].rsplit("/", 1)[0]
            shared = {m.split(":")[1] for m in svc["volumes"] if m.split(":")[0] == "central-data"}
            assert db_dir in shared, f"{name}: Central's certificate and token are on its volume"
            assert env["EV_CENTRAL_CA"] == f"{db_dir}/api-cert.pem"
            assert env["EV_API_TOKEN_FILE"] == f"{db_dir}/api-token"
            mounted = {m.split(":")[1]: m.split(":")[0] for m in svc["volumes"] if m.startswith("./")}
            folder, file = env["EV_WEATHER_FILE"].rsplit("/", 1)
            text = (ROOT / mounted[folder] / file).read_text(encoding="utf-8")
            for city in env["EV_WATCH"].split(";"):
                assert re.search(rf"^{re.escape(city)}:", text, re.M), f"{name}: no weather for {city} in {file}"
    central = services["central"]
    assert [p.split(":")[1] for p in central["ports"]] == [env_map(central)["EV_CENTRAL_PORT"],
                                                           env_map(central)["EV_API_PORT"]]
    cp_ids = [env_map(s)["EV_CP_ID"] for s in services.values() if (s.get("command") or [""])[0] == "EV_CP_M"]
    assert len(cp_ids) == len(set(cp_ids)) >= 2, f"CP ids must be unique: {cp_ids}"


def test_the_dockerfile_installs_every_program_compose_runs(services: dict[str, dict[str, Any]]) -> None:
    lines = [line.strip() for line in DOCKERFILE.read_text(encoding="utf-8").splitlines()
             if line.strip() and line[0] != "#"]
    assert lines[0].startswith("FROM python:3.11"), "the image's Python must be the project's (3.11)"
    copied = set()
    for line in lines:
        if line.startswith("COPY "):
            parts = [p for p in line.split()[1:] if not p.startswith("--")]
            for src in parts[:-1]:
                assert (ROOT / src).exists(), f"Dockerfile copies {src}, which does not exist"
                copied.add(src.rstrip("/"))
    cfg = ConfigParser()
    cfg.read(ROOT / "setup.cfg", encoding="utf-8")
    packages = {p.strip().rstrip("*") for p in cfg["options.packages.find"]["include"].split()}
    assert packages <= copied, f"the image lacks {packages - copied}"
    assert {"setup.cfg", "pyproject.toml", "requirements.lock"} <= copied
    assert any("pip install" in line and "-c requirements.lock" in line for line in lines), \
        "install with the pinned versions"
    assert any(line.startswith("USER ") and line != "USER root" for line in lines), "run as an unprivileged user"
    used = {(s.get("command") or [""])[0] for s in services.values() if "build" in s}
    assert used - {"python"} <= set(console_scripts()), "every command is a console script of the package"


@pytest.mark.broker
def test_the_kafka_init_command_creates_the_topics(services: dict[str, dict[str, Any]], broker: Any) -> None:
    from kafka import KafkaAdminClient

    from transport.broker import TOPICS

    command = services["kafka-init"]["command"]
    prefix = f"ki{uuid.uuid4().hex[:6]}."
    env = {k: v for k, v in os.environ.items() if not k.startswith("EV_")}
    env.update(env_map(services["kafka-init"]), EV_BROKER=broker.bootstrap, EV_TOPIC_PREFIX=prefix)
    proc = subprocess.run([sys.executable, *command[1:]], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=90)
    assert proc.returncode == 0, proc.stderr[-2000:]
    admin = KafkaAdminClient(bootstrap_servers=broker.bootstrap)
    try:
        topics = set(admin.list_topics())
    finally:
        admin.close()
    assert {prefix + t for t in TOPICS} <= topics


def _compose_cli() -> list[str] | None:
    docker = shutil.which("docker")
    if docker and subprocess.run([docker, "compose", "version"], capture_output=True).returncode == 0:
        return [docker, "compose"]
    legacy = shutil.which("docker-compose")
    return [legacy] if legacy else None


def test_docker_compose_config_validates_the_file() -> None:
    cli = _compose_cli()
    if cli is None:
        pytest.skip("no Compose installed (neither the docker compose plugin nor docker-compose); "
                    "the structural tests above check the file")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("EV_", "KAFKA_", "COMPOSE_"))}
    proc = subprocess.run([*cli, "-f", str(COMPOSE), "-p", "evcharging", "config", "-q"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr


# =====================================================================================
# Central and a connection that died under it (found by the long cut below)
# =====================================================================================
@pytest.mark.broker
def test_central_survives_frames_from_a_connection_that_already_closed(kafka_settings: Any, tmp_path: Path) -> None:
    """When a cut link heals, a stale connection delivers its queued heartbeats and dies at once
    (the Monitor reset it): Central answers frames of unregistered connections with an error, and
    telling a dead connection actor used to crash CentralActor (ActorDeadError)."""
    import pykka

    from actors.central import CentralStatus
    from supervisors.central_system import CentralSystemConfig, start_central
    from transport import protocol
    from transport.link import FrameIn

    class Gone(pykka.ThreadingActor):
        pass

    system = start_central(CentralSystemConfig(enroll="open", port=0, host="127.0.0.1", broker=kafka_settings.bootstrap,
                                               db_path=str(tmp_path / "central.db"),
                                               topic_prefix=kafka_settings.topic_prefix))
    try:
        before = system.get("central")
        dead = Gone.start()
        dead.stop()
        before.tell(FrameIn(dead, protocol.Heartbeat(cp_id="MAD1", engine_ok=True)))
        assert system.ask("central", CentralStatus()) == {}
        assert system.get("central") is not None and system.get("central").actor_urn == before.actor_urn, \
            "CentralActor was restarted: it crashed on a frame from a closed connection"
    finally:
        system.stop()


# =====================================================================================
# Three hosts in network namespaces
# =====================================================================================
BROKER_PORT = 9092
CENTRAL_PORT = 6001
CPS = {"MAD1": ("Madrid, Sol", 7001), "BCN2": ("Barcelona, Diagonal", 7002)}
DRIVERS = {"driver1": "MAD1", "driver2": "BCN2"}  # each driver uses one CP: no collisions, supplies overlap
SERVICES = 4
SUPPLY_S = 5.0
LIFE_TIMEOUT = 2.0  # Central: seconds without a life message -> DISCONNECTED (Monitors send one a second)
SHORT_CUT_S = 5.0  # > LIFE_TIMEOUT, < what the Monitor-Central link survives (ACK timeout 2 s x 3 retries)
LONG_CUT_S = 12.0  # the Monitor-Central connections break and are made again
LATE_DRIVER = "driver3"  # starts during the cut


@pytest.fixture
def lab() -> Iterator[Lab]:
    reason = unavailable()
    if reason:
        pytest.skip(f"multi-host test needs network namespaces: {reason}")
    with Lab() as hosts:
        yield hosts


def _tansu() -> str:
    from transport.broker import resolve_tansu

    return resolve_tansu()


def _db_rows(db: Path, sql: str) -> list[tuple[Any, ...]]:
    """Read Central's database without writing to it (the test never takes a lock Central needs)."""
    if not db.exists():
        return []
    try:
        conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=2)
        try:
            return conn.execute(sql).fetchall()
        finally:
            conn.close()
    except sqlite3.OperationalError:
        return []  # the schema is being created


def _cp_states(db: Path) -> dict[str, str]:
    return dict(_db_rows(db, "SELECT cp_id, state FROM charging_points"))


def _log_tails(lab: Lab, lines: int = 25) -> str:
    out = []
    for proc in lab.procs.values():
        try:
            text = proc.log_path.read_text(encoding="utf-8", errors="replace").splitlines()[-lines:]
        except OSError:
            text = []
        out.append(f"--- {proc.name} on {proc.host} (exit {proc.popen.poll()}) {proc.log_path}\n" + "\n".join(text))
    return "\n".join(out)


def test_a_broker_advertising_loopback_is_unusable_from_another_host(lab: Lab, tmp_path: Path) -> None:
    """The pitfall in docs/deployment.md: the first contact works, then clients go where the broker says."""
    h1 = lab.address("h1")
    lab.popen("good", "h1", [_tansu(), "broker", "--listener-url", f"tcp://0.0.0.0:{BROKER_PORT}",
                             "--advertised-listener-url", f"tcp://{h1}:{BROKER_PORT}",
                             "--storage-engine", "memory://tansu/"], tmp_path / "good.log")
    lab.popen("bad", "h1", [_tansu(), "broker", "--listener-url", f"tcp://0.0.0.0:{BROKER_PORT + 1}",
                            "--advertised-listener-url", f"tcp://127.0.0.1:{BROKER_PORT + 1}",
                            "--storage-engine", "memory://tansu/"], tmp_path / "bad.log")
    assert lab.wait_port("h3", h1, BROKER_PORT) and lab.wait_port("h3", h1, BROKER_PORT + 1)
    probe = ("import sys\nfrom transport.broker import KafkaSettings, ensure_topics, BrokerUnavailable\n"
             "try:\n    ensure_topics(KafkaSettings(sys.argv[1]), timeout=float(sys.argv[2]))\n"
             "except BrokerUnavailable as exc:\n    print(exc); sys.exit(3)\n")
    good = lab.run("h3", [sys.executable, "-c", probe, f"{h1}:{BROKER_PORT}", "15"], timeout=60)
    assert good.returncode == 0, good.stderr[-2000:]
    bad = lab.run("h3", [sys.executable, "-c", probe, f"{h1}:{BROKER_PORT + 1}", "3"], timeout=60)
    assert bad.returncode == 3, (bad.stdout, bad.stderr[-2000:])
    assert "Cannot create the topics" in bad.stdout


@pytest.mark.slow
@pytest.mark.parametrize("cut_s", [SHORT_CUT_S, LONG_CUT_S], ids=["short-cut", "long-cut"])
def test_three_hosts_supply_across_them_and_survive_a_cut_of_the_cp_host(lab: Lab, tmp_path: Path,
                                                                         cut_s: float) -> None:
    """Host 2 (both CPs) loses its link for ``cut_s`` seconds in the middle of two supplies.

    A short cut is shorter than the Monitors' link gives up (ACK timeout x retries): TCP delivers the
    late heartbeats when the link returns. A long cut breaks the Monitor-Central connections, so the
    Monitors reconnect and register again. Either way (SPEC §3) Central marks both CPs DISCONNECTED,
    refuses new supplies there meanwhile, and takes them back ACTIVE; each supply in progress ends in
    exactly one ticket (the Engines keep the completions until Kafka is reachable again).
    """
    run = tmp_path / "run"
    run.mkdir()
    h1 = lab.address("h1")
    broker = f"{h1}:{BROKER_PORT}"
    db = run / "central.db"

    def detail(name: str) -> list[str]:
        return ["--log-file", str(run / f"{name}.detail.log")]

    def start_driver(driver_id: str, cp_ids: list[str]) -> None:
        services_file = run / f"{driver_id}.services"
        services_file.write_text("".join(f"{cp}\n" for cp in cp_ids), encoding="utf-8")
        lab.popen(f"driver:{driver_id}", "h3", python_cmd(
            "driver", broker, driver_id, "--services", str(services_file), "--pause", "0.5",
            "--exit-when-done", "--no-console", "--results-json", str(run / f"{driver_id}.results.json"),
            *detail(f"driver-{driver_id}")), run / f"driver-{driver_id}.log", cwd=ROOT)

    try:
        # Host 1: Kafka (listening everywhere, advertising host 1's address) and Central.
        lab.popen("broker", "h1", [_tansu(), "broker", "--listener-url", f"tcp://0.0.0.0:{BROKER_PORT}",
                                   "--advertised-listener-url", f"tcp://{broker}",
                                   "--storage-engine", "memory://tansu/"], run / "broker.log")
        assert lab.wait_port("h3", h1, BROKER_PORT), "Kafka on host 1 is not reachable from host 3"
        lab.popen("central", "h1", python_cmd("central", str(CENTRAL_PORT), broker, "--db", str(db), "--panel", "off",
                                              "--enroll", "open", "--life-timeout", str(LIFE_TIMEOUT), "--no-console",
                                              *detail("central")),
                  run / "central.log", cwd=ROOT)
        assert lab.wait_port("h2", h1, CENTRAL_PORT), "Central on host 1 is not reachable from host 2"

        # Host 2: two CPs, each an Engine and its Monitor (Monitor -> Engine over the host's loopback).
        for cp_id, (_location, port) in CPS.items():
            lab.popen(f"engine:{cp_id}", "h2", python_cmd(
                "engine", broker, "--listen", f"0.0.0.0:{port}", "--cp-id", cp_id,
                "--journal", str(run / f"engine-{cp_id}.journal.db"), "--auto-plug", "--plug-delay", "0.3",
                "--supply-seconds", str(SUPPLY_S), "--tick", "0.5", "--power-kw", "22", "--no-console",
                *detail(f"engine-{cp_id}")), run / f"engine-{cp_id}.log", cwd=ROOT)
        for cp_id, (location, port) in CPS.items():
            assert lab.wait_port("h2", "127.0.0.1", port), f"Engine {cp_id} does not listen"
            lab.popen(f"monitor:{cp_id}", "h2", python_cmd(
                "monitor", f"127.0.0.1:{port}", f"{h1}:{CENTRAL_PORT}", cp_id, "--location", location,
                *detail(f"monitor-{cp_id}")), run / f"monitor-{cp_id}.log", cwd=ROOT)
        wait_until(lambda: _cp_states(db) == dict.fromkeys(CPS, "ACTIVE"), timeout=30, interval=0.2,
                   what="both CPs registered and ACTIVE at Central")

        # Host 3: two drivers, each with a short services file.
        for driver_id, cp_id in DRIVERS.items():
            start_driver(driver_id, [cp_id] * SERVICES)

        # Supplies complete across the three hosts: a ticket for each driver.
        def tickets_per_driver() -> dict[str, int]:
            return dict(_db_rows(db, "SELECT driver_id, COUNT(*) FROM tickets GROUP BY driver_id"))

        wait_until(lambda: all(tickets_per_driver().get(d, 0) >= 1 for d in DRIVERS), timeout=60, interval=0.2,
                   what="a first ticket for each driver")

        # Cut host 2's link while both CPs supply.
        def both_supplying() -> list[str]:
            rows = _db_rows(db, "SELECT session_id, cp_id FROM sessions WHERE status = 'supplying'")
            states = _cp_states(db)
            live = [sid for sid, cp in rows if states.get(cp) == "SUPPLYING"]
            return live if len(live) == len(CPS) else []

        at_cut = wait_until(both_supplying, timeout=40, interval=0.1, what="both CPs supplying")
        lab.cut("h2")
        cut_at = time.monotonic()
        # Once Central has marked both CPs DISCONNECTED, a driver who comes along is refused at both
        # (the link stays cut until that driver is done, 20 s more at most).
        seen_during_cut: dict[str, set[str]] = {cp: set() for cp in CPS}
        while True:
            states = _cp_states(db)
            for cp, state in states.items():
                seen_during_cut[cp].add(state)
            if f"driver:{LATE_DRIVER}" not in lab.procs and set(states.values()) == {"DISCONNECTED"}:
                start_driver(LATE_DRIVER, list(CPS))
            late = lab.procs.get(f"driver:{LATE_DRIVER}")
            elapsed = time.monotonic() - cut_at
            if (elapsed >= cut_s and late is not None and not late.alive()) or elapsed > cut_s + 20:
                break
            time.sleep(0.1)
        lab.restore("h2")
        restored_at = time.monotonic()
        restored_wall = time.time()
        for cp in CPS:
            assert "DISCONNECTED" in seen_during_cut[cp], \
                f"Central never marked {cp} DISCONNECTED during a {cut_s:g} s cut: {seen_during_cut[cp]}"
        wait_until(lambda: all(s in ("ACTIVE", "SUPPLYING") for s in _cp_states(db).values()), timeout=30,
                   interval=0.1, what="both CPs back (ACTIVE or SUPPLYING) after the link came back")
        recover_s = time.monotonic() - restored_at

        # The drivers finish their services; the supplies cut in the middle end in a ticket each.
        wait_until(lambda: not any(lab.procs[f"driver:{d}"].alive() for d in DRIVERS), timeout=90, interval=0.3,
                   what="both drivers done")
        wait_until(lambda: _cp_states(db) == dict.fromkeys(CPS, "ACTIVE"), timeout=15, interval=0.2,
                   what="both CPs ACTIVE at the end")
        for d in [*DRIVERS, LATE_DRIVER]:
            assert lab.procs[f"driver:{d}"].popen.returncode == 0, f"driver {d} exited with an error"
        for name, proc in lab.procs.items():
            if not name.startswith("driver:"):
                assert proc.alive(), f"{name} died"
    except BaseException:
        print(_log_tails(lab))
        raise
    lab.teardown()  # stop everything before reading the results

    sessions = _db_rows(db, "SELECT session_id, driver_id, cp_id, status, created_at, started_at FROM sessions")
    tickets = _db_rows(db, "SELECT session_id, driver_id, cp_id, energy_kwh, price_eur_kwh, cost_eur FROM tickets")
    ticket_count: dict[str, int] = {}
    for t in tickets:
        ticket_count[t[0]] = ticket_count.get(t[0], 0) + 1
    started = [s[0] for s in sessions if s[5] is not None]
    row = fault_matrix.billing_row(f"3 hosts (netns): CP host link cut {cut_s:g} s", str(db), started, recover_s)
    assert row.lost == 0 and row.double_billed == 0, row
    for sid in at_cut:
        assert ticket_count.get(sid) == 1, \
            f"supply {sid}, in progress at the cut, has {ticket_count.get(sid, 0)} tickets"
    for sid, _driver, _cp, status, _created, _started in sessions:
        assert status in ("completed", "cancelled"), f"session {sid} is still {status}"
        assert ticket_count.get(sid, 0) == (1 if status == "completed" else 0), f"session {sid}: {status}"
    for sid, _driver, _cp, energy, price, cost in tickets:
        assert energy > 0 and round(cost * 100) == bill_cents(energy, price), (sid, energy, price, cost)
    # Service came back: a supply requested after the link returned was billed.
    assert any(ticket_count.get(s[0]) and s[4] > restored_wall for s in sessions), \
        "no supply was requested and billed after the link came back"

    # What each driver saw matches Central's tickets one to one.
    for driver_id in DRIVERS:
        outcomes = json.loads((run / f"{driver_id}.results.json").read_text(encoding="utf-8"))["services"]
        assert len(outcomes) == SERVICES, outcomes
        assert all(o["outcome"] in ("ticket", "denied") for o in outcomes), outcomes
        seen = sorted(o["session_id"] for o in outcomes if o["outcome"] == "ticket")
        billed = sorted(t[0] for t in tickets if t[1] == driver_id)
        assert seen == billed, f"{driver_id} saw tickets {seen}, Central issued {billed}"
        assert len(seen) >= 2, outcomes
    late = json.loads((run / f"{LATE_DRIVER}.results.json").read_text(encoding="utf-8"))["services"]
    assert [o["outcome"] for o in late] == ["denied"] * len(CPS), late
    assert all("DISCONNECTED" in (o["reason"] or "") for o in late), late
    assert not any(t[1] == LATE_DRIVER for t in tickets)

    if cut_s >= LONG_CUT_S:  # the Monitors' connections broke: they reconnected and registered again
        for cp_id in CPS:
            text = (run / f"monitor-{cp_id}.log").read_text(encoding="utf-8", errors="replace")
            assert "lost Central" in text and text.count(f"Central accepted {cp_id}") >= 2, text[-3000:]
    for proc in lab.procs.values():
        text = proc.log_path.read_text(encoding="utf-8", errors="replace")
        assert "Traceback" not in text, f"{proc.name} printed a traceback:\n{text[-3000:]}"
        crash = text.find("crashed (")
        assert crash < 0, f"a part of {proc.name} crashed: {text[max(0, crash - 200):crash + 300]}"
