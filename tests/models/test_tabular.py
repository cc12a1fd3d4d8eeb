"""models/tabular.py: CSV, JSONL and Parquet loaders, row errors, drop_invalid counts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from fogline.models.spec import ModelSpec
from fogline.models.tabular import TableError, load_table, timestamp_ms

SPEC = ModelSpec(features=("cpu", "mem", "conns"), target="throughput", timestamp="time")
HEADER = "time,cpu,mem,conns,throughput\n"


def _csv(tmp_path: Path, body: str, header: str = HEADER) -> Path:
    p = tmp_path / "h.csv"
    p.write_text(header + body)
    return p


def test_csv_orders_columns_by_the_spec(tmp_path: Path) -> None:
    # the header's order (conns, mem, cpu) differs from the spec's (cpu, mem, conns)
    p = _csv(
        tmp_path,
        "2024-01-01T00:00:00Z,3,2,1,4.5\n1700000000,7,6,5,8\n",
        header="time,conns,mem,cpu,throughput\n",
    )
    table, rep = load_table(p, SPEC)
    assert table.x.tolist() == [[1.0, 2.0, 3.0], [5.0, 6.0, 7.0]]
    assert table.y.tolist() == [4.5, 8.0]
    assert table.ts is not None and table.ts.tolist() == [1_704_067_200_000, 1_700_000_000_000]
    assert table.x.dtype == torch.float64 and table.ts.dtype == torch.int64
    assert rep.rows_read == rep.rows_kept == 2 and rep.rows_dropped == 0


def test_missing_column_names_it(tmp_path: Path) -> None:
    p = _csv(tmp_path, "1,2,3,4\n", header="time,cpu,mem,throughput\n")
    with pytest.raises(TableError, match=r"missing column\(s\) \['conns'\]"):
        load_table(p, SPEC)


def test_non_numeric_names_column_row_and_line(tmp_path: Path) -> None:
    p = _csv(tmp_path, "1,1,2,3,4\n2,1,abc,3,4\n")
    with pytest.raises(TableError) as err:
        load_table(p, SPEC)
    msg = str(err.value)
    assert "row 2 (line 3)" in msg and "'mem'" in msg and "'abc' is not a number" in msg
    assert "non_numeric" in msg


@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "1e39"])
def test_non_finite_is_rejected(tmp_path: Path, value: str) -> None:
    p = _csv(tmp_path, f"1,1,2,3,{value}\n")
    with pytest.raises(TableError, match=r"row 1 \(line 2\): column 'throughput'"):
        load_table(p, SPEC)


def test_log1p_domain_and_bad_ts(tmp_path: Path) -> None:
    spec = SPEC.model_copy(update={"transforms": {"conns": "log1p"}})
    p = _csv(tmp_path, "1,1,2,-1,4\n")
    with pytest.raises(TableError, match=r"'conns': transform log1p needs values > -1"):
        load_table(p, spec)
    p = _csv(tmp_path, "yesterday,1,2,3,4\n")
    with pytest.raises(TableError, match=r"column 'time'.*not a number or an ISO-8601"):
        load_table(p, SPEC)


def test_drop_invalid_counts_per_reason(tmp_path: Path) -> None:
    body = (
        "1,1,2,3,4\n"  # ok
        "2,1,x,3,4\n"  # non_numeric
        "3,1,2,3,nan\n"  # non_finite
        "4,1,2,,4\n"  # missing_value
        "5,1,2,3,\n"  # missing_value
        "bad,1,2,3,4\n"  # bad_ts
        "7,1,2,3,5\n"  # ok
    )
    table, rep = load_table(_csv(tmp_path, body), SPEC, drop_invalid=True)
    assert table.rows == 2 and table.y.tolist() == [4.0, 5.0]
    assert rep.rows_read == 7 and rep.rows_kept == 2 and rep.rows_dropped == 5
    assert rep.dropped == {"non_numeric": 1, "non_finite": 1, "missing_value": 2, "bad_ts": 1}
    assert "row 2 (line 3)" in rep.examples[0]
    assert rep.to_json()["dropped"]["missing_value"] == 2


def test_no_valid_rows_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(TableError, match="no valid rows"):
        load_table(_csv(tmp_path, "1,x,2,3,4\n"), SPEC, drop_invalid=True)


def test_bernoulli_target_must_be_binary(tmp_path: Path) -> None:
    spec = SPEC.model_copy(update={"likelihood": "bernoulli", "transforms": {"throughput": "none"}})
    with pytest.raises(TableError, match="bernoulli target is 0 or 1"):
        load_table(_csv(tmp_path, "1,1,2,3,0.5\n"), spec)


def test_jsonl_flat_and_wire_forms(tmp_path: Path) -> None:
    lines = [
        {"time": 1.5, "cpu": 1, "mem": 2.0, "conns": 3, "throughput": 4.0, "extra": "ignored"},
        {"time": "1970-01-01T00:00:03Z", "x": [5, 6, 7], "y": 8},
        {"time": 1_700_000_000_000, "x": {"conns": 11, "cpu": 9, "mem": 10}, "throughput": 12},
    ]
    p = tmp_path / "h.jsonl"
    p.write_text("\n".join(json.dumps(o) for o in lines) + "\n\n")
    table, rep = load_table(p, SPEC)
    assert table.x.tolist() == [[1, 2, 3], [5, 6, 7], [9, 10, 11]]
    assert table.y.tolist() == [4, 8, 12]
    assert table.ts is not None and table.ts.tolist() == [1500, 3000, 1_700_000_000_000]
    assert rep.rows_kept == 3


def test_jsonl_default_ts_and_key_fields(tmp_path: Path) -> None:
    spec = ModelSpec(features=("a",), target="y")
    p = tmp_path / "h.jsonl"
    p.write_text(
        '{"ts": 2, "x": [1], "y": 0, "key": "k1"}\n{"ts": 3, "x": [2], "y": 1, "key": 7}\n'
    )
    table, _ = load_table(p, spec)
    assert table.ts is not None and table.ts.tolist() == [2000, 3000]
    assert table.keys == ["k1", "7"]


def test_jsonl_errors_name_line_and_field(tmp_path: Path) -> None:
    p = tmp_path / "h.jsonl"
    p.write_text(
        '{"time": 1, "cpu": 1, "mem": 2, "conns": 3, "throughput": 4}\n'
        "\n"
        '{"time": 2, "cpu": 1, "mem": "2", "conns": 3, "throughput": 4}\n'
        '{"time": 3, "cpu": 1, "conns": 3, "throughput": 4}\n'
        '{"time": 4, "x": [1, 2], "y": 4}\n'
        "{not json\n"
        '{"time": 5, "cpu": 1, "mem": NaN, "conns": 3, "throughput": 4}\n'
    )
    with pytest.raises(TableError) as err:
        load_table(p, SPEC)
    assert "row 2 (line 3): column 'mem': '2' is str, not a number" in str(err.value)
    table, rep = load_table(p, SPEC, drop_invalid=True)
    assert table.rows == 1
    assert rep.dropped == {
        "non_numeric": 1,
        "missing_value": 1,
        "bad_x": 1,
        "invalid_json": 1,
        "non_finite": 1,
    }


def test_parquet_loads_and_checks(tmp_path: Path) -> None:
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    from datetime import UTC, datetime

    t = pa.table(
        {
            "time": [datetime(2024, 1, 1, tzinfo=UTC), datetime(2024, 1, 2, tzinfo=UTC)],
            "cpu": [1.0, 4.0],
            "mem": [2, 5],
            "conns": [3.0, None],
            "throughput": [0.5, 1.5],
        }
    )
    p = tmp_path / "h.parquet"
    pq.write_table(t, p)
    with pytest.raises(TableError, match=r"row 2: column 'conns': no value"):
        load_table(p, SPEC)
    table, rep = load_table(p, SPEC, drop_invalid=True)
    assert table.x.tolist() == [[1.0, 2.0, 3.0]]
    assert table.ts is not None and table.ts.tolist() == [1_704_067_200_000]
    assert rep.dropped == {"missing_value": 1}
    pq.write_table(t.drop(["mem"]), p)
    with pytest.raises(TableError, match=r"missing column\(s\) \['mem'\]"):
        load_table(p, SPEC)


def test_unknown_suffix_and_missing_file(tmp_path: Path) -> None:
    with pytest.raises(TableError, match=r"unknown file type '\.xlsx'"):
        load_table(tmp_path / "h.xlsx", SPEC)
    with pytest.raises(TableError, match="no such file"):
        load_table(tmp_path / "h.csv", SPEC)


def test_timestamp_rule() -> None:
    assert timestamp_ms(1.5) == 1500
    assert timestamp_ms(99_999_999_999) == 99_999_999_999_000  # seconds below 1e11
    assert timestamp_ms(100_000_000_000) == 100_000_000_000  # ms from 1e11 on
    assert timestamp_ms("2024-01-01T00:00:00") == 1_704_067_200_000  # no zone: UTC
    assert timestamp_ms("2024-01-01T01:00:00+01:00") == 1_704_067_200_000
