"""The query service: FastAPI app answering from cached posterior ensembles.

Endpoints (see ``docs/query.md``)::

    GET  /healthz                         process is up (never needs the token)
    GET  /readyz                          200 once the primary model has a snapshot loaded
    GET  /metrics                         Prometheus text (daemon.metrics.QUERY_REGISTRY)
    GET  /v1/models                       models under the prefix, with their versions
    GET  /v1/models/{name}/snapshot       metadata of the snapshot answering now
    POST /v1/models/{name}/predict        predictive summaries for a batch of rows, or for
                                          an autoregressive model's key's next value

The service reads snapshots from Redis only (:mod:`fogline.daemon.query.serving` keeps them
current).  Safety: with ``api.token`` set, every request but ``/healthz`` must
carry ``Authorization: Bearer <token>`` (compared in constant time);
requests over ``api.max_rows`` rows or ``api.max_features`` features per row
are refused with 413; a row of the wrong length, a non-finite number or a bad
level is a 422 naming the row and the problem.

Order of the guards (:class:`RequestGuard`, a pure ASGI middleware, runs
before any route and before a single body byte is read):

1. the bearer token is checked from the headers alone: a request without it
   gets its 401 at once, whatever body it announces or streams;
2. a declared ``Content-Length`` over the body cap is a 413 at once;
3. the body is counted as it streams in (any transfer encoding, chunked
   included): the moment it passes the cap the client gets a 413 and the
   route sees a disconnect.

The predict route reads the (capped) body on the event loop, then parses,
validates and predicts in the thread pool, so a large or slow request never
stalls ``/healthz`` or other requests.
"""

from __future__ import annotations

import hmac
import json
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping, Sequence
from contextlib import asynccontextmanager
from typing import Annotated, Any, Literal

import torch
from fastapi import APIRouter, FastAPI, HTTPException, Path, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect

from fogline.daemon.config import ApiSettings, Settings
from fogline.daemon.metrics import QUERY_REGISTRY, QUERY_SECONDS
from fogline.daemon.names import MODEL_NAME_PATTERN
from fogline.daemon.query.serving import KeyedReader, Loaded, Registry, StoreFactory
from fogline.daemon.stream.store import (
    PartitionStore,
    SnapshotMeta,
    SnapshotStore,
    StoreError,
    StoreUnavailable,
)
from fogline.models.schema import SchemaError

DEFAULT_LEVELS: tuple[float, ...] = (0.5, 0.9, 0.95)
MAX_LEVELS = 16
#: Bytes of JSON a single number may take in a body (generous), for the size guard.
_BYTES_PER_NUMBER = 40

ModelName = Annotated[str, Path(pattern=MODEL_NAME_PATTERN, description="Model name")]
Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


# --------------------------------------------------------------------------
# request / response bodies
# --------------------------------------------------------------------------
class PredictRequest(BaseModel):
    """A batch of feature rows, optional observations and credible levels."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    rows: list[list[float]] | list[dict[str, float]] | None = Field(
        None,
        description="Feature rows in raw units (the stored transforms are applied): objects "
        "mapping every feature name (GET .../snapshot lists them) to a value, or lists in "
        "the model's feature order.  Required unless ``key`` is given.",
        examples=[[[0.1, 0.2, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]]],
    )
    key: str | None = Field(
        None,
        description="Autoregressive models: predict this key's NEXT value from its lags at the "
        "snapshot (instead of rows).",
    )
    ts: float | str | None = Field(
        None,
        description="With key: the time of that next value (epoch seconds/ms or ISO 8601); "
        "default: the key's last time stamp plus its last step.",
    )
    y: list[float] | None = Field(
        None,
        description="Observed targets in target units, one per row: adds anomaly_score and "
        "tail_prob.",
    )
    levels: list[float] | None = Field(
        None, description="Central credible levels in (0, 1); default [0.5, 0.9, 0.95]."
    )
    method: Literal["mixture", "gaussian"] = Field(
        "mixture",
        description="Interval method: exact ensemble mixture quantiles, or its moment-matched "
        "Gaussian.",
    )


class RowPrediction(BaseModel):
    """Predictive summaries of one row, in target units (see :mod:`fogline.models.units`)."""

    mean: float
    total_std: float
    epistemic_std: float
    aleatoric_std: float
    intervals: dict[str, tuple[float, float]] = Field(
        description="Credible level (as a string) -> [lower, upper]."
    )
    anomaly_score: float | None = None
    tail_prob: float | None = None


class PredictResponse(BaseModel):
    """Answer of ``POST /v1/models/{name}/predict``."""

    model: str
    snapshot_version: int
    drift_mode: str | None = Field(
        default=None,
        description="Drift policy mode of the answering snapshot: stable, shifted (a change was "
        "detected) or recovering (adapting to it); null when the daemon runs no drift loop.",
    )
    ensemble_size: int
    quantized: bool
    method: str
    levels: list[float]
    predictions: list[RowPrediction]
    key: str | None = Field(default=None, description="The key predicted (requests with key).")
    ts: str | None = Field(
        default=None, description="The time (ISO 8601, UTC) the key's next value is predicted at."
    )


class ModelSummary(BaseModel):
    """One model in ``GET /v1/models``."""

    name: str
    latest_version: int | None
    loaded_version: int | None


class SnapshotInfo(BaseModel):
    """Answer of ``GET /v1/models/{name}/snapshot``."""

    model: str
    version: int
    latest_version: int | None
    created_at: float
    records_absorbed: int
    offsets: dict[str, int]
    drift: dict[str, Any]
    model_config_: dict[str, Any] = Field(alias="model_config")
    features: list[str]
    target: str = Field(description="The target's name (answers are in its units).")
    transforms: dict[str, str] = Field(
        description="Column -> transform (standardise, log1p or none) applied to raw values."
    )
    series: dict[str, Any] | None = Field(
        default=None,
        description="Autoregressive models: lags, calendar, the number of keys seen and of "
        "keys ready to predict (L past values), and the first ready keys (sorted, at most 100).",
    )
    schema_: dict[str, Any] = Field(
        alias="schema",
        description="The fitted columns: features and target with transform, loc and scale; "
        "key and timestamp field names.",
    )
    checksum: str
    writer: str
    ensemble_size: int
    quantized: bool
    quantization: dict[str, Any] | None
    loaded_at: float

    model_config = ConfigDict(populate_by_name=True)


# --------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------
def _problem(status: int, detail: str | list[dict[str, Any]]) -> HTTPException:
    return HTTPException(status_code=status, detail=detail)


def _rows_tensor(req: PredictRequest, loaded: Loaded, limits: ApiSettings) -> torch.Tensor:
    """Validate the rows against the model and the limits; return raw x [N, D] (float64)."""
    rows = req.rows
    if not rows:
        raise _problem(422, "rows: at least one row is required")
    if len(rows) > limits.max_rows:
        raise _problem(413, f"rows: {len(rows)} rows exceed the limit of {limits.max_rows}")
    features = loaded.data_schema.feature_names
    d = len(features)
    if isinstance(rows[0], dict):
        index = {name: i for i, name in enumerate(features)}
        out: list[list[float]] = []
        for r, row in enumerate(rows):
            assert isinstance(row, dict)
            if len(row) > limits.max_features:
                raise _problem(
                    413, f"rows[{r}]: {len(row)} features exceed the limit of {limits.max_features}"
                )
            missing = [f for f in features if f not in row]
            unknown = [k for k in row if k not in index]
            if missing or unknown:
                parts = []
                if missing:
                    parts.append(f"missing {missing[:10]}")
                if unknown:
                    parts.append(f"unknown {unknown[:10]}")
                raise _problem(
                    422,
                    f"rows[{r}]: {'; '.join(parts)} (model {loaded.meta.model_name!r} "
                    f"expects {d} features {list(features)[:20]})",
                )
            out.append([row[f] for f in features])
        return _finite32(torch.tensor(out, dtype=torch.float64))
    for r, lrow in enumerate(rows):
        assert isinstance(lrow, list)
        if len(lrow) > limits.max_features:
            raise _problem(
                413, f"rows[{r}]: {len(lrow)} features exceed the limit of {limits.max_features}"
            )
        if len(lrow) != d:
            raise _problem(
                422,
                f"rows[{r}]: {len(lrow)} features, model {loaded.meta.model_name!r} "
                f"expects {d} ({', '.join(features[:20])})",
            )
    return _finite32(torch.tensor(rows, dtype=torch.float64))


def _finite32(x: torch.Tensor) -> torch.Tensor:
    """``x`` when every value is finite in float32 (finite doubles can exceed its range), else 422."""
    if not bool(torch.isfinite(x.float()).all()):
        raise _problem(422, "rows: every value must be finite in float32 (|x| < 3.4e38)")
    return x


def _levels(req: PredictRequest) -> tuple[float, ...]:
    if req.levels is None:
        return DEFAULT_LEVELS
    if not req.levels:
        raise _problem(422, "levels: give at least one level, or omit it")
    if len(req.levels) > MAX_LEVELS:
        raise _problem(422, f"levels: at most {MAX_LEVELS} levels")
    bad = [lv for lv in req.levels if not 0.0 < lv < 1.0]
    if bad:
        raise _problem(422, f"levels: every level must lie strictly between 0 and 1, got {bad}")
    return tuple(dict.fromkeys(req.levels))


def _y_tensor(req: PredictRequest, n: int) -> torch.Tensor | None:
    if req.y is None:
        return None
    if len(req.y) != n:
        raise _problem(422, f"y: {len(req.y)} values for {n} rows (give one per row)")
    y = torch.tensor(req.y, dtype=torch.float64)
    if not bool(torch.isfinite(y.float()).all()):
        raise _problem(422, "y: every value must be finite in float32")
    return y


def _level_key(level: float) -> str:
    return repr(level)


def _key_tensor(req: PredictRequest, loaded: Loaded) -> tuple[torch.Tensor, int]:
    """Raw inputs [1, D] of ``req.key``'s next value and its time (epoch ms); 4xx else.

    404 when the model has no such key, 422 when the key has fewer than L past
    values, the model is not autoregressive, or rows are given too.
    """
    from fogline.models.autoregressive import ShortHistory, next_inputs
    from fogline.models.tabular import RowError, timestamp_ms

    assert req.key is not None
    name = loaded.meta.model_name
    if loaded.series is None:
        raise _problem(422, f"key: model {name!r} is not autoregressive; send rows")
    if req.rows is not None:
        raise _problem(422, "rows: give rows or key, not both")
    spec, series = loaded.series
    ts_ms = None
    if req.ts is not None:
        try:
            ts_ms = timestamp_ms(req.ts)
        except RowError as exc:
            raise _problem(422, f"ts: {exc.detail}") from None
    try:
        x, at = next_inputs(spec, series, req.key, ts_ms)
    except ShortHistory as exc:
        status = 404 if exc.have == 0 else 422
        raise _problem(status, f"{exc} (model {name!r}, snapshot v{loaded.version})") from None
    return _finite32(torch.from_numpy(x)), at


def _predict_body(
    name: str, loaded: Loaded, req: PredictRequest, limits: ApiSettings
) -> dict[str, Any]:
    levels = _levels(req)
    at: int | None = None
    if req.key is not None:
        x, at = _key_tensor(req, loaded)
    else:
        x = _rows_tensor(req, loaded, limits)
    y = _y_tensor(req, x.shape[0])
    try:
        pred = loaded.predict_raw(x, levels, y, req.method)
    except SchemaError as exc:
        raise _problem(422, f"rows: {exc}") from None
    mean = pred.mean.tolist()
    total = pred.total_std.tolist()
    epi = pred.epistemic_std.tolist()
    ale = pred.aleatoric_std.tolist()
    bounds = {
        _level_key(lv): (pred.intervals[lv][0].tolist(), pred.intervals[lv][1].tolist())
        for lv in levels
    }
    score = pred.anomaly_score.tolist() if pred.anomaly_score is not None else None
    tail = pred.tail_prob.tolist() if pred.tail_prob is not None else None
    rows = []
    for i in range(len(mean)):
        row: dict[str, Any] = {
            "mean": mean[i],
            "total_std": total[i],
            "epistemic_std": epi[i],
            "aleatoric_std": ale[i],
            "intervals": {k: [lo[i], hi[i]] for k, (lo, hi) in bounds.items()},
        }
        if score is not None and tail is not None:
            row["anomaly_score"] = score[i]
            row["tail_prob"] = tail[i]
        rows.append(row)
    return {
        "model": name,
        "snapshot_version": loaded.version,
        "drift_mode": loaded.meta.drift.get("mode"),
        "ensemble_size": loaded.ensemble.size,
        "quantized": loaded.quantized is not None,
        "method": req.method,
        "levels": list(levels),
        "predictions": _finite(rows),
        **({"key": req.key, "ts": _iso(at)} if at is not None else {}),
    }


def _iso(ms: int) -> str:
    from fogline.models.autoregressive import ts_from_ms

    return ts_from_ms(ms).isoformat().replace("+00:00", "Z")


def _finite(value: Any) -> Any:
    """JSON cannot carry inf/nan: replace them with None (e.g. Student-t df <= 2 stds)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


def snapshot_info(name: str, loaded: Loaded, latest: int | None) -> dict[str, Any]:
    """JSON body of ``GET /v1/models/{name}/snapshot``."""
    meta: SnapshotMeta = loaded.meta
    schema = loaded.data_schema
    return _finite(
        {
            "model": name,
            "version": meta.version,
            "latest_version": latest,
            "created_at": meta.created_at,
            "records_absorbed": meta.records_absorbed,
            "offsets": meta.offsets,
            "drift": meta.drift,
            "model_config": loaded.config.model_dump(mode="json"),
            "features": list(schema.feature_names),
            "target": schema.target.name,
            "transforms": schema.transforms(),
            "schema": schema.to_dict(),
            "checksum": meta.checksum,
            "writer": meta.writer,
            "ensemble_size": loaded.ensemble.size,
            "quantized": loaded.quantized is not None,
            "quantization": loaded.quantization,
            "loaded_at": loaded.loaded_at,
            **({"series": _series_info(loaded)} if loaded.series is not None else {}),
        }
    )


#: Keys listed by ``GET .../snapshot`` for an autoregressive model.
MAX_LISTED_KEYS = 100


def _series_info(loaded: Loaded) -> dict[str, Any]:
    """The ``series`` section of the snapshot page (see :class:`SnapshotInfo`)."""
    assert loaded.series is not None
    spec, series = loaded.series
    ready = [k for k in series.known_keys() if series.history(k) >= spec.lags]
    return {
        "lags": spec.lags,
        "calendar": spec.calendar,
        "keys_seen": len(series.known_keys()),
        "keys_ready": len(ready),
        "ready": ready[:MAX_LISTED_KEYS],
    }


def body_limit(api: ApiSettings) -> int:
    """Body cap in bytes: what ``max_rows`` rows of ``max_features`` numbers could need.

    ``max_rows * (max_features + 1) * 40 + 65536`` (40 bytes of JSON per number,
    generous, one extra number per row for ``y``, 64 KiB for the rest).
    """
    return api.max_rows * (api.max_features + 1) * _BYTES_PER_NUMBER + 65536


#: Paths that never need the token: liveness, and the schema pages (no data in them).
OPEN_PATHS: frozenset[str] = frozenset(
    {"/healthz", "/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json"}
)
UNAUTHORIZED_DETAIL = "missing or wrong bearer token (send 'Authorization: Bearer <token>')"


async def _send_json(send: Send, status: int, body: dict[str, Any], **headers: str) -> None:
    """Send a whole JSON response; ``connection: close`` when the body was not read."""
    payload = json.dumps(body).encode()
    raw = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(payload)).encode()),
        (b"connection", b"close"),
        *((k.lower().encode(), v.encode()) for k, v in headers.items()),
    ]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": payload, "more_body": False})


class RequestGuard:
    """Pure ASGI middleware: the token before the body, then the body cap as it streams.

    Parameters
    ----------
    app
        The wrapped ASGI app.
    token
        Expected bearer token; ``None`` lets every request through step 1.
    limit
        Body cap in bytes (:func:`body_limit`).
    open_paths
        Paths that never need the token (:data:`OPEN_PATHS`: ``/healthz`` and the
        schema pages).

    Steps, per HTTP request (see the module docstring): 1. token from the
    ``authorization`` header (constant-time compare) else 401 without reading
    the body; 2. declared ``content-length`` over ``limit`` else 413 without
    reading it; 3. ``receive`` counts body bytes; past ``limit`` it sends the 413
    itself, tells the app the client went away (``http.disconnect``) and drops
    whatever the app then tries to send.
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        token: SecretStr | None,
        limit: int,
        open_paths: frozenset[str] = OPEN_PATHS,
    ) -> None:
        self.app = app
        self.expected = token.get_secret_value().encode() if token is not None else None
        self.limit = limit
        self.open_paths = open_paths

    def authorized(self, headers: list[tuple[bytes, bytes]]) -> bool:
        """True when no token is set or ``Authorization: Bearer <token>`` matches it."""
        if self.expected is None:
            return True
        value = next((v for k, v in headers if k == b"authorization"), b"")
        scheme, _, given = value.partition(b" ")
        return scheme.lower() == b"bearer" and hmac.compare_digest(given.strip(), self.expected)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers: list[tuple[bytes, bytes]] = list(scope.get("headers", ()))
        if scope.get("path") not in self.open_paths and not self.authorized(headers):
            await _send_json(
                send, 401, {"detail": UNAUTHORIZED_DETAIL}, **{"WWW-Authenticate": "Bearer"}
            )
            return
        declared = next((v for k, v in headers if k == b"content-length"), None)
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            detail = f"body of {int(declared)} bytes exceeds the limit of {self.limit} bytes"
            await _send_json(send, 413, {"detail": detail})
            return
        received = 0
        refused = False
        started = False

        async def guarded_send(message: Message) -> None:
            nonlocal started
            if refused:
                return  # the 413 went out; the app's late answer is dropped
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        async def guarded_receive() -> Message:
            nonlocal received, refused
            if refused:
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.limit:
                    if not started:
                        detail = (
                            f"body of more than {self.limit} bytes exceeds the limit "
                            f"of {self.limit} bytes"
                        )
                        await _send_json(send, 413, {"detail": detail})
                    refused = True
                    return {"type": "http.disconnect"}
            return message

        try:
            await self.app(scope, guarded_receive, guarded_send)
        except Exception:
            if not refused:  # after a 413 the app's ClientDisconnect is expected
                raise


# --------------------------------------------------------------------------
# the app
# --------------------------------------------------------------------------
def create_app(
    settings: Settings | None = None,
    *,
    store_factory: StoreFactory | None = None,
) -> FastAPI:
    """Build the query service for ``settings`` (default: :meth:`Settings.load`).

    ``store_factory(model_name)`` makes a :class:`SnapshotStore` (default:
    :meth:`SnapshotStore.from_settings`).  The app's lifespan starts the
    reload watcher of ``settings.model_name`` and stops every watcher.
    """
    settings = settings or Settings.load()
    api = settings.api
    cfg = settings

    def default_factory(name: str) -> SnapshotStore:
        return SnapshotStore.from_settings(cfg, name)

    registry = Registry(
        store_factory or default_factory,
        settings.model_name,
        ensemble_size=api.ensemble_size,
        quantize=api.quantize,
        poll_s=api.reload_poll_s,
    )

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        registry.start()
        try:
            yield
        finally:
            registry.stop()

    app = FastAPI(
        title="fogline query service",
        summary="Predictions with credible bands from the current streaming posterior.",
        version="1",
        lifespan=lifespan,
    )

    @app.exception_handler(RequestValidationError)
    async def invalid_request(_request: Request, exc: RequestValidationError) -> JSONResponse:
        """422 naming each bad field; the offending input is not echoed (it may be NaN)."""
        return JSONResponse({"detail": _validation_detail(exc.errors())}, status_code=422)

    app.state.registry = registry
    app.state.settings = settings
    # The token is checked by RequestGuard before any route (and any body read);
    # the routers only document it.
    v1 = APIRouter(prefix="/v1")
    ops = APIRouter()

    def holder_loaded(name: str) -> Loaded:
        try:
            holder = registry.get(name)
        except StoreUnavailable as exc:
            raise _problem(503, f"snapshot store unavailable: {exc}") from None
        except StoreError as exc:
            raise _problem(503, f"cannot load model {name!r}: {exc}") from None
        if holder is None:
            raise _problem(404, f"model {name!r} has no snapshot")
        loaded = holder.current
        if loaded is None:
            why = f" ({holder.last_error})" if holder.last_error else ""
            raise _problem(503, f"model {name!r}: no snapshot loaded yet{why}")
        return loaded

    @app.get("/healthz", tags=["ops"])
    def healthz() -> dict[str, str]:
        """The process is up."""
        return {"status": "ok"}

    @ops.get("/readyz", tags=["ops"])
    def readyz() -> JSONResponse:
        """200 once the primary model answers from a loaded snapshot, else 503."""
        holder = registry.get(settings.model_name, create=False)
        loaded = holder.current if holder else None
        if loaded is None:
            reason = (holder.last_error if holder else None) or "no snapshot loaded yet"
            return JSONResponse(
                {"status": "not ready", "model": settings.model_name, "reason": reason},
                status_code=503,
            )
        return JSONResponse(
            {"status": "ready", "model": settings.model_name, "snapshot_version": loaded.version}
        )

    @ops.get("/metrics", tags=["ops"])
    def metrics() -> Response:
        """Prometheus metrics (request latency, snapshot version, reloads)."""
        return Response(generate_latest(QUERY_REGISTRY), media_type=CONTENT_TYPE_LATEST)

    @v1.get("/models", response_model=list[ModelSummary], tags=["models"])
    def list_models() -> list[dict[str, Any]]:
        """Models with a snapshot under the prefix, their latest and loaded versions."""
        t0 = time.perf_counter()
        try:
            names = registry.catalog.list_models()
            out = []
            for name in names:
                store = registry.store_factory(name)
                try:
                    latest = store.latest_version()
                finally:
                    store.close()
                holder = registry.get(name, create=False)
                cur = holder.current if holder else None
                out.append(
                    {
                        "name": name,
                        "latest_version": latest,
                        "loaded_version": cur.version if cur else None,
                    }
                )
        except StoreError as exc:
            raise _problem(503, f"snapshot store unavailable: {exc}") from None
        QUERY_SECONDS.labels(endpoint="models").observe(time.perf_counter() - t0)
        return out

    @v1.get("/models/{name}/snapshot", response_model=SnapshotInfo, tags=["models"])
    def get_snapshot(name: ModelName) -> JSONResponse:
        """Metadata of the snapshot answering now (plus the store's latest version)."""
        t0 = time.perf_counter()
        loaded = holder_loaded(name)
        holder = registry.get(name, create=False)
        try:
            latest = holder.store.latest_version() if holder else None
        except StoreError:
            latest = None
        body = snapshot_info(name, loaded, latest)
        QUERY_SECONDS.labels(endpoint="snapshot").observe(time.perf_counter() - t0)
        return JSONResponse(body)

    @v1.post(
        "/models/{name}/predict",
        response_model=PredictResponse,
        tags=["models"],
        # The body is read and parsed by hand (off the event loop); document its schema.
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {"application/json": {"schema": PredictRequest.model_json_schema()}},
            }
        },
        responses={
            401: {"description": "missing or wrong bearer token"},
            404: {"description": "no such model"},
            413: {"description": "too many rows or features, or a body over the cap"},
            422: {"description": "wrong feature count, non-finite value, bad level"},
            503: {"description": "no snapshot loaded yet"},
        },
    )
    async def predict_rows(name: ModelName, request: Request) -> Response:
        """Predictive mean, std (total, epistemic, aleatoric), intervals and anomaly scores."""
        t0 = time.perf_counter()
        try:
            raw = await request.body()  # capped by RequestGuard as it streams
        except ClientDisconnect:
            return Response(status_code=400)  # never sent: the guard answered 413 / client left
        status, body = await run_in_threadpool(answer_predict, name, raw)
        QUERY_SECONDS.labels(endpoint="predict").observe(time.perf_counter() - t0)
        return JSONResponse(body, status_code=status)

    def answer_predict(name: str, raw: bytes) -> tuple[int, Any]:
        """Parse, validate and predict (in the thread pool): ``(status, JSON body)``."""
        try:
            req = PredictRequest.model_validate_json(raw)
        except ValidationError as exc:
            errors = exc.errors(include_url=False)
            # same shape as FastAPI's own body errors: loc starts with "body"
            return 422, {
                "detail": _validation_detail([{**e, "loc": ("body", *e["loc"])} for e in errors])
            }
        try:
            loaded = holder_loaded(name)
            return 200, _predict_body(name, loaded, req, api)
        except HTTPException as exc:
            return exc.status_code, {"detail": exc.detail}

    keyed = KeyedReader(
        lambda name: PartitionStore((store_factory or default_factory)(name)),
        ensemble_size=api.ensemble_size,
        quantize=api.quantize,
    )

    @v1.get("/models/{name}/keys", tags=["keys"])
    def list_keys(name: ModelName) -> JSONResponse:
        """Keys of a keyed model (``keyed.enabled``): version, drift mode, partition, records.

        ``fleet`` sums them up: how many keys, records absorbed, keys per drift mode.
        """
        t0 = time.perf_counter()
        try:
            index = keyed.keys(name)
        except StoreError as exc:
            raise _problem(503, f"snapshot store unavailable: {exc}") from None
        if not index:
            raise _problem(404, f"model {name!r} has no keyed snapshots")
        keys = [
            {
                "key": k,
                "version": v.get("version"),
                "drift_mode": v.get("drift_mode", "none"),
                "partition": v.get("partition"),
                "records_absorbed": v.get("records_absorbed"),
            }
            for k, v in sorted(index.items())
        ]
        modes: dict[str, int] = {}
        for k in keys:
            modes[str(k["drift_mode"])] = modes.get(str(k["drift_mode"]), 0) + 1
        fleet = {
            "keys": len(keys),
            "records_absorbed": sum(int(k["records_absorbed"] or 0) for k in keys),
            "drift_modes": modes,
        }
        QUERY_SECONDS.labels(endpoint="keys").observe(time.perf_counter() - t0)
        return JSONResponse({"model": name, "keys": keys, "fleet": fleet})

    @v1.post(
        "/models/{name}/keys/{key:path}/predict",
        response_model=PredictResponse,
        tags=["keys"],
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {"application/json": {"schema": PredictRequest.model_json_schema()}},
            }
        },
        responses={404: {"description": "no such model or key"}},
    )
    async def predict_key(name: ModelName, key: str, request: Request) -> Response:
        """As ``/models/{name}/predict``, from key ``key``'s own posterior (keyed mode).

        An autoregressive model without ``rows`` predicts the key's NEXT value
        from its own lags (``ts`` optional; a body ``key`` must be the path's).
        """
        t0 = time.perf_counter()
        try:
            raw = await request.body()
        except ClientDisconnect:
            return Response(status_code=400)
        status, body = await run_in_threadpool(answer_key, name, key, raw)
        QUERY_SECONDS.labels(endpoint="key_predict").observe(time.perf_counter() - t0)
        return JSONResponse(body, status_code=status)

    def answer_key(name: str, key: str, raw: bytes) -> tuple[int, Any]:
        try:
            req = PredictRequest.model_validate_json(raw)
        except ValidationError as exc:
            errors = exc.errors(include_url=False)
            return 422, {
                "detail": _validation_detail([{**e, "loc": ("body", *e["loc"])} for e in errors])
            }
        try:
            loaded = keyed.loaded(name, key)
        except StoreError as exc:
            return 503, {"detail": f"snapshot store unavailable: {exc}"}
        if loaded is None:
            return 404, {"detail": f"model {name!r} has no key {key!r}"}
        if req.key is not None and req.key != key:
            return 422, {"detail": f"key: the body names {req.key!r}, the path {key!r}"}
        if req.rows is None and loaded.series is not None:  # keyed + autoregressive
            req = req.model_copy(update={"key": key})  # the key's next value from its lags
        try:
            body = _predict_body(name, loaded, req, api)
        except HTTPException as exc:
            return exc.status_code, {"detail": exc.detail}
        body["key"] = key
        return 200, body

    app.include_router(ops)
    app.include_router(v1)
    app.add_middleware(
        RequestGuard,  # type: ignore[arg-type]
        token=api.token,
        limit=body_limit(api),
    )
    return app


def _validation_detail(errors: Sequence[Any]) -> list[dict[str, Any]]:
    """422 detail naming each bad field; the offending input is not echoed (it may be NaN)."""
    return [
        {"loc": list(e.get("loc", ())), "msg": str(e.get("msg", "")), "type": e.get("type")}
        for e in errors
    ]
