"""Kafka adapters against a real Tansu broker: publish, pump, commit-after-handle."""

from __future__ import annotations

import threading
from typing import Any, ClassVar

import pytest

from actors.runtime import Directory, SupervisedActor, Supervision
from supervisors.supervisor import ChildSpec, start_tree
from tests.waiting import wait_until
from transport import protocol
from transport.kafka import (
    ConsumerPump,
    Delivery,
    Publish,
    Published,
    Publisher,
    PumpFetchWait,
    partition_for,
    wait_ready,
)

pytestmark = pytest.mark.broker


class Sink(SupervisedActor):
    """Records deliveries; fails the first ``fail_times`` deliveries it sees."""

    def __init__(self, seen: list[Any], fail_times: int = 0, *, supervision: Supervision | None = None) -> None:
        super().__init__(supervision=supervision)
        self.seen = seen
        self.fail_times = fail_times
        self.calls = 0
        self.acks: list[Published] = []

    def on_receive(self, message: Any) -> Any:
        match message:
            case Delivery(items):
                self.calls += 1
                if self.calls <= self.fail_times:
                    raise RuntimeError("database is locked")  # goes to the pump's ask
                self.seen.extend(items)
            case Published():
                self.acks.append(message)
            case "acks":
                return list(self.acks)
        return None


def charging_data(cp: str, seq: int) -> protocol.ChargingData:
    return protocol.ChargingData(
        cp_id=cp, session_id="s1", driver_id="d1", seq=seq, energy_kwh=seq * 0.1, cost_eur=seq * 0.03, power_kw=7.4,
    )


def test_publish_then_pump_delivers_typed_messages(kafka_settings, stop_at_end) -> None:
    seen: list[Any] = []
    directory = Directory()
    sup = start_tree("t", [
        ChildSpec("sink", Sink, (seen,)),
        ChildSpec("publisher", Publisher, (kafka_settings,)),
        ChildSpec("pump", ConsumerPump, (kafka_settings, ("charging_session_data",), "sink", directory),
                  {"group_id": "central-test"}),
    ], directory=directory)
    stop_at_end(sup)
    assert wait_ready(directory.get("pump"))
    sink = directory.get("sink")
    for seq in range(1, 21):
        directory.get("publisher").tell(Publish("charging_session_data", "CP1", charging_data("CP1", seq), sink, seq))
    wait_until(lambda: len(seen) == 20, what="20 records delivered")
    assert [i.message.seq for i in seen] == list(range(1, 21))  # one key, one partition: in order
    assert all(isinstance(i.message, protocol.ChargingData) and i.key == "CP1" for i in seen)
    acks = wait_until(lambda: len(sink.ask("acks")) == 20 and sink.ask("acks"), what="20 acks")
    assert {a.token for a in acks} == set(range(1, 21))
    sup.stop()


def test_a_quiet_pump_fetches_with_the_idle_wait_and_a_record_brings_the_short_one_back(kafka_settings,
                                                                                        stop_at_end) -> None:
    """Quiet for idle_after: the broker may hold fetches for idle_fetch_wait_ms (the idle cost);
    the next record is still delivered, and from then on the settings' short wait applies."""
    seen: list[Any] = []
    directory = Directory()
    sup = start_tree("t", [
        ChildSpec("sink", Sink, (seen,)),
        ChildSpec("publisher", Publisher, (kafka_settings,)),
        ChildSpec("pump", ConsumerPump, (kafka_settings, ("driver_requests",), "sink", directory),
                  {"group_id": "idle-test", "idle_fetch_wait_ms": 300, "idle_after": 2.0}),
    ], directory=directory)
    stop_at_end(sup)
    assert wait_ready(directory.get("pump"))
    pump = directory.get("pump")
    short = kafka_settings.fetch_max_wait_ms
    wait_until(lambda: pump.ask(PumpFetchWait()) == 300, timeout=10, what="the idle wait after a quiet spell")
    hello = protocol.DriverHello(driver_id="d1", correlation_id="c1")
    directory.get("publisher").tell(Publish("driver_requests", "d1", hello))
    wait_until(lambda: [i.message for i in seen] == [hello], timeout=10, what="the request delivered")
    wait_until(lambda: pump.ask(PumpFetchWait()) == short, timeout=5, what="the short wait back")
    sup.stop()


def test_bad_records_are_dead_lettered_not_crashes(kafka_settings, stop_at_end) -> None:
    """Undecodable records never reach the target: the pump sets them aside in <topic>.dead (issue #10)."""
    from kafka import KafkaProducer

    from tests.test_dead_letters import read_dead

    seen: list[Any] = []
    directory = Directory()
    sup = start_tree("t", [
        ChildSpec("sink", Sink, (seen,)),
        ChildSpec("pump", ConsumerPump, (kafka_settings, ("driver_requests",), "sink", directory), {"group_id": "g"}),
    ], directory=directory)
    stop_at_end(sup)
    assert wait_ready(directory.get("pump"))
    raw = KafkaProducer(bootstrap_servers=kafka_settings.bootstrap, enable_idempotence=False)
    topic = kafka_settings.topic("driver_requests")
    for value in (b"\xff\xfe", b"not json", b'{"type": "charge_request"}', b'{"type": "nope"}'):
        raw.send(topic, key=b"d1", value=value)
    raw.send(topic, key=b"d1", value=protocol.encode(protocol.AvailableCpsRequest(driver_id="d1", correlation_id="c1")))
    raw.flush(5)
    raw.close()
    wait_until(lambda: len(seen) == 1, what="the good record")
    assert seen[0].error is None and isinstance(seen[0].message, protocol.AvailableCpsRequest)
    dead = read_dead(kafka_settings, "driver_requests", 4)
    assert [row["value"] for row in dead] == [b"\xff\xfe", b"not json", b'{"type": "charge_request"}',
                                             b'{"type": "nope"}']
    assert all(row["reason"].startswith("cannot decode: ") for row in dead)
    assert directory.get("pump") is not None
    sup.stop()


def test_failed_handler_means_redelivery(kafka_settings, stop_at_end) -> None:
    """Commit-after-handle: the handler fails, nothing is committed, the pump
    asks again after a backoff (bounded, see test_dead_letters), and the same records come again."""
    seen: list[Any] = []
    directory = Directory()
    sup = start_tree("t", [
        ChildSpec("sink", Sink, (seen,), {"fail_times": 1}),
        ChildSpec("publisher", Publisher, (kafka_settings,)),
        ChildSpec("pump", ConsumerPump, (kafka_settings, ("charging_session_complete",), "sink", directory),
                  {"group_id": "central-redelivery"}),
    ], directory=directory, backoff_base=0.01)
    stop_at_end(sup)
    first_pump = directory.get("pump")
    assert wait_ready(first_pump)
    msg = protocol.ChargeCompletion(
        cp_id="CP1", session_id="s1", driver_id="d1", energy_kwh=1.5, cost_eur=0.45, end_reason="unplugged",
    )
    directory.get("publisher").tell(Publish("charging_session_complete", "CP1", msg))
    wait_until(lambda: len(seen) == 1, timeout=30, what="redelivery after the failure")
    assert seen[0].message == msg
    assert directory.get("pump") is first_pump  # retried in place
    sup.stop()


def test_partition_for_matches_the_producer(kafka_settings, stop_at_end) -> None:
    """A driver reads only the partition its key hashes to: check the producer agrees."""
    seen: list[Any] = []
    directory = Directory()
    sup = start_tree("t", [
        ChildSpec("sink", Sink, (seen,)),
        ChildSpec("publisher", Publisher, (kafka_settings,)),
        ChildSpec("pump", ConsumerPump, (kafka_settings, ("driver_responses",), "sink", directory),
                  {"partition_key": "driver-7"}),
    ], directory=directory)
    stop_at_end(sup)
    assert wait_ready(directory.get("pump"))
    sink = directory.get("sink")
    for d in ("driver-7", "driver-8", "driver-9", "driver-10"):
        directory.get("publisher").tell(Publish(
            "driver_responses", d, protocol.ErrorMessage(reason=f"for {d}"), sink, d))
    acks = wait_until(lambda: len(sink.ask("acks")) == 4 and sink.ask("acks"), what="acks")
    mine = {a.token: a.partition for a in acks}
    assert mine["driver-7"] == partition_for("driver-7", 8)
    wait_until(lambda: any(i.key == "driver-7" for i in seen), what="own response")
    assert all(i.partition == mine["driver-7"] for i in seen)
    sup.stop()


def test_publisher_survives_a_broker_restart(tmp_path) -> None:
    """Tansu loses everything on restart; the publisher recreates producer and topics."""
    from transport.broker import KafkaSettings, LocalBroker, ensure_topics

    b = LocalBroker(log_path=tmp_path / "tansu.log").start()
    settings = KafkaSettings(bootstrap=b.bootstrap, max_block_ms=1000, request_timeout_ms=2000)
    ensure_topics(settings)
    seen: list[Any] = []
    directory = Directory()
    sup = start_tree("t", [
        ChildSpec("sink", Sink, (seen,)),
        ChildSpec("publisher", Publisher, (settings,)),
    ], directory=directory)
    sink = directory.get("sink")
    pub = directory.get("publisher")
    pub.tell(Publish("charging_session_data", "CP1", charging_data("CP1", 1), sink, 1))
    wait_until(lambda: len(sink.ask("acks")) == 1, what="first ack")
    b.kill()
    pub.tell(Publish("charging_session_data", "CP1", charging_data("CP1", 2), sink, 2))
    b2 = LocalBroker(port=b.port, log_path=tmp_path / "tansu2.log").start()
    try:
        wait_until(lambda: len(sink.ask("acks")) == 2, timeout=40, what="ack after the broker came back")
    finally:
        sup.stop()
        b2.stop()


class _StuckOnceConsumer:
    """The first consumer is wedged like kafka-python 3 after an outage: its poll never
    returns (``hang``) or it never gets partitions back (``unassigned``); later ones work."""

    instances: ClassVar[list[_StuckOnceConsumer]] = []
    mode = "hang"

    def __init__(self) -> None:
        self.closed = threading.Event()
        self.stuck = not _StuckOnceConsumer.instances
        _StuckOnceConsumer.instances.append(self)

    def poll(self, timeout_ms: int = 0, max_records: int = 0) -> dict:
        if self.stuck and self.mode == "hang":
            self.closed.wait(60)
        else:
            self.closed.wait(timeout_ms / 1000)
        return {}

    def assignment(self) -> set:
        return set() if self.stuck else {"tp"}

    def close(self, autocommit: bool = False, timeout_ms: int = 0) -> None:
        self.closed.set()


class _StuckOncePump(ConsumerPump):
    def _open(self) -> Any:
        return _StuckOnceConsumer()


@pytest.mark.parametrize("mode,sentence", [("hang", "has not answered for"), ("unassigned", "has had no partitions")])
def test_a_pump_whose_kafka_client_is_wedged_is_replaced_with_a_sentence(kafka_settings, caplog, mode: str,
                                                                          sentence: str) -> None:
    import logging

    from supervisors.supervisor import GetRestartLog

    caplog.set_level(logging.WARNING, logger="evcharging")
    _StuckOnceConsumer.instances.clear()
    _StuckOnceConsumer.mode = mode
    directory = Directory()
    sup = start_tree("t", [
        ChildSpec("sink", Sink, ([],)),
        ChildSpec("pump", _StuckOncePump, (kafka_settings, ("charging_session_data",), "sink", directory),
                  {"group_id": "g", "stall_timeout": 0.6}),
    ], directory=directory)
    try:
        wait_until(lambda: sup.ask(GetRestartLog()), timeout=10, what="the wedged pump restarted")
        first, _ = wait_until(lambda: _StuckOnceConsumer.instances[:2] if len(_StuckOnceConsumer.instances) > 1
                              else None, timeout=5, what="a second consumer")
        assert first.closed.wait(5), "the wedged consumer is closed so its thread can end"
        assert any(sentence in r.getMessage() for r in caplog.records), caplog.text
        assert wait_ready(directory.get("pump"), timeout=5)
    finally:
        sup.stop()


def test_the_key_partitioner_places_every_key_where_kafka_pythons_default_does(kafka_settings) -> None:
    """The publisher's partitioner only remembers the default's answers (issue #14): a key goes to the
    same partition either way, so per-key order never depends on which producer sent a record."""
    from kafka import KafkaProducer
    from kafka.partitioner.default import murmur2

    from transport.kafka import key_partitioner

    topic = kafka_settings.topic("driver_responses")
    producer = KafkaProducer(bootstrap_servers=kafka_settings.bootstrap, partitioner=key_partitioner(),
                             enable_idempotence=False)
    try:
        partitions = sorted(producer.partitions_for(topic))
        assert len(partitions) > 1
        keys = [f"driver-{i}".encode() for i in range(64)]
        for _ in range(2):  # the second round comes from the partitioner's memory
            for key in keys:
                md = producer.send(topic, key=key, value=b"{}").get(timeout=10)
                assert md.partition == partitions[(murmur2(key) & 0x7FFFFFFF) % len(partitions)]
        no_key = producer.send(topic, value=b"{}").get(timeout=10)  # no key: the default's choice
        assert no_key.partition in partitions
    finally:
        producer.close(timeout=2)
