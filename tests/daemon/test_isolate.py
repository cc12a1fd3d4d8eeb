"""Isolating the rows that make a step non-finite: with fake oracles and with the real step."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from fogline.daemon.stream.isolate import STEP_REJECTED, isolate, rejected_record
from fogline.models.config import ModelConfig
from fogline.models.serialize import to_bytes
from fogline.models.state import Minibatch
from fogline.models.stream import stream_step
from fogline.models.svi import init_state


@given(st.integers(1, 300).flatmap(lambda n: st.tuples(st.just(n), st.sets(st.integers(0, n - 1)))))
def test_per_row_poison_is_found_exactly(case: tuple[int, set[int]]) -> None:
    n, bad = case
    calls: list[list[int]] = []

    def rejected(rows: Sequence[int]) -> bool:
        calls.append(list(rows))
        return any(r in bad for r in rows)

    iso = isolate(n, rejected, known_rejected=False)
    assert iso.bad == tuple(sorted(bad))
    assert set(iso.good) | set(iso.bad) == set(range(n))
    assert not set(iso.good) & set(iso.bad)
    assert iso.probes == len(calls)
    assert all(list(c) == sorted(c) for c in calls), "rows keep batch order"
    if bad:  # about 2 b log2(n) probes, far fewer than one per row
        assert iso.probes <= 2 * len(bad) * (int(np.log2(n)) + 2) + 1


def test_rows_poisonous_only_together_are_set_aside_and_the_rest_learnt() -> None:
    # the step fails only when rows 3 and 12 are in it together
    def rejected(rows: Sequence[int]) -> bool:
        return 3 in rows and 12 in rows

    iso = isolate(16, rejected)
    assert not rejected(iso.good)
    assert 3 in iso.bad or 12 in iso.bad
    assert len(iso.bad) <= 8, "only the smallest group that fails alone is set aside"


def test_a_batch_the_step_accepts_is_kept_whole() -> None:
    iso = isolate(10, lambda rows: False, known_rejected=False)
    assert iso.good == tuple(range(10)) and iso.bad == () and iso.probes == 1


def test_everything_poisoned() -> None:
    iso = isolate(5, lambda rows: True)
    assert iso.good == () and iso.bad == (0, 1, 2, 3, 4)


def test_rejected_record_names_its_source() -> None:
    raw, reason = rejected_record("tele", 2, 41, np.array([1.5, -3e38], np.float32), 2.0)
    assert reason == STEP_REJECTED
    assert (raw.topic, raw.partition, raw.offset) == ("tele", 2, 41)
    assert raw.value is not None and b"-3" in raw.value and b'"y": 2.0' in raw.value


@pytest.mark.parametrize("num_steps", [1, 3])
def test_real_step_huge_rows_isolated_and_rest_learnt_deterministically(num_steps: int) -> None:
    state = init_state(ModelConfig.model_validate({}), seed=0, lr=1e-2)
    rng = np.random.default_rng(0)
    x = torch.from_numpy(rng.standard_normal((64, 8)).astype(np.float32))
    y = torch.from_numpy(rng.standard_normal(64).astype(np.float32))
    poison = [5, 6, 40]
    x[5, 0] = 3e38
    y[6] = -3e38
    x[40, 7] = -3e38

    def step_rows(rows: Sequence[int]) -> tuple[object, bool]:
        idx = torch.as_tensor(list(rows), dtype=torch.long)
        new, info = stream_step(state, Minibatch(x[idx], y[idx]), num_steps=num_steps)
        return new, info.rejected

    assert step_rows(range(64))[1], "the ±3e38 rows make the whole step non-finite"
    iso = isolate(64, lambda rows: step_rows(rows)[1])
    assert iso.bad == tuple(poison)
    learnt, rejected = step_rows(iso.good)
    assert not rejected
    assert learnt.records_absorbed == 61  # type: ignore[attr-defined]
    again = isolate(64, lambda rows: step_rows(rows)[1])
    assert again == iso
    assert to_bytes(step_rows(again.good)[0]) == to_bytes(learnt)  # type: ignore[arg-type]
    assert to_bytes(state) == to_bytes(init_state(state.config, seed=0, lr=1e-2)), "untouched"
