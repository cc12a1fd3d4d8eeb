"""Helpers of the query-service tests (imported by name: tests are not a package)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch

from fogline.daemon.stream.store import SnapshotMeta, SnapshotStore
from fogline.models.serialize import to_bytes
from fogline.models.state import Minibatch, PosteriorState
from fogline.models.svi import step

MODEL = "m1"


def make_batch(n: int = 128, seed: int = 0) -> Minibatch:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 8, generator=g)
    y = torch.sin(3 * x[:, 0]) + (0.1 + 0.4 * x[:, 0].abs()) * torch.randn(n, generator=g)
    return Minibatch(x, y)


def advance(state: PosteriorState, steps: int = 5, seed: int = 0) -> PosteriorState:
    batch = make_batch(seed=seed)
    for _ in range(steps):
        state, _ = step(state, batch, jit=False)
    return state


def write(store: SnapshotStore, state: PosteriorState) -> SnapshotMeta:
    return store.write(
        to_bytes(state),
        records_absorbed=state.records_absorbed,
        offsets={"t:0": state.records_absorbed},
        model_config=state.config.model_dump(mode="json"),
        drift={"policy": "forget", "alarms": 1, "mode": "recovering"},
        lease=None,
    )


def wait_until(cond: Callable[[], Any], timeout_s: float = 15.0, what: str = "") -> Any:
    """Liveness wait (not a timing assertion): poll ``cond`` until truthy."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = cond()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what or cond}")
        time.sleep(0.02)
