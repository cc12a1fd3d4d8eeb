"""The model spec (settings ``model``) and the fitted data schema stored in states."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError

from fogline.daemon.config import ConfigError, Settings
from fogline.models.schema import Column, DataSchema, SchemaError
from fogline.models.serialize import from_bytes, read_header, to_bytes
from fogline.models.spec import ModelSpec, contradictions
from fogline.models.svi import init_state


def test_spec_builds_its_config() -> None:
    spec = ModelSpec(features=("cpu", "mem", "disk"), target="throughput", hidden=(16,))
    cfg = spec.to_config(noise_max=2.5)
    assert cfg.in_features == 3
    assert cfg.features() == ("cpu", "mem", "disk")
    assert cfg.hidden == (16,)
    assert cfg.noise_max == 2.5
    assert spec.transform_of("cpu") == "standardise"


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"features": ("a", "a")}, "duplicate"),
        ({"features": ("a",), "target": "a"}, "target"),
        ({"features": ("a",), "transforms": {"b": "log1p"}}, "transforms"),
        ({"features": ("a",), "transforms": {"a": "cube"}}, "transforms.a"),
        ({"features": ("a",), "functional_prior": {"features": ("z",)}}, "functional_prior"),
        (
            {"features": ("a",), "likelihood": "bernoulli", "transforms": {"y": "standardise"}},
            "bernoulli",
        ),
    ],
)
def test_spec_refuses_contradictions(kwargs: dict[str, object], needle: str) -> None:
    with pytest.raises(ValidationError, match=needle):
        ModelSpec.model_validate(kwargs)


def test_bernoulli_target_defaults_to_no_transform() -> None:
    spec = ModelSpec(features=("a",), target="failed", likelihood="bernoulli")
    assert spec.transform_of("failed") == "none"
    assert spec.transform_of("a") == "standardise"


def test_settings_model_section_from_file_and_env(tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    cfg = tmp_path / "f.toml"
    cfg.write_text(
        '[model]\nfeatures = ["a", "b"]\ntarget = "t"\n[model.transforms]\nb = "log1p"\n'
    )
    assert Settings.load(None).model is None
    s = Settings.load(cfg)
    assert s.model is not None and s.model.features == ("a", "b")
    assert s.model.transform_of("b") == "log1p"
    monkeypatch.setenv("FOGLINE_MODEL__TARGET", "u")
    assert Settings.load(cfg).model.target == "u"  # type: ignore[union-attr]
    cfg.write_text('[model]\nfeatures = ["a"]\nhidden = [0]\n')
    with pytest.raises(ConfigError, match="model"):
        Settings.load(cfg)


def test_contradictions_name_the_field() -> None:
    spec = ModelSpec(features=("a", "b"), target="t")
    state_cfg = ModelSpec(features=("a", "c"), target="t", likelihood="student-t").to_config()
    problems = contradictions(spec, state_cfg, target="v", transforms={"a": "none"})
    text = "\n".join(problems)
    assert "model.features" in text
    assert "model.likelihood" in text
    assert "model.target" in text
    assert "model.transforms.a" in text
    assert contradictions(spec, spec.to_config(), "t", {"a": "standardise"}) == []


def test_schema_round_trips_raw_units() -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.cat(
        [torch.randn(500, 1, generator=gen) * 50 + 300, torch.rand(500, 1, generator=gen) * 1e4], 1
    )
    y = 4.2 * torch.randn(500, generator=gen) + 17.0
    s = DataSchema.fit(x, y, ("a", "b"), "t", transforms={"b": "log1p"})
    z = s.x_to_model(x)
    assert z[:, 0].mean().abs() < 1e-5 and (z[:, 0].std(unbiased=False) - 1).abs() < 1e-5
    assert z[:, 1].mean().abs() < 1e-5
    torch.testing.assert_close(s.x_from_model(z), x, rtol=1e-5, atol=1e-3)
    torch.testing.assert_close(s.y_from_model(s.y_to_model(y)), y, rtol=1e-6, atol=1e-5)
    zn = s.x_to_model_np(x.float().numpy())
    torch.testing.assert_close(torch.from_numpy(zn), z.float(), rtol=1e-4, atol=1e-4)
    assert DataSchema.from_dict(s.to_dict()) == s


def test_schema_errors_name_column_and_row() -> None:
    with pytest.raises(SchemaError, match=r"b: transform log1p needs values > -1; row 1"):
        DataSchema.fit(
            torch.tensor([[0.0, 1.0], [0.0, -2.0]]), torch.zeros(2), ("a", "b"), "y", {"b": "log1p"}
        )
    assert Column.fit("c", torch.ones(10), "standardise").scale == 1.0  # constant column


def test_state_carries_schema_through_serialisation() -> None:
    spec = ModelSpec(features=("a", "b"), target="t", hidden=(4,))
    s = DataSchema.fit_spec(torch.randn(20, 2), torch.randn(20), spec)
    state = init_state(spec.to_config(), seed=0).replace(schema=s)
    blob = to_bytes(state)
    back = from_bytes(blob)
    assert back.schema == s
    assert to_bytes(back) == blob
    plain = init_state(spec.to_config(), seed=0)
    assert "schema" not in read_header(to_bytes(plain))  # older blobs round-trip unchanged
    assert from_bytes(to_bytes(plain)).data_schema().feature_names == ("a", "b")


def test_daemon_settings_take_autoregressive_mode_and_refuse_its_contradictions() -> None:
    ar = {"mode": "autoregressive", "target": "value", "timestamp": "ts", "lags": 2}
    spec = Settings.load(None, model=ar).model
    assert spec is not None and spec.features[:2] == ("lag_1", "lag_2")
    with pytest.raises(ConfigError, match="timestamp: autoregressive mode needs"):
        Settings.load(None, model={"mode": "autoregressive", "target": "value"})
    with pytest.raises(ConfigError, match="features: autoregressive mode builds its inputs"):
        Settings.load(None, model={**ar, "features": ["cpu"]})
