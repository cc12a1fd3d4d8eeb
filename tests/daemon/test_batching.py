"""Micro-batching of array slices: nothing lost or duplicated; count mode is deterministic."""

from __future__ import annotations

import doctest
from typing import Any

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import fogline.daemon.stream.batching as batching_mod
from fogline.daemon.stream.batching import MicroBatcher, Rows, chunks


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def rows(ids: range | list[int], parts: int = 3) -> Rows:
    """Rows whose offset column is the row id (x and y carry it too, to check they travel)."""
    a = np.asarray(list(ids), dtype=np.int64)
    x = np.stack([a, -a], axis=1).astype(np.float32) if len(a) else np.zeros((0, 2), np.float32)
    return Rows.of("t", x, a.astype(np.float32), a % parts, a)


def ids(batch: Rows | None) -> list[int]:
    assert batch is not None
    assert np.array_equal(batch.x[:, 0], batch.offset) and np.array_equal(batch.y, batch.offset)
    return [int(i) for i in batch.offset]


def test_full_batches_are_emitted_at_once() -> None:
    b = MicroBatcher(4)
    assert b.add(rows(range(3))) == []
    assert b.pending == 3
    assert [ids(r) for r in b.add(rows(range(3, 10)))] == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert b.poll_due() is None  # count mode: never due by time
    assert ids(b.flush()) == [8, 9]
    assert b.flush() is None
    assert (b.emitted_batches, b.emitted_items) == (3, 10)


def test_a_batch_inside_one_chunk_is_a_view_not_a_copy() -> None:
    chunk = rows(range(10))
    b = MicroBatcher(4)
    first, second = b.add(chunk)
    assert np.shares_memory(first.x, chunk.x) and np.shares_memory(second.offset, chunk.offset)
    assert first.x.flags.c_contiguous  # torch.from_numpy takes it as is


def test_partial_batch_is_due_after_max_wait() -> None:
    # clock steps are binary fractions, so the arithmetic is exact
    clock = FakeClock()
    b = MicroBatcher(100, max_wait_ms=500, clock=clock)
    assert b.timeout_ms(idle_ms=2000) == 2000  # empty: block as long as you like
    b.add(rows([0]))
    clock.now += 0.25
    b.add(rows([1]))
    assert not b.due() and b.poll_due() is None
    assert b.timeout_ms(idle_ms=2000) == 250
    clock.now += 0.25
    assert b.due()
    assert ids(b.poll_due()) == [0, 1]
    assert b.age_ms() == 0.0 and not b.due()
    # the wait restarts with the next row, not the last batch
    b.add(rows([2]))
    clock.now += 0.375
    assert b.poll_due() is None
    clock.now += 0.125
    assert ids(b.poll_due()) == [2]


def test_size_wins_when_it_comes_first() -> None:
    clock = FakeClock()
    b = MicroBatcher(2, max_wait_ms=1000, clock=clock)
    assert [ids(r) for r in b.add(rows([1, 2, 3]))] == [[1, 2]]
    assert b.poll_due() is None
    clock.now += 1.0
    assert ids(b.poll_due()) == [3]


def test_discard_drops_only_rejected_rows_and_keeps_order() -> None:
    b = MicroBatcher(10)
    b.add(rows([0, 1, 2]))
    b.add(rows([3, 4]))
    dropped = b.discard(lambda r: r.partition != 1)
    assert [i for r in dropped for i in ids(r)] == [1, 4]
    assert b.pending == 3
    assert ids(b.flush()) == [0, 2, 3]
    b.add(rows([5]))
    assert [ids(r) for r in b.discard()] == [[5]] and b.pending == 0


def test_first_offsets_and_keys() -> None:
    r = rows([9, 4, 7, 3], parts=3)  # partitions 0, 1, 1, 0
    assert r.first_offsets() == {("t", 0): 9, ("t", 1): 4}
    assert r.keys() == {("t", 0), ("t", 1)} and r.last_offset() == 3


def test_bad_settings_and_shapes_are_refused() -> None:
    with pytest.raises(ValueError):
        MicroBatcher(0)
    with pytest.raises(ValueError):
        MicroBatcher(1, max_wait_ms=-1)
    with pytest.raises(ValueError):
        list(chunks([1], 0))
    with pytest.raises(ValueError):
        Rows.of("t", np.zeros((3, 2)), np.zeros(2), np.zeros(3), np.zeros(3))
    a, b = rows([1]), Rows.of("u", np.zeros((1, 2)), [0.0], [0], [0])
    with pytest.raises(ValueError, match="topics"):
        Rows.concat([a, b])


def test_module_doctests() -> None:
    result = doctest.testmod(batching_mod)
    assert result.attempted > 0 and result.failed == 0


# one operation: add a chunk of n new rows, advance the clock, poll, or flush
ops = st.lists(
    st.one_of(
        st.tuples(st.just("add"), st.integers(0, 40)),
        st.tuples(st.just("tick"), st.floats(0, 0.2)),
        st.tuples(st.just("poll"), st.just(0)),
        st.tuples(st.just("flush"), st.just(0)),
    ),
    max_size=60,
)


def _run(
    size: int, wait: float | None, script: list[tuple[str, Any]]
) -> tuple[list[list[int]], list[int], int]:
    clock = FakeClock()
    b = MicroBatcher(size, max_wait_ms=wait, clock=clock)
    out: list[list[int]] = []
    n = 0
    for op, arg in script:
        if op == "add":
            out += [ids(r) for r in b.add(rows(range(n, n + arg)))]
            n += arg
        elif op == "tick":
            clock.now += arg
        elif op == "poll":
            got = b.poll_due()
            if got is not None:
                out.append(ids(got))
        else:
            got = b.flush()
            if got is not None:
                out.append(ids(got))
    assert b.pending == sum(len(r) for r in b.buffered())
    return out, [i for r in b.discard() for i in ids(r)], n


@given(st.integers(1, 17), st.none() | st.floats(0, 100), ops)
def test_never_loses_or_duplicates(
    size: int, wait: float | None, script: list[tuple[str, Any]]
) -> None:
    out, rest, n = _run(size, wait, script)
    assert [i for batch in out for i in batch] + rest == list(range(n))
    assert all(1 <= len(batch) <= size for batch in out)


@given(st.integers(1, 17), ops)
def test_count_mode_boundaries_depend_only_on_the_sequence(
    size: int, script: list[tuple[str, Any]]
) -> None:
    # without flushes, however rows are chunked and time passes, batch k is rows [k*size, (k+1)*size)
    script = [s for s in script if s[0] != "flush"]
    out, rest, n = _run(size, None, script)
    assert out == [list(c) for c in chunks(range(n), size)][: n // size]
    assert rest == list(range(n - n % size, n))


@given(st.integers(1, 9), st.lists(st.integers(0, 20), max_size=12), st.sets(st.integers(0, 2)))
def test_discard_by_partition_never_loses_a_kept_row(
    size: int, adds: list[int], revoked: set[int]
) -> None:
    b = MicroBatcher(size)
    n, emitted = 0, []
    for k in adds:
        emitted += [i for r in b.add(rows(range(n, n + k))) for i in ids(r)]
        n += k
    buffered = [i for r in b.buffered() for i in ids(r)]
    dropped = [i for r in b.discard(lambda r: ~np.isin(r.partition, list(revoked))) for i in ids(r)]
    kept = [i for r in b.buffered() for i in ids(r)]
    assert sorted(dropped + kept) == buffered and kept == [
        i for i in buffered if i % 3 not in revoked
    ]
    assert all(i % 3 in revoked for i in dropped)
