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

Storage: each resident key is a row of a
:class:`~fogline.models.keyed_table.KeyTable` (one table per model; the
daemon has one), the cache maps key -> (table, row).  :meth:`KeyCache.step`
steps keys in place in their rows; a key's
:class:`~fogline.models.state.PosteriorState` is materialised only when
something reads :attr:`CachedKey.state` (a checkpoint, a query, the drift
loop) and a row is released for reuse when its key leaves memory.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

from fogline.models.keyed_table import KeyTable
from fogline.models.state import Minibatch, PosteriorState, StepInfo


@dataclass
class CachedKey:
    """One key in memory: its row of a key table, its partition, dirty flag and last use."""

    table: KeyTable
    row: int
    partition: int
    dirty: bool
    used_at: float

    @property
    def state(self) -> PosteriorState:
        """The key's state (materialised from its row on first read after a step)."""
        return self.table.state(self.row)


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
        self,
        max_keys: int,
        idle_ttl_s: float,
        clock: Callable[[], float] = time.monotonic,
        *,
        capacity: int = 64,
    ) -> None:
        if max_keys < 1:
            raise ValueError("max_keys must be >= 1")
        self.max_keys = max_keys
        self.idle_ttl_s = idle_ttl_s
        self._clock = clock
        self._capacity = capacity
        self._keys: OrderedDict[str, CachedKey] = OrderedDict()
        self.tables: list[KeyTable] = []
        #: Keys evicted so far (a counter for metrics and the benchmark).
        self.evictions = 0

    def __len__(self) -> int:
        return len(self._keys)

    def __contains__(self, key: object) -> bool:
        return key in self._keys

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys)

    def _table(self, state: PosteriorState) -> KeyTable:
        for t in self.tables:
            if t.accepts(state):
                return t
        table = KeyTable(state.config, state.device, capacity=self._capacity)
        self.tables.append(table)
        return table

    def get(self, key: str) -> CachedKey | None:
        """The cached entry (marked used now), or ``None``."""
        entry = self._keys.get(key)
        if entry is not None:
            entry.used_at = self._clock()
            self._keys.move_to_end(key)
        return entry

    def put(self, key: str, state: PosteriorState, partition: int, *, dirty: bool) -> None:
        """Hold ``state`` for ``key`` (used now); ``dirty``: not in a checkpoint yet."""
        entry = self._keys.get(key)
        now = self._clock()
        if entry is not None and entry.table.accepts(state):
            entry.table.write(entry.row, state)
            entry.partition, entry.dirty, entry.used_at = partition, dirty, now
        else:
            if entry is not None:
                entry.table.release(entry.row)
            table = self._table(state)
            self._keys[key] = CachedKey(table, table.add(state), partition, dirty, now)
        self._keys.move_to_end(key)

    def _remove(self, key: str) -> None:
        entry = self._keys.pop(key)
        entry.table.release(entry.row)

    def discard(self, key: str) -> None:
        """Forget ``key`` (if held) without counting an eviction."""
        if key in self._keys:
            self._remove(key)

    def step(
        self,
        keys: Sequence[str],
        batches: Sequence[Minibatch],
        *,
        num_steps: int = 1,
        data_size: int | None = None,
        functional_prior: bool = True,
    ) -> dict[str, StepInfo]:
        """Step the held ``keys`` on ``batches`` (aligned) in their rows; their infos by key.

        :meth:`KeyTable.step` per table (one, unless keys of several models are
        held).  Neither the dirty flags nor the LRU order change (:meth:`mark_dirty`).
        """
        missing = [k for k in keys if k not in self._keys]
        if missing:
            raise KeyError(f"key cache: not held: {missing[:5]}")
        if len(self.tables) == 1:  # the daemon's case: one model, one table
            table = self.tables[0]
            res = table.step(
                [self._keys[k].row for k in keys],
                batches,
                num_steps=num_steps,
                data_size=data_size,
                functional_prior=functional_prior,
            )
            return dict(zip(keys, res.infos, strict=True))
        by_table: dict[int, tuple[KeyTable, list[int], list[str], list[Minibatch]]] = {}
        for k, mb in zip(keys, batches, strict=True):
            entry = self._keys[k]
            got = by_table.get(id(entry.table))
            if got is None:
                got = by_table[id(entry.table)] = (entry.table, [], [], [])
            got[1].append(entry.row)
            got[2].append(k)
            got[3].append(mb)
        infos: dict[str, StepInfo] = {}
        for table, rows, names, mbs in by_table.values():
            res = table.step(
                rows,
                mbs,
                num_steps=num_steps,
                data_size=data_size,
                functional_prior=functional_prior,
            )
            infos.update(zip(names, res.infos, strict=True))
        return {k: infos[k] for k in keys}

    def mark_dirty(self, keys: Sequence[str]) -> None:
        """``keys`` changed in memory (stepped in place): dirty, used now, most recent last."""
        now = self._clock()
        for k in keys:
            entry = self._keys[k]
            entry.dirty = True
            entry.used_at = now
            self._keys.move_to_end(k)

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
            self._remove(k)
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
                    self._remove(k)
                    out.append(k)
        if len(self._keys) > self.max_keys:
            for k, e in list(self._keys.items()):
                if len(self._keys) <= self.max_keys:
                    break
                if not e.dirty:
                    self._remove(k)
                    out.append(k)
        self.evictions += len(out)
        return out
