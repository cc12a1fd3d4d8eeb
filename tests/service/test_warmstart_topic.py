"""`fogline warmstart --config --topic T --until`: a warm start on a topic's retained history.

Real Kafka-protocol broker (the embedded Tansu broker or a container, from
tests/conftest.py); no mocks.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from fogline.cli import main as cli_main
from fogline.daemon.stream.source import ReplayProducer, read_history

CONFIG = """[model]
features = ["cpu", "mem"]
target = "throughput"
"""
T0_MS = 1_700_000_000_000


def _produce(bootstrap: str, topic: str, n: int) -> None:
    rng = np.random.default_rng(0)
    with ReplayProducer(bootstrap, topic) as prod:
        for i in range(n):
            cpu, mem = float(rng.uniform(0, 100)), float(rng.normal(8, 2))
            rec = {"cpu": cpu, "mem": mem, "throughput": 10 + 0.2 * cpu + float(rng.normal())}
            if i == 5:
                rec["mem"] = "broken"
            # no ts field: the Kafka timestamp (1 s apart) is the record's time
            prod.send(json.dumps(rec).encode(), timestamp_ms=T0_MS + 1000 * i)
        prod.flush()


def test_warmstart_from_topic_history(
    kafka_bootstrap: str, fresh_topic: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _produce(kafka_bootstrap, fresh_topic, 300)
    assert len(read_history(kafka_bootstrap, fresh_topic, until_ts_ms=T0_MS + 99_000)) == 100
    cfg = tmp_path / "cfg.toml"
    cfg.write_text(CONFIG)
    base = ["warmstart", "--config", str(cfg), "--topic", fresh_topic]
    base += ["--bootstrap", kafka_bootstrap, "--out", str(tmp_path / "s.safetensors")]
    # the bad record stops the run with its partition and offset
    assert cli_main([*base, "--epochs", "1"]) == 2
    err = capsys.readouterr().err
    assert f"row 6 ({fresh_topic}:0@5): column 'mem'" in err
    rc = cli_main([*base, "--until", "250", "--drop-invalid", "--epochs", "2", "--json"])
    assert rc == 0
    doc = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert doc["data"]["rows_read"] == 250 and doc["data"]["dropped"] == {"non_numeric": 1}
    assert doc["train"]["split"] == "chronological"  # by the Kafka timestamps
    assert doc["holdout"]["n"] == 50
