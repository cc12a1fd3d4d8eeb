"""``fogline demo --config CFG --data FILE``: the whole loop on the user's own data.

1. start an embedded Tansu broker and a redis-server on free loopback ports;
2. read ``FILE`` (CSV, JSONL or Parquet) by the ``model`` section of ``CFG``
   (:func:`fogline.models.tabular.load_table`), ordered by its timestamp
   field when it has one;
3. warm-start (:func:`fogline.models.fit.fit`) on the first ``--warm-fraction``
   of the rows (default 0.5) and store its holdout as the drift alarm's
   reference (:func:`fogline.drift.history.calibrate_from_history`);
4. replay the rest into a fresh topic as flat named records in raw units,
   with their own timestamps as the Kafka timestamps;
5. run the daemon on it with ``CFG``'s settings (broker, redis and model name
   replaced by the embedded ones), live progress as in the synthetic demo;
6. start the query service on the live snapshot and ask it, by name and in
   raw units, about the training medians (in range) and about the first
   feature pushed 4 interquartile ranges past its 99.5th training percentile
   (out of range); write ``bands.png`` along that feature and ``summary.json``.
"""

from __future__ import annotations

import argparse
import json
import time
import uuid
from pathlib import Path
from typing import Any


def main(args: argparse.Namespace) -> int:
    """Run the own-data demo; return an exit status (2 for a bad config or data file)."""
    import torch
    from rich.console import Console

    from fogline.daemon import logs
    from fogline.daemon.config import ConfigError, Settings
    from fogline.daemon.demo import query_step, run_live
    from fogline.daemon.embedded import EmbeddedKafka, EmbeddedRedis
    from fogline.daemon.names import dlq_topic_for
    from fogline.daemon.stream.runtime import StopFlag
    from fogline.daemon.stream.source import ReplayProducer, create_topic, read_topic
    from fogline.daemon.stream.store import SnapshotStore
    from fogline.drift.history import calibrate_from_history
    from fogline.drift.runner import drift_summary
    from fogline.models.fit import FitError, FitOptions, fit
    from fogline.models.schema import SchemaError
    from fogline.models.serialize import save
    from fogline.models.tabular import RowError, TableError, load_table

    console = Console()
    try:
        base = Settings.load(args.config)
    except ConfigError as exc:
        console.print(f"fogline demo: {exc}")
        return 2
    if base.model is None:
        console.print(f"fogline demo: {args.config} has no [model] section (docs/model.md)")
        return 2
    spec = base.model
    if not 0.05 <= args.warm_fraction <= 0.95:
        console.print("fogline demo: --warm-fraction must lie in [0.05, 0.95]")
        return 2
    try:
        table, _report = load_table(args.data, spec, drop_invalid=args.drop_invalid)
    except (TableError, RowError, SchemaError, OSError, ValueError) as exc:
        console.print(f"fogline demo: {exc}")
        return 2
    order = (
        torch.argsort(table.ts, stable=True) if table.ts is not None else torch.arange(table.rows)
    )
    n_warm = round(args.warm_fraction * table.rows)
    warm_idx, live_idx = order[:n_warm], order[n_warm:]
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    logs.configure("json", "ERROR")
    torch.set_num_threads(1)
    stop = StopFlag().install()
    try:
        with console.status(f"warm start on the first {n_warm} of {table.rows} rows"):
            try:
                res = fit(
                    spec, _rows(table, warm_idx), FitOptions(epochs=args.epochs, seed=args.seed)
                )
            except (FitError, SchemaError) as exc:
                console.print(f"fogline demo: {exc}")
                return 2
            state = res.state
            batch = base.stream.batch_size if args.batch_size is None else args.batch_size
            try:
                state = calibrate_from_history(
                    state,
                    res.x_held,
                    res.y_held,
                    base.drift,
                    batch_size=batch,
                    seed=base.stream.seed,
                )
            except (ValueError, RuntimeError) as exc:
                console.print(f"no alarm reference ({exc}); the daemon calibrates on the stream")
            init_path = out / "init.safetensors"
            save(state, str(init_path))
        hold = res.report["holdout"]
        console.print(
            f"warm start: holdout n={hold['n']} nll {hold['nll']:.3f}"
            + (f", rmse {hold['rmse']:.4g}" if "rmse" in hold else "")
            + (f", coverage_95 {hold['coverage_95']:.3f}" if "coverage_95" in hold else "")
        )
        with console.status("starting the embedded broker and redis-server"):
            kafka = EmbeddedKafka().start()
            redis = EmbeddedRedis().start()
        try:
            topic = f"demo-{uuid.uuid4().hex[:6]}"
            create_topic(kafka.bootstrap_servers, topic, 1)
            with ReplayProducer(kafka.bootstrap_servers, topic) as prod:
                for value, ts in _records(table, live_idx, spec):
                    prod.send(value, timestamp_ms=ts)
            console.print(f"replayed the other {int(live_idx.numel())} rows into {topic}")
            settings = base.override(
                {
                    "model_name": "demo",
                    "metrics_port": 0,
                    "kafka.bootstrap_servers": kafka.bootstrap_servers,
                    "kafka.topic": topic,
                    "kafka.dlq_topic": dlq_topic_for(topic),
                    "kafka.group_id": "demo",
                    "kafka.session_timeout_ms": 6000,
                    "redis.url": redis.url,
                    "redis.password": None,
                    "stream.batch_size": batch,
                    "stream.batching": "count",
                    "stream.snapshot_every_batches": 10,
                    "stream.snapshot_every_seconds": 2,
                }
            )
            t0 = time.perf_counter()
            pipe, code, _history = run_live(
                console, settings, init_path, stop, title=str(args.data)
            )
            meta = SnapshotStore(redis.url, "demo").read_meta()
            dlq = read_topic(kafka.bootstrap_servers, dlq_topic_for(topic), timeout_s=10)
            ps = drift_summary(pipe.state) if pipe.state else {}
            x_train_raw = res.schema.x_from_model(res.x_train.double())
            median = x_train_raw.median(0).values
            q_lo, q_hi = (torch.quantile(x_train_raw[:, 0], q) for q in (0.25, 0.75))
            top = torch.quantile(x_train_raw[:, 0], 0.995)
            outside = float(top + 4 * (q_hi - q_lo))
            summary: dict[str, Any] = {
                "exit": code,
                "data": str(args.data),
                "rows": table.rows,
                "warm_rows": n_warm,
                "records_sent": int(live_idx.numel()),
                "records_absorbed": meta.records_absorbed,
                "dead_lettered": len(dlq),
                "snapshot_version": meta.version,
                "batches": pipe.stats.batches,
                "drift_mode": ps.get("mode"),
                "alarm_batches": [
                    t["batch"] for t in ps.get("transitions", []) if t["reason"] == "alarm"
                ],
                "warmstart": res.report["holdout"],
                "seconds": round(time.perf_counter() - t0, 2),
            }
            console.print_json(json.dumps(summary))
            summary["query"] = query_step(
                console,
                settings,
                [float(v) for v in median],
                feature=0,
                inside=float(median[0]),
                outside=outside,
                path=out / "bands.png",
                names=list(spec.features),
            )
            (out / "summary.json").write_text(json.dumps(summary, indent=2))
            console.print(f"plots and summary in {out}/")
            return code
        finally:
            kafka.close()
            redis.close()
    finally:
        stop.restore()


def _rows(table: Any, idx: Any) -> Any:
    """The rows ``idx`` of ``table`` as a new :class:`~fogline.models.tabular.Table`."""
    from fogline.models.tabular import Table

    keys = [table.keys[i] for i in idx.tolist()] if table.keys is not None else None
    ts = table.ts[idx] if table.ts is not None else None
    return Table(table.x[idx], table.y[idx], ts, keys, table.source)


def _records(table: Any, idx: Any, spec: Any) -> Any:
    """Flat named records (raw units) of the rows ``idx``, with their epoch-ms timestamps."""
    from fogline.daemon.stream.decode import encode
    from fogline.models.tabular import series_view

    ts_name = spec.timestamp or "ts"
    columns = series_view(spec).features  # autoregressive: none, the daemon builds the lags
    for i in idx.tolist():
        rec: dict[str, Any] = dict(zip(columns, table.x[i].tolist(), strict=True))
        rec[spec.target] = float(table.y[i])
        ts = int(table.ts[i]) if table.ts is not None else None
        if ts is not None:
            rec[ts_name] = ts
        if spec.key is not None and table.keys is not None and table.keys[i] is not None:
            rec[spec.key] = table.keys[i]
        yield encode(rec), (ts if ts is not None and ts >= 0 else None)


__all__ = ["main"]
