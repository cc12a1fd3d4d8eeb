"""Keyed mode with an autoregressive model on the embedded broker and a real redis-server.

A ``{ts, value, host}`` stream of 4 hosts over 2 partitions (malformed records among
them); a warm start fitted on the histories of 2 of the hosts (the fleet prior);
``fogline run`` with ``keyed.enabled`` killed with SIGKILL while it holds absorbed
but uncheckpointed batches and fetched records, then restarted on the rest of the
stream.  Every valid record of a complete batch is absorbed exactly once or counted
as warming (the 2 hosts without history fill their lags first), every key's blob --
posterior, Adam moments, RNG, its own lags and clock -- is bit-identical to an
uninterrupted run's, and ``fogline query --key`` answers each host's next value from
its own posterior and lags (the same numbers as the key's blob gives directly).
"""

from __future__ import annotations

import json
import math
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml

from fogline.bench.crash_replay import start_daemon
from fogline.bench.keyed_daemon import absorbed_total, key_blobs, key_partition, write_keyed_config
from fogline.cli import main
from fogline.daemon.config import Settings
from fogline.daemon.query.serving import load_key
from fogline.daemon.stream.keyed import KeyedPipeline
from fogline.daemon.stream.pipeline import RunOptions
from fogline.daemon.stream.source import ReplayProducer
from fogline.daemon.stream.store import PartitionStore, SnapshotStore
from fogline.models import autoregressive as ar
from fogline.models.fit import FitOptions, fit
from fogline.models.serialize import from_bytes, save
from fogline.models.spec import ModelSpec
from fogline.models.tabular import load_table

pytestmark = pytest.mark.service

SPEC: dict[str, Any] = {
    "mode": "autoregressive",
    "target": "value",
    "timestamp": "ts",
    "key": "host",
    "lags": 3,
    "season": "none",
    "hidden": [8],
}
HOSTS = {"web-1": 10.0, "web-4": 50.0, "db-1": 30.0, "api-1": 70.0}  # partitions 0, 1, 0, 1
HISTORY = ("web-1", "api-1")  # hosts of the warm start's history, one per partition
BATCH = 16
EVERY = 2  # batches per partition checkpoint
T0 = 1_700_000_000


def rows(start: int, n: int, seed: int) -> list[tuple[str, bytes]]:
    """``n`` records per host from step ``start`` (each host's level, a cycle, noise)."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(start, start + n):
        for h, level in HOSTS.items():
            v = level + 2 * math.sin(i / 6) + rng.normal(0, 0.2)
            out.append((h, json.dumps({"ts": T0 + 60 * i, "host": h, "value": round(v, 4)})))
    return [(h, v.encode()) for h, v in out]


def produce(bootstrap: str, topic: str, recs: list[tuple[str, bytes]]) -> None:
    with ReplayProducer(bootstrap, topic) as prod:
        for h, v in recs:
            prod.send(v, key=h, partition=key_partition(h, 2))


def complete(recs: list[tuple[str, bytes]], bad: set[bytes]) -> dict[str, list[ar.Record]]:
    """Each host's valid records inside its partition's complete batches, in order."""
    by_part: dict[int, list[dict[str, Any]]] = {0: [], 1: []}
    for h, v in recs:
        if v not in bad:
            by_part[key_partition(h, 2)].append(json.loads(v))
    out: dict[str, list[ar.Record]] = {}
    for good in by_part.values():
        for o in good[: len(good) // BATCH * BATCH]:
            r = ar.Record(ar.ts_from_ms(o["ts"] * 1000), float(o["value"]), o["host"])
            out.setdefault(o["host"], []).append(r)
    return out


def complete_upto(
    recs: list[tuple[str, bytes]], bad: set[bytes], upto: dict[int, int], depth: int
) -> int:
    """Records stepped (not warming) among the first ``upto[p]`` valid ones of each partition."""
    seen: dict[int, list[str]] = {0: [], 1: []}
    for h, v in recs:
        if v not in bad:
            seen[key_partition(h, 2)].append(h)
    stepped = 0
    for p, hosts in seen.items():
        for h in set(hosts[: upto[p]]):
            n = hosts[: upto[p]].count(h)
            stepped += n if h in HISTORY else max(0, n - depth)
    return stepped


def test_keyed_series_kill9_restart_is_bit_identical_and_queries_per_key(
    tmp_path: Path,
    kafka_bootstrap: str,
    redis_url: str,
    redis_prefix: str,
    topic_factory: Callable[..., str],
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert {key_partition(h, 2) for h in HOSTS} == {0, 1}
    spec = ModelSpec.model_validate(SPEC)
    hist = tmp_path / "history.csv"
    lines = ["ts,host,value"]
    for h, v in rows(0, 60, seed=1):
        if h in HISTORY:
            o = json.loads(v)
            lines.append(f"{o['ts']},{h},{o['value']}")
    hist.write_text("\n".join(lines) + "\n")
    table, _ = load_table(hist, spec)
    warm = tmp_path / "warm.safetensors"
    save(fit(spec, table, FitOptions(epochs=5, samples=10)).state, str(warm))

    bad = {b'{"ts": 1, "host": "web-1", "value": ', b'{"ts": 2, "host": "web-4", "value": "x"}'}
    part1 = rows(60, 30, seed=2)
    part1[37:37] = [("web-1", sorted(bad)[0])]
    part2 = rows(90, 18, seed=3)
    part2[5:5] = [("web-4", sorted(bad)[1])]
    topic = topic_factory(2, "keyed-ar")
    produce(kafka_bootstrap, topic, part1)

    def config(name: str) -> Path:
        cfg = write_keyed_config(
            tmp_path / f"{name}.yaml",
            bootstrap=kafka_bootstrap,
            topic=topic,
            redis_url=redis_url,
            prefix=redis_prefix,
            model=name,
            group=f"g-{name}",
            batch_size=BATCH,
            snapshot_every_batches=EVERY,
            session_timeout_ms=4000,
            lease_ttl_s=2.0,
        )
        data = yaml.safe_load(cfg.read_text())
        data["model"] = SPEC
        cfg.write_text(yaml.safe_dump(data))
        return cfg

    crash_cfg, ref_cfg = config("kar-crash"), config("kar-ref")
    # the crash run holds batches absorbed after its last checkpoint and a partial batch
    depth = ar.spec_depth(spec)
    first = complete(part1, bad)
    total = {p: sum(len(r) for h, r in first.items() if key_partition(h, 2) == p) for p in (0, 1)}
    upto = {p: n // (EVERY * BATCH) * EVERY * BATCH for p, n in total.items()}
    assert sum(upto.values()) < sum(total.values())  # uncheckpointed batches when killed
    checkpointed = complete_upto(part1, bad, upto, depth)
    proc = start_daemon(crash_cfg, tmp_path / "crash.log", "--init", str(warm))
    deadline = time.monotonic() + 60
    while absorbed_total(redis_url, "kar-crash", redis_prefix, 2) < checkpointed:
        assert proc.poll() is None and time.monotonic() < deadline, "crash daemon stalled"
        time.sleep(0.05)
    time.sleep(0.5)  # the last batches absorbed, not checkpointed; the rest buffered
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed = PartitionStore(SnapshotStore(redis_url, "kar-crash", prefix=redis_prefix))
    try:
        for p in (0, 1):  # its checkpoints lie before records it had read
            m = killed.manifest(p)
            on_p = sum(key_partition(h, 2) == p for h, _ in part1)
            assert m is not None and m.offsets[f"{topic}:{p}"] < on_p
    finally:
        killed.close()

    produce(kafka_bootstrap, topic, part2)
    opts = RunOptions(idle_exit_s=1.5, threads=1)
    again = KeyedPipeline(Settings.load(crash_cfg), opts)
    assert again.run() == 0
    ref = KeyedPipeline(
        Settings.load(ref_cfg), RunOptions(idle_exit_s=1.5, threads=1, init_path=warm)
    )
    assert ref.run() == 0

    want = complete(part1 + part2, bad)
    grp, one = (
        key_blobs(redis_url, "kar-crash", redis_prefix),
        key_blobs(redis_url, "kar-ref", redis_prefix),
    )
    assert sorted(grp) == sorted(one) == sorted(HOSTS)
    assert [k for k in one if grp[k] != one[k]] == []  # bit-identical, lags included
    warming = sum(min(len(want[h]), depth) for h in HOSTS if h not in HISTORY)
    assert ref.stats.records_warming == warming
    assert ref.stats.dead_lettered == len(bad)
    valid = sum(len(r) for r in want.values())
    absorbed = sum(from_bytes(b).records_absorbed for b in grp.values())
    assert absorbed == valid - warming  # exactly once
    assert absorbed_total(redis_url, "kar-crash", redis_prefix, 2) == absorbed
    for h in HOSTS:
        stored = ar.stored_series(from_bytes(grp[h]).extra)
        assert stored is not None and stored[1].known_keys() == [h]

    # each host's next value from its own posterior and its own lags, in target units
    means = {}
    store = PartitionStore(SnapshotStore(redis_url, "kar-crash", prefix=redis_prefix))
    try:
        for h in HOSTS:
            assert main(["query", "--config", str(crash_cfg), "--key", h, "--json"]) == 0
            answer = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
            loaded = load_key(store, h, 100, False)
            assert loaded is not None and loaded.series is not None
            x, at = ar.next_inputs(spec, loaded.series[1], h)
            assert x[0, 0] == want[h][-1].value  # lag 1: the host's last absorbed value
            direct = loaded.predict_raw(torch.from_numpy(x), (0.5, 0.9, 0.95), None, "mixture")
            assert answer["key"] == h
            assert answer["ts"] == ar.ts_from_ms(at).isoformat().replace("+00:00", "Z")
            means[h] = answer["predictions"][0]["mean"]
            assert means[h] == pytest.approx(float(direct.mean[0]), rel=1e-6)
    finally:
        store.close()
    assert len(set(means.values())) == len(HOSTS)
