"""ConsoleReader: lines typed at a terminal, as messages to an actor.

Why: keyboard input blocks, and an actor must never block. The reader owns a
small thread that does the blocking ``readline`` and *tells* each line to a
target actor looked up by name in the :class:`~actors.runtime.Directory`
(so the target may be restarted under our feet). The thread only ever tells,
so it is a daemon: a ``readline`` that never returns cannot keep the process
alive, and being cut short at exit leaves nothing half-written. End of input
(stdin closed, or redirected from /dev/null under a launcher) just ends the
thread quietly; the actor itself stays up, so a supervisor never sees it
stop and never restarts it into the same end of input.

Shared by the Engine, the Driver and Central: keep the API stable.
"""

from __future__ import annotations

import logging
import sys
import threading
from dataclasses import dataclass
from typing import Any, TextIO

from actors.runtime import Directory, SupervisedActor, Supervision

log = logging.getLogger("evcharging.console")

__all__ = ["ConsoleLine", "ConsoleReader"]


@dataclass(frozen=True, slots=True)
class ConsoleLine:
    """One line typed at the console, stripped; never empty."""

    text: str


class ConsoleReader(SupervisedActor):
    """Reads ``stream`` (stdin by default) line by line and tells ``target``.

    Blank lines are skipped. After a stop, the thread may still be blocked in
    ``readline``; the line it eventually reads is still told to ``target`` by
    name (so a restarted reader loses nothing), then the thread ends.
    """

    def __init__(
        self,
        target: str,
        directory: Directory,
        *,
        stream: TextIO | None = None,
        supervision: Supervision | None = None,
    ) -> None:
        super().__init__(supervision=supervision)
        self.target = target
        self.directory = directory
        self._stream = stream
        self._halt = threading.Event()
        self._thread: threading.Thread | None = None

    def setup(self) -> None:
        stream = self._stream if self._stream is not None else sys.stdin
        if stream is None:  # e.g. pythonw, or stdin closed by the parent
            log.debug("console: no input stream; not reading")
            return
        self._thread = threading.Thread(
            target=self._read_loop, args=(stream,), name=f"console-{self.target}", daemon=True
        )
        self._thread.start()

    def teardown(self) -> None:
        self._halt.set()  # the thread exits at its next wake-up; see the class docstring

    def on_receive(self, message: Any) -> Any:
        log.debug("console: ignoring %s", type(message).__name__)  # it only ever reads
        return None

    # --- the reader thread ---------------------------------------------------
    def _read_loop(self, stream: TextIO) -> None:
        while True:
            try:
                raw = stream.readline()
            except (OSError, ValueError) as exc:  # closed, or not decodable
                log.debug("console: input ended (%s)", exc)
                return
            if not raw:  # EOF
                log.debug("console: end of input")
                return
            text = raw.strip()
            if text and not self.directory.tell(self.target, ConsoleLine(text)):
                log.debug("console: %r is not running; dropped a line", self.target)
            if self._halt.is_set():
                return
