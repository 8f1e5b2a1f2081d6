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
import datetime as dt
import ipaddress
import logging
import os
import secrets
import signal
import socket
import stat
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from supervisors.central_system import CentralSystemConfig
from supervisors.logs import setup_logging
from supervisors.settings import add_process_flags, from_args, inherit, setting
from supervisors.settings import build_parser as parser_for

log = logging.getLogger("evcharging.registry")

__all__ = ["RegistryConfig", "RegistryHandle", "start_registry", "build_parser", "config_from_args",
           "check_config", "main", "TOKEN_ENV", "CERT_FILE", "KEY_FILE", "TOKEN_FILE", "fingerprint"]

TOKEN_ENV: Final = "EV_REGISTRY_TOKEN"  #: the admin token itself, when no --admin-token-file is given
CERT_FILE: Final = "registry-cert.pem"
KEY_FILE: Final = "registry-key.pem"
TOKEN_FILE: Final = "registry-token"
TOKEN_MIN_LEN: Final = 16
CERT_DAYS: Final = 825
START_TIMEOUT: Final = 10.0
_WILDCARDS: Final = ("", "0.0.0.0", "::", "*")


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
    cert_names: str = setting("localhost,127.0.0.1",
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
    _server: Any = field(repr=False)
    _thread: threading.Thread = field(repr=False)
    _sock: socket.socket = field(repr=False)
    _failure: list[BaseException] = field(repr=False)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    @property
    def failure(self) -> BaseException | None:
        return self._failure[0] if self._failure else None

    def stop(self, timeout: float = 5.0) -> None:
        """Stop serving (idempotent): open requests get up to ``timeout`` seconds."""
        self._server.should_exit = True
        self._thread.join(timeout)
        if self._thread.is_alive():
            self._server.force_exit = True
            self._thread.join(timeout)
        try:
            self._sock.close()
        except OSError:
            pass


# --- files made on the first start -------------------------------------------------------------
def _write_private(path: Path, data: bytes, mode: int = 0o600) -> None:
    """Write ``data`` to a file only its owner can read (``mode``), atomically (a reader never
    sees half of it)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _warn_if_readable(path: Path, what: str) -> None:
    try:
        mode = path.stat().st_mode
    except OSError:
        return
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        log.warning("%s %s can be read by other users (mode %o): chmod 600 it", what, path, mode & 0o777)


def cert_names(config: RegistryConfig) -> list[str]:
    """The names a generated certificate is valid for: --cert-names, this host's name, a specific --host."""
    names = [n.strip() for n in config.cert_names.split(",") if n.strip()]
    names.append(socket.gethostname())
    if config.host not in _WILDCARDS:
        names.append(config.host)
    return list(dict.fromkeys(names))


def make_self_signed(cert_path: Path, key_path: Path, names: list[str], days: int = CERT_DAYS) -> None:
    """A self-signed server certificate (EC P-256) for ``names``; the key is written 0600."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    alt: list[x509.GeneralName] = []
    for name in names:
        try:
            alt.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            alt.append(x509.DNSName(name))
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"EV_Registry {names[0]}"[:64]),
                         x509.NameAttribute(NameOID.ORGANIZATION_NAME, "EV charging network (self-signed)")])
    now = dt.datetime.now(dt.UTC)
    public = key.public_key()
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName(alt), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False, key_cert_sign=False,
                                     crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(public), critical=False)
        .sign(key, hashes.SHA256())
    )
    _write_private(key_path, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                               serialization.NoEncryption()))
    _write_private(cert_path, cert.public_bytes(serialization.Encoding.PEM), 0o644)  # public: clients trust it


def fingerprint(cert_path: str | Path) -> str:
    """The certificate's SHA-256 fingerprint (of its DER), as colon-separated hex."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes

    cert = x509.load_pem_x509_certificate(Path(cert_path).read_bytes())
    return cert.fingerprint(hashes.SHA256()).hex(":").upper()


def _tls_files(config: RegistryConfig) -> tuple[Path, Path, bool]:
    """(certificate, key, made now): the given pair, or the self-signed one next to the database."""
    if config.cert and config.key:
        cert, key = Path(config.cert), Path(config.key)
        for path in (cert, key):
            if not path.is_file():
                raise ValueError(f"the TLS file {path} does not exist")
        _warn_if_readable(key, "The TLS key")
        return cert, key, False
    cert, key = config.state_dir / CERT_FILE, config.state_dir / KEY_FILE
    if cert.is_file() and key.is_file():
        _warn_if_readable(key, "The TLS key")
        _check_reused(cert, cert_names(config))
        return cert, key, False
    names = cert_names(config)
    make_self_signed(cert, key, names)
    log.info("Made a self-signed certificate for %s: %s (key %s)", ", ".join(names), cert, key)
    return cert, key, True


def _check_reused(cert_path: Path, names: list[str]) -> None:
    """Warn when a reused self-signed certificate expired or lacks a name it is now asked for."""
    from cryptography import x509

    try:
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
        alt = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except (ValueError, x509.ExtensionNotFound) as exc:
        raise ValueError(f"{cert_path} is not a usable certificate ({exc}): delete it and its key to make "
                         "a new one") from exc
    have = {str(n) for n in alt.get_values_for_type(x509.DNSName)}
    have |= {str(n) for n in alt.get_values_for_type(x509.IPAddress)}
    missing = [n for n in names if n not in have]
    if missing:
        log.warning("The certificate %s is not valid for %s: delete it and its key to make a new one",
                    cert_path, ", ".join(missing))
    if cert.not_valid_after_utc <= dt.datetime.now(dt.UTC):
        log.warning("The certificate %s expired on %s: delete it and its key to make a new one", cert_path,
                    cert.not_valid_after_utc.date())


def _admin_token(config: RegistryConfig) -> tuple[str, str]:
    """(token, where it is): --admin-token-file, else $EV_REGISTRY_TOKEN, else the generated file."""
    if config.admin_token_file:
        path = Path(config.admin_token_file)
        try:
            token = path.read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise ValueError(f"cannot read the admin token file {path}: {exc.strerror or exc}") from exc
        source = str(path)
        _warn_if_readable(path, "The admin token file")
    elif os.environ.get(TOKEN_ENV):
        token, source = os.environ[TOKEN_ENV].strip(), f"the environment variable {TOKEN_ENV}"
    else:
        path = config.state_dir / TOKEN_FILE
        if path.is_file():
            token = path.read_text(encoding="utf-8").strip()
            _warn_if_readable(path, "The admin token file")
        else:
            token = secrets.token_urlsafe(32)
            _write_private(path, (token + "\n").encode())
            log.info("Generated an admin token into %s (only its owner can read it)", path)
        source = str(path)
    if len(token) < TOKEN_MIN_LEN:
        raise ValueError(f"the admin token in {source} is too short: at least {TOKEN_MIN_LEN} characters")
    if any(c.isspace() or ord(c) < 33 or ord(c) > 126 for c in token):
        raise ValueError(f"the admin token in {source} must be printable ASCII without spaces")
    return token, source


def _server(config: Any) -> Any:
    """uvicorn's server, with a ``settled`` event set once its start is over (instead of being polled)."""
    import uvicorn

    class _Server(uvicorn.Server):
        def __init__(self, config: uvicorn.Config) -> None:
            super().__init__(config)
            self.settled = threading.Event()

        async def startup(self, sockets: list[socket.socket] | None = None) -> None:
            try:
                await super().startup(sockets=sockets)
            finally:
                self.settled.set()

    return _Server(config)


def _prepare_database(path: Path) -> None:
    """Create a missing database file private (0600: its verifiers are what proofs are keyed with;
    SQLite gives its -wal and -shm files the same mode); warn when an existing one is readable by others."""
    if path.exists():
        _warn_if_readable(path, "The database (it holds the credentials' verifiers)")
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT, 0o600))


# --- the server ------------------------------------------------------------------------------
def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6 and host == "::":
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        sock.bind((host or "0.0.0.0", port))
    except OSError as exc:
        sock.close()
        raise OSError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from exc
    return sock


def _client_url(host: str, port: int) -> str:
    if host in _WILDCARDS:
        host = "127.0.0.1"
    return f"https://[{host}]:{port}" if ":" in host else f"https://{host}:{port}"


def start_registry(config: RegistryConfig) -> RegistryHandle:
    """Start the registry in this process (uvicorn in a background thread); returns once it accepts.

    Raises ValueError (a sentence) for a bad configuration or unreadable files, OSError
    when the port cannot be bound.
    """
    import uvicorn

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
    sock = _bind(config.host, config.port)
    try:
        uv = uvicorn.Config(app, host=config.host, port=config.port, ssl_certfile=str(cert), ssl_keyfile=str(key),
                            log_level="warning", log_config=None, access_log=False, server_header=False,
                            lifespan="off", timeout_graceful_shutdown=3,
                            # No proxy in front: X-Forwarded-For from a client must not choose the
                            # address that rate limits and audit lines see.
                            proxy_headers=False, forwarded_allow_ips="")
        uv.load()  # reads the certificate and key here, so a bad pair is this call's error
    except Exception as exc:
        sock.close()
        raise ValueError(f"cannot use the TLS certificate {cert} with the key {key}: {exc}") from exc
    server = _server(uv)
    failure: list[BaseException] = []

    def serve() -> None:
        try:
            server.run(sockets=[sock])
        except BaseException as exc:  # uvicorn exits with SystemExit when its start fails
            failure.append(exc)
            log.error("EV_Registry's server stopped: %s", exc, exc_info=exc)
        finally:
            server.settled.set()  # a start that failed wakes the waiter too

    thread = threading.Thread(target=serve, name="registry-https", daemon=True)
    thread.start()
    server.settled.wait(START_TIMEOUT)
    if not server.started:
        server.should_exit = True
        thread.join(2.0)
        sock.close()
        raise OSError(f"the HTTPS server did not start: {failure[0] if failure else 'timed out'}")
    port = sock.getsockname()[1]
    return RegistryHandle(url=_client_url(config.host, port), host=config.host, port=port, ca_path=str(cert),
                          token=token, token_source=token_source, fingerprint=fingerprint(cert),
                          generated_cert=made, _server=server, _thread=thread, _sock=sock, _failure=failure)


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
