"""EV_Registry (issue #11, item 1): the HTTPS registry of CPs and drivers, over real HTTPS.

Every test talks to a real registry (uvicorn in this process on port 0, or the
EV_Registry program as its own process) with certificate verification on,
trusting the certificate the registry made; the database is a real SQLite
file, read back the way Central reads it.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import select
import signal
import ssl
import stat
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from persistence import Repository
from persistence.trust import RegistryStore
from supervisors.registry_system import (
    CERT_FILE,
    KEY_FILE,
    TOKEN_ENV,
    TOKEN_FILE,
    RegistryConfig,
    RegistryHandle,
    start_registry,
)
from transport import security
from transport.registry_api import MAX_BODY_BYTES, RegistryClient, RegistryError

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def _no_token_in_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(TOKEN_ENV, raising=False)


def _start(db: Path, **kwargs: Any) -> RegistryHandle:
    return start_registry(RegistryConfig(db_path=str(db), host="127.0.0.1", port=0, **kwargs))


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RegistryHandle]:
    with pytest.MonkeyPatch.context() as env:
        env.delenv(TOKEN_ENV, raising=False)
        handle = _start(tmp_path_factory.mktemp("registry") / "central.db")
    yield handle
    handle.stop()


@pytest.fixture
def client(registry: RegistryHandle) -> RegistryClient:
    return RegistryClient(registry.url, registry.token, registry.ca_path)


def _db(registry: RegistryHandle) -> Path:
    return Path(registry.ca_path).parent / "central.db"


def call(registry: RegistryHandle, method: str, path: str, body: Any = None, *, token: str | None = None,
         raw: bytes | None = None) -> tuple[int, dict[str, str], Any]:
    """(status, headers (lower-case names), JSON or text) of one HTTPS request, verification on."""
    headers = {"Content-Type": "application/json"}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    req = urllib.request.Request(registry.url + path, data=data, method=method, headers=headers)
    ctx = ssl.create_default_context(cafile=registry.ca_path)
    try:
        with urllib.request.urlopen(req, context=ctx, timeout=10) as resp:
            status, hdrs, text = resp.status, {k.lower(): v for k, v in resp.headers.items()}, resp.read().decode()
    except urllib.error.HTTPError as exc:
        status, hdrs, text = exc.code, {k.lower(): v for k, v in exc.headers.items()}, exc.read().decode()
    try:
        return status, hdrs, json.loads(text) if text else None
    except ValueError:
        return status, hdrs, text


def _sentence(answer: Any) -> str:
    """The error sentence of an answer (``detail`` text, or ``message`` next to FastAPI's 422 list)."""
    assert isinstance(answer, dict), answer
    text = answer.get("message") or answer["detail"]
    assert isinstance(text, str), answer
    assert len(text.split()) >= 4, text  # a sentence, not a code
    return text


# --- registration --------------------------------------------------------------------------
def test_a_cp_gets_a_secret_once_and_only_its_verifier_is_stored(registry: RegistryHandle) -> None:
    status, headers, answer = call(registry, "POST", "/cps",
                                   {"cp_id": "MAD1", "location": "Madrid, Sol", "price_eur_kwh": 0.42},
                                   token=registry.token)
    assert status == 201, answer
    secret = answer["secret"]
    assert len(secret) == 43
    assert answer["cp_id"] == "MAD1"
    assert answer["credential"] == {"kind": "cp", "id": "MAD1", "secret": secret}
    assert "shown once" in answer["note"]
    assert headers.get("cache-control") == "no-store"

    # never shown again
    for path in ("/cps", "/cps/MAD1"):
        status, _, listed = call(registry, "GET", path, token=registry.token)
        assert status == 200
        assert secret not in json.dumps(listed)
        assert "verifier" not in json.dumps(listed)
    _, _, one = call(registry, "GET", "/cps/MAD1", token=registry.token)
    assert set(one) == {"cp_id", "location", "price_eur_kwh", "registered_at"}
    assert (one["location"], one["price_eur_kwh"]) == ("Madrid, Sol", 0.42)

    # the database holds the verifier, never the secret (the WAL included)
    db = _db(registry)
    stored = b"".join(p.read_bytes() for p in db.parent.glob(db.name + "*"))
    assert secret.encode() not in stored
    assert security.b64d(secret) not in stored
    with RegistryStore(db) as store:
        cred = store.credential("cp", "MAD1")
    assert cred is not None and cred.registered
    assert cred.verifier == security.verifier("cp", "MAD1", secret)
    # Central's view of the same file
    with Repository(db) as repo:
        cp = repo.get_cp("MAD1")
    assert cp is not None
    assert (cp.location, cp.price_eur_kwh) == ("Madrid, Sol", 0.42)


def test_list_deregister_and_re_register_with_a_new_secret(registry: RegistryHandle, client: RegistryClient) -> None:
    first = client.register_cp("BCN1", "Barcelona", 0.3)
    client.register_cp("VAL1", "Valencia", 0.25)
    ids = {cp["cp_id"] for cp in client.list_cps()}
    assert {"BCN1", "VAL1"} <= ids
    assert client.get_cp("VAL1")["price_eur_kwh"] == 0.25

    client.deregister_cp("BCN1")
    assert "BCN1" not in {cp["cp_id"] for cp in client.list_cps()}
    with RegistryStore(_db(registry)) as store:
        cred = store.credential("cp", "BCN1")
        refused = store.recent_audit(10, event="deregistered")
    assert cred is not None and not cred.registered
    assert any(a.detail == "cp BCN1" and a.address == "127.0.0.1" for a in refused)
    with pytest.raises(RegistryError) as gone:
        client.deregister_cp("BCN1")
    assert gone.value.status == 404 and "BCN1 is not registered" in str(gone.value)
    with pytest.raises(RegistryError) as missing:
        client.get_cp("BCN1")
    assert missing.value.status == 404

    second = client.register_cp("BCN1", "Barcelona, Sants", 0.31)  # re-registering: a new secret
    assert second != first
    with RegistryStore(_db(registry)) as store:
        cred = store.credential("cp", "BCN1")
    assert cred is not None and cred.registered
    assert cred.verifier == security.verifier("cp", "BCN1", second)
    assert cred.verifier != security.verifier("cp", "BCN1", first)  # the old secret no longer works
    third = client.register_cp("BCN1", "Barcelona, Sants", 0.31)  # while registered: replaced too
    with RegistryStore(_db(registry)) as store:
        cred = store.credential("cp", "BCN1")
    assert cred is not None and cred.verifier == security.verifier("cp", "BCN1", third)
    assert client.get_cp("BCN1")["location"] == "Barcelona, Sants"


def test_drivers_are_registered_listed_and_deregistered(registry: RegistryHandle, client: RegistryClient) -> None:
    secret = client.register_driver("driver1")
    status, _, one = call(registry, "GET", "/drivers/driver1", token=registry.token)
    assert status == 200 and set(one) == {"driver_id", "registered_at"}
    assert "driver1" in {d["driver_id"] for d in client.list_drivers()}
    with RegistryStore(_db(registry)) as store:
        cred = store.credential("driver", "driver1")
    assert cred is not None and cred.verifier == security.verifier("driver", "driver1", secret)
    client.deregister_driver("driver1")
    assert "driver1" not in {d["driver_id"] for d in client.list_drivers()}
    with pytest.raises(RegistryError) as gone:
        client.deregister_driver("driver1")
    assert gone.value.status == 404 and "not registered" in str(gone.value)


def test_registrations_run_side_by_side_and_health_answers_meanwhile(registry: RegistryHandle,
                                                                    client: RegistryClient) -> None:
    ids = [f"PAR{i}" for i in range(8)]
    with ThreadPoolExecutor(len(ids)) as pool:
        secrets_ = pool.map(lambda i: client.register_cp(i, "Somewhere", 0.3), ids)
        started = time.monotonic()
        assert client.health()  # the slow hashes run in worker threads, not on the event loop
        health_s = time.monotonic() - started
        issued = dict(zip(ids, secrets_, strict=True))
    assert health_s < 1.0
    with RegistryStore(_db(registry)) as store:
        for ident, secret in issued.items():
            cred = store.credential("cp", ident)
            assert cred is not None and cred.verifier == security.verifier("cp", ident, secret)


# --- the admin token -------------------------------------------------------------------------
def test_no_token_is_401_and_a_wrong_one_403_and_audited(registry: RegistryHandle) -> None:
    for method, path, body in (("GET", "/cps", None), ("GET", "/drivers", None), ("DELETE", "/cps/MAD1", None),
                               ("POST", "/cps", {"cp_id": "X1", "location": "x", "price_eur_kwh": 1})):
        status, headers, answer = call(registry, method, path, body)
        assert status == 401, (method, path, answer)
        assert headers.get("www-authenticate") == "Bearer"
        assert "admin token" in _sentence(answer)
    # refused before the body is even validated, or parsed
    status, _, _ = call(registry, "POST", "/cps", {"cp_id": "bad id"})
    assert status == 401
    status, _, answer = call(registry, "POST", "/cps", raw=b"{not json")
    assert status == 401 and "admin token" in _sentence(answer)

    status, _, answer = call(registry, "POST", "/cps", {"cp_id": "X1", "location": "x", "price_eur_kwh": 1},
                             token="not-the-admin-token-at-all")
    assert status == 403
    assert "wrong" in _sentence(answer)
    status, _, answer = call(registry, "POST", "/cps", raw=b"{not json", token="not-the-admin-token-at-all")
    assert status == 403 and "wrong" in _sentence(answer)
    with RegistryStore(_db(registry)) as store:
        refused = store.recent_audit(5, event="admin_token_refused")
        assert store.credential("cp", "X1") is None
    assert refused, "the refused token was not audited"
    line = refused[0]
    assert (line.component, line.subject, line.address) == ("registry", "anonymous", "127.0.0.1")
    assert "POST /cps" in line.detail
    assert "not-the-admin-token" not in (line.detail + (line.params or ""))


def test_six_wrong_tokens_from_one_address_are_429_for_everything(tmp_path: Path) -> None:
    handle = _start(tmp_path / "central.db")
    try:
        wrong = RegistryClient(handle.url, "x" * 32, handle.ca_path)
        for _ in range(5):
            with pytest.raises(RegistryError) as refused:
                wrong.list_cps()
            assert refused.value.status == 403
        with pytest.raises(RegistryError) as limited:
            wrong.list_cps()
        assert limited.value.status == 429
        assert limited.value.retry_after is not None and 0 < limited.value.retry_after <= 60
        assert "too many wrong admin tokens" in str(limited.value)
        with pytest.raises(RegistryError) as still:  # the right token too, until the window moves on
            RegistryClient(handle.url, handle.token, handle.ca_path).list_cps()
        assert still.value.status == 429
        status, _, _ = call(handle, "GET", "/health")  # public routes stay open
        assert status == 200
        with RegistryStore(tmp_path / "central.db") as store:
            assert len(store.recent_audit(50, event="admin_token_refused")) == 5
    finally:
        handle.stop()


# --- validation at the edge ----------------------------------------------------------------
@pytest.mark.parametrize("body, expected", [
    ({"cp_id": "bad id!", "location": "x", "price_eur_kwh": 0.3}, "CP id may contain only"),
    ({"cp_id": "x" * 65, "location": "x", "price_eur_kwh": 0.3}, "at most 64"),
    ({"cp_id": "OK1", "location": "x" * 201, "price_eur_kwh": 0.3}, "at most 200"),
    ({"cp_id": "OK1", "location": "a\nb", "price_eur_kwh": 0.3}, "control characters"),
    ({"cp_id": "OK1", "location": "x", "price_eur_kwh": -0.1}, "greater than or equal to 0"),
    ({"cp_id": "OK1", "location": "x", "price_eur_kwh": 100.5}, "less than or equal to 100"),
    ({"cp_id": "OK1", "location": "x", "price_eur_kwh": "0.3"}, "price_eur_kwh"),
    ({"cp_id": "OK1", "location": "x", "price_eur_kwh": 0.3, "secret": "mine"}, "unknown field 'secret'"),
    ({"cp_id": "OK1"}, "location is required"),
], ids=["id-chars", "id-long", "location-long", "location-control", "price-negative", "price-high",
        "price-text", "unknown-field", "missing"])
def test_a_bad_cp_is_refused_with_a_sentence(registry: RegistryHandle, body: dict[str, Any], expected: str) -> None:
    status, _, answer = call(registry, "POST", "/cps", body, token=registry.token)
    assert status == 422, answer
    assert isinstance(answer["detail"], list)  # FastAPI's shape, plus one readable sentence
    assert expected in _sentence(answer)
    with RegistryStore(_db(registry)) as store:
        assert store.credential("cp", "OK1") is None


def test_other_bad_requests_are_refused_with_a_sentence(registry: RegistryHandle) -> None:
    status, _, answer = call(registry, "POST", "/drivers", {"driver_id": "a b"}, token=registry.token)
    assert status == 422 and "driver id" in _sentence(answer)
    status, _, answer = call(registry, "POST", "/cps", raw=b"{not json", token=registry.token)
    assert status == 422 and "not valid JSON" in _sentence(answer)
    status, _, answer = call(registry, "GET", "/cps/bad%20id", token=registry.token)
    assert status == 422 and "may contain only" in _sentence(answer)
    big = {"cp_id": "BIG1", "location": "x", "price_eur_kwh": 0.3, "pad": "y" * 20_000}
    status, _, answer = call(registry, "POST", "/cps", big, token=registry.token)
    assert status == 413 and str(MAX_BODY_BYTES) in _sentence(answer)


def test_a_chunked_body_over_the_limit_is_413(registry: RegistryHandle) -> None:
    ctx = ssl.create_default_context(cafile=registry.ca_path)
    conn = http.client.HTTPSConnection("127.0.0.1", registry.port, context=ctx, timeout=10)
    try:
        chunks = iter([b'{"cp_id": "BIG2", "pad": "', b"z" * 10_000, b"z" * 10_000, b'"}'])
        conn.request("POST", "/cps", body=chunks, encode_chunked=True,
                     headers={"Authorization": f"Bearer {registry.token}", "Content-Type": "application/json"})
        resp = conn.getresponse()
        assert resp.status == 413
        assert "larger than" in json.loads(resp.read())["detail"]
    finally:
        conn.close()


# --- public routes, TLS ----------------------------------------------------------------------
def test_health_and_the_openapi_docs_are_public(registry: RegistryHandle) -> None:
    status, _, answer = call(registry, "GET", "/health")
    assert (status, answer) == (200, {"status": "ok"})
    status, _, page = call(registry, "GET", "/docs")
    assert status == 200 and "swagger" in page.lower()
    status, _, spec = call(registry, "GET", "/openapi.json")
    assert status == 200
    assert {"/cps", "/cps/{cp_id}", "/drivers", "/drivers/{driver_id}", "/health"} <= set(spec["paths"])
    assert "shown once" in json.dumps(spec)
    assert RegistryClient(registry.url, "", registry.ca_path).health()


def test_it_speaks_only_https_and_verification_holds(registry: RegistryHandle) -> None:
    with pytest.raises((OSError, http.client.HTTPException)):
        with urllib.request.urlopen(f"http://127.0.0.1:{registry.port}/health", timeout=5) as resp:
            resp.read()
    # the system CAs do not vouch for a self-signed certificate
    with pytest.raises(RegistryError) as untrusted:
        RegistryClient(registry.url, registry.token).health()
    assert untrusted.value.status is None and "CERTIFICATE_VERIFY_FAILED" in str(untrusted.value)
    # the certificate names localhost too (hostname verification is on)
    assert RegistryClient(f"https://localhost:{registry.port}", registry.token, registry.ca_path).health()


# --- files made on the first start ---------------------------------------------------------
def test_the_certificate_key_and_token_are_made_once_private_and_reused(tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    db = tmp_path / "state" / "central.db"
    first = _start(db)
    try:
        assert first.generated_cert
        assert Path(first.ca_path) == db.parent / CERT_FILE
        assert first.token_source == str(db.parent / TOKEN_FILE)
        assert (db.parent / TOKEN_FILE).read_text().strip() == first.token
        for name in (KEY_FILE, TOKEN_FILE, db.name):
            assert stat.S_IMODE((db.parent / name).stat().st_mode) == 0o600, name
        assert re.fullmatch(r"([0-9A-F]{2}:){31}[0-9A-F]{2}", first.fingerprint)
    finally:
        first.stop()
    second = _start(db)
    try:
        assert not second.generated_cert
        assert (second.fingerprint, second.token) == (first.fingerprint, first.token)
        assert RegistryClient(second.url, first.token, first.ca_path).list_cps() == []
    finally:
        second.stop()

    # the token from the environment, or from a file; never generated then
    monkeypatch.setenv(TOKEN_ENV, "environment-token-0123456789")
    other = tmp_path / "other" / "central.db"
    handle = _start(other)
    try:
        assert (handle.token, handle.token_source) == ("environment-token-0123456789", f"the environment "
                                                                                       f"variable {TOKEN_ENV}")
        assert not (other.parent / TOKEN_FILE).exists()
    finally:
        handle.stop()
    token_file = tmp_path / "admin.token"
    token_file.write_text("file-token-0123456789abcdef\n")
    handle = _start(other, admin_token_file=str(token_file))
    try:
        assert handle.token == "file-token-0123456789abcdef"
        assert RegistryClient(handle.url, handle.token, handle.ca_path).list_drivers() == []
    finally:
        handle.stop()
    token_file.write_text("short\n")
    with pytest.raises(ValueError, match="too short"):
        _start(other, admin_token_file=str(token_file))
    with pytest.raises(ValueError, match="--cert and --key go together"):
        _start(other, cert=str(db.parent / CERT_FILE))


# --- the real program ------------------------------------------------------------------------
def _program() -> list[str]:
    script = Path(sys.executable).parent / "EV_Registry"
    return [str(script)] if script.exists() else [sys.executable, "-m", "supervisors.cli", "registry"]


def test_the_ev_registry_program_serves_https_and_stops_on_sigterm(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("EV_")}
    env["PYTHONPATH"] = str(ROOT)
    db = tmp_path / "central.db"
    proc = subprocess.Popen([*_program(), "--db", str(db), "--host", "127.0.0.1", "--port", "0"], cwd=tmp_path,
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    output: list[str] = []
    try:
        assert proc.stderr is not None
        deadline = time.monotonic() + 20
        line = ""
        while "listening on" not in line:
            assert time.monotonic() < deadline, f"EV_Registry did not start: {output}"
            assert proc.poll() is None, f"EV_Registry exited {proc.returncode}: {output}"
            ready, _, _ = select.select([proc.stderr], [], [], 0.5)
            if ready:
                line = proc.stderr.readline()
                output.append(line)
        found = re.search(r"listening on https://127\.0\.0\.1:(\d+) \(certificate (\S+), fingerprint "
                          r"([0-9A-F:]+); admin token in (\S+)\)", line)
        assert found, line
        port, cert, print_, token_path = int(found[1]), found[2], found[3], found[4]
        assert (cert, token_path) == (str(db.parent / CERT_FILE), str(db.parent / TOKEN_FILE))
        token = Path(token_path).read_text().strip()
        client = RegistryClient(f"https://127.0.0.1:{port}", token, cert)
        secret = client.register_cp("PROC1", "Madrid", 0.5)
        assert [cp["cp_id"] for cp in client.list_cps()] == ["PROC1"]
        with RegistryStore(db) as store:
            cred = store.credential("cp", "PROC1")
        assert cred is not None and cred.verifier == security.verifier("cp", "PROC1", secret)
        assert len(print_) == 95  # 32 bytes as colon-separated hex
        proc.send_signal(signal.SIGTERM)
        _, rest = proc.communicate(timeout=10)
        output.append(rest)
        assert proc.returncode == 0, output
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    text = "".join(output)
    assert token not in text and secret not in text  # only paths are logged
    assert "EV_Registry stopped" in text
