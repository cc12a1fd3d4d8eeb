"""End-to-end daemon throughput vs a bare consume-and-json-decode loop, same records, same run.

``fogline bench pipeline --json`` starts an embedded broker and redis-server,
produces ``--records`` telemetry records into one partition and measures:

- **raw**: a bare :class:`fogline.daemon.stream.source.KafkaSource` poll loop (kafka-python,
  2048 records per poll) plus ``json.loads`` of every value, timed from the
  first non-empty poll;
- **pipeline**: :class:`fogline.daemon.stream.pipeline.Pipeline` in this process over the
  same topic -- poll, decode and validate, micro-batching, K SVI steps per
  batch, a snapshot every ``--snapshot-every`` batches (Redis, under the
  lease) and offset commits -- with ``drift.policy = off`` (plain SVI);
- **pipeline with drift**: the same with ``--drift-policy`` (default
  ``forget``): per batch also the reference ensemble's scores, the policy,
  and the post-update ensemble's KLs.  The rate is steady state: records absorbed
  between the first and the last batch over the time between them (start-up,
  JIT warm-up and the group join are excluded, as the raw loop has none).

The last line is ``{"pipeline_records_per_s", "raw_consume_records_per_s", "ratio",
"pipeline_drift_records_per_s", "drift_ratio", "drift_after_calibration_ratio"}``
(ratios against the raw loop; the last one leaves out the batches up to the end
of the drift loop's first threshold calibration, a one-off cost per anchoring).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
import uuid
from pathlib import Path

from fogline.bench.crash_replay import make_records, produce, services


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``fogline bench pipeline``."""
    p = argparse.ArgumentParser(prog="bench pipeline", description=__doc__.split("\n\n")[0])
    p.add_argument("--records", type=int, default=60_000)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--steps-per-batch", type=int, default=1)
    p.add_argument("--snapshot-every", type=int, default=50, help="snapshot every N batches")
    p.add_argument(
        "--drift-policy",
        default="forget",
        choices=("none", "reset", "forget", "vb"),
        help="policy of the second pipeline run (the first runs drift.policy=off)",
    )
    p.add_argument(
        "--prefetch",
        action="store_true",
        help="fetch and decode the next poll on a worker thread (stream.prefetch; default off)",
    )
    p.add_argument(
        "--source-process",
        default=None,
        action=argparse.BooleanOptionalAction,
        help="consumer and decoder in a child process (stream.source_process; default: on)",
    )
    p.add_argument("--bootstrap", default=None)
    p.add_argument("--redis-url", default=None)
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)

    import torch

    from fogline.daemon import logs
    from fogline.daemon.config import Settings
    from fogline.daemon.gc_tuning import streaming_gc
    from fogline.daemon.stream.pipeline import Pipeline, RunOptions, RunStats
    from fogline.daemon.stream.source import KafkaSource, create_topic
    from fogline.drift.runner import drift_summary
    from fogline.models.state import PosteriorState

    logs.configure("json", "WARNING")
    torch.set_num_threads(1)
    with services(args.bootstrap, args.redis_url) as (bootstrap, redis_url):
        topic = f"bench-{uuid.uuid4().hex[:8]}"
        create_topic(bootstrap, topic, 1)
        recs = make_records(args.records, 0, seed=0)
        produce(bootstrap, topic, recs.values)

        # raw: a bare consumer (same kafka-python client, same poll size) + json.loads,
        # timed like the pipeline: from the first non-empty poll to the last record; under
        # the collector settings the daemon's consumer child runs with (process_source's
        # answer_requests), so the baseline is not handicapped against it
        src = KafkaSource(
            bootstrap, topic, f"raw-{topic}", session_timeout_ms=6000, max_poll_records=2048
        )
        n_raw, t_first, first_n = 0, 0.0, 0
        deadline = time.monotonic() + 120
        try:
            with streaming_gc():
                while n_raw < args.records and time.monotonic() < deadline:
                    chunk = src.poll(max_records=2048, timeout_ms=100)
                    for r in chunk:
                        json.loads(r.value or b"null")
                    if chunk and not t_first:
                        t_first, first_n = time.perf_counter(), len(chunk)
                    n_raw += len(chunk)
                raw_s = time.perf_counter() - t_first
        finally:
            src.close()
        assert n_raw == args.records, f"raw loop read {n_raw} records"
        raw_rate = (n_raw - first_n) / raw_s

        def run(policy: str) -> tuple[float, float, Pipeline] | None:
            marks: list[tuple[float, int, bool]] = []

            def on_batch(stats: RunStats, state: PosteriorState) -> None:
                calibrated = drift_summary(state).get("calibrating", 0) == 0
                marks.append((time.perf_counter(), state.records_absorbed, calibrated))

            settings = Settings.load(
                None,
                model_name=f"bench-{uuid.uuid4().hex[:6]}",
                metrics_port=0,
                kafka={
                    "bootstrap_servers": bootstrap,
                    "topic": topic,
                    "group_id": f"g-{policy}-{topic}",
                    "session_timeout_ms": 6000,
                },
                redis={"url": redis_url},
                stream={
                    "batch_size": args.batch_size,
                    "batching": "count",
                    "steps_per_batch": args.steps_per_batch,
                    "snapshot_every_batches": args.snapshot_every,
                    "snapshot_every_seconds": 0,
                    "device": "cpu",
                    **(
                        {}
                        if args.source_process is None
                        else {"source_process": args.source_process}
                    ),
                },
                drift={"policy": policy},
            )
            pipe = Pipeline(
                settings,
                RunOptions(
                    max_records=args.records,
                    threads=1,
                    prefetch=args.prefetch,
                    on_batch=on_batch,
                ),
            )
            code = pipe.run()
            if code != 0 or len(marks) < 2:
                print(f"pipeline run failed (exit {code}, {len(marks)} batches)", file=sys.stderr)
                return None
            (t_a, n_a, _), (t_b, n_b, _) = marks[0], marks[-1]
            # after the first threshold calibration (a one-off ~1 s per (re-)anchoring)
            t_c, n_c, _ = next(m for m in marks if m[2])
            after = (n_b - n_c) / (t_b - t_c) if t_b > t_c else math.nan
            return (n_b - n_a) / (t_b - t_a), after, pipe

        plain = run("off")
        drift = run(args.drift_policy)
        if plain is None or drift is None:
            return 1
        pipe_rate, _, pipe = plain
        drift_rate, drift_after, _ = drift
    result = {
        "pipeline_records_per_s": round(pipe_rate, 1),
        "raw_consume_records_per_s": round(raw_rate, 1),
        "ratio": round(pipe_rate / raw_rate, 3),
        "pipeline_drift_records_per_s": round(drift_rate, 1),
        "drift_ratio": round(drift_rate / raw_rate, 3),
        "drift_after_calibration_ratio": round(drift_after / raw_rate, 3),
    }
    detail = {
        "records": args.records,
        "batch_size": args.batch_size,
        "steps_per_batch": args.steps_per_batch,
        "snapshots": pipe.stats.snapshots,
        "batches": pipe.stats.batches,
        "threads": 1,
        "device": "cpu",
        "drift_policy": args.drift_policy,
        "prefetch": args.prefetch,
        "source_process": pipe.settings.stream.source_process,
        "script": Path(__file__).name,
    }
    print(json.dumps(detail))
    print(json.dumps(result) if args.json else result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
