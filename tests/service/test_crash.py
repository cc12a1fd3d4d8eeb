"""kill -9 the daemon at random moments: exactly-once absorption and a bit-identical posterior.

The small variant of ``python -m fogline.bench.crash_replay`` (3 kills, ~3,000 records, drift
policy ``forget`` with a mean shift half-way).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from fogline.bench.crash_replay import crash_replay


@pytest.mark.slow
def test_crash_replay_small(kafka_bootstrap: str, redis_url: str, tmp_path: Path) -> None:
    result = crash_replay(
        bootstrap=kafka_bootstrap,
        redis_url=redis_url,
        workdir=tmp_path,
        n_valid=2976,
        n_bad=40,
        kills=3,
        verbose=False,
    )
    assert result["kills"] == 3
    assert result["absorbed"] == result["valid"] == 2976
    assert result["dead_lettered"] == 40
    assert result["identical"] is True
    # the default drift policy ran through an alarm, shifted and recovering across the kills
    assert result["policy"] == "forget" and result["alarms"] >= 1


@pytest.mark.slow
def test_crash_replay_autoregressive(kafka_bootstrap: str, redis_url: str, tmp_path: Path) -> None:
    """The same kills on univariate ``{ts, value, key}`` telemetry (4 keys, 4 lags + calendar)."""
    result = crash_replay(
        bootstrap=kafka_bootstrap,
        redis_url=redis_url,
        workdir=tmp_path,
        n_valid=1536,
        n_bad=24,
        kills=3,
        verbose=False,
        autoregressive=True,
    )
    assert result["kills"] == 3
    # each key's first 4 records only fill its lag buffer: neither lost nor dead-lettered
    assert result["absorbed"] + result["warming"] == result["valid"] == 1536
    assert result["warming"] == 16
    assert result["dead_lettered"] == 24
    assert result["identical"] is True  # lag state included: it is in the compared blob
