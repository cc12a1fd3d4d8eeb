"""Named, fitted columns: raw units in, model units inside, target units out.

A :class:`DataSchema` is stored in every state a warm start writes
(:attr:`~fogline.models.state.PosteriorState.schema`).  It maps a raw record
to the model's standardised inputs and the model's predictions back to the
target's units, so scaling is part of the model and never the user's job.

Per column c with fitted ``loc`` and ``scale`` (:class:`Column`):

* ``standardise``: z = (v - loc) / scale
* ``log1p``:       z = (log(1 + v) - loc) / scale      (needs v > -1)
* ``none``:        z = v                               (loc 0, scale 1)

``loc`` and ``scale`` are the mean and population sd of the column (after
``log1p`` where that applies) over the *training* rows only; a constant
column gets scale 1.  The inverse for the target is
v = loc + scale z (``standardise``), v = expm1(loc + scale z) (``log1p``),
v = z (``none``).  Affine transforms map a Gaussian predictive's mean and sd
exactly (mean_v = loc + scale mean_z, sd_v = scale sd_z); ``log1p`` maps its
quantiles exactly (the inverse is monotone), not its moments.

>>> import torch
>>> s = DataSchema.fit(torch.tensor([[1.0], [3.0]]), torch.tensor([10.0, 20.0]), ("a",), "y")
>>> s.x_to_model(torch.tensor([[3.0]])).tolist(), s.y_from_model(torch.tensor([0.0])).tolist()
([[1.0]], [15.0])
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from fogline.models.spec import ModelSpec, Transform

if TYPE_CHECKING:  # torch-free at import: the consumer's child decodes with numpy only
    import torch

_KINDS: frozenset[str] = frozenset({"standardise", "log1p", "none"})


class SchemaError(ValueError):
    """A column cannot be transformed (e.g. log1p of a value <= -1); names the column."""


@dataclass(frozen=True)
class Column:
    """One named column and its fitted transform (see the module docstring)."""

    name: str
    transform: Transform = "none"
    loc: float = 0.0
    scale: float = 1.0

    def __post_init__(self) -> None:
        if self.transform not in _KINDS:
            raise SchemaError(f"{self.name}: unknown transform {self.transform!r}")
        if not (np.isfinite(self.loc) and np.isfinite(self.scale) and self.scale > 0):
            raise SchemaError(f"{self.name}: loc/scale must be finite with scale > 0")

    @classmethod
    def fit(cls, name: str, values: torch.Tensor, transform: Transform) -> Column:
        """Fit ``transform`` on ``values`` [N] (mean and population sd, after log1p)."""
        if transform == "none":
            return cls(name, "none")
        v = values.double()
        if transform == "log1p":
            if bool((v <= -1).any()):
                row = int((v <= -1).nonzero()[0])
                raise SchemaError(
                    f"{name}: transform log1p needs values > -1; row {row} has {float(v[row])!r}"
                )
            v = v.log1p()
        loc = float(v.mean())
        sd = float(v.std(unbiased=False)) if v.numel() > 1 else 0.0
        return cls(name, transform, loc, sd if sd > 1e-12 else 1.0)

    def forward(self, v: torch.Tensor) -> torch.Tensor:
        """Raw values -> model units (same shape and dtype)."""
        if self.transform == "none":
            return v
        if self.transform == "log1p":
            v = v.log1p()
        return (v - self.loc) / self.scale

    def inverse(self, z: torch.Tensor) -> torch.Tensor:
        """Model units -> raw values."""
        if self.transform == "none":
            return z
        v = z * self.scale + self.loc
        return v.expm1() if self.transform == "log1p" else v

    @property
    def affine(self) -> bool:
        """Whether the transform is affine (maps means and sds exactly)."""
        return self.transform != "log1p"

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form."""
        return {
            "name": self.name,
            "transform": self.transform,
            "loc": self.loc,
            "scale": self.scale,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Column:
        """Inverse of :meth:`to_dict`."""
        return cls(
            str(d["name"]),
            d.get("transform", "none"),
            float(d.get("loc", 0.0)),
            float(d.get("scale", 1.0)),
        )


@dataclass(frozen=True)
class DataSchema:
    """The named record fields of a model and their fitted transforms.

    ``features`` in the model's input order, ``target``, and the optional
    ``key`` and ``timestamp`` record fields (names only).
    """

    features: tuple[Column, ...]
    target: Column
    key: str | None = None
    timestamp: str | None = None

    @property
    def feature_names(self) -> tuple[str, ...]:
        """The input names in model order."""
        return tuple(c.name for c in self.features)

    def transforms(self) -> dict[str, str]:
        """Column name -> transform kind (features and target)."""
        return {c.name: c.transform for c in (*self.features, self.target)}

    @classmethod
    def identity(cls, features: Sequence[str], target: str = "y") -> DataSchema:
        """Every column untransformed (a state without a stored schema)."""
        return cls(tuple(Column(f) for f in features), Column(target))

    @classmethod
    def unfitted(cls, spec: ModelSpec) -> DataSchema:
        """The columns of ``spec`` with their transform kinds but nothing fitted (loc 0, scale 1).

        What a model built from the spec alone (no warm start) uses: a
        ``standardise`` column is taken in raw units, a ``log1p`` one as
        log(1 + v).  The kinds match the spec, so a restart with the same
        spec finds no contradiction.
        """
        return cls(
            tuple(Column(f, spec.transform_of(f)) for f in spec.features),
            Column(spec.target, spec.transform_of(spec.target)),
            spec.key,
            spec.timestamp,
        )

    @classmethod
    def fit(
        cls,
        x_raw: torch.Tensor,
        y_raw: torch.Tensor,
        features: Sequence[str],
        target: str,
        transforms: Mapping[str, Transform] | None = None,
        default: Transform = "standardise",
        key: str | None = None,
        timestamp: str | None = None,
    ) -> DataSchema:
        """Fit every column's transform on the training rows ``x_raw`` [N, D], ``y_raw`` [N]."""
        t = dict(transforms or {})
        if x_raw.dim() != 2 or x_raw.shape[1] != len(features):
            raise SchemaError(f"x has shape {tuple(x_raw.shape)}, expected [N, {len(features)}]")
        cols = tuple(
            Column.fit(name, x_raw[:, j], t.get(name, default)) for j, name in enumerate(features)
        )
        return cls(cols, Column.fit(target, y_raw, t.get(target, default)), key, timestamp)

    @classmethod
    def fit_spec(cls, x_raw: torch.Tensor, y_raw: torch.Tensor, spec: ModelSpec) -> DataSchema:
        """:meth:`fit` with the columns and transforms of ``spec``."""
        return cls.fit(
            x_raw,
            y_raw,
            spec.features,
            spec.target,
            spec.transforms,
            spec.transform,
            spec.key,
            spec.timestamp,
        )

    def x_to_model(self, x_raw: torch.Tensor) -> torch.Tensor:
        """Raw inputs [N, D] -> model inputs [N, D] (dtype kept)."""
        if all(c.transform == "none" for c in self.features):
            return x_raw
        import torch

        return torch.stack([c.forward(x_raw[:, j]) for j, c in enumerate(self.features)], dim=1)

    def x_from_model(self, z: torch.Tensor) -> torch.Tensor:
        """Model inputs [N, D] -> raw inputs [N, D]."""
        if all(c.transform == "none" for c in self.features):
            return z
        import torch

        return torch.stack([c.inverse(z[:, j]) for j, c in enumerate(self.features)], dim=1)

    def x_to_model_np(self, x_raw: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
        """:meth:`x_to_model` for a float32 numpy array (the daemon's decoded batch).

        Affine columns are done as one vectorised ``(x - loc) / scale``; the
        result is float32.  A value outside a transform's domain (log1p of
        <= -1) comes out non-finite instead of raising.
        """
        if all(c.transform == "none" for c in self.features):
            return x_raw
        out = x_raw.astype(np.float64, copy=True)
        for j, c in enumerate(self.features):
            if c.transform == "log1p":
                with np.errstate(divide="ignore", invalid="ignore"):
                    out[:, j] = np.log1p(out[:, j])
        loc = np.array([c.loc if c.transform != "none" else 0.0 for c in self.features])
        scale = np.array([c.scale if c.transform != "none" else 1.0 for c in self.features])
        with np.errstate(over="ignore", invalid="ignore"):  # beyond float32: inf, caller checks
            return ((out - loc) / scale).astype(np.float32)

    def y_to_model(self, y_raw: torch.Tensor) -> torch.Tensor:
        """Raw target [N] -> model units."""
        return self.target.forward(y_raw)

    def y_from_model(self, z: torch.Tensor) -> torch.Tensor:
        """Model-unit target values (means, quantiles) -> target units."""
        return self.target.inverse(z)

    def y_to_model_np(self, y_raw: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
        """:meth:`y_to_model` for a float32 numpy array [N] (the daemon's decoded targets).

        Computed in float64, returned as float32.  A value outside the
        transform's domain comes out non-finite (log1p of -1 is -inf, below
        it NaN) instead of raising: the caller decides what to do with it.
        """
        c = self.target
        if c.transform == "none":
            return y_raw
        v = y_raw.astype(np.float64)
        if c.transform == "log1p":
            with np.errstate(divide="ignore", invalid="ignore"):
                v = np.log1p(v)
        with np.errstate(over="ignore", invalid="ignore"):
            return ((v - c.loc) / c.scale).astype(np.float32)

    @property
    def is_identity(self) -> bool:
        """Whether every column is used as it comes (no transform at all)."""
        return all(c.transform == "none" for c in (*self.features, self.target))

    def check_raw(self, x_raw: torch.Tensor) -> None:
        """Raise :class:`SchemaError` naming the first column/row a transform cannot take."""
        for j, c in enumerate(self.features):
            if c.transform == "log1p" and bool((x_raw[:, j] <= -1).any()):
                row = int((x_raw[:, j] <= -1).nonzero()[0])
                raise SchemaError(
                    f"{c.name}: transform log1p needs values > -1; row {row} has "
                    f"{float(x_raw[row, j])!r}"
                )

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form (the snapshot header's ``schema``)."""
        return {
            "features": [c.to_dict() for c in self.features],
            "target": self.target.to_dict(),
            "key": self.key,
            "timestamp": self.timestamp,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> DataSchema:
        """Inverse of :meth:`to_dict`."""
        return cls(
            tuple(Column.from_dict(c) for c in d["features"]),
            Column.from_dict(d["target"]),
            d.get("key"),
            d.get("timestamp"),
        )


__all__ = ["Column", "DataSchema", "SchemaError"]
