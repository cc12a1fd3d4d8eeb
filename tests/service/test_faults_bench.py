"""The reduced ``fogline bench faults``: the scenarios that no dedicated service test covers
lose and duplicate nothing, and the harness's counts add up.

The other scenarios each have their own service test with the same assertions, so the
suite does not run them twice: ``kill9`` (tests/service/test_crash.py, three kills on
both record shapes), ``redis_pause`` (test_outage.py), ``oversized`` and
``rejected_steps`` (test_faults.py), ``broker_restart_fail``,
``broker_restart_earliest`` and ``topic_recreated_longer`` (test_offset_range.py).
``fogline bench faults --json`` runs all of them.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from fogline.bench.faults import SCENARIOS, run_faults

#: Scenarios without a dedicated service test (see the module docstring).
ONLY_HERE = ("redis_wiped", "two_daemons", "malformed_mix", "latest_deleted", "latest_corrupt")


def test_every_scenario_is_covered_here_or_by_a_dedicated_test() -> None:
    dedicated = {
        "kill9",
        "redis_pause",
        "oversized",
        "rejected_steps",
        "broker_restart_fail",
        "broker_restart_earliest",
        "topic_recreated_longer",
    }
    assert set(ONLY_HERE) | dedicated == set(SCENARIOS)
    assert not set(ONLY_HERE) & dedicated


@pytest.mark.slow
def test_fault_scenarios_lose_and_duplicate_nothing(
    kafka_bootstrap: str, redis_url: str, tmp_path: Path
) -> None:
    result = run_faults(
        bootstrap=kafka_bootstrap,
        redis_url=redis_url,
        workdir=tmp_path,
        n=128,
        only=ONLY_HERE,
        jobs=2,
        verbose=False,
    )
    assert set(result["scenarios"]) == set(ONLY_HERE)
    for name, out in result["scenarios"].items():
        assert out["sent"] > 0, name
        assert out["lost"] == 0, (name, out)
        assert out["duplicates_absorbed"] == 0, (name, out)
        assert out["crash_loops"] == 0 and out["silent_stalls"] == 0, (name, out)
        assert out["passed"], (name, out)
    # every malformed kind the decoder knows reaches the dead-letter topic
    assert result["scenarios"]["malformed_mix"]["dead_lettered"] > 0
    total = result["total"]
    assert total["sent"] == total["absorbed"] + total["dead_lettered"] + total["held_back"]
