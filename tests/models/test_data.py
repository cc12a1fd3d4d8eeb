"""The California loader (CSV path and scikit-learn fetcher) and the recipe's split."""

from __future__ import annotations

import math
import urllib.error
from pathlib import Path

import pytest
import torch

from fogline.models import data
from fogline.models.data import (
    FEATURE_NAMES,
    DataUnavailableError,
    load,
    load_csv,
    recipe_data,
    standardise,
    true_band,
    true_noise_std,
)


@pytest.fixture(scope="module")
def table(cal_housing_csv: Path) -> data.Table:
    return load_csv(cal_housing_csv)


def test_csv_gives_sklearn_features(table: data.Table) -> None:
    assert table.x.shape == (20640, len(FEATURE_NAMES))
    # first row of cal_housing.csv: -122.23,37.88,41,880,129,322,126,8.3252,452600
    expected = [8.3252, 41.0, 880 / 126, 129 / 126, 322.0, 322 / 126, 37.88, -122.23]
    assert torch.allclose(table.x[0], torch.tensor(expected, dtype=torch.float64))
    assert math.isclose(float(table.target[0]), 4.526)


def test_missing_file_names_the_flag(tmp_path: Path) -> None:
    with pytest.raises(DataUnavailableError, match="--data"):
        load_csv(tmp_path / "nope.csv")


def test_csv_without_the_columns_is_refused(tmp_path: Path) -> None:
    bad = tmp_path / "bad.csv"
    bad.write_text("a,b\n1,2\n")
    with pytest.raises(DataUnavailableError, match="missing columns"):
        load_csv(bad)


def test_fetcher_failure_says_what_to_do(monkeypatch: pytest.MonkeyPatch) -> None:
    import sklearn.datasets

    def offline(*args: object, **kwargs: object) -> None:
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(sklearn.datasets, "fetch_california_housing", offline)
    with pytest.raises(DataUnavailableError, match=r"URLError.*--data PATH"):
        load(None)


def test_fetcher_result_is_used_when_it_works(monkeypatch: pytest.MonkeyPatch) -> None:
    import numpy as np
    import sklearn.datasets

    class Bunch:
        data = np.ones((3, 8))
        target = np.arange(3.0)

    monkeypatch.setattr(sklearn.datasets, "fetch_california_housing", lambda: Bunch())
    t = load(None)
    assert t.source == "sklearn" and t.x.shape == (3, 8)


def test_standardise(table: data.Table) -> None:
    z, mean, std = standardise(table.x)
    assert torch.allclose(z.mean(0), torch.zeros(8, dtype=z.dtype), atol=1e-9)
    assert torch.allclose(z.std(0, unbiased=False), torch.ones(8, dtype=z.dtype), atol=1e-9)
    assert torch.allclose(z * std + mean, table.x)


def test_recipe_split(table: data.Table) -> None:
    d = recipe_data(table, seed=0)
    assert float(d.x_train[:, 0].abs().max()) <= 2.0
    assert float(d.x_held[:, 0].abs().max()) <= 2.0
    n = d.x_train.shape[0] + d.x_held.shape[0]
    assert abs(d.x_held.shape[0] / n - 0.2) < 1e-3
    again = recipe_data(table, seed=0)
    assert torch.equal(d.y_held, again.y_held)
    assert not torch.equal(d.y_held[:50], recipe_data(table, seed=1).y_held[:50])
    # the synthetic noise has std 0.1 + 0.4 |x0|: standardised residuals have unit variance
    r = (d.y_train - torch.sin(3 * d.x_train[:, 0])) / true_noise_std(d.x_train[:, 0])
    assert abs(float(r.std()) - 1.0) < 0.03 and abs(float(r.mean())) < 0.03


def test_true_band() -> None:
    lo, hi = true_band(torch.tensor([0.0, 5.0]))
    assert torch.allclose(hi - lo, 2 * 1.959964 * torch.tensor([0.1, 2.1]), atol=1e-5)
