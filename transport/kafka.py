"""Kafka adapters: a publisher actor and a consumer pump actor.

Both turn Kafka into actor messages and back; neither knows the domain.

* :class:`Publisher` takes :class:`Publish` tells, sends them without blocking
  its mailbox, retries with backoff (recreating the producer and the topics
  after a broker restart) and keeps at most ``max_pending`` records while
  Kafka is away. Whoever needs to know a record is durable passes ``notify``
  and gets :class:`Published` (or :class:`PublishFailed`) back. A record no
  retry can send (too large for the broker, cannot be encoded) is logged and
  dead-lettered (:func:`dead_record`) and never blocks the records behind it.
* :class:`ConsumerPump` owns one KafkaConsumer in one thread (consumers are
  not thread-safe), decodes each poll into a :class:`Delivery`, *asks* the
  target actor to handle it, and commits offsets only after the ask returned:
  at-least-once. Records that cannot be decoded, and those the target answers
  are :class:`SetAside`, go to ``<topic>.dead`` (durably, before the commit).
  A failed ask (an exception) is retried with backoff ``retry_attempts``
  times; then the pump narrows down record by record and dead-letters the
  record that keeps failing, so no poison record stalls the partition. A target
  that is not running (or raises :class:`TargetUnavailable`) is waited for
  without counting, and after ``ask_timeout`` the pump crashes and its
  supervisor restarts it: the records come again. A watchdog crashes it too
  when the Kafka client wedges (a call that never returns, or a group that
  never finishes rejoining after a broker outage).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pykka

from actors.runtime import (
    Directory,
    Drain,
    Scheduled,
    SupervisedActor,
    Supervision,
    Ticker,
    backoff_strategy,
    schedule,
    tell,
)
from transport import protocol
from transport.broker import DEAD_SUFFIX, TOPICS, KafkaSettings, ensure_topics

log = logging.getLogger("evcharging.kafka")

Decoder = Callable[[bytes], protocol.Message]

#: The most of a record's original bytes a dead-letter record carries (more is cut, see
#: the ``truncated`` and ``size`` headers): a dead letter must itself fit the broker.
DEAD_VALUE_MAX = 256 * 1024


@dataclass(frozen=True, slots=True)
class DeadLettered:
    """Pump or Publisher → whoever should show it: a record went to ``<topic>.dead``.

    ``topic`` is the logical topic, ``reason`` a sentence; Central shows it as a fault.
    """

    topic: str
    key: str | None
    reason: str
    component: str = ""
    partition: int | None = None
    offset: int | None = None


class TargetUnavailable(RuntimeError):
    """Raised by a pump's target when something it needs is not running yet (not the records' fault).

    The pump waits and asks again without counting it as a failed attempt; after
    ``ask_timeout`` of that it crashes (its supervisor restarts it).
    """


def dead_record(raw: bytes, reason: str, *, topic: str, component: str, partition: int | None = None,
                offset: int | None = None) -> tuple[bytes, list[tuple[str, bytes]]]:
    """The value and headers of the dead-letter record of ``raw`` (see docs/protocol.md)."""
    value = raw if len(raw) <= DEAD_VALUE_MAX else raw[:DEAD_VALUE_MAX]
    headers = [("reason", protocol.clip(reason).encode()), ("topic", topic.encode()),
               ("component", component.encode()), ("size", str(len(raw)).encode()),
               ("truncated", b"true" if len(value) < len(raw) else b"false")]
    if partition is not None:
        headers.append(("partition", str(partition).encode()))
    if offset is not None:
        headers.append(("offset", str(offset).encode()))
    return value, headers


def non_retriable(exc: BaseException) -> bool:
    """True for a send error no retry cures: the record is too large or malformed for the broker."""
    from kafka import errors

    fatal = tuple(getattr(errors, name) for name in (
        "MessageSizeTooLargeError", "RecordTooLargeError", "InvalidRecordError", "CorruptRecordError",
        "RecordBatchTooLargeError", "SerializationError") if hasattr(errors, name))
    if isinstance(exc, (*fatal, TypeError, ValueError)):
        return True
    text = str(exc).upper()
    return "TOO_LARGE" in text or "TOO LARGE" in text


# --- publishing --------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Publish:
    """Send ``message`` to logical ``topic`` with ``key`` (a CP or driver id)."""

    topic: str
    key: str
    message: protocol.Message
    notify: pykka.ActorRef[Any] | None = None
    token: Any = None


@dataclass(frozen=True, slots=True)
class Published:
    """The broker acknowledged the record (acks=all): it is durable."""

    token: Any
    topic: str
    partition: int
    offset: int


@dataclass(frozen=True, slots=True)
class PublishFailed:
    """The record was not accepted (buffer full or unencodable)."""

    token: Any
    reason: str


@dataclass(frozen=True, slots=True)
class GetPublisherStats:
    """Ask: returns {'sent', 'acked', 'pending', 'failures', 'producers'}."""


@dataclass(frozen=True, slots=True)
class _SendFailed:
    publish: Publish
    error: str
    fatal: bool = False  # no retry cures it: dead-letter, do not hold the queue


@dataclass(frozen=True, slots=True)
class _Retry:
    pass


@dataclass(frozen=True, slots=True)
class _Acked:
    pass


def key_partitioner() -> Any:
    """kafka-python's default partitioner (murmur2 of the key, as the Java client), remembering each
    key's partition per topic and partition count.

    Why: the default one computes murmur2 in Python and builds two sets and a sorted list for every
    record; Central sends a record a second to each of a thousand drivers, always the same keys.
    Records without a key, or for a topic whose metadata is not known yet, take the default path.
    """
    from kafka.partitioner.default import DefaultPartitioner

    class KeyPartitioner(DefaultPartitioner):  # type: ignore[misc]
        def __init__(self) -> None:
            super().__init__()
            self._known: dict[tuple[str, bytes, int], int] = {}

        def partition(self, topic: str, key: Any, serialized_key: bytes | None, value: Any,
                      serialized_value: Any, cluster: Any) -> int:
            partitions = cluster.partitions_for_topic(topic) if serialized_key is not None else None
            if not partitions:
                return int(super().partition(topic, key, serialized_key, value, serialized_value, cluster))
            assert serialized_key is not None
            known = (topic, serialized_key, len(partitions))
            found = self._known.get(known)
            if found is None:
                if len(self._known) >= 100_000:  # keys are CP and driver ids; bound it all the same
                    self._known.clear()
                found = self._known[known] = int(
                    super().partition(topic, key, serialized_key, value, serialized_value, cluster))
            return found

    return KeyPartitioner()


class Publisher(SupervisedActor):
    """The only Kafka producer of an actor system."""

    def __init__(
        self,
        settings: KafkaSettings,
        *,
        component: str = "publisher",
        max_pending: int = 100_000,
        linger_ms: int = 1,
        max_request_bytes: int = 1_048_576,
        encode: Callable[[protocol.Message], bytes] = protocol.encode,
        faults: tuple[Directory, str] | None = None,
        supervision: Supervision | None = None,
    ) -> None:
        super().__init__(supervision=supervision)
        self.settings = settings
        self.component = component
        self.max_pending = max_pending
        self.linger_ms = linger_ms
        self.max_request_bytes = max_request_bytes
        self.faults = faults  # (directory, name): who hears DeadLettered (Central shows it)
        self._encode = encode
        self._producer: Any = None
        self._backlog: deque[Publish] = deque()
        self._retry_timer: Scheduled | None = None
        self._delay = backoff_strategy(0.2, 2.0)
        self._outage_attempts = 0
        self._in_flight = 0  # handed to the producer, neither acked nor failed (acks counted apart)
        self._acks = 0  # counted by the producer's I/O thread, under _acks_lock
        self._acks_lock = threading.Lock()
        self._stats = {"sent": 0, "acked": 0, "failures": 0, "producers": 0, "dead_lettered": 0}

    def setup(self) -> None:
        try:
            self._connect()
        except Exception as exc:  # not fatal: we keep records and retry
            self._outage(str(exc))

    def teardown(self) -> None:
        if self._retry_timer is not None:
            self._retry_timer.cancel()
        if self._producer is not None:
            try:
                self._producer.flush(timeout=2)
            except Exception:
                pass
            self._close_producer()
        if self._backlog:
            log.warning("%s: stopping with %d record(s) not yet sent to Kafka", self.component, len(self._backlog))

    def on_receive(self, message: Any) -> Any:
        match message:
            case Publish():
                self._publish(message)
            case Drain(box):  # records from many senders (the session actors), taken at once
                for item in box.take():
                    self.on_receive(item)
            case _SendFailed(publish, error, fatal):
                self._in_flight -= 1
                self._stats["failures"] += 1
                if fatal:
                    self._set_aside(publish, error)
                else:
                    self._backlog.appendleft(publish)
                    self._outage(error)
            case _Acked():
                self._count_acks()
                if self._outage_attempts:  # the broker confirmed a record: the outage is over
                    log.info("%s: Kafka at %s is reachable again", self.component, self.settings.bootstrap)
                    self._outage_attempts = 0
            case _Retry():
                self._retry_timer = None
                self._drain()
            case GetPublisherStats():
                self._count_acks()
                return dict(self._stats, pending=len(self._backlog) + self._in_flight)
        return None

    # --- internals -----------------------------------------------------------
    def _count_acks(self) -> None:
        """Fold the acks counted by the producer's thread into our figures.

        An ack is not a message to this actor (that would double the actor
        hops of every record); only during an outage does it also tell us,
        so that "reachable again" is said at the first ack.
        """
        with self._acks_lock:
            new, self._acks = self._acks, 0
        self._in_flight -= new
        self._stats["acked"] += new

    def _connect(self) -> None:
        from kafka import KafkaProducer

        self._producer = KafkaProducer(
            bootstrap_servers=self.settings.bootstrap,
            client_id=f"evcharging-{self.component}",
            acks="all",
            enable_idempotence=False,  # Tansu: an idempotent producer never recovers after a restart
            linger_ms=self.linger_ms,
            max_request_size=self.max_request_bytes,
            retries=3,
            max_block_ms=self.settings.max_block_ms,
            request_timeout_ms=self.settings.request_timeout_ms,
            delivery_timeout_ms=max(self.settings.request_timeout_ms * 2, 10_000),
            partitioner=key_partitioner(),
            **self.settings.client_options(KafkaProducer),
        )
        self._stats["producers"] += 1

    def _close_producer(self) -> None:
        producer, self._producer = self._producer, None
        if producer is not None:
            try:
                producer.close(timeout=0.5)
            except Exception:
                # It could not flush (Kafka is away): the records it held are in our
                # backlog and will be resent. Mark it closed so its __del__ does not
                # try (and fail) again at garbage collection.
                producer._closed = True

    def _publish(self, p: Publish) -> None:
        if len(self._backlog) + self._in_flight >= self.max_pending:
            self._count_acks()
        if len(self._backlog) + self._in_flight >= self.max_pending:
            reason = (f"Kafka at {self.settings.bootstrap} is unreachable and {self.max_pending} records "
                      "are already waiting")
            tell(p.notify, PublishFailed(p.token, reason))
            return
        if self._backlog or self._producer is None:
            self._backlog.append(p)  # keep order behind what is already waiting
            return
        self._send(p)

    def _send(self, p: Publish) -> bool:
        """Hand one record to the producer; False (and back in the backlog) on failure."""
        try:
            value = self._encode(p.message)
        except Exception as exc:
            self._set_aside(p, f"cannot encode {type(p.message).__name__}: {exc}",
                            repr(p.message).encode("utf-8", "replace"))
            return True
        try:
            future = self._producer.send(self.settings.topic(p.topic), key=p.key.encode(), value=value)
        except Exception as exc:  # metadata timeout, closed producer, missing topic; or too large
            if non_retriable(exc):
                self._set_aside(p, str(exc) or type(exc).__name__, value)
                return True
            self._backlog.appendleft(p)
            self._outage(str(exc) or type(exc).__name__)
            return False
        self._in_flight += 1
        self._stats["sent"] += 1
        me = self.actor_ref

        def on_ok(md: Any) -> None:
            with self._acks_lock:
                self._acks += 1
            if self._outage_attempts:
                tell(me, _Acked())
            if p.notify is not None:
                tell(p.notify, Published(p.token, p.topic, md.partition, md.offset))

        def on_err(exc: BaseException) -> None:
            tell(me, _SendFailed(p, str(exc) or type(exc).__name__, non_retriable(exc)))

        future.add_callback(on_ok)
        future.add_errback(on_err)
        return True

    def _set_aside(self, p: Publish, reason: str, raw: bytes | None = None) -> None:
        """A record no retry can send: say so, dead-letter a small record about it, go on with the next."""
        self._stats["dead_lettered"] += 1
        kind = type(p.message).__name__
        if raw is None:
            try:
                raw = self._encode(p.message)
            except Exception:
                raw = repr(p.message).encode("utf-8", "replace")
        log.warning("%s: Kafka refused a %s for %s (key %s, %d bytes) for good: %s — it goes to %s%s",
                    self.component, kind, p.topic, p.key, len(raw), reason, p.topic, DEAD_SUFFIX)
        tell(p.notify, PublishFailed(p.token, reason))
        if self.faults is not None:
            directory, name = self.faults
            directory.tell(name, DeadLettered(p.topic, p.key, reason, self.component))
        if self._producer is None:
            return
        value, headers = dead_record(raw[: min(DEAD_VALUE_MAX, self.max_request_bytes // 2)], reason,
                                     topic=p.topic, component=self.component)
        headers = [h for h in headers if h[0] not in ("size", "truncated")]
        headers += [("size", str(len(raw)).encode()), ("truncated", b"true" if len(value) < len(raw) else b"false")]
        try:
            future = self._producer.send(self.settings.dead_topic(p.topic), key=p.key.encode(), value=value,
                                         headers=headers)
            future.add_errback(lambda exc: log.warning("%s: could not dead-letter a %s for %s: %s",
                                                       self.component, kind, p.topic, exc))
        except Exception as exc:  # best effort: the sentence above is logged anyway
            log.warning("%s: could not dead-letter a %s for %s: %s", self.component, kind, p.topic, exc)

    def _outage(self, error: str) -> None:
        if self._retry_timer is not None:
            return
        self._outage_attempts += 1
        delay = self._delay(self._outage_attempts)
        if self._outage_attempts == 1 or self._outage_attempts % 10 == 0:
            log.warning(
                "%s: Cannot reach Kafka at %s (%s) — %d record(s) kept, retrying in %.1f s",
                self.component, self.settings.bootstrap, error, len(self._backlog), delay,
            )
        self._retry_timer = schedule(delay, self.actor_ref, _Retry())

    def _drain(self) -> None:
        if self._producer is None or self._outage_attempts >= 2:
            # A broker restart can leave a producer (and the topics) unusable:
            # start over with a new producer and recreate the topics.
            self._close_producer()
            try:
                ensure_topics(self.settings, timeout=2.0)
                self._connect()
            except Exception as exc:
                self._outage(str(exc))
                return
        while self._backlog:
            if not self._send(self._backlog.popleft()):
                return
        # Handed to the producer is not delivered: "reachable again" waits for an acknowledgement.


# --- consuming ---------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Inbound:
    """One Kafka record: the decoded ``message``, or ``error`` if it was bad."""

    topic: str
    key: str | None
    message: protocol.Message | None  # None when ``error`` says why
    error: str | None
    partition: int
    offset: int
    timestamp: float = 0.0  # when the producer sent it (seconds since the epoch; 0 if unknown)
    raw: bytes = b""  # the record's value as it came (what a dead letter carries)


@dataclass(frozen=True, slots=True)
class Delivery:
    """Everything one poll returned; the target answers when it is handled.

    The answer is ``True`` or a :class:`Handled`: every record is durably
    handled except those ``Handled.set_aside`` names, which no retry can cure.
    An exception (or no answer) means "try again later" (a retriable failure).
    """

    items: tuple[Inbound, ...]


@dataclass(frozen=True, slots=True)
class SetAside:
    """A record no retry can cure (schema, bounds, arithmetic, a mismatch, an unknown
    session after its grace period): the pump writes it to ``<topic>.dead`` with
    ``reason`` and its original bytes, then commits past it."""

    item: Inbound
    reason: str


@dataclass(frozen=True, slots=True)
class Handled:
    """A target's answer to a :class:`Delivery` (see there)."""

    set_aside: tuple[SetAside, ...] = ()


@dataclass(frozen=True, slots=True)
class PumpUp:
    """Pump → its target: the consumer is positioned (group joined); records flow from now.

    Told once per pump generation. The target comes before its pump in the
    tree (rest_for_one), so a restarted target always hears this from the
    pump restarted after it.
    """

    pump: pykka.ActorRef[Any]
    name: str


@dataclass(frozen=True, slots=True)
class PumpDown:
    """Pump → its target: the pump stopped (``reason`` is a sentence); a new one says PumpUp."""

    pump: pykka.ActorRef[Any]
    name: str
    reason: str


@dataclass(frozen=True, slots=True)
class PumpReady:
    """Ask: True once the consumer is positioned and polling."""


@dataclass(frozen=True, slots=True)
class PumpFetchWait:
    """Ask: how long (ms) the broker may hold the consumer's fetches now (shorter while records flow)."""


@dataclass(frozen=True, slots=True)
class _PumpFailed:
    error: BaseException


@dataclass(frozen=True, slots=True)
class _Watch:
    pass


class ConsumerStalled(RuntimeError):
    """A call into the Kafka client did not return (seen with kafka-python 3 after a broker outage)."""


def _quietly(call: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
    """Call, ignoring any error (for best-effort cleanup)."""
    try:
        call(*args, **kwargs)
    except Exception:
        pass


def _set_fetch_wait(consumer: Any, wait_ms: int) -> int:
    """Change how long the broker may hold this consumer's next fetches; returns the wait in force.
    kafka-python has no public way; its fetcher reads ``config['fetch_max_wait_ms']`` for every
    request it builds. Where that is not so (another version), the consumer keeps its wait."""
    config = getattr(getattr(consumer, "_fetcher", None), "config", None)
    if isinstance(config, dict) and "fetch_max_wait_ms" in config:
        config["fetch_max_wait_ms"] = wait_ms
        return wait_ms
    return int(getattr(consumer, "config", {}).get("fetch_max_wait_ms", wait_ms))


def partition_for(key: str, partitions: int) -> int:
    """The partition the default Kafka partitioner picks for ``key``."""
    from kafka.partitioner.default import murmur2

    hashed: int = murmur2(key.encode())  # kafka-python is untyped
    return (hashed & 0x7FFFFFFF) % partitions


class ConsumerPump(SupervisedActor):
    """Feeds one target actor from Kafka, committing after it handled each poll.

    With ``group_id`` the pump joins a consumer group and resumes from the
    group's committed offsets. Without it, ``partition_key`` assigns the one
    partition of each topic that key hashes to (how a driver reads only its
    own responses) and starts at the end.
    """

    def __init__(
        self,
        settings: KafkaSettings,
        topics: tuple[str, ...],
        target: str,
        directory: Directory,
        *,
        group_id: str | None = None,
        partition_key: str | None = None,
        component: str = "pump",
        ask_timeout: float = 30.0,
        max_records: int = 500,
        poll_ms: int = 100,
        stall_timeout: float = 20.0,
        retry_attempts: int = 5,
        retry_backoff: tuple[float, float] = (0.2, 5.0),
        decode: Decoder = protocol.decode,
        idle_fetch_wait_ms: int | None = None,
        idle_after: float = 2.0,
        supervision: Supervision | None = None,
    ) -> None:
        super().__init__(supervision=supervision)
        if group_id is None and partition_key is None:
            raise ValueError("a pump needs a group_id or a partition_key")
        self.settings = settings
        self.topics = topics
        self.target = target
        self.directory = directory
        self.group_id = group_id
        self.partition_key = partition_key
        self.component = component
        self.ask_timeout = ask_timeout
        self.max_records = max_records
        self.poll_ms = poll_ms
        self.stall_timeout = stall_timeout
        self.retry_attempts = max(1, retry_attempts)
        self._retry_delay = backoff_strategy(*retry_backoff)
        self._dead_producer: Any = None  # created by the pump thread at its first dead letter
        self._decode = decode
        # Quiet for ``idle_after`` s: fetch with ``idle_fetch_wait_ms`` instead of the settings' wait,
        # back at the first record. Why: Tansu holds each fetch for its whole wait, so a short wait
        # is both the latency of a request and the idle cost (Central's driver-requests consumer at
        # 10 ms was ~18 % of a core doing nothing); the first request after a quiet spell pays it.
        self.idle_fetch_wait_ms = idle_fetch_wait_ms
        self.idle_after = idle_after
        self._fetch_wait_ms = settings.fetch_max_wait_ms  # as now set (written by the pump thread)
        self._halt = threading.Event()
        self._ready = threading.Event()
        self._thread: threading.Thread | None = None
        self._real_to_logical = {settings.topic(t): t for t in topics}
        # Watchdog. kafka-python 3 can wedge after a broker outage: a call that never
        # returns, or a group rejoin that never completes (every poll() then returns
        # nothing, silently). Without this, Central would stop billing without a word.
        self._busy_since: float | None = None  # when the thread entered poll()/commit()
        self._unassigned_since: float | None = None  # group mode: since when it has no partitions
        self._consumer: Any = None
        self._watch: Ticker | None = None

    def setup(self) -> None:
        # A daemon: a thread stuck inside the Kafka client must not keep the process alive
        # (a normal stop still joins it, see teardown).
        self._thread = threading.Thread(target=self._run, name=f"{self.component}-pump", daemon=True)
        self._thread.start()
        self._watch = Ticker(max(0.5, self.stall_timeout / 4), self.actor_ref, _Watch(),
                             name=f"{self.component}-watch")

    def teardown(self) -> None:
        self._halt.set()
        if self._watch is not None:
            self._watch.stop()
        self.directory.tell(self.target, PumpDown(self.actor_ref, self.child_name, "the consumer stopped"))
        stalled = self._stall() is not None
        busy = self._busy_since
        if stalled and busy is not None and self._consumer is not None:
            # The pump thread is stuck inside the client: close it from here (in a
            # throwaway thread, close() may block too), which fails the stuck call.
            threading.Thread(target=self._close, args=(self._consumer,), daemon=True,
                             name=f"{self.component}-close").start()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=5.0 if stalled else self.ask_timeout + 5)

    def on_receive(self, message: Any) -> Any:
        match message:
            case _PumpFailed(error):
                raise error  # crash: the supervisor restarts us, uncommitted records come again
            case _Watch():
                problem = self._stall()
                if problem is not None:
                    raise ConsumerStalled(f"the Kafka consumer at {self.settings.bootstrap} {problem}; "
                                          "starting a new one")
            case PumpFetchWait():
                return self._fetch_wait_ms
            case PumpReady():
                return self._ready.is_set()
        return None

    def _stall(self) -> str | None:
        """Why the consumer looks wedged (a sentence), or None."""
        now = time.monotonic()
        busy, unassigned = self._busy_since, self._unassigned_since
        if busy is not None and now - busy > self.stall_timeout:
            return f"has not answered for {now - busy:.0f} s"
        if unassigned is not None and now - unassigned > self.stall_timeout:
            return f"has had no partitions for {now - unassigned:.0f} s (its group never finished joining)"
        return None

    @staticmethod
    def _close(consumer: Any) -> None:
        """Close a consumer for good, within a few seconds whatever state it is in.

        kafka-python 3 runs each client's network loop (and its group heartbeats) in
        a thread of its own. If close() fails or hangs (broker away, a wedged call),
        that thread would go on heartbeating for a member that never polls again,
        and its group could never rebalance: no new consumer would get a partition.
        So the loop is stopped explicitly afterwards.
        """
        closer = threading.Thread(target=_quietly, args=(consumer.close,),
                                  kwargs={"autocommit": False, "timeout_ms": 1000}, daemon=True)
        closer.start()
        closer.join(3.0)
        net = getattr(consumer, "_net", None)  # kafka-python 3 internals; absent elsewhere
        if net is not None and getattr(net, "_io_thread", None) is not None:
            _quietly(net.stop, timeout_ms=1000)

    # --- the pump thread ---------------------------------------------------
    def _run(self) -> None:
        consumer = None
        try:
            consumer = self._consumer = self._open()
            if consumer is None:
                return
            last_record, idle = time.monotonic(), False
            while not self._halt.is_set():
                self._busy_since = time.monotonic()
                batch = consumer.poll(timeout_ms=self.poll_ms, max_records=self.max_records)
                self._busy_since = None
                if self.idle_fetch_wait_ms is not None:
                    now = time.monotonic()
                    if batch:
                        last_record = now
                        if idle:  # requests again: the short wait, from the next fetch on
                            idle = False
                            self._fetch_wait_ms = _set_fetch_wait(consumer, self.settings.fetch_max_wait_ms)
                    elif not idle and now - last_record >= self.idle_after:
                        idle = True
                        self._fetch_wait_ms = _set_fetch_wait(consumer, self.idle_fetch_wait_ms)
                assigned = bool(consumer.assignment())
                if self.group_id is not None:
                    self._unassigned_since = None if assigned else (self._unassigned_since or time.monotonic())
                if not self._ready.is_set() and assigned:
                    self._positioned()
                if not batch:
                    continue
                items = tuple(self._inbound(r) for records in batch.values() for r in records)
                # The client's record objects are not needed past this point: let them go now rather
                # than after the target handled the poll (thousands of objects fewer for the garbage
                # collector to walk while the poll is being handled).
                del batch
                if not self._handle(items):
                    return
                if self.group_id is not None:
                    self._busy_since = time.monotonic()
                    consumer.commit()
                    self._busy_since = None
        except Exception as exc:
            if not self._halt.is_set():
                tell(self.actor_ref, _PumpFailed(exc))
        finally:
            self._busy_since = self._unassigned_since = None
            if consumer is not None:
                self._close(consumer)
            producer, self._dead_producer = self._dead_producer, None
            if producer is not None:
                _quietly(producer.close, timeout=1)

    def _open(self) -> Any:
        from kafka import KafkaConsumer, TopicPartition

        delay = backoff_strategy(0.5, 2.0)
        attempt = 0
        while not self._halt.is_set():
            attempt += 1
            try:
                consumer = KafkaConsumer(
                    bootstrap_servers=self.settings.bootstrap,
                    client_id=f"evcharging-{self.component}",
                    group_id=self.group_id,
                    enable_auto_commit=False,
                    auto_offset_reset="earliest",
                    fetch_max_wait_ms=self.settings.fetch_max_wait_ms,
                    session_timeout_ms=self.settings.session_timeout_ms,
                    heartbeat_interval_ms=self.settings.heartbeat_interval_ms,
                    request_timeout_ms=max(self.settings.request_timeout_ms, self.settings.session_timeout_ms + 1000),
                    max_poll_records=self.max_records,
                    **self.settings.client_options(KafkaConsumer),
                )
                real = [self.settings.topic(t) for t in self.topics]
                if self.group_id is not None:
                    consumer.subscribe(real)  # ready once the group assigned us partitions
                else:
                    assert self.partition_key is not None
                    tps = [TopicPartition(t, partition_for(self.partition_key, TOPICS[self._real_to_logical[t]]))
                           for t in real]
                    consumer.assign(tps)
                    consumer.seek_to_end(*tps)
                    for tp in tps:
                        consumer.position(tp)  # resolve now, so nothing sent after "ready" is missed
                    self._positioned()
                if attempt > 1:
                    log.info("%s: connected to Kafka at %s", self.component, self.settings.bootstrap)
                return consumer
            except Exception as exc:
                wait = delay(attempt)
                if attempt == 1 or attempt % 10 == 0:
                    log.warning(
                        "%s: Cannot reach Kafka at %s (%s) — retrying in %.1f s",
                        self.component, self.settings.bootstrap, exc, wait,
                    )
                self._halt.wait(wait)
        return None

    def _positioned(self) -> None:
        self._ready.set()
        self.directory.tell(self.target, PumpUp(self.actor_ref, self.child_name))

    def _inbound(self, record: Any) -> Inbound:
        topic = self._real_to_logical.get(record.topic, record.topic)
        key = record.key.decode("utf-8", "replace") if record.key is not None else None
        sent = record.timestamp / 1000.0 if record.timestamp and record.timestamp > 0 else 0.0
        raw = bytes(record.value or b"")
        try:
            return Inbound(topic, key, self._decode(raw), None, record.partition, record.offset, sent, raw)
        except Exception as exc:
            return Inbound(topic, key, None, str(exc) or type(exc).__name__, record.partition, record.offset, sent,
                           raw)

    def _handle(self, items: tuple[Inbound, ...]) -> bool:
        """Have every record handled or set aside (dead-lettered, durably); False when stopping."""
        set_aside = [SetAside(i, f"cannot decode: {i.error}") for i in items if i.message is None]
        good = tuple(i for i in items if i.message is not None)
        if good:
            result = self._attempt(good)
            if result is None:
                return False
            set_aside += result
        if set_aside:
            self._dead_letter(set_aside)
        return True

    def _attempt(self, items: tuple[Inbound, ...]) -> list[SetAside] | None:
        """Deliver ``items`` until handled, ``retry_attempts`` times at most (with backoff); then narrow down.

        Returns what was set aside (the target's SetAside, or the record that kept
        failing on its own); None when stopping.
        """
        attempt = 0
        error = ""
        while attempt < self.retry_attempts:
            try:
                answer = self._deliver(Delivery(items))
            except (TargetUnavailable, ConsumerStalled, pykka.Timeout, pykka.ActorDeadError):
                # Not the records' fault (an actor on the way is restarting, or the system is
                # too slow to answer in time): never counted towards dead-lettering them; the
                # pump crashes and its supervisor starts another, which reads them again.
                raise
            except Exception as exc:  # retriable: the target failed on these records
                attempt += 1
                error = str(exc) or type(exc).__name__
                where = (f"offset {items[0].offset} of {items[0].topic}" if len(items) == 1
                         else f"{len(items)} records")
                if attempt < self.retry_attempts:
                    wait = self._retry_delay(attempt)
                    log.warning("%s: %s could not handle %s (attempt %d of %d): %s — retrying in %.1f s",
                                self.component, self.target, where, attempt, self.retry_attempts, error, wait)
                    if self._halt.wait(wait):
                        return None
                continue
            if answer is None:
                return None
            return list(answer.set_aside)
        if len(items) == 1:
            return [SetAside(items[0], f"{self.target} failed {attempt} times: {error}")]
        log.warning("%s: %s kept failing on %d records (%s); delivering them one by one to find the bad one",
                    self.component, self.target, len(items), error)
        out: list[SetAside] = []
        for item in items:
            result = self._attempt((item,))
            if result is None:
                return None
            out += result
        return out

    def _deliver(self, delivery: Delivery) -> Handled | None:
        """Ask the target once (waiting while it is not running); its answer, or None when stopping.

        Raises what the target raised (a retriable failure), pykka.Timeout when it
        did not answer, and TargetUnavailable when it was unavailable for ``ask_timeout``.
        """
        waited = 0.0
        pause = 0.05
        while not self._halt.is_set():
            ref = self.directory.get(self.target)
            why = f"no actor named {self.target!r} to deliver to"
            if ref is not None:
                try:
                    answer = ref.ask(delivery, timeout=self.ask_timeout)
                except pykka.ActorDeadError:
                    continue
                except TargetUnavailable as exc:
                    why = str(exc)
                else:
                    return answer if isinstance(answer, Handled) else Handled()
            # the target (or what it needs) is being restarted: wait, commit nothing
            if waited >= self.ask_timeout:  # not the records' fault: crash, the supervisor restarts us
                raise TargetUnavailable(f"{why} for {self.ask_timeout:g} s")
            self._halt.wait(pause)
            waited += pause
            pause = min(pause * 2, 1.0)
        return None

    def _dead_letter(self, set_aside: list[SetAside]) -> None:
        """Write each set-aside record to ``<topic>.dead`` and wait until the broker has them all."""
        from kafka import KafkaProducer

        self._busy_since = time.monotonic()
        if self._dead_producer is None:
            self._dead_producer = KafkaProducer(
                bootstrap_servers=self.settings.bootstrap, client_id=f"evcharging-{self.component}-dead",
                acks="all", enable_idempotence=False, linger_ms=0, max_block_ms=self.settings.max_block_ms,
                request_timeout_ms=self.settings.request_timeout_ms,
                **self.settings.client_options(KafkaProducer))
        futures = []
        for sa in set_aside:
            item = sa.item
            topic = (self.settings.dead_topic(item.topic) if item.topic in TOPICS
                     else item.topic + DEAD_SUFFIX)
            value, headers = dead_record(item.raw, sa.reason, topic=item.topic, component=self.component,
                                         partition=item.partition, offset=item.offset)
            futures.append(self._dead_producer.send(topic, key=item.key.encode() if item.key is not None else None,
                                                    value=value, headers=headers))
        self._dead_producer.flush(timeout=self.settings.request_timeout_ms / 1000 * 2)
        for f in futures:
            f.get(timeout=self.settings.request_timeout_ms / 1000)  # raises: then nothing is committed
        self._busy_since = None
        for sa in set_aside:
            item = sa.item
            log.warning("%s: set aside the record at offset %d of %s (partition %d, key %s) in %s%s: %s",
                        self.component, item.offset, item.topic, item.partition, item.key, item.topic,
                        DEAD_SUFFIX, sa.reason)
            self.directory.tell(self.target, DeadLettered(item.topic, item.key, sa.reason, self.component,
                                                          item.partition, item.offset))


def wait_ready(pump: pykka.ActorRef[Any], timeout: float = 20.0) -> bool:
    """Block (outside any actor) until ``pump`` is positioned; False on timeout."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if pump.ask(PumpReady(), timeout=1):
                return True
        except (pykka.Timeout, pykka.ActorDeadError):
            pass
        time.sleep(0.05)
    return False
