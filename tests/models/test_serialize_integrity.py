"""The blob's SHA-256 covers every restored byte: header fields as well as tensors.

Issue 11 item 6: schema 1 hashed the tensors only, so a blob whose header had
forged offsets (or records_absorbed, lr, extra...) was restored as if intact.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from fogline.models.config import ModelConfig
from fogline.models.serialize import (
    SnapshotFormatError,
    checksum,
    from_bytes,
    read_header,
    to_bytes,
    upgrade_schema1,
)
from fogline.models.state import RecordFingerprint
from fogline.models.svi import init_state

#: The fingerprint of the record before offset 14 004 of telemetry:0.
PRINT = RecordFingerprint.of(14_003, b"k", b'{"x": [1, 2], "y": 0}', 1_700_000_000_000)


@pytest.fixture(scope="module")
def blob() -> bytes:
    state = init_state(ModelConfig(in_features=2, hidden=(4,)), seed=0)
    state = state.replace(
        offsets={("telemetry", 0): 14_004, ("telemetry", 1): 7},
        records_absorbed=14_000,
        extra={"drift": {"mode": "stable", "alarms": 3}},
        fingerprints={("telemetry", 0): PRINT},
    )
    return to_bytes(state)


def _reheader(blob: bytes, meta: dict[str, Any]) -> bytes:
    """The same tensors under an edited header, written as a forger would (valid safetensors)."""
    doc = json.dumps(meta, sort_keys=True, separators=(",", ":"))
    return st_save(st_load(blob), metadata={"fogline": doc})


#: (field, forged value): every top-level header field a restore reads.
FORGERIES: list[tuple[str, Any]] = [
    ("offsets", {"telemetry:0": 1_000, "telemetry:1": 7}),
    ("offsets", {"telemetry:0": 14_004}),
    ("fingerprints", {"telemetry:0": {"offset": 14_003, "sha256": "0" * 64}}),
    ("fingerprints", {"telemetry:0": {"offset": 14_002, "sha256": PRINT.digest}}),
    ("fingerprints", {}),
    ("records_absorbed", 0),
    ("lr", 0.5),
    ("step_count", 99),
    ("extra", {"drift": {"mode": "recovering", "alarms": 3}}),
    ("config", {**ModelConfig(in_features=2, hidden=(4,)).model_dump(mode="json"), "hidden": [5]}),
]


@pytest.mark.parametrize(("field", "value"), FORGERIES)
def test_a_forged_header_field_is_rejected(blob: bytes, field: str, value: Any) -> None:
    meta = read_header(blob)
    assert meta[field] != value
    forged = _reheader(blob, {**meta, field: value})
    with pytest.raises(SnapshotFormatError, match="checksum"):
        from_bytes(forged)


def test_a_forger_who_recomputes_the_tensor_only_digest_is_rejected(blob: bytes) -> None:
    meta = read_header(blob)
    meta["offsets"] = {"telemetry:0": 1_000, "telemetry:1": 7}
    meta["checksum"] = checksum(st_load(blob))  # the schema-1 digest
    with pytest.raises(SnapshotFormatError, match="checksum"):
        from_bytes(_reheader(blob, meta))


def test_the_unedited_header_rewritten_is_accepted(blob: bytes) -> None:
    back = from_bytes(_reheader(blob, read_header(blob)))
    assert back.offsets == {("telemetry", 0): 14_004, ("telemetry", 1): 7}
    assert to_bytes(back) == blob


@settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(data=st.data())
def test_any_flipped_bit_is_rejected(blob: bytes, data: st.DataObject) -> None:
    n = int.from_bytes(blob[:8], "little")
    # half the flips land in the header (8-byte length + JSON), half anywhere
    pos = data.draw(st.one_of(st.integers(0, 8 + n - 1), st.integers(0, len(blob) - 1)))
    bit = data.draw(st.integers(0, 7))
    flipped = bytearray(blob)
    flipped[pos] ^= 1 << bit
    with pytest.raises(SnapshotFormatError):
        from_bytes(bytes(flipped))


def test_nan_in_an_edited_header_is_a_format_error(blob: bytes) -> None:
    meta = read_header(blob)
    doc = json.dumps({**meta, "lr": float("nan")}, sort_keys=True)
    forged = st_save(st_load(blob), metadata={"fogline": doc})
    with pytest.raises(SnapshotFormatError):
        from_bytes(forged)


def _schema1(blob: bytes, **edits: Any) -> bytes:
    meta = {**read_header(blob), "schema_version": 1, **edits}
    meta["checksum"] = checksum(st_load(blob))
    return _reheader(blob, meta)


def test_a_schema1_blob_is_refused_and_can_be_upgraded_deliberately(blob: bytes) -> None:
    old = _schema1(blob)
    with pytest.raises(SnapshotFormatError, match="upgrade_schema1"):
        from_bytes(old)
    assert upgrade_schema1(old) == blob
    tampered = bytearray(old)
    tampered[-3] ^= 0x01
    with pytest.raises(SnapshotFormatError, match="checksum"):
        upgrade_schema1(bytes(tampered))
    with pytest.raises(SnapshotFormatError, match="not a schema-1"):
        upgrade_schema1(blob)


def test_tensor_bytes_are_still_covered(blob: bytes) -> None:
    tensors = st_load(blob)
    tensors["params.loc"] = tensors["params.loc"] + torch.finfo(torch.float32).eps
    forged = st_save(tensors, metadata={"fogline": json.dumps(read_header(blob))})
    with pytest.raises(SnapshotFormatError, match="checksum"):
        from_bytes(forged)


def test_fingerprints_round_trip_under_the_checksum(blob: bytes) -> None:
    state = from_bytes(blob)
    assert state.fingerprints == {("telemetry", 0): PRINT}
    assert read_header(blob)["fingerprints"] == {
        "telemetry:0": {"offset": 14_003, "sha256": PRINT.digest}
    }
    assert to_bytes(state) == blob


def test_a_blob_from_before_fingerprints_restores_without_them_unchanged(blob: bytes) -> None:
    meta = {k: v for k, v in read_header(blob).items() if k not in ("fingerprints", "checksum")}
    tensors = st_load(blob)
    meta["checksum"] = checksum(tensors, meta)
    old = st_save(
        tensors, metadata={"fogline": json.dumps(meta, sort_keys=True, separators=(",", ":"))}
    )
    state = from_bytes(old)
    assert state.fingerprints == {} and state.offsets[("telemetry", 0)] == 14_004
    assert to_bytes(state) == old  # no empty field is added: old blobs stay bit for bit


def test_a_fingerprint_names_key_value_and_timestamp() -> None:
    base = RecordFingerprint.of(3, b"k", b"v", 5)
    assert base == RecordFingerprint.of(3, b"k", b"v", 5)
    others = [
        RecordFingerprint.of(3, None, b"v", 5),
        RecordFingerprint.of(3, b"", b"v", 5),
        RecordFingerprint.of(3, b"k", b"v2", 5),
        RecordFingerprint.of(3, b"k", None, 5),
        RecordFingerprint.of(3, b"k", b"v", None),
        RecordFingerprint.of(3, b"kv", b"", 5),  # the lengths keep key and value apart
    ]
    assert all(o.digest != base.digest for o in others)
    assert len({o.digest for o in others}) == len(others)


_DTYPES = (
    torch.bool,
    torch.uint8,
    torch.int8,
    torch.int16,
    torch.float16,
    torch.bfloat16,
    torch.int32,
    torch.float32,
    torch.float64,
    torch.int64,
)


def test_the_fast_writer_is_byte_for_byte_safetensors() -> None:
    """``to_bytes`` writes the safetensors file itself (no per-tensor overhead): same bytes."""
    from fogline.models.serialize import _raw, _st_encode

    tensors = {f"t{i}": (torch.arange(6) % 3).to(d).reshape(2, 3) for i, d in enumerate(_DTYPES)}
    tensors |= {"empty": torch.zeros(0), "scalar": torch.tensor(3.0), "a": torch.ones(5)}
    meta = {"fogline": json.dumps({"s": 'quote " slash \\ nl \n ctl \u0001 utf8 é'})}
    raw = {n: _raw(t) for n, t in tensors.items()}
    assert _st_encode(tensors, raw, meta) == st_save(tensors, metadata=meta)
    state = init_state(ModelConfig(in_features=3, hidden=(5, 4)), seed=1)
    blob = to_bytes(state)
    header = read_header(blob)
    assert blob == st_save(
        st_load(blob),
        metadata={"fogline": json.dumps(header, sort_keys=True, separators=(",", ":"))},
    )
    assert to_bytes(from_bytes(blob)) == blob


def test_raw_is_each_tensors_bytes_without_a_copy() -> None:
    """``_raw``: a view of the tensor's own memory (no ``tobytes`` copy), the same bytes as
    the uint8 reinterpretation for every dtype the writer takes (bfloat16, which numpy
    lacks, included), for 0-d, empty and 2-d tensors."""
    from fogline.models.serialize import _raw

    for dtype in _DTYPES:
        for t in (
            (torch.arange(6) % 3).to(dtype).reshape(2, 3),
            torch.tensor(1).to(dtype),
            torch.zeros(0, dtype=dtype),
        ):
            view = _raw(t)
            assert bytes(view) == t.reshape(-1).view(torch.uint8).numpy().tobytes(), dtype
            assert view.nbytes == t.numel() * t.element_size()
    t = torch.arange(4, dtype=torch.float32)
    view = _raw(t)
    t[0] = 7.0  # a view: it sees the tensor's memory, not a copy taken before
    assert bytes(view[:4]) == torch.tensor(7.0).numpy().tobytes()


@pytest.mark.parametrize("schema", [False, True])
@pytest.mark.parametrize("prints", [False, True])
def test_the_assembled_header_is_the_canonical_json_of_the_header(
    schema: bool, prints: bool
) -> None:
    """``header_json`` splices the cached encodings of the shared config and schema into
    one encoding of the per-state fields: the text must be exactly ``json.dumps(header,
    sort_keys=True, separators=(",", ":"))``, with the checksum in front in the blob."""
    from fogline.models.schema import DataSchema
    from fogline.models.serialize import SCHEMA_VERSION, header_json

    state = init_state(ModelConfig(in_features=2, hidden=(4,)), seed=0).replace(
        offsets={("telemetry", 0): 14_004, ("telemetry", 1): 7},
        records_absorbed=14_000,
        lr=0.0125,
        extra={"drift": {"mode": "stable", "alarms": 3}, "key": 'h\u00e9\u0000"x'},
    )
    if prints:
        state = state.replace(fingerprints={("telemetry", 0): PRINT})
    if schema:
        state = state.replace(schema=DataSchema.identity(["a", "b"], "y"))
    reference: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION,
        "config": state.config.model_dump(mode="json"),
        "lr": state.lr,
        "step_count": state.step_count,
        "offsets": {"telemetry:0": 14_004, "telemetry:1": 7},
        "records_absorbed": 14_000,
        "extra": state.extra,
    }
    if prints:
        reference["fingerprints"] = {
            "telemetry:0": {"offset": PRINT.offset, "sha256": PRINT.digest}
        }
    if schema:
        assert state.schema is not None
        reference["schema"] = state.schema.to_dict()
    canonical = json.dumps(reference, sort_keys=True, allow_nan=False, separators=(",", ":"))
    for _ in range(2):  # the second call reads the shared parts from the cache
        assert header_json(state) == canonical
    blob = to_bytes(state)
    stored = st_load_metadata(blob)
    digest = json.loads(stored)["checksum"]
    assert stored == json.dumps(
        {**reference, "checksum": digest}, sort_keys=True, allow_nan=False, separators=(",", ":")
    )
    assert to_bytes(from_bytes(blob)) == blob


def st_load_metadata(blob: bytes) -> str:
    """The ``fogline`` metadata string of a safetensors blob, as written."""
    n = int.from_bytes(blob[:8], "little")
    return str(json.loads(blob[8 : 8 + n])["__metadata__"]["fogline"])


def test_views_of_one_row_are_written_without_copies_and_the_same_bytes() -> None:
    """A batched key step leaves a key's params and Adam moments as views of one row;
    ``to_bytes`` reads them as they are (no clone per shared storage): the blob equals
    the one of the same state with every tensor in a storage of its own."""
    from fogline.models.keyed import keyed_step, new_key_state
    from fogline.models.serialize import state_tensors
    from fogline.models.state import Minibatch

    base = init_state(ModelConfig(in_features=2, hidden=(4,)), seed=0)
    gen = torch.Generator().manual_seed(0)
    batch = {"k": Minibatch(torch.randn(5, 2, generator=gen), torch.randn(5, generator=gen))}
    state = keyed_step({"k": new_key_state(base, "k")}, batch)[0]["k"]
    shared = state_tensors(state, distinct=False)
    storages = {t.untyped_storage().data_ptr() for t in shared.values() if t.numel()}
    assert len(storages) < len(shared)  # some entries are views of one storage
    own = state_tensors(state)
    assert len({t.untyped_storage().data_ptr() for t in own.values() if t.numel()}) == len(
        [t for t in own.values() if t.numel()]
    )
    separate = state.replace(
        params={k: v.clone() for k, v in state.params.items()},
        opt_state={k: v.clone() for k, v in state.opt_state.items()},
    )
    assert to_bytes(state) == to_bytes(separate)
    assert to_bytes(from_bytes(to_bytes(state))) == to_bytes(state)
