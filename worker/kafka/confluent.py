"""The librdkafka backend (confluent-kafka), the default.

librdkafka runs its network I/O on its own threads; rebalance callbacks,
delivery reports and errors are served from ``poll()``/``consume()``/``flush()``
on the calling thread, so the rebalance handler runs on the loop's thread.
Mind ``Consumer.consume(n, timeout)``: it waits for all ``n`` records or the
whole timeout, so :meth:`ConfluentConsumer.poll` waits for the first record only
and takes the rest of what is buffered without waiting.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Collection, Mapping
from typing import Any, ClassVar

import confluent_kafka as ck
from confluent_kafka.admin import AdminClient, ConfigResource

from worker.errors import BrokerAccessError, ConfigError, FatalError
from worker.kafka import (
    ClientConfig,
    CommitDeferred,
    Delivery,
    KafkaFailure,
    Metadata,
    ProducerFenced,
    RebalanceHandler,
    Record,
    TopicPartition,
    TransactionFailed,
    fmt_offsets,
    fmt_tps,
    metadata_for,
)
from worker.kafka.deadline import CallDeadline, CallPending, WaitLimit
from worker.kafka.options import for_clients

__all__ = [
    "ConfluentAdmin",
    "ConfluentConsumer",
    "ConfluentProducer",
    "open_admin",
    "open_consumer",
    "open_producer",
    "txn_deadline_s",
]

log = logging.getLogger("worker.kafka")
# librdkafka's own words (its log lines, the errors poll() hands back): summarised
# when repeated (worker.observability.RepeatedLines).
client_log = logging.getLogger("worker.kafka.librdkafka")

# How long the loop waits for a commit before it goes back to polling (the commit goes
# on meanwhile, and every other commit is deferred until it returns).
COMMIT_WAIT_S = 5.0

_DEFERRED = {
    ck.KafkaError.REBALANCE_IN_PROGRESS,
    ck.KafkaError.ILLEGAL_GENERATION,
    ck.KafkaError.UNKNOWN_MEMBER_ID,
    ck.KafkaError._ASSIGNMENT_LOST,
    ck.KafkaError._STATE,
    ck.KafkaError.NOT_COORDINATOR,
    ck.KafkaError.COORDINATOR_NOT_AVAILABLE,
    ck.KafkaError.COORDINATOR_LOAD_IN_PROGRESS,
    ck.KafkaError._WAIT_COORD,
    ck.KafkaError.REQUEST_TIMED_OUT,
    ck.KafkaError._TIMED_OUT,
    ck.KafkaError._TRANSPORT,
}
_ACCESS = {
    ck.KafkaError._AUTHENTICATION,
    ck.KafkaError.SASL_AUTHENTICATION_FAILED,
    ck.KafkaError.TOPIC_AUTHORIZATION_FAILED,
    ck.KafkaError.GROUP_AUTHORIZATION_FAILED,
    ck.KafkaError.CLUSTER_AUTHORIZATION_FAILED,
    ck.KafkaError.TRANSACTIONAL_ID_AUTHORIZATION_FAILED,
}
_TLS_MARKERS = ("certificate verify failed", "SSL handshake failed", "ssl.ca.location")


def _error_of(exc: BaseException) -> ck.KafkaError | None:
    arg = exc.args[0] if exc.args else None
    return arg if isinstance(arg, ck.KafkaError) else None


def _failure(err: ck.KafkaError, kind: type[KafkaFailure] = KafkaFailure) -> KafkaFailure:
    return kind(err.str(), retriable=bool(err.retriable()), name=err.name())


class _Access:
    """The first refusal librdkafka reports through ``error_cb`` (login, certificate)."""

    def __init__(self, config: ClientConfig) -> None:
        self.config = config
        self.failure: str | None = None

    def __call__(self, err: ck.KafkaError) -> None:
        text = err.str()
        where, props = self.config.bootstrap_servers, self.config.properties
        if self.failure is None:
            if err.code() in _ACCESS:
                self.failure = (
                    f"authentication failed at {where} for user "
                    f"{props.get('sasl.username', '?')!r} ({props.get('security.protocol')}, "
                    f"{props.get('sasl.mechanism', '?')}): {text.split(': ', 1)[-1]}; check "
                    "KAFKA_SASL_USERNAME and KAFKA_SASL_PASSWORD / KAFKA_SASL_PASSWORD_FILE"
                )
            elif any(m in text for m in _TLS_MARKERS):
                reason = "certificate verify failed" if "verify failed" in text else text
                self.failure = (
                    f"TLS handshake with {where} failed: {reason}; check KAFKA_SSL_CAFILE "
                    "(the CA that signed the broker's certificate) and the broker's host name"
                )
        if err.fatal():
            log.error("Kafka client: fatal error: %s", text)
        elif self.config.on_error is not None:
            self.config.on_error(text)


def _common(config: ClientConfig, access: _Access) -> dict[str, Any]:
    return {
        "bootstrap.servers": config.bootstrap_servers,
        "client.id": config.client_id,
        "message.max.bytes": config.max_message_bytes + 64 * 1024,
        "topic.metadata.refresh.interval.ms": config.metadata_max_age_ms,
        "error_cb": access,
        "logger": client_log,
    }


def _statistics(conf: dict[str, Any], config: ClientConfig) -> None:
    """Hand librdkafka's statistics to ``on_stats`` when statistics.interval.ms asks for them."""
    if config.on_stats is not None and int(conf.get("statistics.interval.ms", 0) or 0) > 0:
        conf["stats_cb"] = config.on_stats


def _build(factory: Any, conf: dict[str, Any]) -> Any:
    try:
        return factory(conf)
    except (ck.KafkaException, ValueError, TypeError) as exc:
        text = str(exc.args[0].str() if _error_of(exc) else exc)
        raise ConfigError("--kafka-option", f"refused by librdkafka: {text}") from None


def _reach(client: Any, access: _Access, total_s: float = 30.0) -> None:
    """Wait until the cluster answers a metadata request, or fail fast on a refusal."""
    deadline = time.monotonic() + total_s
    while True:
        try:
            client.list_topics(timeout=min(1.0, max(0.1, deadline - time.monotonic())))
            return
        except ck.KafkaException:
            pass
        if hasattr(client, "poll"):
            client.poll(0)  # serve error_cb
        if access.failure is not None:
            raise BrokerAccessError(access.failure)
        if time.monotonic() >= deadline:
            raise FatalError(
                f"no answer from the Kafka cluster at {access.config.bootstrap_servers} "
                f"within {total_s:.0f} s"
            )


def _ctps(
    offsets: Mapping[TopicPartition, int], metadata: Metadata = ""
) -> list[ck.TopicPartition]:
    return [
        ck.TopicPartition(tp.topic, tp.partition, o, metadata=metadata_for(metadata, tp))
        for tp, o in offsets.items()
    ]


def _tps(partitions: list[ck.TopicPartition]) -> list[TopicPartition]:
    return [TopicPartition(p.topic, p.partition) for p in partitions]


class ConfluentConsumer:
    def __init__(self, config: ClientConfig, overrides: Mapping[str, str]) -> None:
        self._access = _Access(config)
        fetch_max = max(config.max_message_bytes, 64 * 1024 * 1024)
        conf = {
            **_common(config, self._access),
            "group.id": config.group_id,
            # Offsets are committed by the loop once outputs are acknowledged.
            "enable.auto.commit": False,
            "enable.auto.offset.store": False,
            # A new group starts at the beginning: nothing published before is skipped.
            "auto.offset.reset": "earliest",
            # Inputs written transactionally upstream are read only once committed.
            "isolation.level": "read_committed",
            "partition.assignment.strategy": "cooperative-sticky",
            "max.partition.fetch.bytes": config.max_message_bytes,
            "fetch.max.bytes": fetch_max,
            # librdkafka's defaults (a 64 MiB local queue, then a 1 s fetch backoff once
            # it is full) make a loop that is slower than the fetcher run in bursts: a
            # queue's worth of records, then up to a second with none (docs/performance.md).
            "queued.max.messages.kbytes": 16 * 1024,
            "fetch.queue.backoff.ms": 10,
            "receive.message.max.bytes": 0,  # set below
            **for_clients(config.properties, "consumer"),
            **overrides,
        }
        # librdkafka's own consistency rules, kept whatever fetch.max.bytes the user set.
        fetch = int(conf["fetch.max.bytes"])
        conf["message.max.bytes"] = min(int(conf["message.max.bytes"]), fetch)
        conf["receive.message.max.bytes"] = max(
            int(conf["receive.message.max.bytes"]), fetch + 1024 * 1024
        )
        _statistics(conf, config)
        self._c = _build(ck.Consumer, conf)
        self._commits = WaitLimit(COMMIT_WAIT_S, "kafka-commit")  # why: deadline.py
        self._handler: RebalanceHandler | None = None
        # Kept from the rebalance callbacks: librdkafka answers assignment() through
        # the group thread's queue, a round trip on every turn of the loop.
        self._assignment: set[TopicPartition] = set()
        _reach(self._c, self._access)

    # -- group membership --------------------------------------------------------

    def subscribe(self, topics: list[str], handler: RebalanceHandler) -> None:
        self._handler = handler
        self._c.subscribe(
            topics, on_assign=self._assigned, on_revoke=self._revoked, on_lost=self._lost
        )

    def assign(self, positions: Mapping[TopicPartition, int]) -> None:
        """Read exactly these partitions from these offsets (no group rebalancing)."""
        self._c.assign(_ctps(positions))
        self._assignment = set(positions)

    def position(self, tp: TopicPartition) -> int | None:
        (got,) = self._c.position([ck.TopicPartition(tp.topic, tp.partition)])
        return int(got.offset) if got.offset >= 0 else None

    def _assigned(self, _c: Any, partitions: list[ck.TopicPartition]) -> None:
        self._assignment |= set(_tps(partitions))  # incremental (cooperative) or whole
        if partitions and self._handler is not None:
            self._handler.on_assigned(_tps(partitions))

    def _revoked(self, _c: Any, partitions: list[ck.TopicPartition]) -> None:
        try:
            self._revoke(_tps(partitions))
        finally:
            self._assignment -= set(_tps(partitions))

    def _revoke(self, tps: list[TopicPartition]) -> None:
        if not tps or self._handler is None:
            return
        offsets, metadata = self._handler.on_revoked(tps)
        if not offsets:
            return
        try:
            self._commit(offsets, metadata, inline=True)
            log.info("revoked %s: committed %s", fmt_tps(tps), fmt_offsets(offsets))
        except KafkaFailure as exc:
            # Answered but not committed: the next owner answers them again
            # (at-least-once). Raising here would only abort the rebalance.
            log.warning("revoked %s: commit failed (%s); answers may repeat", fmt_tps(tps), exc)

    def _lost(self, _c: Any, partitions: list[ck.TopicPartition]) -> None:
        self._assignment -= set(_tps(partitions))
        if partitions and self._handler is not None:
            self._handler.on_lost(_tps(partitions))

    # -- records -------------------------------------------------------------------

    def poll(self, max_records: int, timeout_s: float) -> list[Record]:
        messages = self._c.consume(max_records, 0)
        if not messages:
            first = self._c.poll(timeout_s)
            if first is None:
                return []
            messages = [first, *self._c.consume(max_records - 1, 0)] if max_records > 1 else [first]
        records = []
        for m in messages:
            err = m.error()
            if err is not None:
                if err.code() == ck.KafkaError._PARTITION_EOF:
                    continue
                if err.fatal():
                    raise FatalError(f"Kafka consumer: {err.str()}")
                client_log.warning("Kafka consumer: %s", err.str())
                continue
            records.append(_record(m))
        return records

    def assignment(self) -> set[TopicPartition]:
        return set(self._assignment)

    def pause(self, tps: Collection[TopicPartition]) -> None:
        if tps:
            self._c.pause([ck.TopicPartition(t, p) for t, p in tps])

    def resume(self, tps: Collection[TopicPartition]) -> None:
        if tps:
            self._c.resume([ck.TopicPartition(t, p) for t, p in tps])

    # -- offsets ---------------------------------------------------------------------

    def commit(self, offsets: Mapping[TopicPartition, int], metadata: Metadata = "") -> None:
        """Commit on the commit thread, waiting at most COMMIT_WAIT_S."""
        self._commit(offsets, metadata, inline=False)

    def _commit(
        self, offsets: Mapping[TopicPartition, int], metadata: Metadata, *, inline: bool
    ) -> None:
        """``inline`` inside a rebalance callback: librdkafka serves a commit made there
        on the calling thread (from another thread it waits for the callback to
        return: a commit thread would wait out its limit for nothing)."""
        ctps = _ctps(offsets, metadata)
        try:
            result = (
                self._sync_commit(ctps) if inline else self._commits.call(self._sync_commit, ctps)
            )
        except CallPending as exc:
            # Deferred: the offsets stay to commit; the commit under way goes on and,
            # once the rebalance is served, lands or fails (with the old generation).
            raise CommitDeferred(str(exc), retriable=True, name="COMMIT_PENDING") from None
        except ck.KafkaException as exc:
            err = _error_of(exc)
            if err is None:
                raise KafkaFailure(str(exc)) from None
            if err.code() in _DEFERRED or err.retriable():
                raise _failure(err, CommitDeferred) from None
            raise _failure(err) from None
        for tp in result or ():
            if tp.error is not None:
                kind = CommitDeferred if tp.error.code() in _DEFERRED else KafkaFailure
                raise _failure(tp.error, kind)

    def _sync_commit(self, offsets: list[ck.TopicPartition]) -> Any:
        return self._c.commit(offsets=offsets, asynchronous=False)

    def committed(self, tps: Collection[TopicPartition]) -> dict[TopicPartition, int | None]:
        if not tps:
            return {}
        try:
            got = self._c.committed([ck.TopicPartition(t, p) for t, p in tps], timeout=10)
        except ck.KafkaException as exc:
            raise KafkaFailure(str(exc), retriable=True) from None
        return {
            TopicPartition(p.topic, p.partition): (p.offset if p.offset >= 0 else None) for p in got
        }

    def committed_metadata(
        self, tps: Collection[TopicPartition]
    ) -> dict[TopicPartition, tuple[int | None, str]]:
        if not tps:
            return {}
        try:
            got = self._c.committed([ck.TopicPartition(t, p) for t, p in tps], timeout=10)
        except ck.KafkaException as exc:
            raise KafkaFailure(str(exc), retriable=True) from None
        return {
            TopicPartition(p.topic, p.partition): (
                p.offset if p.offset >= 0 else None,
                (p.metadata or "").rstrip("\x00"),  # librdkafka may store a trailing NUL
            )
            for p in got
        }

    def watermarks(self, tp: TopicPartition) -> tuple[int, int] | None:
        try:
            low, high = self._c.get_watermark_offsets(
                ck.TopicPartition(tp.topic, tp.partition), timeout=10, cached=False
            )
        except ck.KafkaException:
            return None
        return int(low), int(high)

    def seek(self, tp: TopicPartition, offset: int | None) -> None:
        target = ck.OFFSET_BEGINNING if offset is None else offset
        self._c.seek(ck.TopicPartition(tp.topic, tp.partition, target))

    def lag(self, tp: TopicPartition) -> int | None:
        ctp = ck.TopicPartition(tp.topic, tp.partition)
        try:
            _low, high = self._c.get_watermark_offsets(ctp, cached=True)
            (position,) = self._c.position([ctp])
        except ck.KafkaException:
            return None
        if high < 0 or position.offset < 0:
            return None
        return max(0, high - position.offset)

    def group_metadata(self) -> Any:
        return self._c.consumer_group_metadata()

    def close(self) -> None:
        try:
            self._c.close()
        finally:
            self._commits.close()


def _record(m: Any) -> Record:
    header_error = None
    try:
        headers = m.headers() or []
    except (UnicodeDecodeError, ValueError, TypeError, SystemError) as exc:
        # A header name that is not UTF-8: the client cannot hand it over.
        headers, header_error = [], f"a header name is not valid UTF-8 ({exc})"
    kind, ts = m.timestamp()
    return Record(
        m.topic(),
        m.partition(),
        m.offset(),
        m.key(),
        m.value(),
        headers,
        ts if kind != ck.TIMESTAMP_NOT_AVAILABLE else None,
        header_error,
    )


DEFAULT_BATCH_SIZE = 1_000_000  # librdkafka's batch.size


# Every transactional call's timeout, handed to librdkafka.
TXN_CALL_TIMEOUT_S = 30.0
# How long past that timeout (or transaction.timeout.ms, when longer) a transactional
# call may still take before its deadline ends the process (ConfluentProducer).
TXN_DEADLINE_MARGIN_S = 5.0
_STUCK = (
    "librdkafka ignored the call's timeout (librdkafka#5456: after connection resets "
    "send_offsets_to_transaction can block for minutes; fixed by librdkafka PR #5457, "
    "not in librdkafka {version}); exiting with status 1, as kill -9 would: offsets "
    "follow answers, so what was not committed is answered again after a restart"
)


def txn_deadline_s(conf: Mapping[str, Any], call_timeout_s: float, margin_s: float) -> float:
    """When a transactional call is taken for stuck: past its own timeout and past
    ``transaction.timeout.ms`` (by then the broker has aborted the transaction, so the
    call can no longer commit anything), plus ``margin_s``."""
    txn_timeout_s = int(conf.get("transaction.timeout.ms", 60_000)) / 1000
    return max(call_timeout_s, txn_timeout_s) + margin_s


class ConfluentProducer:
    """librdkafka's producer; a transactional one runs each transactional call under a
    :class:`~worker.kafka.deadline.CallDeadline`.

    The deadline is there for librdkafka#5456: after connection resets,
    ``send_offsets_to_transaction`` may block for minutes whatever its timeout, and
    the loop's thread with it (no answers, no commits; ``/healthz`` turns 503 only
    after 60 s without a pass of the loop, and a liveness probe waits for a few
    failures more). Past :func:`txn_deadline_s` (35 s with the defaults)
    the process logs one line naming the call and the issue and exits 1, which is
    as safe as kill -9 (offsets follow answers); after the orchestrator's restart,
    ``init_transactions`` aborts what the broker still holds open and the worker
    answers what was not committed. The margin,
    :data:`TXN_DEADLINE_MARGIN_S`, keeps a call that honours its timeout from being
    taken for stuck: librdkafka checks its timeouts on a timer, and its answer needs
    the caller's thread and the GIL back on a busy host. Remove the deadline once a
    librdkafka release carries the fix (PR #5457).
    """

    # The client class and the deadline's figures: a subclass may change them.
    client: ClassVar[type[ck.Producer]] = ck.Producer
    txn_call_timeout_s: ClassVar[float] = TXN_CALL_TIMEOUT_S
    txn_deadline_margin_s: ClassVar[float] = TXN_DEADLINE_MARGIN_S

    def __init__(self, config: ClientConfig, overrides: Mapping[str, str]) -> None:
        self._access = _Access(config)
        conf: dict[str, Any] = {
            **_common(config, self._access),
            "acks": "all",
            # Idempotence keeps per-partition order across retries.
            "enable.idempotence": True,
            "linger.ms": 1,
            # The Java client's partitioner, for answers whose partition is not chosen.
            "partitioner": "murmur2_random",
        }
        if config.transactional_id:
            conf["transactional.id"] = config.transactional_id
            # A killed worker's open transaction blocks read_committed readers
            # until it times out; a restart with the same id aborts it at once.
            conf["transaction.timeout.ms"] = 10_000
        conf.update(for_clients(config.properties, "producer"))
        conf.update(overrides)
        _statistics(conf, config)
        if config.batch_max_bytes is not None:
            batch = int(conf.get("batch.size", DEFAULT_BATCH_SIZE))
            conf["batch.size"] = max(1, min(batch, config.batch_max_bytes))
        self._p = _build(self.client, conf)
        self.transactional = bool(conf.get("transactional.id"))
        self._deadline: CallDeadline | None = None
        if self.transactional:
            self._deadline = CallDeadline(
                txn_deadline_s(conf, self.txn_call_timeout_s, self.txn_deadline_margin_s),
                _STUCK.format(version=ck.libversion()[0]),
            )
        _reach(self._p, self._access)

    def send(
        self,
        topic: str,
        value: bytes,
        key: bytes | None,
        headers: list[tuple[Any, bytes | None]],
        partition: int | None = None,
    ) -> Delivery:
        delivery = Delivery()

        def done(err: ck.KafkaError | None, _msg: Any) -> None:
            delivery.resolve(None if err is None else _failure(err))

        kwargs: dict[str, Any] = {"headers": headers, "on_delivery": done}
        if partition is not None:
            kwargs["partition"] = partition
        while True:
            try:
                self._p.produce(topic, value, key, **kwargs)
                return delivery
            except BufferError:
                self._p.poll(0.01)  # the local queue is full: serve deliveries, retry
            except ck.KafkaException as exc:
                err = _error_of(exc)
                delivery.resolve(_failure(err) if err else KafkaFailure(str(exc)))
                return delivery

    def poll(self, timeout_s: float = 0.0) -> None:
        self._p.poll(timeout_s)

    def flush(self, timeout_s: float) -> int:
        return int(self._p.flush(timeout_s))

    # -- transactions -------------------------------------------------------------

    def _txn(self, name: str, call: Any, *args: Any) -> None:
        watched = self._deadline.watch(name) if self._deadline else contextlib.nullcontext()
        try:
            with watched:
                call(*args)
        except ck.KafkaException as exc:
            err = _error_of(exc)
            if err is None:
                raise TransactionFailed(str(exc)) from None
            if err.fatal():
                raise ProducerFenced(f"transactional producer: {err.str()}") from None
            raise _failure(err, TransactionFailed) from None

    def init_transactions(self) -> None:
        # Fences any earlier producer with this id and aborts its open transaction.
        self._txn("init_transactions", self._p.init_transactions, self.txn_call_timeout_s)

    def begin_transaction(self) -> None:
        self._txn("begin_transaction", self._p.begin_transaction)

    def send_offsets_to_transaction(
        self, offsets: Mapping[TopicPartition, int], group_metadata: Any, metadata: Metadata = ""
    ) -> None:
        self._txn(
            f"send_offsets_to_transaction({fmt_offsets(offsets)})",
            self._p.send_offsets_to_transaction,
            _ctps(offsets, metadata),
            group_metadata,
            self.txn_call_timeout_s,
        )

    def commit_transaction(self) -> None:
        self._txn("commit_transaction", self._p.commit_transaction, self.txn_call_timeout_s)

    def abort_transaction(self) -> None:
        self._txn("abort_transaction", self._p.abort_transaction, self.txn_call_timeout_s)

    def close(self) -> None:
        try:
            self._p.flush(5)
        finally:
            if self._deadline is not None:
                self._deadline.close()


class ConfluentAdmin:
    def __init__(self, config: ClientConfig) -> None:
        access = _Access(config)
        conf = {**_common(config, access), **for_clients(config.properties, "admin")}
        conf.pop("message.max.bytes")
        conf.pop("topic.metadata.refresh.interval.ms")
        self._a = _build(AdminClient, conf)
        # The first client the worker opens: a refused login or TLS handshake is named
        # here at once, not after the topic-config reads time out.
        _reach(self._a, access)

    def partitions(self, topic: str) -> int | None:
        try:
            meta = self._a.list_topics(topic, timeout=10).topics.get(topic)
        except ck.KafkaException:
            return None
        if meta is None or meta.error is not None:
            return None
        return len(meta.partitions)

    def max_message_bytes(self, topics: Collection[str]) -> dict[str, int]:
        resources = [ConfigResource(ConfigResource.Type.TOPIC, t) for t in topics]
        limits: dict[str, int] = {}
        if not resources:
            return limits
        for resource, future in self._a.describe_configs(resources).items():
            try:
                entry = future.result(timeout=10).get("max.message.bytes")
            except (ck.KafkaException, TimeoutError) as exc:
                log.debug("max.message.bytes of %s unknown: %s", resource.name, exc)
                continue
            if entry is not None and entry.value is not None:
                limits[resource.name] = int(entry.value)
        return limits

    def close(self) -> None:
        pass


def open_consumer(config: ClientConfig, overrides: Mapping[str, str]) -> ConfluentConsumer:
    return ConfluentConsumer(config, overrides)


def open_producer(config: ClientConfig, overrides: Mapping[str, str]) -> ConfluentProducer:
    return ConfluentProducer(config, overrides)


def open_admin(config: ClientConfig) -> ConfluentAdmin:
    return ConfluentAdmin(config)
