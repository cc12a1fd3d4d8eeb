"""``fogline run`` (the streaming daemon) and ``fogline demo`` (everything embedded).

``fogline run`` exit statuses: 0 clean stop (final snapshot written, offsets
committed); 1 the final snapshot could not be written; 2 bad configuration
(one line naming the field; a ``model`` section that contradicts the
snapshot or ``--init`` state prints one ``model.<field>: ...`` line each); 3 another daemon holds the writer lease of the
model (with ``--lease-wait-s``) or took it over; 4 a snapshot offset lies beyond
its partition's end and ``stream.offset_out_of_range`` is ``fail``;
5 the model has snapshot versions but none is intact (``--allow-fresh``
starts afresh instead); 7 (keyed mode) the topic was repartitioned or a key
moved to another partition.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from fogline.daemon.config import ConfigError, Settings


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    """Settings overrides from the command-line flags (``None`` = not given)."""
    kafka = {"bootstrap_servers": args.bootstrap, "topic": args.topic, "group_id": args.group}
    out: dict[str, Any] = {
        "model_name": args.model,
        "kafka": {k: v for k, v in kafka.items() if v is not None} or None,
        "redis": {"url": args.redis_url} if args.redis_url else None,
        "metrics_port": args.metrics_port,
        "log_format": args.log_format,
    }
    stream: dict[str, Any] = {}
    if args.init is not None:
        stream["init_path"] = args.init
    if getattr(args, "allow_fresh", False):
        stream["allow_fresh"] = True
    if stream:
        out["stream"] = stream
    return out


def load_settings(args: argparse.Namespace, command: str) -> Settings | None:
    """Settings from ``--config``, the environment and the flags; ``None`` after printing an error."""
    try:
        return Settings.load(args.config, **_overrides(args))
    except ConfigError as exc:
        detail = "; ".join(exc.problems) if exc.problems else str(exc)
        print(f"fogline {command}: invalid configuration: {detail}", file=sys.stderr)
        return None


def _run(args: argparse.Namespace) -> int:
    settings = load_settings(args, "run")
    if settings is None:
        return 2
    from fogline.daemon import logs

    logs.configure(settings.log_format, settings.log_level)
    from fogline.daemon.stream.pipeline import Pipeline, RunOptions
    from fogline.daemon.stream.runtime import StopFlag

    if settings.metrics_port:
        from prometheus_client import start_http_server

        from fogline.daemon.metrics import REGISTRY

        host = str(getattr(settings, "metrics_host", "127.0.0.1"))
        start_http_server(settings.metrics_port, addr=host, registry=REGISTRY)
    stop = StopFlag().install()
    options = RunOptions(
        init_path=args.init,
        max_records=args.max_records,
        idle_exit_s=args.idle_exit_s,
        lease_wait_s=args.lease_wait_s,
        threads=args.threads or None,
    )
    if settings.keyed.enabled:
        return _run_keyed(settings, options, stop)
    _tune_gc()
    pipe = Pipeline(settings, options, stop)
    try:
        code = pipe.run()
    finally:
        stop.restore()
    if code == 2:
        print(
            "fogline run: invalid configuration (the model section vs the state):", file=sys.stderr
        )
        for line in pipe.stats.exit_reason.splitlines():
            print(f"  {line}", file=sys.stderr)
    elif code == 3:
        print("fogline run: another daemon holds the writer lease of this model", file=sys.stderr)
    elif code in (4, 6):
        print(f"fogline run: {pipe.stats.exit_reason}", file=sys.stderr)
    elif code == 5:
        print(
            "fogline run: the model has snapshot versions but none is intact "
            "(see the no_intact_snapshot log event); --allow-fresh starts afresh",
            file=sys.stderr,
        )
    return code


def _tune_gc() -> None:
    """After the daemon's imports: freeze the start-up heap, raise the collector's
    thresholds (:mod:`fogline.daemon.gc_tuning`), and keep freed tensor memory in
    the heap for the next batch (:mod:`fogline.daemon.malloc_tuning`)."""
    from fogline.daemon.gc_tuning import tune_for_streaming
    from fogline.daemon.malloc_tuning import tune_malloc

    tune_for_streaming()
    tune_malloc()


def _run_keyed(settings: Settings, options: Any, stop: Any) -> int:
    """``fogline run`` with ``keyed.enabled``: one posterior per key (docs/operations.md)."""
    from fogline.daemon.stream.keyed import EXIT_REPARTITIONED, KeyedPipeline

    _tune_gc()
    pipe = KeyedPipeline(settings, options, stop)
    try:
        code = pipe.run()
    finally:
        stop.restore()
    if code == 2:
        print(f"fogline run: invalid configuration: {pipe.stats.exit_reason}", file=sys.stderr)
    elif code == EXIT_REPARTITIONED:
        print(f"fogline run: {pipe.stats.exit_reason}", file=sys.stderr)
    return code


def _demo(args: argparse.Namespace) -> int:
    from fogline.daemon.demo import main as demo_main

    # The demo builds its settings only after starting the broker and redis;
    # check the environment's FOGLINE_* values first (exit 2 before anything starts).
    Settings.load(None)
    if args.data is not None or args.config is not None:
        if args.data is None or args.config is None:
            print("fogline demo: --config and --data go together", file=sys.stderr)
            return 2
        from fogline.daemon.demo_data import main as demo_data_main

        return demo_data_main(args)
    return demo_main(args)


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", type=Path, default=None, help="settings file (YAML or TOML)")
    p.add_argument("--model", default=None, help="model name (settings model_name)")
    p.add_argument("--bootstrap", default=None, help="Kafka bootstrap servers host:port[,...]")
    p.add_argument("--topic", default=None, help="telemetry topic")
    p.add_argument("--group", default=None, help="consumer group id")
    p.add_argument("--redis-url", default=None, help="redis://host:port/db of the snapshot store")


def register(sub: argparse._SubParsersAction[Any]) -> None:
    """Add ``fogline run`` and ``fogline demo``."""
    p = sub.add_parser(
        "run",
        help="run the streaming daemon: Kafka in, posterior updates, Redis snapshots out",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_common(p)
    p.add_argument(
        "--init",
        type=Path,
        default=None,
        help="warm-start state file used when Redis holds no snapshot (fogline warmstart)",
    )
    p.add_argument(
        "--allow-fresh",
        action="store_true",
        help="start from --init or a fresh prior even if the model's snapshots are all damaged",
    )
    p.add_argument("--metrics-port", type=int, default=None, help="Prometheus port (0: off)")
    p.add_argument("--log-format", choices=("json", "console", "auto"), default=None)
    p.add_argument(
        "--max-records", type=int, default=None, help="stop after reading N records (tests, demo)"
    )
    p.add_argument(
        "--idle-exit-s",
        type=float,
        default=None,
        help="stop after S seconds without a record (tests, demo)",
    )
    p.add_argument(
        "--lease-wait-s",
        type=float,
        default=None,
        help="how long to wait for another daemon's writer lease (default: forever; 0: exit 3)",
    )
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads (default 1: fastest for small nets and reproducible; 0: torch's)",
    )
    p.set_defaults(func=_run)

    d = sub.add_parser(
        "demo",
        help="embedded end-to-end demo: broker, redis, warm start, drifting stream, daemon",
    )
    d.add_argument("--out", type=Path, default=Path("fogline-out"), help="output directory")
    d.add_argument("--batches", type=int, default=150, help="batches in the replayed stream")
    d.add_argument(
        "--batch-size",
        type=int,
        default=None,
        help="records per batch (default 64; with --data: the config's stream.batch_size)",
    )
    d.add_argument("--scenario", default="abrupt", help="replay_data scenario")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--speed", type=float, default=0.0, help="records/s to replay (0: all at once)")
    d.add_argument(
        "--warm-epochs", type=int, default=60, help="epochs of the synthetic demo's warm start"
    )
    d.add_argument(
        "--config",
        type=Path,
        default=None,
        help="with --data: settings whose [model] section describes the file (docs/model.md)",
    )
    d.add_argument(
        "--data",
        type=Path,
        default=None,
        help="your own CSV/JSONL/Parquet: warm start on its first part, replay the rest, query",
    )
    d.add_argument(
        "--warm-fraction",
        type=float,
        default=0.5,
        help="with --data: share of rows for the warm start",
    )
    d.add_argument("--epochs", type=int, default=None, help="with --data: warm-start epochs")
    d.add_argument(
        "--drop-invalid", action="store_true", help="with --data: skip rows that do not validate"
    )
    d.add_argument(
        "--policy",
        choices=("off", "none", "reset", "forget", "vb"),
        default="forget",
        help="drift policy (default forget)",
    )
    d.set_defaults(func=_demo)
