"""Send dead letters back to the topic they came from, once their cause is fixed.

A dead letter is the request's key, value and headers unchanged, followed by
the headers the worker appended: ``error-type``, ``error-message``,
``source-topic``, ``source-partition``, ``source-offset``, ``model`` when it
knew the model, ``error-attempts`` after retries, and ``value-omitted`` when
the value was dropped for size. Redrive republishes the key, the value and the
request's own headers.

Which headers are the dead letter's (the rule, also in docs/producers.md):
the worker appends its headers as one block after the request's, and the
block starts with ``error-type``. So the block is everything from the *last*
``error-type`` header on (plus an ``error-attempts`` right before it); the
dead-letter header names are dropped inside the block only. A ``model`` (or a
``source-topic``, e.g. from an upstream worker) that the request itself
carried sits before the block and is kept byte for byte; a ``model`` the
worker added is inside it and is dropped. ``redrive-count`` is replaced by
its value plus one.

Resuming: the tool reads with a consumer group of its own on the dead-letter
topic (default ``inference-producer-redrive``) and commits that group's
offsets only after the records it republished are acknowledged, batch by
batch. A redrive that is killed and run again starts after the last commit:
records acknowledged in the killed run's last, uncommitted batch are sent a
second time, nothing is skipped. The committed offset is a cursor: dead
letters before it that did not match the filters (or were refused) are passed
over for good *by that group*; redrive them later with another ``--group-id``.

Only the records in the topic when the command starts are considered (their
end offsets are read first), so records that fail again and come back to the
dead-letter topic are not redriven in a loop.
"""

from __future__ import annotations

import sys
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime, timezone

from producers.clients import (
    Consumer,
    Headers,
    KafkaSettings,
    Producer,
    Record,
    TopicPartition,
)
from producers.errors import ProducerError, UsageError

__all__ = [
    "DEAD_LETTER_HEADERS",
    "MAX_REDRIVES",
    "REDRIVE_COUNT",
    "REDRIVE_GROUP",
    "DeadLetter",
    "RedriveStats",
    "format_table",
    "parse_dead_letter",
    "parse_time",
    "redrive",
]

REDRIVE_GROUP = "inference-producer-redrive"
REDRIVE_COUNT = "redrive-count"
# A record that failed after this many redrives is refused unless --force:
# its cause is not fixed, and sending it again only loops.
MAX_REDRIVES = 3
# How often progress is committed (and, for that, every send acknowledged).
COMMIT_INTERVAL_S = 1.0
DEAD_LETTER_HEADERS = frozenset({
    "error-type", "error-message", "error-attempts", "source-topic", "source-partition",
    "source-offset", "value-omitted", "model",
})
# Refusal reasons, as counted and reported.
REDRIVEN_TOO_OFTEN = f"redriven {MAX_REDRIVES} times already (--force sends it)"
VALUE_OMITTED = "value omitted from the dead letter (too large)"
NO_SOURCE = "no source-topic header (use --to)"
NOT_A_DEAD_LETTER = "no error-type header"


def _name(key: object) -> str | None:
    return key.lower() if isinstance(key, str) else None


def _text(value: bytes | None) -> str | None:
    if value is None:
        return None
    return bytes(value).decode("utf-8", "replace")


@dataclass(frozen=True)
class DeadLetter:
    """A dead letter taken apart: the request's headers, and what the worker added."""

    headers: Headers  # the request's own headers, redrive-count removed
    error_type: str
    model: str | None
    source_topic: str | None
    source_partition: int | None
    redrive_count: int
    value_omitted: bool


def parse_dead_letter(headers: Iterable[tuple[str, bytes | None]]) -> DeadLetter | None:
    """Split a dead letter's headers by the rule in the module docstring; None if not one."""
    items = list(headers)
    names = [_name(k) for k, _ in items]
    starts = [i for i, n in enumerate(names) if n == "error-type"]
    if not starts:
        return None
    start = starts[-1]
    if start > 0 and names[start - 1] == "error-attempts":
        start -= 1
    block = {n: v for n, (_, v) in zip(names[start:], items[start:], strict=True)
             if n in DEAD_LETTER_HEADERS}
    kept = [*items[:start], *(h for h, n in zip(items[start:], names[start:], strict=True)
                              if n not in DEAD_LETTER_HEADERS)]
    count = 0
    request_model: str | None = None
    for (_, value), n in zip(kept, [_name(k) for k, _ in kept], strict=True):
        if n == REDRIVE_COUNT:
            raw = _text(value) or ""
            count = int(raw) if raw.strip().isdigit() else count
        elif n in ("model", "mlserver-model"):
            request_model = _text(value)
    partition = _text(block.get("source-partition"))
    return DeadLetter(
        headers=[h for h in kept if _name(h[0]) != REDRIVE_COUNT],
        error_type=_text(block.get("error-type")) or "",
        model=_text(block["model"]) if "model" in block else request_model,
        source_topic=_text(block.get("source-topic")),
        source_partition=int(partition) if partition and partition.isdigit() else None,
        redrive_count=count,
        value_omitted="value-omitted" in block,
    )


def parse_time(text: str, flag: str) -> int:
    """``--since``/``--until``: epoch milliseconds, or ISO-8601 (no zone: UTC)."""
    raw = text.strip()
    if raw.isdigit():
        return int(raw)
    try:
        when = datetime.fromisoformat(raw[:-1] + "+00:00" if raw.endswith(("Z", "z")) else raw)
    except ValueError:
        raise UsageError(f"{flag} {text!r}: expected ISO-8601 (2026-12-01T15:30:00Z) "
                         "or milliseconds since the epoch") from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    return int(when.timestamp() * 1000)


@dataclass
class RedriveStats:
    """What one run did; ``table`` counts sent (or, dry, sendable) records per (type, model)."""

    table: Counter[tuple[str, str]] = field(default_factory=Counter)
    refused: Counter[str] = field(default_factory=Counter)
    passed_over: int = 0
    considered: int = 0
    remaining: int = 0  # offsets of the snapshot left for a later run (--max, stall)

    @property
    def sent(self) -> int:
        return sum(self.table.values())


def format_table(stats: RedriveStats, *, dry_run: bool) -> str:
    head = "would send" if dry_run else "sent"
    rows = sorted(stats.table.items(), key=lambda kv: (-kv[1], kv[0]))
    width = max([len("error-type"), *(len(t) for (t, _), _ in rows)])
    mwidth = max([len("model"), *(len(m) for (_, m), _ in rows)])
    lines = [f"{'error-type':<{width}}  {'model':<{mwidth}}  {head:>10}"]
    lines += [f"{t:<{width}}  {m:<{mwidth}}  {n:>10}" for (t, m), n in rows]
    lines.append(f"{'total':<{width}}  {'':<{mwidth}}  {stats.sent:>10}")
    if stats.passed_over:
        lines.append(f"not matching the filters (passed over): {stats.passed_over}")
    for reason, n in sorted(stats.refused.items()):
        lines.append(f"refused, {reason}: {n}")
    if stats.remaining:
        lines.append(f"left for a later run: at most {stats.remaining}")
    return "\n".join(lines)


@dataclass(frozen=True)
class _Filters:
    error_types: frozenset[str]
    model: str | None
    since_ms: int | None
    until_ms: int | None

    def match(self, record: Record, letter: DeadLetter) -> bool:
        if self.error_types and letter.error_type not in self.error_types:
            return False
        if self.model is not None and letter.model != self.model:
            return False
        ts = record.timestamp_ms
        if self.since_ms is not None and (ts is None or ts < self.since_ms):
            return False
        return self.until_ms is None or (ts is not None and ts < self.until_ms)


def redrive(settings: KafkaSettings, dlq_topic: str, *, to: str | None = None,
            error_types: Iterable[str] = (), model: str | None = None,
            since_ms: int | None = None, until_ms: int | None = None,
            max_records: int | None = None, dry_run: bool = False, force: bool = False,
            exactly_once: bool = False,
            group_id: str = REDRIVE_GROUP, rate: float | None = None,
            stall_s: float = 30.0, progress: bool | None = None) -> RedriveStats:
    """Republish the matching dead letters of ``dlq_topic`` (see the module docstring)."""
    if max_records is not None and max_records <= 0:
        raise UsageError(f"--max must be positive, got {max_records}")
    if rate is not None and rate <= 0:
        raise UsageError(f"--rate must be positive, got {rate}")
    if since_ms is not None and until_ms is not None and until_ms <= since_ms:
        raise UsageError("--until must be later than --since")
    filters = _Filters(frozenset(error_types), model, since_ms, until_ms)
    show = sys.stderr.isatty() if progress is None else progress
    with settings.consumer(group_id) as consumer:
        # one transactional id per group and topic: a second redrive of the same
        # group fences the first instead of sending the same records beside it.
        # Opened before the offsets are read: its init_transactions() aborts a
        # killed run's open transaction, whose pending offsets would otherwise
        # keep the group's committed offsets "unstable" (the fetch times out)
        # until the broker's transaction timeout.
        txn = f"{REDRIVE_GROUP}.{group_id}.{dlq_topic}" if exactly_once else None
        producer = None if dry_run else settings.producer(transactional_id=txn)
        sender = (None if producer is None
                  else _Sender(settings, producer, to, transactional=exactly_once))
        try:
            return _redrive(consumer, sender, dlq_topic, group_id, to, filters,
                            max_records=max_records, dry_run=dry_run, force=force,
                            rate=rate, stall_s=stall_s, show=show)
        finally:
            if producer is not None:
                producer.close()


def _redrive(consumer: Consumer, sender: _Sender | None, dlq_topic: str, group_id: str,
             to: str | None, filters: _Filters, *, max_records: int | None,
             dry_run: bool, force: bool,
             rate: float | None, stall_s: float, show: bool) -> RedriveStats:
    """The reading and sending of :func:`redrive`, with its clients opened."""
    from tqdm import tqdm

    stats = RedriveStats()
    tps = consumer.partitions(dlq_topic)
    marks = consumer.watermarks(tps)
    committed = consumer.committed(tps)
    # a committed offset below the low watermark: retention deleted the rest
    start = {tp: max(committed[tp] or 0, marks[tp][0]) for tp in tps}
    end = {tp: marks[tp][1] for tp in tps}
    todo = {tp for tp in tps if start[tp] < end[tp]}
    total = sum(end[tp] - start[tp] for tp in todo)
    # transaction markers take offsets too: "at most" so many dead letters
    print(f"redrive: at most {total} dead letter(s) in {dlq_topic} after group {group_id}'s "
          "offsets" + (" (dry run: nothing is sent or committed)" if dry_run else ""),
          file=sys.stderr)
    consumer.assign({tp: start[tp] for tp in todo})
    done: dict[TopicPartition, int] = {}  # next offset per partition, not yet committed
    next_offset = dict(start)
    began = time.monotonic()
    last_progress = last_commit = time.monotonic()
    try:
        with tqdm(total=total, unit="record", disable=not show, file=sys.stderr) as bar:
            while todo and (max_records is None or stats.sent < max_records):
                records = consumer.poll(0.5, max_records=1 if rate else 500)
                if records:
                    last_progress = time.monotonic()
                elif time.monotonic() - last_progress > stall_s:
                    print(f"redrive: nothing more could be read for {stall_s:g} s "
                          "(an open transaction?); stopping", file=sys.stderr)
                    break
                for r in records:
                    if r.tp not in todo or r.offset >= end[r.tp]:
                        continue  # past the snapshot: not ours this run
                    if max_records is not None and stats.sent >= max_records:
                        break  # the rest of this poll stays for a later run
                    if rate is not None:
                        pause = began + stats.sent / rate - time.monotonic()
                        if pause > 0:
                            time.sleep(pause)
                    _handle(r, filters, force, to, sender, stats)
                    stats.considered += 1
                    done[r.tp] = next_offset[r.tp] = r.offset + 1
                    bar.update(1)
                    if r.offset + 1 >= end[r.tp]:
                        todo.discard(r.tp)
                    if rate is not None:  # paced: each record is its own batch
                        _commit(consumer, sender, done)
                if max_records is not None and stats.sent >= max_records:
                    break  # positions are past records polled but not handled
                # transaction markers take offsets but are never returned as records
                for tp in list(todo):
                    position = consumer.position(tp)
                    if position is not None and position >= end[tp]:
                        todo.discard(tp)
                # Batched: each commit waits for every send before it to be
                # acknowledged, which per poll took half of a run's time.
                if time.monotonic() - last_commit >= COMMIT_INTERVAL_S:
                    _commit(consumer, sender, done)
                    last_commit = time.monotonic()
            _commit(consumer, sender, done)
    except KeyboardInterrupt:
        # Ctrl-C: what was handled is acknowledged and committed before leaving,
        # so the next run neither repeats nor skips it
        _commit(consumer, sender, done)
        raise
    stats.remaining = sum(end[tp] - next_offset[tp] for tp in todo)
    return stats


class _Sender:
    """Where each dead letter goes: its source topic and partition, or ``--to``."""

    def __init__(self, settings: KafkaSettings, producer: Producer, to: str | None, *,
                 transactional: bool = False) -> None:
        self.settings = settings
        self.producer = producer
        self.to = to
        self.transactional = transactional
        self._partitions: dict[str, int | None] = {}
        self.unflushed = 0

    def send(self, record: Record, letter: DeadLetter) -> None:
        topic = self.to or letter.source_topic
        assert topic is not None
        if topic not in self._partitions:
            self._partitions[topic] = self.settings.partitions(topic)
        count = self._partitions[topic]
        # the same partition as the original request when the topic has it, so
        # the worker's per-partition order and any partition affinity hold
        part = letter.source_partition
        partition = part if part is not None and count is not None and part < count else None
        headers = [*letter.headers, (REDRIVE_COUNT, str(letter.redrive_count + 1).encode())]
        if self.transactional and not self.unflushed:
            self.producer.begin_transaction()
        self.producer.send(topic, record.value, record.key, headers, partition=partition)
        self.unflushed += 1


def _handle(r: Record, filters: _Filters, force: bool, to: str | None,
            sender: _Sender | None, stats: RedriveStats) -> None:
    letter = parse_dead_letter(r.headers)
    if letter is None:
        stats.refused[NOT_A_DEAD_LETTER] += 1
        return
    if not filters.match(r, letter):
        stats.passed_over += 1
        return
    if letter.value_omitted:
        stats.refused[VALUE_OMITTED] += 1
    elif to is None and not letter.source_topic:
        stats.refused[NO_SOURCE] += 1
    elif letter.redrive_count >= MAX_REDRIVES and not force:
        stats.refused[REDRIVEN_TOO_OFTEN] += 1
    else:
        if sender is not None:  # None: a dry run
            sender.send(r, letter)
        stats.table[(letter.error_type or "?", letter.model or "(default)")] += 1


def _commit(consumer: Consumer, sender: _Sender | None, done: dict[TopicPartition, int]) -> None:
    """Commit ``done`` once everything sent before it is acknowledged (or in the
    transaction that sent it, with --exactly-once); dry runs commit nothing."""
    if sender is None or not done:
        return
    if sender.transactional and sender.unflushed:
        sender.producer.commit_transaction(done, consumer)
        sender.unflushed = 0
        done.clear()
        return
    if sender.unflushed:
        try:
            sender.producer.flush()
        except ProducerError as exc:
            raise ProducerError(f"redrive stopped, nothing after the last commit is "
                                f"committed: {exc}") from exc
        sender.unflushed = 0
    consumer.commit(done)
    done.clear()
