"""ServerConnection: the actor for one accepted peer (a Monitor or an Engine's Monitor).

Started by the :class:`~transport.listener.Listener` as a *temporary* child
of a supervisor: when its peer goes, it tells its owner ``LinkDown`` and
stops; the peer reconnects and gets a fresh actor. Everything else (framing,
ACK/NACK, back-pressure) is in :class:`~transport.link.FramedLink`.
"""

from __future__ import annotations

import logging
import socket
from dataclasses import dataclass
from typing import Any

from actors.runtime import Directory, Supervision, schedule
from transport.link import FramedLink, LinkOptions

log = logging.getLogger("evcharging.link")


@dataclass(frozen=True, slots=True)
class _AuthDeadline:
    pass


class ServerConnection(FramedLink):
    """One accepted, handshaken socket; stops when the peer is gone."""

    def __init__(
        self,
        sock: socket.socket,
        peer: str,
        owner: str,
        directory: Directory,
        *,
        options: LinkOptions = LinkOptions(),
        component: str = "connection",
        gate: str | None = None,
        auth_deadline: float | None = None,
        supervision: Supervision | None = None,
    ) -> None:
        """``gate``: the actor that gets the frames until the link is admitted (it
        authenticates the peer, then tells the link :class:`~transport.link.Admit`);
        ``auth_deadline``: seconds the peer has to be admitted before it is dropped,
        so strangers cannot hold connection slots."""
        super().__init__(owner, directory, options=options, component=component, supervision=supervision)
        self._initial = (sock, peer)
        self.gate = gate
        self.auth_deadline = auth_deadline
        self._deadline_timer: Any = None

    def setup(self) -> None:
        sock, peer = self._initial
        self.attach(sock, peer)
        if self.auth_deadline is not None:
            self._deadline_timer = schedule(self.auth_deadline, self.actor_ref, _AuthDeadline())

    def teardown(self) -> None:
        if self._deadline_timer is not None:
            self._deadline_timer.cancel()
        super().teardown()

    def on_admitted(self) -> None:
        if self._deadline_timer is not None:
            self._deadline_timer.cancel()
            self._deadline_timer = None

    def on_other(self, message: Any) -> Any:
        if isinstance(message, _AuthDeadline):
            if not self.admitted and self.connected:
                log.warning("%s: %s did not authenticate within %g s — closing", self.component, self.peer,
                            self.auth_deadline)
                self.detach(f"{self.peer} did not authenticate within {self.auth_deadline:g} s", polite=True)
            return None
        return super().on_other(message)
