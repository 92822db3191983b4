"""Output partitions: murmur2 as the Java client computes it, and the partition rules."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st
from kafka.partitioner.default import murmur2 as kafka_python_murmur2

from worker.kafka.partition import murmur2, output_partition

# org.apache.kafka.common.utils.UtilsTest.testMurmur2, plus the empty key.
JAVA_VECTORS = [
    (b"21", -973932308),
    (b"foobar", -790332482),
    (b"a-little-bit-long-string", -985981536),
    (b"a-little-bit-longer-string", -1486304829),
    (b"lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8", -58897971),
    (b"abc", 479470107),
    (b"", 275646681),
]


@pytest.mark.parametrize(("data", "expected"), JAVA_VECTORS)
def test_murmur2_equals_the_java_client(data: bytes, expected: int) -> None:
    assert murmur2(data) == expected


@given(st.binary(max_size=40))
def test_murmur2_agrees_with_an_independent_implementation(data: bytes) -> None:
    # kafka-python's port returns the same 32 bits unsigned; ours is Java's signed int.
    h = murmur2(data)
    assert -(2**31) <= h < 2**31
    assert h & 0xFFFFFFFF == kafka_python_murmur2(data)


@pytest.mark.parametrize("size", range(9))
def test_murmur2_every_tail_length_and_high_bytes(size: int) -> None:
    # Bytes >= 0x80 are where a signed/unsigned slip in the tail or the chunks shows.
    for data in (bytes(range(0xF7, 0xF7 + size)), bytes(range(1, 1 + size))):
        assert murmur2(data) & 0xFFFFFFFF == kafka_python_murmur2(data)


def test_the_same_partition_number_when_the_target_has_it() -> None:
    assert output_partition(0, b"foobar", 1) == 0
    assert output_partition(3, b"foobar", 4) == 3
    assert output_partition(3, None, 12) == 3


def test_by_key_as_the_java_partitioner_when_the_target_is_smaller() -> None:
    # toPositive(-790332482) = 1357151166; % 50 == 16, % 3 == 0, % 4 == 2
    assert output_partition(50, b"foobar", 50) == 16
    assert output_partition(60, b"foobar", 3) == 0
    assert output_partition(4, b"foobar", 4) == 2
    # a positive hash: 479470107 % 7 == 4
    assert output_partition(9, b"abc", 7) == 4
    # toPositive(-973932308) = 1173551340; % 7 == 3
    assert output_partition(7, b"21", 7) == 3


def test_a_record_without_a_key_keeps_its_partition_modulo_the_count() -> None:
    assert output_partition(5, None, 4) == 1
    assert output_partition(4, None, 4) == 0
    assert output_partition(11, None, 3) == 2


def test_an_unknown_partition_count_leaves_it_to_the_client() -> None:
    assert output_partition(0, b"k", None) is None
    assert output_partition(0, b"k", 0) is None
    assert output_partition(0, None, None) is None


@given(st.integers(0, 500), st.one_of(st.none(), st.binary(max_size=16)), st.integers(1, 64))
def test_always_a_partition_of_the_target(inp: int, key: bytes | None, n: int) -> None:
    out = output_partition(inp, key, n)
    assert out is not None and 0 <= out < n
    if inp < n:
        assert out == inp
