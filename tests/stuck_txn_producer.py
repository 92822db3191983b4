"""``python -m tests.stuck_txn_producer CALL SECONDS``: the librdkafka backend's
transactional producer, built on a client whose ``CALL`` blocks for ``SECONDS``.

The client is a real ``confluent_kafka.Producer`` (no broker behind it) whose
transactional calls return at once, except ``CALL``, which ignores its timeout and
sleeps, as librdkafka#5456 makes ``send_offsets_to_transaction`` do. The backend
keeps its own code and deadline; only the figures shrink: each call's timeout
0.2 s, the margin 0.3 s, ``transaction.timeout.ms`` 2000, so the deadline is
2.3 s. Runs init, begin, send_offsets, commit, begin, abort,
then prints ``done``.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import Any

import confluent_kafka as ck

from worker.kafka import ClientConfig, TopicPartition
from worker.kafka.confluent import ConfluentProducer

CALLS = (
    "init_transactions",
    "begin_transaction",
    "send_offsets_to_transaction",
    "commit_transaction",
    "abort_transaction",
)
DEADLINE_S = 2.0 + 0.3  # transaction.timeout.ms (longer than the calls' 0.2 s) + margin


def _client(blocks: str, seconds: float) -> type[ck.Producer]:
    def call(name: str) -> None:
        time.sleep(seconds if name == blocks else 0.0)

    class Client(ck.Producer):  # type: ignore[misc]
        def list_topics(self, *args: Any, **kwargs: Any) -> None:
            return None  # "the cluster answers"

        def init_transactions(self, *args: Any) -> None:
            call("init_transactions")

        def begin_transaction(self, *args: Any) -> None:
            call("begin_transaction")

        def send_offsets_to_transaction(self, *args: Any) -> None:
            call("send_offsets_to_transaction")

        def commit_transaction(self, *args: Any) -> None:
            call("commit_transaction")

        def abort_transaction(self, *args: Any) -> None:
            call("abort_transaction")

    return Client


def main(blocks: str, seconds: float) -> int:
    logging.basicConfig(level=logging.INFO, stream=sys.stderr)

    class Producer(ConfluentProducer):
        client = _client(blocks, seconds)
        txn_call_timeout_s = 0.2
        txn_deadline_margin_s = 0.3

    config = ClientConfig("127.0.0.1:9", transactional_id="stuck-txn")
    p = Producer(config, {"transaction.timeout.ms": "2000"})
    p.init_transactions()
    p.begin_transaction()
    p.send_offsets_to_transaction({TopicPartition("in", 0): 5}, None)
    p.commit_transaction()
    p.begin_transaction()
    p.abort_transaction()
    p.close()
    print("done", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], float(sys.argv[2])))
