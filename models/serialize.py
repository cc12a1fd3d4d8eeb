"""Bit-exact (de)serialisation of a :class:`PosteriorState`: safetensors + JSON.

Layout of the bytes: one safetensors file.  Tensors are stored under
``params.<name>``, ``opt.<name>``, ``prior.loc``, ``prior.scale``,
``aux.<name>`` and ``rng_state``; the safetensors header metadata holds one key ``fogline`` whose
value is a JSON document::

    {"schema_version": 2, "config": {...ModelConfig...}, "lr": ..., "step_count": ...,
     "offsets": {"topic:partition": next_offset}, "records_absorbed": ...,
     "extra": {...}, "fingerprints": {"topic:partition": {"offset": o, "sha256": "<hex>"}},
     "checksum": "<sha256>"}

``schema`` (written only when the state has one: the named columns and
their fitted transforms, :class:`~fogline.models.schema.DataSchema`) is under
the checksum like every header field.

``fingerprints`` (written only when the state has some, so older schema-2 blobs
round-trip unchanged) identifies, per partition, the last record absorbed or
dead-lettered before its offset (:class:`~fogline.models.state.RecordFingerprint`);
like every header field it is under the checksum.  A blob without it restores
with no fingerprints (the daemon then skips the recreated-topic check).

``checksum`` covers every byte that is restored (schema 2)::

    sha256( canonical_json(header without "checksum") || 0x00 ||
            for each tensor in sorted name order: name|dtype|shape| raw bytes )

where ``canonical_json`` is ``json.dumps(sort_keys=True, separators=(",", ":"),
allow_nan=False)``.  :func:`from_bytes` recomputes it from the header it
parsed and the tensors it loaded *before* reading any field, so a forged or
flipped offset, ``records_absorbed``, ``lr``, config or ``extra`` value is
rejected like a flipped tensor byte (schema 1 hashed the tensors only).  No
pickle is involved.  ``to_bytes(from_bytes(b)) == b`` for every ``b`` this
module wrote.

Schema-1 blobs (header outside the checksum) are refused by :func:`from_bytes`;
:func:`upgrade_schema1` re-signs one deliberately (see ``docs/snapshots.md``).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from fogline.models.config import ModelConfig
from fogline.models.schema import DataSchema
from fogline.models.state import PosteriorState, PriorSpec, RecordFingerprint

SCHEMA_VERSION = 2
#: The previous layout: tensors checksummed, header not (read only by :func:`upgrade_schema1`).
LEGACY_SCHEMA_VERSION = 1


class SnapshotFormatError(ValueError):
    """The bytes are not a valid fogline state (bad header, schema or checksum)."""


def _canonical(meta: dict[str, Any]) -> str:
    return json.dumps(meta, sort_keys=True, allow_nan=False, separators=(",", ":"))


def _raw(t: torch.Tensor) -> memoryview:
    """The bytes of ``t`` in memory order (CPU, contiguous), without a copy.

    A view of the tensor's own memory (it keeps the tensor alive): hashed and
    joined into the blob as they are, where ``tobytes`` copied each tensor once
    more before both.
    """
    if not t.numel():
        return memoryview(b"")
    if t.dtype is torch.bfloat16:  # numpy has no bfloat16: its bytes as uint8
        return t.reshape(-1).view(torch.uint8).numpy().data
    return t.numpy().data.cast("B")


def checksum(tensors: dict[str, torch.Tensor], header: dict[str, Any] | None = None) -> str:
    """SHA-256 over ``header`` (canonical JSON, its ``checksum`` key left out) and the
    names, dtypes, shapes and bytes of ``tensors`` (sorted by name).

    ``header=None`` hashes the tensors only (the schema-1 digest).
    """
    cpu = {n: t.detach().cpu().contiguous() for n, t in tensors.items()}
    header_json = (
        None if header is None else _canonical({k: v for k, v in header.items() if k != "checksum"})
    )
    return _digest(cpu, {n: _raw(t) for n, t in cpu.items()}, header_json)


def _digest(
    tensors: Mapping[str, torch.Tensor],
    raw: Mapping[str, memoryview],
    header_json: str | None,
) -> str:
    """:func:`checksum` of CPU-contiguous ``tensors`` whose bytes are ``raw`` already and
    whose header's canonical JSON (without ``checksum``) is ``header_json``."""
    h = hashlib.sha256()
    if header_json is not None:
        h.update(header_json.encode())
        h.update(b"\x00")
    for name, prefix in _layout(tensors).prefixes:
        h.update(prefix)
        h.update(raw[name])
    return h.hexdigest()


#: safetensors dtype names, with the rank its writer orders tensors by (highest first).
_ST_DTYPES: dict[torch.dtype, tuple[str, int]] = {
    torch.bool: ("BOOL", 0),
    torch.uint8: ("U8", 1),
    torch.int8: ("I8", 2),
    torch.int16: ("I16", 3),
    torch.float16: ("F16", 5),
    torch.bfloat16: ("BF16", 6),
    torch.int32: ("I32", 7),
    torch.float32: ("F32", 9),
    torch.float64: ("F64", 10),
    torch.int64: ("I64", 11),
}


@dataclass(frozen=True)
class _Layout:
    """What a blob's names, dtypes and shapes alone decide (the same for every key of a
    model): the digest's per-tensor prefixes ``name|dtype|shape|`` in name order, and
    the safetensors data order with its header's tensor entries (``,"name":{...}`` each,
    offsets included; ``order`` None where a dtype is outside :data:`_ST_DTYPES`)."""

    prefixes: tuple[tuple[str, bytes], ...]
    order: tuple[str, ...] | None
    entries: str


#: Layouts by (name, dtype, shape) of each tensor, in the dict's order.
_LAYOUTS: dict[tuple[tuple[str, torch.dtype, torch.Size], ...], _Layout] = {}
_LAYOUTS_MAX = 64


def _layout(tensors: Mapping[str, torch.Tensor]) -> _Layout:
    """The :class:`_Layout` of ``tensors``, built once per distinct signature."""
    sig = tuple((n, t.dtype, t.shape) for n, t in tensors.items())
    got = _LAYOUTS.get(sig)
    if got is not None:
        return got
    prefixes = tuple(
        (n, f"{n}|{tensors[n].dtype}|{tuple(tensors[n].shape)}|".encode()) for n in sorted(tensors)
    )
    order: tuple[str, ...] | None = None
    entries = ""
    if all(t.dtype in _ST_DTYPES for t in tensors.values()):
        order = tuple(sorted(tensors, key=lambda n: (-_ST_DTYPES[tensors[n].dtype][1], n)))
        parts, at = [], 0
        for n in order:
            t = tensors[n]
            size = t.numel() * t.element_size()
            entry = {
                "dtype": _ST_DTYPES[t.dtype][0],
                "shape": list(t.shape),
                "data_offsets": [at, at + size],
            }
            parts.append(f",{_compact(n)}:{_compact(entry)}")
            at += size
        entries = "".join(parts)
    got = _Layout(prefixes, order, entries)
    if len(_LAYOUTS) >= _LAYOUTS_MAX:
        _LAYOUTS.clear()
    _LAYOUTS[sig] = got
    return got


def _compact(value: Any) -> str:
    """JSON as safetensors writes its header: compact, unescaped non-ASCII."""
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def _st_encode(
    tensors: Mapping[str, torch.Tensor], raw: Mapping[str, memoryview], metadata: dict[str, str]
) -> bytes:
    """The safetensors file of ``tensors`` (bytes ``raw``), byte for byte what
    ``safetensors.torch.save(tensors, metadata=metadata)`` writes, without its
    per-tensor Python overhead (a key blob is small: that overhead was most of
    its cost).

    Layout: 8-byte little-endian header length, the header (compact JSON:
    ``__metadata__``, then each tensor's dtype, shape and ``data_offsets`` in
    data order), space-padded to a multiple of 8, then the tensors' bytes,
    ordered by dtype rank (highest first), then name.  A dtype outside
    :data:`_ST_DTYPES` falls back to safetensors itself.
    """
    lay = _layout(tensors)
    if lay.order is None:
        return st_save(_distinct(tensors), metadata=metadata)
    # {"__metadata__": ..., then the tensors in data order}: the layout's cached entries
    hb = f'{{"__metadata__":{_compact(metadata)}{lay.entries}}}'.encode()
    hb += b" " * (-len(hb) % 8)
    return b"".join([len(hb).to_bytes(8, "little"), hb, *(raw[n] for n in lay.order)])


def offsets_to_json(offsets: Mapping[tuple[str, int], int]) -> dict[str, int]:
    """``{(topic, partition): next}`` as the JSON spelling ``{"topic:partition": next}``, sorted.

    The serialisation boundary: in memory offsets are keyed by tuples only.

    >>> offsets_to_json({("t", 1): 5, ("t", 0): 9})
    {'t:0': 9, 't:1': 5}
    """
    return {f"{t}:{p}": int(v) for (t, p), v in sorted(offsets.items())}


def offsets_from_json(raw: Mapping[str, Any]) -> dict[tuple[str, int], int]:
    """Inverse of :func:`offsets_to_json` (the topic is everything before the last ``:``)."""
    out: dict[tuple[str, int], int] = {}
    for key, value in raw.items():
        topic, sep, part = str(key).rpartition(":")
        if not sep or not topic:
            raise SnapshotFormatError(f"offset key {key!r} is not 'topic:partition'")
        out[topic, int(part)] = int(value)
    return out


def fingerprints_to_json(
    prints: Mapping[tuple[str, int], RecordFingerprint],
) -> dict[str, dict[str, Any]]:
    """``{(topic, partition): fingerprint}`` as ``{"topic:partition": {"offset", "sha256"}}``.

    >>> fingerprints_to_json({("t", 0): RecordFingerprint(9, "ab")})
    {'t:0': {'offset': 9, 'sha256': 'ab'}}
    """
    return {
        f"{t}:{p}": {"offset": int(fp.offset), "sha256": str(fp.digest)}
        for (t, p), fp in sorted(prints.items())
    }


def fingerprints_from_json(raw: Mapping[str, Any]) -> dict[tuple[str, int], RecordFingerprint]:
    """Inverse of :func:`fingerprints_to_json`."""
    out: dict[tuple[str, int], RecordFingerprint] = {}
    for key, value in raw.items():
        (tp,) = offsets_from_json({key: 0})
        try:
            out[tp] = RecordFingerprint(int(value["offset"]), str(value["sha256"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise SnapshotFormatError(f"fingerprint of {key!r} is malformed: {exc}") from exc
    return out


def state_tensors(state: PosteriorState, *, distinct: bool = True) -> dict[str, torch.Tensor]:
    """The state's tensors by storage name (on CPU, contiguous; with ``distinct``, a
    tensor whose storage another entry already uses is copied, as safetensors'
    own writer requires: :func:`to_bytes`' writer reads views as they are)."""
    out: dict[str, torch.Tensor] = {}
    for k, v in state.params.items():
        out[f"params.{k}"] = v
    for k, v in state.opt_state.items():
        out[f"opt.{k}"] = v
    out["prior.loc"] = state.prior.loc
    out["prior.scale"] = state.prior.scale
    for k, v in state.aux.items():
        out[f"aux.{k}"] = v
    out["rng_state"] = state.rng_state
    res = {
        # the usual case (a CPU, contiguous tensor without grad) as it is, no new wrapper
        k: v
        if v.is_cpu and not v.requires_grad and v.is_contiguous()
        else v.detach().cpu().contiguous()
        for k, v in out.items()
    }
    return _distinct(res) if distinct else res


def _distinct(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``tensors`` with a copy of each one whose storage an earlier entry already uses
    (e.g. a key's params and moments, views of one row; aux holding the prior itself):
    safetensors' writer wants one owner per storage."""
    res: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for k, t in tensors.items():
        ptr = t.untyped_storage().data_ptr() if t.numel() else 0
        res[k] = t.clone() if ptr and ptr in seen else t
        seen.add(ptr)
    return res


#: Canonical JSON of the header's immutable shared parts, by object: a model's frozen
#: ModelConfig and DataSchema are the same objects in every key's state (id -> (obj, JSON)).
_SHARED_JSON: dict[int, tuple[object, str]] = {}
_SHARED_JSON_MAX = 64


def _shared_json(obj: ModelConfig | DataSchema) -> str:
    """``_canonical`` of a frozen config's or schema's JSON form, encoded once per object."""
    got = _SHARED_JSON.get(id(obj))
    if got is not None and got[0] is obj:
        return got[1]
    text = _canonical(
        obj.model_dump(mode="json") if isinstance(obj, ModelConfig) else obj.to_dict()
    )
    if len(_SHARED_JSON) >= _SHARED_JSON_MAX:
        _SHARED_JSON.clear()
    _SHARED_JSON[id(obj)] = (obj, text)
    return text


def header_json(state: PosteriorState) -> str:
    """The canonical JSON of ``state``'s header without ``checksum`` (the module docstring).

    Equal to ``_canonical`` of the header dict, assembled in its sorted key order
    (config < extra < fingerprints < lr < offsets < records_absorbed < schema <
    schema_version < step_count) from the shared parts' cached encodings
    (:func:`_shared_json`) and one encoding of the per-state fields; the
    checksum a reader recomputes from the parsed header (:func:`checksum`)
    would reject any other text.
    """
    middle: dict[str, Any] = {
        "extra": state.extra,
        "lr": state.lr,
        "offsets": offsets_to_json(state.offsets),
        "records_absorbed": state.records_absorbed,
    }
    if state.fingerprints:
        middle["fingerprints"] = fingerprints_to_json(state.fingerprints)
    schema = "" if state.schema is None else f',"schema":{_shared_json(state.schema)}'
    tail = _canonical({"schema_version": SCHEMA_VERSION, "step_count": state.step_count})
    return f'{{"config":{_shared_json(state.config)},{_canonical(middle)[1:-1]}{schema},{tail[1:]}'


def to_bytes(state: PosteriorState) -> bytes:
    """Serialise ``state`` (see the module docstring)."""
    tensors = state_tensors(state, distinct=False)  # the writer reads shared views as they are
    raw = {n: _raw(t) for n, t in tensors.items()}
    # the header's canonical JSON is hashed as it is, then the checksum goes in front:
    # "checksum" sorts before every other key, so the result is canonical too
    text = header_json(state)
    signed = f'{{"checksum":"{_digest(tensors, raw, text)}",{text[1:]}'
    return _st_encode(tensors, raw, {"fogline": signed})


def read_header(blob: bytes) -> dict[str, Any]:
    """The JSON metadata of a serialised state, without loading tensors."""
    if len(blob) < 8:
        raise SnapshotFormatError("blob too short for a safetensors header")
    n = int.from_bytes(blob[:8], "little")
    if n <= 0 or 8 + n > len(blob):
        raise SnapshotFormatError("corrupt safetensors header length")
    try:
        header = json.loads(blob[8 : 8 + n])
        meta = json.loads(header["__metadata__"]["fogline"])
    except (ValueError, KeyError, TypeError) as exc:
        raise SnapshotFormatError(f"not a fogline state: {exc}") from exc
    if not isinstance(meta, dict):
        raise SnapshotFormatError("fogline metadata is not an object")
    return meta


def _load_tensors(blob: bytes) -> dict[str, torch.Tensor]:
    try:
        return st_load(blob)
    except Exception as exc:  # safetensors raises its own error types
        raise SnapshotFormatError(f"unreadable tensors: {exc}") from exc


def from_bytes(blob: bytes, device: torch.device | str = "cpu") -> PosteriorState:
    """Deserialise bytes written by :func:`to_bytes`; verifies schema and checksum.

    Raises :class:`SnapshotFormatError` for anything but an intact schema-2 blob
    (a schema-1 blob names :func:`upgrade_schema1`).
    """
    meta = read_header(blob)
    schema = meta.get("schema_version")
    if schema == LEGACY_SCHEMA_VERSION:
        raise SnapshotFormatError(
            "schema_version 1: its header (offsets, records_absorbed, extra) is not covered by "
            "the checksum, so it is not restored; re-sign it deliberately with "
            "fogline.models.serialize.upgrade_schema1 (see docs/snapshots.md)"
        )
    if schema != SCHEMA_VERSION:
        raise SnapshotFormatError(
            f"schema_version {schema!r} is not supported (expected {SCHEMA_VERSION})"
        )
    tensors = _load_tensors(blob)
    try:
        digest = checksum(tensors, meta)
    except ValueError as exc:  # e.g. NaN in an edited header: not canonical JSON
        raise SnapshotFormatError(f"header is not canonical JSON: {exc}") from exc
    if digest != meta.get("checksum"):
        raise SnapshotFormatError("checksum mismatch: the snapshot is corrupt or was edited")
    return _restore(meta, tensors, device)


def upgrade_schema1(blob: bytes) -> bytes:
    """Re-serialise a schema-1 blob as schema 2 (its tensor checksum is verified first).

    Schema 1 did not cover the header, so this trusts its offsets,
    ``records_absorbed`` and ``extra`` as they are: run it only on a blob you
    know was not edited.
    """
    meta = read_header(blob)
    if meta.get("schema_version") != LEGACY_SCHEMA_VERSION:
        raise SnapshotFormatError(f"not a schema-1 blob: {meta.get('schema_version')!r}")
    tensors = _load_tensors(blob)
    if checksum(tensors) != meta.get("checksum"):
        raise SnapshotFormatError("checksum mismatch: the schema-1 snapshot is corrupt")
    return to_bytes(_restore(meta, tensors, "cpu"))


def _restore(
    meta: dict[str, Any], tensors: dict[str, torch.Tensor], device: torch.device | str
) -> PosteriorState:
    params = {k[len("params.") :]: v for k, v in tensors.items() if k.startswith("params.")}
    opt = {k[len("opt.") :]: v for k, v in tensors.items() if k.startswith("opt.")}
    aux = {k[len("aux.") :]: v for k, v in tensors.items() if k.startswith("aux.")}
    dev = torch.device(device)
    state = PosteriorState(
        config=ModelConfig.model_validate(meta["config"]),
        params=params,
        opt_state=opt,
        prior=PriorSpec(tensors["prior.loc"], tensors["prior.scale"]),
        lr=float(meta["lr"]),
        step_count=int(meta["step_count"]),
        rng_state=tensors["rng_state"],
        offsets=offsets_from_json(meta["offsets"]),
        records_absorbed=int(meta["records_absorbed"]),
        fingerprints=fingerprints_from_json(meta.get("fingerprints") or {}),
        extra=dict(meta["extra"]),
        aux=aux,
        schema=_schema(meta.get("schema")),
    )
    if dev.type != "cpu":
        moved = state.to(dev)
        if state.rng_state.numel() != torch.get_rng_state().numel():
            # the stored state is already the accelerator generator's: keep it (bit-exact resume)
            return moved.replace(rng_state=state.rng_state)
        return moved
    return state


def _schema(raw: Any) -> DataSchema | None:
    if raw is None:
        return None
    try:
        return DataSchema.from_dict(raw)
    except (KeyError, TypeError, ValueError) as exc:
        raise SnapshotFormatError(f"schema is malformed: {exc}") from exc


def save(state: PosteriorState, path: str) -> None:
    """Write ``state`` to a file (``.safetensors``)."""
    with open(path, "wb") as fh:
        fh.write(to_bytes(state))


def load(path: str, device: torch.device | str = "cpu") -> PosteriorState:
    """Read a state file written by :func:`save`."""
    with open(path, "rb") as fh:
        return from_bytes(fh.read(), device)
