"""Where an answer goes: the input's partition number, else the Java client's murmur2.

Both backends and any Java consumer agree on the rule, and an input
partition's answers stay in one output partition, in order.
"""

from __future__ import annotations

__all__ = ["murmur2", "output_partition"]


def murmur2(data: bytes) -> int:
    """Kafka's murmur2 (``org.apache.kafka.common.utils.Utils.murmur2``), as a signed int32."""
    length = len(data)
    seed = 0x9747B28C
    m = 0x5BD1E995
    r = 24
    h = (seed ^ length) & 0xFFFFFFFF
    for i in range(0, length - length % 4, 4):
        k = data[i] | data[i + 1] << 8 | data[i + 2] << 16 | data[i + 3] << 24
        k = (k * m) & 0xFFFFFFFF
        k ^= k >> r
        k = (k * m) & 0xFFFFFFFF
        h = (h * m) & 0xFFFFFFFF
        h ^= k
    rest = length % 4
    tail = length - rest
    if rest == 3:
        h ^= data[tail + 2] << 16
    if rest >= 2:
        h ^= data[tail + 1] << 8
    if rest >= 1:
        h ^= data[tail]
        h = (h * m) & 0xFFFFFFFF
    h ^= h >> 13
    h = (h * m) & 0xFFFFFFFF
    h ^= h >> 15
    return h - (1 << 32) if h & 0x80000000 else h


def output_partition(input_partition: int, key: bytes | None, partitions: int | None) -> int | None:
    """The partition for an answer to a record of ``input_partition``.

    The same number when the target has it; else ``murmur2(key)`` as the Java
    client's default partitioner picks it (``toPositive(murmur2) % n``); a
    record without a key keeps ``input_partition % n`` so its partition's order
    holds. ``None`` when the target's partition count is unknown (the client
    then partitions by key).
    """
    if not partitions:
        return None
    if input_partition < partitions:
        return input_partition
    if key is None:
        return input_partition % partitions
    return (murmur2(key) & 0x7FFFFFFF) % partitions
