"""The daemon's collector settings (``fogline.daemon.gc_tuning``), in a child process:
they are process-wide, and the test process keeps CPython's defaults."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from fogline.daemon.gc_tuning import tune_for_streaming

CHILD = """
import gc, json
from fogline.daemon.gc_tuning import tune_for_streaming
before = gc.get_freeze_count()
old = tune_for_streaming(1234)
cycle = []
cycle.append(cycle)  # a reference cycle made after start-up is still collected
del cycle
print(json.dumps({"old": old, "now": gc.get_threshold(), "frozen_before": before,
                  "frozen": gc.get_freeze_count(), "collected": gc.collect()}))
"""


def test_freezes_the_start_up_heap_and_raises_the_thresholds() -> None:
    out = subprocess.run(
        [sys.executable, "-c", CHILD], capture_output=True, text=True, check=True, timeout=120
    )
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["old"] == list(__import__("gc").get_threshold())  # the child started at defaults
    assert got["now"] == [1234, 20, 20]
    assert got["frozen_before"] == 0 and got["frozen"] > 1000  # modules, classes, functions
    assert got["collected"] >= 1


def test_threshold_must_be_positive() -> None:
    with pytest.raises(ValueError, match="threshold0"):
        tune_for_streaming(0)


CHILD_BLOCK = """
import gc, json
from fogline.daemon.gc_tuning import streaming_gc
before = gc.get_threshold()
with streaming_gc(4321):
    inside = gc.get_threshold()
    frozen_inside = gc.get_freeze_count()
print(json.dumps({"before": before, "inside": inside, "after": gc.get_threshold(),
                  "frozen_inside": frozen_inside, "frozen_after": gc.get_freeze_count()}))
"""


def test_streaming_gc_holds_for_its_block_only() -> None:
    """A benchmark's baseline loop runs under the daemon's settings, then the old ones."""
    out = subprocess.run(
        [sys.executable, "-c", CHILD_BLOCK], capture_output=True, text=True, check=True, timeout=120
    )
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["inside"] == [4321, 20, 20]
    assert got["after"] == got["before"]
    assert got["frozen_inside"] > 1000 and got["frozen_after"] == 0
