"""Crash test: kill -9 the daemon at random moments; check exactly-once absorption.

``python -m fogline.bench.crash_replay --json`` (or ``fogline bench crash_replay --json``):

1. starts an embedded Tansu broker and redis-server (or uses ``--bootstrap`` /
   ``--redis-url``), and produces ``--valid`` valid plus ``--bad`` malformed
   records (at seeded random positions) into ONE partition.  With a drift
   ``--policy`` (default ``forget``; ``off`` is plain SVI) the stream has a
   +1.5 mean shift half-way and both daemons start from the same warm-start
   file, so the kills also hit calibration, alarm, ``shifted`` and
   ``recovering``;
2. *reference*: one uninterrupted ``fogline run`` (count-based batching, one
   torch thread, seed 0) over the whole topic;
3. *crash run*: the same daemon for another model name, SIGKILLed at
   ``--kills`` random moments (some during start-up, most a random moment after
   the snapshots show a randomly chosen amount of progress) and restarted each
   time, until a last run drains the topic; each start joins a consumer group of
   its own (:func:`regroup`: the daemon resumes from the snapshot, and Tansu can
   stick a group whose member died during a join);
4. checks: the final snapshot absorbed every valid record exactly once
   (``absorbed == valid``), every malformed record's source offset is in the
   crash run's dead-letter topic (duplicates are allowed: the DLQ is
   at-least-once), and the final posterior is bit-identical to the reference
   (the whole ``to_bytes`` blob: parameters, Adam moments, RNG state, prior,
   step count, offsets, records absorbed, drift state).

``--autoregressive``: the records are univariate ``{ts, value, key}`` telemetry of
:data:`SERIES_KEYS` keys (an AR(1) per key, the shift added to every key), the daemons
run the autoregressive spec :data:`SERIES_SPEC` from a fresh prior (no warm-start
file), and each key's first ``lags`` records only fill its lag buffer:
``absorbed + warming == valid``; the lag state rides in the compared blob.

The last line printed is ``{"sent", "valid", "absorbed", "dead_lettered",
"kills", "identical", "policy", "drift_mode", "alarms"}`` (+ ``"warming"``).  The helpers here (records, config files, daemon
subprocesses) are shared with ``tests/service``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from fogline.daemon.embedded import EmbeddedKafka, EmbeddedRedis
from fogline.daemon.stream.decode import RawRecord
from fogline.daemon.stream.source import (
    DLQ_REASON,
    DLQ_SOURCE_OFFSET,
    ReplayProducer,
    create_topic,
    read_topic,
)
from fogline.daemon.stream.store import (
    SnapshotMeta,
    SnapshotNotFound,
    SnapshotStore,
    StoreUnavailable,
)
from fogline.drift.runner import drift_summary

#: Malformed payloads cycled through by :func:`make_records`.
BAD_PAYLOADS: tuple[bytes, ...] = (
    b'{"ts": 1, "x": [1, 2',  # invalid JSON
    b'{"ts": 1, "x": [0, 0, 0, 0, 0, 0, 0, 0]}',  # no y
    b'{"ts": 1, "x": [0, 0, 0], "y": 1.0}',  # wrong length
    b'{"ts": 1, "x": [0, 0, 0, 0, 0, 0, 0, NaN], "y": 1.0}',  # non-finite
    b'{"ts": 1, "x": [0, 0, 0, 0, 0, 0, 0, 0], "y": "high"}',  # non-numeric
    b"[]",  # not an object
)

#: Malformed ``{ts, value, key}`` records of the autoregressive variant.
BAD_SERIES: tuple[bytes, ...] = (
    b'{"ts": 1, "value": 1',  # invalid JSON
    b'{"ts": 1, "key": "k0"}',  # no value
    b'{"ts": 1, "key": "k0", "value": "high"}',  # non-numeric
    b'{"ts": 1, "key": "k0", "value": NaN}',  # non-finite
    b'{"ts": "yesterday", "key": "k0", "value": 1.0}',  # bad time stamp
    b"[]",  # not an object
)
#: Keys of the autoregressive variant and its model spec (one posterior for all keys).
SERIES_KEYS = 4
SERIES_SPEC: dict[str, Any] = {
    "mode": "autoregressive",
    "target": "value",
    "timestamp": "ts",
    "key": "key",
    "lags": 4,
    "calendar": True,
}

PYTHON = sys.executable


# --------------------------------------------------------------------------
# records and topics
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class Records:
    """A produced stream: values in offset order and which offsets are malformed."""

    values: list[bytes]
    bad_offsets: frozenset[int]

    @property
    def valid(self) -> int:
        """Number of valid records."""
        return len(self.values) - len(self.bad_offsets)


def regime0(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """``n`` regime-0 rows: ``y = sin(3 x0) + (0.1 + 0.4 |x0|) eps``, x ~ N(0, I_8)."""
    x = rng.standard_normal((n, 8))
    y = np.sin(3 * x[:, 0]) + (0.1 + 0.4 * np.abs(x[:, 0])) * rng.standard_normal(n)
    return x, y


def make_records(n_valid: int, n_bad: int, seed: int = 0, shift_at: float | None = None) -> Records:
    """``n_valid`` telemetry records with ``n_bad`` malformed ones at random places.

    Regime 0 throughout, or, with ``shift_at``, an abrupt +1.5 mean shift from
    valid record ``int(shift_at * n_valid)`` on.
    """
    rng = np.random.default_rng(seed)
    x, y = regime0(n_valid, rng)
    if shift_at is not None:
        y[int(shift_at * n_valid) :] += 1.5
    good = [
        json.dumps(
            {
                "ts": 1_700_000_000 + i,
                "x": [round(float(v), 5) for v in x[i]],
                "y": round(float(y[i]), 5),
            }
        ).encode()
        for i in range(n_valid)
    ]
    total = n_valid + n_bad
    bad_pos = sorted(rng.choice(total, size=n_bad, replace=False).tolist()) if n_bad else []
    bad_set = frozenset(int(p) for p in bad_pos)
    values: list[bytes] = []
    gi = 0
    for i in range(total):
        if i in bad_set:
            values.append(BAD_PAYLOADS[len(values) % len(BAD_PAYLOADS)])
        else:
            values.append(good[gi])
            gi += 1
    return Records(values, bad_set)


def produce(bootstrap: str, topic: str, values: list[bytes]) -> None:
    """Produce ``values`` into partition 0 of ``topic``, in order, and wait for the acks."""
    with ReplayProducer(bootstrap, topic) as prod:
        for v in values:
            prod.send(v, partition=0)


def dlq_source_offsets(records: list[RawRecord]) -> list[int]:
    """Source offsets named in the headers of dead-lettered records."""
    out = []
    for r in records:
        h = dict(r.headers)
        if DLQ_SOURCE_OFFSET in h:
            out.append(int(h[DLQ_SOURCE_OFFSET]))
    return out


def dlq_reasons(records: list[RawRecord]) -> list[str]:
    """Reasons in the headers of dead-lettered records."""
    return [dict(r.headers).get(DLQ_REASON, b"").decode() for r in records]


# --------------------------------------------------------------------------
# daemon subprocesses
# --------------------------------------------------------------------------


def write_config(
    path: Path,
    *,
    bootstrap: str,
    topic: str,
    redis_url: str,
    model: str,
    prefix: str = "fogline",
    group: str | None = None,
    dlq_topic: str | None = None,
    batch_size: int = 32,
    batching: str = "count",
    steps_per_batch: int = 1,
    snapshot_every_batches: int = 4,
    snapshot_every_seconds: float = 0.0,
    lease_ttl_s: float = 2.0,
    session_timeout_ms: int = 6000,
    max_wait_ms: int = 200,
    max_poll_records: int = 2048,
    policy: str = "off",
    init_path: Path | None = None,
    lr: float | None = None,
) -> Path:
    """Write a daemon settings file (YAML) for tests and benchmarks."""
    cfg: dict[str, Any] = {
        "model_name": model,
        "metrics_port": 0,
        "log_format": "json",
        "log_level": "INFO",
        "kafka": {
            "bootstrap_servers": bootstrap,
            "topic": topic,
            "group_id": group or f"g-{model}",
            "session_timeout_ms": session_timeout_ms,
            "max_poll_records": max_poll_records,
        },
        "redis": {"url": redis_url, "prefix": prefix, "lease_ttl_s": lease_ttl_s},
        "stream": {
            "batch_size": batch_size,
            "batching": batching,
            "max_wait_ms": max_wait_ms,
            "steps_per_batch": steps_per_batch,
            "snapshot_every_batches": snapshot_every_batches,
            "snapshot_every_seconds": snapshot_every_seconds,
            "device": "cpu",
            "seed": 0,
        },
        "drift": {"policy": policy},
    }
    if init_path is not None:
        cfg["stream"]["init_path"] = str(init_path)
    if lr is not None:
        cfg["stream"]["lr"] = lr
    if dlq_topic is not None:
        cfg["kafka"]["dlq_topic"] = dlq_topic
    path.write_text(yaml.safe_dump(cfg), encoding="utf-8")
    return path


def daemon_argv(config: Path, *extra: str) -> list[str]:
    """``python -m fogline.cli run --config CONFIG --threads 1 ...``."""
    return [PYTHON, "-m", "fogline.cli", "run", "--config", str(config), "--threads", "1", *extra]


def regroup(config: Path, group: str) -> None:
    """Set ``kafka.group_id`` of a daemon settings file (YAML) in place.

    The crash run starts each daemon in a consumer group of its own.  A
    single-model daemon resumes from its snapshot's offsets, never from the
    group's, so the group id does not change what it absorbs; but Tansu's group
    coordinator can keep a group from ever assigning again once a member was
    killed during a join (docs/kafka.md, Tansu gaps), and a kill at start-up is
    one of the moments this test chooses.
    """
    cfg = yaml.safe_load(config.read_text(encoding="utf-8"))
    cfg["kafka"]["group_id"] = group
    config.write_text(yaml.safe_dump(cfg), encoding="utf-8")


def start_daemon(config: Path, log_path: Path, *extra: str) -> subprocess.Popen[bytes]:
    """Start ``fogline run`` as a subprocess, stdout+stderr appended to ``log_path``."""
    fh = open(log_path, "ab")  # noqa: SIM115 - owned by the child
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    try:
        return subprocess.Popen(
            daemon_argv(config, *extra),
            stdout=fh,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            cwd=Path(__file__).resolve().parent.parent,
        )
    finally:
        fh.close()


def log_events(log_path: Path) -> list[dict[str, Any]]:
    """The JSON log events a daemon wrote (non-JSON lines skipped)."""
    out = []
    for line in log_path.read_text(encoding="utf-8", errors="replace").splitlines():
        with contextlib.suppress(ValueError):
            ev = json.loads(line)
            if isinstance(ev, dict):
                out.append(ev)
    return out


def latest_meta(store: SnapshotStore) -> SnapshotMeta | None:
    """Metadata of the latest snapshot, or ``None`` (none yet, or Redis unreachable)."""
    try:
        return store.read_meta()
    except (SnapshotNotFound, StoreUnavailable):
        return None


@contextlib.contextmanager
def services(bootstrap: str | None, redis_url: str | None) -> Iterator[tuple[str, str]]:
    """Given service addresses, or embedded ones started for the block."""
    with contextlib.ExitStack() as stack:
        if bootstrap is None:
            bootstrap = stack.enter_context(EmbeddedKafka()).bootstrap_servers
        if redis_url is None:
            redis_url = stack.enter_context(EmbeddedRedis()).url
        yield bootstrap, redis_url


# --------------------------------------------------------------------------
# the crash run
# --------------------------------------------------------------------------


def _run_to_end(config: Path, log_path: Path, idle_exit_s: float, timeout_s: float) -> int:
    proc = start_daemon(config, log_path, "--idle-exit-s", str(idle_exit_s))
    try:
        return proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise RuntimeError(f"daemon did not finish in {timeout_s} s; see {log_path}") from None


def crash_replay(
    *,
    bootstrap: str,
    redis_url: str,
    workdir: Path,
    n_valid: int,
    n_bad: int,
    kills: int,
    batch_size: int = 32,
    steps_per_batch: int = 4,
    seed: int = 0,
    idle_exit_s: float = 3.0,
    verbose: bool = True,
    policy: str = "forget",
    shift_at: float | None = 0.5,
    autoregressive: bool = False,
) -> dict[str, Any]:
    """Run the reference and the crash run; return the result dict (see the module docstring).

    With a drift ``policy`` other than ``off`` both daemons start from the same
    warm-start file (:func:`warm_start`) and the stream shifts at ``shift_at``,
    so the kills also land in the drift loop's calibration, alarm, shifted and
    recovering phases.
    """
    from fogline.models.serialize import from_bytes, offsets_to_json, to_bytes

    rnd = random.Random(seed)
    tag = uuid.uuid4().hex[:8]
    topic = f"crash-{tag}"
    create_topic(bootstrap, topic, 1)
    drift_on = policy != "off"
    make = make_series_records if autoregressive else make_records
    recs = make(n_valid, n_bad, seed, shift_at if drift_on else None)
    warm = drift_on and not autoregressive  # AR: a fresh prior of SERIES_SPEC
    init_path = warm_start(workdir / "init.safetensors", seed + 1) if warm else None
    produce(bootstrap, topic, recs.values)
    prefix = f"crash-{tag}"

    def config(name: str) -> Path:
        path = write_config(
            workdir / f"{name}.yaml",
            bootstrap=bootstrap,
            topic=topic,
            redis_url=redis_url,
            model=name,
            prefix=prefix,
            group=f"g-{name}-{tag}",
            dlq_topic=f"{topic}.{name}.dlq",
            batch_size=batch_size,
            steps_per_batch=steps_per_batch,
            policy=policy,
            init_path=init_path,
            lr=5e-3 if drift_on else None,
        )
        if autoregressive:
            cfg = yaml.safe_load(path.read_text(encoding="utf-8"))
            cfg["model"] = SERIES_SPEC
            path.write_text(yaml.safe_dump(cfg), encoding="utf-8")
        return path

    ref_cfg, crash_cfg = config("ref"), config("crash")
    say = print if verbose else (lambda *a, **k: None)

    t0 = time.monotonic()
    rc = _run_to_end(ref_cfg, workdir / "ref.log", idle_exit_s, 600)
    say(f"reference run: exit {rc} in {time.monotonic() - t0:.1f} s")

    ref_events = log_events(workdir / "ref.log")
    modes = sorted(
        {str(e.get("to_mode")) for e in ref_events if e.get("event") == "policy_transition"}
    )
    alarms = sum(1 for e in ref_events if e.get("event") == "drift_detected")
    say(f"reference run: drift alarms {alarms}, modes entered {modes}")
    store = SnapshotStore(redis_url, "crash", prefix=prefix)
    done = 0
    log_path = workdir / "crash.log"
    t1 = time.monotonic()
    kill_moments: list[str] = []
    attempts = 0
    starts = 0
    while done < kills:
        starts += 1
        regroup(crash_cfg, f"g-crash-{tag}-{starts}")
        proc = start_daemon(crash_cfg, log_path, "--idle-exit-s", str(idle_exit_s))
        started = time.monotonic()
        before = latest_meta(store)
        base = before.records_absorbed if before else 0
        if rnd.random() < 0.25:
            # during start-up: imports, lease, restore, group join
            delay = rnd.uniform(0.2, 4.0)
            while proc.poll() is None and time.monotonic() - started < delay:
                time.sleep(0.01)
            what = f"start-up +{delay:.2f}s (absorbed {base})"
        else:
            remaining = n_valid - base
            target = base + rnd.randint(1, max(1, remaining // max(1, kills - done)))
            while proc.poll() is None and time.monotonic() - started < 120:
                meta = latest_meta(store)
                if meta is not None and meta.records_absorbed >= target:
                    break
                time.sleep(0.005)
            time.sleep(rnd.uniform(0.0, 0.05))
            meta = latest_meta(store)
            what = f"absorbed>={target} (+jitter; snapshot shows {meta.records_absorbed if meta else 0})"
        if proc.poll() is not None:
            say(f"daemon exited by itself (rc {proc.returncode}) before kill {done + 1}")
            attempts += 1
            meta = latest_meta(store)
            if attempts > 2 * kills or (meta is not None and meta.records_absorbed >= n_valid):
                break
            continue
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        done += 1
        kill_moments.append(what)
        say(f"kill {done}: {what}")
    regroup(crash_cfg, f"g-crash-{tag}-{starts + 1}")
    rc = _run_to_end(crash_cfg, log_path, idle_exit_s, 600)
    say(f"crash run: {done} kills, final exit {rc}, {time.monotonic() - t1:.1f} s")

    ref_store = SnapshotStore(redis_url, "ref", prefix=prefix)
    ref_snap = ref_store.read()
    crash_snap = store.read()
    ref_state, crash_state = from_bytes(ref_snap.blob), from_bytes(crash_snap.blob)
    identical = to_bytes(ref_state) == to_bytes(crash_state)
    params_identical = all(
        ref_state.params[k].equal(crash_state.params[k]) for k in ref_state.params
    )
    dlq = read_topic(bootstrap, f"{topic}.crash.dlq", timeout_s=20, min_records=n_bad)
    sources = dlq_source_offsets(dlq)
    missing = sorted(recs.bad_offsets - set(sources))
    details = {
        "reference_absorbed": ref_state.records_absorbed,
        "offsets": offsets_to_json(crash_state.offsets),
        "dlq_records": len(dlq),
        "dlq_duplicates": len(sources) - len(set(sources)),
        "dlq_missing": len(missing),
        "params_identical": params_identical,
        "step_count": [ref_state.step_count, crash_state.step_count],
        "kill_moments": kill_moments,
        "policy": policy,
        "reference_alarms": alarms,
        "reference_modes_entered": modes,
        "seconds": round(time.monotonic() - t0, 1),
    }
    say(json.dumps(details))
    store.close()
    ref_store.close()
    warming = SERIES_KEYS * int(SERIES_SPEC["lags"]) if autoregressive else 0
    return {
        "sent": len(recs.values),
        "valid": recs.valid,
        "absorbed": crash_state.records_absorbed,
        "dead_lettered": len(set(sources) & recs.bad_offsets),
        "kills": done,
        "identical": bool(identical),
        "policy": policy,
        "drift_mode": drift_summary(crash_state).get("mode"),
        "alarms": drift_summary(crash_state).get("alarms"),
        **({"warming": warming} if autoregressive else {}),
    }


def make_series_records(
    n_valid: int, n_bad: int, seed: int = 0, shift_at: float | None = None
) -> Records:
    """``n_valid`` ``{ts, value, key}`` records of :data:`SERIES_KEYS` interleaved AR(1) keys.

    Key k: v_t = 2k + 0.8 (v_{t-1} - 2k) + 0.3 eps, one record a minute per key;
    with ``shift_at`` every value from valid record ``int(shift_at * n_valid)`` on
    is 1.5 higher.  ``n_bad`` malformed records (:data:`BAD_SERIES`) at random places.
    """
    rng = np.random.default_rng(seed)
    last = [2.0 * k for k in range(SERIES_KEYS)]
    good = []
    for i in range(n_valid):
        k = i % SERIES_KEYS
        last[k] = 2.0 * k + 0.8 * (last[k] - 2.0 * k) + 0.3 * float(rng.standard_normal())
        v = last[k] + (1.5 if shift_at is not None and i >= int(shift_at * n_valid) else 0.0)
        rec = {"ts": 1_700_000_000 + 60 * (i // SERIES_KEYS), "key": f"k{k}", "value": round(v, 5)}
        good.append(json.dumps(rec).encode())
    total = n_valid + n_bad
    bad_pos = sorted(rng.choice(total, size=n_bad, replace=False).tolist()) if n_bad else []
    bad_set = frozenset(int(p) for p in bad_pos)
    it = iter(good)
    values = [BAD_SERIES[i % len(BAD_SERIES)] if i in bad_set else next(it) for i in range(total)]
    return Records(values, bad_set)


def warm_start(path: Path, seed: int) -> Path:
    """Fit the default model on 4,096 regime-0 rows (20 epochs) and save it to ``path``.

    The state carries a functional prior over x0 beyond the rows' range (as
    ``fogline warmstart`` states do), so the daemons stream through
    :func:`fogline.models.fprior.streaming_step` and the crash test covers that path.
    """
    import torch

    from fogline.models.config import ModelConfig
    from fogline.models.fprior import EXTRA_KEY, FunctionalPrior
    from fogline.models.serialize import save
    from fogline.models.svi import fit, init_state

    torch.set_num_threads(1)
    x, y = regime0(4096, np.random.default_rng(seed))
    state = init_state(ModelConfig.model_validate({}), seed=seed, lr=1e-2)
    res = fit(
        state,
        torch.from_numpy(x.astype(np.float32)),
        torch.from_numpy(y.astype(np.float32)),
        epochs=20,
        seed=seed,
    )
    fprior = FunctionalPrior.from_data(
        torch.from_numpy(x.astype(np.float32)), weight=0.05, scale=2.0 * float(y.std())
    )
    state = res.state.replace(extra={**res.state.extra, EXTRA_KEY: fprior.to_dict()})
    save(state, str(path))
    return path


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m fogline.bench.crash_replay``."""
    p = argparse.ArgumentParser(prog="crash_replay", description=__doc__.split("\n\n")[0])
    p.add_argument("--valid", type=int, default=20480, help="valid records (multiple of batch)")
    p.add_argument("--bad", type=int, default=600, help="malformed records")
    p.add_argument("--kills", type=int, default=12)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--steps-per-batch", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--policy",
        choices=("off", "none", "reset", "forget", "vb"),
        default="forget",
        help="drift policy of both daemons (not off: warm start + a mean shift half-way)",
    )
    p.add_argument(
        "--autoregressive",
        action="store_true",
        help="univariate {ts, value, key} records and the autoregressive spec SERIES_SPEC",
    )
    p.add_argument("--bootstrap", default=None, help="use this broker instead of an embedded one")
    p.add_argument("--redis-url", default=None, help="use this Redis instead of an embedded one")
    p.add_argument("--workdir", type=Path, default=None, help="keep configs and logs here")
    p.add_argument("--json", action="store_true", help="print the result as JSON last")
    args = p.parse_args(argv)
    if args.valid % args.batch_size:
        p.error("--valid must be a multiple of --batch-size (count-based batching)")
    with contextlib.ExitStack() as stack:
        workdir = args.workdir or Path(
            stack.enter_context(tempfile.TemporaryDirectory(prefix="fogline-crash-"))
        )
        workdir.mkdir(parents=True, exist_ok=True)
        bootstrap, redis_url = stack.enter_context(services(args.bootstrap, args.redis_url))
        result = crash_replay(
            bootstrap=bootstrap,
            redis_url=redis_url,
            workdir=workdir,
            n_valid=args.valid,
            n_bad=args.bad,
            kills=args.kills,
            batch_size=args.batch_size,
            steps_per_batch=args.steps_per_batch,
            seed=args.seed,
            policy=args.policy,
            autoregressive=args.autoregressive,
        )
    ok = (
        result["absorbed"] + result.get("warming", 0) == result["valid"]
        and result["dead_lettered"] == args.bad
        and result["identical"]
    )
    if args.json:
        print(json.dumps(result))
    else:
        print(result)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
