"""Bit-exact (de)serialisation of a :class:`PosteriorState`: safetensors + JSON.

Layout of the bytes: one safetensors file.  Tensors are stored under
``params.<name>``, ``opt.<name>``, ``prior.loc``, ``prior.scale``,
``aux.<name>`` and ``rng_state``; the safetensors header metadata holds one key ``fogline`` whose
value is a JSON document::

    {"schema_version": 1, "config": {...ModelConfig...}, "lr": ..., "step_count": ...,
     "offsets": {...}, "records_absorbed": ..., "extra": {...}, "checksum": "<sha256>"}

``checksum`` is the SHA-256 of every tensor's name, dtype, shape and raw bytes
in sorted name order; :func:`from_bytes` verifies it.  No pickle is involved.
``to_bytes(from_bytes(b)) == b`` for every ``b`` this module wrote.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from fogline.models.config import ModelConfig
from fogline.models.state import PosteriorState, PriorSpec

SCHEMA_VERSION = 1


class SnapshotFormatError(ValueError):
    """The bytes are not a valid fogline state (bad header, schema or checksum)."""


def checksum(tensors: dict[str, torch.Tensor]) -> str:
    """SHA-256 over names, dtypes, shapes and bytes of ``tensors`` (sorted by name)."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def state_tensors(state: PosteriorState) -> dict[str, torch.Tensor]:
    """The state's tensors by storage name (on CPU, contiguous; a tensor whose
    storage another entry already uses is copied, as safetensors requires)."""
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
    res: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for k, v in out.items():
        t = v.detach().cpu().contiguous()
        ptr = t.untyped_storage().data_ptr() if t.numel() else 0
        if ptr and ptr in seen:  # e.g. aux holding the prior itself: safetensors wants one owner
            t = t.clone()
        seen.add(ptr)
        res[k] = t
    return res


def to_bytes(state: PosteriorState) -> bytes:
    """Serialise ``state`` (see the module docstring)."""
    tensors = state_tensors(state)
    meta: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION,
        "config": state.config.model_dump(mode="json"),
        "lr": state.lr,
        "step_count": state.step_count,
        "offsets": dict(sorted(state.offsets.items())),
        "records_absorbed": state.records_absorbed,
        "extra": state.extra,
        "checksum": checksum(tensors),
    }
    doc = json.dumps(meta, sort_keys=True, allow_nan=False, separators=(",", ":"))
    return st_save(tensors, metadata={"fogline": doc})


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


def from_bytes(blob: bytes, device: torch.device | str = "cpu") -> PosteriorState:
    """Deserialise bytes written by :func:`to_bytes`; verifies schema and checksum."""
    meta = read_header(blob)
    if meta.get("schema_version") != SCHEMA_VERSION:
        raise SnapshotFormatError(
            f"schema_version {meta.get('schema_version')!r} is not supported (expected {SCHEMA_VERSION})"
        )
    try:
        tensors = st_load(blob)
    except Exception as exc:  # safetensors raises its own error types
        raise SnapshotFormatError(f"unreadable tensors: {exc}") from exc
    if checksum(tensors) != meta.get("checksum"):
        raise SnapshotFormatError("checksum mismatch: the snapshot is corrupt")
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
        offsets={str(k): int(v) for k, v in meta["offsets"].items()},
        records_absorbed=int(meta["records_absorbed"]),
        extra=dict(meta["extra"]),
        aux=aux,
    )
    if dev.type != "cpu":
        moved = state.to(dev)
        if state.rng_state.numel() != torch.get_rng_state().numel():
            # the stored state is already the accelerator generator's: keep it (bit-exact resume)
            return moved.replace(rng_state=state.rng_state)
        return moved
    return state


def save(state: PosteriorState, path: str) -> None:
    """Write ``state`` to a file (``.safetensors``)."""
    with open(path, "wb") as fh:
        fh.write(to_bytes(state))


def load(path: str, device: torch.device | str = "cpu") -> PosteriorState:
    """Read a state file written by :func:`save`."""
    with open(path, "rb") as fh:
        return from_bytes(fh.read(), device)
