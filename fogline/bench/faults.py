"""Fault scenarios against the real daemon: does any record get lost, duplicated or stuck?

``python -m fogline.bench.faults --json`` (or ``fogline bench faults --json``) starts an
embedded Tansu broker and redis-server (:mod:`fogline.daemon.embedded`; the scenarios
that restart a service get their own), runs ``fogline run`` as a subprocess through
each scenario below and prints a table and, last, one JSON line.

Scenarios (one topic, one partition, count batching, ``drift.policy = off``):

``kill9``              SIGKILL twice mid-stream, restart, drain.
``redis_pause``        redis-server stopped (SIGSTOP) for 12 s mid-stream: an outage that
                       keeps its data.
``redis_wiped``        redis-server killed and restarted empty mid-stream.
``two_daemons``        two daemons on one model; the lease holder is killed, the other
                       takes over.
``malformed_mix``      every malformed kind the decoder knows, through the producer.
``oversized``          malformed records of 1.5 and 3 MiB (above the DLQ request limit).
``broker_restart_fail``
                       the broker restarts empty and the topic is recreated shorter
                       than the snapshot's offset; with the default
                       ``stream.offset_out_of_range = fail`` the daemon must exit 4 with
                       an ``offset_out_of_range`` error (``cause`` ``beyond_end``) and
                       write nothing; the new topic's records are *held back* for the
                       operator (not lost).
``broker_restart_earliest``
                       the same with ``offset_out_of_range = earliest``: every record
                       of the new topic absorbed exactly once.
``topic_recreated_longer``
                       the broker restarts empty and the topic is recreated *longer*
                       than the snapshot's offset (the range check cannot see it): one
                       run with the default must exit 4 (``cause``
                       ``fingerprint_mismatch``), then one with ``earliest`` must absorb
                       the whole new topic exactly once.
``rejected_steps``     ten records at ±3e38 (they decode, the step goes non-finite).
``latest_deleted``     the ``latest`` key deleted between two runs.
``latest_corrupt``     the latest blob overwritten between two runs.

Counting (exact, never estimated).  ``sent`` is what was produced; ``dead_lettered``
the distinct source offsets in the scenario's dead-letter topic; ``absorbed`` the
final snapshot's ``records_absorbed`` (each snapshot counts what its posterior
learnt); ``duplicates_absorbed = max(0, absorbed - learnable)`` where
``learnable`` is the number of records that can be learnt, known by construction;
``lost = sent - (absorbed - duplicates_absorbed) - dead_lettered - held_back``,
``held_back`` the records a loud ``fail`` left in a recreated topic on purpose.  A loss and a
duplicate in one scenario would cancel in those counts, so a scenario also needs
its final snapshot's offset at the end of the topic and no malformed record
missing from the DLQ.  ``crash_loops`` counts scenarios whose daemon died by
itself twice in a row; ``silent_stalls`` counts runs that made no progress and
wrote no log line for ``--stall-s`` (30) seconds while records were waiting (the
run is then killed).  A scenario that expects ``offset_out_of_range`` also
needs the events it expects (``action:cause``, in order) and, for ``fail``,
exit status 4 with the snapshot untouched (``failed_loudly``); an exit 4 that
was expected is not a crash.  ``passed`` is all of that.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import redis
import yaml

from fogline.bench.crash_replay import (
    BAD_PAYLOADS,
    dlq_source_offsets,
    latest_meta,
    log_events,
    make_records,
    services,
    start_daemon,
    write_config,
)
from fogline.daemon.embedded import EmbeddedKafka, EmbeddedRedis
from fogline.daemon.stream.source import ReplayProducer, create_topic, read_topic
from fogline.daemon.stream.store import SnapshotStore

#: More malformed kinds than :data:`BAD_PAYLOADS` (each rejected by the decoder).
MORE_BAD: tuple[bytes, ...] = (
    b"",  # empty
    b"\xff\xfe\x00garbage",  # not UTF-8
    b'{"ts": "yesterday", "x": [0, 0, 0, 0, 0, 0, 0, 0], "y": 1.0}',  # bad ts
    b'{"ts": 1, "x": [0, 0, 0, 0, 0, 0, 0, 0], "y": 1e39}',  # out of float32 range
    b'{"ts": 1, "x": [0, 0, 0, 0, 0, 0, 0, 0], "y": 1.0, "key": [1]}',  # bad key
    b'{"ts": 1, "x": {"x0": 1}, "y": 1.0}',  # missing features
    b'{"ts": 1, "x": [true, 0, 0, 0, 0, 0, 0, 0], "y": 1.0}',  # bool
    b'{"ts": 1, "x": [0, 0, 0, 0, 0, 0, 0, 0], "y": Infinity}',  # non-finite
)
ALL_BAD = BAD_PAYLOADS + MORE_BAD
#: A malformed record is this prefix plus padding (``x`` a string: ``bad_x``).
HUGE_PREFIX = b'{"ts": 1, "y": 1.0, "x": "'
#: Exit status of ``fogline run`` for an offset it cannot resume from (``fail``).
EXIT_OUT_OF_RANGE = 4
#: Scenarios that restart the broker (each gets its own).
BROKER_RESTARTS = ("broker_restart_fail", "broker_restart_earliest", "topic_recreated_longer")
SCENARIOS = (
    "kill9",
    "redis_pause",
    "redis_wiped",
    "two_daemons",
    "malformed_mix",
    "oversized",
    *BROKER_RESTARTS,
    "rejected_steps",
    "latest_deleted",
    "latest_corrupt",
)


@dataclass
class Outcome:
    """Counts of one scenario (see the module docstring)."""

    scenario: str
    sent: int = 0
    absorbed: int = 0
    dead_lettered: int = 0
    lost: int = 0
    duplicates_absorbed: int = 0
    crash_loops: int = 0
    silent_stalls: int = 0
    passed: bool = False
    #: Records learnable by construction, final offset, malformed ones not in the DLQ.
    learnable: int = 0
    end_offset: int = 0
    dlq_missing: int = 0
    #: Records a loud ``fail`` left in a recreated topic on purpose (for the operator).
    held_back: int = 0
    #: ``offset_out_of_range`` events seen (``action:cause``) and those the scenario needs.
    oor_events: list[str] = field(default_factory=list)
    oor_expected: list[str] = field(default_factory=list)
    #: For a run expected to ``fail``: exit 4, an error logged, the snapshot untouched.
    failed_loudly: bool | None = None
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)

    def finish(self) -> Outcome:
        """Fill in ``duplicates_absorbed``, ``lost`` and ``passed`` from the counts."""
        self.duplicates_absorbed = max(0, self.absorbed - self.learnable)
        self.lost = (
            self.sent
            - (self.absorbed - self.duplicates_absorbed)
            - self.dead_lettered
            - self.held_back
        )
        self.passed = (
            self.lost == 0
            and self.duplicates_absorbed == 0
            and self.crash_loops == 0
            and self.silent_stalls == 0
            and self.end_offset == self.sent
            and self.dlq_missing == 0
            and self.oor_events == self.oor_expected
            and self.failed_loudly is not False
        )
        return self


@dataclass
class Stream:
    """What a scenario produces: values in offset order and which offsets can be learnt."""

    values: list[bytes]
    bad: set[int]

    @property
    def learnable(self) -> int:
        """Records the posterior can learn."""
        return len(self.values) - len(self.bad)

    def extend(self, other: Stream) -> Stream:
        """``self`` followed by ``other`` (offsets of ``other`` shifted)."""
        n = len(self.values)
        return Stream(self.values + other.values, self.bad | {n + o for o in other.bad})


def stream(n_valid: int, n_bad: int, seed: int, bad: tuple[bytes, ...] = ALL_BAD) -> Stream:
    """``n_valid`` good records with ``n_bad`` malformed ones (cycled from ``bad``) spread in."""
    recs = make_records(n_valid, n_bad, seed)
    values = list(recs.values)
    for j, off in enumerate(sorted(recs.bad_offsets)):
        values[off] = bad[j % len(bad)]
    return Stream(values, set(recs.bad_offsets))


def produce_values(bootstrap: str, topic: str, values: list[bytes]) -> None:
    """Produce into partition 0 in order (requests up to 8 MiB, for the oversized records)."""
    with ReplayProducer(bootstrap, topic, max_request_size=8 * 2**20) as prod:
        for v in values:
            prod.send(v, partition=0)


class Scenario:
    """One scenario's topic, model, config, logs and counters."""

    def __init__(
        self,
        name: str,
        *,
        bootstrap: str,
        redis_url: str,
        workdir: Path,
        stall_s: float,
        timeout_s: float,
        snapshot_every_batches: int = 2,
    ) -> None:
        self.name = name
        tag = uuid.uuid4().hex[:8]
        self.bootstrap, self.redis_url = bootstrap, redis_url
        self.topic = f"faults-{name}-{tag}"
        self.prefix = f"faults-{tag}"
        self.model = name.replace("_", "-")
        self.dir = workdir / name
        self.dir.mkdir(parents=True, exist_ok=True)
        self.stall_s, self.timeout_s = stall_s, timeout_s
        self.out = Outcome(name)
        self.stream = Stream([], set())
        self.runs = 0
        #: Offsets lost by a recreated topic (the broker-restart scenario).
        self.end_shift = 0
        self._died_in_a_row = 0
        self._killed: set[int] = set()
        create_topic(bootstrap, self.topic, 1)
        self.config = write_config(
            self.dir / "d.yaml",
            bootstrap=bootstrap,
            topic=self.topic,
            redis_url=redis_url,
            model=self.model,
            prefix=self.prefix,
            batch_size=32,
            snapshot_every_batches=snapshot_every_batches,
            lease_ttl_s=2.0,
            session_timeout_ms=6000,
            max_poll_records=256,
        )
        self.store = SnapshotStore(redis_url, self.model, prefix=self.prefix, socket_timeout=2.0)

    @property
    def log(self) -> Path:
        """The daemons' shared log file."""
        return self.dir / "d.log"

    def produce(self, part: Stream) -> None:
        """Produce ``part`` after what was produced so far."""
        produce_values(self.bootstrap, self.topic, part.values)
        self.stream = self.stream.extend(part)

    def config_with(self, **stream: Any) -> Path:
        """A copy of the daemon's config with these ``stream`` settings."""
        cfg = yaml.safe_load(self.config.read_text(encoding="utf-8"))
        cfg["stream"].update(stream)
        path = self.dir / ("d-" + "-".join(f"{k}-{v}" for k, v in sorted(stream.items())) + ".yaml")
        path.write_text(yaml.safe_dump(cfg), encoding="utf-8")
        return path

    def start(
        self, *extra: str, log: Path | None = None, config: Path | None = None
    ) -> subprocess.Popen[bytes]:
        """Start one daemon (``--idle-exit-s 4`` unless given)."""
        self.runs += 1
        args = extra if "--idle-exit-s" in extra else ("--idle-exit-s", "4", *extra)
        return start_daemon(config or self.config, log or self.log, *args)

    def absorbed_now(self) -> int:
        """``records_absorbed`` of the latest snapshot (0 when none, or Redis is down)."""
        meta = latest_meta(self.store)
        return meta.records_absorbed if meta is not None else 0

    def watch(
        self,
        proc: subprocess.Popen[bytes],
        *,
        until: Callable[[], bool] | None = None,
        log: Path | None = None,
        expect: int | None = None,
    ) -> int | None:
        """Wait for ``proc`` to exit (or for ``until()``); count a silent stall or a crash.

        Returns the exit status, or ``None`` when ``until()`` came true first.
        An exit with status ``expect`` is not a crash.
        A stall: for ``stall_s`` neither the log grew nor the snapshot moved
        while the snapshot's offset is short of the topic's end; the daemon is
        then killed.  The stall clock starts at the daemon's first log line of
        this run: start-up (interpreter, torch import, consumer child) can take
        longer than ``stall_s`` on a loaded machine and is not a stall; a
        daemon that never speaks is bounded by ``timeout_s``.
        """
        log = log or self.log
        deadline = time.monotonic() + self.timeout_s
        last_change = time.monotonic()
        seen: tuple[int, Any] = (-1, None)
        first_size = log.stat().st_size if log.exists() else 0
        while True:
            rc = proc.poll()
            if rc is not None:
                return self._exited(rc, proc.pid, expect)
            if until is not None and until():
                return None
            now = time.monotonic()
            meta = latest_meta(self.store)
            size = log.stat().st_size if log.exists() else 0
            mark = (size, None if meta is None else (meta.version, meta.records_absorbed))
            if mark != seen:
                seen, last_change = mark, now
            end = len(self.stream.values) - self.end_shift
            waiting = meta is None or self.offset_of(meta.offsets) != end  # beyond: stuck too
            started = size > first_size
            if waiting and started and now - last_change >= self.stall_s:
                self.out.silent_stalls += 1
                self.out.notes.append(f"silent stall of {self.stall_s:.0f} s; killed")
                self.kill(proc)
                return None
            if now > deadline:
                self.out.notes.append(f"run exceeded {self.timeout_s:.0f} s; killed")
                self.kill(proc)
                return None
            time.sleep(0.1)

    def kill(self, proc: subprocess.Popen[bytes]) -> None:
        """SIGKILL ``proc`` on purpose (its exit is not a crash)."""
        self._killed.add(proc.pid)
        kill(proc)

    def _exited(self, rc: int, pid: int, expect: int | None = None) -> int:
        if rc == 0 or rc == expect or pid in self._killed:
            self._died_in_a_row = 0
            return rc
        self._died_in_a_row += 1
        self.out.notes.append(f"daemon exited {rc} by itself")
        if self._died_in_a_row == 2:
            self.out.crash_loops += 1
        return rc

    def drain(self, *extra: str, tries: int = 3, config: Path | None = None) -> None:
        """Run daemons until one exits cleanly (idle at the topic's end) or ``tries`` die."""
        for _ in range(tries):
            rc = self.watch(self.start(*extra, config=config))
            if rc == 0 or rc is None:
                return

    def offset_of(self, offsets: dict[str, int]) -> int:
        """The next offset to read of partition 0 in ``offsets``."""
        return int(offsets.get(f"{self.topic}:0", 0))

    def wait_absorbed(self, proc: subprocess.Popen[bytes], n: int) -> bool:
        """Watch ``proc`` until a snapshot shows ``n`` records absorbed (``False``: it ended)."""
        return self.watch(proc, until=lambda: self.absorbed_now() >= n) is None and (
            proc.poll() is None
        )

    def count(self) -> Outcome:
        """Read the final snapshot and the DLQ and fill in the outcome."""
        out = self.out
        out.sent = len(self.stream.values)
        out.learnable = self.stream.learnable
        meta = latest_meta(self.store)
        out.absorbed = meta.records_absorbed if meta is not None else 0
        out.end_offset = self.offset_of(meta.offsets) if meta is not None else 0
        dlq = read_topic(
            self.bootstrap, f"{self.topic}.dlq", timeout_s=10, min_records=len(self.stream.bad)
        )
        sources = set(dlq_source_offsets(dlq))
        out.dead_lettered = len(sources)
        out.dlq_missing = len(self.stream.bad - sources)
        if len(dlq) > len(sources):
            out.notes.append(f"{len(dlq) - len(sources)} repeated dead letters (at-least-once)")
        return out.finish()

    def close(self) -> None:
        """Close the store client."""
        self.store.close()


def kill(proc: subprocess.Popen[bytes]) -> None:
    """SIGKILL ``proc`` and reap it (prefer :meth:`Scenario.kill`, which remembers it)."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGKILL)
    proc.wait()


# --------------------------------------------------------------------------
# the scenarios
# --------------------------------------------------------------------------


def run_kill9(sc: Scenario, n: int) -> None:
    """SIGKILL twice after the snapshots show progress, then drain."""
    sc.produce(stream(n, n // 50, seed=11))
    for frac in (0.3, 0.6):
        proc = sc.start()
        if sc.wait_absorbed(proc, int(frac * n)):
            time.sleep(0.05)
        sc.kill(proc)
    sc.drain()


def _outage(sc: Scenario, server: EmbeddedRedis, n: int, *, wipe: bool) -> None:
    first, second = stream(n // 2, n // 100, seed=12), stream(n // 2, n // 100, seed=13)
    sc.produce(first)
    proc = sc.start("--idle-exit-s", "20")
    if sc.wait_absorbed(proc, first.learnable):
        pid = server.pid
        if wipe:
            server.kill()
        elif pid is not None:
            os.kill(pid, signal.SIGSTOP)
        sc.produce(second)
        time.sleep(12.0)
        if wipe:
            server.start()  # same port, empty
        elif pid is not None:
            os.kill(pid, signal.SIGCONT)
    sc.watch(proc)
    if sc.absorbed_now() < sc.stream.learnable:
        sc.out.notes.append("the outage run did not drain; one more run")
        sc.drain()


def run_two_daemons(sc: Scenario, n: int) -> None:
    """Two daemons on one model: b waits for a's lease; a is killed; b absorbs the rest."""
    first, second = stream(n // 2, n // 100, seed=14), stream(n // 2, n // 100, seed=22)
    sc.produce(first)
    a = sc.start("--idle-exit-s", "30", log=sc.dir / "a.log")
    b: subprocess.Popen[bytes] | None = None
    try:
        if sc.wait_absorbed(a, max(1, first.learnable - 64)):
            b = sc.start("--idle-exit-s", "8", log=sc.dir / "b.log")
            time.sleep(3.0)  # b is up and waiting for the lease
            sc.produce(second)
            sc.kill(a)
            sc.watch(b, log=sc.dir / "b.log")
    finally:
        sc.kill(a)
        if b is not None:
            sc.kill(b)
    took = [
        p
        for p in ("a.log", "b.log")
        if any(e.get("event") == "lease_acquired" for e in log_events(sc.dir / p))
    ]
    sc.out.notes.append(f"lease taken by {'+'.join(took)}")
    if sc.absorbed_now() < sc.stream.learnable:
        sc.drain()


def run_malformed(sc: Scenario, n: int) -> None:
    """Every malformed kind, spread through the stream."""
    sc.produce(stream(n, 3 * len(ALL_BAD), seed=15))
    sc.drain()


def run_oversized(sc: Scenario, n: int) -> None:
    """Malformed records of 1.5 MiB and 3 MiB between good ones."""
    huge = (
        HUGE_PREFIX + b"a" * (3 * 2**20) + b'"}',
        HUGE_PREFIX + b"b" * (3 * 2**19) + b'"}',
    )
    sc.produce(stream(n, 4, seed=16, bad=huge))
    sc.drain()


def _recreate(sc: Scenario, kafka: EmbeddedKafka, n: int, second: Stream) -> Stream:
    """Half the stream drained; the broker restarts empty; the topic is recreated with ``second``.

    Returns the first half (the second's offsets start at 0 again, in the new topic).
    """
    sc.produce(stream(n // 2, n // 100, seed=17))
    sc.drain()
    kafka.stop()
    kafka.start()
    create_topic(sc.bootstrap, sc.topic, 1)
    produce_values(sc.bootstrap, sc.topic, second.values)
    first = sc.stream
    sc.stream = first.extend(second)
    # a correct daemon ends at the recreated topic's end: follow that in ``watch``
    sc.end_shift = len(first.values)
    return first


def _quiet_s(sc: Scenario) -> str:
    """A long idle exit: a daemon that sits silently behind a wrong offset is a stall."""
    return str(round(sc.stall_s + 5))


def _fail_loudly(sc: Scenario) -> None:
    """One run with the default ``fail``: it must exit 4 and write no snapshot."""
    version = sc.store.latest_version()
    rc = sc.watch(sc.start("--idle-exit-s", _quiet_s(sc)), expect=EXIT_OUT_OF_RANGE)
    untouched = sc.store.latest_version() == version
    sc.out.failed_loudly = rc == EXIT_OUT_OF_RANGE and untouched
    sc.out.notes.append(f"default run exited {rc}{'' if untouched else ', snapshot written'}")


def _absorb_earliest(sc: Scenario) -> None:
    """Runs with ``offset_out_of_range = earliest`` until the new topic is drained.

    The usual short idle exit: a batch absorbed after the last due snapshot is
    only written by the shutdown snapshot, and a daemon that resumed at a wrong
    offset shows in the counts (``lost``, ``end_offset``) either way.
    """
    sc.drain(config=sc.config_with(offset_out_of_range="earliest"))


def run_broker_restart_fail(sc: Scenario, kafka: EmbeddedKafka, n: int) -> tuple[Stream, Stream]:
    """Recreated shorter than the offset; the default must fail loudly (``beyond_end``)."""
    second = stream(n // 4, n // 100, seed=18)
    first = _recreate(sc, kafka, n, second)
    sc.out.oor_expected = ["fail:beyond_end"]
    _fail_loudly(sc)
    return first, second


def run_broker_restart_earliest(
    sc: Scenario, kafka: EmbeddedKafka, n: int
) -> tuple[Stream, Stream]:
    """Recreated shorter than the offset; ``earliest`` absorbs the new topic exactly once."""
    second = stream(n // 4, n // 100, seed=18)
    first = _recreate(sc, kafka, n, second)
    sc.out.oor_expected = ["earliest:beyond_end"]
    _absorb_earliest(sc)
    return first, second


def run_topic_recreated_longer(sc: Scenario, kafka: EmbeddedKafka, n: int) -> tuple[Stream, Stream]:
    """Recreated longer than the offset: the default fails (``fingerprint_mismatch``), then
    ``earliest`` absorbs the whole new topic exactly once."""
    second = stream(n // 2 + 32, n // 100, seed=23)
    first = _recreate(sc, kafka, n, second)
    assert len(second.values) >= len(first.values)
    sc.out.oor_expected = ["fail:fingerprint_mismatch", "earliest:fingerprint_mismatch"]
    _fail_loudly(sc)
    _absorb_earliest(sc)
    return first, second


def count_recreated(sc: Scenario, first: Stream, second: Stream) -> Outcome:
    """Counts when the second part lives in a recreated topic (offsets from 0 again).

    The first part's dead letters were on the wiped broker: they are counted as
    delivered (they were acknowledged before the restart); the second part's are
    read.  When the scenario ends on a loud ``fail`` the second part is held back
    and the snapshot must still stand at the first part's end.
    """
    out = sc.out
    held = out.oor_expected[-1].startswith("fail:")
    out.sent = len(sc.stream.values)
    out.learnable = first.learnable if held else sc.stream.learnable
    out.held_back = len(second.values) if held else 0
    meta = latest_meta(sc.store)
    out.absorbed = meta.records_absorbed if meta is not None else 0
    end = sc.offset_of(meta.offsets) if meta is not None else 0
    want = len(first.values) if held else len(second.values)
    out.end_offset = out.sent if end == want else end
    dlq = read_topic(sc.bootstrap, f"{sc.topic}.dlq", timeout_s=10)
    sources = set(dlq_source_offsets(dlq))
    out.dead_lettered = len(sources & second.bad) + len(first.bad)
    out.dlq_missing = 0 if held else len(second.bad - sources)
    out.oor_events = [
        f"{e.get('action')}:{e.get('cause')}"
        for e in log_events(sc.log)
        if e.get("event") == "offset_out_of_range"
    ]
    where = "the old topic's end" if held else "the recreated topic"
    out.notes.append(f"final offset {end} (want {want}: {where}); oor {out.oor_events}")
    return out.finish()


def huge_value_records(n_valid: int, positions: list[int], seed: int = 0) -> list[bytes]:
    """``n_valid`` good records with records at ``positions`` replaced by ±3e38 ones.

    They decode (finite in float32) but square to infinity in the likelihood.
    """
    values = list(make_records(n_valid, 0, seed=seed).values)
    for j, pos in enumerate(positions):
        x = [0.1] * 8
        sign = 1 if j % 2 == 0 else -1
        if j % 3 == 2:
            values[pos] = json.dumps({"ts": 1, "x": x, "y": sign * 3e38}).encode()
        else:
            x[j % 8] = sign * 3e38
            values[pos] = json.dumps({"ts": 1, "x": x, "y": 0.5}).encode()
    return values


def _rejected_stream(n: int, seed: int) -> Stream:
    """``n`` records, ten of them at ±3e38 (they decode; the step goes non-finite)."""
    positions = sorted({(k * 97 + 5) % n for k in range(10)})
    return Stream(huge_value_records(n, positions, seed), set(positions))


def run_rejected(sc: Scenario, n: int) -> None:
    """Ten ±3e38 records among good ones."""
    sc.produce(_rejected_stream(n, seed=19))
    sc.drain()


def _latest(sc: Scenario, n: int, damage: Callable[[redis.Redis, int], object]) -> None:
    sc.produce(stream(n // 2, n // 100, seed=20))
    sc.drain()
    version = sc.store.latest_version()
    client = redis.Redis.from_url(sc.redis_url)
    try:
        if version is not None:
            damage(client, version)
    finally:
        client.close()
    sc.produce(stream(n // 2, n // 100, seed=21))
    sc.drain()
    events = log_events(sc.log)
    starts = [e.get("origin") for e in events if e.get("event") == "daemon_started"]
    sc.out.notes.append(f"second start: {starts[-1] if starts else '?'}")


def run_latest_deleted(sc: Scenario, n: int) -> None:
    """``latest`` deleted between two runs."""
    _latest(sc, n, lambda client, v: client.delete(sc.store.keys_latest))


def run_latest_corrupt(sc: Scenario, n: int) -> None:
    """The latest blob overwritten between two runs."""
    _latest(sc, n, lambda client, v: client.set(sc.store.snap_key(v), b"corrupt"))


# --------------------------------------------------------------------------
# driver
# --------------------------------------------------------------------------


def run_scenario(
    name: str,
    *,
    bootstrap: str,
    redis_url: str,
    workdir: Path,
    n: int,
    stall_s: float,
    timeout_s: float,
) -> Outcome:
    """Run one scenario on ``bootstrap`` / ``redis_url`` (or its own services); its counts.

    A scenario that restarts Redis or the broker gets its own embedded one, so
    scenarios never share a service they disturb and can run side by side.
    """
    t0 = time.monotonic()
    with contextlib.ExitStack() as stack:
        own_redis = own_kafka = None
        b, r = bootstrap, redis_url
        if name in ("redis_pause", "redis_wiped"):
            own_redis = stack.enter_context(EmbeddedRedis())
            r = own_redis.url
        if name in BROKER_RESTARTS:
            own_kafka = stack.enter_context(EmbeddedKafka())
            b = own_kafka.bootstrap_servers
        sc = Scenario(
            name,
            bootstrap=b,
            redis_url=r,
            workdir=workdir,
            stall_s=stall_s,
            timeout_s=timeout_s,
        )
        stack.callback(sc.close)
        parts: tuple[Stream, Stream] | None = None
        try:
            if name == "kill9":
                run_kill9(sc, n)
            elif name in ("redis_pause", "redis_wiped"):
                assert own_redis is not None
                _outage(sc, own_redis, n, wipe=name == "redis_wiped")
            elif name == "two_daemons":
                run_two_daemons(sc, n)
            elif name == "malformed_mix":
                run_malformed(sc, n)
            elif name == "oversized":
                run_oversized(sc, n)
            elif name in BROKER_RESTARTS:
                assert own_kafka is not None
                run = {
                    "broker_restart_fail": run_broker_restart_fail,
                    "broker_restart_earliest": run_broker_restart_earliest,
                    "topic_recreated_longer": run_topic_recreated_longer,
                }[name]
                parts = run(sc, own_kafka, n)
            elif name == "rejected_steps":
                run_rejected(sc, n)
            elif name == "latest_deleted":
                run_latest_deleted(sc, n)
            elif name == "latest_corrupt":
                run_latest_corrupt(sc, n)
            else:
                raise ValueError(f"unknown scenario {name!r}")
            out = count_recreated(sc, *parts) if parts is not None else sc.count()
        except Exception as exc:  # a harness failure is a failed scenario, not a crash
            out = sc.out
            out.notes.append(f"harness error: {type(exc).__name__}: {exc}")
            out.passed = False
        out.seconds = round(time.monotonic() - t0, 1)
        return out


def run_faults(
    *,
    bootstrap: str,
    redis_url: str,
    workdir: Path,
    n: int = 1024,
    only: tuple[str, ...] = SCENARIOS,
    stall_s: float = 30.0,
    timeout_s: float = 180.0,
    jobs: int = 1,
    verbose: bool = True,
) -> dict[str, Any]:
    """Run the ``only`` scenarios, ``jobs`` at a time; ``{"scenarios": {name: counts}, "total": counts}``.

    Scenarios are independent (each its own topic, model, key prefix and
    consumer group; the ones that restart a service get their own), so
    ``jobs > 1`` runs them side by side in threads: each scenario is mostly
    waiting on its daemon subprocesses.  The counts do not depend on ``jobs``;
    only the wall time does.
    """
    if jobs < 1:
        raise ValueError(f"jobs must be >= 1, got {jobs}")
    say = print if verbose else (lambda *a, **k: None)
    results: dict[str, Outcome] = {}

    def one(name: str) -> Outcome:
        out = run_scenario(
            name,
            bootstrap=bootstrap,
            redis_url=redis_url,
            workdir=workdir,
            n=n,
            stall_s=stall_s,
            timeout_s=timeout_s,
        )
        say(_row(out))
        return out

    with ThreadPoolExecutor(max_workers=jobs, thread_name_prefix="fault") as pool:
        for name, out in zip(only, pool.map(one, only), strict=True):
            results[name] = out
    keys = ("sent", "absorbed", "dead_lettered", "held_back", "lost", "duplicates_absorbed")
    total: dict[str, Any] = {k: sum(getattr(o, k) for o in results.values()) for k in keys}
    total["crash_loops"] = sum(o.crash_loops for o in results.values())
    total["silent_stalls"] = sum(o.silent_stalls for o in results.values())
    total["passed"] = all(o.passed for o in results.values())
    return {"scenarios": {k: asdict(v) for k, v in results.items()}, "total": total}


HEADER = (
    f"{'scenario':<24}{'sent':>6}{'absorbed':>9}{'dlq':>5}{'held':>5}{'lost':>5}{'dups':>5}"
    f"{'loops':>6}{'stalls':>7}{'loud':>5}{'s':>7}  passed"
)


def _row(o: Outcome) -> str:
    loud = "-" if o.failed_loudly is None else ("yes" if o.failed_loudly else "NO")
    return (
        f"{o.scenario:<24}{o.sent:>6}{o.absorbed:>9}{o.dead_lettered:>5}{o.held_back:>5}"
        f"{o.lost:>5}{o.duplicates_absorbed:>5}{o.crash_loops:>6}{o.silent_stalls:>7}"
        f"{loud:>5}{o.seconds:>7.1f}  "
        f"{'yes' if o.passed else 'NO'}" + (f"  ({'; '.join(o.notes)})" if o.notes else "")
    )


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m fogline.bench.faults``."""
    p = argparse.ArgumentParser(prog="faults", description=__doc__.split("\n\n")[0])
    p.add_argument("--records", type=int, default=1024, help="valid records per scenario")
    p.add_argument("--only", nargs="*", choices=SCENARIOS, default=None, help="these scenarios")
    p.add_argument("--stall-s", type=float, default=30.0, help="silent-stall threshold")
    p.add_argument("--bootstrap", default=None, help="use this broker instead of an embedded one")
    p.add_argument("--redis-url", default=None, help="use this Redis instead of an embedded one")
    p.add_argument("--workdir", type=Path, default=None, help="keep configs and logs here")
    p.add_argument(
        "--jobs", type=int, default=1, help="scenarios run side by side (default 1: one by one)"
    )
    p.add_argument("--json", action="store_true", help="print the result as JSON last")
    args = p.parse_args(argv)
    t0 = time.monotonic()
    with contextlib.ExitStack() as stack:
        workdir = args.workdir or Path(
            stack.enter_context(tempfile.TemporaryDirectory(prefix="fogline-faults-"))
        )
        workdir.mkdir(parents=True, exist_ok=True)
        bootstrap, redis_url = stack.enter_context(services(args.bootstrap, args.redis_url))
        print(HEADER)
        result = run_faults(
            bootstrap=bootstrap,
            redis_url=redis_url,
            workdir=workdir,
            n=args.records,
            only=tuple(args.only) if args.only else SCENARIOS,
            stall_s=args.stall_s,
            jobs=args.jobs,
        )
    result["seconds"] = round(time.monotonic() - t0, 1)
    result["load"] = [round(x, 2) for x in os.getloadavg()]
    if args.json:
        print(json.dumps(result))
    return 0 if result["total"]["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
