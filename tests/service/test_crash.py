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
