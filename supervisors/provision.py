"""Provisioning: register CPs and drivers with EV_Registry and write their credential files.

One place for what ``evcharging up`` (and ``make demo``) and the Compose
``provision`` service do before the CPs and drivers start: for each CP and
driver that has no credential file yet, register it through the registry's
HTTPS API (with the admin token) and write the secret it shows once to
``<out>/cp-<ID>.json`` / ``<out>/driver-<ID>.json`` (mode 0600). A file that
already exists is kept: registering again would issue a new secret and lock
out the running program that uses the old one.

Command line (the token comes from ``EV_REGISTRY_TOKEN`` or ``--token-file``,
never from argv)::

    python -m supervisors.provision --registry https://registry:8443 --ca /data/registry-cert.pem \\
        --out /credentials --cp "MAD1=Madrid, Puerta del Sol=0.35" --driver driver1
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from collections.abc import Iterable
from pathlib import Path

from transport.security import write_credential

log = logging.getLogger("evcharging.provision")

__all__ = ["credential_path", "provision", "wait_for_registry", "main"]


def credential_path(out: Path, kind: str, ident: str) -> Path:
    """Where the credential file of a CP or driver goes."""
    return out / f"{kind}-{ident}.json"


def wait_for_registry(url: str, ca_path: Path, timeout: float = 30.0) -> None:
    """Wait (bounded) until the registry answers ``GET /health`` over verified HTTPS."""
    import ssl
    import urllib.request

    deadline = time.monotonic() + timeout
    last = "no answer"
    while time.monotonic() < deadline:
        try:
            if ca_path.exists():
                ctx = ssl.create_default_context(cafile=str(ca_path))
                with urllib.request.urlopen(f"{url}/health", context=ctx, timeout=2) as resp:
                    if resp.status == 200:
                        return
        except (OSError, ssl.SSLError) as exc:
            last = str(getattr(exc, "reason", exc))
        time.sleep(0.1)  # a bounded poll of another process
    raise RuntimeError(f"the registry at {url} did not answer within {timeout:.0f} s ({last})")


def provision(client: object, cps: Iterable[tuple[str, str, float]], drivers: Iterable[str], out: Path) -> int:
    """Register what has no credential file in ``out`` yet; returns how many were registered."""
    from transport.registry_api import RegistryClient

    assert isinstance(client, RegistryClient)
    out.mkdir(parents=True, exist_ok=True)
    os.chmod(out, 0o700)
    made = 0
    for cp_id, location, price in cps:
        path = credential_path(out, "cp", cp_id)
        if not path.exists():
            write_credential(path, "cp", cp_id, client.register_cp(cp_id, location, price))
            made += 1
    for driver_id in drivers:
        path = credential_path(out, "driver", driver_id)
        if not path.exists():
            write_credential(path, "driver", driver_id, client.register_driver(driver_id))
            made += 1
    return made


def _cp_arg(text: str) -> tuple[str, str, float]:
    parts = text.split("=")
    if len(parts) != 3:
        raise argparse.ArgumentTypeError(f"a CP is ID=LOCATION=PRICE, not {text!r}")
    try:
        return parts[0], parts[1], float(parts[2])
    except ValueError:
        raise argparse.ArgumentTypeError(f"the price of {parts[0]} must be a number, not {parts[2]!r}") from None


def main(argv: list[str] | None = None) -> int:
    from transport.registry_api import RegistryClient, RegistryError

    p = argparse.ArgumentParser(prog="python -m supervisors.provision", description=__doc__.split("\n\n")[0])
    p.add_argument("--registry", default=os.environ.get("EV_REGISTRY_URL"), help="https://HOST:PORT of EV_Registry")
    p.add_argument("--ca", default=os.environ.get("EV_REGISTRY_CA"), help="the registry's certificate (to trust)")
    p.add_argument("--token-file", default=os.environ.get("EV_REGISTRY_TOKEN_FILE"),
                   help="file with the admin token, read when env EV_REGISTRY_TOKEN is empty")
    p.add_argument("--out", default=os.environ.get("EV_CREDENTIALS_DIR", "credentials"),
                   help="directory of the credential files")
    p.add_argument("--cp", action="append", type=_cp_arg, default=[], help="ID=LOCATION=PRICE (repeat)")
    p.add_argument("--driver", action="append", default=[], help="a driver id (repeat)")
    p.add_argument("--wait", type=float, default=60.0, help="seconds to wait for the registry")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s provision: %(message)s")
    if not args.registry or not args.ca:
        p.error("--registry and --ca are required (or EV_REGISTRY_URL and EV_REGISTRY_CA)")
    try:
        wait_for_registry(args.registry.rstrip("/"), Path(args.ca), args.wait)
        token = os.environ.get("EV_REGISTRY_TOKEN", "").strip()
        if not token and args.token_file:
            token = Path(args.token_file).read_text(encoding="utf-8").strip()
        if not token:
            p.error("no admin token: set EV_REGISTRY_TOKEN or --token-file")
        made = provision(RegistryClient(args.registry.rstrip("/"), token, args.ca), args.cp, args.driver,
                         Path(args.out))
    except (RegistryError, RuntimeError, OSError) as exc:
        log.error("Provisioning failed: %s", exc)
        return 1
    log.info("%d credential(s) issued into %s (%d CP(s), %d driver(s) asked)", made, args.out, len(args.cp),
             len(args.driver))
    return 0


if __name__ == "__main__":
    sys.exit(main())
