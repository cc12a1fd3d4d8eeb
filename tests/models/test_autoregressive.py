"""The autoregressive feature builder: lags per key, calendar terms, a state that restarts exactly."""

from __future__ import annotations

import json
import math
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pytest

from fogline.models.autoregressive import (
    LagState,
    Record,
    SeriesState,
    ShortHistory,
    build_features,
    calendar_features,
    feature_names,
    features_for,
    next_inputs,
    parse_ts,
    series_extra,
    stored_series,
    ts_from_ms,
)
from fogline.models.fit import FitOptions, fit
from fogline.models.spec import ModelSpec
from fogline.models.tabular import load_table


def _records(n: int, keys: tuple[str, ...] = ("a", "b"), seed: int = 0) -> list[Record]:
    rng = np.random.default_rng(seed)
    t0 = datetime(2024, 3, 4, tzinfo=UTC)  # a Monday
    return [
        Record(t0 + timedelta(minutes=5 * i), float(rng.normal()), keys[i % len(keys)])
        for i in range(n)
    ]


def test_lags_are_the_same_keys_last_values_newest_first() -> None:
    recs = _records(20)
    x, y, rows, state = build_features(recs, LagState(3), calendar=False)
    # key a is at even positions: its first featured record is position 6
    assert rows[0] == 6 and rows[1] == 7 and len(rows) == 20 - 2 * 3
    np.testing.assert_array_equal(x[0], [recs[4].value, recs[2].value, recs[0].value])
    np.testing.assert_array_equal(y, [recs[i].value for i in rows])
    assert state.buffers["a"] == (recs[14].value, recs[16].value, recs[18].value)
    assert x.shape == (14, 3) and feature_names(3, False) == ("lag_1", "lag_2", "lag_3")


def test_calendar_terms() -> None:
    monday_6h = datetime(2024, 3, 4, 6, 0, tzinfo=UTC)
    hs, hc, ds, dc = calendar_features(monday_6h)
    assert math.isclose(hs, 1.0) and abs(hc) < 1e-12  # a quarter of the day
    d = 0.25 / 7 * 2 * math.pi
    assert math.isclose(ds, math.sin(d)) and math.isclose(dc, math.cos(d))
    x, _, _, _ = build_features(_records(10, ("a",)), LagState(2), calendar=True)
    assert x.shape == (8, 6)
    assert feature_names(2, True)[2:] == ("hour_sin", "hour_cos", "dow_sin", "dow_cos")
    # naive time stamps are UTC; epoch seconds and ISO text agree
    assert parse_ts("2024-03-04 06:00:00") == monday_6h == parse_ts(monday_6h.timestamp())


def test_split_runs_with_a_stored_state_equal_one_run() -> None:
    recs = _records(101, ("a", "b", "c"))
    whole = build_features(recs, LagState(4))
    x1, y1, r1, s1 = build_features(recs[:37], LagState(4))
    restored = LagState.from_json(json.loads(json.dumps(s1.to_json())))
    assert restored == s1  # floats bit for bit
    x2, y2, r2, s2 = build_features(recs[37:], restored)
    np.testing.assert_array_equal(np.concatenate([x1, x2]), whole[0])
    np.testing.assert_array_equal(np.concatenate([y1, y2]), whole[1])
    np.testing.assert_array_equal(np.concatenate([r1, r2 + 37]), whole[2])
    assert s2 == whole[3]


def test_bad_input_names_the_row_or_field() -> None:
    recs = _records(5, ("a",))
    bad = [*recs[:3], Record(recs[3].ts, math.nan, "a")]
    with pytest.raises(ValueError, match="row 3"):
        build_features(bad, LagState(2))
    with pytest.raises(ValueError, match="ts"):
        parse_ts("yesterday")
    with pytest.raises(ValueError, match="lags"):
        feature_names(0, True)
    with pytest.raises(ValueError, match=r"buffers\['a'\]"):
        LagState.from_json({"lags": 1, "buffers": {"a": ["1.0", "2.0"]}})


# -- the spec-driven entry points (features_for, SeriesState, next_inputs, the warm start) --
def _spec(**kw: object) -> ModelSpec:
    return ModelSpec.model_validate(
        {"mode": "autoregressive", "target": "value", "timestamp": "ts", "lags": 3, **kw}
    )


def test_the_spec_derives_its_inputs_and_their_transforms() -> None:
    spec = _spec(transforms={"value": "log1p"})
    assert spec.features == feature_names(3, True)
    assert spec.transform_of("lag_2") == "log1p" and spec.transform_of("hour_sin") == "none"
    assert ModelSpec.model_validate(spec.model_dump(mode="json")) == spec  # round-trips
    assert _spec(calendar=False).features == ("lag_1", "lag_2", "lag_3")


def test_features_for_split_runs_with_a_json_state_equal_one_run() -> None:
    spec = _spec()
    recs = _records(60, ("a", "b", "c"))
    whole = features_for(spec, recs, SeriesState.empty(spec))
    first = features_for(spec, recs[:25], SeriesState.empty(spec))
    restored = SeriesState.from_json(json.loads(json.dumps(first.state.to_json())))
    assert restored == first.state
    second = features_for(spec, recs[25:], restored)
    np.testing.assert_array_equal(np.concatenate([first.x, second.x]), whole.x)
    assert second.state == whole.state and first.warming + second.warming == whole.warming == 9
    ref_x, _, _, ref_lags = build_features(recs, LagState(3), calendar=True)
    np.testing.assert_array_equal(whole.x, ref_x)  # the one builder underneath
    assert whole.state.lags == ref_lags


def test_next_inputs_are_the_keys_lags_at_its_next_step() -> None:
    spec = _spec()
    recs = _records(20, ("a", "b"))
    state = features_for(spec, recs, SeriesState.empty(spec)).state
    x, ts = next_inputs(spec, state, "a")
    last_a = [r for r in recs if r.key == "a"]
    assert x[0, :3].tolist() == [last_a[-1].value, last_a[-2].value, last_a[-3].value]
    step = last_a[-1].ts - last_a[-2].ts
    assert ts_from_ms(ts) == last_a[-1].ts + step
    x2, _ = next_inputs(spec, state, "a", ts + 3_600_000)  # an explicit time moves the calendar
    assert x2[0, :3].tolist() == x[0, :3].tolist() and x2[0, 3] != x[0, 3]
    with pytest.raises(ShortHistory, match="key 'zz': no history"):
        next_inputs(spec, state, "zz")
    short = features_for(spec, recs[:2], SeriesState.empty(spec)).state
    with pytest.raises(ShortHistory, match="key 'a': 1 past values"):
        next_inputs(spec, short, "a")


def test_the_warm_start_stores_the_series_state_at_the_end_of_the_history(
    tmp_path: Path,
) -> None:
    spec = _spec(key="host", hidden=(4,))
    recs = _records(80, ("a", "b"))
    path = tmp_path / "h.csv"
    path.write_text(
        "ts,host,value\n" + "".join(f"{r.ts.isoformat()},{r.key},{r.value!r}\n" for r in recs)
    )
    table, _ = load_table(path, spec)
    assert table.x.shape == (80, 0)
    result = fit(spec, table, FitOptions(epochs=1, samples=4))
    assert result.report["train"]["n"] + result.report["holdout"]["n"] == 80 - 2 * 3
    stored = stored_series(result.state.extra)
    # white noise has no period: "auto" is stored resolved, as "none"
    assert stored is not None and stored[0] == spec.model_copy(update={"season": "none"})
    assert stored[1] == features_for(spec, recs, SeriesState.empty(spec)).state
    assert result.schema.feature_names == spec.features


def test_a_topic_history_reads_as_the_raw_series_too() -> None:
    from fogline.models.tabular import records_table

    spec = _spec(key="host")
    values = [
        (f"t:0@{i}", json.dumps({"ts": 1_700_000_000 + i, "host": "h", "value": i}).encode(), None)
        for i in range(12)
    ]
    table, report = records_table(values, spec)
    assert table.x.shape == (12, 0) and table.keys == ["h"] * 12 and report.rows_kept == 12


def test_incremental_json_has_the_content_of_the_full_form() -> None:
    spec = _spec()
    recs = _records(90, ("a", "b", "c", "d"))
    first = features_for(spec, recs[:50], SeriesState.empty(spec))
    prev = series_extra(spec, first.state)
    batch = [r for r in recs[50:] if r.key in ("a", "b")]  # c and d untouched
    second = features_for(spec, batch, first.state)
    inc = series_extra(spec, second.state, prev, [r.key for r in batch])
    assert inc == series_extra(spec, second.state)
    assert inc["series"]["lags"]["buffers"]["c"] is prev["series"]["lags"]["buffers"]["c"]
    assert SeriesState.from_json(inc["series"]) == second.state
