"""``fogline bench drift_loop``: the JSON contract (no timing is asserted)."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest
import structlog

from fogline.bench import drift_loop
from fogline.drift import runner, signals


@pytest.fixture
def _keep_structlog() -> Iterator[None]:
    """The benchmark configures structlog (warnings only); give the next tests theirs back."""
    saved = structlog.get_config()
    yield
    structlog.configure(**saved)


@pytest.mark.usefixtures("_keep_structlog")
def test_json_contract_and_the_wrappers_are_removed(capsys: pytest.CaptureFixture[str]) -> None:
    before = (runner.pre_update_signals, runner.store_drift, signals.NoiseCache.ensemble)
    assert drift_loop.main(["--batches", "50", "--batch-size", "32", "--json"]) == 0
    detail_line, result_line = capsys.readouterr().out.strip().splitlines()[-2:]
    detail, result = json.loads(detail_line), json.loads(result_line)
    assert set(result) == {"plain_ms", "drift_steady_ms", "drift_calibrating_ms", "steady_ratio"}
    assert detail["batches"] == {"calibrating": 35, "steady": 10}  # 40 calibrating, 5 skipped
    steady = detail["parts_ms"]["steady"]
    assert set(drift_loop.PARTS.values()) <= set(steady)
    assert all(v >= 0 for k, v in steady.items() if k != "other")
    assert (runner.pre_update_signals, runner.store_drift, signals.NoiseCache.ensemble) == before
