"""Private brokers for tests that stop, restart or secure one (never the shared broker).

Each is a ``scripts/kafka-local`` broker on free ports with its own
``KAFKA_LOCAL_DIR`` under the test's tmp directory; the jars of the shared
broker are reused through ``KAFKA_HOME`` when they are cached, so nothing is
fetched again.
"""

from __future__ import annotations

import os
import random
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "kafka-local"
_CACHED_JARS = ROOT / ".kafka-local" / "jars" / "4.3.1"


def _free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _free_base() -> int:
    """A port P such that P, P+1, P+2 and the controller port P+1000 are all free."""
    rng = random.Random()
    for _ in range(200):
        base = rng.randrange(20000, 40000)
        if all(_free(p) for p in (base, base + 1, base + 2, base + 1000)):
            return base
    raise RuntimeError("no free ports for a private broker")


@dataclass
class Broker:
    """A private kafka-local broker; ``stop()``/``start()`` simulate an outage."""

    directory: Path
    port: int
    security: bool = False

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def sasl_bootstrap(self) -> str:
        return f"127.0.0.1:{self.port + 1}"

    @property
    def ssl_bootstrap(self) -> str:
        return f"127.0.0.1:{self.port + 2}"

    @property
    def ca_file(self) -> Path:
        return self.directory / "tls" / "ca.pem"

    @property
    def password_file(self) -> Path:
        return self.directory / "sasl-password"

    def _env(self) -> dict[str, str]:
        env = {
            **os.environ,
            "KAFKA_LOCAL_PORT": str(self.port),
            "KAFKA_LOCAL_DIR": str(self.directory),
            "KAFKA_LOCAL_SECURITY": "1" if self.security else "0",
            # a small heap: it runs beside the shared broker on two cores
            "KAFKA_LOCAL_HEAP": "-Xms128m -Xmx512m",
        }
        env.pop("KAFKA_LOCAL_SASL_PASSWORD", None)
        if (_CACHED_JARS / ".complete").exists():
            home = self.directory.parent / f"{self.directory.name}-home"
            home.mkdir(exist_ok=True)
            libs = home / "libs"
            if not libs.exists():
                libs.symlink_to(_CACHED_JARS)
            env["KAFKA_HOME"] = str(home)
        return env

    def start(self) -> None:
        out = subprocess.run(
            [str(SCRIPT), "start"],
            env=self._env(),
            capture_output=True,
            text=True,
            timeout=240,
            check=False,
        )
        if out.returncode != 0:
            raise RuntimeError(f"kafka-local start failed:\n{out.stderr[-3000:]}")

    def stop(self) -> None:
        subprocess.run(
            [str(SCRIPT), "stop"], env=self._env(), capture_output=True, timeout=90, check=False
        )


@contextmanager
def private_broker(*, security: bool = False) -> Iterator[Broker]:
    """A broker of its own, stopped (and its directory removed) on exit."""
    with tempfile.TemporaryDirectory(prefix="kl-test-") as tmp:
        broker = Broker(Path(tmp) / "kafka", _free_base(), security)
        try:
            broker.start()
            yield broker
        finally:
            with suppress(Exception):
                broker.stop()
