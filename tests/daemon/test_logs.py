"""daemon.logs: library records join fogline's renderer; JSON tracebacks are structured;
URL passwords never reach a log line."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator

import pytest
import structlog

from fogline.daemon import logs


@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    """Undo :func:`logs.configure` on the root logger and structlog after each test."""
    saved = {
        name: (list(lg.handlers), lg.level, lg.propagate)
        for name in ("", *logs.ROUTED_LIBRARIES)
        for lg in [logging.getLogger(name or None)]
    }
    yield
    for name, (handlers, level, propagate) in saved.items():
        lg = logging.getLogger(name or None)
        lg.handlers[:] = handlers
        lg.setLevel(level)
        lg.propagate = propagate
    structlog.reset_defaults()


def test_library_loggers_configured_elsewhere_are_routed_to_the_root(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """uvicorn's default logging config (own handler, no propagation) does not bypass ours."""
    import logging.config

    from uvicorn.config import LOGGING_CONFIG

    logging.config.dictConfig(LOGGING_CONFIG)
    logs.configure("json", "INFO")
    logging.getLogger("uvicorn.error").info("Started server process [%d]", 42)
    (line,) = _json_lines(capsys.readouterr().err)
    assert line["logger"] == "uvicorn.error" and line["event"] == "Started server process [42]"


def _json_lines(text: str) -> list[dict[str, object]]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def test_a_kafka_record_comes_out_as_a_json_line(capsys: pytest.CaptureFixture[str]) -> None:
    logs.configure("json", "INFO")
    logging.getLogger("kafka.conn").warning("broker %s unreachable", "127.0.0.1:9")
    logging.getLogger("kafka.conn").info("chatty at INFO: kept quiet")
    logging.getLogger("uvicorn.error").info("Uvicorn running on %s", "http://127.0.0.1:8000")
    structlog.get_logger().info("svi_step_done", rows=3)
    lines = _json_lines(capsys.readouterr().err)
    assert [(d.get("logger"), d["event"], d["level"]) for d in lines] == [
        ("kafka.conn", "broker 127.0.0.1:9 unreachable", "warning"),
        ("uvicorn.error", "Uvicorn running on http://127.0.0.1:8000", "info"),
        (None, "svi_step_done", "info"),
    ]
    assert all(str(d["timestamp"]).endswith("Z") for d in lines)


def test_configure_twice_keeps_one_root_handler(capsys: pytest.CaptureFixture[str]) -> None:
    logs.configure("json", "INFO")
    logs.configure("json", "INFO")
    logging.getLogger("redis").warning("once")
    assert len(_json_lines(capsys.readouterr().err)) == 1


def test_exception_in_json_mode_has_a_structured_traceback(
    capsys: pytest.CaptureFixture[str],
) -> None:
    logs.configure("json", "INFO")
    token = "tok-in-a-local"  # frame locals are not logged
    try:
        raise ValueError(f"cannot reach redis://:hunter2@cache:6379/0 ({len(token)})")
    except ValueError:
        structlog.get_logger().exception("snapshot_failed")
        logging.getLogger("uvicorn.error").exception("Exception in ASGI application")
    out = capsys.readouterr().err
    own, lib = _json_lines(out)
    for doc in (own, lib):
        (exc,) = doc["exception"]  # type: ignore[misc]
        assert exc["exc_type"] == "ValueError"
        assert exc["exc_value"] == "cannot reach redis://:***@cache:6379/0 (14)"
        frame = exc["frames"][-1]
        assert frame["name"] == "test_exception_in_json_mode_has_a_structured_traceback"
        assert "locals" not in frame
    assert lib["logger"] == "uvicorn.error"
    assert "hunter2" not in out and "tok-in-a-local" not in out


def test_url_passwords_are_masked_in_any_event_value(capsys: pytest.CaptureFixture[str]) -> None:
    logs.configure("json", "INFO")
    structlog.get_logger().warning(
        "redis_unavailable",
        op="write",
        error="redis unavailable at redis://app:hunter2@cache:6379/0 (write): ConnectionError",
        nested={"urls": ["rediss://:hunter2@a/1"]},
    )
    logging.getLogger("kafka").warning("bootstrap sasl://u:hunter2@b:9093")
    out = capsys.readouterr().err
    own, lib = _json_lines(out)
    assert "hunter2" not in out
    assert (
        own["error"] == "redis unavailable at redis://app:***@cache:6379/0 (write): ConnectionError"
    )
    assert own["nested"] == {"urls": ["rediss://:***@a/1"]}
    assert lib["event"] == "bootstrap sasl://u:***@b:9093"


def test_processor_masks_and_leaves_private_keys() -> None:
    ed = {"event": "x", "url": "redis://:pw@h/0", "_record": "redis://:pw@h/0", "n": 3}
    out = logs.mask_url_credentials_processor(None, "info", ed)
    assert out == {"event": "x", "url": "redis://:***@h/0", "_record": "redis://:pw@h/0", "n": 3}


def test_capture_logs_sees_fogline_events() -> None:
    """Tests assert on events with capture_logs (the masking guard is in configure's chain)."""
    logs.configure("json", "INFO")
    with structlog.testing.capture_logs() as events:
        structlog.get_logger().info("snapshot_written", version=3)
    assert events == [{"event": "snapshot_written", "version": 3, "log_level": "info"}]
