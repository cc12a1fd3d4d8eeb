"""Running ``fogline run`` as a child process in service tests (shared by the test modules)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from fogline.bench.crash_replay import start_daemon

RUN_TIMEOUT_S = 180


def run_daemon(config: Path, log: Path, *extra: str, timeout_s: float = RUN_TIMEOUT_S) -> int:
    """Start the daemon on ``config`` (log to ``log``) and wait for its exit status.

    A daemon still running after ``timeout_s`` is killed and the test fails with
    the tail of its log.
    """
    proc = start_daemon(config, log, *extra)
    try:
        return proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        pytest.fail(f"daemon did not exit; log tail:\n{log.read_text()[-3000:]}")
