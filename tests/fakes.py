"""In-memory doubles of the Kafka seam (``worker.kafka``'s Protocols), no broker.

They behave as the Protocols say, including time: a send returns a pending
:class:`Delivery` that the broker acknowledges ``latency_s`` later, and
``poll``/``flush`` resolve only what is due within their timeout (waiting
that long on the fake's clock); a consumer's ``poll`` waits its timeout when
it has nothing to give. Rebalance callbacks run inside ``poll``, as the real
clients run them, and the offsets ``on_revoked`` returns are committed there.
A commit may be deferred, every transaction step can fail, and so can an
abort. :class:`FakeKafka` wires the three into a :class:`~worker.kafka.Clients`
for a whole :class:`~worker.loop.Worker`.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from typing import Any

from worker.kafka import (
    ClientConfig,
    Clients,
    Delivery,
    KafkaFailure,
    Metadata,
    RebalanceHandler,
    Record,
    TopicPartition,
    TransactionFailed,
    metadata_for,
)

Group = dict[TopicPartition, int]  # what the broker holds as the group's committed offsets


class Clock:
    """Virtual time: ``sleep`` moves ``now`` on at once (for tests of one thread)."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def monotonic(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += max(0.0, seconds)


class RealClock:
    def monotonic(self) -> float:
        return time.monotonic()

    def sleep(self, seconds: float) -> None:
        time.sleep(max(0.0, seconds))


@dataclass
class Sent:
    topic: str
    key: bytes | None
    value: bytes
    headers: list[tuple[Any, bytes | None]]
    partition: int | None
    delivery: Delivery
    due: float  # when the broker acknowledges it

    def header(self, name: str) -> str | None:
        for k, v in self.headers:
            if k == name:
                return None if v is None else v.decode()
        return None


class FakeProducer:
    """Sends pending until ``poll``/``flush`` find them due; ``fail``: a step raises once."""

    def __init__(
        self,
        group: Group,
        name: str = "p1",
        *,
        clock: Clock | RealClock | None = None,
        latency_s: float = 0.0,
    ) -> None:
        self.group = group
        self.name = name
        self.clock = clock or Clock()
        self.latency_s = latency_s
        self.lock = threading.RLock()  # inference threads send too
        self.calls: list[str] = []
        self.timeouts: list[tuple[str, float]] = []
        self.sent: list[tuple[bytes, Delivery]] = []
        self.records: list[Sent] = []
        self.refuse: dict[bytes, BaseException] = {}  # value -> the error its delivery gets
        self.refuse_topic: dict[str, BaseException] = {}  # topic -> the error of every send
        # topic -> its max.message.bytes: the broker checks it against each whole batch
        # (a record batch: what one poll/flush delivers to one partition, in order, cut at
        # ``batch_size`` like librdkafka's batch.size) and refuses every record of a
        # batch over it as too large.
        self.max_bytes: dict[str, int] = {}
        self.batch_size = 1_000_000  # librdkafka's default batch.size
        self.hold: set[bytes] = set()  # values whose delivery never comes back
        self.hold_all = False  # no delivery comes back while set
        self.fail: dict[str, BaseException] = {}  # step -> raised on its next call
        # kafka-python's fault: commit_transaction returns although a send failed,
        # and nothing lands.
        self.lenient = False
        # The transaction lands, then commit_transaction raises all the same (a timeout).
        self.land_then_fail: BaseException | None = None
        self.in_txn = False
        self.txn: list[bytes] = []
        self.txn_offsets: tuple[dict[TopicPartition, int], Any, Metadata] | None = None
        self.transactions: list[tuple[list[bytes], dict[TopicPartition, int], Any, Metadata]] = []
        self.landed: list[Sent] = []  # acknowledged outside transactions, or committed in one
        self._txn_records: list[Sent] = []
        self.closed = False

    def _step(self, name: str) -> None:
        self.calls.append(name)
        if name in self.fail:
            raise self.fail.pop(name)

    def _held(self, s: Sent) -> bool:
        return self.hold_all or s.value in self.hold

    def _error(self, s: Sent) -> BaseException | None:
        return self.refuse_topic.get(s.topic, self.refuse.get(s.value))

    def _too_large(self, due: list[Sent]) -> set[int]:
        """The ids of the records in ``due`` whose batch the broker refuses as too large."""
        refused: set[int] = set()
        lines: dict[tuple[str, int | None], list[Sent]] = {}
        for s in due:
            lines.setdefault((s.topic, s.partition), []).append(s)
        for (topic, _), line in lines.items():
            limit = self.max_bytes.get(topic)
            if limit is None:
                continue
            batch: list[Sent] = []
            for s in [*line, None]:
                size = sum(len(b.value) for b in batch)
                if s is None or (batch and size + len(s.value) > self.batch_size):
                    if size > limit:
                        refused.update(id(b) for b in batch)
                    batch = []
                if s is not None:
                    batch.append(s)
        return refused

    def _resolve(self, timeout_s: float, *, all_of_them: bool) -> int:
        """Acknowledge what is due, waiting up to ``timeout_s`` (for one, or for all)."""
        deadline = self.clock.monotonic() + timeout_s
        while True:
            with self.lock:
                now = self.clock.monotonic()
                resolved, left, next_due = 0, 0, None
                due: list[Sent] = []
                for s in self.records:
                    if s.delivery.done:
                        continue
                    if self._held(s) or s.due > now:
                        left += 1
                        if not self._held(s):
                            next_due = s.due if next_due is None else min(next_due, s.due)
                        continue
                    due.append(s)
                too_large = self._too_large(due)
                for s in due:
                    error = self._error(s)
                    if id(s) in too_large:
                        error = KafkaFailure("message too large", name="MSG_SIZE_TOO_LARGE")
                    s.delivery.resolve(error)
                    resolved += 1
                    if error is None and not self.in_txn:
                        self.landed.append(s)
            if not left or now >= deadline or (resolved and not all_of_them):
                return left
            wake = deadline if next_due is None else min(deadline, next_due)
            self.clock.sleep(min(wake - now, 0.01))

    def send(
        self,
        topic: str,
        value: bytes,
        key: bytes | None,
        headers: list[tuple[Any, bytes | None]],
        partition: int | None = None,
    ) -> Delivery:
        with self.lock:
            self._step("send")
            d = Delivery()
            s = Sent(
                topic,
                key,
                value,
                list(headers),
                partition,
                d,
                self.clock.monotonic() + self.latency_s,
            )
            self.sent.append((value, d))
            self.records.append(s)
            if self.in_txn:
                self.txn.append(value)
                self._txn_records.append(s)
            return d

    def poll(self, timeout_s: float = 0.0) -> None:
        self.calls.append("poll")
        self.timeouts.append(("poll", timeout_s))
        self._resolve(timeout_s, all_of_them=False)

    def flush(self, timeout_s: float) -> int:
        self.calls.append("flush")
        self.timeouts.append(("flush", timeout_s))
        return self._resolve(timeout_s, all_of_them=True)

    def init_transactions(self) -> None:
        self._step("init_transactions")

    def begin_transaction(self) -> None:
        self._step("begin_transaction")
        assert not self.in_txn, "begin inside an open transaction"
        self.in_txn, self.txn, self.txn_offsets, self._txn_records = True, [], None, []

    def send_offsets_to_transaction(
        self, offsets: Mapping[TopicPartition, int], group_metadata: Any, metadata: Metadata = ""
    ) -> None:
        self._step("send_offsets_to_transaction")
        assert self.in_txn
        self.txn_offsets = (dict(offsets), group_metadata, metadata)

    def commit_transaction(self) -> None:
        self._step("commit_transaction")
        assert self.in_txn
        self._resolve(0.0, all_of_them=True)
        unsure = any(s.delivery.error is not None or not s.delivery.done for s in self._txn_records)
        if unsure and not self.lenient:
            raise TransactionFailed("a send failed or timed out", name="_DELIVERY_FAILED")
        assert self.txn_offsets is not None
        self.in_txn = False
        if unsure:
            return  # lenient: "committed", and nothing landed
        self.transactions.append((self.txn, *self.txn_offsets))
        self.landed.extend(self._txn_records)
        self.group.update(self.txn_offsets[0])
        if self.land_then_fail is not None:
            raise self.land_then_fail

    def abort_transaction(self) -> None:
        self._step("abort_transaction")
        self.in_txn = False
        # What the aborted transaction sent is settled (and never lands).
        for s in self._txn_records:
            if not s.delivery.done:
                s.delivery.resolve(TransactionFailed("aborted"))

    def close(self) -> None:
        self.calls.append("close")
        self.closed = True


class FakeConsumer:
    """One group member over in-memory partitions (``topics``: topic -> its records)."""

    def __init__(
        self,
        group: Group,
        assigned: Collection[TopicPartition] = (),
        *,
        clock: Clock | RealClock | None = None,
    ) -> None:
        self.group = group
        self.clock = clock or Clock()
        self.lock = threading.RLock()
        self.assigned = set(assigned)
        self.log: dict[TopicPartition, list[Record]] = {}  # what each partition holds
        self.metadata_of: dict[TopicPartition, str] = {}  # committed metadata per partition
        self.positions: dict[TopicPartition, int] = {}
        self.paused: set[TopicPartition] = set()
        self.pauses: list[set[TopicPartition]] = []  # every pause call
        self.resumes: list[set[TopicPartition]] = []  # every resume call
        self.asked: list[list[TopicPartition]] = []  # calls to committed()
        self.committed_fails: BaseException | None = None  # raised by every committed()
        self.committed_errors: list[BaseException] = []  # raised by the next ones, in order
        self.commits: list[tuple[dict[TopicPartition, int], str]] = []
        self.fail: list[BaseException] = []  # raised by the next commits, in order
        self.seeks: list[tuple[TopicPartition, int | None]] = []
        self.metadata = object()
        self.handler: RebalanceHandler | None = None
        self._rebalances: list[tuple[str, list[TopicPartition]]] = []
        self._late: list[tuple[str, list[TopicPartition]]] = []
        self.polls = 0
        self.closed = False

    # -- what the test does ------------------------------------------------------

    def append(
        self,
        tp: TopicPartition,
        value: bytes,
        key: bytes | None = None,
        headers: list[tuple[Any, bytes | None]] | None = None,
    ) -> Record:
        with self.lock:
            line = self.log.setdefault(tp, [])
            record = Record(tp.topic, tp.partition, len(line), key, value, list(headers or []), 1)
            line.append(record)
            return record

    def rebalance(self, kind: str, tps: Collection[TopicPartition], *, late: bool = False) -> None:
        """``assign``, ``revoke`` or ``lose`` ``tps`` inside the next ``poll``; ``late``:
        after that poll fetched its records, which it still returns (librdkafka serves a
        rebalance queued behind fetched messages inside the same ``consume()``)."""
        with self.lock:
            (self._late if late else self._rebalances).append((kind, sorted(tps)))

    # -- the Protocol ------------------------------------------------------------

    def subscribe(self, topics: list[str], handler: RebalanceHandler) -> None:
        self.handler = handler
        self.rebalance("assign", [tp for tp in self.log if tp.topic in topics])

    def _run_rebalances(self, *, late: bool = False) -> None:
        with self.lock:
            if late:
                events, self._late = self._late, []
            else:
                events, self._rebalances = self._rebalances, []
        assert self.handler is not None or not events
        for kind, tps in events:
            assert self.handler is not None
            if kind == "assign":
                self.assigned |= set(tps)
                for tp in tps:
                    self.positions[tp] = self.group.get(tp, 0)
                self.handler.on_assigned(tps)
            elif kind == "revoke":
                try:
                    offsets, metadata = self.handler.on_revoked(tps)
                    if offsets:
                        self.commit(offsets, metadata)
                finally:
                    self.assigned -= set(tps)
                    self.paused -= set(tps)
            else:
                self.assigned -= set(tps)
                self.paused -= set(tps)
                self.handler.on_lost(tps)

    def poll(self, max_records: int, timeout_s: float) -> list[Record]:
        self.polls += 1
        self._run_rebalances()
        deadline = self.clock.monotonic() + timeout_s
        while True:
            with self.lock:
                got: list[Record] = []
                for tp in sorted(self.assigned - self.paused):
                    line, at = self.log.get(tp, []), self.positions.get(tp, 0)
                    take = line[at : at + max_records - len(got)]
                    got.extend(take)
                    self.positions[tp] = at + len(take)
            if got or self.clock.monotonic() >= deadline:
                self._run_rebalances(late=True)
                return got
            self.clock.sleep(min(0.005, deadline - self.clock.monotonic()))

    def assign(self, positions: Mapping[TopicPartition, int]) -> None:
        self.assigned = set(positions)
        self.positions.update(positions)

    def position(self, tp: TopicPartition) -> int | None:
        return self.positions.get(tp)

    def assignment(self) -> set[TopicPartition]:
        return set(self.assigned)

    def pause(self, tps: Collection[TopicPartition]) -> None:
        self.pauses.append(set(tps))
        self.paused |= set(tps)

    def resume(self, tps: Collection[TopicPartition]) -> None:
        self.resumes.append(set(tps))
        self.paused -= set(tps)

    def commit(self, offsets: Mapping[TopicPartition, int], metadata: Metadata = "") -> None:
        if self.fail:
            raise self.fail.pop(0)
        self.commits.append((dict(offsets), metadata))
        self.group.update(offsets)
        for tp in offsets:
            self.metadata_of[tp] = metadata_for(metadata, tp)

    def committed(self, tps: Collection[TopicPartition]) -> dict[TopicPartition, int | None]:
        self.asked.append(sorted(tps))
        if self.committed_fails is not None:
            raise self.committed_fails
        if self.committed_errors:
            raise self.committed_errors.pop(0)
        return {tp: self.group.get(tp) for tp in tps}

    def committed_metadata(
        self, tps: Collection[TopicPartition]
    ) -> dict[TopicPartition, tuple[int | None, str]]:
        return {tp: (self.group.get(tp), self.metadata_of.get(tp, "")) for tp in tps}

    def watermarks(self, tp: TopicPartition) -> tuple[int, int] | None:
        return 0, len(self.log.get(tp, []))

    def seek(self, tp: TopicPartition, offset: int | None) -> None:
        self.seeks.append((tp, offset))
        if offset is not None:
            self.positions[tp] = offset

    def lag(self, tp: TopicPartition) -> int | None:
        return len(self.log.get(tp, [])) - self.group.get(tp, 0)

    def group_metadata(self) -> Any:
        return self.metadata

    def close(self) -> None:
        self.closed = True


class FakeAdmin:
    def __init__(self) -> None:
        self.partition_counts: dict[str, int] = {}
        self.limits: dict[str, int] = {}  # topic -> max.message.bytes
        self.closed = False

    def partitions(self, topic: str) -> int | None:
        return self.partition_counts.get(topic)

    def max_message_bytes(self, topics: Collection[str]) -> dict[str, int]:
        return {t: self.limits[t] for t in topics if t in self.limits}

    def close(self) -> None:
        self.closed = True


class FakeKafka:
    """A broker's worth of fakes on real time, handed to a Worker as its ``clients``."""

    def __init__(self, *, latency_s: float = 0.0) -> None:
        self.clock = RealClock()
        self.group: Group = {}
        self.consumer = FakeConsumer(self.group, clock=self.clock)
        self.admin = FakeAdmin()
        self.producers: list[FakeProducer] = []
        self.latency_s = latency_s
        self.configs: list[ClientConfig] = []
        self.setup: Callable[[FakeProducer], None] = lambda p: None  # each producer, as opened

    @property
    def producer(self) -> FakeProducer:
        """The producer opened last (exactly-once opens a fresh one after a failed abort)."""
        return self.producers[-1]

    def _open_producer(self, config: ClientConfig) -> FakeProducer:
        self.configs.append(config)
        p = FakeProducer(
            self.group, f"p{len(self.producers) + 1}", clock=self.clock, latency_s=self.latency_s
        )
        if config.batch_max_bytes is not None:
            p.batch_size = min(p.batch_size, config.batch_max_bytes)
        self.setup(p)
        self.producers.append(p)
        return p

    def _open(self, client: Any) -> Callable[[ClientConfig], Any]:
        def open_(config: ClientConfig) -> Any:
            self.configs.append(config)
            return client

        return open_

    @property
    def clients(self) -> Clients:
        return Clients(
            consumer=self._open(self.consumer),
            producer=self._open_producer,
            admin=self._open(self.admin),
        )

    def landed(self, topic: str) -> list[Sent]:
        """What the broker holds in ``topic``: acknowledged, or committed in a transaction."""
        return [s for p in self.producers for s in p.landed if s.topic == topic]
