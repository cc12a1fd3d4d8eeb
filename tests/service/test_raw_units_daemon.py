"""A user's CSV (own names, target not ``y``) replayed by the spec and absorbed in raw units.

Real broker and redis-server; the daemon runs as a subprocess with an ``--init`` state
whose schema was fitted by hand (the warm start's own test is elsewhere).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import yaml
from daemon_runs import run_daemon

from fogline.bench.crash_replay import dlq_reasons, write_config
from fogline.cli import main
from fogline.daemon.stream.source import read_topic
from fogline.daemon.stream.store import SnapshotStore
from fogline.models.schema import DataSchema
from fogline.models.serialize import from_bytes, save
from fogline.models.spec import ModelSpec
from fogline.models.svi import init_state

SPEC = {
    "features": ["cpu", "mem", "disk"],
    "target": "throughput",
    "timestamp": "time",
    "key": "host",
    "transforms": {"mem": "log1p"},
    "hidden": [16],
}


def _rows(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = np.column_stack([rng.normal(50, 10, n), rng.lognormal(1.0, 0.8, n), rng.uniform(0, 1, n)])
    y = 100 + 2.0 * (x[:, 0] - 50) + 5 * np.log1p(x[:, 1]) + rng.normal(0, 3, n)
    return x, y


def test_user_csv_replayed_by_the_spec_is_absorbed_in_model_units(
    kafka_bootstrap: str, redis_url: str, fresh_topic: str, redis_prefix: str, tmp_path: Path
) -> None:
    spec = ModelSpec(**SPEC)
    x_hist, y_hist = _rows(500, 0)
    schema = DataSchema.fit_spec(torch.from_numpy(x_hist), torch.from_numpy(y_hist), spec)
    init = tmp_path / "warm.safetensors"
    save(init_state(spec.to_config(), seed=0).replace(schema=schema), str(init))

    x, y = _rows(200, 1)
    lines = ["time,host,cpu,mem,disk,throughput,comment"]
    for i in range(200):
        lines.append(
            f"{1_700_000_000 + 60 * i},h{i % 3},{x[i, 0]:.4f},{x[i, 1]:.4f},{x[i, 2]:.4f},"
            f"{y[i]:.4f},row {i}"
        )
    lines.insert(51, "1700009999,h1,50,-3,0.5,100,mem below log1p's domain")
    lines.insert(101, "1700019999,h2,50,2,0.5,fast,not a number")
    csv_path = tmp_path / "history.csv"
    csv_path.write_text("\n".join(lines) + "\n")

    cfg = write_config(
        tmp_path / "d.yaml",
        bootstrap=kafka_bootstrap,
        topic=fresh_topic,
        redis_url=redis_url,
        model="raw1",
        prefix=redis_prefix,
        batch_size=32,
        batching="size_or_time",  # the partial last batch is absorbed at the idle exit
    )
    settings = yaml.safe_load(cfg.read_text())
    cfg.write_text(yaml.safe_dump({**settings, "model": SPEC}))

    assert main(["replay", str(csv_path), "--topic", fresh_topic, "--config", str(cfg)]) == 0
    recs = read_topic(kafka_bootstrap, fresh_topic, min_records=202)
    assert json.loads(recs[0].value)["throughput"] == round(float(y[0]), 4)
    assert recs[0].timestamp_ms == 1_700_000_000_000 and recs[0].key == b"h0"

    log = tmp_path / "d.log"
    assert run_daemon(cfg, log, "--init", str(init), "--idle-exit-s", "2") == 0
    with SnapshotStore(redis_url, "raw1", prefix=redis_prefix) as store:
        snap = store.read()
    state = from_bytes(snap.blob)
    assert snap.meta.records_absorbed == 200
    assert state.schema == schema
    dlq = read_topic(kafka_bootstrap, f"{fresh_topic}.dlq", timeout_s=15, min_records=2)
    assert sorted(dlq_reasons(dlq)) == [
        "non_numeric: throughput is str",
        "out_of_domain: mem: log1p needs values > -1",
    ]
