"""structlog configuration: call :func:`configure` once per process.

JSON lines in production, a console renderer for a person at a terminal.
Event names are snake_case facts (``svi_step_done``, ``snapshot_written``).
"""

from __future__ import annotations

import logging
import sys
from typing import Literal

import structlog

LogFormat = Literal["json", "console", "auto"]


def _stderr_logger(*_args: object) -> structlog.PrintLogger:
    """A PrintLogger on the current ``sys.stderr``."""
    return structlog.PrintLogger(sys.stderr)


def configure(fmt: LogFormat = "auto", level: str = "INFO") -> None:
    """Configure structlog for this process.

    ``auto`` picks the console renderer when stderr is a terminal, else JSON.
    """
    if fmt == "auto":
        fmt = "console" if sys.stderr.isatty() else "json"
    renderer: structlog.types.Processor = (
        structlog.dev.ConsoleRenderer() if fmt == "console" else structlog.processors.JSONRenderer()
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level.upper())),
        # sys.stderr is looked up for every event, not bound once: a replaced
        # stream (test capture, a re-opened file) never leaves loggers writing
        # to a closed one.
        logger_factory=_stderr_logger,
        cache_logger_on_first_use=False,
    )
