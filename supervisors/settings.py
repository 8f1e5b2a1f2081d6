"""One source of configuration per program: a dataclass whose fields are its settings.

A field made with :func:`setting` is one command-line argument of the program:
``life_timeout`` becomes ``--life-timeout``, whose environment twin is
``EV_LIFE_TIMEOUT`` (see :mod:`supervisors.options`); the field's default is
the flag's default and ``--help`` shows it with the help text and the twin.
:func:`inherit` is a setting whose default is another class's (an actor's
options, a link's keyword argument, another program's config), so that no
default is written twice. :func:`internal` marks a field that is only for
embedding (a stream, a system name) and has no flag; every field is one of
the three, or :func:`build_parser` refuses the class.

:func:`build_parser` makes the parser from the class, :func:`from_args` the
dataclass back from the parsed namespace, and docs/cli.md is rendered from
those parsers (:mod:`supervisors.docgen`).
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import types
import typing
from collections.abc import Callable
from dataclasses import MISSING, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from supervisors import options as opts

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

__all__ = ["Setting", "setting", "inherit", "internal", "default_of", "build_parser", "add_arguments", "from_args",
           "add_process_flags", "arguments", "Argument", "pick"]

KEY = "evcharging.setting"
T = TypeVar("T", bound="DataclassInstance")
SAME: Any = "<the API's default>"  # Setting.cli_default when the command line's default is the field's


@dataclass(frozen=True, slots=True)
class Setting:
    """How one field appears on the command line."""

    help: str
    flag: str | None = None  # default: --field-name
    positional: bool = False  # a positional argument (required on the command line unless its twin is set)
    env: str | None = None  # a positional's twin (default EV_<NAME>); a flag's twin is always its name's
    choices: tuple[str, ...] | None = None
    parse: Callable[[str], Any] | None = None  # default: from the field's type
    address: str | None = None  # "<address>_host" and "<address>_port" given as one HOST:PORT argument
    cli_default: Any = SAME  # the command line's default, when it purposely differs from the API's


def setting(default: Any = MISSING, *, help: str = "", flag: str | None = None, positional: bool = False,
            env: str | None = None, choices: tuple[str, ...] | None = None,
            parse: Callable[[str], Any] | None = None, address: str | None = None,
            cli_default: Any = SAME) -> Any:
    """A dataclass field that is also a command-line argument."""
    meta = {KEY: Setting(help, flag, positional, env, choices, parse, address, cli_default)}
    return dataclasses.field(default=default, metadata=meta)


def inherit(source: type, name: str, **kwargs: Any) -> Any:
    """A :func:`setting` whose default is the one ``source`` gives ``name`` (see :func:`default_of`)."""
    return setting(default_of(source, name), **kwargs)


def internal(default: Any = MISSING, *, default_factory: Any = MISSING) -> Any:
    """A field for embedding only (no flag)."""
    return dataclasses.field(default=default, default_factory=default_factory, metadata={KEY: None})


def default_of(source: type, name: str) -> Any:
    """The default of field ``name`` of a dataclass, or of keyword ``name`` of a class's constructor."""
    if dataclasses.is_dataclass(source):
        f = next((f for f in dataclasses.fields(source) if f.name == name), None)
        if f is None:
            raise AttributeError(f"{source.__name__} has no field {name!r}")
        if f.default is not MISSING:
            return f.default
        if f.default_factory is not MISSING:
            return f.default_factory()
        raise TypeError(f"{source.__name__}.{name} has no default")
    default = inspect.signature(source).parameters[name].default  # a class's signature is its constructor's
    if default is inspect.Parameter.empty:
        raise TypeError(f"{source!r}: {name} has no default")
    return default


@dataclass(frozen=True, slots=True)
class Argument:
    """One command-line argument: a field, or a host field and a port field given as HOST:PORT."""

    fields: tuple[dataclasses.Field[Any], ...]
    setting: Setting
    name: str  # the positional's name or the flag, e.g. "broker", "--life-timeout"
    dest: str  # the attribute of the parsed namespace
    parse: Callable[[str], Any] | None  # None: a store_true flag
    default: Any  # the command line's default (a HOST:PORT string for an address)

    @property
    def env(self) -> str:
        if self.setting.positional:
            return self.setting.env or "EV_" + self.dest.upper()
        return opts.env_name(self.name)


def arguments(cls: type) -> list[Argument]:
    """The command-line arguments of a config dataclass, in field order."""
    hints = typing.get_type_hints(cls)
    out: list[Argument] = []
    pending: dict[str, dataclasses.Field[Any]] = {}  # address -> its host field, waiting for the port
    for f in dataclasses.fields(cls):
        if KEY not in f.metadata:
            raise TypeError(f"{cls.__name__}.{f.name} is neither a setting nor internal (supervisors/settings.py)")
        s: Setting | None = f.metadata[KEY]
        if s is None:
            continue
        if s.address:
            address = s.address  # the host field's setting, taken below, has the same one
            if address not in pending:
                pending[address] = f
                continue
            host = pending.pop(address)
            s = host.metadata[KEY]
            name = address if s.positional else (s.flag or "--" + address.replace("_", "-"))
            out.append(Argument((host, f), s, name, _dest(name), opts.host_port,
                                f"{_api_default(host)}:{_api_default(f)}"))
            continue
        name = f.name if s.positional else (s.flag or "--" + f.name.replace("_", "-"))
        kind = _base_type(hints[f.name])
        if kind is bool and not s.positional:
            if f.default is not False:
                raise TypeError(f"{cls.__name__}.{f.name}: a flag's boolean must default to False")
            parse = None
        else:
            parse = s.parse or kind
        default = _api_default(f) if s.cli_default is SAME else s.cli_default
        out.append(Argument((f,), s, name, _dest(name), parse, default))
    if pending:
        raise TypeError(f"{cls.__name__}: address {sorted(pending)} has a host field but no port field")
    return out


def add_arguments(parser: argparse.ArgumentParser, cls: type) -> argparse.ArgumentParser:
    """Add one argument per setting of ``cls`` to ``parser`` (environment twins included)."""
    for arg in arguments(cls):
        s = arg.setting
        if s.positional:
            opts.positional_or_env(parser, arg.name, arg.env, s.help, type=arg.parse or str)
        elif arg.parse is None:
            opts.add(parser, arg.name, action="store_true", default=False, help=s.help)
        else:
            extra: dict[str, Any] = {"choices": s.choices} if s.choices else {}
            opts.add(parser, arg.name, default=arg.default, type=arg.parse, help=s.help, **extra)
    return parser


def build_parser(cls: type, prog: str, description: str) -> argparse.ArgumentParser:
    """A parser with one argument per setting of ``cls``."""
    return add_arguments(argparse.ArgumentParser(prog=prog, description=description), cls)


def from_args(cls: type[T], namespace: argparse.Namespace, **overrides: Any) -> T:
    """The ``cls`` the parsed ``namespace`` describes; ``overrides`` set fields (internal ones, say) directly."""
    values: dict[str, Any] = {}
    for arg in arguments(cls):
        value = getattr(namespace, arg.dest)
        if len(arg.fields) == 2:
            if isinstance(value, str):  # a default argparse did not convert
                value = opts.host_port(value)
            values[arg.fields[0].name], values[arg.fields[1].name] = value
        else:
            values[arg.fields[0].name] = value
    values.update(overrides)
    return cls(**values)


def pick(cls: type[T], source: Any, **values: Any) -> T:
    """A ``cls`` (an actor's options) whose fields come from the same-named fields of ``source``, then ``values``.

    A field ``source`` lacks keeps its default; tests/test_settings.py checks that every
    program config mirrors every field of the options it builds.
    """
    taken = {f.name: getattr(source, f.name) for f in dataclasses.fields(cls) if f.init and hasattr(source, f.name)}
    return cls(**{**taken, **values})


def add_process_flags(parser: argparse.ArgumentParser, *, console: bool = True) -> None:
    """The flags of the process rather than of the system: logging and the console (the same everywhere)."""
    opts.add(parser, "--log-file", help="also write a detailed log (with tracebacks) to this file")
    opts.add(parser, "--log-level", default="INFO", help="terminal log level (DEBUG, INFO, WARNING, ERROR)")
    if console:
        opts.add(parser, "--no-console", action="store_true", default=False, help="do not read commands from stdin")


# --- helpers ------------------------------------------------------------------------
def _dest(name: str) -> str:
    return name.lstrip("-").replace("-", "_")


def _api_default(f: dataclasses.Field[Any]) -> Any:
    if f.default is not MISSING:
        return f.default
    if f.default_factory is not MISSING:
        return f.default_factory()
    return None


def _base_type(hint: Any) -> Any:
    """``float`` for ``float`` and ``float | None``; ``str`` for anything argparse cannot call."""
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        hint = args[0] if len(args) == 1 else str
    return hint if hint in (int, float, str, bool, Path) else str
