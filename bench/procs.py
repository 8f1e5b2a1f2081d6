"""Child processes of the benchmarks: start, read their JSON/status lines with a deadline, stop.

Every wait is bounded; every child is stopped (quit on stdin, then SIGTERM,
then SIGKILL) by whoever started it, by its pid.
"""

from __future__ import annotations

import json
import queue
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.common import bench_env


class Child:
    """A Python child speaking line commands on stdin and printing lines on stdout."""

    def __init__(self, name: str, cmd: list[str], log: Path) -> None:
        self.name = name
        self.log_file = open(log, "ab")
        self.out_file = open(log.with_suffix(".stdout"), "a", encoding="utf-8")
        self.popen = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log_file,
                                      env=bench_env(), text=True, bufsize=1)
        self.lines: queue.SimpleQueue[str] = queue.SimpleQueue()
        self.last: dict[str, Any] = {}
        self._reader = threading.Thread(target=self._read, name=f"{name}-stdout", daemon=True)
        self._reader.start()

    @property
    def pid(self) -> int:
        return self.popen.pid

    def _read(self) -> None:
        assert self.popen.stdout is not None
        for line in self.popen.stdout:
            self.lines.put(line.rstrip("\n"))
            try:
                self.out_file.write(line)
                self.out_file.flush()
            except ValueError:  # closed by stop()
                pass
        self.lines.put("")  # EOF marker

    def send(self, command: str) -> None:
        assert self.popen.stdin is not None
        try:
            self.popen.stdin.write(command + "\n")
            self.popen.stdin.flush()
        except (BrokenPipeError, OSError):
            pass

    def expect(self, match: Callable[[str], bool], timeout: float) -> str | None:
        """The first line satisfying ``match`` within ``timeout`` s (JSON status lines are kept in .last)."""
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            try:
                line = self.lines.get(timeout=min(remaining, 0.5))
            except queue.Empty:
                if self.popen.poll() is not None and self.lines.empty():
                    return None
                continue
            if line.startswith("{"):
                try:
                    self.last = json.loads(line)
                except ValueError:
                    pass
            if match(line):
                return line

    def wait_status(self, cond: Callable[[dict[str, Any]], bool], timeout: float) -> dict[str, Any] | None:
        """Wait for a JSON status line satisfying ``cond``."""
        def ok(line: str) -> bool:
            return line.startswith("{") and cond(self.last)

        return self.last if self.expect(ok, timeout) else None

    def stop(self, timeout: float = 15.0) -> None:
        if self.popen.poll() is None:
            self.send("quit")
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.popen.terminate()
                try:
                    self.popen.wait(5)
                except subprocess.TimeoutExpired:
                    self.popen.kill()
                    self.popen.wait(5)
        try:
            if self.popen.stdin:
                self.popen.stdin.close()
        except OSError:
            pass
        self.log_file.close()
        self.out_file.close()
