"""The consumer in a child process: the Kafka fetch runs beside the update, not under its GIL.

kafka-python's fetch, record unpacking and CRC-32C check are pure Python, and
so is much of the drift loop between torch's kernels, so a worker *thread*
(:class:`~fogline.daemon.stream.prefetch.SerialSource`) hides little of either.
:class:`ProcessSource` moves the consumer into a child interpreter (a bare
``python -c``, see :func:`child_main`) that owns the
:class:`~fogline.daemon.stream.source.KafkaSource`; on two cores the next poll
is fetched while the parent decodes and absorbs the current one.

Protocol (one duplex pipe, strictly request/reply, one request at a time):

1. ``("poll", max_records, timeout_ms, offsets, fingerprints)``: the child
   polls and replies with the raw records (pickled); the parent decodes them
   into a :class:`~fogline.daemon.stream.decode.DecodedBatch` as it takes them.
   ``offsets``/``fingerprints`` are the parent's state at the request (what
   the in-process callbacks would have returned): a partition assigned during
   this poll is sought to them, exactly as
   :meth:`Pipeline._offsets_for <fogline.daemon.stream.pipeline.Pipeline>` does.
2. Every other consumer call -- ``assignment``, ``seek``, ``reset``,
   ``commit``, ``pause_all``, ``resume_all``, ``lag``, ``out_of_range``,
   ``close`` -- is one request and its reply, sent only after the poll in flight
   has replied (that reply is held for the next :meth:`ProcessSource.take`).
   So the consumer sees the calls in the order the parent makes them: the
   commit path's order (snapshot written, *then* offsets committed) holds.
3. Every reply also carries the rebalance events of that call: partitions
   assigned (with the offset the child sought them to) and revoked.  Revocations
   are handed to ``on_revoked`` when the reply arrives; assignments travel in
   the next :class:`~fogline.daemon.stream.prefetch.Polled` (``assigned``), and
   the pipeline re-seeks a partition whose offset was stale
   (``Pipeline._reseek``), as with thread prefetching.

Prefetched records are *not read* until the pipeline ingests them (see
:mod:`fogline.daemon.stream.prefetch`): a snapshot taken while a poll is in
flight resumes before it, and records a stop or crash leaves in the pipe are
read again after the restart.  Malformed records arrive as raw bytes with
their reason in ``DecodedBatch.bad``, so the dead-letter path is unchanged.

A child that dies (killed, out of memory, an exception outside a request)
raises :class:`SourceProcessDied` in the parent at its next call; the daemon
exits non-zero without a final snapshot and a restart resumes from the last
one.  The child ignores SIGINT/SIGTERM (the parent stops it through
:meth:`ProcessSource.close`) and exits when the parent's end of the pipe closes.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import pickle
import signal
import subprocess
import sys
import traceback
from collections.abc import Callable, Mapping
from multiprocessing.connection import Connection
from typing import Any

import structlog

from fogline.daemon import logs
from fogline.daemon.stream.batching import TopicPartition
from fogline.daemon.stream.decode import DecodedBatch, RawRecord
from fogline.daemon.stream.prefetch import Polled, Source
from fogline.daemon.stream.source import OutOfRange
from fogline.models.fingerprint import RecordFingerprint

log = structlog.get_logger(__name__)

#: ``factory(offsets_for, on_revoked, fingerprints_for) -> Source``, run in the child;
#: it must pickle (e.g. ``functools.partial(source.kafka_source, settings)``).
ChildSourceFactory = Callable[
    [
        Callable[[list[TopicPartition]], Mapping[TopicPartition, int]],
        Callable[[list[TopicPartition]], None],
        Callable[[list[TopicPartition]], Mapping[TopicPartition, RecordFingerprint]],
    ],
    Source,
]

#: Seconds between liveness checks while waiting for a reply.
ALIVE_CHECK_S = 0.5
#: Longest the child gets to close its consumer (leave the group) before it is killed.
CLOSE_TIMEOUT_S = 30.0
#: Requests other than ``poll``: the consumer calls the child serves by name.
CALLS = frozenset(
    {"seek", "reset", "commit", "pause_all", "resume_all", "lag", "out_of_range", "close"}
)


class SourceProcessDied(RuntimeError):
    """The consumer's child process exited (or its pipe broke) while the daemon needed it."""


class SourceProcessError(RuntimeError):
    """A consumer call raised in the child and its exception could not be sent as it was."""


# -- the child --------------------------------------------------------------------
class _Events:
    """Rebalance events of the child's consumer since the last reply (the callbacks' side)."""

    def __init__(self) -> None:
        self.offsets: Mapping[TopicPartition, int] = {}
        self.prints: Mapping[TopicPartition, RecordFingerprint] = {}
        self.assigned: dict[TopicPartition, int | None] = {}
        self.revoked: list[TopicPartition] = []
        #: Log records to re-emit in the parent (:func:`_forward_logs`).
        self.logs: list[tuple[Any, ...]] = []

    def offsets_for(self, keys: list[TopicPartition]) -> Mapping[TopicPartition, int]:
        self.assigned.update({k: self.offsets.get(k) for k in keys})
        return self.offsets

    def fingerprints_for(
        self, keys: list[TopicPartition]
    ) -> Mapping[TopicPartition, RecordFingerprint]:
        return self.prints

    def on_revoked(self, keys: list[TopicPartition]) -> None:
        self.revoked.extend(keys)

    def take(self) -> tuple[dict[TopicPartition, int | None], list[TopicPartition], list[Any]]:
        out = (self.assigned, self.revoked, list(self.logs))
        self.assigned, self.revoked = {}, []
        self.logs.clear()  # the same list: the log collector appends to it
        return out


_PLAIN = (str, int, float, bool, type(None))


def _plain(v: Any) -> Any:
    """``v`` if it is a JSON-like value (pickles anywhere), else its ``repr``."""
    if isinstance(v, _PLAIN):
        return v
    if isinstance(v, list | tuple):
        return [_plain(i) for i in v]
    if isinstance(v, dict):
        return {str(k): _plain(i) for k, i in v.items()}
    return repr(v)


class _Collect(logging.Handler):
    """A root handler that keeps library log records for the parent."""

    def __init__(self, sink: list[tuple[Any, ...]]) -> None:
        super().__init__()
        self.sink = sink

    def emit(self, record: logging.LogRecord) -> None:
        self.sink.append(("stdlib", record.levelno, record.name, record.getMessage()))


def _forward_logs(log_config: tuple[str, str] | None, sink: list[tuple[Any, ...]]) -> None:
    """Configure the child's logs to be collected into ``sink``, not written.

    Levels and quiet libraries as :func:`fogline.daemon.logs.configure` sets
    them; each reply carries the records, and the parent logs them through its
    own configuration (so they reach its sink, and ``capture_logs`` in tests).
    """
    fmt, level = log_config or ("json", "INFO")
    logs.configure(fmt, level)  # type: ignore[arg-type]

    def collect(_logger: Any, method: str, event_dict: Any) -> Any:
        sink.append(("structlog", method, {k: _plain(v) for k, v in event_dict.items()}))
        raise structlog.DropEvent

    structlog.configure(processors=[structlog.processors.format_exc_info, collect])
    root = logging.getLogger()
    root.handlers[:] = [_Collect(sink)]


#: structlog method names to stdlib levels (for re-emitting a child's event).
_LEVELS = {"exception": logging.ERROR, "warn": logging.WARNING, "fatal": logging.CRITICAL}


def _reemit(records: list[tuple[Any, ...]]) -> None:
    """Log a child's records in this process (under the same logger names)."""
    for rec in records:
        if rec[0] == "structlog":
            method, event_dict = rec[1], dict(rec[2])
            level = _LEVELS.get(method) or logging.getLevelName(method.upper())
            event = event_dict.pop("event", "")
            structlog.get_logger(__name__).log(
                level if isinstance(level, int) else logging.INFO, event, **event_dict
            )
        else:
            logging.getLogger(rec[2]).log(rec[1], "%s", rec[3])


def _portable(exc: BaseException) -> BaseException:
    """``exc`` itself when it pickles and unpickles, else a :class:`SourceProcessError`."""
    try:
        pickle.loads(pickle.dumps(exc))
    except Exception:
        return SourceProcessError(f"{type(exc).__name__}: {exc}")
    return exc


def child_main(fd: int) -> None:
    """Entry point of the child (``python -c ...child_main(fd)``): its end of the pipe is ``fd``.

    The parent sends its ``sys.path`` first (so the factory unpickles as it
    pickled), then ``(server, factory, log_config)``; then ``server`` runs
    (:func:`serve`, or keyed mode's
    :func:`~fogline.daemon.stream.keyed_process.keyed_serve`).
    A bare interpreter rather than :mod:`multiprocessing`'s ``spawn``: nothing
    re-imports the parent's ``__main__`` (a script without a ``__main__`` guard
    works) and the child imports only what the consumer needs.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    conn = Connection(fd)
    try:
        sys.path[:] = conn.recv()
        server, factory, log_config = conn.recv()
    except (EOFError, OSError):
        return
    server(conn, factory, log_config)


def serve(
    conn: Connection, factory: ChildSourceFactory, log_config: tuple[str, str] | None
) -> None:
    """The child's loop: build the consumer, then answer requests until ``close`` or EOF.

    Replies are ``(status, value, assigned, revoked, logs)`` with ``status`` ``"ok"``
    or ``"error"`` (``value`` then ``(exception, child traceback)``).  The first
    reply answers the start itself (the consumer built, or why not).
    """
    events = _Events()
    _forward_logs(log_config, events.logs)
    try:
        source = factory(events.offsets_for, events.on_revoked, events.fingerprints_for)
    except BaseException as exc:
        conn.send(("error", (_portable(exc), traceback.format_exc()), *events.take()))
        return
    conn.send(("ok", None, *events.take()))

    def handle(op: str, args: tuple[Any, ...]) -> Any:
        if op == "poll":
            max_records, timeout_ms, events.offsets, events.prints = args
            return source.poll(max_records=max_records, timeout_ms=timeout_ms)
        if op == "assignment":
            return source.assignment
        if op in CALLS:
            return getattr(source, op)(*args)
        raise ValueError(f"unknown request {op!r}")

    answer_requests(conn, source, handle, events.take)


def answer_requests(
    conn: Connection,
    source: Any,
    handle: Callable[[str, tuple[Any, ...]], Any],
    tail: Callable[[], tuple[Any, ...]],
) -> None:
    """A child's request loop: answer ``(op, *args)`` requests until ``close`` or EOF.

    Each reply is ``("ok", handle(op, args), *tail())`` or, when ``handle``
    raises, ``("error", (exception, child traceback), *tail())``; ``tail``
    carries what happened since the last reply (events, findings, logs).  The
    parent gone (EOF on receive, a broken pipe on send) closes ``source``:
    the consumer leaves its group at once.

    The loop runs with the daemon's collector settings
    (:func:`~fogline.daemon.gc_tuning.tune_for_streaming`, once the consumer is
    built): every poll makes thousands of short-lived record objects, and with
    CPython's defaults the collector's full passes over the child's heap took a
    sizeable share of a bare consume + decode loop (40-50k records/s with the defaults,
    56-63k tuned, measured in one process on this 2-core machine kind).
    """
    from fogline.daemon.gc_tuning import tune_for_streaming

    tune_for_streaming()
    while True:
        try:
            request = conn.recv()
        except (EOFError, OSError):  # the parent is gone: nothing to answer
            source.close()
            return
        op, args = request[0], request[1:]
        try:
            reply: tuple[Any, ...] = ("ok", handle(op, args), *tail())
        except Exception as exc:
            reply = ("error", (_portable(exc), traceback.format_exc()), *tail())
        try:
            conn.send(reply)
        except (BrokenPipeError, OSError):
            source.close()
            return
        if op == "close":
            return


# -- the parent -------------------------------------------------------------------
class ProcessSource:
    """A :class:`~fogline.daemon.stream.prefetch.SerialSource` whose consumer lives in a child.

    The same interface (``start``/``take``/``quiesce``/``in_flight`` and the
    :class:`~fogline.daemon.stream.prefetch.Source` calls), so the pipeline
    and the commit path use either unchanged.

    Parameters
    ----------
    factory:
        Builds the consumer in the child from its three callbacks (must pickle).
    decode:
        ``raws -> DecodedBatch``, run here on each poll's records as :meth:`take`
        returns them (decoding stays in the parent: with the plain rule the
        child is the busier side; docs/performance.md).
    offsets, fingerprints:
        The parent's current resume state (``state.offsets``,
        ``state.fingerprints``), sent with every poll request.
    on_revoked:
        Told which partitions the child's consumer lost, when a reply reports it.
    log_config:
        ``(format, level)`` for the child's logs (default: this process's).
    """

    #: The child's loop (a module-level function: it is pickled by name).
    server: Callable[[Connection, Any, tuple[str, str] | None], None] = staticmethod(serve)

    def __init__(
        self,
        factory: ChildSourceFactory,
        decode: Callable[[list[RawRecord]], DecodedBatch],
        *,
        offsets: Callable[[], Mapping[TopicPartition, int]],
        fingerprints: Callable[[], Mapping[TopicPartition, RecordFingerprint]],
        on_revoked: Callable[[list[TopicPartition]], None],
        log_config: tuple[str, str] | None = None,
    ) -> None:
        self._decode = decode
        self._offsets = offsets
        self._fingerprints = fingerprints
        self._on_revoked = on_revoked
        self._conn, child = mp.Pipe(duplex=True)
        code = f"from {__name__} import child_main; child_main({child.fileno()})"
        # its own session: a terminal's Ctrl-C reaches the parent only, which stops the child
        self._proc = subprocess.Popen(
            [sys.executable, "-c", code], pass_fds=(child.fileno(),), start_new_session=True
        )
        child.close()
        self._put(list(sys.path))
        self._put((self.server, factory, log_config or logs.current()))
        #: Replies owed by the child, oldest first (the start's, then a started poll's).
        self._owed: list[str] = ["start"]
        self._held: tuple[Any, ...] | None = None
        self._closed = False
        #: Partitions assigned since the last poll was taken, with the offset sought to.
        self.assigned: dict[TopicPartition, int | None] = {}
        #: Polls run ahead in the child (for tests and logs).
        self.prefetched = 0

    @property
    def pid(self) -> int | None:
        """The child's process id."""
        return self._proc.pid

    # -- the pipe -------------------------------------------------------------
    def _alive(self) -> bool:
        return self._proc.poll() is None

    def _died(self, why: str) -> SourceProcessDied:
        try:
            code: int | None = self._proc.wait(1.0)
        except subprocess.TimeoutExpired:
            code = None
        log.error("source_process_died", exit_code=code, why=why)
        return SourceProcessDied(
            f"the consumer process (pid {self._proc.pid}) {why} (exit code {code}); "
            "restart the daemon: it resumes from the last snapshot"
        )

    def _recv(self) -> tuple[Any, ...]:
        """The next reply, its rebalance events applied; raises if the child is gone."""
        try:
            while not self._conn.poll(ALIVE_CHECK_S):
                if not self._alive():
                    raise self._died("exited")
            reply: tuple[Any, ...] = self._conn.recv()
        except (EOFError, OSError) as exc:
            raise self._died(f"closed its pipe ({type(exc).__name__})") from exc
        status, value, first, second, records = reply
        _reemit(records)
        self._events(first, second)
        return status, value

    def _events(self, assigned: dict[TopicPartition, int | None], revoked: Any) -> None:
        """Apply a reply's rebalance events: assignments held for the next poll, revocations told."""
        self.assigned.update(assigned)
        if revoked:
            self._on_revoked(list(revoked))

    def _send(self, *request: Any) -> None:
        self._put(request)

    def _put(self, message: Any) -> None:
        try:
            self._conn.send(message)
        except (BrokenPipeError, EOFError, OSError) as exc:
            raise self._died(f"closed its pipe ({type(exc).__name__})") from exc

    @staticmethod
    def _value(reply: tuple[Any, ...]) -> Any:
        status, value = reply
        if status == "error":
            exc, child_tb = value
            exc.add_note(f"in the consumer process:\n{child_tb}")
            raise exc
        return value

    def quiesce(self) -> None:
        """Wait until the child owes no reply (a poll's is held for :meth:`take`)."""
        while self._owed:
            what = self._owed.pop(0)
            reply = self._recv()
            if what == "poll":
                self._held = reply
            else:
                self._value(reply)  # the start: raises why the consumer could not be built

    def ready(self, wait_s: float = 0.0) -> bool:
        """Whether the child has built its consumer (waiting up to ``wait_s`` for it).

        The child's start (a fresh interpreter importing the Kafka side) takes
        seconds; until then :meth:`take` returns empty polls after its timeout
        and :attr:`assignment`, :meth:`out_of_range` and :meth:`lag` report
        nothing, so the daemon's loop keeps renewing its lease meanwhile.
        Raises why the consumer could not be built, when it could not.
        """
        if not self._owed or self._owed[0] != "start":
            return True
        if not self._conn.poll(wait_s):
            if not self._alive() and not self._conn.poll(0):
                raise self._died("exited")
            return False
        self._owed.pop(0)
        self._value(self._recv())
        return True

    def _call(self, op: str, *args: Any) -> Any:
        if self._closed:
            raise SourceProcessDied("the consumer process was closed")
        self.quiesce()
        self._send(op, *args)
        return self._value(self._recv())

    # -- the poll -------------------------------------------------------------
    @property
    def in_flight(self) -> bool:
        """True while a started poll's result has not been taken."""
        return "poll" in self._owed or self._held is not None

    def _request_poll(self, max_records: int | None, timeout_ms: int) -> None:
        self._send("poll", max_records, timeout_ms, *self._poll_state())
        self._owed.append("poll")

    def _poll_state(self) -> tuple[Any, ...]:
        """What a poll request carries beside its size: the parent's resume state."""
        return dict(self._offsets()), dict(self._fingerprints())

    def start(self, max_records: int | None, timeout_ms: int) -> bool:
        """Let the child run the next poll now; ``False`` if one is already started."""
        if self._closed or self.in_flight or not self.ready():
            return False
        self.quiesce()
        self._request_poll(max_records, timeout_ms)
        self.prefetched += 1
        return True

    def take(self, max_records: int | None = None, timeout_ms: int = 100) -> Polled:
        """The started poll's result (re-raising its error), else a poll made now.

        Empty, after ``timeout_ms``, while the child is still starting (:meth:`ready`).
        """
        if not self.in_flight:
            if self._closed:
                raise SourceProcessDied("the consumer process was closed")
            if not self.ready(timeout_ms / 1000):
                return Polled([], None, {})
            self.quiesce()
            self._request_poll(max_records, timeout_ms)
        self.quiesce()
        reply, self._held = self._held, None
        assert reply is not None
        return self._polled(self._value(reply))

    def _polled(self, raws: Any) -> Polled:
        """A poll's reply as the pipeline takes it: decoded, with the assignments since the last."""
        assigned, self.assigned = self.assigned, {}
        return Polled(raws, self._decode(raws) if raws else None, assigned)

    def poll(self, max_records: int | None = None, timeout_ms: int = 100) -> list[RawRecord]:
        """:meth:`take`'s raw records (the :class:`Source` protocol's poll)."""
        return self.take(max_records, timeout_ms).raws

    # -- every other call: one request after the poll in flight ------------------
    @property
    def assignment(self) -> list[TopicPartition]:
        return list(self._call("assignment")) if self.ready() else []

    def out_of_range(self) -> list[OutOfRange]:
        return list(self._call("out_of_range")) if self.ready() else []

    def reset(self, key: TopicPartition, to: str, high_watermark: int | None = None) -> None:
        self._call("reset", key, to, high_watermark)

    def seek(self, offsets: Mapping[TopicPartition, int]) -> None:
        self._call("seek", dict(offsets))

    def commit(self, offsets: Mapping[TopicPartition, int]) -> bool:
        return bool(self._call("commit", dict(offsets)))

    def pause_all(self) -> None:
        self._call("pause_all")

    def resume_all(self) -> None:
        self._call("resume_all")

    def lag(
        self, absorbed: Mapping[TopicPartition, int] | None = None
    ) -> dict[TopicPartition, int]:
        if not self.ready():
            return {}
        return dict(self._call("lag", None if absorbed is None else dict(absorbed)))

    def close(self) -> None:
        """Drop a poll in flight (never read), close the child's consumer, reap the child.

        Never raises for a child that is already gone (it is called on the way
        out of an error too); a child that does not finish in
        :data:`CLOSE_TIMEOUT_S` is killed.
        """
        if self._closed:
            return
        self._closed = True
        try:
            if self._alive():
                self.quiesce()
                self._held = None
                self._send("close")
                if self._conn.poll(CLOSE_TIMEOUT_S):
                    self._value(self._recv())
        except SourceProcessDied:
            pass  # already logged; nothing is left to close
        except Exception as exc:  # the consumer's close (or a held start error) failed
            log.warning("source_process_close_failed", error=repr(exc))
        finally:
            try:
                self._proc.wait(CLOSE_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                log.warning("source_process_killed", pid=self._proc.pid)
                self._proc.kill()
                self._proc.wait(5.0)
            self._conn.close()
