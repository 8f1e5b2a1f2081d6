"""EV_Registry: the HTTPS registry of CPs and drivers (issue #11), its embedding API and command.

The registry writes Central's own database file (``--db``, the same default
as EV_Central's): Central reads the credentials from it, so it sees a
registration at the CP's next login and a deregistration within a second,
without restarting. Run the registry on Central's host, next to that file.

What it needs, and what it makes when it is not given (each next to the database):

* a TLS certificate and key (``--cert``/``--key``); neither: a self-signed
  certificate ``registry-cert.pem`` and its key ``registry-key.pem`` (0600),
  made on the first start for ``--cert-names`` and this host's name, then
  reused. Clients trust that certificate file (its SHA-256 fingerprint is
  logged at every start, to compare out of band).
* an admin token: ``--admin-token-file``; else the environment variable
  ``EV_REGISTRY_TOKEN``; else one generated into ``registry-token`` (0600) on
  the first start, then reused. Only its path is ever logged, never the token,
  and it is never an argument (argv is visible to every user of the host).

The server is uvicorn in a background thread (:func:`start_registry`); the
API is :mod:`transport.registry_api`.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from supervisors.central_system import CentralSystemConfig
from supervisors.logs import setup_logging
from supervisors.settings import add_process_flags, from_args, inherit, setting
from supervisors.settings import build_parser as parser_for
from transport import http_common as http
from transport.http_common import fingerprint

log = logging.getLogger("evcharging.registry")

__all__ = ["RegistryConfig", "RegistryHandle", "start_registry", "build_parser", "config_from_args",
           "check_config", "main", "TOKEN_ENV", "CERT_FILE", "KEY_FILE", "TOKEN_FILE", "fingerprint"]

TOKEN_ENV: Final = "EV_REGISTRY_TOKEN"  #: the admin token itself, when no --admin-token-file is given
CERT_FILE: Final = "registry-cert.pem"
KEY_FILE: Final = "registry-key.pem"
TOKEN_FILE: Final = "registry-token"


@dataclass(frozen=True, slots=True)
class RegistryConfig:
    """Everything EV_Registry needs; every field is a flag (env twin EV_<FLAG>)."""

    db_path: str = inherit(CentralSystemConfig, "db_path", flag="--db",
                           help="SQLite database file: Central's own (the registry writes credentials into it, "
                                "Central reads them without restarting)")
    host: str = inherit(CentralSystemConfig, "host", help="address to listen on for HTTPS")
    port: int = setting(8443, help="HTTPS port (0: any free port, logged)")
    cert: str = setting("", help="TLS certificate (PEM), with --key; neither: a self-signed one, "
                                 f"{CERT_FILE} next to the database, made on the first start")
    key: str = setting("", help="the TLS certificate's private key (PEM), with --cert")
    cert_names: str = setting(http.DEFAULT_CERT_NAMES,
                              help="comma-separated host names and IP addresses a self-signed certificate made "
                                   "here is valid for (this host's name is always added)")
    admin_token_file: str = setting("", help=f"file holding the admin token; without it, env {TOKEN_ENV}; "
                                             f"without that, a token generated into {TOKEN_FILE} next to the "
                                             "database on the first start")

    @property
    def state_dir(self) -> Path:
        """Where generated files go: the database's directory."""
        return Path(self.db_path).resolve().parent


@dataclass
class RegistryHandle:
    """A running registry: where it is, what to trust, the admin token; :meth:`stop` ends it."""

    url: str  # an address clients on this host can use (the wildcard host replaced by 127.0.0.1)
    host: str
    port: int
    ca_path: str  # the certificate to trust
    token: str = field(repr=False)
    token_source: str  # a path or an environment variable's name: never the token
    fingerprint: str  # SHA-256 of the certificate (DER), colon-separated hex
    generated_cert: bool
    _server: http.ServerThread = field(repr=False)
    _sock: socket.socket = field(repr=False)

    @property
    def alive(self) -> bool:
        return self._server.alive

    @property
    def failure(self) -> BaseException | None:
        return self._server.failure

    def stop(self, timeout: float = 5.0) -> None:
        """Stop serving (idempotent): open requests get up to ``timeout`` seconds."""
        self._server.stop(timeout)
        try:
            self._sock.close()
        except OSError:
            pass


# --- files made on the first start (transport/http_common.py does the work) -------------------
def cert_names(config: RegistryConfig) -> list[str]:
    """The names a generated certificate is valid for: --cert-names, this host's name, a specific --host."""
    return http.cert_names(config.cert_names, config.host)


def _tls_files(config: RegistryConfig) -> tuple[Path, Path, bool]:
    """(certificate, key, made now): the given pair, or the self-signed one next to the database."""
    return http.tls_files(config.cert, config.key, config.state_dir, CERT_FILE, KEY_FILE, cert_names(config),
                          title="EV_Registry")


def _admin_token(config: RegistryConfig) -> tuple[str, str]:
    """(token, where it is): --admin-token-file, else $EV_REGISTRY_TOKEN, else the generated file."""
    return http.load_token(config.admin_token_file, TOKEN_ENV, config.state_dir / TOKEN_FILE, what="admin token")


def _prepare_database(path: Path) -> None:
    """Create a missing database file private (0600: its verifiers are what proofs are keyed with;
    SQLite gives its -wal and -shm files the same mode); warn when an existing one is readable by others."""
    if path.exists():
        http.warn_if_readable(path, "The database (it holds the credentials' verifiers)")
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT, 0o600))


# --- the server ------------------------------------------------------------------------------
def start_registry(config: RegistryConfig) -> RegistryHandle:
    """Start the registry in this process (uvicorn in a background thread); returns once it accepts.

    Raises ValueError (a sentence) for a bad configuration or unreadable files, OSError
    when the port cannot be bound.
    """
    from persistence.trust import RegistryStore
    from transport.registry_api import make_app

    problem = check_config(config)
    if problem:
        raise ValueError(problem)
    db_path = str(Path(config.db_path))
    _prepare_database(Path(db_path))
    with RegistryStore(db_path):  # create or migrate it now: a bad file fails the start, not a request
        pass
    cert, key, made = _tls_files(config)
    token, token_source = _admin_token(config)
    app = make_app(lambda: RegistryStore(db_path), token)
    sock = http.bind(config.host, config.port)
    try:
        server = http.ServerThread(app, sock, name="registry-https", cert=cert, key=key, what="HTTPS server")
        server.start()
    except (OSError, ValueError):
        sock.close()
        raise
    port = sock.getsockname()[1]
    return RegistryHandle(url=http.client_url(config.host, port), host=config.host, port=port, ca_path=str(cert),
                          token=token, token_source=token_source, fingerprint=fingerprint(cert),
                          generated_cert=made, _server=server, _sock=sock)


# --- the command -----------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    """EV_Registry's parser: one argument per field of :class:`RegistryConfig`, then the process's."""
    p = parser_for(RegistryConfig, "EV_Registry",
                   "Registry of the EV charging network (HTTPS REST API, docs at /docs): registers CPs and "
                   "drivers and issues their credentials. It writes Central's database file (--db), so Central "
                   f"sees changes without restarting. The admin token comes from --admin-token-file or "
                   f"{TOKEN_ENV}, never from the command line.")
    add_process_flags(p, console=False)
    return p


def config_from_args(args: argparse.Namespace) -> RegistryConfig:
    return from_args(RegistryConfig, args)


def check_config(config: RegistryConfig) -> str | None:
    """A sentence saying what is wrong with ``config``, or None."""
    if not 0 <= config.port < 65536:
        return "--port must be between 0 and 65535"
    if bool(config.cert) != bool(config.key):
        return "--cert and --key go together: give both, or neither for a self-signed certificate"
    if not config.db_path:
        return "--db must name the database file (Central's)"
    return None


def listening_line(handle: RegistryHandle) -> str:
    host = f"[{handle.host}]" if ":" in handle.host else handle.host
    return (f"EV_Registry: listening on https://{host}:{handle.port} (certificate {handle.ca_path}, "
            f"fingerprint {handle.fingerprint}; admin token in {handle.token_source})")


def main(argv: list[str]) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    config = config_from_args(args)
    problem = check_config(config)
    if problem:
        parser.error(problem)
    setup_logging("registry", "", log_file=args.log_file, level=args.log_level)
    quit_requested = threading.Event()

    def on_signal(signum: int, _frame: Any) -> None:
        quit_requested.set()

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, on_signal)
    try:
        handle = start_registry(config)
    except (OSError, ValueError) as exc:
        log.error("Cannot start EV_Registry: %s", exc)
        return 1
    log.info("%s", listening_line(handle))
    while not quit_requested.wait(0.2):
        if not handle.alive:
            log.error("EV_Registry's server stopped: %s", handle.failure or "unknown reason")
            return 1
    log.info("Stopping EV_Registry…")
    handle.stop()
    log.info("EV_Registry stopped")
    return 0


if __name__ == "__main__":  # pragma: no cover
    import sys

    raise SystemExit(main(sys.argv[1:]))
