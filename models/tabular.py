"""Tables of the user's history: CSV, JSONL (the record format) and Parquet.

:func:`load_table` reads a file into a :class:`Table` of raw values, ordered
as a :class:`~fogline.models.spec.ModelSpec` names them: ``x`` [N, D]
(float64, ``spec.features`` order), ``y`` [N] (float64, ``spec.target``),
``ts`` [N] (int64 epoch ms, when the rows have a timestamp) and ``keys``.

Formats (by file suffix)
------------------------
* ``.csv``: a header row naming the columns; every feature and the target
  must be a column (``spec.timestamp`` / ``spec.key`` too when set).
* ``.jsonl`` / ``.ndjson``: one record per line, either flat named fields
  ``{"ts": ..., "cpu": 1.0, ..., "throughput": 3.2}`` or the wire form
  ``{"ts": ..., "x": [..] | {name: value}, "y": ..., "key": ...}`` (the
  target may also be given under its own name).  The timestamp field is
  ``spec.timestamp`` (default ``ts``), the key ``spec.key`` (default ``key``).
  Blank lines are skipped.
* ``.parquet`` / ``.pq``: columns as in CSV (needs ``pyarrow``).

Row rules (the daemon's wire rules, :mod:`fogline.daemon.stream.decode`)
------------------------------------------------------------------------
* a value is a number (CSV: text that parses as a float; JSON/Parquet: a
  number, not a bool or a string); NaN and inf are rejected, and so are values
  beyond float32's range (the model computes in float32);
* a column with transform ``log1p`` needs values > -1; a Bernoulli target is 0 or 1;
* a timestamp is a number -- |ts| < 1e11 is epoch seconds, else epoch ms --
  or an ISO-8601 string (no zone: UTC); the result is int64 epoch ms.

A bad row raises :class:`TableError` naming the file, the 1-based data row,
the file line (CSV/JSONL), the column and the reason; with
``drop_invalid=True`` such rows are skipped and counted per reason in the
:class:`LoadReport`.  A missing CSV/Parquet column is always an error.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

import torch

from fogline.models.spec import ModelSpec

#: ``|ts|`` below this is epoch seconds, at or above it epoch milliseconds.
SECONDS_LIMIT = 1e11
#: Values at or beyond this magnitude overflow float32.
F32_LIMIT = 2.0**128 - 2.0**103
#: Default record fields of the wire format.
WIRE_TS, WIRE_KEY = "ts", "key"
#: Row-rejection reasons (``LoadReport.dropped`` keys).
REASONS = (
    "missing_value",
    "non_numeric",
    "non_finite",
    "out_of_range",
    "log1p_domain",
    "not_binary",
    "bad_ts",
    "bad_key",
    "invalid_json",
    "bad_x",
)

_SUFFIXES = {
    ".csv": "csv",
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".json": "jsonl",
    ".parquet": "parquet",
    ".pq": "parquet",
}


class TableError(ValueError):
    """Bad input data: names the file, row/line and column where that applies."""


class RowError(ValueError):
    """One row does not validate: ``reason`` (a :data:`REASONS` code) and ``column``."""

    def __init__(self, reason: str, column: str | None, detail: str) -> None:
        self.reason = reason
        self.column = column
        self.detail = detail
        where = f"column {column!r}: " if column else ""
        super().__init__(f"{where}{detail}")


@dataclass(frozen=True)
class Table:
    """Raw rows in the spec's order: ``x`` [N, D] float64, ``y`` [N] float64.

    ``ts`` [N] int64 epoch ms (``None`` when the rows have no timestamp) and
    ``keys`` (``None`` when they have no key field); ``source`` names the file.
    """

    x: torch.Tensor
    y: torch.Tensor
    ts: torch.Tensor | None
    keys: list[str | None] | None
    source: str

    def __post_init__(self) -> None:
        n = self.y.shape[0]
        if self.x.dim() != 2 or self.x.shape[0] != n:
            raise ValueError(f"Table: x has shape {tuple(self.x.shape)}, y has {n} rows")
        if self.ts is not None and self.ts.shape != (n,):
            raise ValueError(f"Table: ts has shape {tuple(self.ts.shape)}, expected ({n},)")
        if self.keys is not None and len(self.keys) != n:
            raise ValueError(f"Table: {len(self.keys)} keys for {n} rows")

    @property
    def rows(self) -> int:
        """Number of rows N."""
        return int(self.y.shape[0])


@dataclass
class LoadReport:
    """What :func:`load_table` read: rows seen, kept, dropped per reason, first problems."""

    source: str
    format: str
    rows_read: int = 0
    rows_kept: int = 0
    dropped: dict[str, int] = field(default_factory=dict)
    #: The first few problems, as full messages (at most :data:`MAX_EXAMPLES`).
    examples: list[str] = field(default_factory=list)

    @property
    def rows_dropped(self) -> int:
        """Total rows skipped."""
        return sum(self.dropped.values())

    def to_json(self) -> dict[str, Any]:
        """JSON-able form (the report's ``data`` section)."""
        return {
            "source": self.source,
            "format": self.format,
            "rows_read": self.rows_read,
            "rows_kept": self.rows_kept,
            "rows_dropped": self.rows_dropped,
            "dropped": dict(sorted(self.dropped.items())),
            "examples": list(self.examples),
        }


MAX_EXAMPLES = 5


# --------------------------------------------------------------------------
# values
# --------------------------------------------------------------------------


def timestamp_ms(v: Any) -> int:
    """A timestamp value as int64 epoch ms (see the module docstring); :class:`RowError` else.

    >>> timestamp_ms(1.5), timestamp_ms(1_700_000_000_000), timestamp_ms("1970-01-01T00:00:02Z")
    (1500, 1700000000000, 2000)
    """
    if isinstance(v, datetime):
        dt = v if v.tzinfo is not None else v.replace(tzinfo=UTC)
        return round(dt.timestamp() * 1000)
    if isinstance(v, date):
        return timestamp_ms(datetime(v.year, v.month, v.day, tzinfo=UTC))
    if isinstance(v, bool) or v is None:
        raise RowError("bad_ts", None, f"timestamp is {type(v).__name__}")
    if isinstance(v, int | float):
        f = float(v)
        if not math.isfinite(f):
            raise RowError("bad_ts", None, "timestamp is not finite")
        ms = f * 1000.0 if abs(f) < SECONDS_LIMIT else f
        if abs(ms) >= 2.0**63:
            raise RowError("bad_ts", None, "timestamp out of range")
        return round(ms)
    if isinstance(v, str):
        text = v.strip()
        try:
            return timestamp_ms(float(text))
        except ValueError:
            pass
        try:
            dt = datetime.fromisoformat(text)
        except ValueError:
            raise RowError("bad_ts", None, f"{v!r} is not a number or an ISO-8601 time") from None
        return timestamp_ms(dt)
    raise RowError("bad_ts", None, f"timestamp is {type(v).__name__}")


def _number(v: Any, column: str, text_ok: bool) -> float:
    """``v`` as a finite float32-safe number, or :class:`RowError` naming ``column``."""
    if v is None or (isinstance(v, str) and not v.strip()):
        raise RowError("missing_value", column, "no value")
    if isinstance(v, bool):
        raise RowError("non_numeric", column, f"{v!r} is a bool, not a number")
    if isinstance(v, int | float):
        try:
            f = float(v)
        except OverflowError:
            raise RowError("out_of_range", column, f"{v!r} overflows a float") from None
    elif isinstance(v, str) and text_ok:
        try:
            f = float(v)
        except ValueError:
            raise RowError("non_numeric", column, f"{v!r} is not a number") from None
    else:
        shown = repr(v) if len(repr(v)) <= 40 else repr(v)[:40] + "..."
        raise RowError("non_numeric", column, f"{shown} is {type(v).__name__}, not a number")
    if not math.isfinite(f):
        raise RowError("non_finite", column, f"{v!r} is not finite")
    if abs(f) >= F32_LIMIT:
        raise RowError("out_of_range", column, f"{v!r} is beyond float32's range")
    return f


class RowParser:
    """Validate one row of named values against a spec (the rules of the module docstring).

    ``parse(get)`` takes a lookup ``get(name) -> value`` (raising ``KeyError``
    for a missing field) and returns ``(x, y, ts_ms | None, key | None)``.
    """

    def __init__(self, spec: ModelSpec, *, text_values: bool = False) -> None:
        self.spec = spec
        self.text_values = text_values
        self.features = tuple(spec.features)
        self.log1p = frozenset(
            c for c in (*spec.features, spec.target) if spec.transform_of(c) == "log1p"
        )
        self.binary = spec.likelihood == "bernoulli"

    def value(self, v: Any, column: str) -> float:
        """One feature/target value, checked."""
        f = _number(v, column, self.text_values)
        if column in self.log1p and f <= -1.0:
            raise RowError("log1p_domain", column, f"transform log1p needs values > -1, got {f!r}")
        return f

    def target(self, v: Any) -> float:
        """The target value, checked (0/1 for a Bernoulli model)."""
        y = self.value(v, self.spec.target)
        if self.binary and y not in (0.0, 1.0):
            raise RowError(
                "not_binary", self.spec.target, f"a bernoulli target is 0 or 1, got {y!r}"
            )
        return y


def _key_value(v: Any, column: str) -> str | None:
    if v is None or isinstance(v, str):
        return v
    if isinstance(v, int) and not isinstance(v, bool):
        return str(v)
    raise RowError("bad_key", column, f"key is {type(v).__name__}")


# --------------------------------------------------------------------------
# formats
# --------------------------------------------------------------------------

#: One parsed row: (x, y, ts_ms, key), or the RowError and the file line.
_Row = tuple[tuple[float, ...], float, int | None, str | None]


def _missing_columns(spec: ModelSpec, header: Sequence[str]) -> list[str]:
    need = [*spec.features, spec.target]
    need += [c for c in (spec.timestamp, spec.key) if c is not None]
    have = set(header)
    return [c for c in need if c not in have]


def _parse_named(
    parser: RowParser,
    spec: ModelSpec,
    rec: Mapping[str, Any],
    ts_field: str | None,
    key_field: str | None,
) -> _Row:
    x = tuple(parser.value(rec[f], f) for f in spec.features)
    y = parser.target(rec[spec.target])
    ts = None
    if ts_field is not None and rec.get(ts_field) not in (None, ""):
        try:
            ts = timestamp_ms(rec[ts_field])
        except RowError as exc:
            raise RowError("bad_ts", ts_field, exc.detail) from None
    elif ts_field is not None and ts_field == spec.timestamp:
        raise RowError("bad_ts", ts_field, "no timestamp")
    key = _key_value(rec.get(key_field), key_field) if key_field is not None else None
    return x, y, ts, key


def _csv_rows(path: Path, spec: ModelSpec) -> Iterator[tuple[str | None, _Row | RowError]]:
    parser = RowParser(spec, text_values=True)
    with path.open(newline="", encoding="utf-8-sig") as fh:
        reader = csv.DictReader(fh)
        header = list(reader.fieldnames or [])
        if not header:
            raise TableError(f"{path}: empty file (no header row)")
        missing = _missing_columns(spec, header)
        if missing:
            raise TableError(
                f"{path}: missing column(s) {missing} in the header (line 1); "
                f"the header has {header[:20]}"
            )
        ts_field = spec.timestamp
        key_field = spec.key
        for rec in reader:
            line = f"line {reader.line_num}"
            try:
                yield line, _parse_named(parser, spec, rec, ts_field, key_field)
            except RowError as exc:
                yield line, exc


def _jsonl_rows(path: Path, spec: ModelSpec) -> Iterator[tuple[str | None, _Row | RowError]]:
    parser = RowParser(spec)
    with path.open(encoding="utf-8-sig") as fh:
        for line_no, text in enumerate(fh, start=1):
            if text.strip():
                yield f"line {line_no}", _json_row(parser, text, None)


def _json_row(
    parser: RowParser, text: str | bytes | None, default_ts_ms: int | None
) -> _Row | RowError:
    """One JSON record (text or UTF-8 bytes), or the reason it is bad.

    A record without a timestamp field takes ``default_ts_ms`` (a Kafka
    record's timestamp) when that is given.
    """
    spec = parser.spec
    if not text:
        return RowError("invalid_json", None, "empty record")
    try:
        obj = json.loads(text)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError, UnicodeDecodeError
        why = getattr(exc, "msg", type(exc).__name__)
        return RowError("invalid_json", None, f"not valid JSON ({why})")
    if not isinstance(obj, dict):
        return RowError("invalid_json", None, f"a record is an object, got {type(obj).__name__}")
    ts_field = spec.timestamp or WIRE_TS
    if obj.get(ts_field) is None and default_ts_ms is not None and default_ts_ms >= 0:
        obj = {**obj, ts_field: int(default_ts_ms)}
    try:
        return _parse_record(parser, spec, obj, spec.features, ts_field, spec.key or WIRE_KEY)
    except RowError as exc:
        return exc


def records_table(
    records: Iterable[tuple[str, bytes | str | None, int | None]],
    spec: ModelSpec,
    drop_invalid: bool = False,
    source: str = "records",
) -> tuple[Table, LoadReport]:
    """:func:`load_table` for JSON record values, e.g. a Kafka topic's history.

    ``records`` yields ``(where, value, timestamp_ms)``: ``where`` names the
    record in errors (``"topic:partition@offset"``), ``timestamp_ms`` stands in
    for a missing timestamp field (``None``: none).
    """
    spec = series_view(spec)
    parser = RowParser(spec)
    rows = ((where, _json_row(parser, value, ts)) for where, value, ts in records)
    return _collect(rows, spec, LoadReport(source, "records"), drop_invalid)


def _parse_record(
    parser: RowParser,
    spec: ModelSpec,
    obj: Mapping[str, Any],
    feats: Sequence[str],
    ts_field: str,
    key_field: str,
) -> _Row:
    """One JSON record: flat named fields, or the wire form with ``x`` (list or object)."""
    if "x" in obj and not all(f in obj for f in feats):
        xv = obj["x"]
        if isinstance(xv, list):
            if len(xv) != len(feats):
                raise RowError(
                    "bad_x", "x", f"{len(xv)} values, the model has {len(feats)} features"
                )
            x = tuple(parser.value(v, f) for f, v in zip(feats, xv, strict=True))
        elif isinstance(xv, dict):
            missing = [f for f in feats if f not in xv]
            if missing:
                raise RowError("missing_value", missing[0], f"x has no field(s) {missing}")
            x = tuple(parser.value(xv[f], f) for f in feats)
        else:
            raise RowError("bad_x", "x", f"x is {type(xv).__name__}, not a list or an object")
        target_field = spec.target if spec.target in obj else "y"
    else:
        missing = [f for f in (*feats, spec.target) if f not in obj]
        if missing:
            raise RowError("missing_value", missing[0], f"the record has no field(s) {missing}")
        x = tuple(parser.value(obj[f], f) for f in feats)
        target_field = spec.target
    if target_field not in obj:
        raise RowError("missing_value", spec.target, f"the record has no {spec.target!r} (or 'y')")
    y = parser.target(obj[target_field])
    ts = None
    if obj.get(ts_field) is not None:
        try:
            ts = timestamp_ms(obj[ts_field])
        except RowError as exc:
            raise RowError("bad_ts", ts_field, exc.detail) from None
    elif spec.timestamp is not None:
        raise RowError("bad_ts", ts_field, "no timestamp")
    key = _key_value(obj.get(key_field), key_field)
    return x, y, ts, key


def _parquet_rows(path: Path, spec: ModelSpec) -> Iterator[tuple[str | None, _Row | RowError]]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise TableError(
            f"{path}: reading Parquet needs the package 'pyarrow' (pip install pyarrow)"
        ) from None
    try:
        table = pq.read_table(path)
    except Exception as exc:  # ArrowInvalid, OSError, ...
        raise TableError(f"{path}: cannot read Parquet ({type(exc).__name__}: {exc})") from None
    header = list(table.column_names)
    missing = _missing_columns(spec, header)
    if missing:
        raise TableError(f"{path}: missing column(s) {missing}; the file has {header[:20]}")
    wanted = [*spec.features, spec.target, *(c for c in (spec.timestamp, spec.key) if c)]
    cols = {c: table.column(c).to_pylist() for c in dict.fromkeys(wanted)}
    parser = RowParser(spec)
    for i in range(table.num_rows):
        rec = {c: v[i] for c, v in cols.items()}
        try:
            yield None, _parse_named(parser, spec, rec, spec.timestamp, spec.key)
        except RowError as exc:
            yield None, exc


_READERS: dict[str, Callable[[Path, ModelSpec], Iterator[tuple[str | None, _Row | RowError]]]] = {
    "csv": _csv_rows,
    "jsonl": _jsonl_rows,
    "parquet": _parquet_rows,
}


def file_format(path: str | Path) -> str:
    """``csv``, ``jsonl`` or ``parquet`` from the suffix; :class:`TableError` for others."""
    suffix = Path(path).suffix.lower()
    if suffix not in _SUFFIXES:
        raise TableError(
            f"{path}: unknown file type {suffix!r} (use .csv, .jsonl/.ndjson or .parquet)"
        )
    return _SUFFIXES[suffix]


def series_view(spec: ModelSpec) -> ModelSpec:
    """The columns to read for ``spec``: itself, or for an autoregressive spec no features.

    An autoregressive model's rows are ``{timestamp, target, key}``; its inputs
    (lags, calendar) are built from them afterwards
    (:func:`fogline.models.autoregressive.features_for`), so the table has
    ``x`` [N, 0] and ``y`` the raw values, in file order.
    """
    if spec.mode != "autoregressive":
        return spec
    kept = {c: t for c, t in spec.transforms.items() if c == spec.target}
    return spec.model_copy(update={"features": (), "transforms": kept})


def load_table(
    path: str | Path, spec: ModelSpec, drop_invalid: bool = False
) -> tuple[Table, LoadReport]:
    """Read ``path`` (CSV, JSONL or Parquet) into a :class:`Table` ordered by ``spec``.

    An autoregressive spec reads only its timestamp, target and key columns
    (:func:`series_view`).

    Raises :class:`TableError` for a missing file or column, and for the first
    bad row unless ``drop_invalid`` (then bad rows are counted per reason in
    the :class:`LoadReport`).  A table with no valid row is always an error.
    """
    p = Path(path)
    fmt = file_format(p)
    if not p.is_file():
        raise TableError(f"{p}: no such file")
    spec = series_view(spec)
    return _collect(_READERS[fmt](p, spec), spec, LoadReport(str(p), fmt), drop_invalid)


def _collect(
    rows: Iterable[tuple[str | None, _Row | RowError]],
    spec: ModelSpec,
    report: LoadReport,
    drop_invalid: bool,
) -> tuple[Table, LoadReport]:
    """Gather validated rows into a :class:`Table`, raising or counting the bad ones."""
    src = report.source
    xs: list[tuple[float, ...]] = []
    ys: list[float] = []
    ts: list[int | None] = []
    keys: list[str | None] = []
    for where, row in rows:
        report.rows_read += 1
        if isinstance(row, RowError):
            at = f"row {report.rows_read}" + (f" ({where})" if where is not None else "")
            message = f"{src}: {at}: {row} [{row.reason}]"
            if not drop_invalid:
                raise TableError(message + "; --drop-invalid skips such rows")
            report.dropped[row.reason] = report.dropped.get(row.reason, 0) + 1
            if len(report.examples) < MAX_EXAMPLES:
                report.examples.append(message)
            continue
        x, y, t, k = row
        xs.append(x)
        ys.append(y)
        ts.append(t)
        keys.append(k)
    report.rows_kept = len(ys)
    if not ys:
        why = f" ({report.rows_dropped} invalid: {report.dropped})" if report.dropped else ""
        raise TableError(f"{src}: no valid rows{why}")
    has_ts = [t is not None for t in ts]
    ts_t: torch.Tensor | None = None
    if all(has_ts):
        ts_t = torch.tensor(ts, dtype=torch.int64)
    elif any(has_ts):
        row_no = has_ts.index(False) + 1
        raise TableError(
            f"{src}: kept row {row_no} has no timestamp while others have one; "
            "give every row a timestamp or none"
        )
    table = Table(
        torch.tensor(xs, dtype=torch.float64).reshape(len(ys), len(spec.features)),
        torch.tensor(ys, dtype=torch.float64),
        ts_t,
        keys if any(k is not None for k in keys) else None,
        src,
    )
    return table, report


__all__ = [
    "REASONS",
    "LoadReport",
    "RowError",
    "RowParser",
    "Table",
    "TableError",
    "file_format",
    "load_table",
    "records_table",
    "series_view",
    "timestamp_ms",
]
