"""ServerConnection: the actor for one accepted peer (a Monitor or an Engine's Monitor).

Started by the :class:`~transport.listener.Listener` as a *temporary* child
of a supervisor: when its peer goes, it tells its owner ``LinkDown`` and
stops; the peer reconnects and gets a fresh actor. Everything else (framing,
ACK/NACK, back-pressure) is in :class:`~transport.link.FramedLink`.

With a ``gate`` (an actor other than the owner that authenticates peers), the
gate is also told ``LinkUp`` (before any frame, so it knows the peer's
address) and, while the link is not admitted, ``LinkDown``.
"""

from __future__ import annotations

import logging
import socket
from dataclasses import dataclass
from typing import Any

from actors.pooled import Pooled
from actors.runtime import Directory, Supervision, schedule
from transport.link import FramedLink, LinkDown, LinkOptions, LinkUp

log = logging.getLogger("evcharging.link")


@dataclass(frozen=True, slots=True)
class _AuthDeadline:
    pass


class ServerConnection(Pooled, FramedLink):
    """One accepted, handshaken socket; stops when the peer is gone.

    Pooled (``actors/pooled.py``): a server holds one per peer, a thousand at 1,000 CPs, so they
    share a few threads instead of having one each; nothing in a link waits (writes that find the
    socket's buffer full are finished later, see ``FramedLink._write``).
    """

    pool = "links"

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
        if self.gate is not None and self.gate != self.owner:
            # The gate learns the peer (its address, for rate limits and the audit) before any
            # frame: both come from this actor, so LinkUp is first in the gate's mailbox.
            self.directory.tell(self.gate, LinkUp(self.actor_ref, peer, self.child_name))
        if self.auth_deadline is not None:
            self._deadline_timer = schedule(self.auth_deadline, self.actor_ref, _AuthDeadline())

    def teardown(self) -> None:
        if self._deadline_timer is not None:
            self._deadline_timer.cancel()
        was_connected = self.connected
        super().teardown()
        if was_connected:
            self._tell_gate_down("link stopped")

    def on_link_lost(self, reason: str) -> None:
        self._tell_gate_down(reason)
        super().on_link_lost(reason)

    def _tell_gate_down(self, reason: str) -> None:
        """A link the gate was still authenticating is gone: the gate forgets it."""
        if self.gate is not None and self.gate != self.owner and not self.admitted:
            self.directory.tell(self.gate, LinkDown(self.actor_ref, self.peer, reason))

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
