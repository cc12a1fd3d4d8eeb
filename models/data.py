"""The California housing data and the warm-start recipe's synthetic target.

Features follow scikit-learn's ``fetch_california_housing`` (same order and
definitions)::

    MedInc, HouseAge, AveRooms, AveBedrms, Population, AveOccup, Latitude, Longitude

computed from the raw StatLib columns as MedInc = median_income, AveRooms =
total_rooms / households, AveBedrms = total_bedrooms / households, AveOccup =
population / households.  Each feature is standardised, z_j = (x_j - mean_j) /
std_j (population std over all rows).

The recipe's target depends on x0 = standardised MedInc only::

    y = sin(3 x0) + eps,   eps ~ N(0, sigma(x0)^2),   sigma(x0) = 0.1 + 0.4 |x0|

so the truth (mean and noise) is known everywhere, also far outside the data.
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from pathlib import Path

import torch

#: The 8 features in scikit-learn's order.
FEATURE_NAMES: tuple[str, ...] = (
    "MedInc",
    "HouseAge",
    "AveRooms",
    "AveBedrms",
    "Population",
    "AveOccup",
    "Latitude",
    "Longitude",
)

_RAW_COLUMNS = (
    "longitude",
    "latitude",
    "housing_median_age",
    "total_rooms",
    "total_bedrooms",
    "population",
    "households",
    "median_income",
    "median_house_value",
)


class DataUnavailableError(RuntimeError):
    """The California data could neither be fetched nor read from a file."""


@dataclass(frozen=True)
class Table:
    """Raw features ``x`` [N, 8] (float64, :data:`FEATURE_NAMES` order) and house value ``target`` [N]."""

    x: torch.Tensor
    target: torch.Tensor
    source: str


def load_csv(path: str | Path) -> Table:
    """Read the raw StatLib CSV (``cal_housing.csv``) and derive scikit-learn's features.

    The file needs the header ``longitude, latitude, housing_median_age,
    total_rooms, total_bedrooms, population, households, median_income,
    median_house_value``; the target is median_house_value / 100000.
    """
    p = Path(path)
    if not p.is_file():
        raise DataUnavailableError(f"--data {p}: no such file")
    with p.open(newline="") as fh:
        reader = csv.DictReader(fh)
        missing = [c for c in _RAW_COLUMNS if c not in (reader.fieldnames or ())]
        if missing:
            raise DataUnavailableError(f"--data {p}: missing columns {missing}")
        rows = [[float(r[c]) for c in _RAW_COLUMNS] for r in reader]
    if not rows:
        raise DataUnavailableError(f"--data {p}: no rows")
    raw = torch.tensor(rows, dtype=torch.float64)
    lon, lat, age, rooms, bedrooms, pop, households, income, value = raw.unbind(1)
    x = torch.stack(
        [income, age, rooms / households, bedrooms / households, pop, pop / households, lat, lon],
        dim=1,
    )
    return Table(x, value / 100_000.0, str(p))


def fetch() -> Table:
    """scikit-learn's ``fetch_california_housing`` (needs the network or its cache)."""
    try:
        from sklearn.datasets import fetch_california_housing
    except ImportError as exc:  # pragma: no cover - scikit-learn is a dependency
        raise DataUnavailableError(
            "scikit-learn is not installed; install fogline's dependencies or pass --data PATH"
        ) from exc
    try:
        bunch = fetch_california_housing()
    except Exception as exc:  # URLError, HTTPError, OSError, ...
        raise DataUnavailableError(
            f"fetch_california_housing failed ({type(exc).__name__}: {exc}); without network "
            "access pass --data PATH to the raw cal_housing.csv (e.g. ../shared/data/cal_housing.csv)"
        ) from exc
    x = torch.as_tensor(bunch.data, dtype=torch.float64)
    return Table(x, torch.as_tensor(bunch.target, dtype=torch.float64), "sklearn")


def load(path: str | Path | None = None) -> Table:
    """The California table from ``path`` (CSV) or, when ``None``, scikit-learn's fetcher."""
    return fetch() if path is None else load_csv(path)


def standardise(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """z = (x - mean) / std per column; returns ``(z, mean [D], std [D])`` (population std)."""
    mean = x.mean(0)
    std = x.std(0, unbiased=False).clamp_min(1e-12)
    return (x - mean) / std, mean, std


def true_mean(x0: torch.Tensor) -> torch.Tensor:
    """E[y | x0] = sin(3 x0)."""
    return torch.sin(3.0 * x0)


def true_noise_std(x0: torch.Tensor) -> torch.Tensor:
    """sigma(x0) = 0.1 + 0.4 |x0| (a standard deviation)."""
    return 0.1 + 0.4 * x0.abs()


def true_band(x0: torch.Tensor, level: float = 0.95) -> tuple[torch.Tensor, torch.Tensor]:
    """The central ``level`` band of the true process at ``x0``: mean ± z sigma(x0)."""
    z = math.sqrt(2.0) * float(torch.erfinv(torch.tensor(level)))
    m, s = true_mean(x0), true_noise_std(x0)
    return m - z * s, m + z * s


def synthetic_target(x0: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Draw y = sin(3 x0) + eps, eps ~ N(0, (0.1 + 0.4 |x0|)^2)."""
    eps = torch.randn(x0.shape, generator=generator, dtype=x0.dtype)
    return true_mean(x0) + true_noise_std(x0) * eps


@dataclass(frozen=True)
class RecipeData:
    """The warm-start recipe's split: float32 ``x`` [N, 8] standardised, ``y`` [N]."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_held: torch.Tensor
    y_held: torch.Tensor
    source: str


def recipe_data(
    table: Table, *, seed: int = 0, held_out: float = 0.2, x0_limit: float = 2.0
) -> RecipeData:
    """Standardise, draw the synthetic target, keep ``|x0| <= x0_limit``, hold out a slice.

    The held-out slice is a seeded random ``held_out`` fraction of the kept rows.
    """
    if not 0.0 < held_out < 1.0:
        raise ValueError(f"held_out must lie in (0, 1), got {held_out}")
    z, _, _ = standardise(table.x)
    gen = torch.Generator().manual_seed(seed)
    y = synthetic_target(z[:, 0], gen)
    keep = z[:, 0].abs() <= x0_limit
    z, y = z[keep].float(), y[keep].float()
    perm = torch.randperm(z.shape[0], generator=gen)
    n_held = max(1, round(held_out * z.shape[0]))
    held, train = perm[:n_held], perm[n_held:]
    return RecipeData(z[train], y[train], z[held], y[held], table.source)


def write_recipe_csv(
    path: str | Path, table: Table, *, seed: int = 0, x0_limit: float = 2.0
) -> int:
    """Write the recipe's derived rows as CSV: the 8 raw features and the synthetic ``y``.

    The rows and ``y`` are exactly those :func:`recipe_data` keeps (same
    standardisation over all rows, same seeded draw, ``|x0| <= x0_limit``),
    before its holdout split; the features are in raw units (a generic warm
    start fits its own scaler).  Returns the number of rows written.
    """
    z, _, _ = standardise(table.x)
    gen = torch.Generator().manual_seed(seed)
    y = synthetic_target(z[:, 0], gen)
    keep = z[:, 0].abs() <= x0_limit
    x_raw, y_kept = table.x[keep], y[keep].float()
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    with p.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow([*FEATURE_NAMES, "y"])
        for row, v in zip(x_raw.tolist(), y_kept.tolist(), strict=True):
            w.writerow([*(repr(float(c)) for c in row), repr(float(v))])
    return int(keep.sum())
