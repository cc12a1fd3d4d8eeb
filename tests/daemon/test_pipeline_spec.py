"""The daemon driven by the model spec: fresh start, contradictions, records in raw units."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from daemon_fakes import FakeDeadLetters, FakeStore, fake_clients
from daemon_fakes import fake_settings as _settings
from structlog.testing import capture_logs

import fogline.daemon.stream.pipeline as pipeline_mod
from fogline.cli import main as cli_main
from fogline.daemon.config import Settings
from fogline.daemon.stream.pipeline import EXIT_BAD_CONFIG, Clients, Pipeline, RunOptions
from fogline.models.schema import Column, DataSchema
from fogline.models.serialize import from_bytes, save
from fogline.models.spec import ModelSpec
from fogline.models.state import PosteriorState
from fogline.models.svi import init_state

SPEC: dict[str, Any] = {"features": ["cpu", "mem", "disk"], "target": "throughput"}


def flat(i: int, **override: Any) -> bytes:
    """A flat named record of the 3-feature spec (raw units)."""
    obj = {
        "ts": 1_700_000_000 + i,
        "cpu": 40.0 + i % 7,
        "mem": float(i % 5),
        "disk": 0.25 * (i % 3),
        "throughput": 10.0 + (i % 4),
        **override,
    }
    return json.dumps(obj).encode()


class World:
    """A fake store, consumer and dead-letter producer (as in test_pipeline_fakes)."""

    def __init__(self, log: list[bytes], store: FakeStore | None = None) -> None:
        self.events: list[Any] = []
        self.store = store or FakeStore(self.events)
        self.log = log
        self.dlq = FakeDeadLetters(self.events)
        self.batches: list[PosteriorState] = []

    def clients(self) -> Clients:
        return fake_clients(self.store, self.dlq, self.events, self.log)

    def run(self, settings: Settings, init: Path | None = None) -> Pipeline:
        opts = RunOptions(
            idle_exit_s=0.05, init_path=init, on_batch=lambda _s, st: self.batches.append(st)
        )
        pipe = Pipeline(settings, opts, clients=self.clients())
        pipe.code = pipe.run()  # type: ignore[attr-defined]
        return pipe

    def latest(self) -> PosteriorState:
        return from_bytes(self.store.blobs[-1][1])


def _state(
    features: tuple[str, ...], schema: DataSchema | None = None, **spec: Any
) -> PosteriorState:
    config = ModelSpec(features=features, **spec).to_config()
    return init_state(config, seed=0).replace(schema=schema)


def test_a_fresh_start_builds_the_model_of_the_spec() -> None:
    world = World([flat(i) for i in range(64)])
    with capture_logs() as logs:
        pipe = world.run(_settings(SPEC))
    assert pipe.code == 0  # type: ignore[attr-defined]
    assert pipe.stats.dead_lettered == 0 and pipe.stats.records_valid == 64
    state = world.latest()
    assert state.config.in_features == 3 and state.config.features() == ("cpu", "mem", "disk")
    assert state.records_absorbed == 64
    schema = state.data_schema()
    assert schema.feature_names == ("cpu", "mem", "disk") and schema.target.name == "throughput"
    # nothing fitted: the spec's kinds with loc 0, scale 1 (raw units)
    assert all((c.loc, c.scale) == (0.0, 1.0) for c in (*schema.features, schema.target))
    warned = [e for e in logs if e["event"] == "fresh_prior_raw_units"]
    assert warned and warned[0]["log_level"] == "warning" and warned[0]["target"] == "throughput"
    # a restart with the same spec resumes (no contradiction with what it wrote)
    world.log += [flat(i) for i in range(64, 96)]
    again = world.run(_settings(SPEC))
    assert again.code == 0 and world.latest().records_absorbed == 96  # type: ignore[attr-defined]


def test_without_a_model_section_the_fresh_prior_is_the_default_model() -> None:
    from daemon_fakes import record

    world = World([record(i) for i in range(32)])
    pipe = world.run(_settings(None))
    assert pipe.code == 0 and pipe.stats.dead_lettered == 0  # type: ignore[attr-defined]
    state = world.latest()
    assert state.config.in_features == 8 and state.schema is None


def test_a_spec_contradicting_the_init_state_exits_2_naming_each_field(tmp_path: Path) -> None:
    init = tmp_path / "state.safetensors"
    save(_state(("cpu", "mem", "disk"), likelihood="student-t", df=4.0), str(init))
    world = World([flat(i) for i in range(32)])
    pipe = world.run(_settings({**SPEC, "features": ["cpu", "mem"]}), init=init)
    assert pipe.code == EXIT_BAD_CONFIG  # type: ignore[attr-defined]
    lines = pipe.stats.exit_reason.splitlines()
    assert any(line.startswith("model.features: settings say ['cpu', 'mem']") for line in lines)
    assert any(line.startswith("model.likelihood: settings say 'gaussian'") for line in lines)
    assert all(f"init file {init}" in line for line in lines)
    assert world.store.blobs == [] and world.batches == []  # nothing absorbed, nothing written


def test_a_spec_contradicting_the_snapshot_names_target_and_transforms() -> None:
    world = World([flat(i) for i in range(32)])
    assert world.run(_settings(SPEC)).code == 0  # type: ignore[attr-defined]
    written = len(world.store.blobs)
    other = {**SPEC, "target": "latency", "transforms": {"mem": "log1p"}}
    pipe = world.run(_settings(other))
    assert pipe.code == EXIT_BAD_CONFIG  # type: ignore[attr-defined]
    reason = pipe.stats.exit_reason
    assert "model.target: settings say 'latency', the state has 'throughput'" in reason
    assert "model.transforms.mem: settings say 'log1p', the state has 'standardise'" in reason
    assert len(world.store.blobs) == written


def test_records_are_transformed_by_the_stored_schema_and_bad_ones_dead_lettered(
    tmp_path: Path,
) -> None:
    schema = DataSchema(
        (
            Column("cpu", "standardise", 43.0, 2.0),
            Column("mem", "log1p", 1.0, 0.5),
            Column("disk", "standardise", 0.25, 0.2),
        ),
        Column("throughput", "standardise", 11.5, 1.1),
    )
    init = tmp_path / "fitted.safetensors"
    save(_state(("cpu", "mem", "disk"), schema=schema), str(init))
    log = [flat(i) for i in range(48)]
    log[7] = flat(7, mem=-3.0)  # log1p needs > -1
    log[20] = json.dumps({"cpu": 1, "mem": 1, "throughput": 1}).encode()  # no disk
    world = World(log)
    seen: list[torch.Tensor] = []
    real = pipeline_mod.Pipeline._absorb

    def spy(self: Pipeline, batch: Any) -> None:
        seen.append(torch.from_numpy(batch.x.copy()))
        real(self, batch)

    pipeline_mod.Pipeline._absorb = spy  # type: ignore[method-assign]
    try:
        pipe = world.run(_settings({**SPEC, "transforms": {"mem": "log1p"}}), init=init)
    finally:
        pipeline_mod.Pipeline._absorb = real  # type: ignore[method-assign]
    assert pipe.code == 0  # type: ignore[attr-defined]
    reasons = sorted(r for _raw, r in world.dlq.sent)
    assert reasons == ["missing_feature: disk", "out_of_domain: mem: log1p needs values > -1"]
    x = torch.cat(seen)
    assert x.shape[1] == 3
    # the step saw model units: cpu (40..46 raw) standardised around 43 / 2
    assert float(x[:, 0].min()) == pytest.approx(-1.5) and float(x[:, 0].max()) == pytest.approx(
        1.5
    )


def test_fogline_run_prints_each_contradiction_and_exits_2(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    init = tmp_path / "state.safetensors"
    save(_state(("a", "b", "c")), str(init))
    cfg = tmp_path / "fogline.toml"
    cfg.write_text('[model]\nfeatures = ["a", "b"]\ntarget = "t"\nhidden = [16]\n')
    world = World([])
    monkeypatch.setattr(pipeline_mod, "Clients", world.clients)
    code = cli_main(["run", "--config", str(cfg), "--init", str(init), "--metrics-port", "0"])
    assert code == 2
    err = capsys.readouterr().err
    assert "fogline run: invalid configuration" in err
    assert "model.features: settings say ['a', 'b'], the state has ['a', 'b', 'c']" in err
    assert "model.hidden: settings say (16,), the state has (32, 32)" in err


def test_a_state_without_a_schema_reads_records_by_the_spec_names(tmp_path: Path) -> None:
    init = tmp_path / "old.safetensors"
    save(_state(("cpu", "mem", "disk")), str(init))  # no schema: written before schemas
    world = World([flat(i) for i in range(32)])
    pipe = world.run(_settings(SPEC), init=init)
    assert pipe.code == 0 and pipe.stats.dead_lettered == 0  # type: ignore[attr-defined]
    assert world.latest().records_absorbed == 32
