"""``fogline bench NAME [args...]``: run a benchmark from :mod:`fogline.bench`.

Every benchmark module ``fogline/bench/<name>.py`` exposes ``main(argv) -> int``,
prints a human summary and, with ``--json``, one JSON object on its last line
holding a ratio against a baseline measured in the same run.
"""

from __future__ import annotations

import argparse
import importlib
from typing import Any

BENCHMARKS: dict[str, str] = {
    "svi": "fast streaming SVI step vs the textbook Pyro recipe",
    "pipeline": "end-to-end records/s through the daemon vs a bare consume loop",
    "query": "cached-ensemble predict latency vs pyro Predictive; HTTP load",
    "crash_replay": "kill -9 the daemon repeatedly; check exactly-once absorption",
    "false_alarms": "run length to a false alarm on stable streams vs the ERT target",
    "drift_loop": "per-batch CPU ms of the drift loop by part vs the plain SVI update",
    "compare": "Gaussian vs Student-t, mean-field vs low-rank outside the data",
    "faults": "fault scenarios (kill -9, outages, poison records): lost, duplicated, stalled",
    "nab": "NAB corpus: results tree, per-file wall time, NAB scores (--scorer PATH)",
    "keyed": "a posterior per key: batched key step vs a loop over keys; memory per key",
    "keyed_drift": "1 key of 50 shifts: its detection delay, the others' false alarms vs the ERT",
}


def _run(args: argparse.Namespace) -> int:
    module = importlib.import_module(f"fogline.bench.{args.name.replace('-', '_')}")
    return int(module.main(list(args.rest)) or 0)


def register(sub: argparse._SubParsersAction[Any]) -> None:
    """Add ``fogline bench``."""
    lines = "\n".join(f"  {k:<13} {v}" for k, v in BENCHMARKS.items())
    p = sub.add_parser(
        "bench",
        help="run a benchmark (prints a ratio against a same-run baseline)",
        description=f"benchmarks:\n{lines}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("name", choices=sorted(BENCHMARKS), help="which benchmark")
    p.add_argument("rest", nargs=argparse.REMAINDER, help="arguments for the benchmark")
    p.set_defaults(func=_run)
