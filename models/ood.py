"""Epistemic uncertainty outside the training support, one feature at a time.

For every feature j of the (model-space) training rows x [N, D], with the
robust summaries of :func:`fogline.models.fprior.robust_support`
(a_j = Q_j(0.005), b_j = Q_j(0.995), median m_j, interquartile range s_j),
four probes move feature j alone out of the data, the other features at
their medians:

    x^(j, side, k) = m  with  x_j = a_j - k s_j  (side "lo")  or  b_j + k s_j  (side "hi"),   k in {2, 4}

With sd_e(x) = sqrt(Var_{w ~ q}[mu_w(x)]) the epistemic standard deviation of
the predictive mean under the cached posterior samples, and
sd_in = mean_i sd_e(x_i) over held-out in-range rows x_in [M, D], the ratio of
feature j at k IQR is the *smaller* side:

    r_j(k) = min(sd_e(x^(j, lo, k)), sd_e(x^(j, hi, k))) / sd_in

and ``epistemic_ratio_min`` = min_j r_j(4).  A model that knows what it does
not know has r_j(4) well above 1 for every j; one that extrapolates
confidently along a feature has r_j ~ 1 there.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from fogline.models.fprior import TAIL, robust_support
from fogline.models.predictive import Ensemble, predictive_moments

#: The probe distances k (in interquartile ranges beyond the tail quantiles).
PROBE_IQRS: tuple[float, float] = (2.0, 4.0)


@dataclass(frozen=True)
class FeatureOod:
    """Probes and epistemic sds of one feature (``sd[side][k]``, side "lo"/"hi", k 2/4)."""

    name: str
    probe: dict[str, dict[float, float]]
    sd: dict[str, dict[float, float]]
    ratio: dict[float, float]

    def to_json(self) -> dict[str, Any]:
        """JSON-able form: probes, sds and ratios keyed "2iqr"/"4iqr"."""
        return {
            "probe": {s: {_key(k): v for k, v in d.items()} for s, d in self.probe.items()},
            "epistemic_sd": {s: {_key(k): v for k, v in d.items()} for s, d in self.sd.items()},
            "ratio": {_key(k): v for k, v in self.ratio.items()},
        }


@dataclass(frozen=True)
class OodReport:
    """Per-feature epistemic ratios outside the training support (module docstring)."""

    epistemic_in: float
    features: tuple[FeatureOod, ...]

    @property
    def epistemic_ratio(self) -> dict[str, float]:
        """r_j(4) per feature name."""
        return {f.name: f.ratio[PROBE_IQRS[1]] for f in self.features}

    @property
    def epistemic_ratio_2iqr(self) -> dict[str, float]:
        """r_j(2) per feature name."""
        return {f.name: f.ratio[PROBE_IQRS[0]] for f in self.features}

    @property
    def epistemic_ratio_min(self) -> float:
        """min_j r_j(4)."""
        return min(self.epistemic_ratio.values())

    def to_json(self) -> dict[str, Any]:
        """``{"epistemic_ratio": {name: r_j(4)}, "epistemic_ratio_min": ..., ...}``."""
        return {
            "epistemic_ratio": self.epistemic_ratio,
            "epistemic_ratio_min": self.epistemic_ratio_min,
            "epistemic_ratio_2iqr": self.epistemic_ratio_2iqr,
            "epistemic_sd_in": self.epistemic_in,
            "features": {f.name: f.to_json() for f in self.features},
        }

    def table(self) -> list[str]:
        """Markdown rows: feature, 4-IQR probes, sd in, sd at 2 / 4 IQR (lo / hi), ratios."""
        k2, k4 = PROBE_IQRS
        rows = [
            "| feature | 4-IQR probes (lo / hi) | epistemic sd in | sd at 2 IQR (lo / hi) "
            "| sd at 4 IQR (lo / hi) | ratio 2 IQR | ratio 4 IQR |",
            "|---|---|---|---|---|---|---|",
        ]
        for f in self.features:
            rows.append(
                f"| {f.name} | {f.probe['lo'][k4]:.2f} / {f.probe['hi'][k4]:.2f} "
                f"| {self.epistemic_in:.3f} "
                f"| {f.sd['lo'][k2]:.3f} / {f.sd['hi'][k2]:.3f} "
                f"| {f.sd['lo'][k4]:.3f} / {f.sd['hi'][k4]:.3f} "
                f"| {f.ratio[k2]:.1f} | {f.ratio[k4]:.1f} |"
            )
        return rows


def probes(x_train: torch.Tensor, tail: float = TAIL) -> tuple[torch.Tensor, torch.Tensor]:
    """(x [D * 2 * 2, D], position [D, 2, 2]) of the probes, ordered feature, side (lo, hi), k.

    Every probe row is the training medians with feature j at a_j - k s_j or
    b_j + k s_j, k in :data:`PROBE_IQRS`.
    """
    sup = robust_support(x_train, tail)
    d = x_train.shape[1]
    ks = torch.tensor(PROBE_IQRS, dtype=sup.spread.dtype)
    lo = sup.q_lo[:, None] - ks[None, :] * sup.spread[:, None]  # [D, 2]
    hi = sup.q_hi[:, None] + ks[None, :] * sup.spread[:, None]
    pos = torch.stack((lo, hi), dim=1)  # [D, side, k]
    x = sup.median.expand(d, 2, len(PROBE_IQRS), d).clone()
    for j in range(d):
        x[j, :, :, j] = pos[j]
    return x.reshape(-1, d), pos


def epistemic_ratios(
    ens: Ensemble, x_train: torch.Tensor, x_in: torch.Tensor, names: Sequence[str]
) -> OodReport:
    """Per-feature epistemic sd at the 2- and 4-IQR probes over the in-range mean.

    Parameters
    ----------
    ens:
        Cached posterior samples (:func:`fogline.models.predictive.sample_ensemble`).
    x_train:
        Training rows [N, D] in model space (the probes come from their quantiles).
    x_in:
        Held-out in-range rows [M, D] in model space (sd_in is their mean epistemic sd).
    names:
        The D feature names, in column order.
    """
    d = len(names)
    for label, x in (("x_train", x_train), ("x_in", x_in)):
        if x.dim() != 2 or x.shape[1] != d or x.shape[0] < 1:
            raise ValueError(
                f"epistemic_ratios: {label} must be [rows, {d}] (one column per name), "
                f"got shape {tuple(x.shape)}"
            )
    if ens.config.in_features != d:
        raise ValueError(
            f"epistemic_ratios: {d} names for a model with in_features={ens.config.in_features}"
        )
    x_probe, pos = probes(x_train)
    with torch.no_grad():
        _, ep_in, _ = predictive_moments(ens, x_in.float())
        _, ep_probe, _ = predictive_moments(ens, x_probe.float())
    sd_in = float(ep_in.sqrt().mean())
    sd = ep_probe.sqrt().double().reshape(d, 2, len(PROBE_IQRS))
    feats = []
    for j, name in enumerate(names):
        per_side = {
            side: {k: float(sd[j, s, i]) for i, k in enumerate(PROBE_IQRS)}
            for s, side in enumerate(("lo", "hi"))
        }
        where = {
            side: {k: float(pos[j, s, i]) for i, k in enumerate(PROBE_IQRS)}
            for s, side in enumerate(("lo", "hi"))
        }
        ratio = {
            k: min(per_side["lo"][k], per_side["hi"][k]) / max(sd_in, 1e-12) for k in PROBE_IQRS
        }
        feats.append(FeatureOod(str(name), where, per_side, ratio))
    return OodReport(sd_in, tuple(feats))


def _key(k: float) -> str:
    return f"{k:g}iqr"


__all__ = ["PROBE_IQRS", "FeatureOod", "OodReport", "epistemic_ratios", "probes"]
