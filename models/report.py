"""The warm start's holdout report: JSON metrics and PNG figures, in target units.

Regression (gaussian / student-t)
---------------------------------
On the M holdout rows, with the predictive mixture p(y | x, D) of S posterior
samples (:mod:`fogline.models.predictive`) in model units z = g(y) and the
fitted target column g (:class:`~fogline.models.schema.Column`):

* ``nll`` = -(1/M) sum_i log p_y(y_i | x_i, D) in *target* units, i.e. the
  model-unit NLL plus the log-Jacobian of g: + log scale (standardise),
  + log scale + mean_i log(1 + y_i) (log1p), + 0 (none); ``nll_model`` is the
  model-unit value;
* ``rmse`` / ``mae`` of the point prediction in target units: the predictive
  mean (affine g: loc + scale E[z]; log1p with Gaussian components:
  mean_s exp(loc + scale mu_s + (scale sigma_s)^2 / 2) - 1, the log-normal
  mean), else the predictive median (``point`` says which);
* ``coverage_L`` = fraction of y_i inside the central L interval
  [g^-1(q_{(1-L)/2}), g^-1(q_{(1+L)/2})] of the mixture (g is monotone, so
  the interval maps exactly);
* ``pit_counts``: a 10-bin histogram of the PIT values u_i = F(z_i)
  (uniform when calibrated), ``calibration``: [level, coverage] pairs for
  levels 0.1 .. 0.9, 0.95, 0.99 (the reliability diagram).

Bernoulli
---------
p_i = (1/S) sum_s sigmoid(f_s(x_i)): ``nll`` = -mean log p(y_i),
``accuracy`` = mean 1[(p_i > 0.5) = y_i], ``brier`` = mean (p_i - y_i)^2,
``ece`` = sum_b (n_b / M) |mean_b y - mean_b p| over 10 equal-width bins of p
(``reliability``: [mean p, observed frequency, n] per non-empty bin).

``ood`` is a hook (:func:`ood_section`) for the per-feature out-of-support
probes of ``models/ood.py``.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

from fogline.models.predictive import (
    Ensemble,
    component_params,
    log_predictive_density,
    mixture_cdf,
    mixture_quantiles,
    predict,
)
from fogline.models.schema import DataSchema

#: Central levels of the calibration curve (the 0.5/0.9/0.95 coverages come from it).
LEVELS: tuple[float, ...] = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99)
PIT_BINS = 10
ECE_BINS = 10


def holdout_report(
    ens: Ensemble,
    schema: DataSchema,
    x_held: torch.Tensor,
    y_held: torch.Tensor,
    y_held_raw: torch.Tensor,
) -> dict[str, Any]:
    """The ``holdout`` section (see the module docstring); ``y_held`` in model units."""
    if ens.config.likelihood == "bernoulli":
        return _bernoulli(ens, x_held, y_held)
    return _regression(ens, schema, x_held, y_held, y_held_raw.double())


def _regression(
    ens: Ensemble,
    schema: DataSchema,
    x: torch.Tensor,
    z: torch.Tensor,
    y_raw: torch.Tensor,
) -> dict[str, Any]:
    col = schema.target
    p = predict(ens, x, levels=LEVELS)
    cover: dict[float, float] = {}
    for lv, (lo, hi) in p.intervals.items():
        lo_y, hi_y = col.inverse(lo.double()), col.inverse(hi.double())
        cover[lv] = float(((y_raw >= lo_y) & (y_raw <= hi_y)).double().mean())
    mu, sigma = component_params(ens, x)
    point, how = _point(ens, schema, p.mean, mu, sigma)
    err = point - y_raw
    nll_model = -float(log_predictive_density(ens, x, z).mean())
    jac = 0.0
    if col.transform != "none":
        jac = math.log(col.scale)
        if col.transform == "log1p":
            jac += float(torch.log1p(y_raw).mean())
    with torch.no_grad():
        pit = mixture_cdf(ens, z.to(mu.dtype), mu, sigma).double().clamp(0, 1)
    counts = torch.histc(pit, bins=PIT_BINS, min=0.0, max=1.0)
    return {
        "n": int(z.numel()),
        "nll": nll_model + jac,
        "nll_model": nll_model,
        "rmse": float(err.pow(2).mean().sqrt()),
        "mae": float(err.abs().mean()),
        "point": how,
        "y_sd": float(y_raw.std()) if y_raw.numel() > 1 else 0.0,
        "coverage_50": cover[0.5],
        "coverage_90": cover[0.9],
        "coverage_95": cover[0.95],
        "mean_width_95": float(
            (
                col.inverse(p.intervals[0.95][1].double())
                - col.inverse(p.intervals[0.95][0].double())
            ).mean()
        ),
        "calibration": [[lv, cover[lv]] for lv in LEVELS],
        "pit_counts": [int(c) for c in counts.tolist()],
    }


def _point(
    ens: Ensemble,
    schema: DataSchema,
    mean_z: torch.Tensor,
    mu: torch.Tensor,
    sigma: torch.Tensor,
) -> tuple[torch.Tensor, str]:
    """Point prediction in target units and its kind (``mean`` or ``median``)."""
    col = schema.target
    if col.affine:
        return col.inverse(mean_z.double()), "mean"
    if ens.config.likelihood == "gaussian":
        a = col.loc + col.scale * mu.double()
        b = col.scale * sigma.double()
        raw_mean = torch.exp(a + 0.5 * b * b).mean(0) - 1.0
        if bool(torch.isfinite(raw_mean).all()):
            return raw_mean, "mean"
    with torch.no_grad():
        med = mixture_quantiles(ens, torch.tensor([0.5], dtype=mu.dtype), mu, sigma)[0]
    return col.inverse(med.double()), "median"


def _bernoulli(ens: Ensemble, x: torch.Tensor, y: torch.Tensor) -> dict[str, Any]:
    mu, _ = component_params(ens, x)
    prob = mu.double().mean(0)
    yd = y.double()
    py = torch.where(yd > 0.5, prob, 1 - prob).clamp_min(1e-12)
    bins = torch.clamp((prob * ECE_BINS).long(), max=ECE_BINS - 1)
    ece = 0.0
    reliability: list[list[float]] = []
    for b in range(ECE_BINS):
        sel = bins == b
        n_b = int(sel.sum())
        if n_b == 0:
            continue
        mp, fy = float(prob[sel].mean()), float(yd[sel].mean())
        ece += n_b / yd.numel() * abs(fy - mp)
        reliability.append([mp, fy, float(n_b)])
    return {
        "n": int(y.numel()),
        "nll": -float(py.log().mean()),
        "accuracy": float(((prob > 0.5).double() == yd).double().mean()),
        "brier": float((prob - yd).pow(2).mean()),
        "ece": ece,
        "base_rate": float(yd.mean()),
        "reliability": reliability,
    }


def ood_section(
    ens: Ensemble, schema: DataSchema, x_train: torch.Tensor, x_held: torch.Tensor
) -> dict[str, Any]:
    """The per-feature out-of-support probes of :func:`fogline.models.ood.epistemic_ratios`.

    ``ood.epistemic_ratio`` per feature (epistemic sd at the 4-IQR probes over
    the held-out mean, model units), ``ood.epistemic_ratio_min`` over features,
    and the 2-IQR figures.
    """
    from fogline.models.ood import epistemic_ratios

    return epistemic_ratios(ens, x_train, x_held, schema.feature_names).to_json()


def write_figures(
    ens: Ensemble,
    schema: DataSchema,
    report: dict[str, Any],
    x_train: torch.Tensor,
    y_train: torch.Tensor,
    out_dir: str | Path,
    margin: float = 3.0,
) -> dict[str, str]:
    """Write ``pit.png`` (regression), ``reliability.png`` and ``bands.png`` under ``out_dir``.

    ``x_train`` / ``y_train`` are the model-unit training rows (shown raw).
    Returns kind -> path.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files: dict[str, str] = {}
    held = report["holdout"]
    bern = ens.config.likelihood == "bernoulli"
    if not bern:
        fig, ax = plt.subplots(figsize=(5, 3.5))
        counts = held["pit_counts"]
        edges = [i / PIT_BINS for i in range(PIT_BINS)]
        ax.bar(edges, counts, width=1 / PIT_BINS, align="edge", color="tab:blue", alpha=0.7)
        ax.axhline(held["n"] / PIT_BINS, color="black", ls="--", lw=1, label="uniform")
        ax.set_xlabel("PIT  F(y | x, D)")
        ax.set_ylabel("holdout rows")
        ax.set_title(f"PIT histogram (n = {held['n']})", fontsize=9)
        ax.legend(fontsize=8)
        fig.tight_layout()
        files["pit"] = str(out / "pit.png")
        fig.savefig(files["pit"], dpi=100)
        plt.close(fig)
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    ax.plot([0, 1], [0, 1], color="black", ls="--", lw=1)
    if bern:
        rel = held["reliability"]
        ax.plot([r[0] for r in rel], [r[1] for r in rel], "o-", color="tab:blue")
        ax.set_xlabel("predicted probability")
        ax.set_ylabel("observed frequency")
        ax.set_title(f"reliability (ECE {held['ece']:.3f})", fontsize=9)
    else:
        cal = held["calibration"]
        ax.plot([c[0] for c in cal], [c[1] for c in cal], "o-", color="tab:blue")
        ax.set_xlabel("nominal central interval level")
        ax.set_ylabel("observed holdout coverage")
        ax.set_title("reliability of the credible intervals", fontsize=9)
    fig.tight_layout()
    files["reliability"] = str(out / "reliability.png")
    fig.savefig(files["reliability"], dpi=100)
    plt.close(fig)
    files["bands"] = str(out / "bands.png")
    band_plot(ens, schema, x_train, y_train, files["bands"], margin=margin)
    return files


def band_plot(
    ens: Ensemble,
    schema: DataSchema,
    x_train: torch.Tensor,
    y_train: torch.Tensor,
    path: str | Path,
    *,
    margin: float = 3.0,
    points: int = 161,
) -> None:
    """Per-feature partial dependence with the 95 % band, raw units on both axes.

    Panel j varies feature j over its training range widened by ``margin``
    model units on each side, the other features at their training medians;
    the 95 % band of the mixture, its epistemic part (the central 95 % of the S
    sample means f_s(x), mapped to target units) shaded apart, the training
    range marked, and up to 1,500 training rows.  ``log1p`` columns get a
    symlog axis.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    d = x_train.shape[1]
    cols = min(3, d)
    rows = math.ceil(d / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.2 * rows), squeeze=False)
    med = x_train.median(0).values
    tcol = schema.target
    k = min(1500, x_train.shape[0])
    y_raw = tcol.inverse(y_train[:k].double())
    for j, fcol in enumerate(schema.features):
        ax = axes[j // cols][j % cols]
        lo, hi = float(x_train[:, j].min()), float(x_train[:, j].max())
        grid = torch.linspace(lo - margin, hi + margin, points)
        xg = med.repeat(points, 1)
        xg[:, j] = grid
        p = predict(ens, xg, levels=(0.95,))
        b_lo, b_hi = p.intervals[0.95]
        gx = fcol.inverse(grid.double()).numpy()
        ax.scatter(
            fcol.inverse(x_train[:k, j].double()).numpy(),
            y_raw.numpy(),
            s=2,
            alpha=0.2,
            color="grey",
        )
        ax.fill_between(
            gx,
            tcol.inverse(b_lo.double()).numpy(),
            tcol.inverse(b_hi.double()).numpy(),
            color="tab:blue",
            alpha=0.25,
            label="95% band",
        )
        mu, _ = component_params(ens, xg)
        e_lo, e_hi = torch.quantile(mu.double(), torch.tensor([0.025, 0.975]).double(), dim=0)
        ax.fill_between(
            gx,
            tcol.inverse(e_lo).numpy(),
            tcol.inverse(e_hi).numpy(),
            color="tab:orange",
            alpha=0.4,
            label="epistemic part (95% of the means)",
        )
        ax.plot(gx, tcol.inverse(p.mean.double()).numpy(), color="tab:blue", lw=1.2)
        r_lo, r_hi = fcol.inverse(torch.tensor([lo, hi], dtype=torch.float64)).tolist()
        ax.axvspan(r_lo, r_hi, color="green", alpha=0.06, label="training range")
        ax.axvline(r_lo, color="green", ls=":", lw=1)
        ax.axvline(r_hi, color="green", ls=":", lw=1)
        if fcol.transform == "log1p":
            ax.set_xscale("symlog", linthresh=1.0)
        if tcol.transform == "log1p":
            ax.set_yscale("symlog", linthresh=1.0)
        ax.set_xlabel(f"{fcol.name} (others at training medians)", fontsize=8)
        ax.set_ylabel(tcol.name, fontsize=8)
        if j == 0:
            ax.legend(fontsize=7, loc="best")
    for j in range(d, rows * cols):
        axes[j // cols][j % cols].axis("off")
    fig.tight_layout()
    fig.savefig(str(path), dpi=90)
    plt.close(fig)


__all__ = [
    "ECE_BINS",
    "LEVELS",
    "PIT_BINS",
    "band_plot",
    "holdout_report",
    "ood_section",
    "write_figures",
]
