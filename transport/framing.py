"""Pure `<STX><DATA><ETX><LRC>` framing for the Monitor↔Central and
Monitor↔Engine sockets (PROTOCOL.md "Socket framing", SPEC.md §4).

No sockets and no project imports, so the same code serves the actor
transports and the tests (with their blocking ``tests.frame_client``).

Why DATA may not contain STX/ETX: the decoder finds frame boundaries by
looking for those bytes, and there is no escaping. This costs nothing for
our payloads: DATA is UTF-8 JSON produced by ``json.dumps``, which escapes
every control character (``\\u0002``, ``\\u0003``), so raw 0x02/0x03 bytes
never appear in it (UTF-8 multi-byte sequences only use bytes >= 0x80).
The LRC byte, on the other hand, can be any value: after ETX the next byte
is always taken as the LRC.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final, TypeAlias

__all__ = [
    "ENQ",
    "ACK",
    "NACK",
    "EOT",
    "STX",
    "ETX",
    "CONTROL_CODES",
    "MAX_DATA",
    "FrameTooLarge",
    "Control",
    "Frame",
    "BadFrame",
    "Garbage",
    "Event",
    "lrc",
    "encode_frame",
    "FrameDecoder",
]

ENQ: Final = 0x05
ACK: Final = 0x06
NACK: Final = 0x15
EOT: Final = 0x04
STX: Final = 0x02
ETX: Final = 0x03

#: Single-byte session/answer codes that are meaningful outside a frame.
CONTROL_CODES: Final = frozenset({ENQ, ACK, NACK, EOT})

#: Largest DATA the protocol accepts (PROTOCOL.md: "DATA over 65,536 bytes"
#: is oversized), so a frame on the wire is at most MAX_DATA + 3 bytes.
MAX_DATA: Final = 65536

_STX_B: Final = bytes([STX])
_ETX_B: Final = bytes([ETX])
_CONTROL_B: Final = bytes(sorted(CONTROL_CODES))

# States of the decoder.
_OUT: Final = 0  # between frames: control codes, garbage, or an STX
_DATA: Final = 1  # after STX, collecting DATA until ETX
_LRC: Final = 2  # after ETX, the next byte (any value) is the LRC


class FrameTooLarge(ValueError):
    """DATA is longer than the peer may accept; sending it would only earn a NACK."""


@dataclass(frozen=True, slots=True)
class Control:
    """A control byte (ENQ/ACK/NACK/EOT) seen between frames."""

    code: int


@dataclass(frozen=True, slots=True)
class Frame:
    """An intact frame (LRC verified): the owner ACKs it and parses ``data``."""

    data: bytes


@dataclass(frozen=True, slots=True)
class BadFrame:
    """A frame the owner must NACK: bad LRC, oversized, or cut by an STX."""

    reason: str


@dataclass(frozen=True, slots=True)
class Garbage:
    """``count`` stray bytes between frames (one event per feed at most), so
    the owner can log, and drop a peer that sends nothing else."""

    count: int


Event: TypeAlias = Control | Frame | BadFrame | Garbage

# Control events are immutable, so one shared instance per code saves allocations.
_CONTROL_EVENTS: Final = {code: Control(code) for code in CONTROL_CODES}


def lrc(data: bytes) -> int:
    """XOR of all bytes of ``data`` (0 for empty data).

    Large inputs are folded as one big integer (halving it each round) so a
    64 KiB frame costs a few C-level operations instead of 65,536 Python
    iterations.
    """
    n = len(data)
    if n < 64:
        x = 0
        for b in data:
            x ^= b
        return x
    x = int.from_bytes(data, "little")
    while n > 1:
        half = (n + 1) // 2
        bits = half * 8
        x = (x >> bits) ^ (x & ((1 << bits) - 1))
        n = half
    return x


def encode_frame(data: bytes, max_data: int = MAX_DATA) -> bytes:
    """Return ``STX DATA ETX LRC``.

    Raises :class:`FrameTooLarge` when ``len(data) > max_data`` and
    :class:`ValueError` when DATA contains a raw STX or ETX byte (the framing
    has no escaping; ``json.dumps`` output never contains them because it
    escapes control characters).
    """
    if len(data) > max_data:
        raise FrameTooLarge(
            f"frame DATA is {len(data)} bytes, over the {max_data}-byte limit"
        )
    if _STX_B in data or _ETX_B in data:
        raise ValueError(
            "frame DATA must not contain raw STX (0x02) or ETX (0x03) bytes; "
            "serialise with json.dumps, which escapes control characters"
        )
    return b"".join((_STX_B, data, _ETX_B, bytes((lrc(data),))))


class FrameDecoder:
    """Incremental, bounded decoder: feed it whatever ``recv`` returned.

    Any split of the stream across chunks gives the same events. Memory is
    bounded by ``max_data + 2`` bytes (STX + DATA + ETX of the unfinished
    frame) whatever the input: an oversized frame is dropped as soon as it
    crosses the limit and the rest of it is skipped without buffering.

    Rules: outside a frame, ENQ/ACK/NACK/EOT become :class:`Control` events
    and any other byte except STX counts as garbage. Inside a frame, an STX
    cuts the current frame (:class:`BadFrame`) and starts a new one, ETX ends
    DATA, and the byte after ETX is the LRC whatever its value.
    Garbage is reported as a single :class:`Garbage` event appended at the
    end of the events of the ``feed`` call that saw it.
    """

    __slots__ = ("_buf", "_max_data", "_oversized", "_state")

    def __init__(self, max_data: int = MAX_DATA) -> None:
        if max_data < 0:
            raise ValueError("max_data must be >= 0")
        self._max_data = max_data
        self._state = _OUT
        self._buf = bytearray()
        self._oversized = False

    @property
    def max_data(self) -> int:
        """Largest DATA accepted; longer frames become BadFrame."""
        return self._max_data

    @property
    def pending(self) -> int:
        """Bytes of the unfinished frame held in memory (STX, DATA, ETX), at most max_data + 2."""
        if self._state == _OUT:
            return 0
        return 1 + len(self._buf) + (1 if self._state == _LRC else 0)

    @property
    def in_frame(self) -> bool:
        """True between an STX and the LRC that ends its frame."""
        return self._state != _OUT

    def _start_frame(self) -> None:
        self._state = _DATA
        self._oversized = False
        if self._buf:
            # A fresh object releases a large buffer instead of keeping its capacity.
            self._buf = bytearray()

    def feed(self, chunk: bytes) -> list[Event]:
        """Consume ``chunk`` and return the events it completes, in stream order
        (except the one Garbage summary, which comes last)."""
        if not isinstance(chunk, bytes):
            chunk = bytes(chunk)
        events: list[Event] = []
        garbage = 0
        n = len(chunk)
        i = 0
        # Cached positions of the next STX/ETX at or after i (n = none left),
        # so many small frames in one big chunk stay linear, not quadratic.
        next_stx = -1
        next_etx = -1
        max_data = self._max_data
        while i < n:
            state = self._state
            if next_stx < i:
                next_stx = chunk.find(_STX_B, i)
                if next_stx < 0:
                    next_stx = n
            if state == _OUT:
                end = next_stx
                if end > i:
                    garbage += self._scan_outside(chunk, i, end, events)
                if end >= n:
                    break
                self._start_frame()
                i = end + 1
            elif state == _DATA:
                if next_etx < i:
                    next_etx = chunk.find(_ETX_B, i)
                    if next_etx < 0:
                        next_etx = n
                k = next_stx if next_stx < next_etx else next_etx
                if not self._oversized:
                    if len(self._buf) + (k - i) > max_data:
                        self._oversized = True
                        self._buf = bytearray()
                    elif k > i:
                        self._buf += chunk[i:k]
                if k >= n:
                    break
                if k == next_stx:
                    # STX inside a frame: report the cut frame, start anew.
                    if self._oversized:
                        events.append(BadFrame(f"oversized: DATA over {max_data} bytes (cut by STX)"))
                    else:
                        events.append(BadFrame(f"cut by STX after {len(self._buf)} DATA bytes"))
                    self._start_frame()
                else:
                    self._state = _LRC
                i = k + 1
            else:  # _LRC: this byte is the LRC, whatever its value
                received = chunk[i]
                i += 1
                if self._oversized:
                    events.append(BadFrame(f"oversized: DATA over {max_data} bytes"))
                else:
                    data = bytes(self._buf)
                    computed = lrc(data)
                    if computed == received:
                        events.append(Frame(data))
                    else:
                        events.append(
                            BadFrame(
                                f"bad LRC: computed 0x{computed:02x}, received 0x{received:02x} "
                                f"({len(data)} DATA bytes)"
                            )
                        )
                self._state = _OUT
                self._oversized = False
                self._buf = bytearray()
        if garbage:
            events.append(Garbage(garbage))
        return events

    @staticmethod
    def _scan_outside(chunk: bytes, start: int, end: int, events: list[Event]) -> int:
        """Emit Control events for chunk[start:end] (no STX in it); return the garbage count."""
        segment = chunk[start:end]
        rest = segment.translate(None, _CONTROL_B)
        if len(rest) != len(segment):
            for b in segment:
                ev = _CONTROL_EVENTS.get(b)
                if ev is not None:
                    events.append(ev)
        return len(rest)
