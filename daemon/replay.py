"""Replay a historical stream from a file into a Kafka topic (``fogline replay``).

Input formats (``fmt="auto"`` picks by extension and CSV header):

``jsonl``
    fogline records, one JSON object per line (``.jsonl``, ``.ndjson``,
    ``.json``).  Each non-blank line is sent **as is** -- a malformed line is
    replayed too, so dead-letter handling can be exercised.  The Kafka
    timestamp comes from the line's ``ts`` and the key from its
    ``key_field`` (default ``key``) when they parse.
``csv``
    a header row, feature columns, a ``y`` column, optionally ``ts`` (or
    ``timestamp``) and the key column.  Each row becomes
    ``{"ts": ..., "x": {feature: value, ...}, "y": ..., "key": ...}``; a cell
    that is not a number is passed on as a string (and dead-lettered by the
    daemon), never silently dropped.

    With a model spec (``spec``: the settings' ``model`` section, ``fogline
    replay --config``) the columns are the spec's: the header must hold every
    feature and the target (a missing one is named), the timestamp column is
    ``spec.timestamp`` (else ``ts``/``timestamp``/``time`` when present), the
    key column ``spec.key`` (else ``key_field``), other columns are left out.
    Each row becomes a flat named record, ``{"<timestamp>": ..., "<feature>":
    value, ..., "<target>": value, "<key>": ...}``, with the row's own time as
    the Kafka timestamp.  JSONL lines are sent as they are; their time and key
    are read from the spec's fields.  An autoregressive spec (``mode =
    "autoregressive"``) needs only its timestamp, target and key columns: each
    row is sent as ``{"<timestamp>": ..., "<target>": value, "<key>": ...}``
    (a NAB ``timestamp,value`` file too, unlagged) and the daemon builds the
    lags, keyed by the row's key (also the Kafka key, so a key stays in one
    partition, in order).
``nab``
    a Numenta Anomaly Benchmark file, header ``timestamp,value``.  Values are
    standardised with the mean and standard deviation of the first 15 % of
    rows (NAB's probationary period, so no look-ahead), and each row from the
    ``lags``-th on becomes ``x = [z[t-lags], ..., z[t-1]]`` (features
    ``lag{lags}`` ... ``lag1``, see :func:`nab_features`), ``y = z[t]``,
    ``ts`` the row's timestamp (UTC) and key the file's stem.

Pacing: ``speed=None`` sends as fast as possible; ``speed=X`` sleeps so that
records leave at ``X`` times the pace of their timestamps (the gap between
two records is ``(ts2 - ts1) / X``).  Record timestamps and keys are kept.
"""

from __future__ import annotations

import csv
import json
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from fogline.daemon.stream.decode import DecodeError, Record, encode, parse_ts
from fogline.models.spec import ModelSpec
from fogline.models.tabular import series_view

Format = Literal["auto", "jsonl", "csv", "nab"]
FORMATS: tuple[str, ...] = ("auto", "jsonl", "csv", "nab")
#: Share of a NAB file used to standardise it (NAB's probationary period).
NAB_PROBATION = 0.15
_TS_COLUMNS = ("ts", "timestamp", "time")


@dataclass(frozen=True, slots=True)
class ReplayItem:
    """One record to produce: the value bytes, its key and timestamp (epoch ms)."""

    value: bytes
    key: str | None
    ts_ms: int | None


@dataclass(frozen=True, slots=True)
class ReplaySummary:
    """What a replay did."""

    topic: str
    records: int
    seconds: float
    fmt: str

    @property
    def records_per_s(self) -> float:
        """Records produced per wall-clock second."""
        return self.records / self.seconds if self.seconds > 0 else float("inf")

    def as_dict(self) -> dict[str, Any]:
        """JSON-able summary."""
        return {
            "topic": self.topic,
            "records": self.records,
            "seconds": round(self.seconds, 3),
            "records_per_s": round(self.records_per_s, 1),
            "format": self.fmt,
        }


def nab_features(lags: int) -> list[str]:
    """Feature names of NAB lagged records: ``["lag{lags}", ..., "lag1"]``."""
    return [f"lag{k}" for k in range(lags, 0, -1)]


def detect_format(path: str | Path) -> Literal["jsonl", "csv", "nab"]:
    """``jsonl`` by extension; for CSV, ``nab`` when the header is ``timestamp,value``."""
    p = Path(path)
    suffix = p.suffix.lower()
    if suffix in (".jsonl", ".ndjson", ".json"):
        return "jsonl"
    if suffix in (".csv", ".tsv", ".txt"):
        with p.open(newline="", encoding="utf-8") as f:
            header = next(csv.reader(f), [])
        cols = [c.strip().lower() for c in header]
        return "nab" if cols == ["timestamp", "value"] else "csv"
    # no telling extension: sniff the first non-blank character
    with p.open("rb") as fb:
        for line in fb:
            if line.strip():
                return "jsonl" if line.lstrip().startswith(b"{") else "csv"
    return "jsonl"


def _ts_or_none(v: Any) -> int | None:
    try:
        return parse_ts(v)
    except DecodeError:
        return None


def _key_or_none(v: Any) -> str | None:
    if v is None:
        return None
    if isinstance(v, str):
        return v
    if isinstance(v, int) and not isinstance(v, bool):
        return str(v)
    return None


def read_jsonl(
    path: str | Path, key_field: str = "key", ts_field: str = "ts"
) -> Iterator[ReplayItem]:
    """Items of a fogline JSONL file; every non-blank line is kept verbatim."""
    with Path(path).open("rb") as f:
        for line in f:
            value = line.strip()
            if not value:
                continue
            ts = key = None
            try:
                obj = json.loads(value)
            except (ValueError, RecursionError):
                obj = None
            if isinstance(obj, dict):
                ts = _ts_or_none(obj.get(ts_field, obj.get("ts")))
                key = _key_or_none(obj.get(key_field))
            yield ReplayItem(value, key, ts)


def _cell(text: str) -> float | str:
    try:
        return float(text)
    except ValueError:
        return text


def read_csv(path: str | Path, key_field: str = "key") -> Iterator[ReplayItem]:
    """Items of a CSV file with a header (feature columns, ``y``, optional ts and key)."""
    with Path(path).open(newline="", encoding="utf-8") as f:
        reader = csv.reader(f)
        header = [c.strip() for c in next(reader, [])]
        if "y" not in header:
            raise ValueError(f"{path}: CSV header has no 'y' column: {header}")
        ts_col = next((c for c in _TS_COLUMNS if c in header), None)
        special = {"y", key_field} | ({ts_col} if ts_col else set())
        features = [c for c in header if c not in special]
        idx = {c: i for i, c in enumerate(header)}
        for row in reader:
            if not row or all(not c.strip() for c in row):
                continue
            if len(row) != len(header):
                # keep the record: the daemon dead-letters it with a reason
                yield ReplayItem(",".join(row).encode(), None, None)
                continue
            key = row[idx[key_field]] if key_field in idx else None
            obj: dict[str, Any] = {
                "x": {c: _cell(row[idx[c]]) for c in features},
                "y": _cell(row[idx["y"]]),
            }
            ts = None
            if ts_col:
                obj["ts"] = _cell(row[idx[ts_col]].strip())
                ts = _ts_or_none(obj["ts"])
            if key is not None:
                obj["key"] = key
            yield ReplayItem(encode(obj), key, ts)


def read_spec_csv(
    path: str | Path, spec: ModelSpec, key_field: str = "key"
) -> Iterator[ReplayItem]:
    """Flat named records of a CSV file, by the columns of ``spec`` (see the module doc)."""
    with Path(path).open(newline="", encoding="utf-8") as f:
        reader = csv.reader(f)
        header = [c.strip() for c in next(reader, [])]
        idx = {c: i for i, c in enumerate(header)}
        need = [*series_view(spec).features, spec.target]  # autoregressive: the target only
        missing = [c for c in need if c not in idx]
        for name in (spec.timestamp, spec.key):
            if name is not None and name not in idx:
                missing.append(name)
        if missing:
            raise ValueError(
                f"{path}: CSV header lacks the model's columns {missing} (header {header}); "
                "the model section of the settings names them"
            )
        ts_col = spec.timestamp or next((c for c in _TS_COLUMNS if c in idx), None)
        ts_name = spec.timestamp or "ts"
        key_col = spec.key or (key_field if key_field in idx else None)
        key_name = spec.key or "key"
        for row in reader:
            if not row or all(not c.strip() for c in row):
                continue
            if len(row) != len(header):
                # keep the record: the daemon dead-letters it with a reason
                yield ReplayItem(",".join(row).encode(), None, None)
                continue
            obj: dict[str, Any] = {}
            ts = None
            if ts_col is not None:
                obj[ts_name] = _cell(row[idx[ts_col]].strip())
                ts = _ts_or_none(obj[ts_name])
            for c in need:
                obj[c] = _cell(row[idx[c]])
            key = row[idx[key_col]] if key_col is not None else None
            if key is not None:
                obj[key_name] = key
            yield ReplayItem(encode(obj), key, ts)


def nab_records(path: str | Path, lags: int = 8) -> list[Record]:
    """Lagged, standardised records of a NAB ``timestamp,value`` file (see module doc)."""
    if lags < 1:
        raise ValueError("lags must be >= 1")
    stamps: list[int] = []
    values: list[float] = []
    with Path(path).open(newline="", encoding="utf-8") as f:
        reader = csv.reader(f)
        header = [c.strip().lower() for c in next(reader, [])]
        if header != ["timestamp", "value"]:
            raise ValueError(f"{path}: not a NAB file (header {header})")
        for row in reader:
            if len(row) != 2:
                continue
            try:
                dt = datetime.fromisoformat(row[0].strip())
                v = float(row[1])
            except ValueError:
                continue
            if not math.isfinite(v):
                continue
            if dt.tzinfo is None:
                dt = dt.replace(tzinfo=UTC)
            stamps.append(round(dt.timestamp() * 1000))
            values.append(v)
    n_prob = max(2, math.ceil(NAB_PROBATION * len(values)))
    head = values[:n_prob]
    mean = sum(head) / len(head) if head else 0.0
    var = sum((v - mean) ** 2 for v in head) / max(1, len(head) - 1)
    std = math.sqrt(var) if var > 0 else 1.0
    z = [(v - mean) / std for v in values]
    key = Path(path).stem
    return [Record(tuple(z[t - lags : t]), z[t], stamps[t], key) for t in range(lags, len(values))]


def read_nab(path: str | Path, lags: int = 8) -> Iterator[ReplayItem]:
    """Items of a NAB file (see :func:`nab_records`)."""
    for rec in nab_records(path, lags):
        yield ReplayItem(encode(rec), rec.key, rec.ts_ms)


def iter_items(
    path: str | Path,
    fmt: Format = "auto",
    *,
    key_field: str = "key",
    lags: int = 8,
    spec: ModelSpec | None = None,
) -> tuple[str, Iterator[ReplayItem]]:
    """The resolved format and the items of ``path`` (by the columns of ``spec`` when given)."""
    resolved = detect_format(path) if fmt == "auto" else fmt
    if resolved == "nab" and spec is not None and spec.mode == "autoregressive":
        resolved = "csv"  # a timestamp,value file sent as it is: the daemon builds the lags
    if resolved == "jsonl":
        if spec is not None:
            return resolved, read_jsonl(path, spec.key or key_field, spec.timestamp or "ts")
        return resolved, read_jsonl(path, key_field)
    if resolved == "csv":
        if spec is not None:
            return resolved, read_spec_csv(path, spec, key_field)
        return resolved, read_csv(path, key_field)
    if resolved == "nab":
        return resolved, read_nab(path, lags)
    raise ValueError(f"unknown format {fmt!r}; choose one of {FORMATS}")


def count_items(path: str | Path, fmt: str, lags: int = 8) -> int | None:
    """Cheap upper bound on the item count (non-blank lines, minus a header), for progress."""
    try:
        with Path(path).open("rb") as f:
            n = sum(1 for line in f if line.strip())
    except OSError:
        return None
    return max(0, n - {"csv": 1, "nab": 1 + lags}.get(fmt, 0))


class Pacer:
    """Sleeps so records leave at ``speed`` times the pace of their timestamps.

    ``sleep`` and ``clock`` are injectable for tests.
    """

    def __init__(
        self,
        speed: float | None,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        if speed is not None and not speed > 0:
            raise ValueError("speed must be > 0")
        self.speed = speed
        self._clock = clock
        self._sleep = sleep
        self._t0: tuple[int, float] | None = None  # (first ts_ms, wall time then)

    def wait(self, ts_ms: int | None) -> float:
        """Sleep until the record at ``ts_ms`` is due; return the seconds slept."""
        if self.speed is None or ts_ms is None:
            return 0.0
        if self._t0 is None:
            self._t0 = (ts_ms, self._clock())
            return 0.0
        ts0, wall0 = self._t0
        due = wall0 + (ts_ms - ts0) / 1000.0 / self.speed
        delay = due - self._clock()
        if delay > 0:
            self._sleep(delay)
            return delay
        return 0.0


def produce_items(
    items: Iterator[ReplayItem] | Sequence[ReplayItem],
    producer: Any,
    *,
    speed: float | None = None,
    limit: int | None = None,
    on_progress: Callable[[int], None] | None = None,
    pacer: Pacer | None = None,
) -> int:
    """Send ``items`` through ``producer`` (``send(value, key=, timestamp_ms=)``, ``flush()``).

    Returns the number sent, after a final flush.  Kafka timestamps before
    the epoch are not allowed, so such records go without one (the broker
    stamps them) but keep their ``ts`` in the value.
    """
    pace = pacer or Pacer(speed)
    n = 0
    for item in items:
        if limit is not None and n >= limit:
            break
        pace.wait(item.ts_ms)
        ts = item.ts_ms if item.ts_ms is not None and item.ts_ms >= 0 else None
        producer.send(item.value, key=item.key, timestamp_ms=ts)
        n += 1
        if on_progress is not None and n % 500 == 0:
            on_progress(n)
    producer.flush()
    if on_progress is not None:
        on_progress(n)
    return n


def replay_file(
    path: str | Path,
    bootstrap_servers: str,
    topic: str,
    *,
    fmt: Format = "auto",
    speed: float | None = None,
    key_field: str = "key",
    lags: int = 8,
    partitions: int = 1,
    limit: int | None = None,
    progress: bool = False,
    spec: ModelSpec | None = None,
    **client_kwargs: Any,
) -> ReplaySummary:
    """Replay ``path`` into ``topic`` (created with ``partitions`` if missing).

    ``progress=True`` shows a rich progress bar on stderr; ``spec`` reads
    the model's named columns (see the module doc).
    """
    from fogline.daemon.stream.source import ReplayProducer, create_topic

    resolved, items = iter_items(path, fmt, key_field=key_field, lags=lags, spec=spec)
    if resolved == "csv" and spec is not None:
        items = _peeked(items)  # a header problem fails before the topic is created
    create_topic(bootstrap_servers, topic, partitions, **client_kwargs)
    start = time.monotonic()
    with ReplayProducer(bootstrap_servers, topic, **client_kwargs) as producer:
        if progress:
            n = _with_progress(path, resolved, items, producer, speed, limit, lags)
        else:
            n = produce_items(items, producer, speed=speed, limit=limit)
    return ReplaySummary(topic, n, time.monotonic() - start, resolved)


def _peeked(items: Iterator[ReplayItem]) -> Iterator[ReplayItem]:
    """``items`` with its first element read now (so a bad header raises here)."""
    first = next(items, None)

    def chain() -> Iterator[ReplayItem]:
        if first is not None:
            yield first
        yield from items

    return chain()


def _with_progress(
    path: str | Path,
    fmt: str,
    items: Iterator[ReplayItem],
    producer: Any,
    speed: float | None,
    limit: int | None,
    lags: int,
) -> int:
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    total = count_items(path, fmt, lags)
    if total is not None and limit is not None:
        total = min(total, limit)
    console = Console(stderr=True)
    with Progress(
        TextColumn("[bold]replay[/] {task.fields[name]}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[rate]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=False,
    ) as bar:
        task = bar.add_task("replay", total=total, name=Path(path).name, rate="")
        t0 = time.monotonic()

        def update(n: int) -> None:
            dt = time.monotonic() - t0
            bar.update(task, completed=n, rate=f"{n / dt:,.0f} rec/s" if dt > 0 else "")

        return produce_items(items, producer, speed=speed, limit=limit, on_progress=update)
