"""PartitionStore on a real redis-server: atomic lease-guarded partition checkpoints."""

from __future__ import annotations

import pytest

from fogline.daemon.stream.store import LeaseLost, PartitionStore, SnapshotStore


@pytest.fixture
def store(redis_url: str, redis_prefix: str) -> PartitionStore:
    return PartitionStore(SnapshotStore(redis_url, "m", prefix=redis_prefix))


def test_commit_writes_blobs_manifest_and_index_together(store: PartitionStore) -> None:
    lease = store.acquire(3, "me", 5.0)
    assert lease is not None and store.acquire(3, "other", 5.0) is None
    v1 = store.commit(
        lease,
        3,
        offsets={"t:3": 10},
        records_absorbed=8,
        blobs={"a": b"A1", "b": b"B1"},
        entries={"a": {"records_absorbed": 5}, "b": {"records_absorbed": 3}},
    )
    v2 = store.commit(
        lease, 3, offsets={"t:3": 20}, records_absorbed=12, blobs={"a": b"A2"}, entries={}
    )
    assert (v1, v2) == (1, 2)
    m = store.manifest(3)
    assert m is not None and m.offsets == {"t:3": 20} and m.records_absorbed == 12
    assert store.read_keys(["a", "b", "zz"]) == {"a": b"A2", "b": b"B1"}
    index = store.key_index()
    assert index["a"]["version"] == 2 and index["b"]["version"] == 1
    assert index["b"]["partition"] == 3 and index["b"]["records_absorbed"] == 3
    assert store.manifest(4) is None


def test_a_lost_lease_writes_nothing(store: PartitionStore) -> None:
    lease = store.acquire(0, "me", 5.0)
    assert lease is not None
    store.commit(lease, 0, offsets={"t:0": 5}, records_absorbed=5, blobs={"a": b"A"}, entries={})
    assert store.release(lease)
    other = store.acquire(0, "other", 5.0)
    assert other is not None and store.lease_owner(0) == "other"
    with pytest.raises(LeaseLost):
        store.commit(
            lease, 0, offsets={"t:0": 9}, records_absorbed=9, blobs={"a": b"X"}, entries={}
        )
    m = store.manifest(0)
    assert m is not None and m.offsets == {"t:0": 5} and store.read_key("a") == b"A"
    assert not [k for k in store._client.scan_iter(match=f"{store.base}:staging:*")]


def test_a_commit_renews_the_lease_it_checked(store: PartitionStore) -> None:
    """The keyed pipeline counts a checkpoint as a renewal; the script makes it one.

    Without it, checkpoints in quick succession postponed the next renewal past
    the lease's real expiry (``partition_lease_lost`` with nobody else around).
    """
    lease = store.acquire(0, "me", 60.0)
    assert lease is not None
    store._client.pexpire(lease.key, 500)  # as if the last renewal were long ago
    store.commit(lease, 0, offsets={"t:0": 5}, records_absorbed=5, blobs={"a": b"A"}, entries={})
    assert store._client.pttl(lease.key) > 30_000
    assert store.renew(lease)


def test_layout_and_fleet_prior_are_written_once(store: PartitionStore) -> None:
    first = store.ensure_layout({"topic": "t", "partitions": "6", "key_field": "host"})
    again = store.ensure_layout({"topic": "t", "partitions": "8", "key_field": "host"})
    assert first == again == {"topic": "t", "partitions": "6", "key_field": "host"}
    assert store.fleet_blob(b"one") == b"one"
    assert store.fleet_blob(b"two") == b"one"


def test_a_lease_keeper_holds_a_lease_through_an_update_longer_than_its_ttl(
    store: PartitionStore,
) -> None:
    """Real Redis TTLs: a 0.5 s lease survives a 1.5 s update under the keeper, and lapses
    (another daemon takes it) without one."""
    import time

    from fogline.daemon.stream.lease_keeper import LeaseKeeper

    kept = store.acquire(1, "me", 0.5)
    assert kept is not None
    with LeaseKeeper(lambda: store.renew(kept), 0.5 / 3, 60.0) as keeper:
        time.sleep(1.5)
    keeper.close()
    assert keeper.renewals >= 3
    assert store.lease_owner(1) == "me" and store.acquire(1, "other", 5.0) is None
    assert store.renew(kept)

    lapsed = store.acquire(2, "me", 0.5)
    assert lapsed is not None
    time.sleep(1.5)
    assert store.acquire(2, "other", 5.0) is not None and not store.renew(lapsed)
