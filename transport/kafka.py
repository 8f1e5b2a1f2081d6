"""Kafka adapters: a publisher actor and a consumer pump actor.

Both turn Kafka into actor messages and back; neither knows the domain.

* :class:`Publisher` takes :class:`Publish` tells, sends them without blocking
  its mailbox, retries with backoff (recreating the producer and the topics
  after a broker restart) and keeps at most ``max_pending`` records while
  Kafka is away. Whoever needs to know a record is durable passes ``notify``
  and gets :class:`Published` (or :class:`PublishFailed`) back.
* :class:`ConsumerPump` owns one KafkaConsumer in one thread (consumers are
  not thread-safe), decodes each poll into a :class:`Delivery`, *asks* the
  target actor to handle it, and commits offsets only after the ask returned:
  at-least-once. If the handler fails, the pump crashes without committing;
  its supervisor restarts it and the records are delivered again. A watchdog
  crashes it too when the Kafka client wedges (a call that never returns, or
  a group that never finishes rejoining after a broker outage).
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

from actors.runtime import Directory, SupervisedActor, Supervision, Ticker, backoff_strategy, schedule, tell
from transport import protocol
from transport.broker import TOPICS, KafkaSettings, ensure_topics

log = logging.getLogger("evcharging.kafka")

Decoder = Callable[[bytes], protocol.Message]


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


@dataclass(frozen=True, slots=True)
class _Retry:
    pass


@dataclass(frozen=True, slots=True)
class _Acked:
    pass


class Publisher(SupervisedActor):
    """The only Kafka producer of an actor system."""

    def __init__(
        self,
        settings: KafkaSettings,
        *,
        component: str = "publisher",
        max_pending: int = 100_000,
        linger_ms: int = 1,
        encode: Callable[[protocol.Message], bytes] = protocol.encode,
        supervision: Supervision | None = None,
    ) -> None:
        super().__init__(supervision=supervision)
        self.settings = settings
        self.component = component
        self.max_pending = max_pending
        self.linger_ms = linger_ms
        self._encode = encode
        self._producer: Any = None
        self._backlog: deque[Publish] = deque()
        self._retry_timer: threading.Timer | None = None
        self._delay = backoff_strategy(0.2, 2.0)
        self._outage_attempts = 0
        self._in_flight = 0  # handed to the producer, neither acked nor failed (acks counted apart)
        self._acks = 0  # counted by the producer's I/O thread, under _acks_lock
        self._acks_lock = threading.Lock()
        self._stats = {"sent": 0, "acked": 0, "failures": 0, "producers": 0}

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
            case _SendFailed(publish, error):
                self._in_flight -= 1
                self._stats["failures"] += 1
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
            retries=3,
            max_block_ms=self.settings.max_block_ms,
            request_timeout_ms=self.settings.request_timeout_ms,
            delivery_timeout_ms=max(self.settings.request_timeout_ms * 2, 10_000),
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
            tell(p.notify, PublishFailed(p.token, f"cannot encode {type(p.message).__name__}: {exc}"))
            return True
        try:
            future = self._producer.send(self.settings.topic(p.topic), key=p.key.encode(), value=value)
        except Exception as exc:  # metadata timeout, closed producer, missing topic
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
            tell(me, _SendFailed(p, str(exc) or type(exc).__name__))

        future.add_callback(on_ok)
        future.add_errback(on_err)
        return True

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


@dataclass(frozen=True, slots=True)
class Delivery:
    """Everything one poll returned; the target answers when it is handled."""

    items: tuple[Inbound, ...]


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
        decode: Decoder = protocol.decode,
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
        self._decode = decode
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
            while not self._halt.is_set():
                self._busy_since = time.monotonic()
                batch = consumer.poll(timeout_ms=self.poll_ms, max_records=self.max_records)
                self._busy_since = None
                assigned = bool(consumer.assignment())
                if self.group_id is not None:
                    self._unassigned_since = None if assigned else (self._unassigned_since or time.monotonic())
                if not self._ready.is_set() and assigned:
                    self._positioned()
                if not batch:
                    continue
                items = tuple(self._inbound(r) for records in batch.values() for r in records)
                if not self._deliver(Delivery(items)):
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
        try:
            return Inbound(topic, key, self._decode(record.value or b""), None, record.partition, record.offset, sent)
        except Exception as exc:
            return Inbound(topic, key, None, str(exc), record.partition, record.offset, sent)

    def _deliver(self, delivery: Delivery) -> bool:
        """Ask the target until it handled the delivery; False when stopping."""
        waited = 0.0
        while not self._halt.is_set():
            ref = self.directory.get(self.target)
            if ref is None:  # the target is being restarted: wait, commit nothing
                self._halt.wait(0.05)
                waited += 0.05
                if waited >= self.ask_timeout:
                    raise TimeoutError(f"no actor named {self.target!r} to deliver to for {self.ask_timeout:g} s")
                continue
            try:
                ref.ask(delivery, timeout=self.ask_timeout)
                return True
            except pykka.ActorDeadError:
                continue
        return False


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
