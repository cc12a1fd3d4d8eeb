"""The reduced ``fogline bench faults``: every scenario passes -- no record lost or absorbed
twice, and a recreated topic never skipped silently (the default fails loudly with exit 4,
``earliest`` absorbs the new topic exactly once).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from fogline.bench.faults import SCENARIOS, run_faults


@pytest.mark.slow
def test_fault_scenarios_lose_and_duplicate_nothing(
    kafka_bootstrap: str, redis_url: str, tmp_path: Path
) -> None:
    result = run_faults(
        bootstrap=kafka_bootstrap,
        redis_url=redis_url,
        workdir=tmp_path,
        n=128,
        jobs=2,
        verbose=False,
    )
    assert set(result["scenarios"]) == set(SCENARIOS)
    for name, out in result["scenarios"].items():
        assert out["sent"] > 0, name
        assert out["lost"] == 0, (name, out)
        assert out["duplicates_absorbed"] == 0, (name, out)
        assert out["crash_loops"] == 0 and out["silent_stalls"] == 0, (name, out)
        assert out["passed"], (name, out)
    sc = result["scenarios"]
    assert sc["rejected_steps"]["dead_lettered"] == 10
    assert sc["oversized"]["dead_lettered"] == 4
    # the default fails loudly and holds the new topic back for the operator
    assert sc["broker_restart_fail"]["failed_loudly"] is True
    assert sc["broker_restart_fail"]["oor_events"] == ["fail:beyond_end"]
    assert sc["broker_restart_fail"]["held_back"] > 0
    # earliest absorbs every record of the recreated topic
    assert sc["broker_restart_earliest"]["oor_events"] == ["earliest:beyond_end"]
    assert sc["broker_restart_earliest"]["held_back"] == 0
    longer = sc["topic_recreated_longer"]
    assert longer["failed_loudly"] is True and longer["held_back"] == 0
    assert longer["oor_events"] == ["fail:fingerprint_mismatch", "earliest:fingerprint_mismatch"]
    total = result["total"]
    assert total["sent"] == total["absorbed"] + total["dead_lettered"] + total["held_back"]
