"""After an unclean stop: which records to run one at a time, and when to give up.

Plain rules, no Kafka inside (the loop does the I/O). Offsets are committed
with a short metadata string: ``run:<last>`` while a worker serves, where
``last`` is the highest offset of the partition it may have handed to
inference (it commits a higher one before it hands over a record past it, a
little past the highest it polled: ``worker.commit.COVER_AHEAD``),
``clean`` when it stops or hands a partition over in order,
``try:<offset>:<n>`` just before it runs the record at ``offset`` alone for
the ``n``-th time. A new owner that finds ``run:<last>`` or ``try`` knows the
last one died mid-stream, perhaps *of* one of the records it was running: it
runs the records from the committed offset up to ``last`` (up to ``offset``
after a ``try``) one at a time, committing a ``try`` marker before each, so a
record that takes the process down again is known by its offset and
dead-lettered after :data:`CRASH_LIMIT` crashes instead of crash-looping the
partition, however far past the committed offset it was.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = [
    "CAREFUL_RECORDS",
    "CLEAN",
    "CRASH_LIMIT",
    "LATEST_RESETS",
    "RUNNING",
    "Careful",
    "Plan",
    "assess",
    "clean_metadata",
    "needs_watermarks",
    "plan",
    "run_marker",
    "try_marker",
]

CLEAN = "clean"
RUNNING = "run"  # the marker's prefix; alone, as workers before ``run:<last>`` wrote it
CAREFUL_RECORDS = 500  # after a bare ``run`` (the last offset unknown), this many run one at a time
CRASH_LIMIT = 3  # crashes on one record (the unnoticed first one included) before it is dropped
LATEST_RESETS = ("latest", "largest", "end")  # auto.offset.reset values that start at the end


def clean_metadata(metadata: str | None) -> str:
    """Commit metadata as written: librdkafka stores it with a trailing NUL."""
    return (metadata or "").rstrip("\x00")


def run_marker(last: int) -> str:
    """Serving; no record of the partition past ``last`` was handed to inference."""
    return f"{RUNNING}:{last}"


def try_marker(offset: int, attempt: int) -> str:
    return f"try:{offset}:{attempt}"


@dataclass(frozen=True)
class Careful:
    """A partition whose last owner stopped mid-stream."""

    start: int  # the committed offset found at assignment
    until: int  # records below it run one at a time
    crashes: int  # careful runs of the record at ``start`` that took the process down

    def covers(self, offset: int) -> bool:
        return self.start <= offset < self.until

    def attempt(self, offset: int) -> int:
        """The careful run about to start for ``offset`` (1 for the first)."""
        return (self.crashes if offset == self.start else 0) + 1

    def give_up(self, offset: int) -> bool:
        """The record crashed the process often enough: dead-letter it unrun.

        The first crash went unnoticed (nothing said which record ran), so
        ``CRASH_LIMIT - 1`` careful crashes make ``CRASH_LIMIT`` in all.
        """
        return self.attempt(offset) >= CRASH_LIMIT


def assess(committed: int | None, metadata: str, high_watermark: int | None) -> Careful | None:
    """What a new owner must do with a partition, from its committed offset and metadata.

    ``run:<last>``: the records from ``committed`` up to ``last`` may have run when
    the last owner died. ``try:<offset>:<n>``: the record at ``offset`` ran alone
    (nothing after it had run since the careful records before it settled). A bare
    ``run`` (an older worker's) leaves ``last`` unknown: :data:`CAREFUL_RECORDS`.
    Empty metadata is an operator's commit (kafka-consumer-groups --reset-offsets):
    no worker died mid-stream. Trailing NULs (librdkafka writes one) are ignored."""
    if committed is None or _stopped_clean(metadata):
        return None
    metadata = clean_metadata(metadata)
    kind, _, rest = metadata.partition(":")
    at, _, count = rest.partition(":")
    crashes, until = 0, committed + CAREFUL_RECORDS  # unless the marker says more
    if kind == "try" and at == str(committed) and count.isdigit():
        crashes, until = int(count), committed + 1
    elif kind == RUNNING and (last := _int(rest)) is not None:
        until = last + 1
    if high_watermark is not None:
        until = min(until, high_watermark)  # nothing past the end of the log ran
    if until <= committed:
        return None  # nothing after the committed offset ran: nothing to be careful with
    return Careful(committed, until, crashes)


def needs_watermarks(committed: int | None, metadata: str) -> bool:
    """Whether :func:`plan` needs the partition's watermarks: not after a clean stop (or
    an operator's commit), where nothing is run carefully whatever the log holds. Asking
    costs a broker round trip that waits behind the consumer's fetch: half a second per
    partition (``fetch.wait.max.ms``) on an idle stream, at every rebalance."""
    return committed is None or not _stopped_clean(metadata)


def _stopped_clean(metadata: str) -> bool:
    """``clean``, or empty (an operator's commit): nothing to run carefully."""
    return clean_metadata(metadata) in (CLEAN, "")


def _int(text: str) -> int | None:
    digits = text[1:] if text.startswith("-") else text
    return int(text) if digits.isdigit() else None


@dataclass(frozen=True)
class Plan:
    """What a new owner does with a partition before its first record."""

    start: int | None = None  # nothing committed yet: commit this offset now (nothing ran)
    careful: Careful | None = None  # the last owner stopped mid-stream


def plan(
    committed: int | None,
    metadata: str,
    watermarks: tuple[int, int] | None,
    *,
    latest: bool = False,
) -> Plan:
    """From a newly assigned partition's committed offset and metadata and its
    (low, high) watermarks: commit its start (so that a crash before the first
    real commit is recognised as one), run it carefully, or nothing."""
    if committed is None:
        if watermarks is None:
            return Plan()
        return Plan(start=watermarks[1] if latest else watermarks[0])
    return Plan(careful=assess(committed, metadata, None if watermarks is None else watermarks[1]))
