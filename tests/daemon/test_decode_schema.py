"""Decoding by the model's schema: flat named records, the target's name, transforms."""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from fogline.daemon.stream.decode import DecodeError, Decoder, RawRecord, Record, decode_batch
from fogline.models.schema import Column, DataSchema

FEATURES = ("cpu", "mem", "disk")
#: cpu standardised, mem log1p, disk untouched; target log1p.
SCHEMA = DataSchema(
    (Column("cpu", "standardise", 50.0, 10.0), Column("mem", "log1p", 1.0, 0.5), Column("disk")),
    Column("throughput", "log1p", 2.0, 0.25),
    key="host",
    timestamp="time",
)
IDENTITY = dataclasses.replace(
    DataSchema.identity(FEATURES, "throughput"), key="host", timestamp="time"
)
DEC = Decoder(SCHEMA)


def _dump(obj: Any) -> bytes:
    return json.dumps(obj, allow_nan=True).encode()


def reason_of(value: Any, dec: Decoder = DEC) -> str:
    with pytest.raises(DecodeError) as info:
        dec.decode(value, default_ts_ms=0)
    return str(info.value)


def test_flat_named_record_equals_the_x_y_form() -> None:
    flat = _dump(
        {"time": 1700000000, "disk": 3, "cpu": 55.5, "mem": 2.0, "throughput": 7.5, "host": "h1"}
    )
    xy = _dump({"ts": 1700000000, "x": [55.5, 2.0, 3], "y": 7.5, "key": "h1"})
    named_x = _dump(
        {"time": 1700000000, "x": {"mem": 2, "disk": 3, "cpu": 55.5}, "throughput": 7.5}
    )
    want = Record((55.5, 2.0, 3.0), 7.5, 1_700_000_000_000, "h1")
    assert DEC.decode(flat) == want
    assert DEC.decode(xy) == want
    assert DEC.decode(named_x) == want._replace(key=None)


def test_other_fields_of_a_flat_record_are_ignored() -> None:
    rec = DEC.decode(
        _dump({"cpu": 1, "mem": 1, "disk": 1, "throughput": 1, "region": "eu", "n": [1]}), 5
    )
    assert rec == Record((1.0, 1.0, 1.0), 1.0, 5, None)


def test_target_field_wins_over_y() -> None:
    assert DEC.decode(_dump({"x": [1, 1, 1], "y": 2.0, "throughput": 3.0}), 0).y == 3.0
    assert DEC.decode(_dump({"x": [1, 1, 1], "y": 2.0}), 0).y == 2.0


@pytest.mark.parametrize(
    ("obj", "reason"),
    [
        ({"cpu": 1, "mem": 1, "throughput": 1}, "missing_feature: disk"),
        ({"cpu": 1, "throughput": 1}, "missing_feature: disk,mem"),
        ({"throughput": 1}, "missing_field: x (or the feature fields cpu,mem,disk)"),
        ({"cpu": 1, "mem": 1, "disk": 1}, "missing_field: throughput"),
        ({"x": [1, 1, 1]}, "missing_field: throughput"),
        ({"cpu": 1, "mem": "1", "disk": 1, "throughput": 1}, "non_numeric: mem is str"),
        ({"cpu": 1, "mem": 1, "disk": True, "throughput": 1}, "non_numeric: disk is bool"),
        (
            {"cpu": 1, "mem": 1, "disk": 1, "throughput": None},
            "non_numeric: throughput is NoneType",
        ),
        ({"cpu": math.nan, "mem": 1, "disk": 1, "throughput": 1}, "non_finite: cpu"),
        ({"cpu": 1e39, "mem": 1, "disk": 1, "throughput": 1}, "out_of_range: cpu"),
        ({"x": {"cpu": 1, "mem": 1, "disk": 1, "gpu": 1}, "y": 1}, "unknown_feature: gpu"),
        (
            {"cpu": 1, "mem": 1, "disk": 1, "throughput": 1, "time": "soon"},
            "bad_ts: not an ISO-8601 time",
        ),
        ({"cpu": 1, "mem": 1, "disk": 1, "throughput": 1, "host": 1.5}, "bad_key: key is float"),
    ],
)
def test_bad_named_records_name_the_field(obj: dict[str, Any], reason: str) -> None:
    assert reason_of(_dump(obj)) == reason
    ((_, batch_reason, _),) = decode_batch([RawRecord("t", 0, 0, None, _dump(obj), 0)], DEC).bad
    assert batch_reason == reason


def test_timestamp_and_key_fields_of_the_schema() -> None:
    rec = DEC.decode(
        _dump(
            {
                "cpu": 1,
                "mem": 1,
                "disk": 1,
                "throughput": 1,
                "time": "1970-01-01T00:00:02Z",
                "host": 7,
            }
        )
    )
    assert rec.ts_ms == 2000 and rec.key == "7"
    # the x/y form's ts and key still work under a schema that names other fields
    rec = DEC.decode(_dump({"x": [1, 1, 1], "y": 1, "ts": 3, "key": "k"}))
    assert rec.ts_ms == 3000 and rec.key == "k"
    batch = decode_batch(
        [_dump({"cpu": 1, "mem": 1, "disk": 1, "throughput": 1, "time": 4.5, "host": "a"})], DEC
    )
    assert batch.ts_ms.tolist() == [4500] and batch.keys == ["a"]


def test_a_feature_called_x_makes_every_record_flat() -> None:
    dec = Decoder(DataSchema.identity(("x", "z"), "t"))
    assert dec.decode(_dump({"x": 1.5, "z": 2, "t": 3}), 0).x == (1.5, 2.0)
    assert reason_of(_dump({"x": [1, 2], "t": 3}), dec) == "missing_feature: z"


def test_batch_is_in_model_units() -> None:
    raws = [
        _dump({"cpu": 60.0, "mem": math.e - 1, "disk": 4.0, "throughput": 0.0, "time": 1}),
        _dump({"x": [40.0, 0.0, -1.0], "y": math.e**2 - 1, "ts": 2}),
    ]
    batch = decode_batch(raws, DEC)
    assert batch.good == [0, 1] and batch.bad == []
    np.testing.assert_allclose(batch.x, [[1.0, 0.0, 4.0], [-1.0, -2.0, -1.0]], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(batch.y, [-8.0, 0.0], rtol=1e-6, atol=1e-6)
    assert batch.x.dtype == np.float32 and batch.y.dtype == np.float32
    # the identity schema (old states) leaves the numbers alone
    same = decode_batch(raws, Decoder(IDENTITY))
    np.testing.assert_array_equal(same.x, [[60.0, np.float32(math.e - 1), 4.0], [40.0, 0.0, -1.0]])


@pytest.mark.parametrize(
    ("obj", "reason"),
    [
        (
            {"cpu": 1, "mem": -1, "disk": 1, "throughput": 1},
            "out_of_domain: mem: log1p needs values > -1",
        ),
        (
            {"cpu": 1, "mem": -7.5, "disk": 1, "throughput": 1},
            "out_of_domain: mem: log1p needs values > -1",
        ),
        (
            {"cpu": 1, "mem": 1, "disk": 1, "throughput": -2},
            "out_of_domain: throughput: log1p needs values > -1",
        ),
    ],
)
def test_values_outside_a_transform_are_dead_lettered(obj: dict[str, Any], reason: str) -> None:
    good = _dump({"cpu": 1, "mem": 1, "disk": 1, "throughput": 1})
    assert reason_of(_dump(obj)) == reason
    batch = decode_batch(
        [RawRecord("t", 0, i, None, v, 0) for i, v in enumerate([good, _dump(obj), good])], DEC
    )
    assert batch.good == [0, 2] and [(r, p) for _, r, p in batch.bad] == [(reason, 1)]
    assert np.isfinite(batch.x).all() and np.isfinite(batch.y).all()


def test_a_value_that_overflows_once_standardised_is_dead_lettered() -> None:
    tiny = DataSchema((Column("a", "standardise", 0.0, 1e-30),), Column("y"))
    dec = Decoder(tiny)
    assert (
        reason_of(_dump({"a": 1e10, "y": 0}), dec) == "out_of_range: a: not finite in model units"
    )
    values = [_dump({"a": 1e-31, "y": 0, "ts": 1}), _dump({"a": 1e10, "y": 0, "ts": 1})]
    batch = decode_batch(values, dec)
    assert batch.good == [0] and batch.bad[0][1:] == (
        "out_of_range: a: not finite in model units",
        1,
    )


# --------------------------------------------------------------------------
# property: the vectorised batch agrees with the exact per-record decoder
# --------------------------------------------------------------------------
number = st.floats(allow_nan=True, allow_infinity=True) | st.integers(-10, 10**40)
small = st.floats(-3.0, 3.0) | st.integers(-3, 3)
cell = number | small | st.sampled_from([None, "1", True, [1.0]])
flat_records = st.fixed_dictionaries(
    {},
    optional={
        "cpu": cell,
        "mem": cell,
        "disk": cell,
        "throughput": cell,
        "y": cell,
        "time": cell | st.text(max_size=12),
        "host": st.none() | st.text(max_size=4) | st.integers(),
    },
)
good_flat = st.fixed_dictionaries(
    {"cpu": small, "mem": small, "disk": small, "throughput": small},
    optional={"time": small, "host": st.text(max_size=4)},
)
xy_records = st.fixed_dictionaries(
    {"x": st.lists(small | cell, min_size=3, max_size=3)},
    optional={"y": cell, "throughput": cell, "ts": small, "key": st.text(max_size=3)},
)


@pytest.mark.parametrize("schema", [SCHEMA, IDENTITY], ids=["transforms", "identity"])
@given(
    values=st.lists(
        (good_flat | flat_records | xy_records).map(_dump) | st.binary(max_size=20), max_size=25
    )
)
def test_batch_agrees_with_per_record_decode_by_schema(
    schema: DataSchema, values: list[bytes]
) -> None:
    dec = Decoder(schema)
    raws = [RawRecord("t", 0, i, None, v, 1000 + i) for i, v in enumerate(values)]
    batch = decode_batch(raws, dec)
    assert sorted(batch.good + [pos for _, _, pos in batch.bad]) == list(range(len(values)))
    for row, pos in enumerate(batch.good):
        rec = dec.decode(values[pos], 1000 + pos)
        x_model = schema.x_to_model_np(np.asarray([rec.x], dtype=np.float32))[0]
        y_model = schema.y_to_model_np(np.asarray([rec.y], dtype=np.float32))[0]
        assert np.array_equal(batch.x[row], x_model)
        assert batch.y[row] == y_model
        assert batch.ts_ms[row] == rec.ts_ms and batch.keys[row] == rec.key
    for raw, reason, pos in batch.bad:
        assert raw is raws[pos]
        with pytest.raises(DecodeError) as info:
            dec.decode(values[pos], 1000 + pos)
        assert str(info.value) == reason
    assert np.isfinite(batch.x).all() and np.isfinite(batch.y).all()
