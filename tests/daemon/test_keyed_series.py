"""Keyed mode with an autoregressive model, on in-memory fakes.

Each key's series state (its last values and time stamps) lives in the key's
own state: it equals :func:`fogline.models.autoregressive.features_for` over the
key's absorbed records alone; warming records are counted, never lost; bad
records are dead-lettered with their reason; a kill and restart, a revoke and a
tiny key cache end with the same key blobs as one run; a warm start's history
carries over to the key it belongs to; the population fleet prior counts a key
only once it has been stepped.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from daemon_fakes import BATCH, fake_settings
from keyed_fakes import FakeGroupConsumer, KeyedWorld, Killed

from fogline.bench.keyed_daemon import key_partition
from fogline.daemon.config import Settings
from fogline.daemon.stream.keyed import KeyedPipeline
from fogline.daemon.stream.keyed_series import KeyedSeries
from fogline.daemon.stream.pipeline import RunOptions, fresh_prior
from fogline.models import autoregressive as ar
from fogline.models.schema import DataSchema
from fogline.models.serialize import from_bytes, save
from fogline.models.spec import ModelSpec
from fogline.models.state import PosteriorState

AR: dict[str, Any] = {
    "mode": "autoregressive",
    "target": "value",
    "timestamp": "ts",
    "key": "host",
    "lags": 3,
    "season": "none",
    "hidden": [8],
}
SPEC = ModelSpec.model_validate(AR)
DEPTH = ar.spec_depth(SPEC)
PARTS = 2
KEYS = ["a", "b", "c", "d", "e"]
T0 = 1_700_000_000
Logs = dict[int, list[tuple[bytes | None, bytes]]]


def ar_settings(**dotted: Any) -> Settings:
    base = {"keyed.enabled": True, "keyed.idle_ttl_s": 0.0}
    return fake_settings(AR).override({**base, **dotted})


def make_logs(n: int) -> tuple[Logs, dict[tuple[int, int], str]]:
    """``n`` series records (key i's level 10 i), each to its key's partition; bad ones by reason."""
    logs: Logs = {p: [] for p in range(PARTS)}
    bad: dict[tuple[int, int], str] = {}
    for i in range(n):
        k = KEYS[(i * 7 + i // 5) % len(KEYS)]
        p = key_partition(k, PARTS)
        rec: dict[str, Any] = {"ts": T0 + 60 * i, "host": k}
        rec["value"] = round(10.0 * KEYS.index(k) + math.sin(i / 4), 4)
        reason = ""
        if i % 31 == 7:
            rec["value"], reason = "oops", "non_numeric"
        elif i % 31 == 13:
            rec["host"], reason = None, "missing_key"
        elif i % 31 == 19:
            rec["ts"], reason = "yesterday", "bad_ts"
        if reason:
            bad[(p, len(logs[p]))] = reason
        logs[p].append((k.encode(), json.dumps(rec).encode()))
    return logs, bad


def absorbed_records(logs: Logs, bad: dict[tuple[int, int], str]) -> dict[str, list[ar.Record]]:
    """Each key's records in the complete batches of its partition, in stream order."""
    out: dict[str, list[ar.Record]] = {}
    for p, log in logs.items():
        good = [json.loads(v) for o, (_, v) in enumerate(log) if (p, o) not in bad]
        for obj in good[: len(good) // BATCH * BATCH]:
            rec = ar.Record(ar.ts_from_ms(obj["ts"] * 1000), float(obj["value"]), obj["host"])
            out.setdefault(obj["host"], []).append(rec)
    return out


def run(
    world: KeyedWorld, settings: Settings, member: str = "m0", plan: Any = None, **opts: Any
) -> tuple[int, KeyedPipeline]:
    pipe = KeyedPipeline(
        settings,
        RunOptions(idle_exit_s=0.05, threads=1, **opts),
        clients=world.clients(member, plan),
    )
    return pipe.run(), pipe


@pytest.fixture(scope="module")
def stream() -> tuple[Logs, dict[tuple[int, int], str]]:
    return make_logs(260)


@pytest.fixture(scope="module")
def reference(stream: Any) -> dict[str, bytes]:
    world = KeyedWorld(stream[0], PARTS)
    assert run(world, ar_settings())[0] == 0
    return dict(world.store.blobs)


def test_each_key_carries_its_own_series_state_and_warming_is_counted(
    stream: Any, reference: dict[str, bytes]
) -> None:
    logs, bad = stream
    world = KeyedWorld(logs, PARTS)
    code, pipe = run(world, ar_settings())
    assert code == 0 and world.store.blobs == reference
    want = absorbed_records(logs, bad)
    assert sorted(world.store.blobs) == sorted(want) == KEYS
    warming = 0
    for k, recs in want.items():
        state = from_bytes(world.store.blobs[k])
        stored = ar.stored_series(state.extra)
        assert stored is not None
        expect = ar.features_for(SPEC, recs, ar.SeriesState.empty(SPEC)).state
        assert stored[1] == expect and stored[1].known_keys() == [k]  # its own lags only
        warm = min(len(recs), DEPTH)
        warming += warm
        assert state.records_absorbed == len(recs) - warm
        assert world.store.index[k]["records_absorbed"] == len(recs) - warm
    assert pipe.stats.records_warming == warming
    valid = sum(len(r) for r in want.values())
    assert pipe.stats.records_absorbed + pipe.stats.records_warming == valid
    assert sum(m.records_absorbed for m in world.store.manifests.values()) == valid - warming

    sent = {(raw.partition, raw.offset): reason for raw, reason in world.dlq.sent}
    assert sent.keys() == bad.keys()
    for where, reason in bad.items():
        assert sent[where].startswith(reason), (where, sent[where])


def test_kill_restart_revoke_and_a_tiny_cache_give_the_same_key_blobs(
    stream: Any, reference: dict[str, bytes]
) -> None:
    logs, _ = stream

    def kill(n: int, c: FakeGroupConsumer) -> None:
        if n == 7:
            raise Killed

    world = KeyedWorld(logs, PARTS)
    with pytest.raises(Killed):
        run(world, ar_settings(), "m0", kill)
    assert world.store.commits > 0
    world.store.expire_leases()
    world.group.assign("m0", set())

    def revoke(n: int, c: FakeGroupConsumer) -> None:
        if n == 5:
            world.group.assign("m1", {0})
        if n == 9:
            world.group.assign("m1", {0, 1})

    world.group.assign("m1", {0, 1})
    assert run(world, ar_settings(**{"keyed.max_keys": 1}), "m1", revoke)[0] == 0
    assert ("revoked", [1]) in world.events
    assert world.store.blobs == reference


def test_a_warm_start_history_carries_over_to_its_own_key(tmp_path: Path, stream: Any) -> None:
    logs, bad = stream
    s = ar_settings()
    fleet = fresh_prior(s, torch.device("cpu"))
    hist = [ar.Record(ar.ts_from_ms((T0 - 600 + 60 * i) * 1000), 5.0 + i, "a") for i in range(5)]
    hist += [ar.Record(ar.ts_from_ms((T0 - 60) * 1000), 1.0, "zz")]
    warm_series = ar.features_for(SPEC, hist, ar.SeriesState.empty(SPEC)).state
    warm = fleet.replace(extra={**fleet.extra, ar.EXTRA_KEY: ar.series_extra(SPEC, warm_series)})
    path = tmp_path / "warm.safetensors"
    save(warm, str(path))

    world = KeyedWorld(logs, PARTS)
    code, pipe = run(world, s, init_path=path)
    assert code == 0
    want = absorbed_records(logs, bad)
    a = from_bytes(world.store.blobs["a"])
    stored = ar.stored_series(a.extra)
    assert stored is not None and stored[1].known_keys() == ["a"]  # not "zz", not the others
    own = [r for r in hist if r.key == "a"] + want["a"]
    assert stored[1] == ar.features_for(SPEC, own, ar.SeriesState.empty(SPEC)).state
    assert a.records_absorbed == len(want["a"])  # no warming: the history filled its lags
    others = [k for k in KEYS if k != "a"]
    assert pipe.stats.records_warming == sum(min(len(want[k]), DEPTH) for k in others)


def test_the_population_counts_a_key_once_it_has_been_stepped(stream: Any) -> None:
    logs, bad = stream
    world = KeyedWorld(logs, PARTS)
    assert run(world, ar_settings(**{"keyed.fleet": "population"}))[0] == 0
    want = absorbed_records(logs, bad)
    for p, m in world.store.manifests.items():
        assert m.population is not None
        stepped = [k for k, r in want.items() if key_partition(k, PARTS) == p and len(r) > DEPTH]
        assert m.population["count"] == len(stepped)


def test_own_cuts_the_fleet_series_down_to_the_key() -> None:
    fleet = fresh_prior(ar_settings(), torch.device("cpu"))
    recs = [ar.Record(ar.ts_from_ms(60_000 * i), float(i), "ab"[i % 2]) for i in range(8)]
    series = ar.features_for(SPEC, recs, ar.SeriesState.empty(SPEC)).state
    fleet = fleet.replace(extra={**fleet.extra, ar.EXTRA_KEY: ar.series_extra(SPEC, series)})
    ks = KeyedSeries(SPEC, DataSchema.unfitted(SPEC))
    mine: PosteriorState = ks.own(fleet, "a")
    got = ar.stored_series(mine.extra)
    assert got is not None and got[0] == SPEC
    assert got[1].lags.buffers == {"a": series.lags.buffers["a"]}
    assert got[1].clock == {"a": series.clock["a"]}
    new = ar.stored_series(ks.own(fleet, "new").extra)
    assert new is not None and new[1] == ar.SeriesState.empty(SPEC)
    assert mine.params["loc"] is fleet.params["loc"]  # the posterior is the fleet's


def test_per_key_drift_loops_with_series_survive_eviction(stream: Any) -> None:
    logs, _ = stream
    drift = {"drift.policy": "forget"}
    big, small = KeyedWorld(logs, PARTS), KeyedWorld(logs, PARTS)
    assert run(big, ar_settings(**drift))[0] == 0
    code, pipe = run(small, ar_settings(**drift, **{"keyed.max_keys": 1}))
    assert code == 0 and pipe.cache.evictions > 0
    assert big.store.blobs == small.store.blobs
    assert {v["drift_mode"] for v in big.store.index.values()} <= {
        "stable",
        "shifted",
        "recovering",
    }
