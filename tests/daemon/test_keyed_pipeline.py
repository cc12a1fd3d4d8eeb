"""The keyed daemon (:class:`KeyedPipeline`) on in-memory fakes: no broker, no Redis.

A 2-partition keyed stream (6 keys, malformed records among them) through the
real pipeline with a fake group consumer, partition store and dead-letter
producer (``keyed_fakes.py``): every valid record of a complete batch absorbed
once, bad records dead-lettered with their reason, the commit path in order;
a revoke checkpoints and releases the partition, and whoever is assigned it
next -- this daemon again or another -- resumes it; a killed owner's partitions
are resumed from the last checkpoint once its leases run out; a tiny key cache
evicts and loses nothing; a changed partition count or a moved key exits 7.
Every run ends with the same key states, byte for byte, as one uninterrupted run.
"""

from __future__ import annotations

import json
import time
from typing import Any

import numpy as np
import pytest
from daemon_fakes import BATCH, fake_settings
from keyed_fakes import FakeGroupConsumer, FakePartitionStore, KeyedWorld, Killed

from fogline.bench.keyed_daemon import key_partition
from fogline.daemon.config import Settings
from fogline.daemon.stream.keyed import EXIT_REPARTITIONED, KeyedPipeline
from fogline.daemon.stream.pipeline import RunOptions
from fogline.daemon.stream.store import Lease
from fogline.models.serialize import from_bytes

MODEL: dict[str, Any] = {
    "features": ["f0", "f1"],
    "target": "y",
    "key": "host",
    "hidden": [8],
    "transform": "none",
}
PARTS = 2
KEYS = [f"h{i}" for i in range(6)]


def keyed_settings(**keyed: Any) -> Settings:
    """:func:`fake_settings` in keyed mode (keys at most 8 characters)."""
    dotted = {"keyed.enabled": True, "keyed.max_key_length": 8, "keyed.idle_ttl_s": 0.0}
    dotted.update({f"keyed.{k}": v for k, v in keyed.items()})
    return fake_settings(MODEL).override(dotted)


def make_logs(n: int, seed: int = 0) -> tuple[dict[int, list[tuple[bytes | None, bytes]]], dict]:
    """``n`` records over :data:`KEYS`, each to its key's partition; the bad ones by reason."""
    rng = np.random.default_rng(seed)
    logs: dict[int, list[tuple[bytes | None, bytes]]] = {p: [] for p in range(PARTS)}
    bad: dict[tuple[int, int], str] = {}
    for i in range(n):
        k = KEYS[int(rng.integers(len(KEYS)))]
        p = key_partition(k, PARTS)
        x = rng.standard_normal(2).round(4)
        rec: dict[str, Any] = {"ts": 1_700_000_000 + i, "host": k, "f0": x[0], "f1": x[1]}
        rec["y"] = round(float(np.sin(3 * x[0]) + 0.2 * KEYS.index(k)), 4)
        value = json.dumps(rec).encode()
        if i % 29 == 5:
            value, reason = b'{"host": "h0", "f0": ', "invalid_json"
        elif i % 29 == 11:
            value, reason = json.dumps({**rec, "host": None}).encode(), "missing_key"
        elif i % 29 == 17:
            value, reason = json.dumps({**rec, "host": "h" * 9}).encode(), "bad_key"
        elif i % 29 == 23:
            value, reason = json.dumps({**rec, "f1": "x"}).encode(), "non_numeric"
        else:
            reason = ""
        if reason:
            bad[(p, len(logs[p]))] = reason
        logs[p].append((k.encode(), value))
    return logs, bad


def absorbable(logs: dict[int, list[Any]], bad: dict[tuple[int, int], str]) -> int:
    valid = {p: sum((p, o) not in bad for o in range(len(log))) for p, log in logs.items()}
    return sum(v // BATCH * BATCH for v in valid.values())


def run(
    world: KeyedWorld,
    settings: Settings,
    member: str = "m0",
    plan: Any = None,
    per_poll: int = 24,
) -> tuple[int, KeyedPipeline]:
    pipe = KeyedPipeline(
        settings,
        RunOptions(idle_exit_s=0.05, threads=1),
        clients=world.clients(member, plan, per_poll),
    )
    return pipe.run(), pipe


@pytest.fixture(scope="module")
def stream() -> tuple[dict[int, list[Any]], dict[tuple[int, int], str]]:
    return make_logs(220, seed=4)


@pytest.fixture(scope="module")
def reference(stream: Any) -> dict[str, bytes]:
    """Key blobs of one uninterrupted run that keeps every key in memory."""
    world = KeyedWorld(stream[0], PARTS)
    code, _ = run(world, keyed_settings())
    assert code == 0
    return dict(world.store.blobs)


def test_every_complete_batch_absorbed_once_bad_records_dead_lettered_in_commit_order(
    stream: Any, reference: dict[str, bytes]
) -> None:
    logs, bad = stream
    world = KeyedWorld(logs, PARTS)
    code, pipe = run(world, keyed_settings(), per_poll=7)  # other poll sizes: same batches
    assert code == 0 and world.store.blobs == reference
    expect = absorbable(logs, bad)
    assert pipe.stats.records_absorbed == expect
    assert sum(m.records_absorbed for m in world.store.manifests.values()) == expect
    assert sum(from_bytes(b).records_absorbed for b in world.store.blobs.values()) == expect
    assert set(world.store.index) == set(KEYS)

    # each malformed record dead-lettered once, with its reason and source offset
    sent = {(raw.partition, raw.offset): reason for raw, reason in world.dlq.sent}
    assert sent.keys() == bad.keys()
    for where, reason in bad.items():
        assert sent[where].startswith(reason), (where, sent[where])
    assert pipe.stats.dead_lettered == len(bad)

    # the next offset of each partition: its first row in no complete batch
    for p, log in logs.items():
        good = [o for o in range(len(log)) if (p, o) not in bad]
        complete = len(good) // BATCH * BATCH
        nxt = good[complete] if complete < len(good) else len(log)
        assert world.store.manifests[p].offsets == {f"t:{p}": nxt}
    assert world.store.leases == {}  # released at the clean stop

    # commit path: dead letters flushed, then the store, then Kafka with the same offsets
    ev = world.events
    commits = [i for i, e in enumerate(ev) if e[0] == "store_commit"]
    assert commits
    last = 0
    for i in commits:
        assert any(e[0] == "flush" for e in ev[last:i]), ev[last:i]
        offsets = ev[i][2]
        if offsets:
            nxt = next(e for e in ev[i + 1 :] if e[0] in ("kafka_commit", "store_commit"))
            assert nxt[0] == "kafka_commit"
            assert {f"{t}:{p}": o for (t, p), o in nxt[1].items()} == offsets
        last = i


def test_revoked_partition_is_checkpointed_released_and_resumed_by_the_next_owner(
    stream: Any, reference: dict[str, bytes]
) -> None:
    logs, bad = stream
    world = KeyedWorld(logs, PARTS)

    def give_away(n: int, c: FakeGroupConsumer) -> None:
        if n == 5:  # partition 1 moves to m1 (m0 keeps 0)
            world.group.assign("m0", {0})
            world.group.assign("m1", {1})

    code, _ = run(world, keyed_settings(), "m0", give_away)
    assert code == 0
    ev = world.events
    revoked = ev.index(("revoked", [1]))
    after = ev[revoked:]
    commit = next(i for i, e in enumerate(after) if e[0] == "store_commit" and e[1] == 1)
    assert ("release", 1) in after[commit:]  # checkpointed, then released
    handed = world.store.manifests[1]
    assert 0 < handed.offsets["t:1"] < len(logs[1])  # mid-stream

    def back(n: int, c: FakeGroupConsumer) -> None:
        if n == 6:  # a rebalance gives partition 0 to m1 too
            world.group.assign("m0", set())
            world.group.assign("m1", {0, 1})

    code, second = run(world, keyed_settings(), "m1", back)
    assert code == 0 and second.stats.partitions_resumed == 2
    assert world.store.blobs == reference  # byte for byte
    total = sum(m.records_absorbed for m in world.store.manifests.values())
    assert total == absorbable(logs, bad)


def test_revoke_and_reassign_to_the_same_daemon_changes_nothing(
    stream: Any, reference: dict[str, bytes]
) -> None:
    world = KeyedWorld(stream[0], PARTS)

    def flap(n: int, c: FakeGroupConsumer) -> None:
        if n == 4:
            world.group.assign("m0", {1})
        if n == 7:
            world.group.assign("m0", {0, 1})

    code, pipe = run(world, keyed_settings(), "m0", flap)
    assert code == 0
    assert ("revoked", [0]) in world.events and ("release", 0) in world.events
    assert [e for e in world.events if e == ("acquire", 0)] == [("acquire", 0)] * 2
    assert pipe.stats.partitions_resumed == 3
    assert world.store.blobs == reference


def test_a_killed_owner_is_resumed_from_its_checkpoints_once_its_leases_run_out(
    stream: Any, reference: dict[str, bytes]
) -> None:
    logs, bad = stream
    world = KeyedWorld(logs, PARTS)

    def kill(n: int, c: FakeGroupConsumer) -> None:
        if n == 8:
            raise Killed

    with pytest.raises(Killed):
        run(world, keyed_settings(), "m0", kill)
    assert world.store.leases.keys() == {0, 1}  # never released: it was killed
    assert world.store.commits > 0
    checkpointed = sum(m.records_absorbed for m in world.store.manifests.values())
    assert 0 < checkpointed < absorbable(logs, bad)

    world.group.assign("m0", set())
    world.group.assign("m1", {0, 1})

    def ttl(n: int, c: FakeGroupConsumer) -> None:
        if n == 4:  # the dead owner's leases run out while m1 waits for them
            assert not any(e == ("acquire", 0) for e in world.events[acquired:])
            world.store.expire_leases()

    acquired = len(world.events)
    code, pipe = run(world, keyed_settings(), "m1", ttl)
    assert code == 0 and pipe.stats.partitions_resumed == 2
    assert world.store.blobs == reference
    assert sum(m.records_absorbed for m in world.store.manifests.values()) == absorbable(logs, bad)


def test_a_tiny_key_cache_evicts_and_loses_nothing(
    stream: Any, reference: dict[str, bytes]
) -> None:
    world = KeyedWorld(stream[0], PARTS)
    code, pipe = run(world, keyed_settings(max_keys=1))
    assert code == 0 and pipe.cache.evictions > 0 and len(pipe.cache) <= 1
    assert world.store.blobs == reference


def test_another_partition_count_or_a_moved_key_exits_7(stream: Any) -> None:
    logs, _ = stream
    world = KeyedWorld(logs, PARTS)
    assert run(world, keyed_settings())[0] == 0
    assert world.store.layout_fields["partitions"] == "2"

    world.group.partitions = 3  # the topic got a partition more
    code, pipe = run(world, keyed_settings())
    assert code == EXIT_REPARTITIONED
    assert "2 partitions" in pipe.stats.exit_reason and "now has 3" in pipe.stats.exit_reason
    assert world.store.leases == {}

    world.group.partitions = 2
    key, value = next(kv for kv in logs[0] if b'"host": "h' in kv[1] and b"hhhh" not in kv[1])
    before = dict(world.store.blobs)
    moved = {0: list(logs[0]), 1: list(logs[1]) + [(key, value)] * BATCH}
    other = KeyedWorld(moved, PARTS)
    other.store = world.store
    code, pipe = run(other, keyed_settings())
    assert code == EXIT_REPARTITIONED
    assert f"key {key.decode()!r} was absorbed from partition 0" in pipe.stats.exit_reason
    assert world.store.blobs == before  # nothing of the moved key's batch written


def test_a_restart_without_init_decodes_by_the_stored_fleet_prior(
    tmp_path: Any, stream: Any
) -> None:
    """The group's first fleet prior (a warm start with fitted transforms) is the model:
    a replica restarted without ``--init`` decodes by its schema, not by a fresh prior's."""
    from fogline.models.fit import FitOptions, fit
    from fogline.models.serialize import save
    from fogline.models.spec import ModelSpec
    from fogline.models.tabular import load_table

    logs, bad = stream
    spec = {k: v for k, v in MODEL.items() if k != "transform"}  # standardised columns
    rows = [
        json.loads(v)
        for p, log in logs.items()
        for o, (_, v) in enumerate(log)
        if (p, o) not in bad
    ]
    lines = ["host,f0,f1,y"] + [f"{r['host']},{r['f0']},{r['f1']},{r['y']}" for r in rows[:150]]
    (tmp_path / "h.csv").write_text("\n".join(lines) + "\n")
    model = ModelSpec.model_validate(spec)
    table, _ = load_table(tmp_path / "h.csv", model)
    warm = tmp_path / "warm.safetensors"
    save(fit(model, table, FitOptions(epochs=2, samples=5)).state, str(warm))
    settings = fake_settings(spec).override(
        {"keyed.enabled": True, "keyed.max_key_length": 8, "keyed.idle_ttl_s": 0.0}
    )

    def go(world: KeyedWorld, member: str, init: Any, plan: Any = None) -> int:
        opts = RunOptions(idle_exit_s=0.05, threads=1, init_path=init)
        return KeyedPipeline(settings, opts, clients=world.clients(member, plan)).run()

    one = KeyedWorld(logs, PARTS)
    assert go(one, "m0", warm) == 0

    def kill(n: int, c: FakeGroupConsumer) -> None:
        if n == 6:
            raise Killed

    two = KeyedWorld(logs, PARTS)
    with pytest.raises(Killed):
        go(two, "m0", warm, kill)
    two.store.expire_leases()
    two.group.assign("m0", set())
    assert go(two, "m1", None) == 0  # no --init: the stored fleet prior
    assert two.store.blobs == one.store.blobs
    assert sum(m.records_absorbed for m in two.store.manifests.values()) == absorbable(logs, bad)


def test_dropped_outliers_count_as_absorbed_in_the_partition_as_in_the_key() -> None:
    """With ``forget`` a batch's gross outliers are dropped from the step but still absorbed
    (seen, weight 0): the partition's manifest counts them as the key's state does."""
    logs, bad = make_logs(220, seed=4)
    for p, log in logs.items():  # a gross outlier in every 10th valid record
        for o, (key, value) in enumerate(log):
            if (p, o) not in bad and o % 10 == 3:
                rec = json.loads(value)
                log[o] = (key, json.dumps({**rec, "y": 1e4}).encode())
    world = KeyedWorld(logs, PARTS)
    settings = keyed_settings().override({"drift.policy": "forget"})
    code, pipe = run(world, settings)
    assert code == 0
    expect = absorbable(logs, bad)
    keys = sum(from_bytes(b).records_absorbed for b in world.store.blobs.values())
    assert keys == expect
    assert sum(m.records_absorbed for m in world.store.manifests.values()) == expect
    assert pipe.stats.records_absorbed == expect


class ExpiringStore(FakePartitionStore):
    """The fake store with real lease TTLs: a lease not renewed within its TTL is gone."""

    def __init__(self, events: list[Any]) -> None:
        super().__init__(events)
        self.deadline: dict[int, float] = {}

    def _check(self) -> None:
        super()._check()
        now = time.monotonic()
        for p, t in list(self.deadline.items()):
            if now >= t:
                self.leases.pop(p, None)
                del self.deadline[p]
                self.events.append(("expired", p))

    def acquire(self, partition: int, owner: str, ttl_s: float) -> Lease | None:
        lease = super().acquire(partition, owner, ttl_s)
        if lease is not None:
            self.deadline[partition] = time.monotonic() + ttl_s
        return lease

    def renew(self, lease: Lease) -> bool:
        held = super().renew(lease)
        if held:
            self.deadline[self._partition(lease)] = time.monotonic() + lease.ttl_s
        return held


def test_an_update_longer_than_the_lease_ttl_keeps_the_partitions(
    stream: Any, reference: dict[str, bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A batch whose update outlasts the lease TTL (many keys ending their calibration at
    once) keeps its leases: the keeper renews them while it runs, nothing is dropped or
    redone, and the run ends as the uninterrupted one."""
    from fogline.daemon.stream.keyed_update import KeyedUpdate

    logs, bad = stream
    world = KeyedWorld(logs, PARTS)
    world.store = ExpiringStore(world.events)
    step = KeyedUpdate.step_cached
    slow: list[int] = []

    def slow_step(self: KeyedUpdate, *args: Any, **kw: Any) -> Any:
        if len(slow) < 2:  # two batches take three TTLs each
            slow.append(1)
            time.sleep(0.9)
        return step(self, *args, **kw)

    monkeypatch.setattr(KeyedUpdate, "step_cached", slow_step)
    code, pipe = run(world, keyed_settings().override({"redis.lease_ttl_s": 0.3}))
    assert code == 0 and len(slow) == 2
    assert not [e for e in world.events if e[0] == "expired"]
    assert pipe.stats.partitions_resumed == PARTS  # each claimed once, never dropped
    assert world.store.blobs == reference
    assert sum(m.records_absorbed for m in world.store.manifests.values()) == absorbable(logs, bad)
