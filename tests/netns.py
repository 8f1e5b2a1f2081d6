"""Test hosts on one machine: Linux network namespaces on a private bridge.

:class:`Lab` builds a small LAN that exists only inside this sandbox:

* a *switch* namespace holding a bridge (no address, so the machine's own
  namespace and its firewall rules are never involved);
* one namespace per host, each with loopback up and one interface ``eth0``
  (a veth pair whose other end is a port of the bridge) with its own address
  in a private test range (``10.203.0.0/24`` by default);
* :meth:`Lab.popen` runs a program *in* a host (``ip netns exec``);
  :meth:`Lab.cut` / :meth:`Lab.restore` pull and plug a host's cable (its
  switch port goes down: packets are dropped silently, like a cut link);
* :meth:`Lab.teardown` kills every process started in the hosts and deletes
  the namespaces (and with them every link), even after a failure.

Every name carries the creating process's id, so two runs never collide, and
a run that died without cleaning up is cleaned by the next one.
Needs root and iproute2; :func:`unavailable` says why a machine cannot.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

PREFIX = "evmh"  # every namespace this module creates starts with this


def _ip(*args: str, check: bool = True, timeout: float = 10) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)} failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc


def unavailable() -> str | None:
    """Why network namespaces cannot be used here, or None when they can (checked by trying)."""
    if sys.platform != "linux":
        return "network namespaces are Linux only"
    if os.geteuid() != 0:
        return "creating network namespaces needs root (CI runs as root)"
    if shutil.which("ip") is None and not _install_iproute2():
        return "the 'ip' command (Debian package iproute2) is not installed and could not be installed"
    probe = f"{PREFIX}{os.getpid()}-probe"
    try:
        made = _ip("netns", "add", probe, check=False)
        if made.returncode != 0:
            return f"'ip netns add' is not permitted here: {made.stderr.strip()}"
        veth = _ip("-n", probe, "link", "add", "vprobe0", "type", "veth", "peer", "name", "vprobe1",
                   check=False)
        bridge = _ip("-n", probe, "link", "add", "brprobe", "type", "bridge", check=False)
        if veth.returncode != 0 or bridge.returncode != 0:
            return f"veth pairs or bridges cannot be created: {(veth.stderr or bridge.stderr).strip()}"
        return None
    except (OSError, subprocess.SubprocessError) as exc:
        return f"cannot run 'ip': {exc}"
    finally:
        _ip("netns", "del", probe, check=False)


def _install_iproute2() -> bool:
    """Install Debian's iproute2 (root only); True once ``ip`` is there."""
    apt = shutil.which("apt-get")
    if apt is None:
        return False
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    for steps in ([[apt, "install", "-y", "-qq", "iproute2"]],
                  [[apt, "update", "-qq"], [apt, "install", "-y", "-qq", "iproute2"]]):
        try:
            for step in steps:
                subprocess.run(step, env=env, capture_output=True, timeout=300, check=True)
        except (OSError, subprocess.SubprocessError):
            continue
        if shutil.which("ip"):
            return True
    return False


def _pids_in(ns: str) -> list[int]:
    out = _ip("netns", "pids", ns, check=False).stdout
    return [int(p) for p in out.split() if p.isdigit()]


def _kill_namespace(ns: str) -> None:
    """SIGKILL what still runs in ``ns`` (only processes a Lab started there), then delete it."""
    for pid in _pids_in(ns):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + 5
    while _pids_in(ns) and time.monotonic() < deadline:
        time.sleep(0.05)
    _ip("netns", "del", ns, check=False)


def clean_stale() -> list[str]:
    """Delete the namespaces of earlier runs whose creating process is gone."""
    out = _ip("netns", "list", check=False).stdout
    removed = []
    for line in out.splitlines():
        name = line.split()[0] if line.split() else ""
        m = re.fullmatch(rf"{PREFIX}(\d+)-\w+", name)
        if not m:
            continue
        pid = int(m.group(1))
        try:
            os.kill(pid, 0)
            continue  # its creator still runs (maybe another test run): leave it
        except ProcessLookupError:
            pass
        except PermissionError:
            continue
        _kill_namespace(name)
        removed.append(name)
    return removed


@dataclass
class Hosted:
    """A process started in a host."""

    name: str
    host: str
    cmd: list[str]
    popen: subprocess.Popen[bytes]
    log_path: Path
    log_file: IO[bytes] | None = None

    def alive(self) -> bool:
        return self.popen.poll() is None


@dataclass
class Lab:
    """Hosts on one bridge; see the module docstring."""

    hosts: tuple[str, ...] = ("h1", "h2", "h3")
    subnet: str = "10.203.0"  # /24; host i (1-based) gets subnet.i
    tag: str = field(default_factory=lambda: f"{PREFIX}{os.getpid()}")
    procs: dict[str, Hosted] = field(default_factory=dict)
    _made: list[str] = field(default_factory=list)

    # --- names ------------------------------------------------------------------
    def ns(self, host: str) -> str:
        return f"{self.tag}-{host}"

    @property
    def switch(self) -> str:
        return f"{self.tag}-sw"

    def port(self, host: str) -> str:
        return f"p{self.hosts.index(host) + 1}"

    def address(self, host: str) -> str:
        return f"{self.subnet}.{self.hosts.index(host) + 1}"

    # --- building -----------------------------------------------------------------
    def up(self) -> Lab:
        clean_stale()
        try:
            self._add_ns(self.switch)
            _ip("-n", self.switch, "link", "add", "br0", "type", "bridge")
            _ip("-n", self.switch, "link", "set", "br0", "up")
            for host in self.hosts:
                ns = self.ns(host)
                self._add_ns(ns)
                _ip("-n", ns, "link", "set", "lo", "up")
                # both ends are created where they live: nothing appears in the machine's namespace
                _ip("-n", self.switch, "link", "add", self.port(host), "type", "veth", "peer", "name", "eth0",
                    "netns", ns)
                _ip("-n", self.switch, "link", "set", self.port(host), "master", "br0")
                _ip("-n", self.switch, "link", "set", self.port(host), "up")
                _ip("-n", ns, "addr", "add", f"{self.address(host)}/24", "dev", "eth0")
                _ip("-n", ns, "link", "set", "eth0", "up")
        except Exception:
            self.teardown()
            raise
        return self

    def _add_ns(self, name: str) -> None:
        _ip("netns", "add", name)
        self._made.append(name)

    # --- running --------------------------------------------------------------------
    def command(self, host: str, argv: list[str]) -> list[str]:
        """``argv`` run in ``host`` (``ip netns exec`` execs it: the pid is the program's)."""
        return ["ip", "netns", "exec", self.ns(host), *argv]

    def popen(self, name: str, host: str, argv: list[str], log_path: Path, cwd: str | Path | None = None) -> Hosted:
        old = self.procs.get(name)
        if old is not None and old.alive():
            raise RuntimeError(f"{name} is already running in {host}")
        log_path.parent.mkdir(parents=True, exist_ok=True)
        log_file = open(log_path, "ab")  # noqa: SIM115 -- the process's output while it runs; closed in stop()
        cmd = self.command(host, argv)
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        popen = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log_file, stderr=subprocess.STDOUT,
                                 cwd=cwd, env=env)
        proc = Hosted(name, host, cmd, popen, log_path, log_file)
        self.procs[name] = proc
        return proc

    def run(self, host: str, argv: list[str], timeout: float = 30) -> subprocess.CompletedProcess[str]:
        return subprocess.run(self.command(host, argv), capture_output=True, text=True, timeout=timeout)

    def wait_port(self, host: str, address: str, port: int, timeout: float = 20.0) -> bool:
        """True once ``address:port`` accepts TCP connections, as seen from ``host``."""
        probe = ("import socket, sys, time\n"
                 f"end = time.monotonic() + {timeout}\n"
                 "while time.monotonic() < end:\n"
                 "    try:\n"
                 f"        socket.create_connection(({address!r}, {port}), 0.5).close(); sys.exit(0)\n"
                 "    except OSError:\n"
                 "        time.sleep(0.05)\n"
                 "sys.exit(1)\n")
        return self.run(host, [sys.executable, "-c", probe], timeout=timeout + 10).returncode == 0

    def stop(self, name: str, timeout: float = 5.0) -> None:
        """SIGTERM one process, SIGKILL it after ``timeout``."""
        proc = self.procs.get(name)
        if proc is None:
            return
        if proc.alive():
            proc.popen.terminate()
            try:
                proc.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.popen.kill()
                proc.popen.wait(5)
        if proc.log_file is not None:
            proc.log_file.close()
            proc.log_file = None

    # --- faults -----------------------------------------------------------------------
    def cut(self, host: str) -> None:
        """Pull ``host``'s cable: its switch port goes down, so its packets go nowhere."""
        _ip("-n", self.switch, "link", "set", self.port(host), "down")

    def restore(self, host: str) -> None:
        _ip("-n", self.switch, "link", "set", self.port(host), "up")

    # --- teardown -----------------------------------------------------------------------
    def teardown(self, grace: float = 3.0) -> None:
        """Stop every process (SIGTERM, then SIGKILL), then delete the namespaces and links."""
        for proc in self.procs.values():
            if proc.alive():
                proc.popen.terminate()
        deadline = time.monotonic() + grace
        for name in list(self.procs):
            proc = self.procs[name]
            try:
                proc.popen.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.popen.kill()
                proc.popen.wait(5)
            if proc.log_file is not None:
                proc.log_file.close()
                proc.log_file = None
        for ns in reversed(self._made):
            _kill_namespace(ns)
        self._made.clear()

    def __enter__(self) -> Lab:
        return self.up()

    def __exit__(self, *exc: object) -> None:
        self.teardown()
