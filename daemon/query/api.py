"""The query service: FastAPI app answering from cached posterior ensembles.

Endpoints (see ``docs/query.md``)::

    GET  /healthz                         process is up (never needs the token)
    GET  /readyz                          200 once the primary model has a snapshot loaded
    GET  /metrics                         Prometheus text (daemon.metrics.QUERY_REGISTRY)
    GET  /v1/models                       models under the prefix, with their versions
    GET  /v1/models/{name}/snapshot       metadata of the snapshot answering now
    POST /v1/models/{name}/predict        predictive summaries for a batch of rows

The service reads snapshots from Redis only (:mod:`fogline.daemon.query.serving` keeps them
current).  Safety: with ``api.token`` set, every request but ``/healthz`` must
carry ``Authorization: Bearer <token>`` (compared in constant time);
requests over ``api.max_rows`` rows or ``api.max_features`` features per row
are refused with 413; a row of the wrong length, a non-finite number or a bad
level is a 422 naming the row and the problem.  Bodies larger than the limits
could need are refused (413) before they are parsed.
"""

from __future__ import annotations

import hmac
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from contextlib import asynccontextmanager
from typing import Annotated, Any, Literal

import torch
from fastapi import APIRouter, Depends, FastAPI, HTTPException, Path, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, ConfigDict, Field, SecretStr
from starlette.concurrency import run_in_threadpool

from fogline.daemon.config import ApiSettings, Settings
from fogline.daemon.metrics import QUERY_REGISTRY, QUERY_SECONDS
from fogline.daemon.names import MODEL_NAME_PATTERN
from fogline.daemon.query.serving import Loaded, Registry, StoreFactory
from fogline.daemon.stream.store import SnapshotMeta, SnapshotStore, StoreError, StoreUnavailable

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

    rows: list[list[float]] | list[dict[str, float]] = Field(
        description="Feature rows: lists in the model's feature order, or objects "
        "mapping every feature name (GET .../snapshot lists them) to a value.",
        examples=[[[0.1, 0.2, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]]],
    )
    y: list[float] | None = Field(
        None, description="Observed targets, one per row: adds anomaly_score and tail_prob."
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
    """Predictive summaries of one row."""

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
    """Validate the rows against the model and the limits; return x [N, D]."""
    rows = req.rows
    if not rows:
        raise _problem(422, "rows: at least one row is required")
    if len(rows) > limits.max_rows:
        raise _problem(413, f"rows: {len(rows)} rows exceed the limit of {limits.max_rows}")
    features = loaded.config.features()
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
        return torch.tensor(out, dtype=torch.float32)
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
    x = torch.tensor(rows, dtype=torch.float32)
    if not bool(torch.isfinite(x).all()):  # finite doubles beyond float32's range
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
    y = torch.tensor(req.y, dtype=torch.float32)
    if not bool(torch.isfinite(y).all()):
        raise _problem(422, "y: every value must be finite in float32")
    return y


def _level_key(level: float) -> str:
    return repr(level)


def _predict_body(
    name: str, loaded: Loaded, req: PredictRequest, limits: ApiSettings
) -> dict[str, Any]:
    levels = _levels(req)
    x = _rows_tensor(req, loaded, limits)
    y = _y_tensor(req, x.shape[0])
    pred = loaded.predict(x, levels, y, req.method)
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
    }


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
            "features": list(loaded.config.features()),
            "checksum": meta.checksum,
            "writer": meta.writer,
            "ensemble_size": loaded.ensemble.size,
            "quantized": loaded.quantized is not None,
            "quantization": loaded.quantization,
            "loaded_at": loaded.loaded_at,
        }
    )


def _bearer_check(token: SecretStr | None) -> Callable[[Request], None]:
    expected = token.get_secret_value().encode() if token is not None else None

    def check(request: Request) -> None:
        if expected is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, given = header.partition(" ")
        ok = scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), expected)
        if not ok:
            raise HTTPException(
                status_code=401,
                detail="missing or wrong bearer token (send 'Authorization: Bearer <token>')",
                headers={"WWW-Authenticate": "Bearer"},
            )

    return check


class _BodyLimit:
    """Refuse bodies larger than ``limit`` bytes (413) before anything parses them."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            for key, value in scope.get("headers", ()):
                if key == b"content-length":
                    try:
                        size = int(value)
                    except ValueError:
                        size = 0
                    if size > self.limit:
                        detail = f"body of {size} bytes exceeds the limit of {self.limit} bytes"
                        resp = JSONResponse({"detail": detail}, status_code=413)
                        await resp(scope, receive, send)
                        return
                    break
        await self.app(scope, receive, send)


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
        errors = [
            {"loc": list(e.get("loc", ())), "msg": str(e.get("msg", "")), "type": e.get("type")}
            for e in exc.errors()
        ]
        return JSONResponse({"detail": errors}, status_code=422)

    app.state.registry = registry
    app.state.settings = settings
    auth = Depends(_bearer_check(api.token))
    v1 = APIRouter(prefix="/v1", dependencies=[auth])
    ops = APIRouter(dependencies=[auth])

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
        responses={
            401: {"description": "missing or wrong bearer token"},
            404: {"description": "no such model"},
            413: {"description": "too many rows or features"},
            422: {"description": "wrong feature count, non-finite value, bad level"},
            503: {"description": "no snapshot loaded yet"},
        },
    )
    async def predict_rows(name: ModelName, req: PredictRequest) -> JSONResponse:
        """Predictive mean, std (total, epistemic, aleatoric), intervals and anomaly scores."""
        t0 = time.perf_counter()
        holder = registry.get(name, create=False)
        if holder is not None and holder.current is not None:
            # A loaded model answers inline: ~1 ms of tensor work, cheaper than a
            # hop to the thread pool and back.  The snapshot is read once here.
            loaded = holder.current
        else:  # may read Redis: off the event loop
            loaded = await run_in_threadpool(holder_loaded, name)
        body = _predict_body(name, loaded, req, api)
        QUERY_SECONDS.labels(endpoint="predict").observe(time.perf_counter() - t0)
        return JSONResponse(body)

    app.include_router(ops)
    app.include_router(v1)
    limit = api.max_rows * (api.max_features + 1) * _BYTES_PER_NUMBER + 65536
    app.add_middleware(_BodyLimit, limit=limit)  # type: ignore[arg-type]
    return app
