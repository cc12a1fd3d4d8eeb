"""A daemon started from a history-calibrated warm start alarms on its first batches.

The warm start's holdout is stored as the alarm's reference window
(:func:`fogline.drift.history.calibrate_from_history`); the stream is +1.5 off the
history from its first record.  With on-stream calibration the daemon would fit its
threshold on that shifted stream and never alarm; here the first alarm comes within 5
batches, against a real broker and redis-server.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from fogline.bench.crash_replay import make_records, produce, regime0, warm_start
from fogline.daemon.config import Settings
from fogline.daemon.stream.pipeline import Pipeline, RunOptions
from fogline.daemon.stream.store import SnapshotStore
from fogline.drift.config import PolicyConfig
from fogline.drift.history import calibrate_from_history
from fogline.models.serialize import load, save
from tests.conftest import SESSION_TIMEOUT_MS

BATCH = 32


def test_daemon_alarms_from_its_first_batches(
    kafka_bootstrap: str, redis_url: str, fresh_topic: str, redis_prefix: str, tmp_path: Path
) -> None:
    init = warm_start(tmp_path / "init.safetensors", seed=1)
    x, y = regime0(4096, np.random.default_rng(99))  # the warm start's holdout
    state = calibrate_from_history(
        load(init),
        torch.from_numpy(x.astype(np.float32)),
        torch.from_numpy(y.astype(np.float32)),
        PolicyConfig(ert=500),
        batch_size=256,  # the daemon runs 32: it refits at start-up
    )
    save(state, init)
    produce(kafka_bootstrap, fresh_topic, make_records(16 * BATCH, 0, seed=3, shift_at=0.0).values)
    settings = Settings.load(
        None,
        model_name="historic",
        metrics_port=0,
        kafka={
            "bootstrap_servers": kafka_bootstrap,
            "topic": fresh_topic,
            "group_id": f"g-{redis_prefix}",
            "session_timeout_ms": SESSION_TIMEOUT_MS,
        },
        redis={"url": redis_url, "prefix": redis_prefix},
        stream={
            "batch_size": BATCH,
            "batching": "count",
            "snapshot_every_batches": 8,
            "snapshot_every_seconds": 0,
            "lr": 5e-3,
            "device": "cpu",
        },
        drift={"policy": "forget", "ert": 500},
    )
    assert Pipeline(settings, RunOptions(init_path=init, idle_exit_s=2.0)).run() == 0
    store = SnapshotStore(redis_url, "historic", prefix=redis_prefix)
    drift = store.read().meta.drift
    store.close()
    assert drift["calibration"]["source"] == "history"
    assert drift["calibration"]["batch_size"] == BATCH
    first_alarm = next(t for t in drift["transitions"] if t["reason"] == "alarm")
    assert first_alarm["batch"] <= 4
