"""The two places where the kafka-python backend changes kafka-python itself.

Both replace a private method of the library, so both depend on names that a
kafka-python release may move: :data:`PRIVATE_NAMES` lists them and
:func:`apply` refuses (with :class:`PatchTargetMissing`) to run on a version
that lacks one, rather than patching nothing and failing later in the field.
``tests/test_kafka_python_patches.py`` checks the same names and each patch's
effect, so an upgrade that moves them fails there first.

- :func:`_rejoin_when_a_join_is_pending` (kafka-python 3.0.12, unchanged at
  its development head): a rejoin that a metadata change asked for is not
  latched, so when ``poll()``'s timer runs out while the JoinGroup/SyncGroup
  task is in flight, nobody collects the finished join: the member stays
  ``rebalancing`` with heartbeats off, every commit is refused with
  ``RebalanceInProgressError`` and new partitions are never assigned, until
  the broker evicts it. The Java client asks ``rejoinNeededOrPending()``; the
  patch makes ``need_rejoin()`` say the same (docs/reliability.md, "(G)").
- :func:`_tolerate_undecodable_header_names`: a header *name* that is not
  UTF-8 (legal on the wire) fails kafka-python's whole fetch; the patched
  reader keeps it as a :class:`RawName` so the record becomes a dead letter.
"""

from __future__ import annotations

from typing import Any

import kafka.errors as Errors
from kafka.coordinator.base import BaseCoordinator
from kafka.record.default_records import DefaultRecord, DefaultRecordBatch
from kafka.record.util import decode_varint

__all__ = ["PRIVATE_NAMES", "PatchTargetMissing", "RawName", "apply", "missing_names"]

# (owner, attribute) pairs the patches read or replace; an instance attribute
# counts as present when the owner's ``__init__`` assigns it.
PRIVATE_NAMES: tuple[tuple[type, str], ...] = (
    (BaseCoordinator, "need_rejoin"),
    (BaseCoordinator, "rejoin_needed"),
    (BaseCoordinator, "_join_task"),
    (DefaultRecordBatch, "_read_msg"),
    (DefaultRecordBatch, "_buffer"),
    (DefaultRecordBatch, "_pos"),
)


class PatchTargetMissing(ImportError):
    """This kafka-python lacks a name a patch needs: the patch cannot be applied."""

    def __init__(self, missing: list[str]) -> None:
        import kafka

        super().__init__(
            f"kafka-python {kafka.__version__} lacks {', '.join(missing)}, which the worker's "
            "patches of it replace or read (worker/kafka/kafka_python_patches.py); use the "
            "version pinned in requirements/ or the confluent backend"
        )


def missing_names() -> list[str]:
    """``Owner.name`` for each of :data:`PRIVATE_NAMES` this kafka-python lacks."""
    return [
        f"{owner.__name__}.{name}"
        for owner, name in PRIVATE_NAMES
        if not hasattr(owner, name) and name not in vars(owner)["__init__"].__code__.co_names
    ]


def apply() -> None:
    """Install both patches (once; later calls do nothing)."""
    missing = missing_names()
    if missing:
        raise PatchTargetMissing(missing)
    _rejoin_when_a_join_is_pending()
    _tolerate_undecodable_header_names()


def _rejoin_when_a_join_is_pending() -> None:
    """``need_rejoin()`` is also true while a join task is in flight or uncollected."""
    own = BaseCoordinator.need_rejoin
    if getattr(own, "_or_pending", False):
        return

    def need_rejoin(self: Any) -> bool:
        return self._join_task is not None or bool(own(self))

    need_rejoin._or_pending = True  # type: ignore[attr-defined]
    need_rejoin.__doc__ = own.__doc__
    BaseCoordinator.need_rejoin = need_rejoin


def _tolerate_undecodable_header_names() -> None:
    """Let kafka-python read a record whose header *name* is not UTF-8.

    Legal on the wire (librdkafka and Java producers can send one), but
    kafka-python's record reader decodes names strictly and fails the whole
    fetch, so the partition would crash-loop. The patched reader keeps such a
    name as a :class:`RawName`; the backend hands it on as ``bytes``, and
    the record becomes a dead letter. Only the failing record takes the slow path.
    """
    strict = DefaultRecordBatch._read_msg
    if getattr(strict, "_tolerant", False):
        return

    def read_msg(self: Any, decode_varint: Any = decode_varint) -> Any:
        try:
            return strict(self, decode_varint)
        except UnicodeDecodeError:
            pass
        # The strict reader left self._pos where the record starts: read the record
        # again, the same way, with a tolerant decoding of header names.
        buffer, pos = self._buffer, self._pos
        length, pos = decode_varint(buffer, pos)
        start = pos
        _, pos = decode_varint(buffer, pos)
        ts_delta, pos = decode_varint(buffer, pos)
        timestamp = (
            self.max_timestamp
            if self.timestamp_type == self.LOG_APPEND_TIME
            else self.first_timestamp + ts_delta
        )
        offset_delta, pos = decode_varint(buffer, pos)
        fields: list[bytes | None] = []
        for _ in range(2):  # key, value
            size, pos = decode_varint(buffer, pos)
            fields.append(bytes(buffer[pos : pos + size]) if size >= 0 else None)
            pos += max(size, 0)
        count, pos = decode_varint(buffer, pos)
        headers = []
        for _ in range(count):
            size, pos = decode_varint(buffer, pos)
            name = RawName.of(bytes(buffer[pos : pos + size]))
            pos += size
            size, pos = decode_varint(buffer, pos)
            headers.append((name, bytes(buffer[pos : pos + size]) if size >= 0 else None))
            pos += max(size, 0)
        if pos - start != length:
            raise Errors.CorruptRecordError(f"record size {length}, read {pos - start}")
        self._pos = pos
        return DefaultRecord(
            length,
            self.base_offset + offset_delta,
            timestamp,
            self.timestamp_type,
            fields[0],
            fields[1],
            headers,
        )

    read_msg._tolerant = True  # type: ignore[attr-defined]
    DefaultRecordBatch._read_msg = read_msg


class RawName(str):
    """A header name that is not UTF-8: text kafka-python can measure, with its bytes."""

    raw: bytes

    @classmethod
    def of(cls, raw: bytes) -> RawName:
        try:
            return cls(raw.decode("utf-8"))  # only the name that failed is not
        except UnicodeDecodeError:
            name = cls(raw.decode("latin-1"))
            name.raw = raw
            return name
