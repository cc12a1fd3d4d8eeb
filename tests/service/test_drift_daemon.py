"""The drift policy inside the daemon, against a real broker and redis-server.

A warm-started daemon reads a stream with a +1.5 mean shift half-way: it
calibrates on the first batches, raises an alarm within a few batches of the
shift, goes through shifted -> recovering, exports the drift metrics and
writes the policy state into the snapshot metadata and the blob.
"""

from __future__ import annotations

import math
from pathlib import Path

from fogline.bench.crash_replay import make_records, produce, warm_start
from fogline.daemon import metrics
from fogline.daemon.config import Settings
from fogline.daemon.stream.pipeline import Pipeline, RunOptions
from fogline.daemon.stream.store import SnapshotStore
from fogline.drift.policy import PolicyConfig
from fogline.drift.runner import drift_mode, drift_summary, load_drift
from fogline.models.fprior import FunctionalPrior
from fogline.models.serialize import from_bytes
from tests.conftest import SESSION_TIMEOUT_MS

BATCH = 32
VALID = 96 * BATCH  # shift at batch 48


def _settings(bootstrap: str, topic: str, redis_url: str, prefix: str, **drift: object) -> Settings:
    return Settings.load(
        None,
        model_name="drifty",
        metrics_port=0,
        kafka={
            "bootstrap_servers": bootstrap,
            "topic": topic,
            "group_id": f"g-{prefix}",
            "session_timeout_ms": SESSION_TIMEOUT_MS,
        },
        redis={"url": redis_url, "prefix": prefix},
        stream={
            "batch_size": BATCH,
            "batching": "count",
            "steps_per_batch": 4,
            "snapshot_every_batches": 8,
            "snapshot_every_seconds": 0,
            "lr": 5e-3,
            "device": "cpu",
        },
        drift={"policy": "forget", "calibration_batches": 30, "ert": 500, **drift},
    )


def _value(name: str, labels: dict[str, str] | None = None) -> float:
    v = metrics.REGISTRY.get_sample_value(name, labels or {})
    assert v is not None, name
    return v


def test_forget_policy_in_the_daemon(
    kafka_bootstrap: str, redis_url: str, fresh_topic: str, redis_prefix: str, tmp_path: Path
) -> None:
    init = warm_start(tmp_path / "init.safetensors", seed=1)
    recs = make_records(VALID, 0, seed=3, shift_at=0.5)
    produce(kafka_bootstrap, fresh_topic, recs.values)
    alarms_before = _value("fogline_drift_alarms_total")
    settings = _settings(kafka_bootstrap, fresh_topic, redis_url, redis_prefix)
    pipe = Pipeline(settings, RunOptions(init_path=init, idle_exit_s=2.0))
    assert pipe.run() == 0

    store = SnapshotStore(redis_url, "drifty", prefix=redis_prefix)
    snap = store.read()
    assert snap.meta.records_absorbed == VALID
    drift = snap.meta.drift
    assert drift["config"]["policy"] == "forget" and drift["alarms"] >= 1
    first_alarm = next(t for t in drift["transitions"] if t["reason"] == "alarm")
    assert 48 <= first_alarm["batch"] <= 48 + 5  # detection delay <= 5 batches
    entered = {t["to"] for t in drift["transitions"]}
    assert {"shifted", "recovering"} <= entered
    assert drift["threshold"] is not None and math.isfinite(drift["threshold"])

    state = from_bytes(snap.blob)
    assert drift_summary(state) == drift and drift_mode(state) == drift["mode"]
    assert FunctionalPrior.of(state) is not None  # the warm start's prior streams along
    loaded = load_drift(state, PolicyConfig(calibration_batches=30))
    assert loaded is not None and loaded.policy.alarms == drift["alarms"]
    assert loaded.policy.monitor.threshold == drift["threshold"]  # the fitted monitor is back

    assert _value("fogline_drift_alarms_total") - alarms_before == drift["alarms"]
    mode = drift["mode"]
    assert _value("fogline_policy_state", {"state": mode}) == 1
    assert math.isfinite(_value("fogline_surprisal"))
    assert math.isfinite(_value("fogline_predictive_kl"))
    assert _value("fogline_surprisal_threshold") == drift["threshold"]

    # a restart with another detector and policy resumes the stored loop (mode, counters)
    more = make_records(8 * BATCH, 0, seed=4)
    produce(kafka_bootstrap, fresh_topic, more.values)
    other = _settings(
        kafka_bootstrap, fresh_topic, redis_url, redis_prefix, policy="none", detector="adwin"
    )
    assert Pipeline(other, RunOptions(idle_exit_s=2.0)).run() == 0
    snap2 = store.read()
    assert snap2.meta.records_absorbed == VALID + 8 * BATCH
    assert snap2.meta.drift["config"]["policy"] == "none"
    assert snap2.meta.drift["batch"] == drift["batch"] + 8
    # the snapshot carries the ADWIN detector's running state for the next restart
    assert snap2.meta.drift["monitor"]["type"].endswith("ADWINMonitor")
    store.close()
