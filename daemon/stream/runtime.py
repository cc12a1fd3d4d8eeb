"""Process mechanics of the daemon: stop signals, device choice, retry pacing.

Nothing here knows about Kafka records or the model's mathematics; the
pipeline (:mod:`fogline.daemon.stream.pipeline`) composes these pieces.

- :class:`StopFlag` turns SIGTERM/SIGINT into a flag the loop checks between
  SVI steps, so the step in progress always finishes.
- :func:`select_device` maps ``stream.device`` (``auto|cpu|cuda``) to a torch device.
- :class:`Retry` paces retries of an unavailable service with redis-py's
  equal-jitter exponential backoff (:func:`fogline.daemon.stream.store.retry_backoff`).

The writer lease lives in :mod:`fogline.daemon.stream.lease`.
"""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Callable
from types import FrameType
from typing import Any

import structlog

from fogline.daemon.stream.store import StoreUnavailable, retry_backoff

log = structlog.get_logger(__name__)


class StopFlag:
    """Set by SIGTERM/SIGINT (or :meth:`set`); the loop checks it between steps.

    :meth:`install` only works on the main thread; elsewhere (tests that run
    the pipeline in a thread) the flag is set by hand.
    """

    def __init__(self) -> None:
        self._event = threading.Event()
        self.signal_name: str | None = None
        self._previous: dict[int, Any] = {}

    def install(self) -> StopFlag:
        """Handle SIGTERM and SIGINT by setting the flag (main thread only)."""
        if threading.current_thread() is not threading.main_thread():
            return self
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def restore(self) -> None:
        """Put the previous signal handlers back."""
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        if self._event.is_set():
            log.warning("stop_signal_repeated", signal=name)
        self.signal_name = name
        self._event.set()

    def set(self, reason: str = "requested") -> None:
        """Ask the loop to stop after the current step."""
        self.signal_name = reason
        self._event.set()

    def __bool__(self) -> bool:
        return self._event.is_set()

    def wait(self, timeout_s: float) -> bool:
        """Sleep up to ``timeout_s`` unless the flag is set; return the flag."""
        return self._event.wait(max(0.0, timeout_s))


def select_device(choice: str) -> Any:
    """``torch.device`` for ``stream.device``: ``auto`` is CUDA when available, else CPU.

    ``cuda`` without a usable GPU raises :class:`RuntimeError` naming the setting.
    """
    import torch

    if choice == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if choice == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("stream.device is 'cuda' but torch sees no CUDA device")
    return torch.device(choice)


class Retry:
    """Paces retries: ``due()`` says when to try again, ``failed()`` backs off, ``ok()`` resets.

    The ``n``-th consecutive failure waits ``retry_backoff(n)``: redis-py's
    ``EqualJitterBackoff`` (uniform in ``[d/2, d]``, ``d = min(cap_s, base_s * 2**n)``).
    """

    def __init__(self, *, base_s: float = 0.1, cap_s: float = 5.0) -> None:
        self.base_s = base_s
        self.cap_s = cap_s
        self.attempt = 0
        self.next_at = 0.0
        self.failing_since: float | None = None

    @property
    def failing(self) -> bool:
        """True between a failure and the next success."""
        return self.failing_since is not None

    def due(self, now: float | None = None) -> bool:
        """True when the next attempt may run."""
        return (time.monotonic() if now is None else now) >= self.next_at

    def failed(self) -> float:
        """Record a failure; return the wait before the next attempt."""
        now = time.monotonic()
        if self.failing_since is None:
            self.failing_since = now
        wait = retry_backoff(self.attempt, base_s=self.base_s, cap_s=self.cap_s)
        self.attempt += 1
        self.next_at = now + wait
        return wait

    def ok(self) -> None:
        """Record a success."""
        self.attempt = 0
        self.next_at = 0.0
        self.failing_since = None


def call_with_retry(
    fn: Callable[[], Any], stop: StopFlag, *, what: str, deadline_s: float | None = None
) -> Any:
    """Call ``fn`` until it stops raising :class:`StoreUnavailable` (backoff between tries).

    Gives up (re-raising) after ``deadline_s`` seconds, or when ``stop`` is set
    and ``deadline_s`` is ``None``.
    """
    retry = Retry()
    end = None if deadline_s is None else time.monotonic() + deadline_s
    while True:
        try:
            return fn()
        except StoreUnavailable as exc:
            wait = retry.failed()
            log.warning("redis_unavailable", op=what, error=str(exc), retry_in_s=round(wait, 3))
            if end is not None and time.monotonic() + wait > end:
                raise
            if end is None and stop:
                raise
            time.sleep(wait)
