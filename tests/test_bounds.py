"""Protocol bounds (docs/protocol.md): every number has a maximum, every string a length,
ids a restricted alphabet; each refusal is a sentence naming the field and the bound."""

from __future__ import annotations

import json

import pytest

from transport import protocol as p
from transport.protocol import ProtocolError, decode, encode

DATA = {"type": "charging_data", "cp_id": "MAD1", "session_id": "s1", "driver_id": "d1", "seq": 3,
        "energy_kwh": 1.5, "cost_eur": 0.5, "power_kw": 7.4, "message_id": "m1", "timestamp": 1_700_000_000.0}
COMPLETION = {"type": "charge_completion", "cp_id": "MAD1", "session_id": "s1", "driver_id": "d1",
              "energy_kwh": 1.5, "cost_eur": 0.5, "end_reason": "unplugged", "message_id": "m1",
              "timestamp": 1_700_000_000.0}


def refusal(base: dict[str, object], **changes: object) -> str:
    with pytest.raises(ProtocolError) as info:
        decode(json.dumps(dict(base, **changes)).encode())
    return str(info.value)


@pytest.mark.parametrize("base, field, value, words", [
    (DATA, "seq", 2**63, "field 'seq' of charging_data must be at most 9,007,199,254,740,991"),
    (DATA, "seq", 2**53, "must be at most 9,007,199,254,740,991"),
    (DATA, "seq", 0, "field 'seq' of charging_data must be at least 1"),
    (DATA, "energy_kwh", 10_000.5, "field 'energy_kwh' of charging_data must be at most 10,000"),
    (DATA, "power_kw", 1_000.1, "field 'power_kw' of charging_data must be at most 1,000"),
    (DATA, "cost_eur", 1e26, "field 'cost_eur' of charging_data must be at most 1,000,000"),
    (COMPLETION, "cost_eur", 1e26, "field 'cost_eur' of charge_completion must be at most 1,000,000"),
    (COMPLETION, "energy_kwh", -1, "field 'energy_kwh' of charge_completion must be at least 0"),
    (DATA, "timestamp", 5e9, "field 'timestamp' of charging_data must be at most 4,102,444,800"),
    (DATA, "timestamp", -1.0, "field 'timestamp' of charging_data must be at least 0"),
    (DATA, "message_id", "m" * 201, "field 'message_id' of charging_data must be at most 200 characters long"),
    (DATA, "cp_id", "C" * 65, "field 'cp_id' of charging_data must be at most 64 characters long"),
    (DATA, "cp_id", "MAD 1", "field 'cp_id' of charging_data may contain only letters, digits, '.', '_' and '-'"),
    (DATA, "driver_id", "dé", "may contain only letters, digits"),
    (DATA, "session_id", "", "field 'session_id' of charging_data must not be empty"),
])
def test_each_bound_refuses_with_a_readable_reason(base, field, value, words) -> None:
    assert words in refusal(base, **{field: value})


def test_nan_and_infinity_are_refused() -> None:
    for literal in ("NaN", "Infinity", "-Infinity"):
        text = json.dumps(DATA).replace('"cost_eur": 0.5', f'"cost_eur": {literal}')
        with pytest.raises(ProtocolError, match="not valid JSON"):
            decode(text.encode())
    with pytest.raises(ProtocolError, match="finite"):
        p.from_dict(dict(DATA, power_kw=float("inf")))


def test_strings_have_maximum_lengths() -> None:
    reg = {"type": "register_request", "cp_id": "MAD1", "correlation_id": "c1", "location": "x" * 201}
    assert "field 'location' of register_request must be at most 200 characters long (it has 201)" in refusal(reg)
    fault = {"type": "fault_notification", "cp_id": "MAD1", "reason": "r" * 501}
    assert "field 'reason' of fault_notification must be at most 500 characters long" in refusal(fault)
    # a CP's own out-of-service word (an OCPP charger's Unavailable) is bounded like any reason
    beat = {"type": "heartbeat", "cp_id": "MAD1", "engine_ok": True, "out_of_service": "u" * 501}
    assert "field 'out_of_service' of heartbeat must be at most 500 characters long" in refusal(beat)
    assert "out_of_service" in refusal(dict(beat, out_of_service=["not", "text"]))
    event = {"type": "supply_event", "driver_id": "d1", "session_id": "s1", "cp_id": "MAD1", "event": "fault",
             "detail": "d" * 501}
    assert "field 'detail' of supply_event must be at most 500" in refusal(event)
    # the limits themselves are accepted (also with characters of 4 UTF-8 bytes)
    ok = decode(json.dumps(dict(reg, location="\U0001d11e" * 200), ensure_ascii=False).encode())
    assert isinstance(ok, p.RegisterRequest) and len(ok.location or "") == 200


def test_oversized_sealed_and_signed_envelopes_are_refused_before_anything_opens_them() -> None:
    """A sealed frame's ciphertext and a signed request's body are bounded like any string: an
    attacker cannot make Central base64-decode, decrypt or hash megabytes per record."""
    sealed = {"type": "sealed", "cp_id": "MAD1", "key_id": "k1", "sender": "engine", "ctr": 1,
              "nonce": "AAAAAAAAAAAAAAAA", "data": "A" * (p.SEALED_MAX_LEN + 1)}
    assert (f"field 'data' of sealed must be at most {p.SEALED_MAX_LEN} characters long"
            in refusal(sealed))
    signed = {"type": "signed", "driver_id": "d1", "ts": 1_700_000_000.0, "sig": "AAAA",
              "body": "{" + " " * p.SIGNED_BODY_MAX_LEN + "}"}
    assert (f"field 'body' of signed must be at most {p.SIGNED_BODY_MAX_LEN} characters long"
            in refusal(signed))
    # at the bound both decode (the bound is not off by one)
    assert isinstance(decode(json.dumps(dict(sealed, data="A" * p.SEALED_MAX_LEN)).encode()), p.Sealed)
    assert isinstance(decode(json.dumps(dict(signed, body="x" * p.SIGNED_BODY_MAX_LEN)).encode()), p.Signed)


def test_price_and_list_lengths_are_bounded() -> None:
    cp = {"cp_id": "MAD1", "location": "Sol", "price_eur_kwh": 100.5, "state": "ACTIVE"}
    resp = {"type": "available_cps_response", "driver_id": "d1", "correlation_id": "c1", "charging_points": [cp]}
    assert "field 'charging_points[0].price_eur_kwh' of available_cps_response must be at most 100" in refusal(resp)
    many = [dict(cp, cp_id=f"CP{i}", price_eur_kwh=0.3) for i in range(p.LIST_MAX_ITEMS + 1)]
    assert "must be at most 500 items long (it has 501)" in refusal(resp, charging_points=many)


def test_paging_fields_are_optional_and_bounded() -> None:
    old = decode(b'{"type":"available_cps_request","driver_id":"d1","correlation_id":"c1"}')
    assert isinstance(old, p.AvailableCpsRequest) and (old.after, old.limit) == (None, None)
    req = {"type": "available_cps_request", "driver_id": "d1", "correlation_id": "c1", "after": "MAD1", "limit": 50}
    assert decode(json.dumps(req).encode()) == p.AvailableCpsRequest(driver_id="d1", correlation_id="c1",
                                                                     after="MAD1", limit=50)
    assert "field 'limit' of available_cps_request must be at most 500" in refusal(req, limit=501)
    assert "field 'limit' of available_cps_request must be at least 1" in refusal(req, limit=0)
    resp = p.AvailableCpsResponse(driver_id="d1", correlation_id="c1", charging_points=(), more=True,
                                  next_after="MAD1", total=7)
    assert decode(encode(resp)) == resp


def test_a_maximal_page_fits_comfortably_in_a_broker_record() -> None:
    """PAGE_SIZE CPs with maximal ids and locations (4-byte characters) stay far below 1 MB."""
    cps = tuple(p.CpInfo(cp_id=f"{i:064d}", location="\U0001d11e" * p.LOCATION_MAX_LEN,
                         price_eur_kwh=p.MAX_PRICE_EUR_KWH, state="DISCONNECTED") for i in range(p.PAGE_SIZE))
    size = len(encode(p.AvailableCpsResponse(driver_id="d" * 64, correlation_id="c" * 200, charging_points=cps,
                                             more=True, next_after=cps[-1].cp_id, total=10**6)))
    assert size < 300_000, size
    full = cps * (p.LIST_MAX_ITEMS // p.PAGE_SIZE) + cps[: p.LIST_MAX_ITEMS % p.PAGE_SIZE]
    assert len(encode(p.AvailableCpsResponse(driver_id="d1", correlation_id="c1", charging_points=full))) < 900_000


def test_encode_refuses_what_the_decoder_would() -> None:
    with pytest.raises(ProtocolError, match="cost_eur"):
        encode(p.ChargeCompletion(cp_id="MAD1", session_id="s1", driver_id="d1", energy_kwh=1.0, cost_eur=1e26,
                                  end_reason="unplugged"))


def test_clip_fits_a_bounded_field() -> None:
    assert p.clip("x" * 600) == "x" * 499 + "…" and len(p.clip("x" * 600)) == p.REASON_MAX_LEN
    assert p.clip("short") == "short"
