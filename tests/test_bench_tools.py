"""The benchmarks' own instruments: what they send must be what the real parts send."""

from __future__ import annotations

import json
import time

import pytest

from bench.simcp import POWER_KW, charging_data
from transport import protocol


@pytest.mark.parametrize("energy", [0.0, 1e-09, 0.0020555555555555557, 1.2345678901234567, 999.9999999999999])
def test_the_simulators_fast_charging_data_is_the_record_protocol_encode_writes(energy: float) -> None:
    stamp = time.time()
    fast = charging_data("CP0007", "S0123456789", "driver-7", 42, energy, energy * 0.31, stamp)
    message = protocol.decode(fast)  # valid, with Central's own decoder
    assert isinstance(message, protocol.ChargingData)
    real = protocol.ChargingData(cp_id="CP0007", session_id="S0123456789", driver_id="driver-7", seq=42,
                                 energy_kwh=energy, cost_eur=energy * 0.31, power_kw=POWER_KW,
                                 message_id=message.message_id, timestamp=stamp)
    assert message == real
    assert json.loads(fast) == json.loads(protocol.encode(real))  # field for field, the same JSON
    assert list(json.loads(fast)) == list(json.loads(protocol.encode(real)))  # in the same order
