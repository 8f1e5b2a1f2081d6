"""The one rule that turns what is known about a CP into its state (SPEC §2.3).

Central and the Monitor both show a CP's state; both call :func:`derive_state`,
so they cannot order the cases differently. The states themselves are
:class:`transport.protocol.CpState` (they travel on the wire).
"""

from __future__ import annotations

from transport.protocol import CpState

__all__ = ["CpState", "derive_state"]


def derive_state(*, connected: bool, engine_ok: bool | None, supplying: bool, stopped: bool) -> CpState:
    """SPEC §2.3, first matching row wins.

    * not connected (no Monitor, no life message in time) or health not known yet → DISCONNECTED;
    * Engine KO → BROKEN;
    * a supply running → SUPPLYING (a stop order ends it; until the Engine says so, it runs);
    * stopped by the operator → STOPPED ("Out of Order");
    * otherwise → ACTIVE.
    """
    if not connected or engine_ok is None:
        return CpState.DISCONNECTED
    if not engine_ok:
        return CpState.BROKEN
    if supplying:
        return CpState.SUPPLYING
    if stopped:
        return CpState.STOPPED
    return CpState.ACTIVE
