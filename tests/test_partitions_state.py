"""The per-partition states of :class:`~worker.partitions.Partitions`, without a broker."""

from __future__ import annotations

from worker.kafka import TopicPartition
from worker.partitions import LOADING, Partitions

IN0 = TopicPartition("in", 0)
IN1 = TopicPartition("in", 1)


def test_forget_drops_what_was_known_and_takes_partitions_it_never_knew() -> None:
    p = Partitions()
    p.assigned([IN0])
    assert p.hold([IN0], LOADING) == {IN0}
    # A revocation then a loss of the same partition, or one given up before any
    # state was kept for it: forgetting it again is no error.
    p.forget([IN0, IN1])
    p.forget([IN0])
    assert IN0 not in p and len(p) == 0
    assert not p.paused(IN0) and p.held(LOADING) == set()
