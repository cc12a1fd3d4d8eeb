"""structlog configuration: call :func:`configure` once per process.

JSON lines in production, a console renderer for a person at a terminal.
Event names are snake_case facts (``svi_step_done``, ``snapshot_written``).

Two paths reach the same renderer:

1. fogline's own events: structlog's processor chain ending in the renderer,
   printed to the current ``sys.stderr``;
2. stdlib ``logging`` records of libraries (kafka-python, uvicorn, redis-py):
   a handler on the root logger whose formatter is
   :class:`structlog.stdlib.ProcessorFormatter` running the same processors
   (plus the logger's name) as its ``foreign_pre_chain``.

In JSON both chains render an exception as structlog's ``dict_tracebacks`` do
(a structured ``exception`` list with type, value and frames, not a text blob),
but without frame locals (:data:`DICT_TRACEBACKS`: a local may hold a token);
then :func:`mask_url_credentials_processor` masks the password of any URL, so
none reaches a log line.  (The console renderer draws exceptions itself, for a
person at a terminal.)
"""

from __future__ import annotations

import logging
import sys
from collections.abc import MutableMapping
from typing import Any, Literal, TextIO

import structlog

from fogline.daemon.names import mask_url_credentials

LogFormat = Literal["json", "console", "auto"]

#: ``structlog.processors.dict_tracebacks`` without frame locals (they may hold secrets).
DICT_TRACEBACKS = structlog.processors.ExceptionRenderer(
    structlog.tracebacks.ExceptionDictTransformer(show_locals=False)
)

#: Library loggers kept at WARNING or above unless fogline logs at DEBUG (chatty at INFO).
QUIET_LIBRARIES: tuple[str, ...] = ("kafka",)
#: Library loggers whose own handlers are removed so that they propagate to the root
#: handler (uvicorn's default logging config gives "uvicorn" its own, non-propagating one).
ROUTED_LIBRARIES: tuple[str, ...] = ("kafka", "redis", "uvicorn", "uvicorn.error", "uvicorn.access")


def _stderr_logger(*_args: object) -> structlog.PrintLogger:
    """A PrintLogger on the current ``sys.stderr``."""
    return structlog.PrintLogger(sys.stderr)


def _mask(value: Any) -> Any:
    if isinstance(value, str):
        return mask_url_credentials(value)
    if isinstance(value, dict):
        return {k: _mask(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(_mask(v) for v in value)
    return value


def mask_url_credentials_processor(
    _logger: Any, _method: str, event_dict: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    """structlog processor: mask the password of every URL in any event value.

    Strings anywhere in the event (nested dicts and lists too) pass through
    :func:`~fogline.daemon.names.mask_url_credentials`, so an error message
    carrying ``redis://:pw@host`` is logged as ``redis://:***@host``.  Keys
    starting with ``_`` (structlog's own ``_record``) are left alone.
    """
    for key, value in list(event_dict.items()):
        if not key.startswith("_"):
            event_dict[key] = _mask(value)
    return event_dict


class _CurrentStderrHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """A StreamHandler writing to whatever ``sys.stderr`` is at each record."""

    @property  # type: ignore[override]
    def stream(self) -> TextIO:
        return sys.stderr

    @stream.setter
    def stream(self, _value: TextIO) -> None:  # StreamHandler.__init__ assigns it
        pass


#: Marks the root handler :func:`configure` installs, so a second call replaces it.
_HANDLER_NAME = "fogline-structlog"
#: ``(format, level)`` of the last :func:`configure` (``None``: never configured).
_CURRENT: tuple[str, str] | None = None


def current() -> tuple[str, str] | None:
    """``(format, level)`` of this process's last :func:`configure` (for a child process)."""
    return _CURRENT


def configure(fmt: LogFormat = "auto", level: str = "INFO") -> None:
    """Configure structlog and the stdlib root logger for this process.

    ``auto`` picks the console renderer when stderr is a terminal, else JSON.
    The root logger gets one handler (replacing any earlier one of fogline's)
    rendering library records like fogline's events; the loggers in
    :data:`ROUTED_LIBRARIES` lose their own handlers and levels and propagate to it, and
    libraries in :data:`QUIET_LIBRARIES` log at WARNING or above unless
    ``level`` is DEBUG.
    """
    global _CURRENT
    if fmt == "auto":
        fmt = "console" if sys.stderr.isatty() else "json"
    _CURRENT = (fmt, level)
    numeric = logging.getLevelName(level.upper())
    renderer: structlog.types.Processor
    tail: list[structlog.types.Processor] = []
    if fmt == "console":
        renderer = structlog.dev.ConsoleRenderer()
    else:
        tail.append(DICT_TRACEBACKS)
        renderer = structlog.processors.JSONRenderer()
    tail.append(mask_url_credentials_processor)
    shared: list[structlog.types.Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    structlog.configure(
        processors=[*shared, *tail, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        # sys.stderr is looked up for every event, not bound once: a replaced
        # stream (test capture, a re-opened file) never leaves loggers writing
        # to a closed one.
        logger_factory=_stderr_logger,
        cache_logger_on_first_use=False,
    )
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[*shared, structlog.stdlib.add_logger_name, *tail],
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
    )
    handler = _CurrentStderrHandler()
    handler.set_name(_HANDLER_NAME)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    for old in [h for h in root.handlers if h.get_name() == _HANDLER_NAME]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(numeric)
    for name in ROUTED_LIBRARIES:
        lib = logging.getLogger(name)
        lib.handlers.clear()
        lib.propagate = True
        lib.setLevel(logging.NOTSET)  # the root's level, unless set below (or by uvicorn.run)
    for name in QUIET_LIBRARIES:
        logging.getLogger(name).setLevel(
            numeric if numeric <= logging.DEBUG else max(numeric, logging.WARNING)
        )
