"""The warm-start recipe: functional-prior step, metrics, plot, CLI and a reduced quality run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch.distributions import Normal, kl_divergence

from fogline.cli import main as cli_main
from fogline.models.config import ModelConfig
from fogline.models.data import FEATURE_NAMES, load_csv, recipe_data
from fogline.models.fprior import FunctionalPrior, functional_kl
from fogline.models.serialize import load
from fogline.models.state import Minibatch
from fogline.models.svi import init_state, step
from fogline.models.warmstart import WarmstartOptions, quality_checks, run

#: The reduced run (REDUCED_EPOCHS instead of 800) and the bar it meets honestly.
REDUCED_EPOCHS = 60


def _batch(n: int = 256) -> Minibatch:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 8, generator=g)
    y = torch.sin(3 * x[:, 0]) + (0.1 + 0.4 * x[:, 0].abs()) * torch.randn(n, generator=g)
    return Minibatch(x, y)


def test_functional_kl_is_the_gaussian_kl() -> None:
    samples = torch.randn(64, 5) * torch.tensor([0.5, 1, 2, 3, 4]) + 1.0
    prior = FunctionalPrior(weight=1.0, scale=3.0, lo=(0.0,), hi=(1.0,), loc=0.5)
    m, v = samples.mean(0), samples.var(0)
    expected = kl_divergence(Normal(m, v.sqrt()), Normal(0.5, 3.0)).mean()
    assert torch.allclose(functional_kl(samples, prior), expected, atol=1e-5)


def test_ood_inputs_leave_the_robust_range() -> None:
    x = torch.rand(500, 3) * 2 - 1
    prior = FunctionalPrior.from_data(x, weight=1.0, scale=1.0, features=(0, 2), margin=2.0)
    assert prior.spread is not None
    xt = prior.ood_inputs(x, torch.Generator().manual_seed(0))
    moved = (xt != x).sum(1)
    assert torch.all(moved == 1)
    assert torch.equal(xt[:, 1], x[:, 1])
    for j in (0, 2):
        rows = xt[:, j] != x[:, j]
        v = xt[rows, j]
        assert rows.any()
        assert torch.all((v < prior.lo[j]) | (v > prior.hi[j]))
        reach = 2.0 * prior.spread[j]  # margin 2 interquartile ranges
        assert torch.all((v >= prior.lo[j] - reach) & (v <= prior.hi[j] + reach))
        assert prior.lo[j] - reach < float(x[:, j].min()) - 1.0
        assert prior.hi[j] + reach > float(x[:, j].max()) + 1.0


@pytest.mark.parametrize("guide", ["meanfield", "lowrank"])
def test_functional_prior_of_weight_zero_is_the_plain_elbo(guide: str) -> None:
    """gamma = 0 drops the term: the one step is then bit for bit the plain ELBO step."""
    cfg = ModelConfig(guide=guide)  # type: ignore[arg-type]
    state = init_state(cfg, seed=0)
    batch = _batch()
    zero = FunctionalPrior.from_data(batch.x, weight=0.0, scale=1.5)
    a, ia = step(state, batch, data_size=10_000, functional_prior=zero)
    b, ib = step(state, batch, data_size=10_000)
    assert ia == ib and torch.equal(a.params["loc"], b.params["loc"])
    assert a.step_count == 1 and a.records_absorbed == 256
    on = FunctionalPrior.from_data(batch.x, weight=0.05, scale=1.5)
    c, ic = step(state, batch, data_size=10_000, functional_prior=on)
    assert ic.loss > ib.loss and not torch.equal(c.params["loc"], b.params["loc"])


def test_low_rank_factor_takes_smaller_steps() -> None:
    state = init_state(ModelConfig(guide="lowrank"), seed=0, lr=5e-3)
    fp = FunctionalPrior.from_data(_batch().x, weight=0.05, scale=1.5)
    new, info = step(state, _batch(), data_size=1000, functional_prior=fp, cov_factor_lr_scale=0.05)
    assert not info.rejected
    dv = (new.params["cov_factor"] - state.params["cov_factor"]).abs().max()
    dm = (new.params["loc"] - state.params["loc"]).abs().max()
    assert float(dv) <= 5e-3 * 0.05 * 1.01
    assert float(dm) > 5e-3 * 0.5  # the first Adam step moves the mean by ~lr


@pytest.mark.parametrize("jit", [True, False])
def test_functional_prior_step_rejects_non_finite(jit: bool) -> None:
    state = init_state(ModelConfig(), seed=0)
    bad = Minibatch(torch.randn(8, 8), torch.full((8,), float("nan")))
    fp = FunctionalPrior.from_data(bad.x, weight=0.05, scale=3.0)
    new, info = step(state, bad, data_size=8, functional_prior=fp, jit=jit)
    assert info.rejected and new is state


@pytest.mark.parametrize(
    ("features", "feature", "value", "factor"),
    [((0,), 0, 5.0, 2.0), (None, 3, 5.0, 1.5), (None, 3, -5.0, 1.5)],
)
def test_functional_prior_widens_far_from_the_data(
    features: tuple[int, ...] | None, feature: int, value: float, factor: float
) -> None:
    """300 steps with gamma > 0 widen the epistemic spread far out along the prior's features.

    Measured: on x0 alone, at x0 = 5: 0.87 -> 1.94; on every feature (the
    default), at x3 = 5 / -5: 0.30 -> 0.76 / 0.49 -> 0.86.
    """
    batch = _batch(512)
    batch = Minibatch(batch.x[batch.x[:, 0].abs() <= 2], batch.y[batch.x[:, 0].abs() <= 2])
    far = torch.zeros(1, 8)
    far[0, feature] = value
    spreads = []
    for weight in (0.0, 0.5):
        fp = FunctionalPrior.from_data(
            batch.x, weight=weight, scale=3.0, samples=4, features=features
        )
        s = init_state(ModelConfig(), seed=0, lr=0.02)
        for _ in range(300):
            s, _ = step(s, batch, data_size=batch.rows, functional_prior=fp)
        from fogline.models.predictive import predict, sample_ensemble

        spreads.append(float(predict(sample_ensemble(s, 64, seed=1), far).epistemic_std[0]))
    assert spreads[1] > factor * spreads[0], spreads


def test_cli_json_last_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], cal_housing_csv: Path
) -> None:
    CSV = str(cal_housing_csv)
    rc = cli_main(
        ["warmstart", "--data", CSV, "--epochs", "1", "--json", "--quiet", "--out", str(tmp_path)]
    )
    assert rc == 0
    doc = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    for key in [
        "coverage_95_in",
        "width_in",
        "true_width_in",
        "width_out",
        "true_width_out",
        "width_out_over_in",
        "coverage_95_out",
        "epistemic_out_over_in",
        "aleatoric_rel_err_in",
        "rmse_in",
        "epochs",
        "seconds",
    ]:
        assert key in doc
    assert Path(doc["files"]["plot"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    state = load(doc["files"]["state"])
    assert state.config.noise_head == "bounded"
    assert state.extra["warmstart"]["metrics"]["epochs"] == 1
    # per-feature OOD ratios at the 4-IQR probes, and the prior on every feature
    assert set(doc["ood"]["epistemic_ratio"]) == set(FEATURE_NAMES)
    assert doc["ood"]["epistemic_ratio_min"] == min(doc["ood"]["epistemic_ratio"].values())
    assert doc["epistemic_ratio_min"] == doc["ood"]["epistemic_ratio_min"]
    assert state.extra["warmstart"]["ood"]["epistemic_ratio_min"] == doc["epistemic_ratio_min"]
    fp = FunctionalPrior.of(state)
    assert fp is not None and fp.active_features == tuple(range(len(FEATURE_NAMES)))


@pytest.mark.parametrize(
    "flags",
    [
        ["--likelihood", "student-t"],
        ["--guide", "lowrank"],
        ["--prior", "standard", "--init-scale", "0.1", "--fprior-weight", "0"],
    ],
)
def test_cli_variants_run(
    flags: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str], cal_housing_csv: Path
) -> None:
    CSV = str(cal_housing_csv)
    rc = cli_main(
        [
            "warmstart",
            "--data",
            CSV,
            "--epochs",
            "1",
            "--json",
            "--quiet",
            "--out",
            str(tmp_path),
            *flags,
        ]
    )
    assert rc == 0
    doc = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert 0.0 <= doc["coverage_95_in"] <= 1.0


def test_cli_without_data_explains(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import sklearn.datasets

    def offline(*args: object, **kwargs: object) -> None:
        raise OSError("no network")

    monkeypatch.setattr(sklearn.datasets, "fetch_california_housing", offline)
    assert cli_main(["warmstart", "--epochs", "1", "--quiet"]) == 2
    assert "--data PATH" in capsys.readouterr().err


def test_warm_start_from_a_trained_net(tmp_path: Path, cal_housing_csv: Path) -> None:
    """--from-net: the prior is centred on the net's weights, one output gets a noise head."""
    CSV = str(cal_housing_csv)
    torch.manual_seed(0)
    first = torch.nn.Linear(8, 16)
    net = torch.nn.Sequential(first, torch.nn.Tanh(), torch.nn.Linear(16, 1))
    path = tmp_path / "net.pt"
    torch.save(net.state_dict(), path)
    res = run(WarmstartOptions(data=CSV, epochs=1, from_net=str(path), samples=20))
    cfg = res.state.config
    assert cfg.hidden == (16,) and cfg.activation == "relu"  # state_dict files carry no activation
    assert cfg.noise_head == "bounded" and cfg.feature_names is not None
    w_first = first.weight.detach().reshape(-1)
    assert torch.allclose(res.state.prior.loc[: w_first.numel()], w_first)
    assert torch.allclose(res.state.prior.scale, torch.full_like(res.state.prior.scale, 0.1))


def test_compare_benchmark_json(capsys: pytest.CaptureFixture[str], cal_housing_csv: Path) -> None:
    CSV = str(cal_housing_csv)
    from fogline.cli.commands.model import compare_main  # what benchmarks/compare.py runs

    argv = ["--data", CSV, "--epochs", "1", "--samples", "8", "--json", "--quiet"]
    assert compare_main(argv) == 0
    doc = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(doc["variants"]) == {
        "gaussian/meanfield",
        "student-t/meanfield",
        "gaussian/lowrank",
        "student-t/lowrank",
    }
    for v in doc["variants"].values():
        assert {"rmse_in", "width_out", "entropy_out"} <= set(v)
    assert doc["ratio"]["gaussian/meanfield"]["width_out_ratio"] == pytest.approx(1.0)


@pytest.mark.slow
def test_reduced_low_rank_warm_start_quality(cal_housing_csv: Path) -> None:
    """--guide lowrank (rank 10, V at lr * 0.05), 60 epochs: the same bar.

    Measured (seed 0): coverage in 0.965, width in 1.12 x true, coverage out
    0.996, width out 1.56 x true, width out/in 6.7, epistemic out/in 21.
    """
    CSV = str(cal_housing_csv)
    res = run(WarmstartOptions(data=CSV, epochs=REDUCED_EPOCHS, guide="lowrank"))
    failed = [k for k, ok in quality_checks(res.metrics).items() if not ok]
    assert not failed, (failed, res.metrics)
    assert res.metrics["rmse_in"] <= 0.15, res.metrics


@pytest.mark.slow
def test_reduced_warm_start_quality(tmp_path: Path, cal_housing_csv: Path) -> None:
    """The recipe with REDUCED_EPOCHS (60) instead of 800 epochs meets the issue's whole bar,
    and knows what it does not know along every input (4-IQR ratio >= 5 on every feature).

    The recipe's defaults: functional prior on every feature, the positive heavy-tailed
    columns (``HEAVY_TAILED``) as log(1 + x).  Measured by h2 (seed 0, 60 epochs): ratios
    9.96 (AveOccup) to 41.9, coverage in 0.967, width in 1.16 x true, coverage out
    0.982 (docs/model.md).
    """
    CSV = str(cal_housing_csv)
    res = run(WarmstartOptions(data=CSV, epochs=REDUCED_EPOCHS, out=str(tmp_path)))
    m = res.metrics
    failed = [k for k, ok in quality_checks(m).items() if not ok]
    assert not failed, (failed, m)
    assert m["rmse_in"] <= 0.15, m
    assert 0.93 <= m["coverage_95_in"] <= 0.97 and m["coverage_95_out"] >= 0.95, m
    # the widening is epistemic: outside, a large share of the predictive variance is
    # epistemic (the prototype's mean-field posterior: <= 4 %; x0 alone under the
    # functional prior: 0.40; one of 8 features under it: 0.30)
    assert m["epistemic_var_share_out"] >= 0.25, m
    assert res.ood is not None and res.ood.epistemic_ratio_min >= 5.0, res.ood.to_json()
    assert Path(res.files["plot"]).read_bytes()[:4] == b"\x89PNG"
    assert load(res.files["state"]).config.noise_head == "bounded"
    from fogline.models.warmstart import HEAVY_TAILED, log1p_columns

    d = recipe_data(log1p_columns(load_csv(CSV), HEAVY_TAILED), seed=0)
    assert m["rows_train"] == d.x_train.shape[0]


def test_log1p_columns_names_bad_columns_and_rows() -> None:
    from fogline.models.data import Table
    from fogline.models.warmstart import log1p_columns

    x = torch.ones(4, len(FEATURE_NAMES), dtype=torch.float64)
    t = Table(x, torch.zeros(4), "test")
    out = log1p_columns(t, ("AveOccup",))
    j = FEATURE_NAMES.index("AveOccup")
    assert torch.allclose(out.x[:, j], torch.full((4,), 0.6931471805599453, dtype=torch.float64))
    assert torch.equal(out.x[:, :j], x[:, :j]) and log1p_columns(t, ()) is t
    with pytest.raises(ValueError, match="unknown columns \\['Rooms'\\]"):
        log1p_columns(t, ("Rooms",))
    x[2, j] = -1.0
    with pytest.raises(ValueError, match="column AveOccup row 2"):
        log1p_columns(Table(x, torch.zeros(4), "test"), ("AveOccup",))
