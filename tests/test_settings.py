"""One source of configuration per program (supervisors/settings.py).

Each program's config dataclass makes its parser: every field is an argument
with an environment twin (or deliberately internal), the command line beats
the environment, ``--help`` shows the dataclass's defaults, and a full
command line builds exactly the config one would construct in Python.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from actors.central import CentralConfig
from actors.engine import EngineOptions
from actors.monitor import MonitorOptions
from actors.ocpp_charger import OcppOptions
from actors.weather import WeatherOptions
from supervisors import (
    central_system,
    driver_system,
    engine_system,
    launcher,
    monitor_system,
    ocpp_sim,
    ocpp_system,
    registry_system,
    settings,
    weather_system,
)
from supervisors.central_system import CentralSystemConfig
from supervisors.driver_system import DriverConfig
from supervisors.engine_system import EngineConfig
from supervisors.launcher import Network, NetworkSpec
from supervisors.monitor_system import MonitorConfig
from supervisors.ocpp_sim import SimConfig
from supervisors.ocpp_system import OcppSystemConfig
from supervisors.registry_system import RegistryConfig
from supervisors.weather_system import WeatherSystemConfig
from transport.ocpp_wire import OcppLimits


def _up_parser() -> argparse.ArgumentParser:
    up = launcher.build_parser()
    sub = next(a for a in up._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices["up"]


def _launcher_config(args: argparse.Namespace) -> NetworkSpec:
    return settings.from_args(NetworkSpec, args)


@dataclasses.dataclass(frozen=True)
class Program:
    name: str
    cls: type
    parser: Callable[[], argparse.ArgumentParser]
    config: Callable[[argparse.Namespace], Any]  # namespace -> config, as the program's main does
    internal: frozenset[str]  # the fields that are deliberately not arguments


PROGRAMS = [
    Program("EV_Central", CentralSystemConfig, central_system.build_parser, central_system.config_from_args,
            frozenset({"console"})),
    Program("EV_CP_E", EngineConfig, engine_system.build_parser, engine_system.config_from_args,
            frozenset({"console", "console_stream", "name"})),
    Program("EV_CP_M", MonitorConfig, monitor_system.build_parser, monitor_system.config_from_args,
            frozenset({"name"})),
    Program("EV_Driver", DriverConfig, driver_system.build_parser, driver_system.config_from_args,
            frozenset({"console", "console_stream"})),
    Program("EV_Registry", RegistryConfig, registry_system.build_parser, registry_system.config_from_args,
            frozenset()),
    Program("EV_W", WeatherSystemConfig, weather_system.build_parser, weather_system.config_from_args,
            frozenset({"name"})),
    Program("EV_OCPP", OcppSystemConfig, ocpp_system.build_parser, ocpp_system.config_from_args, frozenset({"name"})),
    Program("EV_OCPP_SIM", SimConfig, ocpp_sim.build_parser, lambda a: settings.from_args(SimConfig, a),
            frozenset({"name"})),
    Program("evcharging up", NetworkSpec, _up_parser, _launcher_config,
            frozenset({"extra_central", "extra_engine", "extra_monitor", "extra_driver", "broker_port",
                       "broker_advertised_port", "monitor_central", "monitor_engine", "component_broker",
                       "central_console"})),
]
IDS = [p.name for p in PROGRAMS]


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in [k for k in os.environ if k.startswith("EV_")]:
        monkeypatch.delenv(key)


def _sample(cls: type, arg: settings.Argument, variant: int) -> tuple[str, Any]:
    """A command-line text for ``arg`` and the value the config should get from it (two variants)."""
    if len(arg.fields) == 2:
        return f"host{variant}.example:{7100 + variant}", (f"host{variant}.example", 7100 + variant)
    if arg.parse is None:
        return "1", True
    if arg.setting.choices:
        choice = arg.setting.choices[(len(arg.setting.choices) - 1 - variant) % len(arg.setting.choices)]
        return choice, choice
    if arg.parse is settings.opts.bootstrap:
        return f"kafka{variant}.example:{9100 + variant}", f"kafka{variant}.example:{9100 + variant}"
    kind = settings._base_type(typing.get_type_hints(cls)[arg.fields[0].name])
    if kind is float:
        return f"{7.25 + variant}", 7.25 + variant
    if kind is int:
        return f"{70 + variant}", 70 + variant
    if kind is Path:
        return f"/tmp/dir{variant}", Path(f"/tmp/dir{variant}")
    return f"value{variant}", f"value{variant}"


def _values(cls: type, arg: settings.Argument, value: Any) -> dict[str, Any]:
    if len(arg.fields) == 2:
        return dict(zip([f.name for f in arg.fields], value, strict=True))
    return {arg.fields[0].name: value}


def _argv(program: Program, args: list[str]) -> list[str]:
    return ["up", *args] if program.name == "evcharging up" else args


def _parse(program: Program, argv: list[str]) -> argparse.Namespace:
    if program.name == "evcharging up":
        return launcher.build_parser().parse_args(["up", *argv])
    return program.parser().parse_args(argv)


@pytest.mark.parametrize("program", PROGRAMS, ids=IDS)
def test_every_field_is_an_argument_with_an_environment_twin_or_deliberately_internal(program: Program) -> None:
    args = settings.arguments(program.cls)
    covered = {f.name for a in args for f in a.fields}
    internal = {f.name for f in dataclasses.fields(program.cls)} - covered
    assert internal == program.internal, f"{program.name}: fields without an argument: {sorted(internal)}"
    helps = {a.dest: a.help or "" for a in program.parser()._actions}
    for arg in args:
        assert arg.dest in helps, f"{program.name}: {arg.name} is not in the parser"
        assert f"env {arg.env}" in helps[arg.dest], f"{program.name}: {arg.name}'s help does not name {arg.env}"
        assert arg.setting.help, f"{program.name}: {arg.name} has no help text"


@pytest.mark.parametrize("program", PROGRAMS, ids=IDS)
def test_the_environment_is_used_and_the_command_line_wins(program: Program,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    args = settings.arguments(program.cls)
    from_env: dict[str, Any] = {}
    for arg in args:
        raw, value = _sample(program.cls, arg, 0)
        monkeypatch.setenv(arg.env, raw)
        from_env.update(_values(program.cls, arg, value))
    config = program.config(_parse(program, []))
    assert {k: getattr(config, k) for k in from_env} == from_env

    argv: list[str] = []
    from_cli: dict[str, Any] = {}
    for arg in args:
        raw, value = _sample(program.cls, arg, 1)
        from_cli.update(_values(program.cls, arg, value))
        if arg.setting.positional:
            argv.append(raw)
        elif arg.parse is None:
            argv.append(arg.name)  # a store_true flag: the environment already set it
        else:
            argv += [arg.name, raw]
    config = program.config(_parse(program, argv))
    bools = {f.name for a in args if a.parse is None for f in a.fields}
    assert {k: getattr(config, k) for k in from_cli} == from_cli
    assert all(getattr(config, k) is True for k in bools)


@pytest.mark.parametrize("program", PROGRAMS, ids=IDS)
def test_help_shows_the_dataclass_defaults(program: Program) -> None:
    helps = {a.dest: a.help or "" for a in program.parser()._actions}
    for arg in settings.arguments(program.cls):
        if arg.setting.positional:
            continue
        field = arg.fields[0]
        api = settings._api_default(field) if len(arg.fields) == 1 else \
            f"{settings._api_default(field)}:{settings._api_default(arg.fields[1])}"
        if arg.setting.cli_default is settings.SAME:
            assert arg.default == api, f"{program.name}: {arg.name}"
        shown = re.search(r"\(env (EV_\w+)(?:; default (.*))?\)$", helps[arg.dest], re.S)
        assert shown, f"{program.name}: {arg.name}: {helps[arg.dest]!r}"
        expected = None if arg.default in (None, "") else str(arg.default)
        assert (shown.group(2) and " ".join(shown.group(2).split())) == expected, f"{program.name}: {arg.name}"


@pytest.mark.parametrize("program", PROGRAMS, ids=IDS)
def test_a_command_line_builds_the_config_one_would_construct(program: Program) -> None:
    args = settings.arguments(program.cls)
    argv: list[str] = []
    values: dict[str, Any] = {}
    for arg in args:
        if arg.setting.positional:
            raw, value = _sample(program.cls, arg, 0)
            argv.append(raw)
            values.update(_values(program.cls, arg, value))
    # only the positionals: every flag's default is the dataclass's (but a deliberate command-line default)
    parsed = program.config(_parse(program, argv))
    internal = {name: getattr(parsed, name) for name in program.internal}
    cli_defaults = {f.name: a.setting.cli_default for a in args for f in a.fields
                    if a.setting.cli_default is not settings.SAME}
    assert parsed == program.cls(**values, **internal, **cli_defaults)
    # everything given
    for arg in args:
        if not arg.setting.positional:
            raw, value = _sample(program.cls, arg, 1)
            argv += [arg.name] if arg.parse is None else [arg.name, raw]
            values.update(_values(program.cls, arg, value))
    parsed = program.config(_parse(program, argv))
    assert parsed == program.cls(**values, **{name: getattr(parsed, name) for name in program.internal})


@pytest.mark.parametrize("options, config, renamed", [
    (CentralConfig, CentralSystemConfig, {}),
    (MonitorOptions, MonitorConfig, {}),
    (EngineOptions, EngineConfig, {"expected_cp_id": "cp_id"}),
    (WeatherOptions, WeatherSystemConfig, {}),
    (OcppOptions, OcppSystemConfig, {}),
    (OcppLimits, OcppSystemConfig, {}),
], ids=["central", "monitor", "engine", "weather", "ocpp", "ocpp-limits"])
def test_actor_options_are_set_from_the_program_config_and_not_written_twice(options: type, config: type,
                                                                               renamed: dict[str, str]) -> None:
    names = {f.name for f in dataclasses.fields(config)}
    missing = [f.name for f in dataclasses.fields(options) if renamed.get(f.name, f.name) not in names]
    assert not missing, f"{config.__name__} does not set {options.__name__}.{missing}: they cannot be configured"
    for f in dataclasses.fields(options):
        if f.default is not dataclasses.MISSING:
            assert settings.default_of(config, renamed.get(f.name, f.name)) == f.default


def test_the_monitor_has_no_kafka_flags_and_the_launcher_passes_it_none(tmp_path: Path) -> None:
    assert "--topic-prefix" not in monitor_system.build_parser().format_help()
    with pytest.raises(SystemExit):
        monitor_system.build_parser().parse_args(["h:1", "c:2", "CP1", "--topic-prefix", "x."])
    net = Network(NetworkSpec(run_dir=tmp_path, topic_prefix="p.", panel="off"))
    assert "--topic-prefix" not in net._common("monitor:MAD1")
    assert net._common("engine:MAD1")[-2:] == ["--topic-prefix", "p."]


def test_a_class_with_a_field_that_is_neither_a_setting_nor_internal_is_refused() -> None:
    @dataclasses.dataclass
    class Careless:
        a: int = settings.setting(1, help="a")
        b: int = 2

    with pytest.raises(TypeError, match=r"Careless\.b"):
        settings.build_parser(Careless, "careless", "")
