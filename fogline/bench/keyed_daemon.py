"""Keyed daemon records/s (the daemon part of ``fogline bench keyed``) and its test helpers.

``fogline bench keyed --keys 1000 --json`` (its daemon part, :func:`daemon_part`;
``python -m fogline.bench.keyed_daemon`` runs it alone): on an embedded Tansu broker and
redis-server (or ``--bootstrap`` / ``--redis-url``), produce keyed records over
``--keys`` keys into a ``--partitions``-partition topic -- ``--batches`` (8)
batches per partition, 63,984 records at the defaults, or ``--records`` --
then in the same run measure the two sides of the ratio:

1. *baseline*: a bare consume + decode loop in this process
   (:class:`KafkaSource` polls and :func:`decode_batch`, nothing else: no
   batching, no step, no Redis) reading the whole topic in its own group,
   once before and once after the daemon; the baseline is their mean (on a
   shared machine the load drifts during a run; both are reported);
2. *keyed daemon*: ``fogline run --idle-exit-s 5`` with ``keyed.enabled``, as a
   user runs it, once per ``--drift`` policy (default ``forget,off``: the
   default policy, every key through its drift loop over a materialised state
   (:class:`fogline.drift.keyed.KeyedDriftLoop`), then ``off``, plain streaming
   SVI per key stepped in place in the key cache's table), each run over the
   whole topic in its own consumer group and Redis model: count batching, one
   torch thread, the consumer in a child
   process (``stream.source_process``; ``--no-source-process``: in-process,
   with ``stream.prefetch`` unless ``--no-prefetch``), and partition
   checkpoints every ``--snapshot-every-batches`` batches of a partition
   (default 4) besides the final ones.  The batch size is what a user would
   configure for about ``--rows-per-key`` rows per key in each step:
   ``stream.batch_size = rows_per_key x keys / partitions`` (a keyed batch is
   one partition's records, holding about ``keys / partitions`` keys; 1,333
   at 8 rows per key, 1,000 keys, 6 partitions), unless ``--batch-size``.

   Two rates: ``keyed_records_per_s`` is the *steady state*, the records
   absorbed after the first batch over the time from the end of the first
   absorbed batch to the end of the last (the daemon's ``daemon_stopped``
   event carries it): it includes decoding, batching, every key step, the
   key cache and the periodic checkpoints (key blobs, manifest and key index
   written to Redis, offsets committed); start-up, the group join, the first
   batch's warm-up and the final checkpoints are outside it.
   ``keyed_end_to_end_records_per_s`` runs from the first
   ``partition_resumed`` to ``daemon_stopped`` (every partition's final
   checkpoint written) less the idle wait.

The last line printed (``--json``) holds ``baseline_records_per_s`` and, for the
first (headline) policy, ``keyed_records_per_s``, ``daemon_ratio`` (steady state
/ baseline, goal >= 0.7), ``daemon_end_to_end_ratio``, the records absorbed, the
checkpoints written and ``daemon_blob_bytes_per_key`` (mean size of a key's
blob in Redis); the same fields of every policy under its name
(``keyed_forget_records_per_s``, ``daemon_forget_ratio``, ``daemon_off_ratio``, ...).
The baseline runs before the first daemon and after the last.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from fogline.bench.crash_replay import daemon_argv, log_events, write_config
from fogline.daemon.embedded import EmbeddedKafka, EmbeddedRedis
from fogline.daemon.stream.decode import Decoder, decode_batch
from fogline.daemon.stream.source import KafkaSource, ReplayProducer, create_topic
from fogline.daemon.stream.store import PartitionStore, SnapshotStore

#: Features of the keyed benchmark's model.
FEATURES = ("f0", "f1", "f2", "f3")
KEY_FIELD = "host"
#: Idle seconds after which the benchmarked daemon stops (subtracted from its time).
IDLE_EXIT_S = 5.0


@dataclass(frozen=True)
class KeyedRecords:
    """A produced keyed stream: (partition, key, value) in send order, and the bad ones."""

    rows: list[tuple[int, str, bytes]]
    bad: frozenset[int]
    partitions: int

    def valid_per_partition(self) -> dict[int, int]:
        """Valid records per partition."""
        out: dict[int, int] = dict.fromkeys(range(self.partitions), 0)
        for i, (p, _, _) in enumerate(self.rows):
            if i not in self.bad:
                out[p] += 1
        return out

    def absorbable(self, batch_size: int) -> int:
        """Valid records in complete count batches (a partial last batch waits for more)."""
        return sum(n // batch_size * batch_size for n in self.valid_per_partition().values())


def key_partition(key: str, partitions: int) -> int:
    """The partition a key is produced to (a stable hash, as a keyed producer does)."""
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:4], "big") % partitions


def make_keyed_records(
    n: int, keys: int, partitions: int, *, bad_every: int = 0, seed: int = 0
) -> KeyedRecords:
    """``n`` records over ``keys`` keys, ``y = sin(3 f0) + 0.3 * key offset + noise``.

    Each key has its own offset (so key posteriors differ); with ``bad_every``
    every so many records one is malformed (invalid JSON).
    """
    rng = np.random.default_rng(seed)
    names = [f"h{i:04d}" for i in range(keys)]
    shift = rng.normal(0.0, 1.0, keys)
    x = rng.standard_normal((n, len(FEATURES)))
    who = rng.integers(0, keys, n)
    noise = rng.standard_normal(n)
    rows: list[tuple[int, str, bytes]] = []
    bad: set[int] = set()
    for i in range(n):
        k = names[int(who[i])]
        p = key_partition(k, partitions)
        if bad_every and i % bad_every == bad_every - 1:
            rows.append((p, k, b'{"ts": 1, "f0": '))
            bad.add(i)
            continue
        y = np.sin(3 * x[i, 0]) + 0.3 * shift[int(who[i])] + 0.1 * noise[i]
        rec: dict[str, Any] = {"ts": 1_700_000_000 + i, KEY_FIELD: k, "y": round(float(y), 5)}
        rec.update({f: round(float(v), 5) for f, v in zip(FEATURES, x[i], strict=True)})
        rows.append((p, k, json.dumps(rec).encode()))
    return KeyedRecords(rows, frozenset(bad), partitions)


def produce_keyed(bootstrap: str, topic: str, records: KeyedRecords) -> None:
    """Produce ``records`` (each to its key's partition, Kafka key = the key)."""
    with ReplayProducer(bootstrap, topic) as prod:
        for p, k, v in records.rows:
            prod.send(v, key=k, partition=p)


def write_keyed_config(path: Path, *, hidden: Sequence[int] = (16,), **kw: Any) -> Path:
    """A daemon settings file in keyed mode (``crash_replay.write_config`` plus the keyed parts)."""
    max_keys = kw.pop("max_keys", 10_000)
    idle_ttl_s = kw.pop("idle_ttl_s", 600.0)
    prefetch = kw.pop("prefetch", None)
    source_process = kw.pop("source_process", None)
    write_config(path, **kw)
    cfg = yaml.safe_load(path.read_text(encoding="utf-8"))
    if prefetch is not None:
        cfg["stream"]["prefetch"] = bool(prefetch)
    if source_process is not None:
        cfg["stream"]["source_process"] = bool(source_process)
    cfg["model"] = {
        "features": list(FEATURES),
        "target": "y",
        "key": KEY_FIELD,
        "hidden": list(hidden),
        "transform": "none",
    }
    cfg["keyed"] = {"enabled": True, "max_keys": max_keys, "idle_ttl_s": idle_ttl_s}
    path.write_text(yaml.safe_dump(cfg), encoding="utf-8")
    return path


def key_blobs(redis_url: str, model: str, prefix: str) -> dict[str, bytes]:
    """Every key's checkpointed blob of ``model``."""
    store = PartitionStore(SnapshotStore(redis_url, model, prefix=prefix))
    try:
        keys = sorted(store.key_index())
        return store.read_keys(keys)
    finally:
        store.close()


def absorbed_total(redis_url: str, model: str, prefix: str, partitions: int) -> int:
    """Records absorbed over every partition's last checkpoint."""
    store = PartitionStore(SnapshotStore(redis_url, model, prefix=prefix))
    try:
        total = 0
        for p in range(partitions):
            m = store.manifest(p)
            total += m.records_absorbed if m else 0
        return total
    finally:
        store.close()


def baseline_rate(bootstrap: str, topic: str, n: int) -> float:
    """Records/s of a bare consume + decode loop over the first ``n`` records of ``topic``.

    Under the collector settings the daemon's processes run with
    (:func:`~fogline.daemon.gc_tuning.streaming_gc`, restored afterwards):
    ``fogline run`` and its consumer child tune theirs, and the loop gains as
    much from it (40-50k records/s with CPython's defaults, 56-63k tuned, on a
    2-core machine), so the ratio is the daemon's own overhead, not a handicap
    of the baseline.
    """
    from fogline.daemon.gc_tuning import streaming_gc

    dec = Decoder(list(FEATURES))
    src = KafkaSource(bootstrap, topic, f"bench-{uuid.uuid4().hex[:8]}", session_timeout_ms=6000)
    try:
        with streaming_gc():
            seen = 0
            t0: float | None = None
            while seen < n:
                raws = src.poll(2000, 200)
                if raws and t0 is None:
                    t0 = time.perf_counter()
                decode_batch(raws, dec)
                seen += len(raws)
            assert t0 is not None
            return n / max(1e-9, time.perf_counter() - t0)
    finally:
        src.close()


def keyed_rate(
    config: Path,
    log: Path,
    redis_url: str,
    model: str,
    prefix: str,
    n: int,
    partitions: int,
    timeout_s: float = 900.0,
) -> tuple[float, float, int, int, float]:
    """Run the keyed daemon over the whole topic (``--idle-exit-s``).

    Returns (steady-state rate, end-to-end rate, absorbed, checkpoints written,
    CPU seconds of the daemon and its consumer child over the whole run).  The steady-state
    rate is the daemon's own (``steady_records_per_s`` of ``daemon_stopped``:
    first to last absorbed batch).  The end-to-end clock runs from the first
    ``partition_resumed`` log event (after the start-up and the group join) to
    ``daemon_stopped`` (after the final checkpoint of every partition) less the
    idle wait before the exit; both count records absorbed (a partial last
    batch per partition is read, not absorbed).  (``--max-records`` would stop early: records read before a
    start-up rebalance are read again and counted twice.)
    """
    used = resource.getrusage(resource.RUSAGE_CHILDREN)
    with log.open("ab") as fh:
        proc = subprocess.Popen(
            [*daemon_argv(config), "--idle-exit-s", str(IDLE_EXIT_S)],
            stdout=fh,
            stderr=subprocess.STDOUT,
        )
    try:
        proc.wait(timeout=timeout_s)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    done = resource.getrusage(resource.RUSAGE_CHILDREN)  # the daemon and its consumer child
    cpu_s = done.ru_utime + done.ru_stime - used.ru_utime - used.ru_stime
    events = log_events(log)
    starts = [_ts(e) for e in events if e.get("event") == "partition_resumed"]
    stops = [_ts(e) for e in events if e.get("event") == "daemon_stopped"]
    if not starts or not stops:
        raise RuntimeError(f"keyed daemon did not run to the end; see {log}")
    absorbed = absorbed_total(redis_url, model, prefix, partitions)
    stopped = [e for e in events if e.get("event") == "daemon_stopped"][-1]
    steady = float(stopped.get("steady_records_per_s") or 0.0)
    end_to_end = absorbed / max(1e-9, stops[-1] - IDLE_EXIT_S - min(starts))
    return steady, end_to_end, absorbed, int(stopped.get("checkpoints") or 0), cpu_s


def _ts(event: dict[str, Any]) -> float:
    from datetime import datetime

    return datetime.fromisoformat(str(event["timestamp"]).replace("Z", "+00:00")).timestamp()


def keyed_batch_size(rows_per_key: float, keys: int, partitions: int) -> int:
    """``stream.batch_size`` for about ``rows_per_key`` rows per key in a partition's batch.

    A keyed batch holds one partition's records, so about ``keys / partitions``
    keys: ``rows_per_key x keys / partitions`` rows (at least 1).
    """
    return max(1, round(rows_per_key * keys / max(1, partitions)))


def daemon_part(
    *,
    keys: int = 1000,
    records: int | None = None,
    batches: int = 8,
    partitions: int = 6,
    rows_per_key: float = 8.0,
    batch_size: int | None = None,
    snapshot_every_batches: int = 4,
    hidden: Sequence[int] = (16,),
    bootstrap: str | None = None,
    redis_url: str | None = None,
    log_dir: Path | None = None,
    prefetch: bool = True,
    source_process: bool = True,
    policies: Sequence[str] = ("forget", "off"),
) -> dict[str, Any]:
    """Records/s of the keyed daemon against a bare consume + decode loop, same run.

    ``policies``: the ``drift.policy`` of each daemon run, in order, each over the
    whole topic in its own consumer group and Redis model; the first is the
    headline (``keyed_records_per_s``, ``daemon_ratio``), every one is reported
    under its own name (``daemon_<policy>_ratio`` ...).

    ``batch_size``: default :func:`keyed_batch_size` of ``rows_per_key``;
    ``records``: default ``batches`` batches per partition (the steady state
    spans the same number of batches whatever the batch size); ``prefetch``
    applies with ``source_process`` off only; ``log_dir``: where to keep the
    daemon's log (default: dropped with the run).
    """
    if batch_size is None:
        batch_size = keyed_batch_size(rows_per_key, keys, partitions)
    if records is None:
        records = batches * batch_size * partitions
    if not policies:
        raise ValueError("policies: at least one drift policy to run")
    runs: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory() as tmp_s, contextlib.ExitStack() as stack:
        tmp = Path(tmp_s)
        if bootstrap is None:
            bootstrap = stack.enter_context(EmbeddedKafka()).bootstrap_servers
        if redis_url is None:
            redis_url = stack.enter_context(EmbeddedRedis()).url
        topic = f"keyed-bench-{uuid.uuid4().hex[:8]}"
        create_topic(bootstrap, topic, partitions)
        recs = make_keyed_records(records, keys, partitions)
        produce_keyed(bootstrap, topic, recs)
        expect = recs.absorbable(batch_size)
        before = baseline_rate(bootstrap, topic, records)
        for policy in policies:
            model, prefix = f"keyed-{uuid.uuid4().hex[:6]}", "fogline-bench"
            cfg = write_keyed_config(
                tmp / f"keyed-{policy}.yaml",
                bootstrap=bootstrap,
                topic=topic,
                redis_url=redis_url,
                model=model,
                prefix=prefix,
                batch_size=batch_size,
                snapshot_every_batches=snapshot_every_batches,
                snapshot_every_seconds=30.0,
                hidden=hidden,
                prefetch=prefetch,
                source_process=source_process,
                policy=policy,
            )
            log = tmp / f"keyed-{policy}.log"
            rate, end_to_end, absorbed, checkpoints, cpu_s = keyed_rate(
                cfg, log, redis_url, model, prefix, records, partitions
            )
            blobs = key_blobs(redis_url, model, prefix)
            if log_dir is not None:
                shutil.copy(log, Path(log_dir) / f"{model}-{policy}.log")
            runs[policy] = {
                "rate": rate,
                "end_to_end": end_to_end,
                "absorbed": absorbed,
                "checkpoints": checkpoints,
                "cpu_s": cpu_s,
                "blobs": len(blobs),
                "blob_bytes": sum(map(len, blobs.values())) / max(1, len(blobs)),
            }
        after = baseline_rate(bootstrap, topic, records)
    base = (before + after) / 2
    out: dict[str, Any] = {
        "daemon_keys": keys,
        "daemon_records": records,
        "daemon_batches_per_partition": records // (batch_size * partitions),
        "daemon_partitions": partitions,
        "daemon_batch_size": batch_size,
        "daemon_hidden": list(hidden),
        "daemon_rows_per_key": rows_per_key,
        "daemon_snapshot_every_batches": snapshot_every_batches,
        "daemon_source_process": source_process,
        "daemon_prefetch": prefetch and not source_process,
        "daemon_policies": list(policies),
        "daemon_policy": policies[0],
        "baseline_records_per_s": round(base, 1),
        "baseline_before_records_per_s": round(before, 1),
        "baseline_after_records_per_s": round(after, 1),
        "daemon_absorbable": expect,
    }
    for i, (policy, r) in enumerate(runs.items()):
        part = {
            # steady state: end of the first absorbed batch to the end of the last
            "keyed_records_per_s": round(r["rate"], 1),
            "ratio": round(r["rate"] / base, 4),
            # first partition_resumed to the final checkpoints, idle wait subtracted
            "keyed_end_to_end_records_per_s": round(r["end_to_end"], 1),
            "end_to_end_ratio": round(r["end_to_end"] / base, 4),
            "absorbed": r["absorbed"],
            "checkpoints": r["checkpoints"],
            # user + system CPU of the daemon process tree, start-up and idle wait included
            "cpu_s": round(r["cpu_s"], 2),
            # False: the daemon idled out before absorbing every complete batch (the rate is
            # then not the daemon's throughput; keep its log with --log-dir)
            "complete": r["absorbed"] == expect,
            "keys_written": r["blobs"],
            "blob_bytes_per_key": round(r["blob_bytes"]),
        }
        out.update({_named(k, policy): v for k, v in part.items()})
        if i == 0:  # the headline: the first policy under the unqualified names
            out.update({_named(k, None): v for k, v in part.items()})
    return out


def _named(field: str, policy: str | None) -> str:
    """A daemon field's JSON name: ``keyed_records_per_s`` -> ``keyed_<policy>_records_per_s``,
    ``ratio`` -> ``daemon_<policy>_ratio`` (``policy`` None: the headline's plain names)."""
    if field.startswith("keyed_"):
        rest = field[len("keyed_") :]
        return f"keyed_{policy}_{rest}" if policy else field
    return f"daemon_{policy}_{field}" if policy else f"daemon_{field}"


def main(argv: list[str] | None = None) -> int:
    """``python -m fogline.bench.keyed_daemon``: the daemon part alone."""
    ap = argparse.ArgumentParser(prog="python -m fogline.bench.keyed_daemon", description=__doc__)
    ap.add_argument("--keys", type=int, default=1000)
    ap.add_argument(
        "--records", type=int, default=None, help="records (default: --batches per partition)"
    )
    ap.add_argument("--batches", type=int, default=8, help="batches per partition (default 8)")
    ap.add_argument("--partitions", type=int, default=6)
    ap.add_argument(
        "--rows-per-key",
        type=float,
        default=8.0,
        help="rows per key in a batch: batch size = rows x keys / partitions (default 8)",
    )
    ap.add_argument("--batch-size", type=int, default=None, help="override the batch size")
    ap.add_argument(
        "--snapshot-every-batches",
        type=int,
        default=4,
        help="checkpoint each partition every so many of its batches (0: at 30 s and the end)",
    )
    ap.add_argument("--hidden", type=int, default=16)
    ap.add_argument("--bootstrap", default=None)
    ap.add_argument("--redis-url", default=None)
    ap.add_argument("--log-dir", type=Path, default=None, help="keep the daemon's log here")
    ap.add_argument(
        "--no-prefetch",
        action="store_true",
        help="with --no-source-process: stream.prefetch off (poll on the main thread)",
    )
    ap.add_argument(
        "--no-source-process",
        action="store_true",
        help="stream.source_process off: the consumer in the daemon's process",
    )
    ap.add_argument(
        "--drift",
        default="forget,off",
        help="drift.policy of each daemon run, comma-separated; the first is the headline "
        "(default forget,off)",
    )
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    out = daemon_part(
        keys=args.keys,
        records=args.records,
        batches=args.batches,
        partitions=args.partitions,
        rows_per_key=args.rows_per_key,
        batch_size=args.batch_size,
        snapshot_every_batches=args.snapshot_every_batches,
        hidden=(args.hidden,),
        bootstrap=args.bootstrap,
        redis_url=args.redis_url,
        log_dir=args.log_dir,
        prefetch=not args.no_prefetch,
        source_process=not args.no_source_process,
        policies=tuple(p.strip() for p in args.drift.split(",") if p.strip()),
    )
    print(json.dumps(out) if args.json else "\n".join(f"{k}: {v}" for k, v in out.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
