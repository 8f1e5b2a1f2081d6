"""ServerConnection: the actor for one accepted peer (a Monitor or an Engine's Monitor).

Started by the :class:`~transport.listener.Listener` as a *temporary* child
of a supervisor: when its peer goes, it tells its owner ``LinkDown`` and
stops; the peer reconnects and gets a fresh actor. Everything else (framing,
ACK/NACK, back-pressure) is in :class:`~transport.link.FramedLink`.
"""

from __future__ import annotations

import socket

from actors.runtime import Directory, Supervision
from transport.link import FramedLink, LinkOptions


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
        supervision: Supervision | None = None,
    ) -> None:
        super().__init__(owner, directory, options=options, component=component, supervision=supervision)
        self._initial = (sock, peer)

    def setup(self) -> None:
        sock, peer = self._initial
        self.attach(sock, peer)
