"""The offset tracker on its own: plain data, no Kafka, no broker.

Offsets are Kafka's "next offset to read": a record at offset ``n`` that is
acknowledged commits ``n + 1``.
"""

from __future__ import annotations

import threading

import pytest

from worker.offsets import Acknowledged, Entry, OffsetTracker

A, B, C = "a", "b", "c"  # partitions: the tracker takes any hashable name


class Done:
    """A delivery as the Protocol has it: ``done`` and ``error``."""

    def __init__(self, done: bool = True, error: BaseException | None = None) -> None:
        self.done = done
        self.error = error


def _entry(offset: int, nbytes: int = 10, out: object = None) -> Entry:
    e = Entry(offset, nbytes)
    e.out = out
    return e


def _fill(t: OffsetTracker[str], tp: str, offsets: range, nbytes: int = 10) -> list[Entry]:
    entries = [_entry(o, nbytes) for o in offsets]
    for e in entries:
        t.add(tp, e)
    return entries


def _send_all(t: OffsetTracker[str], tps: list[str] | None = None) -> list[tuple[str, int]]:
    """What the at-least-once committer does: each sendable entry gets one delivery."""
    sent = []
    with t.lock:
        for tp, e in t.sendable(tps):
            e.deliveries.append(Done(done=False))
            sent.append((tp, e.offset))
    return sent


def _deliver(entries: list[Entry], error: BaseException | None = None) -> None:
    for e in entries:
        for d in e.deliveries:
            d.done, d.error = True, error


# -- the entry --------------------------------------------------------------


def test_a_new_entry_is_unanswered_unsent_and_holds_its_size() -> None:
    e = Entry(41, 300)
    assert (e.offset, e.nbytes, e.out, e.deliveries, e.sent) == (41, 300, None, [], False)
    assert e.answered is False
    e.out = b""  # an empty answer is still an answer: only None means "not yet"
    assert e.answered is True


def test_acknowledged_defaults_to_nothing() -> None:
    a = Acknowledged()
    assert a.retired == [] and a.refused is None and a.error is None
    assert Acknowledged().retired is not a.retired


# -- add, inflight bytes, pending -----------------------------------------------


def test_add_counts_bytes_and_pending_per_partition() -> None:
    t: OffsetTracker[str] = OffsetTracker()
    assert t.pending() == 0 and t.inflight_bytes == 0 and t.bytes_by_partition() == {}
    _fill(t, A, range(5, 8), nbytes=100)
    _fill(t, B, range(0, 2), nbytes=7)
    assert t.pending() == 5
    assert t.inflight_bytes == 314
    assert t.bytes_by_partition() == {A: 300, B: 14}
    assert t.partitions() == [A, B]
    assert t.first_offsets() == {A: 5, B: 0}


# -- sendable: answered heads, in offset order ------------------------------------


def test_sendable_hands_out_only_the_answered_head_in_offset_order() -> None:
    t: OffsetTracker[str] = OffsetTracker()
    a = _fill(t, A, range(10, 15))
    assert not t.has_due_answers()
    # 11 and 12 answered before 10: nothing may go out yet.
    a[1].out = a[2].out = b"x"
    assert not t.has_due_answers()
    assert _send_all(t) == []
    assert [e.sent for e in a] == [False] * 5
    a[0].out = b"x"
    assert t.has_due_answers()
    assert _send_all(t) == [(A, 10), (A, 11), (A, 12)]
    assert [e.sent for e in a] == [True, True, True, False, False]
    # Sent once only.
    assert _send_all(t) == []
    assert not t.has_due_answers()
    a[4].out = b"x"
    assert _send_all(t) == []  # 13 still unanswered
    a[3].out = b"x"
    assert _send_all(t) == [(A, 13), (A, 14)]


def test_sendable_filters_partitions_and_keeps_others_for_later() -> None:
    t: OffsetTracker[str] = OffsetTracker()
    for e in _fill(t, A, range(0, 2)) + _fill(t, B, range(0, 2)):
        e.out = b"x"
    assert _send_all(t, [B]) == [(B, 0), (B, 1)]
    assert t.has_due_answers()
    assert _send_all(t, []) == []
    assert _send_all(t) == [(A, 0), (A, 1)]


def test_an_entry_stays_unsent_when_the_caller_fails_while_sending_it() -> None:
    t: OffsetTracker[str] = OffsetTracker()
    a = _fill(t, A, range(0, 2))
    a[0].out = a[1].out = b"x"
    with pytest.raises(RuntimeError), t.lock:
        for _tp, _e in t.sendable():
            raise RuntimeError("producer queue full")
    assert a[0].sent is False
    assert _send_all(t) == [(A, 0), (A, 1)]


# -- acknowledge: acknowledged heads -> offsets (offset + 1) ---------------------------


def test_only_the_acknowledged_head_commits_and_the_offset_is_next_to_read() -> None:
    t: OffsetTracker[str] = OffsetTracker()
    a = _fill(t, A, range(100, 104), nbytes=10)
    for e in a:
        e.out = b"x"
    _send_all(t)
    # 101 and 102 acknowledged, 100 not yet: nothing to commit.
    _deliver(a[1:3])
    acked = t.acknowledge()
    assert acked.retired == [] and acked.refused is None and acked.error is None
    assert t.to_commit() == {}
    assert t.pending() == 4 and t.inflight_bytes == 40
    _deliver(a[:1])
    acked = t.acknowledge()
    assert acked.retired == a[:3]
    assert t.inflight_bytes == 10 and t.bytes_by_partition() == {A: 10}
    assert t.pending() == 4  # retired but not yet committed still counts
    assert t.first_offsets() == {A: 103}
    assert t.to_commit() == {A: 103}
    assert t.to_commit() == {}  # taken
    assert t.committed({A: 103}) == 3
    assert t.pending() == 1
    assert t.committed({A: 103}) == 0  # settled once


def test_a_sent_entry_waits_for_every_one_of_its_deliveries() -> None:
    t: OffsetTracker[str] = OffsetTracker()
    [e] = _fill(t, A, range(7, 8))
    e.out = b"x"
    with t.lock:
        for _, s in t.sendable():
            s.deliveries += [Done(), Done(done=False)]
    assert t.acknowledge().retired == []
    e.deliveries[1].done = True
    assert t.acknowledge().retired == [e]
    assert t.to_commit() == {A: 8}


def test_an_answered_but_unsent_entry_is_never_acknowledged() -> None:
    t: OffsetTracker[str] = OffsetTracker()
    [e] = _fill(t, A, range(0, 1))
    e.out = b"x"  # no deliveries yet, and not sent
    assert t.acknowledge().retired == []
    assert t.to_commit() == {}


def test_acknowledge_filters_partitions() -> None:
    t: OffsetTracker[str] = OffsetTracker()
    a, b = _fill(t, A, range(0, 2)), _fill(t, B, range(5, 6))
    for e in a + b:
        e.out = b"x"
    _send_all(t)
    _deliver(a + b)
    assert t.acknowledge([B]).retired == b
    assert t.to_commit() == {B: 6}
    assert t.acknowledge([]).retired == []
    assert t.acknowledge().retired == a
    assert t.to_commit([B]) == {}
    assert t.to_commit([A]) == {A: 2}


def test_acknowledged_counts_accumulate_across_acknowledges_until_committed() -> None:
    t: OffsetTracker[str] = OffsetTracker()
    a = _fill(t, A, range(0, 5))
    for e in a:
        e.out = b"x"
    _send_all(t)
    _deliver(a[:2])
    t.acknowledge()
    _deliver(a[2:])
    t.acknowledge()
    assert t.to_commit() == {A: 5}
    assert t.pending() == 5
    assert t.committed({A: 5}) == 5
    assert t.pending() == 0 and t.inflight_bytes == 0


# -- a refused delivery stops its line for good ------------------------------------------


def _refused_line() -> tuple[OffsetTracker[str], list[Entry], list[Entry], Exception]:
    """A: 0..5 sent, 0 and 1 acknowledged, 2 refused, 3..5 acknowledged; B: 0..1 fine."""
    t: OffsetTracker[str] = OffsetTracker()
    a, b = _fill(t, A, range(0, 6)), _fill(t, B, range(0, 2))
    for e in a + b:
        e.out = b"x"
    _send_all(t)
    boom = RuntimeError("MSG_SIZE_TOO_LARGE")
    _deliver(a[:2])
    _deliver(a[2:3], boom)
    _deliver(a[3:])
    _deliver(b)
    return t, a, b, boom


def test_a_refused_delivery_commits_what_precedes_it_and_nothing_at_or_after_it() -> None:
    t, a, b, boom = _refused_line()
    acked = t.acknowledge()
    assert acked.refused is a[2] and acked.error is boom
    # Other lines go on; this one up to the refused record only.
    assert acked.retired == [*a[:2], *b]
    assert t.to_commit() == {A: 2, B: 2}
    assert t.first_offsets() == {A: 2}
    assert t.pending() == 4 + 4  # 4 lined up on A, 4 acknowledged (A 2 + B 2)
    assert t.inflight_bytes == 40 and t.bytes_by_partition() == {A: 40}


def test_a_refused_line_never_moves_even_after_later_deliveries_restore_and_forget() -> None:
    t, a, _b, _boom = _refused_line()
    t.acknowledge()
    offsets = t.to_commit()
    assert offsets == {A: 2, B: 2}
    # The commit failed: the offsets come back, never beyond the refused record.
    t.restore(offsets)
    # Later records keep being answered and acknowledged.
    later = [_entry(o, out=b"x") for o in range(6, 9)]
    for e in later:
        t.add(A, e)
    assert _send_all(t) == [(A, 6), (A, 7), (A, 8)]
    _deliver(later)
    t.forget([B, C])
    again = t.acknowledge()
    assert again.refused is a[2] and again.retired == []
    assert t.to_commit() == {A: 2}
    assert t.to_commit() == {}
    t.restore({A: 2})
    assert t.acknowledge([A]).retired == []
    assert t.to_commit([A]) == {A: 2}
    assert t.first_offsets() == {A: 2}
    assert t.pending() == 7 + 2  # 2..8 lined up, 0..1 acknowledged
    assert t.committed({A: 2}) == 2


def test_forgetting_the_refused_partition_lets_a_new_assignment_start_clean() -> None:
    t, _a, _b, _boom = _refused_line()
    t.acknowledge()
    t.forget([A])
    assert t.first_offsets() == {}
    assert t.to_commit() == {B: 2}
    # Assigned again later (the next owner re-reads from the committed offset).
    [e] = _fill(t, A, range(2, 3))
    e.out = b"x"
    _send_all(t)
    _deliver([e])
    acked = t.acknowledge()
    assert acked.refused is None and acked.retired == [e]
    assert t.to_commit() == {A: 3}


# -- to_commit, restore, committed ---------------------------------------------------------


def _acked(t: OffsetTracker[str], tp: str, offsets: range) -> list[Entry]:
    entries = _fill(t, tp, offsets)
    for e in entries:
        e.out = b"x"
    _send_all(t, [tp])
    _deliver(entries)
    t.acknowledge([tp])
    return entries


def test_a_deferred_commit_keeps_its_offsets_for_the_next_one() -> None:
    t: OffsetTracker[str] = OffsetTracker()
    _acked(t, A, range(0, 3))
    first = t.to_commit()
    assert first == {A: 3}
    t.restore(first)  # CommitDeferred
    assert t.pending() == 3
    _acked(t, A, range(3, 5))
    assert t.to_commit() == {A: 5}
    assert t.committed({A: 5}) == 5
    assert t.pending() == 0


def test_restore_never_moves_an_offset_backwards() -> None:
    t: OffsetTracker[str] = OffsetTracker()
    _acked(t, A, range(0, 3))
    old = t.to_commit()
    _acked(t, A, range(3, 6))
    t.restore(old)  # the older, smaller offset arrives late
    assert t.to_commit() == {A: 6}
    t.restore({A: 6})
    t.restore({A: 6})
    assert t.to_commit() == {A: 6}


def test_restore_ignores_partitions_no_longer_held() -> None:
    t: OffsetTracker[str] = OffsetTracker()
    _acked(t, A, range(0, 3))
    _acked(t, B, range(0, 1))
    offsets = t.to_commit()
    t.forget([A])  # revoked while the commit was in flight
    t.restore(offsets)
    assert t.to_commit() == {B: 1}
    assert t.committed(offsets) == 1
    assert t.pending() == 0


def test_committed_settles_only_the_partitions_named() -> None:
    t: OffsetTracker[str] = OffsetTracker()
    _acked(t, A, range(0, 3))
    _acked(t, B, range(0, 2))
    assert t.to_commit([A]) == {A: 3}
    assert t.committed({A: 3}) == 3
    assert t.pending() == 2
    assert t.to_commit() == {B: 2}


# -- exactly-once: window and settle_window ------------------------------------------------


def test_window_is_the_answered_head_of_each_line_in_offset_order() -> None:
    t: OffsetTracker[str] = OffsetTracker()
    a, b = _fill(t, A, range(10, 14), nbytes=5), _fill(t, B, range(0, 2), nbytes=3)
    _fill(t, C, range(0, 1))
    a[0].out = a[1].out = a[3].out = b"x"  # 12 unanswered: 13 waits
    b[0].out = b[1].out = b"y"
    assert t.window() == [(A, a[0]), (A, a[1]), (B, b[0]), (B, b[1])]
    assert not t.answered([A]) and t.answered([B]) and not t.answered([A, B])
    assert t.answered([]) and t.answered(["unknown"])


def test_settle_window_drops_exactly_the_window() -> None:
    t: OffsetTracker[str] = OffsetTracker()
    a, b = _fill(t, A, range(10, 14), nbytes=5), _fill(t, B, range(0, 2), nbytes=3)
    a[0].out = a[1].out = b"x"
    b[0].out = b"y"
    w = t.window()
    t.settle_window(w)
    assert t.first_offsets() == {A: 12, B: 1}
    assert t.pending() == 3
    assert t.inflight_bytes == 2 * 5 + 3 and t.bytes_by_partition() == {A: 10, B: 3}
    # Nothing unsent lingers from the settled window: the next answered head is 12.
    assert not t.has_due_answers()
    a[2].out = b"x"
    assert t.window() == [(A, a[2])]
    assert _send_all(t) == [(A, 12)]
    assert t.to_commit() == {}  # transactions commit through settle_window, not to_commit


def test_settle_window_refuses_a_window_that_is_not_the_head() -> None:
    t: OffsetTracker[str] = OffsetTracker()
    a = _fill(t, A, range(0, 2))
    with pytest.raises(AssertionError):
        t.settle_window([(A, a[1])])


def test_settle_window_after_the_entries_were_sent() -> None:
    t: OffsetTracker[str] = OffsetTracker()
    a = _fill(t, A, range(0, 3))
    a[0].out = a[1].out = b"x"
    _send_all(t)  # the window's entries already left the unsent queue
    t.settle_window(t.window())
    a[2].out = b"x"
    assert _send_all(t) == [(A, 2)]
    assert t.first_offsets() == {A: 2}


# -- rebalance -----------------------------------------------------------------------------


def test_forget_drops_lines_offsets_counts_and_bytes_of_those_partitions_only() -> None:
    t: OffsetTracker[str] = OffsetTracker()
    _acked(t, A, range(0, 2))
    _fill(t, A, range(2, 5), nbytes=100)
    _acked(t, B, range(0, 2))
    [b2] = _fill(t, B, range(2, 3), nbytes=7)
    b2.out = b"x"
    assert t.pending() == 5 + 3
    t.forget([A, "never-held"])
    assert t.pending() == 3
    assert t.inflight_bytes == 7 and t.bytes_by_partition() == {B: 7}
    assert t.partitions() == [B]
    assert t.first_offsets() == {B: 2}
    assert t.to_commit() == {B: 2}
    assert t.window() == [(B, b2)]
    assert _send_all(t) == [(B, 2)]
    assert t.answered([A])


def test_forget_then_add_starts_a_fresh_line() -> None:
    t: OffsetTracker[str] = OffsetTracker()
    [old] = _fill(t, A, range(0, 1))
    old.out = b"x"
    t.forget([A])
    assert not t.has_due_answers() and t.window() == []
    [new] = _fill(t, A, range(50, 51))
    assert t.first_offsets() == {A: 50}
    assert not t.has_due_answers()
    new.out = b"x"
    assert _send_all(t) == [(A, 50)]


def test_empty_lines_are_held_but_not_reported() -> None:
    t: OffsetTracker[str] = OffsetTracker()
    _acked(t, A, range(0, 1))
    assert t.partitions() == [A]
    assert t.first_offsets() == {} and t.bytes_by_partition() == {}
    assert t.inflight_bytes == 0


# -- threads ------------------------------------------------------------------------------


def test_answers_from_many_threads_commit_every_offset_once() -> None:
    t: OffsetTracker[str] = OffsetTracker()
    entries = _fill(t, A, range(0, 400), nbytes=1)

    def answer(part: list[Entry]) -> None:
        for e in part:
            with t.lock:
                e.out = b"x"
                for _, s in t.sendable():
                    s.deliveries.append(Done())

    threads = [threading.Thread(target=answer, args=(entries[i::4],)) for i in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert [e.sent for e in entries] == [True] * 400
    assert all(len(e.deliveries) == 1 for e in entries)
    assert len(t.acknowledge().retired) == 400
    assert t.to_commit() == {A: 400} and t.committed({A: 400}) == 400
    assert t.pending() == 0 and t.inflight_bytes == 0


def test_a_refused_line_does_not_hold_back_the_lines_after_it() -> None:
    t, _a, _b, _boom = _refused_line()  # A (refused) comes before B
    t.acknowledge()
    assert t.to_commit() == {A: 2, B: 2}
    more = [_entry(o, out=b"x") for o in range(2, 4)]
    for e in more:
        t.add(B, e)
    _send_all(t)
    _deliver(more)
    acked = t.acknowledge()
    assert acked.retired == more and acked.error is None
    assert t.to_commit() == {B: 4}


# -- grow: an answer's bytes count until it is committed -----------------------------------


def test_grow_counts_an_answer_until_its_record_leaves_the_tracker() -> None:
    t: OffsetTracker[str] = OffsetTracker()
    a = _fill(t, A, range(0, 3), nbytes=10)
    b = _fill(t, B, range(0, 1), nbytes=10)
    assert all(e.live for e in a + b)
    t.grow(a[0], 500)
    t.grow(a[1], 7)
    assert (a[0].nbytes, t.inflight_bytes) == (510, 547)
    assert t.bytes_by_partition() == {A: 537, B: 10}
    # Acknowledged: the grown size leaves with it, and a late grow changes nothing.
    a[0].out = b"x"
    _send_all(t)
    _deliver(a[:1])
    t.acknowledge()
    assert a[0].live is False and t.inflight_bytes == 37
    t.grow(a[0], 1000)
    assert a[0].nbytes == 510 and t.inflight_bytes == 37
    # Settled in a transaction.
    a[1].out = b"x"
    t.settle_window(t.window())
    assert a[1].live is False and t.inflight_bytes == 20
    t.grow(a[1], 1000)
    assert t.inflight_bytes == 20
    # Forgotten (revoked, or rewound after an abort).
    t.grow(b[0], 5)
    t.forget([A, B])
    assert a[2].live is False and b[0].live is False
    assert t.inflight_bytes == 0
    t.grow(a[2], 3)
    t.grow(b[0], 3)
    assert t.inflight_bytes == 0 and a[2].nbytes == 10


def test_clear_refusal_lets_the_line_go_on_and_ignores_a_line_not_refused() -> None:
    t, a, _b, _boom = _refused_line()
    t.acknowledge()
    assert t.refused() == [(A, a[2])]
    t.clear_refusal("never-refused")
    a[2].deliveries = [Done()]  # sent again, as something the broker takes
    t.clear_refusal(A)
    assert t.refused() == []
    assert t.acknowledge().retired == a[2:]
    assert t.to_commit() == {A: 6, B: 2}
