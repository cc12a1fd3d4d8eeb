"""Micro-batching: nothing lost or duplicated; count mode is deterministic."""

from __future__ import annotations

import doctest
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

import fogline.daemon.stream.batching as batching_mod
from fogline.daemon.stream.batching import MicroBatcher, chunks


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_full_batches_are_emitted_at_once() -> None:
    b = MicroBatcher[int](4)
    assert b.add(range(3)) == []
    assert b.pending == 3
    assert b.add(range(3, 10)) == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert b.poll_due() is None  # count mode: never due by time
    assert b.flush() == [8, 9]
    assert b.flush() is None
    assert (b.emitted_batches, b.emitted_items) == (3, 10)


def test_partial_batch_is_due_after_max_wait() -> None:
    # clock steps are binary fractions, so the arithmetic is exact
    clock = FakeClock()
    b = MicroBatcher[str](100, max_wait_ms=500, clock=clock)
    assert b.timeout_ms(idle_ms=2000) == 2000  # empty: block as long as you like
    b.add(["a"])
    clock.now += 0.25
    b.add(["b"])
    assert not b.due() and b.poll_due() is None
    assert b.timeout_ms(idle_ms=2000) == 250
    clock.now += 0.25
    assert b.due()
    assert b.poll_due() == ["a", "b"]
    assert b.age_ms() == 0.0 and not b.due()
    # the wait restarts with the next item, not the last batch
    b.add(["c"])
    clock.now += 0.375
    assert b.poll_due() is None
    clock.now += 0.125
    assert b.poll_due() == ["c"]


def test_size_wins_when_it_comes_first() -> None:
    clock = FakeClock()
    b = MicroBatcher[int](2, max_wait_ms=1000, clock=clock)
    assert b.add([1, 2, 3]) == [[1, 2]]
    assert b.poll_due() is None
    clock.now += 1.0
    assert b.poll_due() == [3]


def test_discard_drops_only_rejected_items() -> None:
    b = MicroBatcher[tuple[str, int]](10)
    b.add([("p0", 1), ("p1", 2), ("p0", 3)])
    assert b.discard(lambda it: it[0] != "p1") == [("p1", 2)]
    assert b.flush() == [("p0", 1), ("p0", 3)]
    b.add([("p0", 4)])
    assert b.discard() == [("p0", 4)] and b.pending == 0


def test_bad_settings_are_refused() -> None:
    with pytest.raises(ValueError):
        MicroBatcher[int](0)
    with pytest.raises(ValueError):
        MicroBatcher[int](1, max_wait_ms=-1)
    with pytest.raises(ValueError):
        list(chunks([1], 0))


def test_module_doctests() -> None:
    result = doctest.testmod(batching_mod)
    assert result.attempted > 0 and result.failed == 0


# one operation: add a chunk of n new items, advance the clock, poll, or flush
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
    b = MicroBatcher[int](size, max_wait_ms=wait, clock=clock)
    out: list[list[int]] = []
    n = 0
    for op, arg in script:
        if op == "add":
            out += b.add(range(n, n + arg))
            n += arg
        elif op == "tick":
            clock.now += arg
        elif op == "poll":
            got = b.poll_due()
            if got is not None:
                out.append(got)
        else:
            got = b.flush()
            if got is not None:
                out.append(got)
    return out, b.discard(), n


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
    # without flushes, however items are chunked and time passes, batch k is items [k*size, (k+1)*size)
    script = [s for s in script if s[0] != "flush"]
    out, rest, n = _run(size, None, script)
    assert out == [list(c) for c in chunks(range(n), size)][: n // size]
    assert rest == list(range(n - n % size, n))
