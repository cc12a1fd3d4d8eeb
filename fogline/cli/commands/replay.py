"""``fogline replay FILE --topic T``: produce a historical stream into Kafka.

See :mod:`fogline.daemon.replay` for the formats (fogline JSONL, CSV with a header,
NAB ``timestamp,value``) and the pacing rule.  The broker and security
settings come from the settings (``--config``, ``FOGLINE_KAFKA__*``) unless
``--bootstrap`` is given.  With a ``model`` section in the settings a CSV is
read by the model's named columns (features, target, timestamp, key) and sent
as flat named records with the file's own timestamps.  The last line printed is a JSON summary
(``records``, ``records_per_s``, ...).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any


def _positive(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError("must be > 0")
    return value


def _replay(args: argparse.Namespace) -> int:
    from fogline.daemon.config import load_or_exit
    from fogline.daemon.replay import replay_file
    from fogline.daemon.stream.source import security_kwargs

    path: Path = args.file
    if not path.is_file():
        print(f"fogline replay: no such file: {path}", file=sys.stderr)
        return 2
    settings = load_or_exit(args.config)
    bootstrap = args.bootstrap or settings.kafka.bootstrap_servers
    try:
        summary = replay_file(
            path,
            bootstrap,
            args.topic,
            fmt=args.format,
            speed=args.speed,
            key_field=args.key_field,
            lags=args.lags,
            partitions=args.partitions,
            limit=args.limit,
            progress=not args.no_progress and sys.stderr.isatty(),
            spec=settings.model,
            **security_kwargs(settings.kafka),
        )
    except ValueError as exc:
        print(f"fogline replay: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:  # a broker that does not answer, a failed send
        print(f"fogline replay: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    print(
        f"replayed {summary.records} records ({summary.fmt}) to {summary.topic} "
        f"in {summary.seconds:.2f} s: {summary.records_per_s:,.0f} rec/s",
        file=sys.stderr,
    )
    print(json.dumps(summary.as_dict()))
    return 0


def register(sub: argparse._SubParsersAction[Any]) -> None:
    """Add ``fogline replay``."""
    p = sub.add_parser(
        "replay",
        help="produce a historical stream (JSONL, CSV or NAB file) into a Kafka topic",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "file", type=Path, metavar="FILE", help="fogline JSONL, CSV with a header, or NAB CSV"
    )
    p.add_argument("--topic", required=True, help="topic to produce to (created if missing)")
    p.add_argument(
        "--bootstrap", default=None, metavar="HOST:PORT", help="overrides kafka.bootstrap_servers"
    )
    p.add_argument(
        "--config", type=Path, default=None, metavar="PATH", help="settings file (YAML or TOML)"
    )
    p.add_argument(
        "--speed",
        type=_positive,
        default=None,
        metavar="X",
        help="X times real time by record timestamps (default: as fast as possible)",
    )
    p.add_argument(
        "--key-field", default="key", metavar="K", help="field/column holding the record key"
    )
    p.add_argument("--format", choices=("auto", "jsonl", "csv", "nab"), default="auto")
    p.add_argument("--lags", type=int, default=8, help="NAB: number of lagged values as features")
    p.add_argument("--partitions", type=int, default=1, help="partitions when the topic is created")
    p.add_argument("--limit", type=int, default=None, metavar="N", help="stop after N records")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_replay)
