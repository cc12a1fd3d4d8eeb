"""The keyed daemon's in-place step (keys resident in the cache's table) writes what the state
path writes: one run with ``drift.policy = off`` stepping keys in their table rows, one with
the same settings forced through ``keyed_step`` over materialised states, byte for byte.
"""

from __future__ import annotations

from typing import Any

import pytest
from keyed_fakes import KeyedWorld
from test_keyed_pipeline import PARTS, keyed_settings, make_logs, run

from fogline.daemon.stream.keyed_update import KeyedUpdate


@pytest.mark.parametrize("max_keys", [100, 2])
def test_in_place_and_state_paths_write_the_same_blobs(
    monkeypatch: pytest.MonkeyPatch, max_keys: int
) -> None:
    logs, _ = make_logs(160, seed=7)
    world = KeyedWorld(logs, PARTS)
    code, pipe = run(world, keyed_settings(max_keys=max_keys))
    assert code == 0 and pipe.update.in_place and pipe.cache.tables
    in_place: dict[str, Any] = dict(world.store.blobs)
    assert in_place

    monkeypatch.setattr(KeyedUpdate, "in_place", property(lambda self: False))
    world = KeyedWorld(logs, PARTS)
    code, pipe = run(world, keyed_settings(max_keys=max_keys))
    assert code == 0 and not pipe.update.in_place
    assert dict(world.store.blobs) == in_place
