"""Seeded synthetic telemetry streams with known change points.

Every scenario draws ``x ~ N(0, I_8)`` and a target from one of a few
*regimes*.  Regime 0 is the warm-start process

.. math::

    y = \\sin(3 x_0) + \\varepsilon, \\qquad
    \\varepsilon \\sim N\\bigl(0, (0.1 + 0.4 |x_0|)^2\\bigr)

(the noise *standard deviation* grows with ``|x0|``).  The scenarios:

============  =================================================================
``stable``    regime 0 throughout (no change point)
``abrupt``    at batch ``n/3`` the mean jumps: ``y = sin(3 x0) + 1.5 + ε``
``gradual``   the same +1.5 shift, ramped in linearly from batch ``n/3`` to ``n/2``
``variance``  at batch ``n/3`` the noise std triples: ``3 (0.1 + 0.4|x0|)``
``recurring`` regimes 0 and 1 (``y = -sin(3 x0) + 0.5 x1 + ε``) alternate every ``n/4`` batches
``outlier``   regime 0, but for ``max(2, n/50)`` batches from ``n/2`` on 30% of the records
              get ``y`` replaced by ``±U(6, 10)`` (regime label 2 on those records)
``rotating``  ``y = sin(3 (cos θ_t x0 + sin θ_t x1)) + ε`` with ``θ_t`` turning
              linearly from 0 to π over the stream: drift everywhere, no change point
============  =================================================================

Randomness comes from one ``numpy.random.Generator(PCG64(seed))`` drawn in a
fixed order, so a ``(name, seed, n_batches, batch_size)`` tuple always gives the
same arrays, bit for bit, on every platform numpy supports.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

#: Number of input features of every generated stream.
N_FEATURES = 8
#: Timestamp of the first record (ms since the epoch); records are 1 s apart.
T0_MS = 1_700_000_000_000

SCENARIOS: dict[str, str] = {
    "stable": "regime 0 throughout: y = sin(3 x0) + eps, eps std 0.1 + 0.4|x0|",
    "abrupt": "abrupt mean shift: y = sin(3 x0) + 1.5 + eps from batch n/3",
    "gradual": "gradual drift: the +1.5 mean shift ramps in linearly from batch n/3 to n/2",
    "variance": "variance-only change: noise std triples from batch n/3",
    "recurring": "recurring regimes: 0 and 1 (y = -sin(3 x0) + 0.5 x1 + eps) alternate every n/4",
    "outlier": "outlier burst: 30% of records become +-U(6, 10) for max(2, n/50) batches at n/2",
    "rotating": "continuously rotating regression: y = sin(3 (cos t x0 + sin t x1)), t: 0 -> pi",
}


@dataclass(frozen=True)
class Stream:
    """A generated stream.

    Attributes
    ----------
    x:
        Features ``[N, D]`` (float32), ``N = n_batches * batch_size``.
    y:
        Targets ``[N]`` (float32).
    regime:
        Integer regime label per record ``[N]``.
    change_points:
        Record indices where a new regime (or a drift/burst) starts or ends.
    change_batches:
        The same change points as batch indices (``record // batch_size``).
    """

    name: str
    seed: int
    n_batches: int
    batch_size: int
    x: npt.NDArray[np.float32]
    y: npt.NDArray[np.float32]
    regime: npt.NDArray[np.int64]
    change_points: tuple[int, ...]
    change_batches: tuple[int, ...]
    description: str
    extra: dict[str, Any] = field(default_factory=dict)

    def batches(self) -> Iterator[tuple[npt.NDArray[np.float32], npt.NDArray[np.float32]]]:
        """Yield ``(x [B, D], y [B])`` per batch, in order."""
        b = self.batch_size
        for i in range(self.n_batches):
            yield self.x[i * b : (i + 1) * b], self.y[i * b : (i + 1) * b]

    def meta(self) -> dict[str, Any]:
        """JSON-able description (no arrays)."""
        return {
            "name": self.name,
            "seed": self.seed,
            "n_batches": self.n_batches,
            "batch_size": self.batch_size,
            "records": int(self.y.shape[0]),
            "change_points": list(self.change_points),
            "change_batches": list(self.change_batches),
            "description": self.description,
            **self.extra,
        }


def regime0_noise_std(x0: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    """Noise standard deviation of regime 0: ``0.1 + 0.4 |x0|``."""
    return 0.1 + 0.4 * np.abs(x0)


def regime0_mean(x: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    """Noise-free mean of regime 0: ``sin(3 x0)``."""
    return np.asarray(np.sin(3.0 * x[:, 0]))


def generate(name: str, seed: int = 0, n_batches: int = 300, batch_size: int = 64) -> Stream:
    """Generate scenario ``name`` (see :data:`SCENARIOS`) deterministically.

    Parameters
    ----------
    name:
        One of :data:`SCENARIOS`.
    seed:
        Seed of the PCG64 generator; the same arguments give bit-identical arrays.
    n_batches, batch_size:
        Stream length ``N = n_batches * batch_size``; change points are placed at
        fixed fractions of ``n_batches`` (batch boundaries).
    """
    if name not in SCENARIOS:
        raise ValueError(f"unknown scenario {name!r}; choose from {sorted(SCENARIOS)}")
    if n_batches < 4 or batch_size < 1:
        raise ValueError("need n_batches >= 4 and batch_size >= 1")
    rng = np.random.Generator(np.random.PCG64(seed))
    n = n_batches * batch_size
    x = rng.standard_normal((n, N_FEATURES))
    z = rng.standard_normal(n)  # unit noise, scaled per regime below
    batch_of = np.arange(n) // batch_size
    sd0 = regime0_noise_std(x[:, 0])
    mean = regime0_mean(x)
    sd = sd0.copy()
    regime = np.zeros(n, dtype=np.int64)
    cps: list[int] = []  # batch indices
    extra: dict[str, Any] = {}
    third = n_batches // 3
    if name == "abrupt":
        after = batch_of >= third
        mean = mean + 1.5 * after
        regime[after] = 1
        cps = [third]
    elif name == "gradual":
        end = n_batches // 2
        frac = np.clip((batch_of - third) / max(end - third, 1), 0.0, 1.0)
        mean = mean + 1.5 * frac
        regime[batch_of >= third] = 1
        cps = [third, end]
        extra["ramp_batches"] = [third, end]
    elif name == "variance":
        after = batch_of >= third
        sd = np.where(after, 3.0 * sd0, sd0)
        regime[after] = 1
        cps = [third]
    elif name == "recurring":
        period = max(n_batches // 4, 1)
        phase = (batch_of // period) % 2
        mean = np.where(phase == 1, -np.sin(3.0 * x[:, 0]) + 0.5 * x[:, 1], mean)
        regime = phase.astype(np.int64)
        cps = list(range(period, n_batches, period))
    elif name == "outlier":
        start = n_batches // 2
        length = max(2, n_batches // 50)
        in_burst = (batch_of >= start) & (batch_of < start + length)
        u = rng.uniform(size=n)
        mag = rng.uniform(6.0, 10.0, size=n)
        sign = np.where(rng.uniform(size=n) < 0.5, -1.0, 1.0)
        hit = in_burst & (u < 0.3)
        regime[hit] = 2
        cps = [start, start + length]
        extra["burst_batches"] = [start, start + length]
        y_out = sign * mag
    elif name == "rotating":
        theta = math.pi * batch_of / n_batches
        proj = np.cos(theta) * x[:, 0] + np.sin(theta) * x[:, 1]
        mean = np.sin(3.0 * proj)
        sd = regime0_noise_std(proj)
        regime = (4 * batch_of // n_batches).astype(np.int64)  # quarter-turn buckets
    y = mean + sd * z
    if name == "outlier":
        y = np.where(hit, y_out, y)
    return Stream(
        name=name,
        seed=seed,
        n_batches=n_batches,
        batch_size=batch_size,
        x=x.astype(np.float32),
        y=y.astype(np.float32),
        regime=regime,
        change_points=tuple(int(c * batch_size) for c in cps),
        change_batches=tuple(int(c) for c in cps),
        description=SCENARIOS[name],
        extra=extra,
    )


def _fmt(v: float, decimals: int) -> str:
    s = f"{v:.{decimals}f}".rstrip("0").rstrip(".")
    return "0" if s in ("-0", "") else s


def record_lines(stream: Stream, decimals: int = 4, key_count: int = 4) -> Iterator[str]:
    """Yield the stream as fogline JSONL records ``{"ts", "x", "y", "key"}``.

    ``ts`` is ms since the epoch (1 s apart from :data:`T0_MS`); values are
    rounded to ``decimals`` places, so the text (not the float32 arrays) is the
    canonical content of a written file; ``key`` cycles over ``unit-0 ..``.
    """
    for i in range(stream.y.shape[0]):
        xs = ",".join(_fmt(float(v), decimals) for v in stream.x[i])
        y = _fmt(float(stream.y[i]), decimals)
        key = json.dumps(f"unit-{i % key_count}")
        yield f'{{"ts":{T0_MS + 1000 * i},"x":[{xs}],"y":{y},"key":{key}}}'


def write_jsonl(stream: Stream, path: str | Path, decimals: int = 4) -> int:
    """Write ``stream`` to ``path`` as JSONL; returns the number of records."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    count = 0
    with p.open("w", encoding="utf-8", newline="\n") as fh:
        for line in record_lines(stream, decimals=decimals):
            fh.write(line + "\n")
            count += 1
    return count


def read_jsonl(path: str | Path) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.float32]]:
    """Read a fogline JSONL file with list-valued ``x``: returns ``(x [N, D], y [N])``."""
    xs: list[list[float]] = []
    ys: list[float] = []
    with Path(path).open(encoding="utf-8") as fh:
        for line in fh:
            if not line.strip():
                continue
            rec = json.loads(line)
            xs.append([float(v) for v in rec["x"]])
            ys.append(float(rec["y"]))
    return np.asarray(xs, dtype=np.float32), np.asarray(ys, dtype=np.float32)
