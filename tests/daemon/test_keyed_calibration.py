"""Keyed drift calibration: a key's alarm threshold is fitted for a key's rows, not the batch's.

A key's batches hold its own few rows of a partition's micro-batch.  With
``drift.calibration = history`` the threshold is fitted on the warm start's
holdout for ``keyed.rows_per_key`` records per batch; unset, every key
calibrates on its own first batches (``calibration = stream``), never for
``stream.batch_size`` records (a threshold for the mean of 800 records is far
too tight for the mean of 16: 51 false alarms where 2.2 were expected,
docs/drift.md).
"""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from daemon_fakes import fake_settings
from test_keyed_pipeline import MODEL

from fogline.daemon.config import Settings
from fogline.daemon.stream.keyed_update import KeyedUpdate, key_policy, new_key
from fogline.drift.history import attach_history
from fogline.models.config import ModelConfig
from fogline.models.keyed import fleet_prior
from fogline.models.svi import init_state


def settings(calibration: str = "history", **keyed: Any) -> Settings:
    dotted: dict[str, Any] = {
        "keyed.enabled": True,
        "drift.policy": "forget",
        "drift.calibration": calibration,
        "drift.n_streams": 50,
        "drift.ensemble_size": 8,
    }
    dotted.update({f"keyed.{k}": v for k, v in keyed.items()})
    return fake_settings(MODEL, batch_size=800).override(dotted)


def warm_with_history() -> Any:
    """A fleet prior that carries a 512-record history reference."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(512, 2, generator=g)
    y = torch.sin(3 * x[:, 0]) + 0.1 * torch.randn(512, generator=g)
    state = init_state(ModelConfig.model_validate({"in_features": 2, "hidden": (8,)}), seed=0)
    return fleet_prior(attach_history(state, x, y))


def test_without_rows_per_key_keys_calibrate_on_their_own_batches() -> None:
    s = settings()
    assert s.stream.batch_size == 800 and s.keyed.rows_per_key is None
    policy = key_policy(s)
    assert policy.calibration == "stream"
    assert policy.model_dump(exclude={"calibration"}) == s.drift.model_dump(exclude={"calibration"})
    update = KeyedUpdate(s)
    assert update.loop is not None
    drift = update.loop.drift_for(new_key(warm_with_history(), "h0"))
    # not fitted on the history for 800 records: the key collects its own window first
    assert drift.policy.calibrating == s.drift.calibration_batches
    assert math.isinf(drift.policy.threshold) and drift.policy.calibration is None


def test_rows_per_key_fits_each_keys_history_threshold_for_its_rows() -> None:
    s = settings(rows_per_key=16)
    assert key_policy(s) is s.drift
    update = KeyedUpdate(s)
    assert update.loop is not None
    drift = update.loop.drift_for(new_key(warm_with_history(), "h0"))
    assert drift.policy.calibrating == 0 and drift.policy.threshold is not None
    assert drift.policy.calibration["source"] == "history"
    assert drift.policy.calibration["batch_size"] == 16


def test_stream_calibration_is_left_as_configured() -> None:
    s = settings("stream")
    assert key_policy(s) is s.drift


def test_rows_per_key_must_be_positive() -> None:
    with pytest.raises(Exception, match="rows_per_key"):
        settings(rows_per_key=0)
