"""Tests of the wire contract codec (transport/protocol.py)."""

import dataclasses
import json
import math
import string
from typing import Annotated, Union, get_args, get_origin, get_type_hints

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from transport import protocol as p
from transport.protocol import (
    ActiveSessionInfo,
    AuthorizeSupply,
    AvailableCpsRequest,
    AvailableCpsResponse,
    ChargeCompletion,
    ChargeRequest,
    ChargeResponse,
    ChargingData,
    ChargingStatusUpdate,
    CpInfo,
    CpSupplyRequest,
    CpSupplyResponse,
    DriverHello,
    DriverHelloResponse,
    ErrorMessage,
    FaultCleared,
    FaultNotification,
    HealthCheck,
    HealthStatus,
    Heartbeat,
    Hello,
    ProtocolError,
    RegisterRequest,
    RegisterResponse,
    ResumeCp,
    StopChargingRequest,
    StopChargingResponse,
    StopCp,
    StopSupply,
    SupplyAuthorizationResponse,
    SupplyEnded,
    SupplyEvent,
    SupplyStarted,
    Ticket,
    TicketAck,
    TicketInfo,
    decode,
    encode,
    from_dict,
    message_types,
    to_dict,
)

TICKET_INFO = TicketInfo(
    session_id="s1", cp_id="MAD1", price_eur_kwh=0.35, energy_kwh=12.5, cost_eur=4.375,
    started_at=1_700_000_000.0, ended_at=1_700_003_600.5, end_reason="unplugged",
)

SAMPLES = [
    AvailableCpsRequest(driver_id="d1", correlation_id="c1"),
    ChargeRequest(driver_id="d1", cp_id="MAD1", correlation_id="c2"),
    StopChargingRequest(driver_id="d1", session_id="s1", correlation_id="c3"),
    DriverHello(driver_id="d1", correlation_id="c4"),
    TicketAck(driver_id="d1", session_id="s1"),
    AvailableCpsResponse(
        driver_id="d1", correlation_id="c1",
        charging_points=(
            CpInfo(cp_id="MAD1", location="Calle Mayor 1, Madrid", price_eur_kwh=0.35, state="ACTIVE"),
            CpInfo(cp_id="ALC1", location="Alicante — puerto", price_eur_kwh=0.4, state="BROKEN"),
        ),
    ),
    ChargeResponse(driver_id="d1", correlation_id="c2", status="authorized", cp_id="MAD1", session_id="s1"),
    ChargeResponse(driver_id="d1", correlation_id="c2", status="denied", cp_id="MAD2",
                   reason="CP MAD2 is BROKEN"),
    SupplyEvent(driver_id="d1", session_id="s1", cp_id="MAD1", event="plugged_in", detail="7.4 kW"),
    ChargingStatusUpdate(driver_id="d1", session_id="s1", cp_id="MAD1", seq=3, energy_kwh=0.006,
                         cost_eur=0.0021, power_kw=7.4),
    Ticket(driver_id="d1", session_id="s1", cp_id="MAD1", price_eur_kwh=0.35, energy_kwh=12.5,
           cost_eur=4.375, started_at=1_700_000_000.0, ended_at=1_700_003_600.5, end_reason="driver_stop"),
    StopChargingResponse(driver_id="d1", correlation_id="c3", status="ok", session_id="s1"),
    DriverHelloResponse(
        driver_id="d1", correlation_id="c4", tickets=(TICKET_INFO, TICKET_INFO),
        active_session=ActiveSessionInfo(session_id="s2", cp_id="ALC1", energy_kwh=1.0, cost_eur=0.4,
                                         state="supplying", started_at=1_700_000_100.0),
    ),
    DriverHelloResponse(driver_id="d1", correlation_id="c5", tickets=()),
    ChargingData(cp_id="MAD1", session_id="s1", driver_id="d1", seq=1, energy_kwh=0.002,
                 cost_eur=0.0007, power_kw=7.4),
    ChargeCompletion(cp_id="MAD1", session_id="s1", driver_id="d1", energy_kwh=12.5, cost_eur=4.375,
                     end_reason="engine_recovered", message_id="m1", timestamp=1_700_003_600.5),
    RegisterRequest(cp_id="MAD1", correlation_id="c6", location="Calle Mayor 1"),
    RegisterRequest(cp_id="MAD1", correlation_id="c6"),
    RegisterResponse(correlation_id="c6", status="accepted", price_eur_kwh=0.35, location="Calle Mayor 1"),
    RegisterResponse(correlation_id="c6", status="denied", reason="unknown CP"),
    Heartbeat(cp_id="MAD1", engine_ok=True),
    Heartbeat(cp_id="MAD1", engine_ok=False, state="SUPPLYING", supplying_session_id="s1"),
    FaultNotification(cp_id="MAD1", reason="engine not answering"),
    FaultCleared(cp_id="MAD1"),
    SupplyAuthorizationResponse(correlation_id="c7", session_id="s1", accepted=False, reason="busy"),
    SupplyStarted(cp_id="MAD1", session_id="s1", driver_id="d1"),
    SupplyEnded(cp_id="MAD1", session_id="s1", end_reason="fault"),
    SupplyEnded(cp_id="MAD1", session_id="s1", end_reason="unplugged", driver_id="d1", energy_kwh=3.0,
                cost_eur=1.05),
    CpSupplyRequest(cp_id="MAD1", driver_id="d9", correlation_id="c8"),
    AuthorizeSupply(correlation_id="c7", session_id="s1", driver_id="d1", price_eur_kwh=0.35, cp_id="MAD1"),
    StopSupply(session_id="s1", reason="driver_stop"),
    StopCp(reason="maintenance"),
    ResumeCp(),
    CpSupplyResponse(correlation_id="c8", cp_id="MAD1", status="authorized", session_id="s3"),
    Hello(cp_id="MAD1", price_eur_kwh=0.35),
    HealthCheck(seq=0),
    HealthStatus(seq=0, ok=True),
    ErrorMessage(reason="message has no 'type' field"),
    ErrorMessage(reason="unknown CP", correlation_id="c9"),
    # issue #10: the session lifecycle
    p.CancelSupply(session_id="s1", reason="authorisation timed out"),
    p.SessionBilled(session_id="s1", cp_id="MAD1"),
    p.BillingQuery(cp_id="MAD1", session_id="s1"),
    p.SupplyState(cp_id="MAD1", session_id="s1", plugged=True),
    p.AuthRequest(cp_id="MAD1", correlation_id="a1"),
    p.AuthChallenge(correlation_id="a1", nonce="bm9uY2U"),
    p.AuthProof(correlation_id="a1", cp_id="MAD1", proof="cHJvb2Y"),
    p.AuthResult(correlation_id="a1", status="accepted", key_id="k1", wrapped_key="d3JhcHBlZA"),
    p.Sealed(cp_id="MAD1", key_id="k1", sender="engine", ctr=7, nonce="bm9uY2U", data="ZGF0YQ"),
    p.Signed(driver_id="D1", ts=1700000000.5, body='{"type": "ticket_ack"}', sig="c2ln"),
]

# The wire field names of the contract (plus the project's additions): renaming one breaks this.
WIRE_KEYS = {
    "available_cps_request": "driver_id correlation_id after limit",
    "charge_request": "driver_id cp_id correlation_id",
    "stop_charging_request": "driver_id session_id correlation_id",
    "driver_hello": "driver_id correlation_id",
    "ticket_ack": "driver_id session_id",
    "available_cps_response": "driver_id correlation_id status charging_points more next_after total",
    "charge_response": "driver_id correlation_id status session_id cp_id reason",
    "supply_event": "driver_id session_id cp_id event detail",
    "charging_status_update": "driver_id session_id cp_id seq energy_kwh cost_eur power_kw",
    "ticket": "driver_id session_id cp_id price_eur_kwh energy_kwh cost_eur started_at ended_at end_reason",
    "stop_charging_response": "driver_id correlation_id status session_id reason",
    "driver_hello_response": "driver_id correlation_id status active_session tickets",
    "charging_data": "message_id cp_id session_id driver_id seq energy_kwh cost_eur power_kw timestamp",
    "charge_completion": "message_id cp_id session_id driver_id energy_kwh cost_eur end_reason timestamp",
    "register_request": "cp_id location correlation_id",
    "register_response": "correlation_id status reason price_eur_kwh location",
    "heartbeat": "cp_id engine_ok state supplying_session_id out_of_service",
    "fault_notification": "cp_id reason",
    "fault_cleared": "cp_id",
    "supply_authorization_response": "correlation_id session_id accepted reason",
    "supply_started": "cp_id session_id driver_id",
    "supply_ended": "cp_id session_id end_reason driver_id energy_kwh cost_eur",
    "cp_supply_request": "cp_id driver_id correlation_id",
    "authorize_supply": "correlation_id session_id driver_id price_eur_kwh cp_id",
    "stop_supply": "session_id reason",
    "stop_cp": "reason",
    "resume_cp": "",
    "cp_supply_response": "correlation_id cp_id status session_id reason",
    "hello": "cp_id price_eur_kwh key_id key",
    "cancel_supply": "session_id reason",
    "session_billed": "session_id cp_id",
    "billing_query": "cp_id session_id",
    "supply_state": "cp_id session_id plugged",
    "auth_request": "cp_id correlation_id",
    "auth_challenge": "correlation_id nonce",
    "auth_proof": "correlation_id cp_id proof",
    "auth_result": "correlation_id status reason key_id wrapped_key",
    "sealed": "cp_id key_id sender ctr nonce data",
    "signed": "driver_id ts body sig",
    "health_check": "seq",
    "health_status": "seq ok",
    "error": "reason correlation_id",
}


def err(data) -> str:
    """Decode data that must be refused; return the error text."""
    with pytest.raises(ProtocolError) as info:
        decode(data) if isinstance(data, (bytes, str)) else from_dict(data)
    return str(info.value)


def charging_data(**changes) -> dict:
    d = to_dict(SAMPLES[14])
    assert d["type"] == "charging_data"
    d.update(changes)
    return d


# --------------------------------------------------------------------------- registry and shapes


def test_samples_cover_every_registered_type():
    assert {type(m) for m in SAMPLES} == set(message_types().values())
    assert set(WIRE_KEYS) == set(message_types())


def test_registry_maps_type_strings_to_classes():
    types = message_types()
    assert types["charge_request"] is ChargeRequest and ChargeRequest.TYPE == "charge_request"
    assert types["error"] is ErrorMessage
    for name, cls in types.items():
        assert cls.TYPE == name
        assert cls.__doc__ and "\n" not in cls.__doc__.strip()
        params = cls.__dataclass_params__
        assert params.frozen and hasattr(cls, "__slots__")
    with pytest.raises(TypeError):
        types["x"] = ChargeRequest  # read-only


@pytest.mark.parametrize("name", sorted(WIRE_KEYS))
def test_wire_field_names(name):
    sample = next(m for m in SAMPLES if m.TYPE == name)
    assert set(to_dict(sample)) == {"type", *WIRE_KEYS[name].split()}


def test_enumerations():
    assert p.CP_STATES == {"ACTIVE", "STOPPED", "SUPPLYING", "BROKEN", "DISCONNECTED"}
    assert p.END_REASONS == {"unplugged", "driver_stop", "central_stop", "fault", "monitor_lost",
                             "engine_recovered"}
    assert "central_unavailable" in p.SUPPLY_EVENTS and len(p.SUPPLY_EVENTS) == 8


# --------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("msg", SAMPLES, ids=lambda m: m.TYPE)
def test_round_trip(msg):
    data = encode(msg)
    assert isinstance(data, bytes)
    back = decode(data)
    assert back == msg and type(back) is type(msg)
    assert decode(data.decode("utf-8")) == msg
    assert from_dict(to_dict(msg)) == msg
    assert hash(back) == hash(msg)


def test_encoding_is_compact_utf8_with_type_first():
    data = encode(SAMPLES[5])
    assert data.startswith(b'{"type":"available_cps_response",')
    assert data == json.dumps(json.loads(data), separators=(",", ":"), ensure_ascii=False).encode()
    assert "Alicante — puerto".encode() in data  # not \u-escaped
    assert json.loads(data)["charging_points"][1]["state"] == "BROKEN"


def test_nested_values_decode_as_tuples_of_dataclasses():
    msg = decode(encode(SAMPLES[12]))
    assert isinstance(msg.tickets, tuple) and msg.tickets[0] == TICKET_INFO
    assert isinstance(msg.active_session, ActiveSessionInfo)


def test_defaults():
    a = ChargingData(cp_id="A", session_id="s", driver_id="d", seq=1, energy_kwh=0, cost_eur=0, power_kw=0)
    b = ChargingData(cp_id="A", session_id="s", driver_id="d", seq=1, energy_kwh=0, cost_eur=0, power_kw=0)
    assert a.message_id != b.message_id and len(a.message_id) == 32
    assert abs(a.timestamp - __import__("time").time()) < 5
    assert AvailableCpsResponse(driver_id="d", correlation_id="c", charging_points=()).status == "ok"
    assert p.correlation_of(SAMPLES[1]) == "c2" and p.correlation_of(ResumeCp()) is None
    assert p.new_id() != p.new_id()


def test_messages_are_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        SAMPLES[0].driver_id = "other"


def test_unknown_fields_are_ignored():
    msg = decode(b'{"type":"fault_cleared","cp_id":"MAD1","extra":{"deep":[1,2]},"v":2}')
    assert msg == FaultCleared(cp_id="MAD1")


def test_optional_fields_accept_null_or_missing():
    assert decode(b'{"type":"charge_response","driver_id":"d","correlation_id":"c","status":"denied",'
                  b'"cp_id":"X","session_id":null}') == ChargeResponse("d", "c", "denied", "X")
    assert decode(b'{"type":"error","reason":"r"}') == ErrorMessage("r")
    # a null for a defaulted field means "use the default"
    msg = from_dict(charging_data(message_id=None, timestamp=None))
    assert len(msg.message_id) == 32 and msg.timestamp > 0


def test_ints_are_accepted_and_stored_as_floats():
    msg = from_dict(charging_data(energy_kwh=2, cost_eur=0))
    assert type(msg.energy_kwh) is float and msg.energy_kwh == 2.0


def test_id_length_limits():
    assert from_dict(charging_data(cp_id="x" * 64)).cp_id == "x" * 64
    assert "64" in err(charging_data(cp_id="x" * 65))
    assert "empty" in err(charging_data(session_id=""))
    assert "empty" in err({"type": "heartbeat", "cp_id": "M", "engine_ok": True, "supplying_session_id": ""})


# --------------------------------------------------------------------------- refusals


def test_not_utf8():
    assert "UTF-8" in err(b'{"type":"fault_cleared","cp_id":"\xff"}')


@pytest.mark.parametrize("text", ["", "{", "{'type': 'x'}", "hello", '{"type":"hello"} trailing'])
def test_not_json(text):
    assert "not valid JSON" in err(text.encode())


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity"])
def test_json_nan_and_infinity_literals(literal):
    message = err(f'{{"type":"hello","cp_id":"M","price_eur_kwh":{literal}}}'.encode())
    assert "not allowed" in message


def test_overflowing_number():
    assert "finite" in err(b'{"type":"hello","cp_id":"M","price_eur_kwh":1e999}')
    assert "finite" in err({"type": "hello", "cp_id": "M", "price_eur_kwh": 10**400})


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_non_finite_float_from_python(value):
    assert "finite" in err(charging_data(energy_kwh=value))


def test_deep_nesting_and_huge_integers():
    assert "not valid JSON" in err(b"[" * 200_000)
    assert "not valid JSON" in err(b'{"type":"health_check","seq":' + b"9" * 5000 + b"}")


@pytest.mark.parametrize("data, word", [(b"[1, 2]", "array"), (b"42", "42"), (b'"text"', "text"),
                                        (b"null", "null"), (b"true", "True")])
def test_not_an_object(data, word):
    message = err(data)
    assert "JSON object" in message and word in message


def test_missing_type():
    assert err(b'{"cp_id":"MAD1"}') == "message has no 'type' field"


def test_type_not_a_string():
    assert "must be a string" in err(b'{"type":7}')


def test_unknown_type():
    assert err(b'{"type":"foo"}') == "unknown message type 'foo'"


def test_missing_required_field():
    data = charging_data()
    del data["seq"]
    assert err(data) == "charging_data is missing required field 'seq'"
    assert "must be an integer" in err(charging_data(seq=None))


@pytest.mark.parametrize("changes, expected", [
    ({"seq": "abc"}, "field 'seq' of charging_data must be an integer, got 'abc'"),
    ({"seq": True}, "field 'seq' of charging_data must be an integer, got True"),
    ({"seq": 1.0}, "field 'seq' of charging_data must be an integer, got 1.0"),
    ({"seq": 0}, "field 'seq' of charging_data must be at least 1, got 0"),
    ({"energy_kwh": "1.5"}, "field 'energy_kwh' of charging_data must be a number, got '1.5'"),
    ({"energy_kwh": False}, "field 'energy_kwh' of charging_data must be a number, got False"),
    ({"energy_kwh": -0.5}, "field 'energy_kwh' of charging_data must be at least 0, got -0.5"),
    ({"cp_id": 12}, "field 'cp_id' of charging_data must be a string, got 12"),
    ({"driver_id": ["d"]}, "field 'driver_id' of charging_data must be a string, got an array"),
    ({"timestamp": "now"}, "field 'timestamp' of charging_data must be a number, got 'now'"),
])
def test_wrong_field_types(changes, expected):
    assert err(charging_data(**changes)) == expected


def test_bool_fields_must_be_bool():
    assert "true or false" in err(b'{"type":"heartbeat","cp_id":"M","engine_ok":1}')
    assert "true or false" in err(b'{"type":"health_status","seq":1,"ok":"yes"}')


def test_lone_surrogate_is_refused():
    assert "Unicode" in err(b'{"type":"stop_cp","reason":"\\ud800"}')


@pytest.mark.parametrize("data, word", [
    ({"type": "charge_response", "driver_id": "d", "correlation_id": "c", "status": "maybe",
      "cp_id": "X"}, "authorized"),
    ({"type": "supply_event", "driver_id": "d", "session_id": "s", "cp_id": "X", "event": "exploded"},
     "plugged_in"),
    ({"type": "charge_completion", "cp_id": "X", "session_id": "s", "driver_id": "d", "energy_kwh": 1,
      "cost_eur": 1, "end_reason": "bored"}, "unplugged"),
    ({"type": "register_response", "correlation_id": "c", "status": "ok"}, "accepted"),
    ({"type": "heartbeat", "cp_id": "M", "engine_ok": True, "state": "active"}, "ACTIVE"),
    ({"type": "cp_supply_response", "correlation_id": "c", "cp_id": "M", "status": "yes"}, "denied"),
])
def test_bad_enum_values(data, word):
    message = err(data)
    assert "must be one of" in message and word in message


def test_nested_errors_name_the_path():
    base = to_dict(SAMPLES[5])
    base["charging_points"][1]["state"] = "PURPLE"
    assert err(base).startswith("field 'charging_points[1].state' of available_cps_response must be one of")
    del base["charging_points"][1]["state"]
    assert err(base) == "available_cps_response is missing required field 'charging_points[1].state'"
    assert "must be an array" in err({**base, "charging_points": {"cp_id": "x"}})
    assert "must be an object" in err({**base, "charging_points": ["MAD1"]})
    hello = to_dict(SAMPLES[12])
    hello["active_session"]["cost_eur"] = "free"
    assert "field 'active_session.cost_eur' of driver_hello_response must be a number" in err(hello)


def test_error_carries_the_correlation_id():
    with pytest.raises(ProtocolError) as info:
        decode(b'{"type":"charge_request","driver_id":"d","correlation_id":"c42"}')
    assert info.value.correlation_id == "c42" and "cp_id" in str(info.value)
    with pytest.raises(ProtocolError) as info:
        decode(b'{"type":"nope","correlation_id":"c43"}')
    assert info.value.correlation_id == "c43"
    assert isinstance(info.value, ValueError)


def test_encode_refuses_what_decode_would_refuse():
    with pytest.raises(ProtocolError, match="finite"):
        encode(ChargingData(cp_id="A", session_id="s", driver_id="d", seq=1, energy_kwh=math.nan,
                            cost_eur=0, power_kw=0))
    with pytest.raises(ProtocolError, match="must be one of"):
        encode(SupplyEnded(cp_id="A", session_id="s", end_reason="whatever"))
    with pytest.raises(TypeError):
        to_dict(TICKET_INFO)  # a nested value is not a message


# --------------------------------------------------------------------------- properties


def strategy_for(hint):
    """Valid values for a field type hint, following the rules in its Annotated metadata."""
    origin = get_origin(hint)
    if origin is Annotated:
        base, *rules = get_args(hint)
        low = next((r.minimum for r in rules if isinstance(r, p.AtLeast)), None)
        high = next((r.maximum for r in rules if isinstance(r, p.AtMost)), None)
        longest = next((r.limit for r in rules if isinstance(r, p.MaxLen)), None)
        for rule in rules:
            if isinstance(rule, p.OneOf):
                return st.sampled_from(sorted(rule.values))
            if isinstance(rule, p.IdRule):
                return st.text(alphabet=string.ascii_letters + string.digits + "._-", min_size=1,
                               max_size=p.ID_MAX_LEN)
        if base is int and low is not None:
            return st.integers(min_value=int(low), max_value=int(high) if high is not None else 2**53)
        if base is float and low is not None:
            return st.floats(min_value=low, max_value=high, allow_nan=False, allow_infinity=False)
        if base is str and longest is not None:
            return st.text(max_size=longest)
        if get_origin(base) is tuple and longest is not None:
            return st.lists(strategy_for(get_args(base)[0]), max_size=min(3, longest)).map(tuple)
        raise AssertionError(f"no strategy for {hint}")
    if origin in (Union, type(int | None)):
        (inner,) = [a for a in get_args(hint) if a is not type(None)]
        return st.none() | strategy_for(inner)
    if origin is tuple:
        return st.lists(strategy_for(get_args(hint)[0]), max_size=3).map(tuple)
    if dataclasses.is_dataclass(hint):
        return dataclass_strategy(hint)
    return {
        str: st.text(),
        int: st.integers(min_value=-(2**63), max_value=2**63),
        float: st.floats(allow_nan=False, allow_infinity=False),
        bool: st.booleans(),
    }[hint]


def dataclass_strategy(cls):
    hints = get_type_hints(cls, include_extras=True)
    return st.builds(cls, **{f.name: strategy_for(hints[f.name]) for f in dataclasses.fields(cls)})


any_message = st.one_of([dataclass_strategy(cls) for cls in message_types().values()])


@given(any_message)
@settings(max_examples=400)
def test_property_round_trip(msg):
    assert decode(encode(msg)) == msg


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=80),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children,
                                                                          max_size=4),
    max_leaves=12,
)
field_names = sorted({f.name for cls in [*message_types().values(), CpInfo, TicketInfo, ActiveSessionInfo]
                      for f in dataclasses.fields(cls)})
json_dicts = st.builds(
    lambda kind, body: {**body, **kind},
    st.one_of(st.just({}), st.builds(lambda t: {"type": t}, st.sampled_from(sorted(message_types()))
                                     | json_values)),
    st.dictionaries(st.sampled_from(field_names) | st.text(max_size=10), json_values, max_size=10),
)


@st.composite
def damaged_messages(draw):
    """A valid message with one field replaced by arbitrary JSON (or removed)."""
    data = to_dict(draw(any_message))
    key = draw(st.sampled_from(sorted(data)))
    if draw(st.booleans()):
        del data[key]
    else:
        data[key] = draw(json_values)
    return data


def decodes_or_refuses(func, arg):
    try:
        msg = func(arg)
    except ProtocolError as exc:
        assert str(exc)
        return
    assert type(msg) in message_types().values()
    assert decode(encode(msg)) == msg  # whatever is accepted can be sent on unchanged


@given(st.binary(max_size=300))
def test_decode_arbitrary_bytes_never_crashes(data):
    decodes_or_refuses(decode, data)


@given(st.text(alphabet='{}[]":,0123456789.eE-+ tfalsenu\\', max_size=120))
def test_decode_json_looking_text_never_crashes(text):
    decodes_or_refuses(decode, text.encode())


@given(json_dicts | damaged_messages())
@settings(max_examples=500)
def test_arbitrary_dicts_never_crash(data):
    decodes_or_refuses(from_dict, data)
    try:
        text = json.dumps(data)  # NaN/Infinity become literals the decoder must refuse
    except ValueError:
        return
    decodes_or_refuses(decode, text.encode("utf-8", "surrogatepass"))


def test_the_decoder_fast_path_gives_the_same_verdicts_as_the_full_check(monkeypatch) -> None:
    """The fast path only skips work for values it is sure of; every verdict stays the same."""
    base = {"type": "charging_data", "cp_id": "CP1", "session_id": "S1", "driver_id": "d1", "seq": 3,
            "energy_kwh": 1.5, "cost_eur": 0.5, "power_kw": 7.4, "message_id": "m1", "timestamp": 1.0}
    odd = ["", "x" * 500, "é", "\ud800", 0, -1, 1, True, False, 2.5, -0.0, -1e-9, 1e308, None, [], {}, "7"]
    cases = [dict(base)] + [dict(base, **{field: v}) for field in base if field != "type" for v in odd]
    cases += [dict(base, type="fault_notification", cp_id="CP1", reason=v) for v in odd]
    cases += [dict(type="charge_completion", cp_id="CP1", session_id="S1", driver_id="d1", energy_kwh=1.0,
                   cost_eur=0.3, end_reason=v) for v in [*odd, "unplugged", "bogus"]]

    def verdicts() -> list[object]:
        out = []
        for case in cases:
            try:
                shown = p.to_dict(p.from_dict(dict(case)))
                for key in ("message_id", "timestamp"):  # null or absent: a fresh default each time
                    if case.get(key) is None:
                        shown.pop(key)
                out.append(shown)
            except p.ProtocolError as exc:
                out.append(("error", str(exc)))
        return out

    fast = verdicts()
    monkeypatch.setattr(p, "_fast_check", lambda hint: None)
    monkeypatch.setattr(p, "_PLANS", {})
    assert verdicts() == fast
