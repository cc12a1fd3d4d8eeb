"""Predictions in raw units: named inputs as the user sends them, answers in target units.

The model works in model units (:mod:`fogline.models.schema`); this module is
the edge.  For rows x_raw [N, D] it computes z = schema.x_to_model(x_raw), the
predictive mixture p(z_y | z) of :func:`fogline.models.predictive.predict`,
and maps the answer back through the target column's inverse g:

* ``none`` (g(z) = z): the model-unit answer as it is.
* ``standardise`` (g(z) = loc + scale z, affine): exact --
  mean_v = loc + scale mean_z; every sd (total, epistemic, aleatoric) times
  scale; interval ends q_v = loc + scale q_z.
* ``log1p`` (g(z) = expm1(loc + scale z), monotone): quantiles map exactly,
  so the intervals are g(q_z).  Moments do not: per ensemble component s the
  raw value is v = exp(w) - 1 with w = loc + scale z_s.  Gaussian components,
  w ~ N(m_s, s_s^2) with m_s = loc + scale mu_s and s_s = scale sigma_s, give
  the log-normal moments in closed form,

      E_s = exp(m_s + s_s^2 / 2) - 1,   V_s = (exp(s_s^2) - 1) exp(2 m_s + s_s^2);

  Student-t components have no finite exp-moments, so E_s and V_s are the
  sample moments of ``mc_draws`` draws per component (seeded: the same
  request gets the same answer) -- a finite summary, not an estimate of a
  finite quantity; use the intervals.  The mixture then gives, by the law of
  total variance, mean = mean_s E_s, epistemic var = var_s E_s, aleatoric var
  = mean_s V_s, total = epistemic + aleatoric.

The anomaly score and tail probability of an observation y are invariant
under a monotone g: F_v(y) = F_z(g^-1(y)), so they are computed on
g^-1(y) in model units (a log1p target below its domain has F = 0).
"""

from __future__ import annotations

import numpy as np
import torch

from fogline.models.predictive import Ensemble, Prediction, component_params, predict
from fogline.models.schema import DataSchema, SchemaError

#: Draws per ensemble component for the Monte Carlo moments of a Student-t log1p target.
MC_DRAWS = 64


def rows_to_model(schema: DataSchema, x_raw: torch.Tensor) -> torch.Tensor:
    """Raw rows [N, D] -> model inputs [N, D] float32; :class:`SchemaError` names column and row.

    Raises for a value outside a transform's domain (log1p of <= -1) and for
    one that is not finite in float32 once transformed.
    """
    schema.check_raw(x_raw)
    z = schema.x_to_model(x_raw.double()).float()
    bad = ~torch.isfinite(z)
    if bool(bad.any()):
        row, col = (int(v) for v in torch.nonzero(bad)[0])
        raise SchemaError(
            f"{schema.features[col].name}: row {row} ({float(x_raw[row, col])!r}) is not "
            "finite in model units"
        )
    return z


def predict_raw(
    ens: Ensemble,
    schema: DataSchema,
    x_raw: torch.Tensor,
    levels: tuple[float, ...] = (0.95,),
    y_raw: torch.Tensor | None = None,
    method: str = "mixture",
    mc_draws: int = MC_DRAWS,
) -> Prediction:
    """Predictive summaries in target units for raw rows ``x_raw`` [N, D] (see module doc)."""
    z = rows_to_model(schema, x_raw)
    col = schema.target
    y_m = None
    if y_raw is not None:
        y_m = col.forward(y_raw.double())
        y_m = torch.nan_to_num(y_m, nan=-torch.inf)  # log1p below its domain: F = 0
    pred = predict(ens, z, levels=levels, y=y_m, method=method)
    if col.transform == "none":
        return pred
    intervals = {
        lv: (col.inverse(lo.double()), col.inverse(hi.double()))
        for lv, (lo, hi) in pred.intervals.items()
    }
    if col.affine:
        mean = col.inverse(pred.mean.double())
        epistemic = pred.epistemic_std.double() * col.scale
        aleatoric = pred.aleatoric_std.double() * col.scale
        total = pred.total_std.double() * col.scale
    else:
        mean, epi_var, ale_var = _log1p_moments(ens, z, col.loc, col.scale, mc_draws)
        epistemic, aleatoric = epi_var.sqrt(), ale_var.sqrt()
        total = (epi_var + ale_var).sqrt()
    return Prediction(
        mean, total, epistemic, aleatoric, intervals, pred.tail_prob, pred.anomaly_score
    )


def _log1p_moments(
    ens: Ensemble, z: torch.Tensor, loc: float, scale: float, mc_draws: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(mean, epistemic var, aleatoric var) [N] of v = expm1(loc + scale z_y) (module doc)."""
    with torch.no_grad():
        mu, sigma = component_params(ens, z)
        m = loc + scale * mu.double()  # [S, N]
        s = scale * sigma.double()
        if ens.config.likelihood == "student-t" and ens.df is not None:
            rng = np.random.default_rng(0)  # seeded: the same request, the same answer
            draws = torch.from_numpy(rng.standard_t(ens.df, size=(mc_draws, *m.shape)))
            v = torch.expm1(m + s * draws)  # [K, S, N]
            e_s = v.mean(0)
            v_s = v.var(0, correction=0)
        else:
            e_s = torch.expm1(m + 0.5 * s * s)
            v_s = torch.expm1(s * s) * torch.exp(2 * m + s * s)
        mean = e_s.mean(0)
        epistemic = e_s.var(0, correction=0)
        aleatoric = v_s.mean(0)
    return mean, epistemic, aleatoric


__all__ = ["MC_DRAWS", "predict_raw", "rows_to_model"]
