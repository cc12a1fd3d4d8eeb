"""Cached posterior ensembles for the query service, kept current from Redis.

A :class:`ModelHolder` owns one model's *loaded* snapshot: the metadata, the
posterior state's config and an ensemble of S posterior weight samples as
stacked tensors (seeded by the snapshot version, so two servers answer alike),
optionally stored as 8-bit codes.  Reloading builds the new :class:`Loaded`
completely and then swaps one reference; a request reads that reference once
and uses it to the end, so the previous version answers until the new one is
ready and no request sees half of each.

The watcher thread blocks on the store's events stream
(:meth:`~fogline.daemon.stream.store.SnapshotStore.wait_for_version`, woken by every new
or rolled-back version) in chunks of at most ``poll_s``; each chunk first
re-reads ``latest``, so a missed event is caught by polling.  When Redis is
unavailable the holder keeps answering from what it has and retries with
:func:`~fogline.daemon.stream.store.retry_backoff`.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import structlog
import torch

from fogline.daemon.metrics import QUERY_RELOADS, QUERY_SNAPSHOT_VERSION
from fogline.daemon.stream.store import (
    PartitionStore,
    SnapshotMeta,
    SnapshotNotFound,
    SnapshotStore,
    retry_backoff,
)
from fogline.models.autoregressive import SeriesState, stored_series
from fogline.models.config import ModelConfig
from fogline.models.predictive import Ensemble, Prediction, predict, sample_ensemble
from fogline.models.quantize import QuantizedEnsemble, quantization_report, quantize_ensemble
from fogline.models.schema import DataSchema
from fogline.models.serialize import from_bytes
from fogline.models.spec import ModelSpec
from fogline.models.state import PosteriorState
from fogline.models.units import predict_raw

log = structlog.get_logger(__name__)

StoreFactory = Callable[[str], SnapshotStore]


@dataclass(frozen=True)
class Loaded:
    """One loaded snapshot, ready to answer (immutable; swapped whole on reload)."""

    meta: SnapshotMeta
    config: ModelConfig
    ensemble: Ensemble
    quantized: QuantizedEnsemble | None
    #: Accuracy loss of the 8-bit ensemble vs float32 (``None`` unless quantised).
    quantization: dict[str, Any] | None
    loaded_at: float
    load_seconds: float
    #: The state's named columns and fitted transforms (``None``: identity, named by ``config``).
    schema: DataSchema | None = None
    #: Autoregressive models: the spec and each key's series state at this snapshot.
    series: tuple[ModelSpec, SeriesState] | None = None

    @property
    def data_schema(self) -> DataSchema:
        """The schema answers are mapped through (identity for old states)."""
        return (
            self.schema if self.schema is not None else DataSchema.identity(self.config.features())
        )

    @property
    def version(self) -> int:
        """Snapshot version."""
        return self.meta.version

    def predict(
        self,
        x_nd: torch.Tensor,
        levels: tuple[float, ...],
        y: torch.Tensor | None = None,
        method: str = "mixture",
    ) -> Prediction:
        """Predictive summaries from the cached (or 8-bit) ensemble."""
        ens = self.quantized.dequantize() if self.quantized is not None else self.ensemble
        return predict(ens, x_nd, levels=levels, y=y, method=method)

    def predict_raw(
        self,
        x_raw: torch.Tensor,
        levels: tuple[float, ...],
        y_raw: torch.Tensor | None = None,
        method: str = "mixture",
    ) -> Prediction:
        """Predictive summaries in target units for raw rows (:func:`fogline.models.units.predict_raw`).

        Raises :class:`~fogline.models.schema.SchemaError` naming the column
        and row a transform cannot take.
        """
        ens = self.quantized.dequantize() if self.quantized is not None else self.ensemble
        return predict_raw(ens, self.data_schema, x_raw, levels, y_raw, method)


def load_snapshot(
    store: SnapshotStore, version: int | None, ensemble_size: int, quantize: bool
) -> Loaded:
    """Read ``version`` (default latest), verify it, and build its ensemble.

    The ensemble generator is seeded with the snapshot version.  Raises the
    store's errors and :class:`fogline.models.serialize.SnapshotFormatError`.
    """
    t0 = time.perf_counter()
    snap = store.read(version)
    return loaded_state(snap.meta, from_bytes(snap.blob), ensemble_size, quantize, t0)


def loaded_state(
    meta: SnapshotMeta, state: PosteriorState, ensemble_size: int, quantize: bool, t0: float
) -> Loaded:
    """``state``'s ensemble (seeded with ``meta.version``), quantized when asked, as :class:`Loaded`.

    ``t0`` is the ``time.perf_counter()`` at which loading began (``load_seconds``).
    """
    ens = sample_ensemble(state, num_samples=ensemble_size, seed=meta.version)
    quantized = report = None
    if quantize:
        quantized = quantize_ensemble(ens)
        report = quantization_report(ens, quantized)
    return Loaded(
        meta=meta,
        config=state.config,
        ensemble=ens,
        quantized=quantized,
        quantization=report,
        loaded_at=time.time(),
        load_seconds=time.perf_counter() - t0,
        schema=state.schema,
        series=stored_series(state.extra),
    )


class ModelHolder:
    """The current :class:`Loaded` snapshot of one model, reloaded by a watcher thread.

    Parameters
    ----------
    store
        The model's store (the holder closes it in :meth:`stop`).
    ensemble_size
        S, the posterior samples cached.
    quantize
        Keep the ensemble as 8-bit codes (see :mod:`fogline.models.quantize`).
    poll_s
        Longest block on the events stream before ``latest`` is re-read.
    primary
        Update the ``fogline_query_snapshot_version`` gauge from this model.
    """

    def __init__(
        self,
        store: SnapshotStore,
        *,
        ensemble_size: int = 100,
        quantize: bool = False,
        poll_s: float = 0.2,
        primary: bool = False,
    ) -> None:
        self.store = store
        self.name = store.model_name
        self.ensemble_size = ensemble_size
        self.quantize = quantize
        self.poll_s = poll_s
        self.primary = primary
        self._current: Loaded | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._reload_lock = threading.Lock()
        #: Last error of the watcher (``None`` after a good load).
        self.last_error: str | None = None

    @property
    def current(self) -> Loaded | None:
        """The snapshot answering now (read it once per request)."""
        return self._current

    def reload(self, version: int | None = None) -> Loaded:
        """Load ``version`` (default latest) and make it current; returns it."""
        with self._reload_lock:
            loaded = load_snapshot(self.store, version, self.ensemble_size, self.quantize)
            previous = self._current
            self._current = loaded
        if self.primary:
            QUERY_SNAPSHOT_VERSION.set(loaded.version)
        QUERY_RELOADS.inc()
        self.last_error = None
        log.info(
            "snapshot_loaded",
            model=self.name,
            snapshot_version=loaded.version,
            previous_version=previous.version if previous else None,
            load_ms=round(loaded.load_seconds * 1e3, 2),
            quantized=self.quantize,
        )
        return loaded

    def start(self) -> None:
        """Start the watcher thread (loads the first snapshot as soon as one exists)."""
        if self._thread is not None:
            return
        self._thread = threading.Thread(target=self._watch, name=f"reload-{self.name}", daemon=True)
        self._thread.start()

    def stop(self, timeout_s: float = 5.0) -> None:
        """Stop the watcher and close the store."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout_s)
        self.store.close()

    def _watch(self) -> None:
        attempt = 0
        while not self._stop.is_set():
            cur = self._current
            try:
                latest = self.store.wait_for_version(cur.version if cur else None, self.poll_s)
                if latest is not None and (cur is None or latest != cur.version):
                    self.reload(latest)
                attempt = 0
            except SnapshotNotFound as exc:
                # latest moved on (retention) between the event and the read: try again
                self.last_error = str(exc)
            except Exception as exc:  # StoreError, SnapshotFormatError, anything else:
                # the watcher must outlive any one failure, or reloads stop for good
                self.last_error = f"{type(exc).__name__}: {exc}"
                with contextlib.suppress(Exception):  # even a broken log stream
                    log.warning("snapshot_reload_failed", model=self.name, error=self.last_error)
                self._stop.wait(retry_backoff(attempt, cap_s=5.0))
                attempt += 1


class Registry:
    """The holders of every model the service has been asked about.

    The primary model (``settings.model_name``) is watched from the start;
    other models under the prefix get a holder on first request, up to
    ``max_models``.
    """

    def __init__(
        self,
        store_factory: StoreFactory,
        primary: str,
        *,
        ensemble_size: int = 100,
        quantize: bool = False,
        poll_s: float = 0.2,
        max_models: int = 32,
    ) -> None:
        self.store_factory = store_factory
        self.primary = primary
        self.ensemble_size = ensemble_size
        self.quantize = quantize
        self.poll_s = poll_s
        self.max_models = max_models
        self._holders: dict[str, ModelHolder] = {}
        self._lock = threading.Lock()
        #: Store of the primary model, used for listings.
        self.catalog = store_factory(primary)

    def _new_holder(self, name: str) -> ModelHolder:
        holder = ModelHolder(
            self.store_factory(name),
            ensemble_size=self.ensemble_size,
            quantize=self.quantize,
            poll_s=self.poll_s,
            primary=name == self.primary,
        )
        holder.start()
        return holder

    def start(self) -> None:
        """Watch the primary model."""
        with self._lock:
            if self.primary not in self._holders:
                self._holders[self.primary] = self._new_holder(self.primary)

    def get(self, name: str, *, create: bool = True) -> ModelHolder | None:
        """The holder of ``name``, loading it now when it has a snapshot.

        Returns ``None`` when the model has no snapshot (or the cap is reached).
        Raises the store's errors.
        """
        holder = self._holders.get(name)
        if holder is not None or not create:
            return holder
        store = self.store_factory(name)
        try:
            if store.latest_version() is None:
                return None
        finally:
            store.close()
        with self._lock:
            holder = self._holders.get(name)
            if holder is None:
                if len(self._holders) >= self.max_models:
                    return None
                holder = self._holders[name] = self._new_holder(name)
        if holder.current is None:
            holder.reload()
        return holder

    def holders(self) -> dict[str, ModelHolder]:
        """Snapshot of the holders by name."""
        return dict(self._holders)

    def stop(self) -> None:
        """Stop every watcher and close the stores."""
        with self._lock:
            holders = list(self._holders.values())
            self._holders.clear()
        for holder in holders:
            holder.stop()
        self.catalog.close()


# -- keyed mode: one posterior per key ---------------------------------------------
def load_key(store: PartitionStore, key: str, ensemble_size: int, quantize: bool) -> Loaded | None:
    """The ensemble of ``key``'s last checkpointed state, or ``None`` for an unknown key.

    Found without knowing which daemon owns the key: the key index names its
    version and the blob lies under the key's own name
    (:class:`~fogline.daemon.stream.store.PartitionStore`).  The ensemble
    generator is seeded with the key's version.  The metadata is the key's:
    ``version`` its partition checkpoint, ``drift`` its drift mode.
    """
    t0 = time.perf_counter()
    info = store.key_info(key)
    blob = store.read_key(key) if info is not None else None
    if info is None or blob is None:
        return None
    state = from_bytes(blob)
    version = max(1, int(info.get("version", 1)))
    meta = SnapshotMeta(
        model_name=store.model_name,
        version=version,
        created_at=time.time(),
        records_absorbed=state.records_absorbed,
        checksum=str(info.get("checksum", "")),
        drift={"mode": info.get("drift_mode", "none"), "partition": info.get("partition")},
        size=len(blob),
    )
    return loaded_state(meta, state, ensemble_size, quantize, t0)


class KeyedReader:
    """Key ensembles of keyed models, cached by (model, key) and kept current by checksum.

    Each request reads the key's index entry (one ``HGET``); the cached ensemble
    is reused while the entry's checksum is unchanged, else rebuilt from the
    key's blob.  At most ``cap`` ensembles are kept (least recently used leave).
    """

    def __init__(
        self,
        store_factory: Callable[[str], PartitionStore],
        *,
        ensemble_size: int,
        quantize: bool,
        cap: int = 256,
    ) -> None:
        self.store_factory = store_factory
        self.ensemble_size = ensemble_size
        self.quantize = quantize
        self.cap = cap
        self._cache: OrderedDict[tuple[str, str], tuple[str, Loaded]] = OrderedDict()
        self._lock = threading.Lock()

    def keys(self, name: str) -> dict[str, dict[str, Any]]:
        """Every key of model ``name`` with its index entry."""
        store = self.store_factory(name)
        try:
            return store.key_index()
        finally:
            store.close()

    def loaded(self, name: str, key: str) -> Loaded | None:
        """The current ensemble of ``key`` of model ``name`` (``None``: unknown key)."""
        store = self.store_factory(name)
        try:
            info = store.key_info(key)
            if info is None:
                return None
            checksum = str(info.get("checksum", ""))
            with self._lock:
                hit = self._cache.get((name, key))
                if hit is not None and hit[0] == checksum:
                    self._cache.move_to_end((name, key))
                    return hit[1]
            loaded = load_key(store, key, self.ensemble_size, self.quantize)
        finally:
            store.close()
        if loaded is None:
            return None
        with self._lock:
            self._cache[(name, key)] = (loaded.meta.checksum, loaded)
            while len(self._cache) > self.cap:
                self._cache.popitem(last=False)
        return loaded
