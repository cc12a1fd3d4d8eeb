"""``fogline replay``: file formats, NAB lagging, pacing, and a real produce round trip."""

from __future__ import annotations

import calendar
import json
import math
from pathlib import Path

import pytest

from fogline.cli import main
from fogline.daemon.replay import (
    Pacer,
    ReplayItem,
    detect_format,
    iter_items,
    nab_features,
    nab_records,
    read_csv,
    read_jsonl,
)
from fogline.daemon.stream.decode import Decoder, decode_batch
from fogline.daemon.stream.source import read_topic


@pytest.fixture
def nab_file(nab_root: Path) -> Path:
    """A real NAB file from the outside data (skipped when absent: tests/conftest.py)."""
    path = nab_root / "data" / "realAWSCloudwatch" / "ec2_cpu_utilization_24ae8d.csv"
    if not path.is_file():
        pytest.skip(f"NAB file not found: {path}")
    return path


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


@pytest.fixture
def jsonl_file(tmp_path: Path) -> Path:
    lines = [
        json.dumps({"ts": 1_700_000_000 + i, "x": [i, -i], "y": i / 2, "key": f"s{i % 2}"})
        for i in range(5)
    ]
    lines.insert(2, "{broken")
    lines.insert(4, "")
    return _write(tmp_path / "stream.jsonl", "\n".join(lines) + "\n")


@pytest.fixture
def csv_file(tmp_path: Path) -> Path:
    return _write(
        tmp_path / "stream.csv",
        "ts,a,b,y,sensor\n"
        "2023-11-14T22:13:20Z,1,2,3,s1\n"
        "2023-11-14T22:13:21Z,4,oops,6,s2\n"
        "1700000002,7,8,9,s1\n",
    )


def test_formats_are_detected(jsonl_file: Path, csv_file: Path, tmp_path: Path) -> None:
    assert detect_format(jsonl_file) == "jsonl"
    assert detect_format(csv_file) == "csv"
    nab = _write(tmp_path / "n.csv", "timestamp,value\n2014-02-14 14:30:00,0.1\n")
    assert detect_format(nab) == "nab"
    odd = _write(tmp_path / "stream.data", '{"ts": 1}\n')
    assert detect_format(odd) == "jsonl"


def test_jsonl_lines_are_kept_verbatim_with_ts_and_key(jsonl_file: Path) -> None:
    items = list(read_jsonl(jsonl_file))
    assert len(items) == 6  # blank line skipped, broken one kept
    assert items[2] == ReplayItem(b"{broken", None, None)
    good = [it for it in items if it.ts_ms is not None]
    assert [it.ts_ms for it in good] == [(1_700_000_000 + i) * 1000 for i in range(5)]
    assert [it.key for it in good] == ["s0", "s1", "s0", "s1", "s0"]
    assert json.loads(good[3].value)["y"] == 1.5


def test_csv_rows_become_fogline_records(csv_file: Path) -> None:
    items = list(read_csv(csv_file, key_field="sensor"))
    assert [it.key for it in items] == ["s1", "s2", "s1"]
    assert [it.ts_ms for it in items] == [1_700_000_000_000, 1_700_000_001_000, 1_700_000_002_000]
    batch = decode_batch([it.value for it in items], ["a", "b"])
    x, y, good, bad = batch
    assert good == [0, 2] and x.tolist() == [[1, 2], [7, 8]] and y.tolist() == [3, 9]
    assert [reason.split(":")[0] for _, reason, _ in bad] == [
        "non_numeric"
    ]  # "oops" kept, not dropped
    assert batch.keys == ["s1", "s1"]


def test_csv_without_y_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="'y'"):
        list(read_csv(_write(tmp_path / "bad.csv", "a,b\n1,2\n")))


def test_nab_records_are_lagged_and_standardised_on_the_probation_period(tmp_path: Path) -> None:
    rows = [
        f"2014-02-14 14:{i:02d}:00,{v}" for i, v in enumerate([1, 3, 1, 3, 5, 7, 9, 11, 13, 15])
    ]
    path = _write(tmp_path / "n.csv", "timestamp,value\n" + "\n".join(rows) + "\n")
    recs = nab_records(path, lags=3)
    # probation = ceil(0.15 * 10) = 2 rows -> mean 2, sample std sqrt(2)
    z = [(v - 2) / math.sqrt(2) for v in [1, 3, 1, 3, 5, 7, 9, 11, 13, 15]]
    assert len(recs) == 7
    assert recs[0].x == pytest.approx(z[0:3]) and recs[0].y == pytest.approx(z[3])
    assert recs[-1].x == pytest.approx(z[6:9]) and recs[-1].y == pytest.approx(z[9])
    assert recs[0].ts_ms == calendar.timegm((2014, 2, 14, 14, 3, 0)) * 1000  # UTC
    assert recs[0].key == "n"
    assert nab_features(3) == ["lag3", "lag2", "lag1"]
    _, items = iter_items(path, "nab", lags=3)
    x, y, good, bad = decode_batch([it.value for it in items], nab_features(3))
    assert len(good) == 7 and bad == [] and x.shape == (7, 3)
    assert y[0] == pytest.approx(z[3], rel=1e-6)


def test_real_nab_file_decodes_completely(nab_file: Path) -> None:
    recs = nab_records(nab_file, lags=8)
    assert len(recs) == 4032 - 8
    fmt, items = iter_items(nab_file)
    assert fmt == "nab"
    dec = decode_batch([it.value for it in items], Decoder(nab_features(8)))
    assert len(dec.good) == len(recs) and dec.bad == []
    ts = dec.ts_ms.tolist()
    assert ts == sorted(ts)


class FakeTime:
    def __init__(self) -> None:
        self.now = 0.0
        self.slept: list[float] = []

    def clock(self) -> float:
        return self.now

    def sleep(self, s: float) -> None:
        self.slept.append(s)
        self.now += s


def test_pacer_sleeps_by_timestamp_gaps_divided_by_speed() -> None:
    t = FakeTime()
    pacer = Pacer(10.0, clock=t.clock, sleep=t.sleep)
    assert pacer.wait(1_000_000) == 0.0  # the first record sets the origin
    assert pacer.wait(1_002_000) == pytest.approx(0.2)  # 2 s of stream at 10x
    t.now += 0.5  # sending took longer than the gap: no sleep, no drift
    assert pacer.wait(1_004_000) == 0.0
    assert pacer.wait(1_010_000) == pytest.approx(1.0 - 0.7)
    assert pacer.wait(None) == 0.0
    assert Pacer(None, clock=t.clock, sleep=t.sleep).wait(5) == 0.0
    with pytest.raises(ValueError):
        Pacer(0.0)


def test_cli_replays_jsonl_keeping_timestamps_and_keys(
    kafka_bootstrap: str, jsonl_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    topic = "replay-jsonl"
    code = main(["replay", str(jsonl_file), "--topic", topic, "--bootstrap", kafka_bootstrap])
    assert code == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["records"] == 6 and summary["format"] == "jsonl"
    recs = read_topic(kafka_bootstrap, topic, min_records=6)
    assert [r.value for r in recs] == [it.value for it in read_jsonl(jsonl_file)]
    assert recs[0].key == b"s0" and recs[0].timestamp_ms == 1_700_000_000_000
    assert recs[2].key is None  # the broken line has no key


def test_cli_replays_nab_at_a_speed(
    kafka_bootstrap: str, capsys: pytest.CaptureFixture[str], nab_file: Path
) -> None:
    topic = "replay-nab"
    code = main(
        [
            "replay",
            str(nab_file),
            "--topic",
            topic,
            "--bootstrap",
            kafka_bootstrap,
            "--lags",
            "4",
            "--limit",
            "50",
            "--speed",
            "1e6",  # 5-minute steps at a million times real time: 0.3 ms apart
        ]
    )
    assert code == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["records"] == 50
    recs = read_topic(kafka_bootstrap, topic, min_records=50)
    dec = decode_batch(recs, nab_features(4))
    assert len(dec.good) == 50
    assert [r.timestamp_ms for r in recs] == dec.ts_ms.tolist()
    assert {r.key for r in recs} == {nab_file.stem.encode()}


def test_cli_reports_a_missing_file(tmp_path: Path) -> None:
    assert main(["replay", str(tmp_path / "nope.jsonl"), "--topic", "t", "--bootstrap", "x:1"]) == 2
