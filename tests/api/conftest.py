"""Fixtures of the query-service tests: trained states written to a real Redis."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
from api_helpers import MODEL, advance

from fogline.daemon.config import Settings
from fogline.daemon.stream.store import SnapshotStore
from fogline.models.config import ModelConfig
from fogline.models.state import PosteriorState
from fogline.models.svi import init_state


@pytest.fixture(scope="session")
def base_state() -> PosteriorState:
    return advance(init_state(ModelConfig(), seed=0), steps=10)


@pytest.fixture
def store(redis_url: str, redis_prefix: str) -> Iterator[SnapshotStore]:
    with SnapshotStore(redis_url, MODEL, prefix=redis_prefix) as s:
        yield s


@pytest.fixture
def make_settings(redis_url: str, redis_prefix: str) -> Callable[..., Settings]:
    def make(**api: Any) -> Settings:
        return Settings.load(
            None,
            model_name=MODEL,
            redis={"url": redis_url, "prefix": redis_prefix},
            api={"reload_poll_s": 0.1, **api},
        )

    return make
