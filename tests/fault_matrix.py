"""The fault matrix: every failure scenario records one row; pytest prints the table.

A row says how many supplies a scenario started, how many tickets Central
issued, how many it should have issued, how many supplies were lost (no
ticket) or double-billed (two tickets), and how long service took to come
back. Lost and double-billed must be 0 everywhere.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

ROWS: list[Row] = []


@dataclass(frozen=True)
class Row:
    scenario: str
    supplies_started: int
    tickets_issued: int
    tickets_expected: int
    lost: int
    double_billed: int
    recover_s: float | None


def record(scenario: str, started: int, issued: int, expected: int, lost: int, double: int,
           recover_s: float | None) -> Row:
    row = Row(scenario, started, issued, expected, lost, double, recover_s)
    ROWS.append(row)
    return row


def billing_row(scenario: str, db_path: str, session_ids: list[str], recover_s: float | None) -> Row:
    """Build a row from Central's database for the supplies a scenario started."""
    from persistence import Repository

    with Repository(db_path) as repo:
        tickets = repo.tickets()
    per_session = {sid: sum(1 for t in tickets if t.session_id == sid) for sid in session_ids}
    lost = sum(1 for n in per_session.values() if n == 0)
    double = sum(1 for n in per_session.values() if n > 1)
    issued = sum(per_session.values())
    return record(scenario, len(session_ids), issued, len(session_ids), lost, double, recover_s)


@dataclass(frozen=True)
class AttackRow:
    """An attack scenario (issue #11): how many forged inputs were tried, and what got through."""

    scenario: str
    attempts: int  # forged frames/records/requests sent
    refused: int  # of those, refused (answered, dead-lettered or dropped) and audited
    forged_bills: int  # tickets or bill changes that came from forged input (must be 0)
    takeovers: int  # CPs or drivers an attacker acted as (must be 0)
    genuine_ok: bool  # the genuine traffic alongside still worked (bills, CP ACTIVE)


ATTACKS: list[AttackRow] = []


def attack_row(scenario: str, attempts: int, refused: int, forged_bills: int, takeovers: int,
               genuine_ok: bool = True) -> AttackRow:
    row = AttackRow(scenario, attempts, refused, forged_bills, takeovers, genuine_ok)
    ATTACKS.append(row)
    return row


#: The name of the report property that carries a row from the process that ran the test.
PROPERTY = "fault_matrix"
_PENDING_ROWS: list[Row] = []
_PENDING_ATTACKS: list[AttackRow] = []


def take() -> list[tuple[str, tuple[str, dict[str, object]]]]:
    """The rows recorded since the last call, as report properties (plain data, picklable)."""
    out: list[tuple[str, tuple[str, dict[str, object]]]] = []
    for kind, rows, pending in (("row", ROWS, _PENDING_ROWS), ("attack", ATTACKS, _PENDING_ATTACKS)):
        fresh = rows[len(pending):] if len(rows) > len(pending) else []
        pending.extend(fresh)
        out.extend((PROPERTY, (kind, dict(vars(r)))) for r in fresh)
    return out


def give(values: Iterable[tuple[str, dict[str, object]]]) -> None:
    """Rows reported by a test that ran in another process (an xdist worker), added here."""
    for kind, fields in values:
        if kind == "row":
            ROWS.append(Row(**fields))  # type: ignore[arg-type]
        else:
            ATTACKS.append(AttackRow(**fields))  # type: ignore[arg-type]


def render_attacks() -> str:
    head = ("attack", "attempts", "refused", "forged bills", "takeovers", "genuine ok")
    rows = [(r.scenario, str(r.attempts), str(r.refused), str(r.forged_bills), str(r.takeovers),
             "yes" if r.genuine_ok else "NO") for r in ATTACKS]
    widths = [max(len(x) for x in col) for col in zip(head, *rows, strict=True)]
    line = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True))  # noqa: E731
    return "\n".join([line(head), line(tuple("-" * w for w in widths))] + [line(r) for r in rows])


def render() -> str:
    head = ("scenario", "started", "tickets", "expected", "lost", "double-billed", "recover s")
    rows = [(r.scenario, str(r.supplies_started), str(r.tickets_issued), str(r.tickets_expected), str(r.lost),
             str(r.double_billed), "-" if r.recover_s is None else f"{r.recover_s:.2f}") for r in ROWS]
    widths = [max(len(x) for x in col) for col in zip(head, *rows, strict=True)]
    line = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True))  # noqa: E731
    return "\n".join([line(head), line(tuple("-" * w for w in widths))] + [line(r) for r in rows])
