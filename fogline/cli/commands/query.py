"""``fogline serve`` and ``fogline query``: the query service and its command-line client.

``fogline serve`` runs the HTTP API of :mod:`fogline.daemon.query.api` with uvicorn (bound to
``api.host``, 127.0.0.1 unless told otherwise).  ``fogline query`` asks for
one or more rows, either through a running service (``--url``) or straight
from the snapshot in Redis (the default), and prints the predictive summaries.
Rows are raw units, by name (``--x cpu=0.7,mem=2.1``) or in feature order
(``--x 0.7,2.1``); answers are in the target's units.  For an autoregressive
model ``--key K`` alone (optionally ``--ts T``) predicts the key's NEXT value from
its lags at the snapshot instead; a key without enough history is a clear error.
In keyed mode (``keyed.enabled``) ``--key K --x ...`` answers the rows from key K's
own posterior, and ``--key K`` alone (optionally ``--ts T``; autoregressive models)
key K's NEXT value from its own posterior and its own lags: with ``keyed.enabled``
every ``--key`` query goes to the key's own state, never to a shared snapshot.

Exit codes: 0 done; 1 the service or store failed (one-line message);
2 invalid configuration or arguments.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import sys
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from fogline.daemon.config import Settings


def register(sub: argparse._SubParsersAction[Any]) -> None:
    """Add ``fogline serve`` and ``fogline query``."""
    p = sub.add_parser("serve", help="run the HTTP query service (FastAPI + uvicorn)")
    p.add_argument("--config", metavar="PATH", help="YAML or TOML settings file")
    p.add_argument("--host", help="bind address (overrides api.host; default 127.0.0.1)")
    p.add_argument("--port", type=int, help="port (overrides api.port; default 8000)")
    p.add_argument("--redis-url", metavar="URL", help="overrides redis.url")
    p.add_argument("--model", metavar="NAME", help="primary model (overrides model_name)")
    p.add_argument("--ensemble-size", type=int, help="posterior samples cached (api.ensemble_size)")
    p.add_argument(
        "--quantize",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="serve from an 8-bit ensemble (api.quantize)",
    )
    p.set_defaults(func=_serve)

    q = sub.add_parser(
        "query",
        help="predict for feature rows from the current posterior",
        description="Ask the current posterior about one or more rows: through a running "
        "service with --url, else straight from the snapshot in Redis.",
    )
    q.add_argument("--config", metavar="PATH", help="YAML or TOML settings file")
    q.add_argument("--model", metavar="NAME", help="model name (overrides model_name)")
    q.add_argument(
        "--key",
        metavar="K",
        help="with --x rows: keyed mode (keyed.enabled), answer from key K's own posterior; "
        "alone: autoregressive models, predict key K's next value from its lags (with "
        "keyed.enabled from K's own posterior and lags)",
    )
    q.add_argument(
        "--ts",
        metavar="T",
        help="with --key: the time of that value (ISO 8601 or epoch; default: the key's next step)",
    )
    q.add_argument(
        "--x",
        action="append",
        metavar="NAME=V,... | V1,V2,...",
        help="one feature row in raw units: name=value pairs (e.g. cpu=0.7,mem=2.1) or "
        "values in feature order (repeat for more rows)",
    )
    q.add_argument(
        "--y",
        action="append",
        type=float,
        metavar="Y",
        help="observed target in its units (one per --x)",
    )
    q.add_argument(
        "--levels",
        default="0.5,0.9,0.95",
        metavar="L1,L2",
        help="credible levels (default 0.5,0.9,0.95)",
    )
    q.add_argument("--json", action="store_true", help="print the JSON answer")
    where = q.add_mutually_exclusive_group()
    where.add_argument("--url", help="query service base URL, e.g. http://127.0.0.1:8000")
    where.add_argument(
        "--redis-url", metavar="URL", help="read Redis directly (overrides redis.url)"
    )
    q.add_argument("--timeout", type=float, default=10.0, help="HTTP timeout in seconds")
    q.set_defaults(func=_query)


# --------------------------------------------------------------------------
# serve
# --------------------------------------------------------------------------
def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _serve(args: argparse.Namespace) -> int:
    import torch
    import uvicorn

    from fogline.daemon.config import load_or_exit
    from fogline.daemon.logs import configure
    from fogline.daemon.query.api import create_app

    settings = load_or_exit(args.config)
    settings = settings.override(
        {
            "api.host": args.host,
            "api.port": args.port,
            "api.ensemble_size": args.ensemble_size,
            "api.quantize": args.quantize,
            "redis.url": args.redis_url,
            "model_name": args.model,
        }
    )
    configure(settings.log_format, settings.log_level)
    if not _is_loopback(settings.api.host) and settings.api.token is None:
        print(
            f"fogline: warning: serving on {settings.api.host} without api.token: "
            "anyone who can reach the port can query",
            file=sys.stderr,
        )
    torch.set_num_threads(1)  # tiny matmuls: threads only contend with the request workers
    app = create_app(settings)
    uvicorn.run(
        app,
        host=settings.api.host,
        port=settings.api.port,
        log_level=settings.log_level.lower(),
        # uvicorn's records propagate to the root handler of daemon.logs
        # (same renderer as fogline's events) instead of uvicorn's own format.
        log_config=None,
        access_log=False,
    )
    return 0


# --------------------------------------------------------------------------
# query
# --------------------------------------------------------------------------
def _parse_rows(raw: list[str]) -> list[list[float]] | list[dict[str, float]]:
    """``--x`` values: ``name=value,...`` (named, raw units) or ``v1,v2,...`` (feature order)."""
    named: list[dict[str, float]] = []
    positional: list[list[float]] = []
    for text in raw:
        parts = [v.strip() for v in text.split(",") if v.strip() != ""]
        try:
            if parts and all("=" in p for p in parts):
                row: dict[str, float] = {}
                for p in parts:
                    name, _, value = p.partition("=")
                    if name.strip() in row:
                        raise SystemExit(f"fogline: --x {text!r}: {name.strip()!r} given twice")
                    row[name.strip()] = float(value)
                named.append(row)
            elif any("=" in p for p in parts):
                raise SystemExit(
                    f"fogline: --x {text!r}: give every value by name (name=value) or none"
                )
            else:
                positional.append([float(v) for v in parts])
        except ValueError:
            raise SystemExit(
                f"fogline: --x {text!r}: not a comma-separated list of numbers "
                "or of name=number pairs"
            ) from None
    if named and positional:
        raise SystemExit("fogline: give every --x row by name or every one by position")
    return named or positional


def _query(args: argparse.Namespace) -> int:
    from fogline.daemon.config import load_or_exit

    settings = load_or_exit(args.config)
    settings = settings.override({"redis.url": args.redis_url, "model_name": args.model})
    if args.key is None and not args.x:
        print(
            "fogline: give --x rows, --key K with --x rows (keyed mode), "
            "or --key K alone (autoregressive models)",
            file=sys.stderr,
        )
        return 2
    # --key with rows: keyed mode (that key's own posterior); --key alone: the
    # autoregressive model's next value for that series (keyed.enabled: from the
    # key's own posterior and lags, else from the one shared snapshot).
    keyed = args.key is not None and (bool(args.x) or settings.keyed.enabled)
    if args.ts is not None and (args.key is None or args.x):
        print("fogline: --ts needs --key without --x (autoregressive models)", file=sys.stderr)
        return 2
    rows = _parse_rows(args.x) if args.x else []
    try:
        levels = [float(v) for v in args.levels.split(",") if v.strip()]
    except ValueError:
        print(f"fogline: --levels {args.levels!r}: not numbers", file=sys.stderr)
        return 2
    n_rows = len(rows) if args.x else 1
    if args.y is not None and len(args.y) != n_rows:
        print(f"fogline: {len(args.y)} --y values for {n_rows} rows", file=sys.stderr)
        return 2
    body: dict[str, Any] = {"levels": levels}
    if args.key is not None and not args.x:  # the key's next value (autoregressive)
        body["key"] = args.key
        if args.ts is not None:
            body["ts"] = _ts_arg(args.ts)
    else:
        body["rows"] = rows
    if args.y is not None:
        body["y"] = args.y
    key = args.key if keyed else None
    if args.url:
        status, answer = _via_http(args.url, settings, body, args.timeout, key)
    else:
        status, answer = _via_redis(settings, body, key)
    if status != 200:
        detail = answer.get("detail", answer) if isinstance(answer, dict) else answer
        print(f"fogline: error {status}: {json.dumps(detail)}", file=sys.stderr)
        # an unknown key is the caller's argument: "key 'K': no history" (one shared
        # autoregressive snapshot) or "model 'M' has no key 'K'" (keyed mode)
        unknown_key = status == 404 and (
            str(detail).startswith("key ") or " has no key " in str(detail)
        )
        return 2 if status in (413, 422) or unknown_key else 1
    if args.json:
        print(json.dumps(answer))
    else:
        _print_table(answer)
    return 0


def _ts_arg(text: str) -> float | str:
    """``--ts``: a number (epoch seconds or ms) or ISO 8601 text, as the API takes it."""
    try:
        return float(text)
    except ValueError:
        return text


def _via_http(
    url: str, settings: Settings, body: dict[str, Any], timeout: float, key: str | None = None
) -> tuple[int, Any]:
    import httpx

    headers = {}
    if settings.api.token is not None:
        headers["Authorization"] = f"Bearer {settings.api.token.get_secret_value()}"
    base = f"{url.rstrip('/')}/v1/models/{settings.model_name}"
    if key is not None:
        from urllib.parse import quote

        base += f"/keys/{quote(key, safe='')}"
    target = f"{base}/predict"
    try:
        resp = httpx.post(target, json=body, headers=headers, timeout=timeout)
    except httpx.HTTPError as exc:
        return 0, f"cannot reach {target}: {exc}"
    try:
        return resp.status_code, resp.json()
    except ValueError:
        return resp.status_code, resp.text


def _via_redis(settings: Settings, body: dict[str, Any], key: str | None = None) -> tuple[int, Any]:
    """Answer like the service would, from the latest snapshot (or ``key``'s) in Redis."""
    from fastapi import HTTPException
    from pydantic import ValidationError

    from fogline.daemon.query.api import PredictRequest, _predict_body
    from fogline.daemon.query.serving import load_snapshot
    from fogline.daemon.stream.store import SnapshotNotFound, SnapshotStore, StoreError

    try:
        req = PredictRequest.model_validate(body)
    except ValidationError as exc:
        return 422, {"detail": [e["msg"] for e in exc.errors(include_url=False)]}
    if key is not None:
        return _key_via_redis(settings, req, key)
    try:
        with SnapshotStore.from_settings(settings) as store:
            loaded = load_snapshot(store, None, settings.api.ensemble_size, settings.api.quantize)
    except SnapshotNotFound as exc:
        return 404, {"detail": str(exc)}
    except (StoreError, ValueError) as exc:
        return 1, {"detail": str(exc)}
    try:
        return 200, _predict_body(settings.model_name, loaded, req, settings.api)
    except HTTPException as exc:
        return exc.status_code, {"detail": exc.detail}


def _key_via_redis(settings: Settings, req: Any, key: str) -> tuple[int, Any]:
    """Answer from key ``key``'s last checkpointed posterior (keyed mode)."""
    from fastapi import HTTPException

    from fogline.daemon.query.api import _predict_body
    from fogline.daemon.query.serving import load_key
    from fogline.daemon.stream.store import PartitionStore, StoreError

    try:
        store = PartitionStore.from_settings(settings)
        try:
            loaded = load_key(store, key, settings.api.ensemble_size, settings.api.quantize)
        finally:
            store.close()
    except (StoreError, ValueError) as exc:
        return 1, {"detail": str(exc)}
    if loaded is None:
        return 404, {"detail": f"model {settings.model_name!r} has no key {key!r}"}
    try:
        answer = _predict_body(settings.model_name, loaded, req, settings.api)
    except HTTPException as exc:
        return exc.status_code, {"detail": exc.detail}
    answer["key"] = key
    return 200, answer


def _print_table(answer: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    levels = answer["levels"]
    about = f" key {answer['key']} at {answer['ts']}" if answer.get("key") is not None else ""
    table = Table(
        title=f"{answer['model']} v{answer['snapshot_version']}{about} "
        f"({answer['ensemble_size']} samples{', 8-bit' if answer['quantized'] else ''}"
        f"{', drift: ' + answer['drift_mode'] if answer.get('drift_mode') else ''})"
    )
    for col in ("row", "mean", "total sd", "epistemic sd", "aleatoric sd"):
        table.add_column(col, justify="right")
    for lv in levels:
        table.add_column(f"{lv:g} interval", justify="right")
    has_score = any("anomaly_score" in p for p in answer["predictions"])
    if has_score:
        table.add_column("anomaly", justify="right")

    def f(v: float | None) -> str:
        return "-" if v is None else f"{v:.4g}"

    for i, p in enumerate(answer["predictions"]):
        cells = [str(i), f(p["mean"]), f(p["total_std"]), f(p["epistemic_std"])]
        cells.append(f(p["aleatoric_std"]))
        for lv in levels:
            lo, hi = p["intervals"][repr(float(lv))]
            cells.append(f"[{f(lo)}, {f(hi)}]")
        if has_score:
            cells.append(f(p.get("anomaly_score")))
        table.add_row(*cells)
    Console().print(table)
