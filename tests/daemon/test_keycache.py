"""The key cache: only clean keys leave memory, idle ones first, then LRU down to the cap."""

from __future__ import annotations

from fogline.daemon.stream.keycache import KeyCache
from fogline.models.config import ModelConfig
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
