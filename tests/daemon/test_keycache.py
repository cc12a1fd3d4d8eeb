"""The key cache: only clean keys leave memory, idle ones first, then LRU down to the cap."""

from __future__ import annotations

import pytest
import torch

from fogline.daemon.stream.keycache import KeyCache
from fogline.models.config import ModelConfig
from fogline.models.keyed import keyed_step, new_key_state
from fogline.models.serialize import to_bytes
from fogline.models.state import Minibatch
from fogline.models.svi import init_state

STATE = init_state(ModelConfig(in_features=2, hidden=(4,)), seed=0)


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_dirty_keys_never_leave_and_over_cap_asks_for_a_checkpoint() -> None:
    clock = Clock()
    cache = KeyCache(max_keys=2, idle_ttl_s=0, clock=clock)
    for k in "abc":
        cache.put(k, STATE, 0, dirty=True)
    assert cache.evict() == []
    assert cache.over_cap
    cache.clean(["a", "b"])  # a checkpoint of partition 0 wrote a and b
    assert cache.evict() == ["a"]  # least recently used clean key
    assert sorted(cache) == ["b", "c"] and not cache.over_cap


def test_idle_ttl_evicts_clean_keys_only_and_get_refreshes() -> None:
    clock = Clock()
    cache = KeyCache(max_keys=10, idle_ttl_s=5, clock=clock)
    cache.put("a", STATE, 0, dirty=False)
    cache.put("b", STATE, 1, dirty=True)
    cache.put("c", STATE, 1, dirty=False)
    clock.now = 4.0
    assert cache.get("c") is not None  # used again: not idle
    clock.now = 6.0
    assert cache.evict() == ["a"]  # b is idle but dirty, c was used at 4
    assert cache.dirty(1) == ["b"]
    assert cache.drop_partition(1) == ["b", "c"]
    assert len(cache) == 0 and cache.evictions == 1


def _batch(rows: int, seed: int) -> Minibatch:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, 2, generator=g)
    return Minibatch(x, x[:, 0] + 0.1 * torch.randn(rows, generator=g))


def test_keys_step_in_their_rows_and_a_freed_row_is_reused() -> None:
    """The in-place step equals keyed_step over the states; only clean keys leave, rows reused."""
    clock = Clock()
    cache = KeyCache(max_keys=2, idle_ttl_s=0, clock=clock, capacity=2)
    states = {k: new_key_state(STATE, k) for k in "ab"}
    for k, st in states.items():
        cache.put(k, st, 0, dirty=False)
    batches = {"a": _batch(3, 0), "b": _batch(5, 1)}
    infos = cache.step(["a", "b"], [batches["a"], batches["b"]])
    assert [infos[k].rows for k in "ab"] == [3, 5]
    assert cache.dirty(0) == []  # stepping alone does not dirty: the caller says so
    cache.mark_dirty(["a", "b"])
    want = keyed_step(states, batches)[0]
    for k in "ab":
        entry = cache.get(k)
        assert entry is not None and to_bytes(entry.state) == to_bytes(want[k])
    cache.put("c", new_key_state(STATE, "c"), 0, dirty=True)
    assert cache.evict() == [] and cache.over_cap  # a and b are dirty
    cache.clean(["a"])
    row_a = cache._keys["a"].row
    assert cache.evict() == ["a"]
    cache.put("d", new_key_state(STATE, "d"), 1, dirty=False)
    table = cache.tables[0]
    assert cache._keys["d"].row == row_a  # d took a's row: no growth
    assert len(table) == 3 and table.capacity == 4
    with pytest.raises(KeyError, match="not held"):
        cache.step(["a"], [batches["a"]])
    cache.discard("d")
    assert "d" not in cache and cache.evictions == 1 and len(table) == 2
