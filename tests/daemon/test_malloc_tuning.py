"""The daemon's allocator settings (``fogline.daemon.malloc_tuning``), in a child process:
``mallopt`` is process-wide and has no undo, and the test process keeps glibc's defaults."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from fogline.daemon.malloc_tuning import ENV, tune_malloc

CHILD = """
import json, resource
import torch
from fogline.daemon.malloc_tuning import tune_malloc
applied = tune_malloc()
torch.set_num_threads(1)
x = torch.ones(16, 1 << 20)  # 64 MiB: above glibc's largest dynamic mmap threshold (32 MiB)
def faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(3):  # warm: the heap grows to the working set once
    (x + 1.0).sum()
before = faults()
for _ in range(20):
    (x + 1.0).sum()  # a fresh 64 MiB result each time, freed again
print(json.dumps({"applied": applied, "faults": faults() - before}))
"""


def _child(env: dict[str, str]) -> dict[str, object]:
    out = subprocess.run(
        [sys.executable, "-c", CHILD],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
        env={**os.environ, **env},
    )
    return json.loads(out.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="mallopt is glibc's (Linux)")
def test_freed_tensors_are_reused_not_faulted_in_again() -> None:
    """With the tuning a repeated 64 MiB allocation reuses the heap: few page faults;
    with it off (glibc's defaults, the same code) every one is mapped afresh and
    faulted in, 16,384 pages of 4 KiB each time (page counts far apart, not a timing)."""
    tuned = _child({ENV: "on"})
    plain = _child({ENV: "off"})
    assert tuned["applied"] is True and plain["applied"] is False
    # measured: tuned 0 .. 32,768 (the heap settling in), plain ~327,700 (20 x 16,384)
    assert int(plain["faults"]) > 10 * 16_384  # type: ignore[call-overload]
    assert 4 * int(tuned["faults"]) < int(plain["faults"])  # type: ignore[call-overload]


def test_values_must_fit_a_c_int() -> None:
    with pytest.raises(ValueError, match="trim_threshold"):
        tune_malloc(trim_threshold=1 << 31)
    with pytest.raises(ValueError, match="mmap_threshold"):
        tune_malloc(mmap_threshold=0)
