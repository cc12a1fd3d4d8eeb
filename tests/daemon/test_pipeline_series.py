"""Autoregressive ``{ts, value, key}`` records through the daemon loop on fakes.

Decoding (bad records dead-lettered with their reason), inputs built per batch in
stream order, warming records counted (neither lost nor dead-lettered), and the
series state in every snapshot matching the snapshot's offsets exactly.
"""

from __future__ import annotations

import json
import math
from typing import Any

import numpy as np
import pytest
from daemon_fakes import BATCH, FakeDeadLetters, FakeStore, fake_clients
from daemon_fakes import fake_settings as _settings

from fogline.daemon.stream.pipeline import Clients, Pipeline, RunOptions
from fogline.daemon.stream.series import SeriesDecoder
from fogline.models import autoregressive as ar
from fogline.models.schema import DataSchema
from fogline.models.serialize import from_bytes
from fogline.models.spec import ModelSpec
from fogline.models.state import PosteriorState

AR: dict[str, Any] = {
    "mode": "autoregressive",
    "target": "value",
    "timestamp": "ts",
    "key": "host",
    "lags": 3,
    "hidden": [8],
}
T0 = 1_700_000_000


def rec(i: int, **override: Any) -> bytes:
    host = ("a", "b")[i % 2]
    obj = {"ts": T0 + 60 * i, "host": host, "value": math.sin(i / 5) + (3.0 if host == "b" else 0)}
    return json.dumps({**obj, **override}).encode()


class World:
    def __init__(
        self, log: list[bytes], store: FakeStore | None = None, spec: dict[str, Any] | None = None
    ) -> None:
        self.spec = spec if spec is not None else AR
        self.events: list[Any] = []
        self.store = store or FakeStore(self.events)
        self.log = log
        self.dlq = FakeDeadLetters(self.events)

    def clients(self) -> Clients:
        return fake_clients(self.store, self.dlq, self.events, self.log)

    def run(self, max_records: int | None = None) -> Pipeline:
        opts = RunOptions(idle_exit_s=0.05, max_records=max_records)
        pipe = Pipeline(_settings(self.spec), opts, clients=self.clients())
        assert pipe.run() == 0
        return pipe

    def latest(self) -> PosteriorState:
        return from_bytes(self.store.blobs[-1][1])


def _expected_series(log: list[bytes], upto: int) -> ar.SeriesState:
    """The series state of the valid records before offset ``upto``, built independently."""
    spec = ModelSpec.model_validate(AR)
    records = []
    for raw in log[:upto]:
        try:
            obj = json.loads(raw)
            v = float(obj["value"])
            if type(obj["value"]) not in (int, float) or not math.isfinite(v):
                continue
            ts = ar.parse_ts(obj["ts"])
        except (ValueError, KeyError, TypeError):
            continue
        records.append(ar.Record(ts, v, obj["host"]))
    return ar.features_for(spec, records, ar.SeriesState.empty(spec)).state


def test_series_decoder_reasons() -> None:
    spec = ModelSpec.model_validate({**AR, "transforms": {"value": "log1p"}})
    dec = SeriesDecoder(DataSchema.unfitted(spec))
    batch = dec.decode_batch(
        [
            rec(0),
            b'{"ts": 1, "host": "a"}',
            b'{"ts": 1, "host": "a", "value": "3"}',
            b'{"ts": "yesterday", "host": "a", "value": 1}',
            b'{"ts": 1, "host": "a", "value": -2}',
            b'{"ts": 1, "host": 1.5, "value": 1}',
            b'{"ts": 2, "value": 1}',
        ]
    )
    reasons = [r for _, r, _ in batch.bad]
    assert [r.split(":")[0] for r in reasons] == [
        "missing_field",
        "non_numeric",
        "bad_ts",
        "out_of_domain",
        "bad_key",
    ]
    assert reasons[0] == "missing_field: value"
    assert batch.good == [0, 6] and batch.keys == ["a", ""]
    assert batch.meta[1].tolist() == [1.0, 2000.0, float(dec.key_id(""))]
    # no key in the spec: one series, whatever key fields the records carry
    one = SeriesDecoder(DataSchema.unfitted(ModelSpec.model_validate({**AR, "key": None})))
    assert one.decode_batch([b'{"ts": 1, "key": "k", "value": 1}']).keys == [""]


def test_stream_dead_letters_bad_records_counts_warming_and_snapshots_the_lag_state() -> None:
    log = [rec(i) for i in range(100)]
    log[9] = rec(9, value=None)  # missing/null value
    log[20] = rec(20, value="high")
    log[33] = rec(33, ts="not a time")
    world = World(log)
    pipe = world.run()
    assert [raw.offset for raw, _ in world.dlq.sent] == [9, 20, 33]
    assert [why.split(":")[0] for _, why in world.dlq.sent] == ["non_numeric"] * 2 + ["bad_ts"]
    # 97 valid: 6 full batches of 16 absorbed; of those 96 rows, 2 keys x 3 lags only warm up
    assert pipe.stats.records_warming == 6
    state = world.latest()
    assert state.records_absorbed == 6 * BATCH - 6
    resume = state.offsets[("t", 0)]
    stored = ar.stored_series(state.extra)
    assert stored is not None
    # the lag state is exactly that of the records before the snapshot's offset
    assert stored[1] == _expected_series(log, resume)
    # every valid record is absorbed, warming or dead-lettered, or read again after resume
    assert sum(1 for o in range(resume) if o not in (9, 20, 33)) == 6 * BATCH


@pytest.mark.parametrize("season", ["auto", 16])
def test_restart_is_bit_identical_to_an_uninterrupted_run(season: str | int) -> None:
    # season 16: each key's buffer keeps P + 1 = 17 values and the inputs add
    # season_lag_15..17 and season_naive (a fresh prior's "auto" stays unseasonal)
    spec = {**AR, "season": season}
    log = [rec(i) for i in range(160)]
    whole = World(list(log), spec=spec)
    pipe = whole.run()
    depth = 17 if season == 16 else 3
    assert pipe.stats.records_warming == 2 * depth  # two keys fill their buffers
    assert whole.latest().config.in_features == len(ModelSpec.model_validate(spec).features)
    part = World(list(log), spec=spec)
    part.run(max_records=70)  # stops mid-stream: the snapshot holds 4 batches
    mid = part.latest()
    assert mid.offsets[("t", 0)] == 64
    again = World(list(log), store=part.store, spec=spec)
    again.run()
    a, b = whole.latest(), again.latest()
    assert a.offsets == b.offsets and a.records_absorbed == b.records_absorbed
    assert a.extra[ar.EXTRA_KEY] == b.extra[ar.EXTRA_KEY]
    for name, t in a.params.items():
        assert np.array_equal(t.numpy(), b.params[name].numpy()), name


def test_replay_by_an_autoregressive_spec_sends_ts_value_key_records(tmp_path: Any) -> None:
    from fogline.daemon.replay import iter_items
    from fogline.daemon.stream.decode import RawRecord

    spec = ModelSpec.model_validate(AR)
    path = tmp_path / "live.csv"
    path.write_text("ts,host,value,notes\n1700000000,a,1.5,x\n1700000060,b,oops,\n")
    fmt, items = iter_items(path, spec=spec)
    got = list(items)
    assert fmt == "csv" and [it.key for it in got] == ["a", "b"]
    assert json.loads(got[0].value) == {"ts": 1700000000.0, "value": 1.5, "host": "a"}
    batch = SeriesDecoder(DataSchema.unfitted(spec)).decode_batch(
        [RawRecord("t", 0, i, None, it.value, it.ts_ms) for i, it in enumerate(got)]
    )
    assert batch.good == [0] and batch.bad[0][1] == "non_numeric: value is str"
    # a NAB timestamp,value file goes out unlagged: the daemon builds the lags
    nab = tmp_path / "nab.csv"
    nab.write_text("timestamp,value\n2024-01-01 00:00:00,3.0\n2024-01-01 00:05:00,4.0\n")
    one = ModelSpec.model_validate({**AR, "timestamp": "timestamp", "key": None})
    fmt, items = iter_items(nab, spec=one)
    assert fmt == "csv"
    assert [json.loads(it.value) for it in items] == [
        {"timestamp": "2024-01-01 00:00:00", "value": 3.0},
        {"timestamp": "2024-01-01 00:05:00", "value": 4.0},
    ]


def test_settings_contradicting_the_stored_series_exit_2_naming_the_fields() -> None:
    world = World([rec(i) for i in range(40)])
    world.run()
    written = len(world.store.blobs)
    for change, field in (
        ({"lags": 5}, "model.features"),
        ({"key": "node"}, "model.key"),
        ({"season": 12}, "model.season"),  # the stored spec has none (a fresh prior's "auto")
    ):
        opts = RunOptions(idle_exit_s=0.05)
        pipe = Pipeline(_settings({**AR, **change}), opts, clients=world.clients())
        assert pipe.run() == 2
        assert field + ": settings say" in pipe.stats.exit_reason
    assert len(world.store.blobs) == written


def test_series_decoder_pickles_without_its_key_ids_and_adopt_renumbers() -> None:
    """The keyed child decodes with a pickled copy; the parent re-numbers its key column."""
    import pickle

    schema = DataSchema.unfitted(ModelSpec.model_validate(AR))
    parent = SeriesDecoder(schema)
    parent.key_id("z")  # the parent met another key first: its ids differ from the child's
    child = pickle.loads(pickle.dumps(parent))
    assert child.key_names == [] and child.schema == parent.schema
    raws = [rec(0, host="b"), b'{"ts": 1, "value": "x"}', rec(2, host="a"), rec(3, host="b")]
    got = parent.adopt(child.decode_batch(raws))
    want = SeriesDecoder(schema)
    want.key_id("z")
    own = want.decode_batch(raws)
    assert got.meta.tolist() == own.meta.tolist()
    assert got.keys == own.keys and got.good == own.good and got.bad == own.bad
    assert parent.key_names == ["z", "b", "a"]
