"""Versioned posterior snapshots in Redis: the only module that imports redis.

The store keeps opaque blobs (fogline writes safetensors bytes from
``models.serialize.to_bytes``) with a metadata hash; it never imports
``models``.  Key layout for model ``m`` under prefix ``p`` (see
``docs/snapshots.md``)::

    p:m:snap:{version}   blob (bytes)
    p:m:meta:{version}   hash of SnapshotMeta fields (dicts as JSON)
    p:m:versions         sorted set, member = score = version
    p:m:latest           version the readers use
    p:m:counter          last version number handed out (INCR)
    p:m:lease            writer lease token (SET NX PX)
    p:m:events           stream of {kind: new|rollback, version, previous},
                         and a pub/sub channel of the same name

Atomicity
---------
A write is one MULTI/EXEC holding ``SET <staging key> blob`` and one Lua
script; Redis runs the whole transaction as a single atomic unit.  The script
checks the lease token (on failure it deletes the staging key and replies an
error: nothing is written), INCRs the counter, RENAMEs the staging key to
``snap:{v}``, HSETs the metadata, ZADDs the version, SETs ``latest``, trims to
the newest ``retention`` versions (deleting their blob and metadata), XADDs the
event (``MAXLEN ~ 1000``) and PUBLISHes it.  The blob never passes through Lua.
A version's keys are written once and deleted together, so a reader that
reads a version's metadata and blob in one MULTI/EXEC gets a matching pair or
nothing.  The script computes key names from the prefix, so the store needs
one Redis (not Redis Cluster).

Failures
--------
Connection problems (refused, reset, timeout, server loading, read-only
replica) surface as :class:`StoreUnavailable` and nothing else, so the daemon
can pause its partitions and retry after :func:`retry_backoff`.  Each command
is retried once by the client when the connection drops (a pooled
connection is stale after a Redis restart), never after a timeout; backoff
beyond that is the caller's.  The store updates no
Prometheus metrics: its callers time it.  It logs ``snapshot_written`` (debug)
and ``snapshot_rolled_back`` (info) with structlog.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from types import TracebackType
from typing import TYPE_CHECKING, Any, Final, Generic, Self, TypeVar

import redis
import structlog
from pydantic import BaseModel, ConfigDict, Field
from redis.backoff import EqualJitterBackoff, NoBackoff
from redis.retry import Retry

from fogline.daemon.names import MODEL_NAME_RE, mask_url_credentials, process_identity

if TYPE_CHECKING:
    from fogline.daemon.config import Settings

__all__ = [
    "SCHEMA_VERSION",
    "CorruptSnapshot",
    "IntactScan",
    "Lease",
    "LeaseLost",
    "PartitionManifest",
    "PartitionStore",
    "Snapshot",
    "SnapshotMeta",
    "SnapshotNotFound",
    "SnapshotStore",
    "StoreError",
    "StoreUnavailable",
    "retry_backoff",
]

#: Version of the metadata layout written by this module; bump it (and the
#: CHANGELOG) whenever a field changes meaning.
SCHEMA_VERSION: Final = 1
#: Approximate length cap of the events stream.
EVENTS_MAXLEN: Final = 1000

_MODEL_NAME = MODEL_NAME_RE
#: Expiry of a staging key whose script did not run (removed on success).
_STAGING_TTL_MS: Final = 600_000
#: Replies meaning "not now" rather than "wrong": the caller backs off and retries.
_UNAVAILABLE_ERRORS: Final = (
    redis.ConnectionError,  # refused, reset, LOADING (BusyLoadingError), too many clients
    redis.TimeoutError,
    redis.exceptions.NoScriptError,  # script cache emptied by a restart: a retry reloads it
    redis.exceptions.ReadOnlyError,  # failover: connected to a replica
    redis.exceptions.MasterDownError,
    redis.exceptions.ClusterDownError,
    redis.exceptions.TryAgainError,
    redis.exceptions.OutOfMemoryError,  # maxmemory reached
)
_UNAVAILABLE_REPLIES: Final = ("MISCONF", "BUSY")  # no exception class of their own

log = structlog.get_logger(__name__)


# --------------------------------------------------------------------------
# errors
# --------------------------------------------------------------------------
class StoreError(Exception):
    """Base class of every error raised by :class:`SnapshotStore`."""


class StoreUnavailable(StoreError):
    """Redis cannot be reached or refuses work for now; retry after a backoff."""


class SnapshotNotFound(StoreError, LookupError):
    """No such version (or no snapshot at all) for this model."""


class CorruptSnapshot(StoreError):
    """A blob does not match its checksum, or its metadata cannot be read."""


class LeaseLost(StoreError):
    """The writer lease is no longer held by this owner; the write did nothing."""


# --------------------------------------------------------------------------
# records
# --------------------------------------------------------------------------
class SnapshotMeta(BaseModel):
    """Metadata of one snapshot version (stored as a Redis hash).

    ``model_cfg`` is stored and serialised under the name ``model_config``
    (pydantic reserves that attribute name): read it as ``meta.model_cfg``.
    """

    model_config = ConfigDict(frozen=True, validate_by_name=True, validate_by_alias=True)

    schema_version: int = SCHEMA_VERSION
    model_name: str
    version: int = Field(ge=1)
    #: Unix time (s) of the write, taken by the writer.
    created_at: float
    records_absorbed: int = Field(ge=0)
    #: ``"topic:partition"`` -> the NEXT offset to read.
    offsets: dict[str, int] = Field(default_factory=dict)
    #: sha256 hex digest of the blob.
    checksum: str
    model_cfg: dict[str, Any] = Field(default_factory=dict, alias="model_config")
    #: JSON slot for drift detector / policy state.
    drift: dict[str, Any] = Field(default_factory=dict)
    #: Who wrote it (lease owner, else ``host:pid``).
    writer: str = ""
    #: Blob length in bytes.
    size: int = Field(default=0, ge=0)

    def to_hash(self) -> dict[str, str]:
        """Field -> string mapping as stored in Redis (dicts as JSON)."""
        out: dict[str, str] = {}
        for key, value in self.model_dump(by_alias=True).items():
            out[key] = json.dumps(value, sort_keys=True) if isinstance(value, dict) else str(value)
        return out

    @classmethod
    def from_hash(cls, raw: Mapping[Any, Any]) -> SnapshotMeta:
        """Inverse of :meth:`to_hash`; raises :class:`CorruptSnapshot` on bad data."""
        data: dict[str, Any] = {}
        for k, v in raw.items():
            key = k.decode() if isinstance(k, bytes) else k
            data[key] = v.decode() if isinstance(v, bytes) else v
        try:
            for key in ("offsets", "model_config", "drift"):
                if key in data:
                    data[key] = json.loads(data[key])
            return cls.model_validate(data)
        except ValueError as exc:  # json or pydantic
            raise CorruptSnapshot(f"unreadable snapshot metadata: {exc}") from None


@dataclass(frozen=True)
class Snapshot:
    """A verified snapshot: metadata plus the blob whose sha256 matches it."""

    meta: SnapshotMeta
    blob: bytes


T = TypeVar("T")


@dataclass(frozen=True)
class IntactScan(Generic[T]):
    """What :meth:`SnapshotStore.newest_intact` found.

    ``snapshot`` and ``value`` (what the verify callback returned for it) are
    ``None`` when no version is intact; ``latest`` is the version ``latest``
    pointed to (``None``: the pointer is missing); ``versions`` every version
    found, newest first; ``skipped`` ``(version, why)`` for each one rejected
    before the one returned.  ``fallback`` is true when the snapshot returned
    is not the one ``latest`` names.
    """

    snapshot: Snapshot | None
    value: T | None
    latest: int | None
    versions: tuple[int, ...]
    skipped: tuple[tuple[int, str], ...]

    @property
    def fallback(self) -> bool:
        """True when the snapshot found is not ``latest`` (missing or not intact)."""
        return self.snapshot is not None and self.snapshot.meta.version != self.latest


@dataclass(frozen=True)
class Lease:
    """Proof of the exclusive right to write snapshots of one model."""

    key: str
    owner: str
    token: str
    ttl_s: float


def retry_backoff(attempt: int, *, base_s: float = 0.1, cap_s: float = 10.0) -> float:
    """Seconds to wait before retry number ``attempt`` (0-based): redis-py's equal jitter.

    :class:`redis.backoff.EqualJitterBackoff` computes ``d = min(cap_s, base_s * 2**attempt)``
    and returns a value uniform in ``[d/2, d]``, so waits grow, never exceed
    ``cap_s``, and many clients do not retry in lockstep.  ``attempt`` is
    clamped at 64 (``d`` has long reached ``cap_s`` by then).

    >>> 0.05 <= retry_backoff(0) <= 0.1 and 5.0 <= retry_backoff(1000) <= 10.0
    True
    """
    if attempt < 0:
        raise ValueError("attempt must be >= 0")
    return float(EqualJitterBackoff(cap=cap_s, base=base_s).compute(min(attempt, 64)))


# --------------------------------------------------------------------------
# Lua scripts (run atomically by Redis)
# --------------------------------------------------------------------------
# Runs inside MULTI right after ``SET staging blob``, so the blob never passes
# through Lua (copying it into and out of the script costs ~4x a plain SET).
# KEYS: counter, versions, latest, events, lease, staging
# ARGV: base, lease token ("" = no lease), retention, maxlen, then meta field/value pairs
_WRITE_LUA = """
local base = ARGV[1]
if ARGV[2] ~= '' then
  if redis.call('GET', KEYS[5]) ~= ARGV[2] then
    redis.call('DEL', KEYS[6])
    return redis.error_reply('FOGLINE_LEASE_LOST lease not held')
  end
end
local v = redis.call('INCR', KEYS[1])
local top = redis.call('ZREVRANGE', KEYS[2], 0, 0, 'WITHSCORES')
if top[2] and v <= tonumber(top[2]) then
  v = tonumber(top[2]) + 1
  redis.call('SET', KEYS[1], v)
end
redis.call('RENAME', KEYS[6], base .. ':snap:' .. v)
redis.call('PERSIST', base .. ':snap:' .. v)
local meta = base .. ':meta:' .. v
redis.call('DEL', meta)
local fields = {'version', tostring(v)}
for i = 5, #ARGV do fields[#fields + 1] = ARGV[i] end
redis.call('HSET', meta, unpack(fields))
redis.call('ZADD', KEYS[2], v, v)
local previous = redis.call('GET', KEYS[3]) or ''
redis.call('SET', KEYS[3], v)
local keep = tonumber(ARGV[3])
local n = redis.call('ZCARD', KEYS[2])
if n > keep then
  local old = redis.call('ZRANGE', KEYS[2], 0, n - keep - 1)
  for _, o in ipairs(old) do
    redis.call('DEL', base .. ':snap:' .. o, base .. ':meta:' .. o)
  end
  redis.call('ZREMRANGEBYRANK', KEYS[2], 0, n - keep - 1)
end
redis.call('XADD', KEYS[4], 'MAXLEN', '~', ARGV[4], '*',
  'kind', 'new', 'version', v, 'previous', previous)
redis.call('PUBLISH', KEYS[4],
  '{"kind":"new","version":' .. v .. ',"previous":"' .. previous .. '"}')
return v
"""

# KEYS: latest, versions, events; ARGV: base, version, maxlen
_ROLLBACK_LUA = """
if not redis.call('ZSCORE', KEYS[2], ARGV[2])
   or redis.call('EXISTS', ARGV[1] .. ':meta:' .. ARGV[2]) == 0
   or redis.call('EXISTS', ARGV[1] .. ':snap:' .. ARGV[2]) == 0 then
  return redis.error_reply('FOGLINE_NO_SUCH_VERSION ' .. ARGV[2])
end
local previous = redis.call('GET', KEYS[1]) or ''
redis.call('SET', KEYS[1], ARGV[2])
redis.call('XADD', KEYS[3], 'MAXLEN', '~', ARGV[3], '*',
  'kind', 'rollback', 'version', ARGV[2], 'previous', previous)
redis.call('PUBLISH', KEYS[3],
  '{"kind":"rollback","version":' .. ARGV[2] .. ',"previous":"' .. previous .. '"}')
return previous
"""

# KEYS: lease; ARGV: token, ttl_ms
_RENEW_LUA = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""

# KEYS: lease; ARGV: token
_RELEASE_LUA = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


def _glob_escape(text: str) -> str:
    return re.sub(r"([\\*?\[\]])", r"\\\1", text)


def _to_int(raw: Any) -> int | None:
    if raw is None or raw is False:
        return None
    return int(raw.decode() if isinstance(raw, bytes) else raw)


# --------------------------------------------------------------------------
# the store
# --------------------------------------------------------------------------
class SnapshotStore:
    """Snapshots, writer lease and version events of one model in Redis.

    Parameters
    ----------
    url_or_client
        ``redis://``/``rediss://``/``unix://`` URL, or a ``redis.Redis``
        created with ``decode_responses=False``.
    model_name
        Letters, digits, ``.``, ``_``, ``-`` (it becomes part of key names).
    prefix
        First part of every key (default ``fogline``).
    retention
        Versions kept; older ones are deleted by the write that exceeds it.
    password
        Overrides a password in the URL.
    socket_timeout
        Seconds for an ordinary command (``None``: wait forever).  Blocking
        reads (:meth:`wait_for_version`) are cut into chunks shorter than it.
    """

    def __init__(
        self,
        url_or_client: str | redis.Redis,
        model_name: str,
        *,
        prefix: str = "fogline",
        retention: int = 20,
        password: str | None = None,
        socket_timeout: float | None = 5.0,
    ) -> None:
        if not _MODEL_NAME.match(model_name):
            raise ValueError(f"model name {model_name!r}: use letters, digits, '.', '_', '-'")
        if not prefix:
            raise ValueError("prefix must not be empty")
        if retention < 1:
            raise ValueError("retention must be >= 1")
        if isinstance(url_or_client, str):
            self._client: redis.Redis = redis.Redis.from_url(
                url_or_client,
                password=password,
                socket_timeout=socket_timeout,
                socket_connect_timeout=socket_timeout,
                # One immediate retry on a dropped connection (stale pool after a
                # restart); not on timeouts, which could run a write twice.
                retry=Retry(NoBackoff(), 1, supported_errors=(redis.ConnectionError,)),
                decode_responses=False,
            )
            self._owns_client = True
            #: The URL as shown in messages and CLI output: its password masked.
            self.url = mask_url_credentials(url_or_client)
        else:
            if url_or_client.get_encoder().decode_responses:
                raise ValueError(
                    "the redis client must use decode_responses=False (blobs are bytes)"
                )
            self._client = url_or_client
            self._owns_client = False
            kw = url_or_client.connection_pool.connection_kwargs
            socket_timeout = kw.get("socket_timeout")
            self.url = f"redis://{kw.get('host', '?')}:{kw.get('port', '?')}/{kw.get('db', 0)}"
        self.model_name = model_name
        self.prefix = prefix
        self.retention = retention
        self.socket_timeout = socket_timeout
        self.base = f"{prefix}:{model_name}"
        self.keys_latest = f"{self.base}:latest"
        self.keys_versions = f"{self.base}:versions"
        self.keys_counter = f"{self.base}:counter"
        self.keys_lease = f"{self.base}:lease"
        #: Stream key and pub/sub channel announcing new / rolled-back versions.
        self.events_key = f"{self.base}:events"
        self._write = self._client.register_script(_WRITE_LUA)
        self._rollback = self._client.register_script(_ROLLBACK_LUA)
        self._renew = self._client.register_script(_RENEW_LUA)
        self._release = self._client.register_script(_RELEASE_LUA)

    @classmethod
    def from_settings(cls, settings: Settings, model_name: str | None = None) -> SnapshotStore:
        """A store configured from ``settings.redis`` for ``settings.model_name``."""
        r = settings.redis
        return cls(
            r.url,
            model_name or settings.model_name,
            prefix=r.prefix,
            retention=r.retention,
            password=r.password.get_secret_value() if r.password else None,
            socket_timeout=r.socket_timeout_s,
        )

    # -- plumbing ----------------------------------------------------------
    def snap_key(self, version: int) -> str:
        """Key of the blob of ``version``."""
        return f"{self.base}:snap:{version}"

    def meta_key(self, version: int) -> str:
        """Key of the metadata hash of ``version``."""
        return f"{self.base}:meta:{version}"

    @contextmanager
    def _guard(self, op: str) -> Iterator[None]:
        try:
            yield
        except _UNAVAILABLE_ERRORS as exc:
            raise StoreUnavailable(
                f"redis unavailable at {self.url} ({op}): {type(exc).__name__}: {exc}"
            ) from exc
        except redis.ResponseError as exc:
            # Errors inside a pipeline read "Command # 2 (...) caused error: <reply>".
            reply = str(exc).rsplit("caused error: ", 1)[-1]
            if reply.startswith(_UNAVAILABLE_REPLIES):
                raise StoreUnavailable(f"redis refused {op} at {self.url}: {exc}") from exc
            raise

    def ping(self) -> bool:
        """True when Redis answers; never raises."""
        try:
            return bool(self._client.ping())
        except redis.RedisError:
            return False

    def close(self) -> None:
        """Close the connections (only when the store created the client)."""
        if self._owns_client:
            self._client.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- writing -----------------------------------------------------------
    def write(
        self,
        blob: bytes,
        *,
        records_absorbed: int,
        offsets: Mapping[str, int],
        model_config: Mapping[str, Any] | None = None,
        drift: Mapping[str, Any] | None = None,
        lease: Lease | None = None,
        writer: str | None = None,
    ) -> SnapshotMeta:
        """Store ``blob`` as the new latest version, atomically; return its metadata.

        ``offsets`` maps ``"topic:partition"`` to the next offset to read.
        With ``lease`` the write happens only while that lease is held (else
        :class:`LeaseLost` and nothing is written).  Without one, nothing is
        checked (tools and tests).  Raises :class:`StoreUnavailable`.
        """
        created_at = time.time()
        meta = SnapshotMeta(
            model_name=self.model_name,
            version=1,  # placeholder: the script assigns the real version
            created_at=created_at,
            records_absorbed=records_absorbed,
            offsets=dict(offsets),
            checksum=hashlib.sha256(blob).hexdigest(),
            model_config=dict(model_config or {}),
            drift=dict(drift or {}),
            writer=writer or (lease.owner if lease else process_identity()),
            size=len(blob),
        )
        fields = [x for kv in meta.to_hash().items() if kv[0] != "version" for x in kv]
        # The blob goes to a private staging key in the same MULTI/EXEC as the
        # script, which renames it into place (or deletes it if the lease is lost).
        staging = f"{self.base}:staging:{uuid.uuid4().hex}"
        keys = [self.keys_counter, self.keys_versions, self.keys_latest, self.events_key]
        keys += [lease.key if lease else self.keys_lease, staging]
        args: list[Any] = [self.base, lease.token if lease else "", self.retention]
        args += [EVENTS_MAXLEN, *fields]
        with self._guard("write"):
            try:
                pipe = self._client.pipeline(transaction=True)
                # The TTL only matters if the script never ran (NOSCRIPT after a
                # restart between script load and EXEC): the orphan then expires.
                pipe.set(staging, blob, px=_STAGING_TTL_MS)
                self._write(keys=keys, args=args, client=pipe)
                version = int(pipe.execute()[1])
            except redis.ResponseError as exc:
                if "FOGLINE_LEASE_LOST" in str(exc):
                    assert lease is not None
                    raise LeaseLost(
                        f"lease on {self.model_name!r} not held by {lease.owner!r}; "
                        f"snapshot not written"
                    ) from None
                raise
        meta = meta.model_copy(update={"version": version})
        log.debug(
            "snapshot_written",
            model=self.model_name,
            snapshot_version=version,
            bytes=len(blob),
            records_absorbed=records_absorbed,
        )
        return meta

    def rollback(self, version: int) -> SnapshotMeta:
        """Point ``latest`` at the existing ``version``, atomically, and announce it.

        Emits an event ``kind=rollback`` (stream and channel) and logs
        ``snapshot_rolled_back``.  A running daemon keeps writing newer
        versions on top; stop it first to keep the rollback.  Raises
        :class:`SnapshotNotFound` for a version that is not (or no longer) kept.
        """
        keys = [self.keys_latest, self.keys_versions, self.events_key]
        with self._guard("rollback"):
            try:
                raw = self._rollback(keys=keys, args=[self.base, int(version), EVENTS_MAXLEN])
            except redis.ResponseError as exc:
                if "FOGLINE_NO_SUCH_VERSION" in str(exc):
                    raise SnapshotNotFound(
                        f"model {self.model_name!r} has no snapshot version {version}"
                    ) from None
                raise
        previous = _to_int(raw) if raw not in (b"", "") else None
        log.info(
            "snapshot_rolled_back",
            model=self.model_name,
            snapshot_version=int(version),
            previous_version=previous,
        )
        return self.read_meta(version)

    # -- reading -----------------------------------------------------------
    def latest_version(self) -> int | None:
        """The version readers use now, or ``None`` when there is no snapshot."""
        with self._guard("latest_version"):
            return _to_int(self._client.get(self.keys_latest))

    def read(self, version: int | None = None) -> Snapshot:
        """Blob and metadata of ``version`` (default: latest), checksum verified.

        Raises :class:`SnapshotNotFound`, :class:`CorruptSnapshot` or
        :class:`StoreUnavailable`.
        """
        blob, raw_meta, version = self._fetch(version, with_blob=True)
        meta = SnapshotMeta.from_hash(raw_meta)
        if blob is None:
            raise CorruptSnapshot(f"snapshot {self.model_name!r} v{version}: blob missing")
        digest = hashlib.sha256(blob).hexdigest()
        if digest != meta.checksum:
            raise CorruptSnapshot(
                f"snapshot {self.model_name!r} v{version}: checksum {digest[:12]}… "
                f"!= recorded {meta.checksum[:12]}…"
            )
        if meta.schema_version > SCHEMA_VERSION:
            raise CorruptSnapshot(
                f"snapshot {self.model_name!r} v{version}: schema {meta.schema_version} is newer "
                f"than this fogline understands ({SCHEMA_VERSION})"
            )
        return Snapshot(meta=meta, blob=blob)

    def read_meta(self, version: int | None = None) -> SnapshotMeta:
        """Metadata of ``version`` (default: latest) without the blob."""
        _, raw_meta, _ = self._fetch(version, with_blob=False)
        return SnapshotMeta.from_hash(raw_meta)

    def _fetch(
        self, version: int | None, *, with_blob: bool
    ) -> tuple[bytes | None, dict[bytes, bytes], int]:
        with self._guard("read"):
            if version is not None:
                v = int(version)
                blob, raw_meta = self._fetch_version(v, with_blob)
                if not raw_meta:
                    raise SnapshotNotFound(f"model {self.model_name!r} has no snapshot version {v}")
                return blob, raw_meta, v
            # A version's keys are written once and deleted together, so the
            # pair read in one MULTI belongs together; it is only missing when
            # `retention` writes trimmed it after we read `latest`: read again.
            previous: int | None = None
            while True:
                latest = _to_int(self._client.get(self.keys_latest))
                if latest is None:
                    raise SnapshotNotFound(f"model {self.model_name!r} has no snapshot")
                blob, raw_meta = self._fetch_version(latest, with_blob)
                if raw_meta:
                    return blob, raw_meta, latest
                if latest == previous:
                    raise CorruptSnapshot(
                        f"model {self.model_name!r}: latest points to missing version {latest}"
                    )
                previous = latest

    def _fetch_version(self, v: int, with_blob: bool) -> tuple[bytes | None, dict[bytes, bytes]]:
        pipe = self._client.pipeline(transaction=True)
        pipe.hgetall(self.meta_key(v))
        if with_blob:
            pipe.get(self.snap_key(v))
        out = pipe.execute()
        return (out[1] if with_blob else None), out[0]

    def version_numbers(self) -> list[int]:
        """Every version with a metadata hash or in the versions set, newest first.

        The set is the index; the ``meta:*`` scan also finds versions whose
        index entry was lost (e.g. a hand-deleted key).
        """
        with self._guard("version_numbers"):
            found = {_to_int(m) for m in self._client.zrange(self.keys_versions, 0, -1)}
            head = f"{self.base}:meta:"
            for k in self._client.scan_iter(match=f"{_glob_escape(head)}*", count=500):
                tail = (k.decode() if isinstance(k, bytes) else str(k))[len(head) :]
                if tail.isdigit():
                    found.add(int(tail))
        return sorted((v for v in found if v is not None), reverse=True)

    def newest_intact(self, verify: Callable[[Snapshot], T]) -> IntactScan[T]:
        """``latest`` if it is intact, else the newest intact version (``latest`` untouched).

        A version is intact when its metadata parses, its blob's sha256 matches
        the recorded checksum (:meth:`read`) and ``verify(snapshot)`` returns
        without raising (the caller decodes the blob there; the store stays
        ignorant of what a blob holds).  Its return value comes back as
        ``IntactScan.value``, so nothing is decoded twice.  Versions are tried
        ``latest`` first, then newest first; :class:`StoreUnavailable` propagates.
        """
        latest = self.latest_version()
        versions = self.version_numbers()
        order = ([latest] if latest is not None else []) + [v for v in versions if v != latest]
        skipped: list[tuple[int, str]] = []
        for v in order:
            try:
                snap = self.read(v)
            except (SnapshotNotFound, CorruptSnapshot) as exc:
                skipped.append((v, str(exc)))
                continue
            try:
                value = verify(snap)
            except StoreUnavailable:
                raise
            except Exception as exc:  # any decode failure means "not intact"
                skipped.append((v, f"{type(exc).__name__}: {exc}"))
                continue
            return IntactScan(snap, value, latest, tuple(versions), tuple(skipped))
        return IntactScan(None, None, latest, tuple(versions), tuple(skipped))

    def list_versions(self) -> list[SnapshotMeta]:
        """Metadata of every kept version, newest first."""
        with self._guard("list_versions"):
            members = self._client.zrevrange(self.keys_versions, 0, -1)
            pipe = self._client.pipeline(transaction=False)
            for m in members:
                pipe.hgetall(self.meta_key(_to_int(m) or 0))
            raws = pipe.execute() if members else []
        return [SnapshotMeta.from_hash(r) for r in raws if r]

    def list_models(self) -> list[str]:
        """Names of the models with a snapshot under this store's prefix, sorted."""
        head, tail = f"{self.prefix}:", ":latest"
        with self._guard("list_models"):
            keys = self._client.scan_iter(match=f"{_glob_escape(self.prefix)}:*{tail}", count=500)
            names = {
                (k.decode() if isinstance(k, bytes) else k)[len(head) : -len(tail)] for k in keys
            }
        return sorted(n for n in names if _MODEL_NAME.match(n))

    def wait_for_version(self, after: int | None, timeout_s: float) -> int | None:
        """Block until ``latest`` differs from ``after``; return it, or ``None`` on timeout.

        Returns at once when it already differs (``after=None``: as soon as any
        snapshot exists).  Wakes on the events stream (``XREAD BLOCK``), so a
        rollback counts as a change too.  The block is cut into chunks below
        the socket timeout, since redis-py would otherwise abort the read.
        """
        deadline = time.monotonic() + max(0.0, timeout_s)
        with self._guard("wait_for_version"):
            pipe = self._client.pipeline(transaction=True)
            pipe.xrevrange(self.events_key, count=1)
            pipe.get(self.keys_latest)
            last_events, raw_latest = pipe.execute()
            last_id: bytes | str = last_events[0][0] if last_events else b"0-0"
            latest = _to_int(raw_latest)
            # Half the socket timeout leaves the server ample time to answer.
            chunk_s = None if self.socket_timeout is None else max(0.01, 0.5 * self.socket_timeout)
            while latest is None or latest == after:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return None
                block_s = remaining if chunk_s is None else min(remaining, chunk_s)
                resp = self._client.xread(
                    {self.events_key: last_id}, count=100, block=max(1, int(block_s * 1000))
                )
                entries = _stream_entries(resp)
                if entries:
                    last_id = entries[-1][0]
                    latest = _to_int(self._client.get(self.keys_latest))
            return latest

    def recent_events(self, count: int = 10) -> list[dict[str, str]]:
        """The newest ``count`` version events, oldest first.

        Each is ``{"id", "kind" ("new"|"rollback"), "version", "previous"}``
        (``previous`` is ``""`` when there was no latest version before).
        """
        with self._guard("recent_events"):
            raw = self._client.xrevrange(self.events_key, count=count)
        out = []
        for entry_id, fields in reversed(raw or []):
            event = {"id": entry_id.decode() if isinstance(entry_id, bytes) else str(entry_id)}
            for k, v in (fields or {}).items():
                key = k.decode() if isinstance(k, bytes) else str(k)
                event[key] = v.decode() if isinstance(v, bytes) else str(v)
            out.append(event)
        return out

    # -- lease -------------------------------------------------------------
    def acquire_lease(self, owner: str, ttl_s: float) -> Lease | None:
        """Take the writer lease for ``ttl_s`` seconds, or ``None`` if someone holds it."""
        token = f"{owner}|{uuid.uuid4().hex}"
        with self._guard("acquire_lease"):
            ok = self._client.set(self.keys_lease, token, nx=True, px=max(1, int(ttl_s * 1000)))
        if not ok:
            return None
        return Lease(key=self.keys_lease, owner=owner, token=token, ttl_s=ttl_s)

    def renew(self, lease: Lease) -> bool:
        """Extend ``lease`` by its ttl if still held; ``False`` means it was lost."""
        with self._guard("renew"):
            return bool(
                self._renew(keys=[lease.key], args=[lease.token, max(1, int(lease.ttl_s * 1000))])
            )

    def release(self, lease: Lease) -> bool:
        """Give the lease up if still held (``True`` when it was)."""
        with self._guard("release"):
            return bool(self._release(keys=[lease.key], args=[lease.token]))

    def lease_owner(self) -> str | None:
        """Owner named by the current lease holder, or ``None`` when free."""
        with self._guard("lease_owner"):
            raw = self._client.get(self.keys_lease)
        if raw is None:
            return None
        text = raw.decode() if isinstance(raw, bytes) else str(raw)
        return text.rsplit("|", 1)[0]

    # -- maintenance -------------------------------------------------------
    def purge(self) -> int:
        """Delete every key of this model (snapshots, pointers, lease, events); return count."""
        with self._guard("purge"):
            keys = list(self._client.scan_iter(match=f"{_glob_escape(self.base)}:*", count=500))
            return int(self._client.delete(*keys)) if keys else 0


def _stream_entries(resp: Any) -> list[tuple[Any, Any]]:
    """Entries of the single stream in an XREAD reply (RESP2 list or RESP3 map)."""
    if not resp:
        return []
    streams = resp.items() if isinstance(resp, dict) else resp
    out: list[tuple[Any, Any]] = []
    for _, entries in streams:
        # RESP3 may wrap the entries in one more list.
        if (
            entries
            and isinstance(entries[0], list)
            and entries[0]
            and isinstance(entries[0][0], list)
        ):
            entries = entries[0]
        out.extend((e[0], e[1]) for e in entries)
    return out


# --------------------------------------------------------------------------
# keyed mode: one posterior per key, snapshots and leases per (model, partition)
# --------------------------------------------------------------------------
#: Version of the keyed layout (partition manifests, key blobs, key index).
KEYED_SCHEMA_VERSION: Final = 1

# Runs inside MULTI right after the ``SET <staging i> blob`` of every dirty key.
# KEYS: lease, manifest, index, events, then n staging keys, then their n destinations
# ARGV: token, n, manifest field/value count m, m manifest pairs..., then n index values,
# the partition, the lease TTL in ms (the commit renews the lease it checked)
_PARTITION_COMMIT_LUA = """
local n = tonumber(ARGV[2])
if redis.call('GET', KEYS[1]) ~= ARGV[1] then
  for i = 5, 4 + n do redis.call('DEL', KEYS[i]) end  -- the staging keys only
  return redis.error_reply('FOGLINE_LEASE_LOST partition lease not held')
end
local m = tonumber(ARGV[3])
redis.call('PEXPIRE', KEYS[1], ARGV[3 + m + 2 * n + 2])  -- the token held: a renewal too
local v = redis.call('HINCRBY', KEYS[2], 'version', 1)
local fields = {}
for i = 1, m do fields[#fields + 1] = ARGV[3 + i] end
if #fields > 0 then redis.call('HSET', KEYS[2], unpack(fields)) end
for i = 1, n do
  local staging = KEYS[4 + i]
  local dest = KEYS[4 + n + i]
  redis.call('RENAME', staging, dest)
  redis.call('PERSIST', dest)
  local entry = string.gsub(ARGV[3 + m + 2 * i], '"__VERSION__"', tostring(v))
  redis.call('HSET', KEYS[3], ARGV[3 + m + 2 * i - 1], entry)
end
redis.call('XADD', KEYS[4], 'MAXLEN', '~', 1000, '*', 'kind', 'partition',
  'partition', ARGV[3 + m + 2 * n + 1], 'version', v, 'keys', n)
return v
"""

# KEYS: layout hash; ARGV: field/value pairs.  Writes the layout once; returns it.
_LAYOUT_LUA = """
if redis.call('EXISTS', KEYS[1]) == 0 then redis.call('HSET', KEYS[1], unpack(ARGV)) end
return redis.call('HGETALL', KEYS[1])
"""


@dataclass(frozen=True)
class PartitionManifest:
    """What a partition's last checkpoint recorded (``None`` fields: never checkpointed).

    ``offsets``: ``"topic:partition"`` -> next offset to read; ``version``: the
    partition's checkpoint counter; ``records_absorbed``: valid records of the
    partition absorbed by its keys; ``fingerprints``: ``"topic:partition"`` ->
    ``{"offset", "sha256"}`` of the record before the next offset (the
    recreated-topic check on resume; empty in a manifest written before it).
    """

    partition: int
    version: int
    offsets: dict[str, int]
    records_absorbed: int
    writer: str
    updated_at: float
    fingerprints: dict[str, dict[str, Any]] = field(default_factory=dict)
    #: ``keyed.fleet = "population"``: the partition's population (``Population.to_json``).
    population: dict[str, Any] | None = None


def _text(raw: Any) -> str:
    return raw.decode() if isinstance(raw, bytes) else str(raw)


def _bytes(raw: Any) -> bytes:
    return raw if isinstance(raw, bytes) else str(raw).encode()


class PartitionStore:
    """Redis layout of keyed mode (``keyed.enabled``): per-partition leases and manifests.

    Key layout for model ``m`` under prefix ``p``::

        p:m:keyed:layout         hash: topic, partitions, key_field, schema (written once)
        p:m:keyed:fleet          blob of the fleet prior every new key starts from (set once)
        p:m:keyed:part:{n}:lease writer lease of partition n (SET NX PX)
        p:m:keyed:part:{n}       manifest hash: version, offsets (JSON), records_absorbed, ...
        p:m:keyed:key:{key}      blob of one key's PosteriorState (safetensors)
        p:m:keyed:keys           hash key -> JSON {partition, version, records_absorbed,
                                 drift_mode, checksum}: the index the query service reads
        p:m:keyed:events         stream of partition checkpoints

    A partition checkpoint (:meth:`commit`) is one MULTI/EXEC: every dirty key's
    blob to a staging key, then one script that checks the partition's lease
    token (on failure it deletes the staging keys: nothing is written), bumps
    the manifest version, writes the manifest (next offsets), renames each
    staging key onto its key blob and updates the key index.  So a reader sees
    a partition's key blobs and its offsets change together, and a daemon that
    lost the partition's lease cannot write it.
    """

    def __init__(self, store: SnapshotStore) -> None:
        self._store = store
        self._client = store._client
        self.model_name = store.model_name
        self.base = f"{store.base}:keyed"
        self.layout_key = f"{self.base}:layout"
        self.fleet_key = f"{self.base}:fleet"
        self.index_key = f"{self.base}:keys"
        self.events_key = f"{self.base}:events"
        self._commit = self._client.register_script(_PARTITION_COMMIT_LUA)
        self._layout = self._client.register_script(_LAYOUT_LUA)
        self._renew = self._client.register_script(_RENEW_LUA)
        self._release = self._client.register_script(_RELEASE_LUA)

    @classmethod
    def from_settings(cls, settings: Settings) -> PartitionStore:
        """The keyed layout of ``settings.model_name`` in ``settings.redis``."""
        return cls(SnapshotStore.from_settings(settings))

    def close(self) -> None:
        """Close the underlying store's connections."""
        self._store.close()

    def part_key(self, partition: int) -> str:
        """Key of partition ``partition``'s manifest hash."""
        return f"{self.base}:part:{int(partition)}"

    def lease_key(self, partition: int) -> str:
        """Key of partition ``partition``'s writer lease."""
        return f"{self.part_key(partition)}:lease"

    def blob_key(self, key: str) -> str:
        """Key of the blob of source key ``key``."""
        return f"{self.base}:key:{key}"

    # -- layout ------------------------------------------------------------
    def ensure_layout(self, fields: Mapping[str, str]) -> dict[str, str]:
        """Store ``fields`` as the layout unless one is stored; return the stored one."""
        args = [x for kv in fields.items() for x in kv]
        with self._store._guard("keyed_layout"):
            raw = self._layout(keys=[self.layout_key], args=args)
        if isinstance(raw, dict):
            items = list(raw.items())
        else:
            items = list(zip(raw[::2], raw[1::2], strict=True))
        return {_text(k): _text(v) for k, v in items}

    def layout(self) -> dict[str, str]:
        """The stored layout (empty when no keyed daemon ever ran for this model)."""
        with self._store._guard("keyed_layout"):
            raw = self._client.hgetall(self.layout_key)
        return {_text(k): _text(v) for k, v in raw.items()}

    def fleet_blob(self, blob: bytes) -> bytes:
        """Store ``blob`` as the fleet prior unless one is stored; return the stored one.

        Every daemon of the group then starts new keys from the same bytes.
        """
        with self._store._guard("keyed_fleet"):
            pipe = self._client.pipeline(transaction=True)
            pipe.set(self.fleet_key, blob, nx=True)
            pipe.get(self.fleet_key)
            return _bytes(pipe.execute()[1])

    # -- leases ------------------------------------------------------------
    def acquire(self, partition: int, owner: str, ttl_s: float) -> Lease | None:
        """Take partition ``partition``'s writer lease, or ``None`` while someone holds it."""
        key = self.lease_key(partition)
        token = f"{owner}|{uuid.uuid4().hex}"
        with self._store._guard("acquire_partition_lease"):
            ok = self._client.set(key, token, nx=True, px=max(1, int(ttl_s * 1000)))
        return Lease(key=key, owner=owner, token=token, ttl_s=ttl_s) if ok else None

    def renew(self, lease: Lease) -> bool:
        """Extend ``lease`` if still held (``False``: lost)."""
        with self._store._guard("renew_partition_lease"):
            ms = max(1, int(lease.ttl_s * 1000))
            return bool(self._renew(keys=[lease.key], args=[lease.token, ms]))

    def release(self, lease: Lease) -> bool:
        """Give ``lease`` up if still held."""
        with self._store._guard("release_partition_lease"):
            return bool(self._release(keys=[lease.key], args=[lease.token]))

    def lease_owner(self, partition: int) -> str | None:
        """Owner of partition ``partition``'s lease, or ``None`` when free."""
        with self._store._guard("partition_lease_owner"):
            raw = self._client.get(self.lease_key(partition))
        return None if raw is None else _text(raw).rsplit("|", 1)[0]

    # -- reading -----------------------------------------------------------
    def manifest(self, partition: int) -> PartitionManifest | None:
        """Partition ``partition``'s last checkpoint, or ``None`` before the first."""
        with self._store._guard("read_manifest"):
            raw = self._client.hgetall(self.part_key(partition))
        if not raw:
            return None
        d = {_text(k): _text(v) for k, v in raw.items()}
        try:
            return PartitionManifest(
                partition=int(partition),
                version=int(d["version"]),
                offsets={str(k): int(v) for k, v in json.loads(d.get("offsets", "{}")).items()},
                records_absorbed=int(d.get("records_absorbed", 0)),
                writer=d.get("writer", ""),
                updated_at=float(d.get("updated_at", 0.0)),
                fingerprints=dict(json.loads(d.get("fingerprints", "{}"))),
                population=json.loads(d["population"]) if d.get("population") else None,
            )
        except (KeyError, ValueError) as exc:
            raise CorruptSnapshot(f"partition {partition} manifest unreadable: {exc}") from None

    def read_key(self, key: str) -> bytes | None:
        """The blob of ``key``'s last checkpointed state, or ``None`` for a key never written."""
        with self._store._guard("read_key"):
            raw = self._client.get(self.blob_key(key))
        return None if raw is None else _bytes(raw)

    def read_keys(self, keys: list[str]) -> dict[str, bytes]:
        """Blobs of the written ones among ``keys`` (one round trip)."""
        if not keys:
            return {}
        with self._store._guard("read_keys"):
            raws = self._client.mget([self.blob_key(k) for k in keys])
        return {k: _bytes(r) for k, r in zip(keys, raws, strict=True) if r is not None}

    def key_info(self, key: str) -> dict[str, Any] | None:
        """``key``'s index entry (partition, version, records_absorbed, drift_mode, checksum)."""
        with self._store._guard("key_info"):
            raw = self._client.hget(self.index_key, key)
        return None if raw is None else dict(json.loads(_text(raw)))

    def key_index(self) -> dict[str, dict[str, Any]]:
        """Every key's index entry."""
        with self._store._guard("key_index"):
            raw = self._client.hgetall(self.index_key)
        return {_text(k): dict(json.loads(_text(v))) for k, v in raw.items()}

    # -- writing -----------------------------------------------------------
    def commit(
        self,
        lease: Lease,
        partition: int,
        *,
        offsets: Mapping[str, int],
        records_absorbed: int,
        blobs: Mapping[str, bytes],
        entries: Mapping[str, Mapping[str, Any]],
        writer: str = "",
        fingerprints: Mapping[str, Mapping[str, Any]] | None = None,
        population: Mapping[str, Any] | None = None,
    ) -> int:
        """Write partition ``partition``'s checkpoint atomically; return its new version.

        ``blobs`` holds each dirty key's state, ``entries`` its index entry
        (the version is filled in by the script), ``fingerprints`` the record
        before each next offset (:attr:`PartitionManifest.fingerprints`).  The
        lease, checked in the same script, is extended by its TTL (a commit is a
        renewal: the pipeline counts it as one).  Raises :class:`LeaseLost`
        (nothing written) or :class:`StoreUnavailable`.
        """
        keys = sorted(blobs)
        uid = uuid.uuid4().hex
        staging = [f"{self.base}:staging:{uid}:{i}" for i in range(len(keys))]
        manifest = {
            "offsets": json.dumps(dict(offsets), sort_keys=True),
            "records_absorbed": str(int(records_absorbed)),
            "writer": writer or lease.owner,
            "updated_at": repr(time.time()),
            "schema_version": str(KEYED_SCHEMA_VERSION),
            "fingerprints": json.dumps(dict(fingerprints or {}), sort_keys=True),
        }
        if population is not None:
            manifest["population"] = json.dumps(dict(population), sort_keys=True)
        args: list[Any] = [lease.token, len(keys), 2 * len(manifest)]
        args += [x for kv in manifest.items() for x in kv]
        for k in keys:
            entry = dict(entries.get(k, {}), partition=int(partition), version="__VERSION__")
            entry["checksum"] = hashlib.sha256(blobs[k]).hexdigest()
            args += [k, json.dumps(entry, sort_keys=True)]
        args += [int(partition), max(1, int(lease.ttl_s * 1000))]
        script_keys = [lease.key, self.part_key(partition), self.index_key, self.events_key]
        script_keys += staging + [self.blob_key(k) for k in keys]
        with self._store._guard("partition_commit"):
            try:
                pipe = self._client.pipeline(transaction=True)
                for name, k in zip(staging, keys, strict=True):
                    pipe.set(name, blobs[k], px=_STAGING_TTL_MS)
                self._commit(keys=script_keys, args=args, client=pipe)
                version = int(pipe.execute()[-1])
            except redis.ResponseError as exc:
                if "FOGLINE_LEASE_LOST" in str(exc):
                    raise LeaseLost(
                        f"partition {partition} of {self.model_name!r}: lease not held by "
                        f"{lease.owner!r}; checkpoint not written"
                    ) from None
                raise
        log.debug(
            "partition_checkpoint_written",
            model=self.model_name,
            partition=int(partition),
            snapshot_version=version,
            keys=len(keys),
        )
        return version

    def purge(self) -> int:
        """Delete every keyed-mode key of this model; return the count."""
        with self._store._guard("keyed_purge"):
            keys = list(self._client.scan_iter(match=f"{_glob_escape(self.base)}:*", count=500))
            return int(self._client.delete(*keys)) if keys else 0
