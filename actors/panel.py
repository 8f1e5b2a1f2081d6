"""Central's live panel: one tile per CP, the ongoing requests, the messages.

Central tells the :class:`PanelActor` an immutable :class:`PanelSnapshot`
whenever something changed (at most a few times a second); the actor only
renders. :func:`render` builds the rich renderable and :func:`render_text`
the same as plain text, which is what the tests (and ``--panel text``) use.
Colours follow the spec: ACTIVE green, STOPPED orange "Out of Order",
SUPPLYING green with live kW/kWh/€/driver, BROKEN red, DISCONNECTED grey.
"""

from __future__ import annotations

import io
import time
from dataclasses import dataclass
from typing import Any, TextIO

from rich.columns import Columns
from rich.console import Console, Group
from rich.live import Live
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from transport.runtime import SupervisedActor, Supervision

STYLE = {
    "ACTIVE": ("white on green4", "ACTIVE"),
    "SUPPLYING": ("white on green4", "SUPPLYING"),
    "STOPPED": ("black on dark_orange", "Out of Order"),
    "BROKEN": ("white on red3", "BROKEN"),
    "DISCONNECTED": ("white on grey42", "DISCONNECTED"),
}


@dataclass(frozen=True, slots=True)
class CpTile:
    cp_id: str
    location: str
    price_eur_kwh: float
    state: str
    driver_id: str | None = None
    power_kw: float = 0.0
    energy_kwh: float = 0.0
    cost_eur: float = 0.0
    fault: str | None = None


@dataclass(frozen=True, slots=True)
class RequestRow:
    started_at: float | None
    driver_id: str
    cp_id: str
    status: str


@dataclass(frozen=True, slots=True)
class PanelSnapshot:
    tiles: tuple[CpTile, ...]
    requests: tuple[RequestRow, ...]
    messages: tuple[str, ...]
    at: float


def _tile(t: CpTile) -> Panel:
    style, label = STYLE.get(t.state, ("white", t.state))
    lines = [Text(t.location, overflow="ellipsis"), Text(f"{t.price_eur_kwh:.2f} €/kWh"), Text(label, style="bold")]
    if t.state == "SUPPLYING":
        lines += [Text(f"{t.power_kw:.1f} kW"), Text(f"{t.energy_kwh:.3f} kWh"), Text(f"{t.cost_eur:.2f} €"),
                  Text(f"driver {t.driver_id}")]
    elif t.state == "BROKEN" and t.fault:
        lines.append(Text(t.fault, overflow="ellipsis"))
    return Panel(Group(*lines), title=Text(t.cp_id, style="bold"), style=style, width=27)


def render(s: PanelSnapshot) -> Group:
    """The whole panel as a rich renderable."""
    tiles = Columns([_tile(t) for t in s.tiles], equal=True) if s.tiles else Text("No charging points yet.")
    requests = Table(title="Ongoing driver requests", expand=True, title_justify="left")
    for col in ("Date", "Start", "Driver", "CP", "Status"):
        requests.add_column(col)
    for r in s.requests:
        at = time.localtime(r.started_at) if r.started_at else None
        requests.add_row(time.strftime("%d/%m/%y", at) if at else "", time.strftime("%H:%M:%S", at) if at else "",
                         r.driver_id, r.cp_id, r.status)
    messages = Panel(Text("\n".join(s.messages) or "—"), title="Application messages", title_align="left")
    header = Text(f"EV Charging — Central   {time.strftime('%H:%M:%S', time.localtime(s.at))}", style="bold")
    return Group(header, tiles, requests, messages)


def render_text(s: PanelSnapshot, width: int = 120) -> str:
    """The panel as plain text (what a screenshot would show, minus colours)."""
    console = Console(file=io.StringIO(), width=width, record=True, color_system=None)
    console.print(render(s))
    return console.export_text()


class PanelActor(SupervisedActor):
    """Renders snapshots: ``mode`` 'rich' (live terminal), 'text' (plain dumps) or 'off'."""

    def __init__(self, mode: str = "rich", *, stream: TextIO | None = None, text_interval: float = 5.0,
                 supervision: Supervision | None = None) -> None:
        super().__init__(supervision=supervision)
        self.mode = mode
        self.stream = stream
        self.text_interval = text_interval
        self.last: PanelSnapshot | None = None
        self._live: Live | None = None
        self._last_text = 0.0

    def setup(self) -> None:
        if self.mode == "rich":
            console = Console(file=self.stream) if self.stream else Console()
            self._live = Live(Text("Central is starting…"), console=console, refresh_per_second=4,
                              redirect_stdout=False, redirect_stderr=False)
            self._live.start()

    def teardown(self) -> None:
        if self._live is not None:
            self._live.stop()

    def on_receive(self, message: Any) -> Any:
        match message:
            case PanelSnapshot():
                self.last = message
                if self._live is not None:
                    self._live.update(render(message))
                elif self.mode == "text" and time.monotonic() - self._last_text >= self.text_interval:
                    self._last_text = time.monotonic()
                    print(render_text(message), file=self.stream, flush=True)
            case "text":
                return render_text(self.last) if self.last else ""
            case "snapshot":
                return self.last
        return None
