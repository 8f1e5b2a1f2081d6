"""Command-line flags with environment-variable twins.

Every address, port, id and timing is a flag; each flag ``--foo-bar`` of a
program also reads ``EV_FOO_BAR`` from the environment (a flag given on the
command line wins). ``--help`` shows the variable next to each flag.
"""

from __future__ import annotations

import argparse
import os
from typing import Any


def env_name(flag: str) -> str:
    return "EV_" + flag.lstrip("-").replace("-", "_").upper()


def add(parser: argparse.ArgumentParser, flag: str, *, default: Any = None, type: Any = str,
        help: str = "", **kwargs: Any) -> None:
    """Add ``--flag`` whose default comes from ``EV_FLAG`` when that is set."""
    env = env_name(flag)
    raw = os.environ.get(env)
    if raw is not None and kwargs.get("action") not in ("store_true", "store_false"):
        default = type(raw) if type is not None else raw
    elif raw is not None:
        default = raw.strip().lower() in ("1", "true", "yes", "on")
    shown = f" (env {env}; default {default})" if default not in (None, "") else f" (env {env})"
    if kwargs.get("action") in ("store_true", "store_false"):
        parser.add_argument(flag, default=default, help=help + shown, **kwargs)
    else:
        parser.add_argument(flag, default=default, type=type, help=help + shown, **kwargs)


def host_port(text: str) -> tuple[str, int]:
    """Parse ``HOST:PORT`` (argparse type) with a readable error."""
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {text!r}")
    return host.strip("[]"), int(port)


def bootstrap(text: str) -> str:
    """A Kafka bootstrap: HOST:PORT or a comma-separated list of them (argparse type), checked, as given."""
    for part in text.split(","):
        host_port(part.strip())
    return text


def positional_or_env(parser: argparse.ArgumentParser, name: str, env: str, help: str, type: Any = str) -> None:
    """A positional argument that may be omitted when ``env`` is set."""
    raw = os.environ.get(env)
    if raw is None:
        parser.add_argument(name, type=type, help=f"{help} (or env {env})")
    else:
        parser.add_argument(name, type=type, nargs="?", default=type(raw), help=f"{help} (env {env}={raw})")
