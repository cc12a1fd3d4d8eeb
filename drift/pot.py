"""Calibrated exceedance probabilities of a score stream: empirical bulk, peaks-over-threshold tail.

A detector's statistic a_t >= 0 (larger: more anomalous) is turned into

    q_t = P(A >= a_t),  estimated from the same stream's past values a_{t-n..t-1},

so that on a stable stream the rule "alarm when q_t <= q" fires at a rate close
to q per record, whatever the statistic's distribution (heavy tails,
autocorrelated residuals, clusters left after repeat suppression).  The
estimate, from the last n <= ``window`` values h_1..h_n (strictly before t):

* **Bulk** (a_t at or below the threshold u): the rank estimate

      q_t = (#{h_j >= a_t} + 1) / (n + 1),

  for exchangeable values P(q_t <= q) <= q exactly (the rank of a_t among
  n + 1 values is uniform), so the bulk is calibrated by construction;
  a_t <= 0 gives q_t = 1 when the history is non-negative; with at most m
  positive past values the rank estimate is used throughout.
* **Tail** (a_t > u), peaks over threshold (Pickands 1975; SPOT, Siffer et
  al. 2017): u is the (m + 1)-th largest past *positive* value,
  m = max(``min_peaks``, ceil(``tail_fraction`` n_pos)) (a statistic with an
  atom at 0, such as a repeat-suppressed score, has its tail among the
  values that are not 0), and the m excesses y = h - u of the values above
  it are modelled by a generalised Pareto distribution,

      q_t = q(u) (1 + xi (a_t - u) / sigma)^(-1/xi)   (xi > 0),
      q_t = q(u) exp(-(a_t - u) / sigma)               (xi = 0),

  with q(u) the bulk estimate at u.  xi and sigma are the probability-weighted
  moments estimates (Hosking & Wallis 1987): with the excesses sorted
  ascending, a0 = mean(y), a1 = (1/m) sum_i (1 - p_i) y_(i), p_i = (i - 0.35)/m,

      xi = 2 - a0 / (a0 - 2 a1),   sigma = (1 - xi) a0

  (sigma from the mean excess, a0 = sigma / (1 - xi), after the clip), xi
  clipped to [0, ``max_shape``]: never a bounded tail (past its end point
  every value would get q = 0 and no resolution), never so heavy that a few
  peaks make every later value ordinary.  Until ``min_history`` values exist
  the estimate is the caller's ``nominal`` probability, e.g. the statistic's
  own model-based tail (degenerate excesses, all 0: min(nominal, q(u))).

:class:`TailCalibrator` holds the last ``window`` values (its whole state, plain
floats), so a restarted stream continues exactly.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import numpy as np
import numpy.typing as npt
from pydantic import BaseModel, ConfigDict, Field, model_validator

FloatArray = npt.NDArray[np.float64]


class TailConfig(BaseModel):
    """Settings of :class:`TailCalibrator` (module docstring), frozen and validated."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    window: int = Field(default=10_000, ge=2)
    min_history: int = Field(default=500, ge=2)
    tail_fraction: float = Field(default=0.02, gt=0, lt=1)
    min_peaks: int = Field(default=10, ge=3)
    max_shape: float = Field(default=0.5, ge=0, lt=1)

    @model_validator(mode="after")
    def _check(self) -> TailConfig:
        if self.min_history > self.window:
            raise ValueError(f"min_history: must be <= window ({self.window})")
        if self.min_peaks >= self.min_history:
            raise ValueError(f"min_peaks: must be < min_history ({self.min_history})")
        return self


def gpd_pwm(excess: npt.ArrayLike, max_shape: float = 0.5) -> tuple[float, float] | None:
    """(xi, sigma) of a generalised Pareto fit to ``excess`` (>= 0) by PWM; None if degenerate.

    See the module docstring; xi is clipped to [0, max_shape] and sigma then
    re-estimated from the mean, sigma = (1 - xi) a0, so the fitted mean
    excess always equals the observed one.
    """
    y = np.sort(np.asarray(excess, dtype=np.float64))
    m = len(y)
    if m < 2:
        return None
    a0 = float(y.mean())
    p = (np.arange(1, m + 1) - 0.35) / m
    a1 = float(np.mean((1.0 - p) * y))
    denom = a0 - 2.0 * a1
    if not a0 > 0 or not denom > 0:
        return None
    xi = min(max(2.0 - a0 / denom, 0.0), max_shape)
    return xi, (1.0 - xi) * a0


def exceedance(value: float, history: FloatArray, nominal: float, cfg: TailConfig) -> float:
    """q = P(A >= value) from past values ``history`` [n] (module docstring)."""
    n = len(history)
    if n < cfg.min_history:
        return nominal
    pos = history[history > 0]
    m = max(cfg.min_peaks, math.ceil(cfg.tail_fraction * len(pos)))
    if value <= 0 or len(pos) <= m:
        return (np.count_nonzero(history >= value) + 1.0) / (n + 1.0)
    top = np.partition(pos, len(pos) - m - 1)[len(pos) - m - 1 :]  # u, then the m largest
    u = float(top[0])
    if value <= u:
        return (np.count_nonzero(history >= value) + 1.0) / (n + 1.0)
    fit = gpd_pwm(top[1:] - u, cfg.max_shape)
    q_u = (np.count_nonzero(history >= u) + 1.0) / (n + 1.0)
    if fit is None:
        return min(nominal, q_u)
    xi, sigma = fit
    x = (value - u) / sigma
    log_sf = -x if xi == 0.0 else -math.log1p(xi * x) / xi
    return q_u * math.exp(log_sf)


class TailCalibrator:
    """Calibrated exceedance probabilities record by record (module docstring).

    The last ``window`` values live in a ring buffer (order does not enter
    the estimate); :meth:`state_dict` writes them oldest first.
    """

    def __init__(self, cfg: TailConfig | None = None) -> None:
        self.cfg = cfg or TailConfig()
        self._buf = np.zeros(self.cfg.window, dtype=np.float64)
        self._n = 0  # values held, <= window
        self._head = 0  # next slot to write

    def _push(self, value: float) -> None:
        self._buf[self._head] = value
        self._head = (self._head + 1) % self.cfg.window
        self._n = min(self._n + 1, self.cfg.window)

    def update(self, values: Iterable[float], nominal: Iterable[float]) -> FloatArray:
        """q_t for each value (each against the values before it); ``nominal`` until warmed up."""
        out = []
        for v, q0 in zip(values, nominal, strict=True):
            out.append(exceedance(float(v), self._buf[: self._n], float(q0), self.cfg))
            self._push(float(v))
        return np.asarray(out, dtype=np.float64)

    def state_dict(self) -> dict[str, list[Any]]:
        """The running state as JSON: the last ``window`` values, oldest first."""
        if self._n < self.cfg.window:
            return {"history": self._buf[: self._n].tolist()}
        return {"history": np.roll(self._buf, -self._head).tolist()}

    @classmethod
    def from_state(
        cls, state: dict[str, list[Any]], cfg: TailConfig | None = None
    ) -> TailCalibrator:
        """A calibrator continued from :meth:`state_dict`."""
        out = cls(cfg)
        for v in state["history"][-out.cfg.window :]:
            out._push(float(v))
        return out


def calibrate(
    values: npt.ArrayLike, nominal: npt.ArrayLike, cfg: TailConfig | None = None
) -> FloatArray:
    """q_t of a whole sequence: :class:`TailCalibrator` run from empty (causal)."""
    v = np.asarray(values, dtype=np.float64)
    q0 = np.broadcast_to(np.asarray(nominal, dtype=np.float64), v.shape)
    return TailCalibrator(cfg).update(v.tolist(), q0.tolist())


__all__ = ["TailCalibrator", "TailConfig", "calibrate", "exceedance", "gpd_pwm"]
