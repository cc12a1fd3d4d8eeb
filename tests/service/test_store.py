"""SnapshotStore against a real redis-server (the session ``redis_url`` fixture).

Every test works on its own model name, so tests never see each other's keys.
"""

from __future__ import annotations

import hashlib
import json
import random
import threading
import uuid
from collections.abc import Iterator

import pytest
import redis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from structlog.testing import capture_logs

from fogline.cli import main
from fogline.daemon.embedded import EmbeddedRedis
from fogline.daemon.stream.store import (
    SCHEMA_VERSION,
    CorruptSnapshot,
    LeaseLost,
    SnapshotMeta,
    SnapshotNotFound,
    SnapshotStore,
    StoreUnavailable,
    retry_backoff,
)

pytestmark = pytest.mark.service


@pytest.fixture
def store(redis_url: str) -> Iterator[SnapshotStore]:
    s = SnapshotStore(redis_url, f"test-{uuid.uuid4().hex[:10]}", retention=5)
    yield s
    s.purge()
    s.close()


@pytest.fixture
def raw(redis_url: str) -> Iterator[redis.Redis]:
    """A plain client to inspect keys behind the store's back."""
    client = redis.Redis.from_url(redis_url)
    yield client
    client.close()


def _write(store: SnapshotStore, blob: bytes, n: int = 0, **kw: object) -> SnapshotMeta:
    return store.write(blob, records_absorbed=n, offsets={"telemetry:0": n}, **kw)  # type: ignore[arg-type]


# --------------------------------------------------------------------------
# round trip
# --------------------------------------------------------------------------
def test_empty_store(store: SnapshotStore) -> None:
    assert store.latest_version() is None
    assert store.list_versions() == []
    with pytest.raises(SnapshotNotFound):
        store.read()
    with pytest.raises(SnapshotNotFound):
        store.read_meta(3)
    assert store.ping()


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    blob=st.binary(max_size=4096),
    records=st.integers(0, 2**53),
    offsets=st.dictionaries(
        st.from_regex(r"[a-z.]{1,12}:[0-9]{1,3}", fullmatch=True), st.integers(0, 2**62), max_size=4
    ),
    drift=st.dictionaries(
        st.text(max_size=8),
        st.one_of(st.integers(), st.text(max_size=8), st.booleans()),
        max_size=3,
    ),
)
def test_write_read_round_trip_is_bit_exact(
    store: SnapshotStore,
    blob: bytes,
    records: int,
    offsets: dict[str, int],
    drift: dict[str, object],
) -> None:
    cfg = {"in_features": 8, "hidden": [32, 32], "name": "é"}
    meta = store.write(
        blob, records_absorbed=records, offsets=offsets, model_config=cfg, drift=drift, writer="w1"
    )
    snap = store.read()
    assert snap.blob == blob
    assert snap.meta == meta
    assert store.read(meta.version).blob == blob
    assert store.read_meta() == meta == store.read_meta(meta.version)
    assert meta.checksum == hashlib.sha256(blob).hexdigest()
    assert meta.offsets == offsets and meta.drift == drift and meta.model_cfg == cfg
    assert meta.records_absorbed == records and meta.size == len(blob) and meta.writer == "w1"
    assert meta.schema_version == SCHEMA_VERSION and meta.model_name == store.model_name


def test_large_blob_and_versions_increase(store: SnapshotStore) -> None:
    blob = random.Random(1).randbytes(200_000)
    versions = [_write(store, blob, i).version for i in range(3)]
    assert versions == [1, 2, 3]
    assert store.latest_version() == 3
    assert store.read().blob == blob


def test_meta_hash_round_trip_uses_model_config_name() -> None:
    meta = SnapshotMeta(
        model_name="m",
        version=4,
        created_at=1.5,
        records_absorbed=7,
        offsets={"t:0": 3},
        checksum="ab",
        model_config={"a": 1},
        drift={"alarm": False},
        writer="me",
        size=2,
    )
    h = meta.to_hash()
    assert json.loads(h["model_config"]) == {"a": 1} and "model_cfg" not in h
    assert SnapshotMeta.from_hash({k.encode(): v.encode() for k, v in h.items()}) == meta
    with pytest.raises(CorruptSnapshot):
        SnapshotMeta.from_hash({**h, "offsets": "{not json"})


# --------------------------------------------------------------------------
# atomicity, retention, corruption
# --------------------------------------------------------------------------
def test_write_is_consistent_at_every_step(store: SnapshotStore, raw: redis.Redis) -> None:
    for i in range(1, 8):
        meta = _write(store, bytes([i]) * 100, i)
        assert raw.get(store.keys_latest) == str(meta.version).encode()
        assert raw.get(store.snap_key(meta.version)) == bytes([i]) * 100
        assert int(raw.hget(store.meta_key(meta.version), "version") or 0) == meta.version
        assert raw.zscore(store.keys_versions, str(meta.version)) == meta.version
        assert raw.ttl(store.snap_key(meta.version)) == -1  # the staging TTL is gone
    assert raw.keys(f"{store.base}:staging:*") == []


def test_readers_never_see_a_torn_snapshot(redis_url: str, store: SnapshotStore) -> None:
    """A reader racing a writer (retention 2, so trimming races too) only sees
    a latest snapshot whose blob, checksum and metadata belong together."""
    writer = SnapshotStore(redis_url, store.model_name, retention=2)
    n_writes = 300
    stop = threading.Event()
    errors: list[BaseException] = []

    def write_all() -> None:
        try:
            for i in range(1, n_writes + 1):
                writer.write(i.to_bytes(4, "big") * 64, records_absorbed=i, offsets={"t:0": i})
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)
        finally:
            stop.set()

    store.write((0).to_bytes(4, "big") * 64, records_absorbed=0, offsets={"t:0": 0})
    thread = threading.Thread(target=write_all)
    thread.start()
    seen = set()
    while not stop.is_set():
        snap = store.read()  # verifies the checksum
        assert int.from_bytes(snap.blob[:4], "big") == snap.meta.records_absorbed
        assert snap.meta.offsets == {"t:0": snap.meta.records_absorbed}
        seen.add(snap.meta.version)
    thread.join()
    writer.close()
    assert not errors
    assert store.latest_version() == n_writes + 1
    assert len(seen) > 1  # the reader really raced the writer


def test_emptied_script_cache_is_a_retryable_outage(store: SnapshotStore, raw: redis.Redis) -> None:
    """After a Redis restart the script cache is empty; a write then either
    reloads the script itself or fails as StoreUnavailable, never otherwise."""
    _write(store, b"one", 1)
    raw.script_flush()
    assert _write(store, b"two", 2).version == 2  # redis-py reloads before MULTI
    assert store.read().blob == b"two"


def test_retention_trims_old_versions(store: SnapshotStore, raw: redis.Redis) -> None:
    for i in range(8):
        _write(store, b"v%d" % i, i)
    kept = [m.version for m in store.list_versions()]
    assert kept == [8, 7, 6, 5, 4]  # retention 5, newest first
    for v in (1, 2, 3):
        assert not raw.exists(store.snap_key(v), store.meta_key(v))
        with pytest.raises(SnapshotNotFound):
            store.read(v)
        with pytest.raises(SnapshotNotFound):
            store.rollback(v)
    assert store.read(4).blob == b"v3"


def test_corrupt_blob_is_detected(store: SnapshotStore, raw: redis.Redis) -> None:
    meta = _write(store, b"good bytes")
    raw.set(store.snap_key(meta.version), b"evil bytes")
    with pytest.raises(CorruptSnapshot, match="checksum"):
        store.read()
    raw.delete(store.snap_key(meta.version))
    with pytest.raises(CorruptSnapshot, match="blob missing"):
        store.read(meta.version)


# --------------------------------------------------------------------------
# lease
# --------------------------------------------------------------------------
def test_second_owner_cannot_take_the_lease(store: SnapshotStore) -> None:
    a = store.acquire_lease("daemon-a", ttl_s=30)
    assert a is not None and store.lease_owner() == "daemon-a"
    assert store.acquire_lease("daemon-b", ttl_s=30) is None
    assert store.renew(a)
    meta = _write(store, b"x", 1, lease=a)
    assert meta.writer == "daemon-a"
    assert store.release(a) and store.lease_owner() is None
    b = store.acquire_lease("daemon-b", ttl_s=30)
    assert b is not None
    # A's old lease is worthless now: its writes are refused, nothing changes.
    with pytest.raises(LeaseLost):
        _write(store, b"y", 2, lease=a)
    assert not store.renew(a) and not store.release(a)
    assert store.latest_version() == meta.version
    assert _write(store, b"z", 3, lease=b).version == meta.version + 1
    store.release(b)


def test_expired_lease_loses_the_write(store: SnapshotStore, raw: redis.Redis) -> None:
    lease = store.acquire_lease("daemon-a", ttl_s=0.05)
    assert lease is not None
    before = _write(store, b"before", 1, lease=lease)
    # Wait (without a timing assertion) until Redis has expired the key.
    while store.lease_owner() is not None:
        threading.Event().wait(0.02)
    with pytest.raises(LeaseLost):
        _write(store, b"after", 2, lease=lease)
    assert store.latest_version() == before.version
    assert store.list_versions() == [before]
    assert store.read().blob == b"before"
    assert not store.renew(lease)
    assert raw.keys(f"{store.base}:staging:*") == []  # the refused blob left nothing behind


# --------------------------------------------------------------------------
# rollback and events
# --------------------------------------------------------------------------
def test_rollback_repoints_latest_and_announces_it(store: SnapshotStore, redis_url: str) -> None:
    for i in range(3):
        _write(store, b"blob%d" % i, i)
    client = redis.Redis.from_url(redis_url)
    pubsub = client.pubsub()
    pubsub.subscribe(store.events_key)
    assert pubsub.get_message(timeout=5)["type"] == "subscribe"  # type: ignore[index]
    with capture_logs() as logs:
        meta = store.rollback(1)
    assert meta.version == 1 and store.latest_version() == 1
    assert store.read().blob == b"blob0"
    assert [m.version for m in store.list_versions()] == [3, 2, 1]  # nothing deleted
    assert [e for e in logs if e["event"] != "snapshot_written"] == [
        {
            "event": "snapshot_rolled_back",
            "log_level": "info",
            "model": store.model_name,
            "snapshot_version": 1,
            "previous_version": 3,
        }
    ]
    events = store.recent_events(10)
    assert [(e["kind"], e["version"]) for e in events] == [
        ("new", "1"),
        ("new", "2"),
        ("new", "3"),
        ("rollback", "1"),
    ]
    assert events[-1]["previous"] == "3"
    msg = pubsub.get_message(timeout=5)
    assert msg is not None and json.loads(msg["data"]) == {
        "kind": "rollback",
        "version": 1,
        "previous": "3",
    }
    # The next write supersedes the rollback and continues the numbering.
    assert _write(store, b"next", 9).version == 4
    msg = pubsub.get_message(timeout=5)
    assert msg is not None and json.loads(msg["data"])["kind"] == "new"
    pubsub.close()
    client.close()


def test_wait_for_version_wakes_on_a_write_from_another_thread(redis_url: str) -> None:
    # A socket timeout shorter than the wait: the blocking read must be chunked.
    name = f"test-{uuid.uuid4().hex[:10]}"
    waiter = SnapshotStore(redis_url, name, socket_timeout=1.0)
    writer = SnapshotStore(redis_url, name)
    try:
        assert waiter.wait_for_version(None, timeout_s=0.1) is None  # nothing yet
        first = _write(writer, b"1").version
        assert waiter.wait_for_version(None, timeout_s=0.1) == first  # already there
        assert waiter.wait_for_version(first, timeout_s=0.1) is None
        written: list[int] = []
        started = threading.Event()

        def later() -> None:
            started.wait()
            threading.Event().wait(1.5)  # longer than the socket timeout
            written.append(_write(writer, b"2").version)

        thread = threading.Thread(target=later)
        thread.start()
        started.set()
        got = waiter.wait_for_version(first, timeout_s=30)
        thread.join()
        assert got == written[0] == first + 1
        # A rollback is a change too.
        timer = threading.Timer(0.2, writer.rollback, args=(first,))
        timer.start()
        assert waiter.wait_for_version(first + 1, timeout_s=30) == first
        timer.join()
    finally:
        writer.purge()
        waiter.close()
        writer.close()


def test_list_models(redis_url: str) -> None:
    prefix = f"p{uuid.uuid4().hex[:8]}"
    stores = [SnapshotStore(redis_url, n, prefix=prefix) for n in ("beta", "alpha", "a.b-c_d")]
    try:
        assert stores[0].list_models() == []
        for s in stores:
            _write(s, b"x")
        assert stores[0].list_models() == ["a.b-c_d", "alpha", "beta"]
    finally:
        for s in stores:
            s.purge()
            s.close()


def test_bad_arguments_are_refused(redis_url: str) -> None:
    with pytest.raises(ValueError, match="model name"):
        SnapshotStore(redis_url, "a:b")
    with pytest.raises(ValueError, match="retention"):
        SnapshotStore(redis_url, "m", retention=0)
    with pytest.raises(ValueError, match="decode_responses"):
        SnapshotStore(redis.Redis.from_url(redis_url, decode_responses=True), "m")


def test_from_settings(redis_url: str) -> None:
    from fogline.daemon.config import Settings

    cfg = Settings.load(
        None, model_name="m-from-settings", redis={"url": redis_url, "prefix": "pp", "retention": 3}
    )
    with SnapshotStore.from_settings(cfg) as s:
        assert (s.model_name, s.prefix, s.retention) == ("m-from-settings", "pp", 3)
        assert s.keys_latest == "pp:m-from-settings:latest" and s.ping()


# --------------------------------------------------------------------------
# outage
# --------------------------------------------------------------------------
def test_store_unavailable_while_redis_is_down_and_recovers(redis_server: EmbeddedRedis) -> None:
    with SnapshotStore(redis_server.url, "outage", socket_timeout=2.0) as store:
        assert _write(store, b"before").version == 1
        redis_server.stop()
        assert not store.ping()
        for call in (
            lambda: _write(store, b"during"),
            store.latest_version,
            store.read,
            lambda: store.acquire_lease("a", 1.0),
            lambda: store.wait_for_version(None, 0.5),
        ):
            with pytest.raises(StoreUnavailable, match="redis unavailable"):
                call()
        redis_server.start()  # same port, empty data
        assert store.ping()
        assert store.latest_version() is None
        assert _write(store, b"after").version == 1
        assert store.read().blob == b"after"


def test_retry_backoff_is_redis_equal_jitter_grows_and_is_capped() -> None:
    for a in range(12):
        d = min(5.0, 0.1 * 2**a)
        waits = [retry_backoff(a, base_s=0.1, cap_s=5.0) for _ in range(50)]
        assert all(d / 2 <= w <= d for w in waits)
        assert len(set(waits)) > 1  # jittered: clients do not retry in lockstep
    assert 1.5 <= retry_backoff(10_000, cap_s=3.0) <= 3.0
    with pytest.raises(ValueError):
        retry_backoff(-1)


# --------------------------------------------------------------------------
# fogline snapshot ... (CLI)
# --------------------------------------------------------------------------
def _cli(store: SnapshotStore, redis_url: str, *argv: str) -> list[str]:
    return [*argv, "--redis-url", redis_url, "--model", store.model_name]


def _state_blob(seed: int) -> tuple[bytes, dict[str, object]]:
    from fogline.models.config import ModelConfig
    from fogline.models.serialize import to_bytes
    from fogline.models.svi import init_state

    state = init_state(ModelConfig.model_validate({"in_features": 3, "hidden": [8]}), seed=seed)
    return to_bytes(state), state.config.model_dump(mode="json")


def test_cli_list_show_diff_with_model_states(
    store: SnapshotStore, redis_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    from fogline.models.serialize import from_bytes

    (blob_a, cfg), (blob_b, _) = _state_blob(0), _state_blob(1)
    store.write(blob_a, records_absorbed=10, offsets={"t:0": 10, "t:1": 4}, model_config=cfg)
    store.write(blob_b, records_absorbed=25, offsets={"t:0": 20, "t:1": 4}, model_config=cfg)
    capsys.readouterr()  # drop log lines of the writes (structlog prints to stdout unconfigured)

    assert main(_cli(store, redis_url, "snapshot", "list", "--json")) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [(r["version"], r["latest"]) for r in rows] == [(2, True), (1, False)]
    assert rows[0]["model_config"] == cfg

    assert main(_cli(store, redis_url, "snapshot", "show", "1", "--json")) == 0
    shown = json.loads(capsys.readouterr().out)
    loc = from_bytes(blob_a).params["loc"]
    tensors = {t["name"]: t for t in shown["tensors"]}
    assert tensors["params.loc"]["shape"] == list(loc.shape)
    assert tensors["params.loc"]["norm"] == pytest.approx(float(loc.double().norm()))
    assert shown["version"] == 1 and shown["latest"] is False and "note" not in shown

    assert main(_cli(store, redis_url, "snapshot", "diff", "1", "2", "--json")) == 0
    diff = json.loads(capsys.readouterr().out)
    assert diff["records_absorbed_delta"] == 15
    assert diff["offsets_delta"] == {"t:0": 10}
    loc_b = from_bytes(blob_b).params["loc"]
    assert diff["param_l2_distance"]["params.loc"] == pytest.approx(
        float((loc_b.double() - loc.double()).norm())
    )
    assert set(diff["param_l2_distance"]) == {n for n in tensors if n.startswith("params.")}
    assert "checksum" in diff["changed"] and "model_config" not in diff["changed"]

    # Human-readable forms run too.
    assert main(_cli(store, redis_url, "snapshot", "list")) == 0
    assert main(_cli(store, redis_url, "snapshot", "show")) == 0
    assert main(_cli(store, redis_url, "snapshot", "diff", "1")) == 0
    out = capsys.readouterr().out
    assert "params.loc" in out and "records absorbed: +15" in out


def test_cli_show_opaque_blob_gives_meta_and_a_note(
    store: SnapshotStore, redis_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    _write(store, b"opaque", 3)
    capsys.readouterr()
    assert main(_cli(store, redis_url, "snapshot", "show", "--json")) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["records_absorbed"] == 3 and shown["tensors"] == []
    assert "not a loadable fogline state" in shown["note"]


def test_cli_rollback_and_errors(
    store: SnapshotStore, redis_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    for i in range(3):
        _write(store, b"b%d" % i, i)
    capsys.readouterr()
    assert main(_cli(store, redis_url, "snapshot", "rollback", "2")) == 0
    assert "latest v3 -> v2" in capsys.readouterr().out
    assert store.latest_version() == 2 and store.recent_events(1)[0]["kind"] == "rollback"

    assert main(_cli(store, redis_url, "snapshot", "rollback", "42")) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no snapshot version 42" in err
    assert main(_cli(store, redis_url, "snapshot", "show", "42")) == 1
    assert store.latest_version() == 2

    down = ["snapshot", "list", "--redis-url", "redis://127.0.0.1:1/0", "--model", "m"]
    assert main(down) == 1
    err = capsys.readouterr().err
    assert "redis unavailable" in err and "Traceback" not in err
