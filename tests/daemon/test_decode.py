"""The record decoder: strict validation, one exception type, batch == per-record."""

from __future__ import annotations

import doctest
import json
import math
from typing import Any

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import fogline.daemon.stream.decode as decode_mod
from fogline.daemon.stream.decode import (
    DecodeError,
    Decoder,
    RawRecord,
    Record,
    decode,
    decode_batch,
    encode,
    next_offsets,
    reason_code,
)

FEATURES = ("a", "b", "c")
DEC = Decoder(FEATURES)


def reason_of(value: Any, features: tuple[str, ...] = FEATURES) -> str:
    with pytest.raises(DecodeError) as info:
        decode(value, features)
    return info.value.reason


# --------------------------------------------------------------------------
# examples
# --------------------------------------------------------------------------


def test_list_and_dict_x_decode_in_feature_order() -> None:
    a = DEC.decode(b'{"ts": 1700000000, "x": [1, 2.5, -3], "y": 0.25, "key": "s1"}')
    b = DEC.decode(b'{"ts": 1700000000, "x": {"c": -3, "a": 1, "b": 2.5}, "y": 0.25, "key": "s1"}')
    assert a == b == Record((1.0, 2.5, -3.0), 0.25, 1_700_000_000_000, "s1")
    assert all(type(v) is float for v in a.x)


@pytest.mark.parametrize(
    ("ts", "ms"),
    [
        (0, 0),
        (1.5, 1500),
        (1700000000, 1_700_000_000_000),
        (1700000000.123, 1_700_000_000_123),
        (1_700_000_000_000, 1_700_000_000_000),  # >= 1e11: already milliseconds
        ('"2023-11-14T22:13:20Z"', 1_700_000_000_000),
        ('"2023-11-14T22:13:20.250+00:00"', 1_700_000_000_250),
        ('"2023-11-14T23:13:20+01:00"', 1_700_000_000_000),
        ('"2023-11-14 22:13:20"', 1_700_000_000_000),  # naive = UTC
    ],
)
def test_timestamps_become_epoch_ms(ts: Any, ms: int) -> None:
    rec = DEC.decode(f'{{"ts": {ts}, "x": [0, 0, 0], "y": 0}}'.encode())
    assert rec.ts_ms == ms


def test_missing_ts_falls_back_to_the_kafka_timestamp() -> None:
    assert DEC.decode(b'{"x": [0, 0, 0], "y": 0}', default_ts_ms=42).ts_ms == 42
    with pytest.raises(DecodeError) as info:
        DEC.decode(b'{"x": [0, 0, 0], "y": 0}')
    assert info.value.reason == "bad_ts"


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        (None, "empty"),
        (b"", "empty"),
        (b"\xff\xfe\x00garbage", "not_utf8"),
        ('{"ts": 1, "x": [1, 2, 3], "y": 1}'.encode("utf-16"), "not_utf8"),  # BOM FF FE
        ('{"ts": 1, "x": [1, 2, 3], "y": 1}'.encode("utf-16-be"), "invalid_json"),  # no BOM
        ('{"ts": 1, "x": [1, 2, 3], "y": 1}'.encode("utf-32"), "not_utf8"),
        (b'{"ts": 1, "x": [1, 2, 3], "y": "\xe9"}', "not_utf8"),  # latin-1 byte
        (b'{"ts": 1, "x": [1, 2, 3], "y": 1, "key": "\xed\xa0\x80"}', "not_utf8"),  # surrogate
        (b"{not json", "invalid_json"),
        (b"[" * 100_000 + b"]" * 100_000, "invalid_json"),  # RecursionError inside json
        (b"[1, 2, 3]", "not_object"),
        (b'"x"', "not_object"),
        (b'{"x": [1, 2, 3]}', "missing_field"),
        (b'{"y": 1}', "missing_field"),
        (b'{"ts": 1, "x": 5, "y": 1}', "bad_x"),
        (b'{"ts": 1, "x": [1, 2], "y": 1}', "x_length"),
        (b'{"ts": 1, "x": [1, 2, 3, 4], "y": 1}', "x_length"),
        (b'{"ts": 1, "x": {"a": 1, "b": 2}, "y": 1}', "missing_feature"),
        (b'{"ts": 1, "x": {"a": 1, "b": 2, "c": 3, "d": 4}, "y": 1}', "unknown_feature"),
        (b'{"ts": 1, "x": [1, "2", 3], "y": 1}', "non_numeric"),
        (b'{"ts": 1, "x": [1, true, 3], "y": 1}', "non_numeric"),
        (b'{"ts": 1, "x": [1, null, 3], "y": 1}', "non_numeric"),
        (b'{"ts": 1, "x": [1, [2], 3], "y": 1}', "non_numeric"),
        (b'{"ts": 1, "x": [1, NaN, 3], "y": 1}', "non_finite"),
        (b'{"ts": 1, "x": [1, Infinity, -Infinity], "y": 1}', "non_finite"),
        (b'{"ts": 1, "x": [1e308, 1e308, 1], "y": 1}', "out_of_range"),
        (b'{"ts": 1, "x": [1e39, -1e39, 0], "y": 1}', "out_of_range"),
        (b'{"ts": 1, "x": [1, 2, 3], "y": 1e39}', "out_of_range"),
        (b'{"ts": 1, "x": [1, 2, 3], "y": ' + b"9" * 400 + b"}", "out_of_range"),
        (b'{"ts": 1, "x": [1, 2, 3], "y": NaN}', "non_finite"),
        (b'{"ts": 1, "x": [1, 2, 3], "y": "1"}', "non_numeric"),
        (b'{"ts": "yesterday", "x": [1, 2, 3], "y": 1}', "bad_ts"),
        (b'{"ts": NaN, "x": [1, 2, 3], "y": 1}', "bad_ts"),
        (b'{"ts": 1e300, "x": [1, 2, 3], "y": 1}', "bad_ts"),
        (b'{"ts": true, "x": [1, 2, 3], "y": 1}', "bad_ts"),
        (b'{"ts": [1], "x": [1, 2, 3], "y": 1}', "bad_ts"),
        (b'{"ts": 1, "x": [1, 2, 3], "y": 1, "key": [1]}', "bad_key"),
        (b'{"ts": 1, "x": [1, 2, 3], "y": 1, "key": 1.5}', "bad_key"),
    ],
)
def test_bad_records_name_their_reason(value: Any, reason: str) -> None:
    assert reason_of(value) == reason


def test_float32_edge_matches_a_float32_cast() -> None:
    edge = 2.0**128 - 2.0**103  # F32_MAX + half an ulp: rounds to inf in float32
    below = float(np.nextafter(edge, 0))
    with np.errstate(over="ignore"):
        assert np.isfinite(np.float32(below)) and not np.isfinite(np.float32(edge))
    assert DEC.decode(encode(Record((below, -below, 0.0), below, 0, None))).x[0] == below
    for v in (edge, -edge):
        assert reason_of(encode({"ts": 1, "x": [v, 0, 0], "y": 0})) == "out_of_range"
        assert reason_of(encode({"ts": 1, "x": [0, 0, 0], "y": v})) == "out_of_range"
    batch = decode_batch(
        [
            encode({"ts": 1, "x": [below, 0, 0], "y": 0}),
            encode({"ts": 1, "x": [edge, 0, 0], "y": 0}),
        ],
        FEATURES,
    )
    assert batch.good == [0] and batch.bad[0][1:] == ("out_of_range: x[0]", 1)


def test_reason_text_and_code() -> None:
    with pytest.raises(DecodeError) as info:
        DEC.decode(b'{"ts": 1, "x": [1, NaN, 3], "y": 1}')
    assert str(info.value) == "non_finite: x[1]"
    assert reason_code(str(info.value)) == "non_finite"
    assert isinstance(info.value, ValueError)


def test_key_forms_and_extra_fields() -> None:
    assert DEC.decode(b'{"ts": 1, "x": [1, 2, 3], "y": 1, "key": 17}').key == "17"
    assert DEC.decode(b'{"ts": 1, "x": [1, 2, 3], "y": 1, "key": null}').key is None
    assert DEC.decode(b'{"ts": 1, "x": [1, 2, 3], "y": 1, "extra": {"z": 1}}').key is None
    assert DEC.decode('{"ts": 1, "x": [1, 2, 3], "y": 1}').y == 1.0  # str input


def test_decoder_rejects_bad_feature_lists() -> None:
    with pytest.raises(ValueError):
        Decoder([])
    with pytest.raises(ValueError):
        Decoder(["a", "a"])


def test_module_doctests() -> None:
    result = doctest.testmod(decode_mod)
    assert result.attempted > 0 and result.failed == 0


def test_next_offsets_are_max_plus_one() -> None:
    recs = [RawRecord("t", p, o, None, b"", 0) for p, o in [(0, 5), (1, 2), (0, 3), (1, 9)]]
    assert next_offsets(recs) == {"t:0": 6, "t:1": 10}
    assert next_offsets([]) == {}


# --------------------------------------------------------------------------
# properties
# --------------------------------------------------------------------------

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=8),
    lambda children: (
        st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=4), children, max_size=5)
    ),
    max_leaves=20,
)
field_values = st.one_of(
    json_values,
    st.lists(st.floats() | st.integers(), min_size=3, max_size=3),
    st.fixed_dictionaries({f: st.floats() | st.integers() for f in FEATURES}),
)
record_like = st.fixed_dictionaries(
    {},
    optional={
        "ts": field_values | st.text(max_size=30),
        "x": field_values,
        "y": field_values,
        "key": json_values,
    },
)


def _dump(obj: Any) -> bytes:
    return json.dumps(obj, allow_nan=True).encode()


@given(st.binary(max_size=200))
def test_arbitrary_bytes_raise_only_decode_error(data: bytes) -> None:
    try:
        rec = DEC.decode(data)
    except DecodeError as exc:
        assert exc.reason
    else:
        assert len(rec.x) == 3


@given(json_values | record_like)
def test_arbitrary_json_raises_only_decode_error(obj: Any) -> None:
    try:
        rec = DEC.decode(_dump(obj))
    except DecodeError as exc:
        assert exc.reason
    else:
        assert len(rec.x) == 3
        assert all(math.isfinite(v) for v in (*rec.x, rec.y))


finite32 = st.floats(allow_nan=False, allow_infinity=False, width=32)
good_records = st.builds(
    Record,
    st.tuples(finite32, finite32, finite32),
    finite32,
    st.integers(-(2**53), 2**53),
    st.none() | st.text(max_size=10),
)


@given(good_records)
def test_valid_records_round_trip(rec: Record) -> None:
    assert DEC.decode(encode(rec)) == rec


@given(
    st.lists(
        good_records.map(encode) | record_like.map(_dump) | st.binary(max_size=40), max_size=30
    )
)
def test_batch_agrees_with_per_record_decode(values: list[bytes]) -> None:
    raws = [RawRecord("t", 0, i, None, v, 1000 + i) for i, v in enumerate(values)]
    batch = decode_batch(raws, FEATURES)
    x, y, good, bad = batch
    assert sorted(good + [pos for _, _, pos in bad]) == list(range(len(values)))
    assert x.shape == (len(good), 3) and x.dtype == np.float32
    assert y.shape == (len(good),) and batch.ts_ms.shape == (len(good),)
    for row, pos in enumerate(good):
        rec = DEC.decode(values[pos], 1000 + pos)
        assert np.array_equal(x[row], np.asarray(rec.x, dtype=np.float32))
        assert y[row] == np.float32(rec.y)
        assert batch.ts_ms[row] == rec.ts_ms and batch.keys[row] == rec.key
    for raw, reason, pos in bad:
        assert raw is raws[pos]
        with pytest.raises(DecodeError) as info:
            DEC.decode(values[pos], 1000 + pos)
        assert str(info.value) == reason
    assert np.isfinite(x).all() and np.isfinite(y).all()


def test_empty_batch_has_the_right_shapes() -> None:
    x, y, good, bad = decode_batch([], FEATURES)
    assert x.shape == (0, 3) and y.shape == (0,) and good == [] and bad == []


# --------------------------------------------------------------------------
# the wire format is UTF-8
# --------------------------------------------------------------------------
GOOD_TEXT = '{"ts": 1, "x": [1, 2, 3], "y": 0.5, "key": "capteur-é"}'


@pytest.mark.parametrize("encoding", ["utf-16", "utf-16-le", "utf-16-be", "utf-32", "latin-1"])
def test_non_utf8_encodings_of_a_good_record_are_rejected(encoding: str) -> None:
    """json.loads(bytes) would detect UTF-16/32 and accept them: the decoder does not."""
    value = GOOD_TEXT.encode(encoding)
    if encoding.startswith("utf"):
        assert json.loads(value)["key"] == "capteur-é"  # json alone accepts it
    with pytest.raises(DecodeError) as info:
        DEC.decode(value)
    assert info.value.reason in ("not_utf8", "invalid_json")  # no-BOM UTF-16 is valid UTF-8 text
    ((_, reason, _),) = decode_batch([value], FEATURES).bad
    assert reason == str(info.value)


def test_utf8_and_a_utf8_bom_are_accepted_the_same() -> None:
    rec = DEC.decode(GOOD_TEXT.encode())
    assert rec.key == "capteur-é"
    assert DEC.decode(b"\xef\xbb\xbf" + GOOD_TEXT.encode()) == rec
    batch = decode_batch([GOOD_TEXT.encode(), b"\xef\xbb\xbf" + GOOD_TEXT.encode()], FEATURES)
    assert batch.good == [0, 1] and batch.keys == ["capteur-é", "capteur-é"]
    assert DEC.decode(GOOD_TEXT) == rec  # a str is already text


@given(st.binary(min_size=1, max_size=120))
def test_bytes_that_are_not_utf8_are_not_utf8(data: bytes) -> None:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        with pytest.raises(DecodeError) as info:
            DEC.decode(data)
        assert info.value.reason == "not_utf8"
        assert reason_code(decode_batch([data], FEATURES).bad[0][1]) == "not_utf8"
