"""Logging set-up: sentences on the terminal, details (and tracebacks) in a file.

A person watching a terminal sees one line per event, prefixed with the
component and its CP or driver id, and never a traceback. The optional log
file keeps everything, tracebacks included, for whoever debugs later.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import TextIO


class SentenceFormatter(logging.Formatter):
    """``HH:MM:SS component[id] message`` and nothing else (no tracebacks)."""

    def __init__(self, tag: str) -> None:
        super().__init__("%(asctime)s " + tag.replace("%", "%%") + " %(message)s", "%H:%M:%S")

    def format(self, record: logging.LogRecord) -> str:
        saved = record.exc_info, record.exc_text, record.stack_info
        record.exc_info = record.exc_text = record.stack_info = None
        try:
            return super().format(record)
        finally:
            record.exc_info, record.exc_text, record.stack_info = saved


class _OnlyOurs(logging.Filter):
    """Terminal shows our own loggers; libraries (pykka, kafka) go to the file."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.name.startswith("evcharging")


def setup_logging(component: str, ident: str = "", *, log_file: str | Path | None = None,
                  level: str = "INFO", console: bool = True, stream: TextIO | None = None) -> None:
    """Configure the root logger for one program (call once, in main)."""
    tag = f"{component}[{ident}]" if ident else component
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    root.setLevel(logging.DEBUG)
    if console:
        term = logging.StreamHandler(stream or sys.stderr)
        term.setLevel(getattr(logging, level.upper(), logging.INFO))
        term.setFormatter(SentenceFormatter(tag))
        term.addFilter(_OnlyOurs())
        root.addHandler(term)
    if log_file:
        Path(log_file).parent.mkdir(parents=True, exist_ok=True)
        fh = logging.FileHandler(log_file)
        fh.setLevel(logging.DEBUG if level.upper() == "DEBUG" else logging.INFO)
        fh.setFormatter(logging.Formatter(f"%(asctime)s %(levelname)s {tag} %(name)s: %(message)s"))
        root.addHandler(fh)
    for noisy in ("kafka", "pykka"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    _route_stray_exceptions()


def _route_stray_exceptions() -> None:
    """Exceptions nobody catches outside the actors (a library's ``__del__``,
    a helper thread) would print a raw traceback on the terminal; send them
    through logging instead: a sentence on the terminal, details in the file."""
    import threading

    stray = logging.getLogger("evcharging.errors")

    def unraisable(u: sys.UnraisableHookArgs) -> None:
        if u.exc_value is not None:
            stray.warning("Ignored an error while cleaning up %s: %s", getattr(u.object, "__qualname__", u.object),
                          u.exc_value, exc_info=(u.exc_type, u.exc_value, u.exc_traceback))

    def thread_hook(a: threading.ExceptHookArgs) -> None:
        if a.exc_type is SystemExit:
            return
        name = a.thread.name if a.thread else "?"
        stray.error("A background thread (%s) failed: %s", name, a.exc_value,
                    exc_info=a.exc_value)  # the exception carries its traceback

    sys.unraisablehook = unraisable
    threading.excepthook = thread_hook
