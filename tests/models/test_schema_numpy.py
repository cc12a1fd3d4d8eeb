"""The numpy transforms of a DataSchema (the daemon's decoded batches) match the torch ones."""

from __future__ import annotations

import numpy as np
import torch

from fogline.models.schema import Column, DataSchema


def test_y_to_model_np_matches_the_torch_transform() -> None:
    gen = torch.Generator().manual_seed(0)
    y = torch.rand(200, generator=gen) * 1e3
    for kind in ("standardise", "log1p", "none"):
        s = DataSchema.fit(torch.zeros(200, 1), y, ("a",), "t", transforms={"t": kind})
        zn = s.y_to_model_np(y.numpy())
        assert zn.dtype == np.float32
        torch.testing.assert_close(torch.from_numpy(zn), s.y_to_model(y), rtol=1e-5, atol=1e-5)


def test_values_outside_the_domain_come_out_non_finite() -> None:
    s = DataSchema((Column("a", "log1p", 0.0, 1.0),), Column("t", "log1p", 0.0, 1.0))
    z = s.x_to_model_np(np.array([[-1.0], [-2.0], [0.0]], dtype=np.float32))
    assert np.isneginf(z[0, 0]) and np.isnan(z[1, 0]) and z[2, 0] == 0.0
    zy = s.y_to_model_np(np.array([-1.0, -3.0, 0.0], dtype=np.float32))
    assert np.isneginf(zy[0]) and np.isnan(zy[1]) and zy[2] == 0.0
    tiny = DataSchema(
        (Column("a", "standardise", 0.0, 1e-30),), Column("t", "standardise", 0.0, 1e-30)
    )
    assert np.isinf(tiny.x_to_model_np(np.array([[1e10]], dtype=np.float32))[0, 0])
    assert np.isinf(tiny.y_to_model_np(np.array([1e10], dtype=np.float32))[0])


def test_is_identity() -> None:
    assert DataSchema.identity(("a", "b")).is_identity
    assert not DataSchema((Column("a"),), Column("y", "standardise", 0.0, 1.0)).is_identity


def test_unfitted_schema_keeps_the_spec_kinds_in_raw_units() -> None:
    from fogline.models.spec import ModelSpec

    spec = ModelSpec(
        features=("cpu", "mem"), target="tp", transforms={"mem": "log1p"}, key="h", timestamp="t"
    )
    s = DataSchema.unfitted(spec)
    assert s.feature_names == ("cpu", "mem") and s.target.name == "tp"
    assert s.transforms() == {"cpu": "standardise", "mem": "log1p", "tp": "standardise"}
    assert (s.key, s.timestamp) == ("h", "t")
    z = s.x_to_model_np(np.array([[5.0, np.e - 1]], dtype=np.float32))
    np.testing.assert_allclose(z, [[5.0, 1.0]], rtol=1e-6)
