#!/usr/bin/env python3
"""Summarise a finished ``mutmut run`` (``make mutation``): survivors, then the score.

Reads mutmut's own summary (``mutmut export-cicd-stats`` writes
``mutants/mutmut-cicd-stats.json``) and lists every mutant that was not killed
(``mutmut results``), so a new survivor shows up by name. The last line reads
``mutation score: NN% (K killed of M)``: K counts mutants a test failed on
(timeouts included: the tests did not pass), M every mutant generated, so a
mutant no test reaches counts against the score. Exits 1 below ``--min``.

Run from the repository root, after ``mutmut run``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

__all__ = ["main", "score"]

STATS = Path("mutants/mutmut-cicd-stats.json")


def score(stats: dict[str, int]) -> tuple[int, int]:
    """(killed, total) from mutmut's summary."""
    killed = stats["killed"] + stats.get("timeout", 0) + stats.get("caught_by_type_check", 0)
    return killed, stats["total"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mutmut", default="mutmut", help="the mutmut executable")
    parser.add_argument("--min", type=float, default=0.0, help="fail below this percentage")
    args = parser.parse_args(argv)

    subprocess.run([args.mutmut, "export-cicd-stats"], check=True, stdout=subprocess.DEVNULL)
    stats = json.loads(STATS.read_text())
    listing = subprocess.run(
        [args.mutmut, "results"], check=True, capture_output=True, text=True
    ).stdout
    left = [line.strip() for line in listing.splitlines() if line.strip()]
    if stats.get("not_checked"):
        print(f"warning: {stats['not_checked']} mutants were not checked (run interrupted?)")
    print(f"not killed ({len(left)}):")
    for line in left:
        print(f"  {line}")
    print(
        "killed {killed}, timeout {timeout}, survived {survived}, no tests {no_tests}, "
        "suspicious {suspicious}, skipped {skipped}".format(
            **{
                k: stats.get(k, 0)
                for k in ("killed", "timeout", "survived", "no_tests", "suspicious", "skipped")
            }
        )
    )
    killed, total = score(stats)
    percent = 100.0 * killed / total if total else 0.0
    print(f"mutation score: {percent:.0f}% ({killed} killed of {total})")
    return 1 if percent < args.min else 0


if __name__ == "__main__":
    sys.exit(main())
