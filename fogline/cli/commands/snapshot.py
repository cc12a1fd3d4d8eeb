"""``fogline snapshot list|show|diff|rollback|models``: inspect and repoint snapshots.

Every action takes ``--config PATH``, ``--redis-url URL`` and ``--model NAME``
(the flags override the settings).  Exit codes: 0 done; 1 the store failed
(Redis unreachable, no such version, corrupt blob), with a one-line message;
2 invalid configuration.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from fogline.daemon.config import Settings
    from fogline.daemon.stream.store import SnapshotMeta, SnapshotStore

Handler = Callable[[argparse.Namespace], int]


def register(sub: argparse._SubParsersAction[Any]) -> None:
    """Add ``snapshot list|show|diff|rollback|models`` to the fogline parser."""
    parser = sub.add_parser("snapshot", help="list, show, diff or roll back posterior snapshots")
    parser.set_defaults(func=lambda _a: _usage(parser))
    ssub = parser.add_subparsers(dest="snapshot_command", metavar="ACTION")

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--config", metavar="PATH", help="YAML or TOML settings file")
        p.add_argument("--redis-url", metavar="URL", help="overrides redis.url")
        p.add_argument("--model", metavar="NAME", help="overrides model_name")

    p = ssub.add_parser("list", help="kept versions, newest first")
    common(p)
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=_wrap(_list))

    p = ssub.add_parser("show", help="metadata and tensor summary of one version")
    common(p)
    p.add_argument("version", nargs="?", type=int, help="version (default: latest)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=_wrap(_show))

    p = ssub.add_parser("diff", help="what changed between two versions")
    common(p)
    p.add_argument("a", type=int, help="older version")
    p.add_argument("b", nargs="?", type=int, help="newer version (default: latest)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=_wrap(_diff))

    p = ssub.add_parser("rollback", help="point 'latest' at an earlier version (atomic, logged)")
    common(p)
    p.add_argument("version", type=int, help="version to make latest")
    p.set_defaults(func=_wrap(_rollback))

    p = ssub.add_parser("models", help="model names with snapshots under the prefix")
    common(p)
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=_wrap(_models))


def _usage(parser: argparse.ArgumentParser) -> int:
    parser.print_help(sys.stderr)
    return 2


def _wrap(action: Callable[[argparse.Namespace, Settings, SnapshotStore], int]) -> Handler:
    """Load settings, open the store, run ``action``; store errors -> one line, exit 1."""

    def handler(args: argparse.Namespace) -> int:
        from fogline.daemon.config import load_or_exit
        from fogline.daemon.logs import configure
        from fogline.daemon.stream.store import SnapshotStore, StoreError

        settings = load_or_exit(args.config)
        settings = settings.override({"redis.url": args.redis_url, "model_name": args.model})
        configure(settings.log_format, settings.log_level)
        try:
            with SnapshotStore.from_settings(settings) as store:
                return action(args, settings, store)
        except StoreError as exc:
            print(f"fogline: error: {exc}", file=sys.stderr)
            return 1

    return handler


# --------------------------------------------------------------------------
# actions
# --------------------------------------------------------------------------
def _list(args: argparse.Namespace, settings: Settings, store: SnapshotStore) -> int:
    metas = store.list_versions()
    latest = store.latest_version()
    if args.json:
        rows = [{**_meta_json(m), "latest": m.version == latest} for m in metas]
        print(json.dumps(rows, indent=2))
        return 0
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"snapshots of {store.model_name!r} ({store.url})")
    for col in ("version", "created (UTC)", "records", "offsets", "size", "checksum", "writer"):
        right = col in ("version", "records", "size")
        table.add_column(
            col,
            justify="right" if right else "left",
            no_wrap=col != "offsets",
            min_width=14 if col == "offsets" else None,
        )
    for m in metas:
        mark = " *" if m.version == latest else ""
        table.add_row(
            f"{m.version}{mark}",
            _iso(m.created_at),
            f"{m.records_absorbed:,}",
            _offsets_text(m.offsets),
            _size(m.size),
            m.checksum[:8],
            m.writer,
        )
    console = Console()
    if not console.is_terminal:  # piped: do not squeeze the table into 80 columns
        console = Console(width=160)
    if not metas:
        console.print(f"model {store.model_name!r} has no snapshots at {store.url}")
        return 0
    console.print(table)
    console.print(f"* latest = {latest}")
    return 0


def _show(args: argparse.Namespace, settings: Settings, store: SnapshotStore) -> int:
    snap = store.read(args.version)
    summary = _tensor_summary(snap.blob)
    latest = store.latest_version()
    if args.json:
        out = {**_meta_json(snap.meta), "latest": snap.meta.version == latest, **summary}
        print(json.dumps(out, indent=2))
        return 0
    from rich.console import Console
    from rich.table import Table

    console = Console()
    m = snap.meta
    console.print(
        f"[bold]{m.model_name}[/bold] v{m.version}" + (" (latest)" if m.version == latest else "")
    )
    for key, value in _meta_json(m).items():
        if key in ("model_name", "version"):
            continue
        console.print(f"  {key}: {json.dumps(value) if isinstance(value, dict) else value}")
    if summary.get("state"):
        console.print(f"  state: {json.dumps(summary['state'])}")
    if summary.get("note"):
        console.print(f"  [yellow]{summary['note']}[/yellow]")
    if summary["tensors"]:
        table = Table(title="tensors")
        for col in ("name", "dtype", "shape", "L2 norm"):
            table.add_column(col, justify="right" if col == "L2 norm" else "left")
        for t in summary["tensors"]:
            norm = "-" if t["norm"] is None else f"{t['norm']:.6g}"
            table.add_row(t["name"], t["dtype"], str(tuple(t["shape"])), norm)
        console.print(table)
    return 0


def _diff(args: argparse.Namespace, settings: Settings, store: SnapshotStore) -> int:
    b_version = args.b if args.b is not None else store.latest_version()
    a, b = store.read(args.a), store.read(b_version)
    ma, mb = _meta_json(a.meta), _meta_json(b.meta)
    changed = {
        k: [ma.get(k), mb.get(k)] for k in sorted(ma.keys() | mb.keys()) if ma.get(k) != mb.get(k)
    }
    keys = sorted(a.meta.offsets.keys() | b.meta.offsets.keys())
    offsets_delta = {
        k: b.meta.offsets.get(k, 0) - a.meta.offsets.get(k, 0)
        for k in keys
        if a.meta.offsets.get(k) != b.meta.offsets.get(k)
    }
    distances, note = _tensor_distances(a.blob, b.blob)
    out: dict[str, Any] = {
        "model": store.model_name,
        "a": a.meta.version,
        "b": b.meta.version,
        "records_absorbed_delta": b.meta.records_absorbed - a.meta.records_absorbed,
        "offsets_delta": offsets_delta,
        "changed": changed,
        "param_l2_distance": distances,
    }
    if note:
        out["note"] = note
    if args.json:
        print(json.dumps(out, indent=2))
        return 0
    from rich.console import Console

    console = Console()
    console.print(f"[bold]{store.model_name}[/bold] v{a.meta.version} -> v{b.meta.version}")
    console.print(f"  records absorbed: {out['records_absorbed_delta']:+,}")
    for k, d in offsets_delta.items():
        console.print(f"  offset {k}: {d:+,}")
    for k, (va, vb) in changed.items():
        if k not in ("offsets", "records_absorbed"):
            console.print(f"  {k}: {_short(va)} -> {_short(vb)}")
    for name, dist in distances.items():
        console.print(f"  ||{name}_b - {name}_a||_2 = {dist:.6g}")
    if note:
        console.print(f"  [yellow]{note}[/yellow]")
    return 0


def _rollback(args: argparse.Namespace, settings: Settings, store: SnapshotStore) -> int:
    previous = store.latest_version()
    meta = store.rollback(args.version)
    print(
        f"model {store.model_name!r}: latest v{previous} -> v{meta.version} "
        f"({meta.records_absorbed:,} records, written {_iso(meta.created_at)})"
    )
    holder = store.lease_owner()
    if holder is not None:
        print(
            f"warning: {holder!r} holds the writer lease and will write newer versions "
            "on top of this rollback; stop it first to keep the rollback",
            file=sys.stderr,
        )
    return 0


def _models(args: argparse.Namespace, settings: Settings, store: SnapshotStore) -> int:
    names = store.list_models()
    print(json.dumps(names) if args.json else "\n".join(names))
    return 0


# --------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------
def _meta_json(meta: SnapshotMeta) -> dict[str, Any]:
    return meta.model_dump(mode="json", by_alias=True)


def _iso(ts: float) -> str:
    return dt.datetime.fromtimestamp(ts, tz=dt.UTC).strftime("%Y-%m-%d %H:%M:%S")


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB"):
        if n < 1024 or unit == "MiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024  # type: ignore[assignment]
    return str(n)


def _offsets_text(offsets: dict[str, int]) -> str:
    text = ", ".join(f"{k}={v}" for k, v in sorted(offsets.items()))
    return text if len(text) <= 40 else text[:39] + "…"


def _short(value: Any) -> str:
    text = json.dumps(value) if isinstance(value, dict | list) else str(value)
    return text if len(text) <= 60 else text[:59] + "…"


def _load_tensors(blob: bytes) -> tuple[dict[str, Any], dict[str, Any], str]:
    """Tensors of a blob, a small dict of state facts, and a note on any problem.

    Uses :mod:`fogline.models.serialize` when it is installed (verifying the state),
    else reads the blob as a plain safetensors file.
    """
    try:
        from fogline.models.serialize import from_bytes, read_header, state_tensors
    except ImportError:
        return _plain_safetensors(blob, "models.serialize not available: raw safetensors view")
    try:
        header = read_header(blob)
        tensors: dict[str, Any] = state_tensors(from_bytes(blob))
    except Exception as exc:  # any decode failure becomes a note, not a crash
        return _plain_safetensors(blob, f"not a loadable fogline state: {exc}")
    return tensors, {k: header[k] for k in ("lr", "step_count") if k in header}, ""


def _plain_safetensors(blob: bytes, note: str) -> tuple[dict[str, Any], dict[str, Any], str]:
    try:
        from safetensors.torch import load
    except ImportError:  # pragma: no cover - torch/safetensors are dependencies
        return {}, {}, note + "; safetensors/torch missing (pip install fogline)"
    try:
        return dict(load(blob)), {}, note
    except Exception as exc:
        return {}, {}, f"{note}; blob is not safetensors ({type(exc).__name__})"


def _tensor_summary(blob: bytes) -> dict[str, Any]:
    tensors, facts, note = _load_tensors(blob)
    rows = []
    for name in sorted(tensors):
        t = tensors[name]
        norm = float(t.double().norm()) if t.is_floating_point() else None
        rows.append(
            {
                "name": name,
                "dtype": str(t.dtype).removeprefix("torch."),
                "shape": list(t.shape),
                "norm": norm if norm is None or math.isfinite(norm) else str(norm),
            }
        )
    out: dict[str, Any] = {"tensors": rows, "state": facts}
    if note:
        out["note"] = note
    return out


def _tensor_distances(blob_a: bytes, blob_b: bytes) -> tuple[dict[str, float], str]:
    """L2 distance per variational parameter (``params.*``; every float tensor
    when the blobs are not fogline states) present with equal shape in both."""
    ta, _, note_a = _load_tensors(blob_a)
    tb, _, note_b = _load_tensors(blob_b)
    names = sorted(ta.keys() & tb.keys())
    if any(n.startswith("params.") for n in names):
        names = [n for n in names if n.startswith("params.")]
    out = {}
    for n in names:
        x, y = ta[n], tb[n]
        if x.is_floating_point() and x.shape == y.shape:
            out[n] = float((y.double() - x.double()).norm())
    return out, note_a or note_b
