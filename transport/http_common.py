"""What Central's HTTP adapters share: EV_Registry's REST API and API_Central.

Both are FastAPI apps served by uvicorn in a thread of their program, over TLS
with a certificate made on the first start when none is given, behind an
operator/admin token that is never an argument. The pieces they have in common
live here, once:

* :class:`BodyLimit`: a request body larger than the limit is answered 413
  before the app reads it (a declared ``Content-Length`` at once, a chunked
  body as soon as it passes the limit);
* :func:`sentence`: FastAPI's validation errors as one sentence for a person;
* :class:`TokenGate`: the token check of every protected route, with a
  :class:`~transport.security.FailureLimiter` per client address (429 with
  ``Retry-After`` past it);
* the files made on the first start (:func:`tls_files`, :func:`load_token`,
  written 0600 and atomically), :func:`fingerprint` of a certificate;
* :func:`bind` and :class:`ServerThread`: uvicorn on a socket bound by the
  caller (so a port 0 is known before serving, and a listening socket can
  outlive the server that restarts on it), started and stopped on uvicorn's
  own startup event rather than by polling.
"""

from __future__ import annotations

import datetime as dt
import hmac
import ipaddress
import json
import logging
import math
import os
import secrets
import socket
import stat
import threading
import urllib.error
from collections.abc import Awaitable, Callable, MutableMapping
from pathlib import Path
from typing import Annotated, Any, Final

from fastapi import Depends, HTTPException, Request
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.concurrency import run_in_threadpool

from transport import security

__all__ = ["MAX_BODY_BYTES", "DEFAULT_CERT_NAMES", "BodyLimit", "sentence", "error_list", "TokenGate",
           "client_address", "write_private", "warn_if_readable", "cert_names", "make_self_signed",
           "fingerprint", "tls_files", "load_token", "bind", "client_url", "ServerThread", "TOKEN_MIN_LEN"]

log = logging.getLogger("evcharging.http")

#: The largest request body accepted (bytes); a larger one is answered 413 before it is read.
MAX_BODY_BYTES: Final = 16 * 1024
#: Names a self-signed certificate made here is valid for (this host's name is always added).
DEFAULT_CERT_NAMES: Final = "localhost,127.0.0.1"
TOKEN_MIN_LEN: Final = 16
CERT_DAYS: Final = 825
START_TIMEOUT: Final = 10.0
WILDCARDS: Final = ("", "0.0.0.0", "::", "*")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
AsgiApp = Callable[[Scope, Receive, Send], Awaitable[None]]


# --- the edge of every request -----------------------------------------------------------------
class BodyLimit:
    """Answer 413 to a request whose body is larger than ``limit`` bytes, before the app reads it.

    A declared ``Content-Length`` is checked at once; a body without one (chunked)
    is read here up to the limit and handed on only when it fits.
    """

    def __init__(self, app: AsgiApp, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = next((v for k, v in scope["headers"] if k == b"content-length"), None)
        if declared is not None:
            text = declared.decode("latin-1").strip()
            if not text.isdigit() or int(text) > self.limit:
                await self._refuse(send)
                return
            await self.app(scope, receive, send)
            return
        if next((v for k, v in scope["headers"] if k == b"transfer-encoding"), None) is None:
            await self.app(scope, receive, send)  # no body at all
            return
        messages: list[Message] = []
        size = 0
        while True:
            message = await receive()
            messages.append(message)
            if message["type"] != "http.request":
                break
            size += len(message.get("body", b""))
            if size > self.limit:
                await self._refuse(send)
                return
            if not message.get("more_body", False):
                break
        pending = iter(messages)

        async def replay() -> Message:
            return next(pending, None) or await receive()

        await self.app(scope, replay, send)

    async def _refuse(self, send: Send) -> None:
        body = json.dumps({"detail": f"the request body is larger than {self.limit} bytes"}).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": body})


def error_list(errors: Any) -> list[dict[str, Any]]:
    """FastAPI's validation errors reduced to JSON-safe ``loc``, ``msg`` and ``type`` (no input echoed)."""
    return [{"loc": list(e.get("loc", ())), "msg": str(e.get("msg", "")), "type": str(e.get("type", ""))}
            for e in errors]


def sentence(errors: list[dict[str, Any]]) -> str:
    """FastAPI's validation errors as one readable sentence."""
    parts = []
    for err in errors:
        loc = [str(p) for p in err.get("loc", ()) if p not in ("body", "query", "path")]
        where = ".".join(loc)
        kind = err.get("type", "")
        msg = str(err.get("msg", "is invalid")).removeprefix("Value error, ")
        if kind == "extra_forbidden":
            parts.append(f"unknown field {where!r}")
        elif kind == "missing":
            parts.append(f"{where or 'the body'} is required")
        elif kind == "json_invalid":
            parts.append("the body is not valid JSON")
        elif kind == "value_error":
            parts.append(msg)
        else:
            parts.append(f"{where}: {msg[:1].lower()}{msg[1:]}" if where else msg)
    return "the request is invalid: " + "; ".join(parts or ["it does not match the schema"])


def client_address(request: Request) -> str:
    return request.client.host if request.client else "unknown"


#: Called with (client address, "METHOD /path") after a wrong token (to audit it).
OnRefused = Callable[[str, str], None]


class TokenGate:
    """The token check of every protected route (a FastAPI dependency).

    Wrong tokens count per client address (:class:`~transport.security.FailureLimiter`);
    at the limit everything from that address is refused (429) until the window moves on,
    the right token too, so the token cannot be guessed faster than the limit allows.
    A missing token is not counted (a page that has not asked for it yet is not an attack).
    ``wrong_status``: the answer to a wrong token (the registry says 403, API_Central 401);
    ``on_refused`` is called for each wrong one (the audit line); ``what`` names the token.
    """

    def __init__(self, token: str, limiter: security.FailureLimiter, *, what: str = "admin token",
                 wrong_status: int = 403, on_refused: OnRefused | None = None,
                 logger: logging.Logger = log) -> None:
        if not token:
            raise ValueError(f"the {what} must not be empty")
        self._token = token.encode()
        self._limiter = limiter
        self._lock = threading.Lock()  # the limiter is also read from worker threads (registry routes)
        self.what = what
        self.wrong_status = wrong_status
        self._on_refused = on_refused
        self._log = logger

    def __repr__(self) -> str:  # never the token
        return f"TokenGate({self.what!r})"

    async def __call__(self, request: Request, given: Annotated[HTTPAuthorizationCredentials | None,
                                                                Depends(HTTPBearer(auto_error=False))]) -> None:
        """Runs on the event loop (no hop to a worker thread for every request: in a busy process each hop
        waits for the GIL); only the audit of a wrong token goes to a worker thread."""
        address = client_address(request)
        with self._lock:
            blocked = self._limiter.blocked(address)
            wait = self._limiter.retry_after(address) if blocked else 0.0
        if blocked:
            raise HTTPException(429, f"too many wrong {self.what}s from {address}: try again in {math.ceil(wait)} s",
                                headers={"Retry-After": str(max(1, math.ceil(wait)))})
        if given is None:
            raise HTTPException(401, f"this needs the {self.what}: send the header 'Authorization: Bearer <token>'",
                                headers={"WWW-Authenticate": "Bearer"})
        if hmac.compare_digest(given.credentials.encode("utf-8", "replace"), self._token):
            return
        with self._lock:
            self._limiter.failed(address)
        what = f"{request.method} {request.url.path}"
        self._log.warning("Refused a wrong %s from %s (%s)", self.what, address, what)
        if self._on_refused is not None:
            await run_in_threadpool(self._on_refused, address, what)
        headers = {"WWW-Authenticate": "Bearer"} if self.wrong_status == 401 else None
        raise HTTPException(self.wrong_status, f"the {self.what} is wrong (the attempt was logged)", headers=headers)

    async def refusal(self, request: Request) -> JSONResponse | None:
        """For a request that failed validation (a 422 on its way): this gate's answer first, if the route
        it reached is one the gate protects and the token does not pass; None otherwise. FastAPI parses a
        JSON body before it runs the route's dependencies, so without this a stranger's malformed body
        learnt the API's rules (422) before being asked for the token (401)."""
        route = request.scope.get("route")
        if not any(getattr(d, "dependency", None) is self for d in getattr(route, "dependencies", ())):
            return None
        try:
            await self(request, await HTTPBearer(auto_error=False)(request))
        except HTTPException as exc:
            return JSONResponse({"detail": exc.detail}, status_code=exc.status_code, headers=exc.headers)
        return None


# --- files made on the first start ---------------------------------------------------------------
def write_private(path: Path, data: bytes, mode: int = 0o600) -> None:
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


def warn_if_readable(path: Path, what: str) -> None:
    try:
        mode = path.stat().st_mode
    except OSError:
        return
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        log.warning("%s %s can be read by other users (mode %o): chmod 600 it", what, path, mode & 0o777)


def cert_names(names_csv: str, host: str) -> list[str]:
    """The names a generated certificate is valid for: ``names_csv``, this host's name, a specific ``host``."""
    names = [n.strip() for n in names_csv.split(",") if n.strip()]
    names.append(socket.gethostname())
    if host not in WILDCARDS:
        names.append(host)
    return list(dict.fromkeys(names))


def make_self_signed(cert_path: Path, key_path: Path, names: list[str], days: int = CERT_DAYS, *,
                     title: str = "EV_Registry") -> None:
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
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"{title} {names[0]}"[:64]),
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
    write_private(key_path, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                              serialization.NoEncryption()))
    write_private(cert_path, cert.public_bytes(serialization.Encoding.PEM), 0o644)  # public: clients trust it


def fingerprint(cert_path: str | Path) -> str:
    """The certificate's SHA-256 fingerprint (of its DER), as colon-separated hex."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes

    cert = x509.load_pem_x509_certificate(Path(cert_path).read_bytes())
    return cert.fingerprint(hashes.SHA256()).hex(":").upper()


def tls_files(cert: str, key: str, state_dir: Path, cert_file: str, key_file: str, names: list[str], *,
              title: str) -> tuple[Path, Path, bool]:
    """(certificate, key, made now): the given pair, or the self-signed one ``cert_file``/``key_file``
    in ``state_dir`` (made for ``names`` on the first start, then reused)."""
    if cert and key:
        cert_path, key_path = Path(cert), Path(key)
        for path in (cert_path, key_path):
            if not path.is_file():
                raise ValueError(f"the TLS file {path} does not exist")
        warn_if_readable(key_path, "The TLS key")
        return cert_path, key_path, False
    cert_path, key_path = state_dir / cert_file, state_dir / key_file
    if cert_path.is_file() and key_path.is_file():
        warn_if_readable(key_path, "The TLS key")
        _check_reused(cert_path, names)
        return cert_path, key_path, False
    make_self_signed(cert_path, key_path, names, title=title)
    log.info("Made a self-signed certificate for %s: %s (key %s)", ", ".join(names), cert_path, key_path)
    return cert_path, key_path, True


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


def load_token(token_file: str, env: str, generated: Path, *, what: str = "admin token") -> tuple[str, str]:
    """(token, where it is): ``token_file``, else the environment variable ``env``, else ``generated``
    (made on the first start, 0600, then reused). Only where it is may be logged, never the token."""
    if token_file:
        path = Path(token_file)
        try:
            token = path.read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise ValueError(f"cannot read the {what} file {path}: {exc.strerror or exc}") from exc
        source = str(path)
        warn_if_readable(path, f"The {what} file")
    elif os.environ.get(env):
        token, source = os.environ[env].strip(), f"the environment variable {env}"
    else:
        if generated.is_file():
            token = generated.read_text(encoding="utf-8").strip()
            warn_if_readable(generated, f"The {what} file")
        else:
            token = secrets.token_urlsafe(32)
            write_private(generated, (token + "\n").encode())
            log.info("Generated an %s into %s (only its owner can read it)", what, generated)
        source = str(generated)
    if len(token) < TOKEN_MIN_LEN:
        raise ValueError(f"the {what} in {source} is too short: at least {TOKEN_MIN_LEN} characters")
    if any(c.isspace() or ord(c) < 33 or ord(c) > 126 for c in token):
        raise ValueError(f"the {what} in {source} must be printable ASCII without spaces")
    return token, source


# --- the server ------------------------------------------------------------------------------
def bind(host: str, port: int) -> socket.socket:
    """A TCP socket bound to ``host``:``port`` (not yet listening: uvicorn listens on it)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # proto named explicitly: asyncio turns Nagle off (TCP_NODELAY) only on sockets whose proto says TCP,
    # and accepted sockets take the listening one's. With proto 0 every small answer on a kept-alive
    # connection waited for the client's delayed ACK (40 ms).
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6 and host == "::":
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        sock.bind((host or "0.0.0.0", port))
    except OSError as exc:
        sock.close()
        raise OSError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from exc
    return sock


def client_url(host: str, port: int, *, tls: bool = True) -> str:
    """An address clients on this host can use (a wildcard host becomes 127.0.0.1)."""
    if host in WILDCARDS:
        host = "127.0.0.1"
    scheme = "https" if tls else "http"
    return f"{scheme}://[{host}]:{port}" if ":" in host else f"{scheme}://{host}:{port}"


def _uvicorn_server(config: Any) -> Any:
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


class ServerThread:
    """uvicorn serving ``app`` on the bound socket ``sock``, in a daemon thread named ``name``.

    uvicorn closes the socket it is given when it stops; pass a ``sock.dup()`` to keep
    listening on the port across a restart of the server (connections wait in the
    backlog meanwhile). ``cert``/``key`` None: plain HTTP. ``max_connections``: connections and
    requests served at once (None: unbounded); past it, uvicorn answers 503.
    """

    def __init__(self, app: Any, sock: socket.socket, *, name: str, cert: Path | None = None,
                 key: Path | None = None, graceful: int = 3, what: str = "HTTPS server",
                 max_connections: int | None = None) -> None:
        import uvicorn

        host, port = sock.getsockname()[:2]
        tls: dict[str, Any] = {"ssl_certfile": str(cert), "ssl_keyfile": str(key)} if cert and key else {}
        try:
            config = uvicorn.Config(app, host=host, port=port, log_level="warning", log_config=None,
                                    access_log=False, server_header=False, lifespan="off",
                                    timeout_graceful_shutdown=graceful,
                                    # No proxy in front: X-Forwarded-For from a client must not choose the
                                    # address that rate limits and audit lines see.
                                    proxy_headers=False, forwarded_allow_ips="",
                                    # Connections and requests at once; past it uvicorn answers 503 at once.
                                    limit_concurrency=max_connections, **tls)
            config.load()  # reads the certificate and key here, so a bad pair is this call's error
        except Exception as exc:
            raise ValueError(f"cannot use the TLS certificate {cert} with the key {key}: {exc}") from exc
        self.what = what
        self.port = int(port)
        self._sock = sock
        self._server = _uvicorn_server(config)
        self._failure: list[BaseException] = []
        self._thread = threading.Thread(target=self._serve, name=name, daemon=True)

    def _serve(self) -> None:
        try:
            self._server.run(sockets=[self._sock])
        except BaseException as exc:  # uvicorn exits with SystemExit when its start fails
            self._failure.append(exc)
            log.error("The %s stopped: %s", self.what, exc, exc_info=exc)
        finally:
            self._server.settled.set()  # a start that failed wakes the waiter too

    def start(self, timeout: float = START_TIMEOUT) -> None:
        """Serve; returns once it accepts, or raises OSError saying why not."""
        self._thread.start()
        self._server.settled.wait(timeout)
        if not self._server.started:
            self._server.should_exit = True
            self._thread.join(2.0)
            raise OSError(f"the {self.what} did not start: {self._failure[0] if self._failure else 'timed out'}")

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    @property
    def failure(self) -> BaseException | None:
        return self._failure[0] if self._failure else None

    def stop(self, timeout: float = 5.0) -> None:
        """Stop serving (idempotent): open requests get up to ``timeout`` seconds."""
        self._server.should_exit = True
        if self._thread.ident is None:
            return
        self._thread.join(timeout)
        if self._thread.is_alive():
            self._server.force_exit = True
            self._thread.join(timeout)


def read_refusal(exc: urllib.error.HTTPError, fallback: str) -> tuple[str, Any, float | None]:
    """What a client reads from an HTTP error answer: the server's sentence (its JSON ``detail``,
    or ``message``; else ``fallback``), the JSON body (None if it is not JSON) and ``Retry-After``
    in seconds (None if absent or not a number). Shared by the registry and API_Central clients."""
    try:
        data = json.loads(exc.read() or b"null")
    except (ValueError, OSError):
        data = None
    message = fallback
    if isinstance(data, dict):
        text = data.get("message") or data.get("detail")
        if isinstance(text, str) and text:
            message = text
    retry = exc.headers.get("Retry-After") if exc.headers else None
    try:
        retry_after = float(retry) if retry else None
    except ValueError:
        retry_after = None
    return message, data, retry_after
