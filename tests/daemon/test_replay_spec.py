"""``fogline replay --config``: a user's CSV read by the model spec's named columns."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import pytest

from fogline.cli import main
from fogline.daemon.replay import iter_items
from fogline.daemon.stream.decode import Decoder, RawRecord, decode_batch
from fogline.daemon.stream.source import read_topic
from fogline.models.schema import DataSchema
from fogline.models.spec import ModelSpec

SPEC = ModelSpec(features=("cpu", "mem", "disk"), target="throughput", key="host", timestamp="time")
CSV = (
    "time,host,disk,cpu,notes,mem,throughput\n"
    "2023-11-14T22:13:20Z,h1,0.5,41.0,ok,2,10.5\n"
    "2023-11-14T22:13:21Z,h2,0.25,43.5,,3,oops\n"
    "2023-11-14T22:13:22Z,h1,0.75,44.0,late,4,12.0\n"
)


@pytest.fixture
def user_csv(tmp_path: Path) -> Path:
    path = tmp_path / "history.csv"
    path.write_text(CSV)
    return path


def test_rows_become_flat_named_records_with_their_own_times(user_csv: Path) -> None:
    fmt, items = iter_items(user_csv, spec=SPEC)
    items = list(items)
    assert fmt == "csv" and len(items) == 3
    first = json.loads(items[0].value)
    assert first == {
        "time": "2023-11-14T22:13:20Z",
        "cpu": 41.0,
        "mem": 2.0,
        "disk": 0.5,
        "throughput": 10.5,
        "host": "h1",
    }
    assert [it.ts_ms for it in items] == [1_700_000_000_000, 1_700_000_001_000, 1_700_000_002_000]
    assert [it.key for it in items] == ["h1", "h2", "h1"]
    # the daemon's decoder (same spec) reads them; the non-numeric target is dead-lettered
    raws = [RawRecord("t", 0, i, None, it.value, it.ts_ms) for i, it in enumerate(items)]
    batch = decode_batch(raws, Decoder(DataSchema.unfitted(SPEC)))
    assert batch.good == [0, 2] and batch.bad[0][1] == "non_numeric: throughput is str"
    assert batch.x.tolist() == [[41.0, 2.0, 0.5], [44.0, 4.0, 0.75]]
    assert batch.ts_ms.tolist() == [1_700_000_000_000, 1_700_000_002_000]
    assert batch.keys == ["h1", "h1"]


def test_a_header_without_the_model_columns_names_them(tmp_path: Path) -> None:
    path = tmp_path / "bad.csv"
    path.write_text("time,cpu,y\n1,2,3\n")
    _, items = iter_items(path, spec=SPEC)
    with pytest.raises(
        ValueError, match=r"lacks the model's columns \['mem', 'disk', 'throughput', 'host'\]"
    ):
        next(items)


def test_fogline_replay_with_a_config(
    kafka_bootstrap: str, user_csv: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = tmp_path / "fogline.toml"
    cfg.write_text(
        '[model]\nfeatures = ["cpu", "mem", "disk"]\ntarget = "throughput"\n'
        'key = "host"\ntimestamp = "time"\n'
    )
    topic = f"replay-spec-{uuid.uuid4().hex[:8]}"
    argv = ["replay", str(user_csv), "--topic", topic, "--bootstrap", kafka_bootstrap]
    assert main([*argv, "--config", str(cfg)]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["records"] == 3
    recs = read_topic(kafka_bootstrap, topic, min_records=3)
    assert [r.timestamp_ms for r in recs] == [
        1_700_000_000_000,
        1_700_000_001_000,
        1_700_000_002_000,
    ]
    assert json.loads(recs[2].value)["throughput"] == 12.0 and recs[2].key == b"h1"
    # without the config the file is not a fogline CSV (no y column)
    assert main(argv) == 2
    assert "no 'y' column" in capsys.readouterr().err
