"""Issue #10 through real processes (supervisors.launcher.Network) and a real broker:
a forged completion from a stock Kafka client mid-supply, Central SIGKILLed and
restarted, the same charge_request twice. Rows of the fault matrix: 0 lost, 0 double-billed."""

from __future__ import annotations

import time
import uuid

import pytest

from persistence import EngineJournal, Repository, bill_cents
from supervisors.launcher import Network
from tests import fault_matrix
from tests.fakes import KafkaPeer
from tests.test_faults_crashes import assert_no_tracebacks, spec, supplied_sessions, supplying, tickets_of
from tests.waiting import wait_until
from transport import protocol

pytestmark = pytest.mark.slow


def rejected(net: Network, message_id: str) -> bool:
    """Refused: at the trust boundary (security on: a stock client cannot seal it) or, without it,
    by the ledger's own checks (tests/test_central_billing.py covers those in-process)."""
    with Repository(net.db_path) as repo:
        audit = repo.recent_audit(500)
    if net.secure:
        return any(a.event == "record_rejected" and a.subject == "MAD1" and "not sealed" in a.detail for a in audit)
    return any(a.event == "completion_rejected" and message_id in a.detail for a in audit)


def test_forged_completion_then_central_killed_bills_the_genuine_energy(tmp_path, broker) -> None:
    """(a) at process level: the forgery (right session, CP and driver; 0.0001 kWh for 9,999 €)
    is rejected and audited (refused unsealed at the trust boundary); Central is SIGKILLed and
    restarted mid-supply; the one ticket is Central's figure for the energy the Engine journaled.
    (c): a probe's charge_request, denied "CP MAD1 is SUPPLYING", sent again once the CP is free,
    gets that answer again, not "authorized"."""
    with Network(spec(tmp_path, broker, supply_seconds=10)) as net:
        s = wait_until(lambda: supplying(net, "MAD1", 0.01), timeout=40, what="MAD1 supplying")
        peer = KafkaPeer.of(net)
        try:
            forged = protocol.ChargeCompletion(cp_id="MAD1", session_id=s.session_id, driver_id=s.driver_id,
                                               energy_kwh=0.0001, cost_eur=9999.0, end_reason="unplugged")
            peer.send("charging_session_complete", "MAD1", forged)
            wait_until(lambda: rejected(net, forged.message_id), timeout=15, what="the forgery rejected")
            probe = protocol.ChargeRequest(driver_id="probe", cp_id="MAD1", correlation_id=uuid.uuid4().hex)
            peer.send("driver_requests", "probe", probe)
            first = peer.wait_for(protocol.ChargeResponse, lambda m: m.correlation_id == probe.correlation_id)[0]
            assert (first.status, first.reason) == ("denied", "CP MAD1 is SUPPLYING")

            net.kill("central")
            restarted = time.monotonic()
            net.restart("central")
            tickets = wait_until(lambda: tickets_of(net, s.session_id), timeout=60, what="the genuine ticket")
            recover = time.monotonic() - restarted
            with EngineJournal(net.run_dir / "engine-MAD1.journal.db") as journal:
                supplied = journal.get(s.session_id)
            assert supplied is not None and supplied.status in ("ended", "published")
            (t,) = tickets
            assert t.energy_kwh == pytest.approx(supplied.energy_kwh) and t.energy_kwh > 0.01
            assert t.cost_cents == bill_cents(t.energy_kwh, t.price_eur_kwh) and t.review is None

            wait_until(lambda: net.alive("central") and tickets_of(net, s.session_id), timeout=5)
            peer.send("driver_requests", "probe", probe)  # the same request again, the CP is free by now
            again = peer.wait_for(protocol.ChargeResponse, lambda m: m.correlation_id == probe.correlation_id,
                                  count=2, timeout=30)
            assert {(r.status, r.session_id, r.reason) for r in again} == {("denied", None, "CP MAD1 is SUPPLYING")}
        finally:
            peer.close()
        assert rejected(net, forged.message_id)
        fault_matrix.billing_row("forged completion, Central killed", str(net.db_path), supplied_sessions(net),
                                 recover)
        assert_no_tracebacks(net)
