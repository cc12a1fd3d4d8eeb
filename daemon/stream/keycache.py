"""The key cache of keyed mode: key states in memory, bounded by a cap and an idle TTL (pure).

Rule that keeps "nothing lost" and exactly-once: a key's state may leave
memory only when it is *clean* -- unchanged since its partition's last
checkpoint, whose snapshot holds it -- so evicting and reloading it (on its
next record) gives back the same bytes.  Dirty keys stay until a checkpoint
of their partition marks them clean (:meth:`KeyCache.clean`).

:meth:`KeyCache.evict` removes first every clean key idle for longer than
``idle_ttl_s`` (0: never), then, while more than ``max_keys`` are held, the
least recently used clean keys.  When dirty keys alone exceed the cap,
:attr:`KeyCache.over_cap` tells the daemon to checkpoint (which cleans them)
and evict again.  The clock is injectable (``clock() -> seconds``).
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from fogline.models.state import PosteriorState


@dataclass
class CachedKey:
    """One key in memory: its state, its partition, dirty flag and last use."""

    state: PosteriorState
    partition: int
    dirty: bool
    used_at: float


class KeyCache:
    """Key states by key, least recently used first.

    >>> from fogline.models.config import ModelConfig
    >>> from fogline.models.svi import init_state
    >>> s = init_state(ModelConfig(in_features=1), seed=0)
    >>> c = KeyCache(max_keys=1, idle_ttl_s=0, clock=lambda: 0.0)
    >>> c.put("a", s, 0, dirty=True); c.put("b", s, 0, dirty=False)
    >>> c.evict(), c.over_cap
    (['b'], False)
    """

    def __init__(
        self, max_keys: int, idle_ttl_s: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        if max_keys < 1:
            raise ValueError("max_keys must be >= 1")
        self.max_keys = max_keys
        self.idle_ttl_s = idle_ttl_s
        self._clock = clock
        self._keys: OrderedDict[str, CachedKey] = OrderedDict()
        #: Keys evicted so far (a counter for metrics and the benchmark).
        self.evictions = 0

    def __len__(self) -> int:
        return len(self._keys)

    def __contains__(self, key: object) -> bool:
        return key in self._keys

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys)

    def get(self, key: str) -> CachedKey | None:
        """The cached entry (marked used now), or ``None``."""
        entry = self._keys.get(key)
        if entry is not None:
            entry.used_at = self._clock()
            self._keys.move_to_end(key)
        return entry

    def put(self, key: str, state: PosteriorState, partition: int, *, dirty: bool) -> None:
        """Hold ``state`` for ``key`` (used now); ``dirty``: not in a checkpoint yet."""
        self._keys[key] = CachedKey(state, partition, dirty, self._clock())
        self._keys.move_to_end(key)

    def dirty(self, partition: int) -> list[str]:
        """Dirty keys of ``partition``, sorted."""
        return sorted(k for k, e in self._keys.items() if e.dirty and e.partition == partition)

    def clean(self, keys: list[str]) -> None:
        """Mark ``keys`` clean (their partition's checkpoint now holds them)."""
        for k in keys:
            entry = self._keys.get(k)
            if entry is not None:
                entry.dirty = False

    def drop_partition(self, partition: int) -> list[str]:
        """Forget every key of ``partition`` (revoked or lost), dirty ones included."""
        gone = [k for k, e in self._keys.items() if e.partition == partition]
        for k in gone:
            del self._keys[k]
        return gone

    @property
    def over_cap(self) -> bool:
        """More keys held than ``max_keys`` (only possible while the extra ones are dirty)."""
        return len(self._keys) > self.max_keys

    def evict(self) -> list[str]:
        """Remove idle clean keys, then LRU clean keys down to the cap; return them."""
        now = self._clock()
        out: list[str] = []
        if self.idle_ttl_s > 0:
            for k, e in list(self._keys.items()):
                if now - e.used_at <= self.idle_ttl_s:
                    break  # LRU order: the rest were used more recently
                if not e.dirty:
                    del self._keys[k]
                    out.append(k)
        if len(self._keys) > self.max_keys:
            for k, e in list(self._keys.items()):
                if len(self._keys) <= self.max_keys:
                    break
                if not e.dirty:
                    del self._keys[k]
                    out.append(k)
        self.evictions += len(out)
        return out
