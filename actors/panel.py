"""Central's live panel: one tile per CP, the ongoing requests, the messages, the weather.

Central tells the :class:`PanelActor` an immutable :class:`PanelSnapshot`
whenever something changed (at most a few times a second); the actor only
renders. :func:`render` builds the rich renderable and :func:`render_text`
the same as plain text, which is what the tests (and ``--panel text``) use.
Colours follow the spec: ACTIVE green, STOPPED orange "Out of Order",
SUPPLYING green with live kW/kWh/€/driver, BROKEN red, DISCONNECTED grey.

A terminal shows a few dozen tiles; a network may have a thousand CPs, and
rendering a tile costs about 1 ms. So the live panel draws the tiles that
fit the terminal (faults first; the header counts every CP by state and
says how many are not shown), redraws only when a snapshot arrives, and
never more often than its own drawing cost allows: it must not starve
Central of the CPU.
``--panel text`` and :func:`render_text` still show every tile.

The snapshot is also what API_Central serves (Central tells every snapshot to
"panel" and to "web"): :class:`MessageRow` carries a ``seq`` that grows by one
for every message Central notes, so a consumer can tell which rows are new;
:class:`WeatherRow` is one location EV_W reports on.
"""

from __future__ import annotations

import io
import shutil
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any, TextIO

from rich.columns import Columns
from rich.console import Console, Group
from rich.live import Live
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from actors.runtime import SupervisedActor, Supervision

#: Central notes a message containing this as a fault (MessageRow.fault: shown in red), e.g. "FAULT: ...".
FAULT_MARK = "FAULT:"

STYLE = {
    "ACTIVE": ("white on green4", "ACTIVE"),
    "SUPPLYING": ("white on green4", "SUPPLYING"),
    "STOPPED": ("black on dark_orange", "Out of Order"),
    "BROKEN": ("white on red3", "BROKEN"),
    "DISCONNECTED": ("white on grey42", "DISCONNECTED"),
}


#: Why a CP is out of service (CpTile.stop_reasons): the operator stopped it, a weather alert holds it,
#: or the CP took itself out of service (an OCPP charger that reports Unavailable).
OPERATOR, WEATHER, CHARGER = "operator", "weather", "charger"

#: Messages the panel draws (the newest); a snapshot carries more (see CentralActor).
PANEL_MESSAGES = 12


@dataclass(frozen=True, slots=True)
class CpTile:
    """One CP as people see it. ``stop_reasons``: why it is out of service (OPERATOR, WEATHER, CHARGER;
    empty when it is not), also while a supply it was told to stop still runs."""

    cp_id: str
    location: str
    price_eur_kwh: float
    state: str
    driver_id: str | None = None
    power_kw: float = 0.0
    energy_kwh: float = 0.0
    cost_eur: float = 0.0
    fault: str | None = None
    stop_reasons: tuple[str, ...] = ()
    session_id: str | None = None


@dataclass(frozen=True, slots=True)
class RequestRow:
    started_at: float | None
    driver_id: str
    cp_id: str
    status: str


@dataclass(frozen=True, slots=True)
class MessageRow:
    """An application message. ``seq`` grows by one for every message Central notes (a consumer
    keeps the highest it has seen: the rows above it are new); it starts from the clock in µs
    when Central's actor starts, so it keeps growing across restarts (below 2**53: exact in
    JSON). ``at`` is Unix time; ``text`` has no time stamp; ``fault``: something failed (a
    module, a CP, a record), shown in red."""

    seq: int
    at: float
    text: str
    fault: bool = False


@dataclass(frozen=True, slots=True)
class WeatherRow:
    """One location EV_W reports on. ``alert``: at or below 0 °C, its CPs are out of service.
    ``error``: the provider's last failure (the alert state stays as it was). ``updated_at``:
    Unix time of the last report (None: never). ``watched``: in EV_W's list of locations.
    ``cp_ids``: the CPs at that location (docs/api.md, "Weather")."""

    location: str
    temperature_c: float | None
    alert: bool
    error: str | None
    updated_at: float | None
    watched: bool
    cp_ids: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class PanelSnapshot:
    """Everything the panel shows, immutable. ``messages``: oldest first (newest last)."""

    tiles: tuple[CpTile, ...]
    requests: tuple[RequestRow, ...]
    messages: tuple[MessageRow, ...]
    at: float
    weather: tuple[WeatherRow, ...] = ()


@dataclass(frozen=True, slots=True)
class PanelText:
    """Ask: the last snapshot rendered as plain text ("" before the first one)."""


@dataclass(frozen=True, slots=True)
class LastSnapshot:
    """Ask: the last :class:`PanelSnapshot` received, or None."""


def _tile(t: CpTile) -> Panel:
    style, label = STYLE.get(t.state, ("white", t.state))
    if t.state == "STOPPED" and WEATHER in t.stop_reasons:
        label += " (weather)"
    elif t.state == "STOPPED" and t.stop_reasons == (CHARGER,):
        label += " (by the CP)"
    lines = [Text(t.location, overflow="ellipsis"), Text(f"{t.price_eur_kwh:.2f} €/kWh"), Text(label, style="bold")]
    if t.state == "SUPPLYING":
        lines += [Text(f"{t.power_kw:.1f} kW"), Text(f"{t.energy_kwh:.3f} kWh"), Text(f"{t.cost_eur:.2f} €"),
                  Text(f"driver {t.driver_id}")]
    elif t.state == "BROKEN" and t.fault:
        lines.append(Text(t.fault, overflow="ellipsis"))
    return Panel(Group(*lines), title=Text(t.cp_id, style="bold"), style=style, width=27)


# Tile order, most urgent first (the sort is stable: ids stay in order).
ATTENTION = {"BROKEN": 0, "DISCONNECTED": 1, "STOPPED": 2, "SUPPLYING": 3, "ACTIVE": 4}
TILE_WIDTH, TILE_HEIGHT = 27, 9  # a SUPPLYING tile: 7 lines of text and its border
LIVE_ROWS = 8  # request rows the live panel shows (the newest)
LIVE_WEATHER = 4  # weather lines the live panel shows (alerts first)


def tiles_that_fit(width: int, height: int, reserved: int = 27) -> int:
    """How many tiles a ``width`` × ``height`` terminal shows next to the tables (at least one row)."""
    per_row = max(1, width // TILE_WIDTH)
    return per_row * max(1, (height - reserved) // TILE_HEIGHT)


def render(s: PanelSnapshot, max_tiles: int | None = None) -> Group:
    """The whole panel as a rich renderable; with ``max_tiles`` (the live panel) at most that many
    tiles and the newest ``LIVE_ROWS`` requests; None: everything."""
    shown = s.tiles
    if max_tiles is not None and len(s.tiles) > max_tiles:  # the ones that need an operator first
        shown = tuple(sorted(s.tiles, key=lambda t: ATTENTION.get(t.state, 0))[:max_tiles])
    tiles = Columns([_tile(t) for t in shown], equal=True) if s.tiles else Text("No charging points yet.")
    requests = Table(title="Ongoing driver requests", expand=True, title_justify="left")
    for col in ("Date", "Start", "Driver", "CP", "Status"):
        requests.add_column(col)
    rows = s.requests
    if max_tiles is not None and len(s.requests) > LIVE_ROWS:
        rows = tuple(sorted(s.requests, key=lambda r: r.started_at or 0.0)[-LIVE_ROWS:])
    if len(rows) < len(s.requests):
        requests.caption = f"the newest {len(rows)} of {len(s.requests)}"
    for r in rows:
        at = time.localtime(r.started_at) if r.started_at else None
        requests.add_row(time.strftime("%d/%m/%y", at) if at else "", time.strftime("%H:%M:%S", at) if at else "",
                         r.driver_id, r.cp_id, r.status)
    shown_messages = s.messages[-PANEL_MESSAGES:]
    texts = [time.strftime("%H:%M:%S ", time.localtime(m.at)) + m.text for m in shown_messages]
    lines = Text("\n".join(texts) or "—")
    start = 0
    for m, line in zip(shown_messages, texts, strict=True):  # faults (a CP, a module, a record set aside) in red
        if m.fault:
            lines.stylize("bold red", start, start + len(line))
        start += len(line) + 1
    messages = Panel(lines, title="Application messages", title_align="left")
    header = Text(f"EV Charging — Central   {time.strftime('%H:%M:%S', time.localtime(s.at))}", style="bold")
    counts = Counter(t.state for t in s.tiles)
    summary = f"{len(s.tiles)} CPs: " + " · ".join(f"{n} {state}" for state, n in sorted(counts.items()))
    if len(shown) < len(s.tiles):
        summary += f"   (showing {len(shown)}; {len(s.tiles) - len(shown)} more do not fit — --panel text lists all)"
    return Group(header, Text(summary), tiles, requests,
                 _weather(s.weather, None if max_tiles is None else LIVE_WEATHER), messages)


def _weather(rows: tuple[WeatherRow, ...], limit: int | None) -> Text:
    """One line per location: its temperature, ALERT (in red) or error, and how many CPs it holds.
    With ``limit`` (the live panel) at most that many lines, alerts and errors first."""
    if not rows:
        return Text("Weather: no locations reported")
    shown = rows
    if limit is not None and len(rows) > limit:
        shown = tuple(sorted(rows, key=lambda w: (not w.alert, w.error is None))[:limit])
    out = Text("Weather:" + (f" (the first {len(shown)} of {len(rows)} locations)" if len(shown) < len(rows)
                             else ""), style="bold")
    for w in shown:
        temp = "?" if w.temperature_c is None else f"{w.temperature_c:.1f} °C"
        line = Text(f"\n  {w.location}: {temp}")
        if w.alert:
            line.append(f"  ALERT: {len(w.cp_ids)} CP(s) out of service", style="bold red")
        if w.error:
            line.append(f"  (provider error: {w.error})", style="dark_orange")
        if not w.watched:
            line.append("  (not watched)")
        out.append_text(line)
    return out


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
        self._console: Console | None = None
        self._last_text = 0.0
        self._next_draw = 0.0  # a draw that took t seconds is followed by at least 3t without one

    def setup(self) -> None:
        if self.mode == "rich":
            console = self._console = Console(file=self.stream) if self.stream else Console()
            self._live = Live(Text("Central is starting…"), console=console, auto_refresh=False,
                              vertical_overflow="crop", redirect_stdout=False, redirect_stderr=False)
            self._live.start()

    def teardown(self) -> None:
        if self._live is not None:
            self._live.stop()

    def on_receive(self, message: Any) -> Any:
        match message:
            case PanelSnapshot():
                self.last = message
                if self._live is not None:
                    self._draw(message)
                elif self.mode == "text" and time.monotonic() - self._last_text >= self.text_interval:
                    self._last_text = time.monotonic()
                    print(render_text(message), file=self.stream, flush=True)
            case PanelText():
                return render_text(self.last) if self.last else ""
            case LastSnapshot():
                return self.last
        return None

    def _draw(self, snap: PanelSnapshot) -> None:
        now = time.monotonic()
        if now < self._next_draw or self._live is None:
            return  # the next snapshot (Central sends one every 0.5 s while anything changes) is drawn
        width, height = self._console.size if self._console is not None else shutil.get_terminal_size()
        self._live.update(render(snap, tiles_that_fit(width, height)), refresh=True)
        self._next_draw = now + 3 * (time.monotonic() - now)
