"""The warm-start recipe: fit the BNN on California inputs, check its uncertainty.

Recipe (``fogline warmstart``)
------------------------------
1. Standardise the 8 California features; x0 = standardised MedInc.
2. y = sin(3 x0) + eps, eps ~ N(0, (0.1 + 0.4 |x0|)^2)  (:mod:`fogline.models.data`).
3. Keep the rows with |x0| <= 2; hold out a seeded 20 % slice.
4. Minibatch SVI (Adam, lr 0.005, batch 256, 800 epochs) of the BNN with the
   fan-in prior, a small initial posterior scale (1e-3), a *bounded* noise head
   sigma = noise_min + (noise_max - noise_min) sigmoid(r) with noise_max =
   3 std(y_train), and the functional prior of :mod:`fogline.models.fprior` on
   every feature beyond its robust edges (Q(0.005) and Q(0.995), 3 IQR deep;
   gamma 0.05, sigma_0 = 2 std(y_train)).  The held-out negative
   log predictive density is tracked every epoch.
5. Draw S = 100 posterior samples; 95 % credible bands of the predictive
   mixture on a grid of 401 points x0 in [-5, 5] (other features 0).

Metrics (:func:`evaluate`)
--------------------------
In range = held-out rows (|x0| <= 2); out of range = grid points with
3 <= |x0| <= 5.  With band [l(x), u(x)] and sigma(x0) the true noise std:

* coverage_95_in  = mean_i 1[l(x_i) <= y_i <= u(x_i)] over held-out rows
* width_in        = mean_i (u - l)(x_i),   true_width_in = mean_i 2 z sigma(x0_i), z = 1.96
* width_out, true_width_out: the same over the out-of-range grid points
* coverage_95_out = fraction of fresh draws y ~ sin(3 x0) + sigma(x0) eps
  (50 per out-of-range grid point) inside the band
* epistemic_out_over_in = mean epistemic std out / mean epistemic std in
* epistemic_var_share_out = mean over the out-of-range grid of
  epistemic var / (epistemic var + aleatoric var)
* aleatoric_rel_err_in  = mean_i |sigma_learned(x_i) - sigma(x0_i)| / sigma(x0_i)
  (sigma_learned = the aleatoric std of the mixture)
* rmse_in = sqrt(mean_i (E[y | x_i, D] - sin(3 x0_i))^2)
* ood (:func:`fogline.models.ood.epistemic_ratios`): per feature, the epistemic
  sd at its 0.5 / 99.5 % training quantiles pushed out by 2 and 4 IQR (other
  features at their medians) over the in-range mean; ``epistemic_ratio_min``
  = the smallest 4-IQR ratio over features (also in ``metrics``).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from fogline.models.config import GuideName, LikelihoodName, ModelConfig, NoiseHead, PriorName
from fogline.models.data import (
    FEATURE_NAMES,
    RecipeData,
    Table,
    load,
    recipe_data,
    true_mean,
    true_noise_std,
)
from fogline.models.fprior import EXTRA_KEY as FPRIOR_KEY
from fogline.models.fprior import GAP, LR_SCALE_KEY, MARGIN, FunctionalPrior
from fogline.models.ood import OodReport, epistemic_ratios
from fogline.models.predictive import Ensemble, log_predictive_density, predict, sample_ensemble
from fogline.models.serialize import save
from fogline.models.state import PosteriorState
from fogline.models.svi import init_state
from fogline.models.training import train_epochs

Z95 = 1.959963984540054
#: The recipe's positive heavy-tailed columns, taken as log(1 + x) before standardising
#: (AveOccup: max 57 sd, 99.9th percentile 0.9 sd): without it the functional prior's
#: out-of-data region of AveOccup lies inside its thin upper tail (docs/model.md).
HEAVY_TAILED: tuple[str, ...] = ("AveRooms", "AveBedrms", "Population", "AveOccup")
GRID_POINTS = 401
GRID_LIMIT = 5.0
IN_LIMIT = 2.0
OUT_LIMIT = 3.0
OUT_DRAWS = 50


@dataclass(frozen=True)
class WarmstartOptions:
    """Every knob of the recipe; the defaults are the recipe that meets the quality bar.

    ``fprior_weight = 0`` trains without the functional-prior term; ``noise_max = None`` means 3 std(y_train); ``fprior_scale = None``
    means sigma_0 = 2 std(y_train); ``fprior_features = None`` puts the
    functional prior on every feature (``fprior_gap`` k and ``fprior_margin`` m
    in IQRs: :meth:`fogline.models.fprior.FunctionalPrior.from_data`).
    ``log1p_features`` names raw columns replaced by log(1 + x) before
    standardising (positive heavy-tailed ones: AveRooms, AveBedrms,
    Population, AveOccup); the state then expects them in that space.

    ``from_net`` (a ``state_dict`` file of an
    ``nn.Sequential`` MLP with 8 inputs) starts from that net: prior
    N(w_net, net_prior_scale^2) and posterior mean w_net (:mod:`fogline.models.bayesianize`);
    its widths and activation replace ``hidden``.  ``particles`` samples estimate
    the expected log-likelihood; the low-rank factor V takes Adam steps of
    ``lr * cov_factor_lr_scale`` (Adam moves every entry of V by ~lr at once,
    coherently along a column: at lr 0.005 the columns reach norm 0.5 in four
    steps and the fit diverges; 0.05 keeps it stable).
    """

    data: str | None = None
    epochs: int = 800
    lr: float = 5e-3
    batch: int = 256
    likelihood: LikelihoodName = "gaussian"
    guide: GuideName = "meanfield"
    prior: PriorName = "fan_in"
    hidden: tuple[int, ...] = (32, 32)
    seed: int = 0
    init_scale: float = 1e-3
    prior_scale: float = 1.0
    noise_head: NoiseHead = "bounded"
    noise_max: float | None = None
    df: float | None = None
    rank: int = 10
    fprior_weight: float = 0.05
    fprior_scale: float | None = None
    fprior_margin: float = MARGIN
    fprior_gap: float = GAP
    fprior_features: tuple[int, ...] | None = None
    held_out: float = 0.2
    samples: int = 100
    out: str | None = None
    particles: int = 1
    cov_factor_lr_scale: float = 0.05
    from_net: str | None = None
    net_prior_scale: float = 0.1
    log1p_features: tuple[str, ...] = HEAVY_TAILED


@dataclass
class WarmstartResult:
    """The trained state, its metrics, the per-epoch history and the files written."""

    state: PosteriorState
    metrics: dict[str, float]
    history: list[dict[str, float]] = field(default_factory=list)
    files: dict[str, str] = field(default_factory=dict)
    ood: OodReport | None = None


def build_config(opts: WarmstartOptions, y_train: torch.Tensor) -> ModelConfig:
    """The :class:`ModelConfig` of the recipe (noise_max defaults to 3 std(y_train))."""
    noise_max = opts.noise_max if opts.noise_max is not None else 3.0 * float(y_train.std())
    return ModelConfig(
        in_features=len(FEATURE_NAMES),
        hidden=tuple(opts.hidden),
        likelihood=opts.likelihood,
        guide=opts.guide,
        rank=opts.rank,
        prior=opts.prior,
        prior_scale=opts.prior_scale,
        init_scale=opts.init_scale,
        noise_head=opts.noise_head,
        noise_max=noise_max,
        df=opts.df,
        feature_names=FEATURE_NAMES,
    )


def functional_prior(opts: WarmstartOptions, data: RecipeData) -> FunctionalPrior | None:
    """The recipe's functional prior beyond the training rows' robust edges (None when off)."""
    if opts.fprior_weight <= 0:
        return None
    scale = opts.fprior_scale if opts.fprior_scale is not None else 2.0 * float(data.y_train.std())
    return FunctionalPrior.from_data(
        data.x_train,
        weight=opts.fprior_weight,
        scale=scale,
        features=opts.fprior_features,
        margin=opts.fprior_margin,
        gap=opts.fprior_gap,
    )


def train(
    state: PosteriorState,
    data: RecipeData,
    opts: WarmstartOptions,
    on_epoch: Callable[[int, dict[str, float]], None] | None = None,
) -> tuple[PosteriorState, list[dict[str, float]]]:
    """Minibatch SVI over ``opts.epochs`` epochs; returns the state and the history.

    :func:`fogline.models.training.train_epochs` (one shuffled pass per epoch,
    data_size = N_train, frozen prior) with the recipe's functional prior,
    particles and factor step scale, the shuffle seeded with ``opts.seed``.
    The history holds the mean training loss and the held-out negative log
    predictive density -mean_i log p(y_i | x_i, D) (20-sample ensemble).
    """
    return train_epochs(
        state,
        data.x_train,
        data.y_train,
        data.x_held,
        data.y_held,
        epochs=opts.epochs,
        batch=opts.batch,
        seed=opts.seed,
        functional_prior=functional_prior(opts, data),
        particles=opts.particles,
        cov_factor_lr_scale=opts.cov_factor_lr_scale,
        on_epoch=on_epoch,
    )


def grid(num: int = GRID_POINTS, limit: float = GRID_LIMIT) -> tuple[torch.Tensor, torch.Tensor]:
    """(x0 [G], x [G, 8]): x0 evenly from -limit to limit, the other features 0."""
    x0 = torch.linspace(-limit, limit, num)
    x = torch.zeros(num, len(FEATURE_NAMES))
    x[:, 0] = x0
    return x0, x


def evaluate(ens: Ensemble, data: RecipeData, seed: int = 0) -> dict[str, float]:
    """The recipe's quality metrics (see the module docstring) for a cached ensemble."""
    x0_in = data.x_held[:, 0]
    p_in = predict(ens, data.x_held, levels=(0.95,))
    lo_in, hi_in = p_in.intervals[0.95]
    sigma_in = true_noise_std(x0_in)
    g0, gx = grid()
    p_g = predict(ens, gx, levels=(0.95,))
    lo_g, hi_g = p_g.intervals[0.95]
    out = g0.abs() >= OUT_LIMIT
    gen = torch.Generator().manual_seed(10_000 + seed)
    draws = true_mean(g0[out]) + true_noise_std(g0[out]) * torch.randn(
        OUT_DRAWS, int(out.sum()), generator=gen
    )
    inside_out = (draws >= lo_g[out]) & (draws <= hi_g[out])
    width_in = float((hi_in - lo_in).mean())
    width_out = float((hi_g - lo_g)[out].mean())
    ep_in = float(p_in.epistemic_std.mean())
    ep_out = float(p_g.epistemic_std[out].mean())
    return {
        "coverage_95_in": float(((data.y_held >= lo_in) & (data.y_held <= hi_in)).float().mean()),
        "width_in": width_in,
        "true_width_in": float((2 * Z95 * sigma_in).mean()),
        "width_out": width_out,
        "true_width_out": float((2 * Z95 * true_noise_std(g0[out])).mean()),
        "width_out_over_in": width_out / width_in,
        "coverage_95_out": float(inside_out.float().mean()),
        "epistemic_in": ep_in,
        "epistemic_out": ep_out,
        "epistemic_out_over_in": ep_out / max(ep_in, 1e-12),
        "aleatoric_out": float(p_g.aleatoric_std[out].mean()),
        "epistemic_var_share_out": float(
            (p_g.epistemic_std.pow(2) / p_g.total_std.pow(2))[out].mean()
        ),
        "aleatoric_rel_err_in": float(((p_in.aleatoric_std - sigma_in).abs() / sigma_in).mean()),
        "rmse_in": float((p_in.mean - true_mean(x0_in)).pow(2).mean().sqrt()),
        "entropy_out": float(predictive_entropy(ens, gx[out], seed=seed)),
    }


def predictive_entropy(ens: Ensemble, x_nd: torch.Tensor, seed: int = 0, draws: int = 50) -> float:
    """Mean differential entropy (nats) of the predictive mixture at rows ``x_nd``.

    Monte Carlo: H(x) = -E_{y ~ p(y|x,D)} log p(y | x, D), with y drawn by
    picking a sample s uniformly and then y ~ p(y | f_{w_s}(x)).
    """
    from fogline.models.likelihoods import observation_dist
    from fogline.models.network import forward_layers

    gen = torch.Generator().manual_seed(20_000 + seed)
    with torch.no_grad():
        out = forward_layers(list(ens.layers), x_nd, ens.config.activation)  # [S, N, O]
        s, n = out.shape[0], out.shape[1]
        pick = torch.randint(s, (draws, n), generator=gen)
        chosen = out[pick, torch.arange(n).expand(draws, n)]  # [draws, N, O]
        df = torch.tensor(ens.df) if ens.df is not None else None
        comp = observation_dist(chosen, ens.config, df)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(torch.randint(2**31 - 1, (1,), generator=gen)))
            y = comp.sample()  # [draws, N]
        x_rep = x_nd.expand(draws, *x_nd.shape).reshape(-1, x_nd.shape[1])
        lpd = log_predictive_density(ens, x_rep, y.reshape(-1))
    return float(-lpd.mean())


def plot(ens: Ensemble, data: RecipeData, path: str | Path, title: str = "") -> None:
    """PNG of the 95 % band, the mean, the data and the true 95 % noise band over x0."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    g0, gx = grid()
    p = predict(ens, gx, levels=(0.95,))
    lo, hi = p.intervals[0.95]
    z = Z95 * true_noise_std(g0)
    fig, ax = plt.subplots(figsize=(9, 5))
    k = min(3000, data.x_train.shape[0])
    ax.scatter(
        data.x_train[:k, 0], data.y_train[:k], s=2, alpha=0.25, color="grey", label="training data"
    )
    ax.plot(g0, true_mean(g0), color="black", lw=1, label="truth sin(3 x0)")
    ax.fill_between(
        g0,
        true_mean(g0) - z,
        true_mean(g0) + z,
        color="black",
        alpha=0.08,
        label="true 95% noise band",
    )
    ax.fill_between(g0, lo, hi, color="tab:blue", alpha=0.3, label="95% credible band")
    ep = p.epistemic_std
    ax.fill_between(
        g0,
        p.mean - Z95 * ep,
        p.mean + Z95 * ep,
        color="tab:orange",
        alpha=0.35,
        label="epistemic part (±1.96 sd)",
    )
    ax.plot(g0, p.mean, color="tab:blue", lw=1.5, label="predictive mean")
    for v in (-IN_LIMIT, IN_LIMIT):
        ax.axvline(v, color="grey", ls=":", lw=1)
    ax.set_xlabel("x0 (standardised MedInc; other features 0)")
    ax.set_ylabel("y")
    ax.set_ylim(-14, 14)
    ax.set_title(title or "fogline warm start", fontsize=9)
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    fig.savefig(str(path), dpi=110)
    plt.close(fig)


def run(
    opts: WarmstartOptions,
    on_epoch: Callable[[int, dict[str, float]], None] | None = None,
) -> WarmstartResult:
    """Load, train, evaluate; write state, metrics and plot under ``opts.out`` when set."""
    table = log1p_columns(load(opts.data), opts.log1p_features)
    data = recipe_data(table, seed=opts.seed, held_out=opts.held_out)
    config = build_config(opts, data.y_train)
    if opts.from_net:
        state = _from_net(opts, config, float(data.y_train.std()))
    else:
        state = init_state(config, seed=opts.seed, lr=opts.lr)
    t0 = time.perf_counter()
    state, history = train(state, data, opts, on_epoch)
    seconds = time.perf_counter() - t0
    ens = sample_ensemble(state, opts.samples, seed=opts.seed + 1)
    metrics = evaluate(ens, data, seed=opts.seed)
    ood = epistemic_ratios(ens, data.x_train, data.x_held, FEATURE_NAMES)
    metrics.update(
        epochs=float(opts.epochs),
        seconds=seconds,
        rows_train=float(data.x_train.shape[0]),
        epistemic_ratio_min=ood.epistemic_ratio_min,
    )
    finite = {k: (v if math.isfinite(v) else None) for k, v in metrics.items()}
    extra = {
        **state.extra,
        "warmstart": {"options": _jsonable(opts), "metrics": finite, "ood": ood.to_json()},
    }
    fprior = functional_prior(opts, data)
    if fprior is not None:  # streaming updates keep applying it (models.stream)
        extra[FPRIOR_KEY] = fprior.to_dict()
    if "cov_factor" in state.params and opts.cov_factor_lr_scale != 1.0:
        extra[LR_SCALE_KEY] = opts.cov_factor_lr_scale
    state = state.replace(extra=extra)
    files: dict[str, str] = {}
    if opts.out:
        out = Path(opts.out)
        out.mkdir(parents=True, exist_ok=True)
        files["state"] = str(out / "state.safetensors")
        save(state, files["state"])
        files["plot"] = str(out / "bands.png")
        plot(ens, data, files["plot"], title=_title(opts, metrics))
        files["metrics"] = str(out / "metrics.json")
        Path(files["metrics"]).write_text(
            json.dumps(
                {
                    "metrics": metrics,
                    "ood": ood.to_json(),
                    "history": history,
                    "options": _jsonable(opts),
                },
                indent=1,
            )
        )
    return WarmstartResult(state, metrics, history, files, ood)


def log1p_columns(table: Table, names: tuple[str, ...]) -> Table:
    """The table with the raw columns ``names`` replaced by log(1 + x) (all must exceed -1)."""
    if not names:
        return table
    unknown = [n for n in names if n not in FEATURE_NAMES]
    if unknown:
        raise ValueError(f"log1p_features: unknown columns {unknown}; known {list(FEATURE_NAMES)}")
    x = table.x.clone()
    for name in names:
        j = FEATURE_NAMES.index(name)
        bad = (x[:, j] <= -1).nonzero()
        if bad.numel():
            row = int(bad[0])
            raise ValueError(f"log1p_features: column {name} row {row} is {float(x[row, j])} <= -1")
        x[:, j] = torch.log1p(x[:, j])
    return Table(x, table.target, table.source)


def _from_net(opts: WarmstartOptions, config: ModelConfig, y_std: float) -> PosteriorState:
    """Bayesianise the net in ``opts.from_net`` with the recipe's likelihood, guide and head."""
    from fogline.models.bayesianize import bayesianize

    assert opts.from_net is not None
    keep = ("likelihood", "guide", "rank", "init_scale", "noise_head", "noise_min", "noise_max")
    overrides: dict[str, object] = {k: getattr(config, k) for k in keep}
    overrides.update(df=config.df, feature_names=config.feature_names)
    return bayesianize(
        opts.from_net,
        prior_scale=opts.net_prior_scale,
        noise=0.5 * y_std,
        config_overrides=overrides,
        seed=opts.seed,
        lr=opts.lr,
    )


def _jsonable(opts: WarmstartOptions) -> dict[str, Any]:
    d = asdict(opts)
    d["hidden"] = list(opts.hidden)
    if opts.fprior_features is not None:
        d["fprior_features"] = list(opts.fprior_features)
    d["log1p_features"] = list(opts.log1p_features)
    return d


def _title(opts: WarmstartOptions, m: dict[str, float]) -> str:
    return (
        f"{opts.likelihood}/{opts.guide}/{opts.prior}, {opts.epochs} epochs: "
        f"cover in {m['coverage_95_in']:.3f}, out {m['coverage_95_out']:.3f}; "
        f"width out/in {m['width_out_over_in']:.1f}; epistemic out/in {m['epistemic_out_over_in']:.1f}"
    )


def summary_lines(m: dict[str, float]) -> list[str]:
    """Human-readable lines of the metrics, with the recipe's targets."""
    checks = quality_checks(m)
    rows = [
        ("coverage_95_in", f"{m['coverage_95_in']:.3f}", "in [0.92, 0.98]"),
        ("width_in / true", f"{m['width_in']:.3f} / {m['true_width_in']:.3f}", "<= 1.25 x true"),
        ("width_out / true", f"{m['width_out']:.3f} / {m['true_width_out']:.3f}", "<= 5 x true"),
        ("width_out_over_in", f"{m['width_out_over_in']:.2f}", ">= 3"),
        ("coverage_95_out", f"{m['coverage_95_out']:.3f}", ">= 0.90"),
        ("epistemic_out_over_in", f"{m['epistemic_out_over_in']:.2f}", ">= 3"),
        ("aleatoric_rel_err_in", f"{m['aleatoric_rel_err_in']:.3f}", "<= 0.25"),
        ("rmse_in", f"{m['rmse_in']:.3f}", ""),
    ]
    if "epistemic_ratio_min" in m:
        rows.append(
            ("epistemic_ratio_min", f"{m['epistemic_ratio_min']:.2f}", ">= 5 (4-IQR probes)")
        )
    lines = [f"  {k:<22} {v:<18} {t}" for k, v, t in rows]
    lines.append(
        "  quality bar: "
        + (
            "met"
            if all(checks.values())
            else "NOT met: " + ", ".join(k for k, ok in checks.items() if not ok)
        )
    )
    return lines


def quality_checks(m: dict[str, float]) -> dict[str, bool]:
    """The recipe's quality bar (issue 2), one boolean per criterion."""
    return {
        "coverage_95_in": 0.92 <= m["coverage_95_in"] <= 0.98,
        "width_in": m["width_in"] <= 1.25 * m["true_width_in"],
        "width_out_over_in": m["width_out_over_in"] >= 3.0,
        "coverage_95_out": m["coverage_95_out"] >= 0.90,
        "width_out": m["width_out"] <= 5.0 * m["true_width_out"],
        "epistemic_out_over_in": m["epistemic_out_over_in"] >= 3.0,
        "aleatoric_rel_err_in": m["aleatoric_rel_err_in"] <= 0.25,
    }


__all__ = [
    "WarmstartOptions",
    "WarmstartResult",
    "build_config",
    "evaluate",
    "functional_prior",
    "grid",
    "log1p_columns",
    "plot",
    "predictive_entropy",
    "quality_checks",
    "run",
    "summary_lines",
    "train",
]
