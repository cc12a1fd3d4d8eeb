"""``fogline experiment FILE --config CFG`` with an autoregressive spec: inputs from the spec."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from fogline.drift.experiment import ExperimentConfig, load_source
from fogline.models.spec import ModelSpec


def test_an_autoregressive_spec_builds_lags_per_key_and_calendar(tmp_path: Path) -> None:
    path = tmp_path / "series.csv"
    rows = ["ts,host,value"]
    for i in range(300):
        rows.append(f"{1_700_000_000 + 60 * i},{'ab'[i % 2]},{i + (1000 if i % 2 else 0)}")
    path.write_text("\n".join(rows) + "\n")
    spec = ModelSpec(mode="autoregressive", target="value", timestamp="ts", key="host", lags=3)
    data = load_source(str(path), ExperimentConfig(batch_size=16), spec)
    assert data.warm_x.shape[1] == 3 + 4 and data.x.shape[1] == 7
    # 2 keys x 3 rows only fill the buffers; the rest is the warm start + the stream
    assert len(data.warm_y) + len(data.y) == 300 - 6
    # model units: undo the fitted standardisation of lag_1 and the target by a linear fit
    warm_lag1, warm_y = data.warm_x[:, 0].astype(np.float64), data.warm_y.astype(np.float64)
    slope, icpt = np.polyfit(warm_lag1, warm_y, 1)
    # y_t and the same key's previous value differ by 2 everywhere: a perfect line
    resid = warm_y - (slope * warm_lag1 + icpt)
    assert float(np.abs(resid).max()) < 1e-3 and not math.isclose(slope, 0.0)
    cal = data.warm_x[:, 3:]
    np.testing.assert_allclose(cal[:, 0] ** 2 + cal[:, 1] ** 2, 1.0, rtol=1e-5)
