"""Generic warm start: fit the BNN a :class:`ModelSpec` describes on the user's history.

Steps of :func:`fit` (``fogline warmstart --config CFG --data PATH``)
---------------------------------------------------------------------
1. **Split.** With timestamps the rows are ordered by time (stable) and the
   last ``held_out`` fraction (20 %) is the holdout, so the holdout is the
   future of the training part; without, a seeded random ``held_out`` slice.
2. **Schema.** :meth:`DataSchema.fit_spec` on the *training* rows only
   (each column's transform: standardise / log1p / none, with mean and sd of
   the training part); the holdout is mapped with the same fitted columns.
3. **Config.** ``spec.to_config(noise_max=...)`` with noise_max = the spec's,
   else 3 sd(y_train) in model units (the bounded noise head never exceeds
   three times the marginal spread of the training target).
4. **Functional prior** (when ``spec.functional_prior`` is active):
   :meth:`FunctionalPrior.from_data` on model-unit x_train, the features of
   ``spec.fprior_feature_indices()``, weight gamma, sigma_0 = the spec's scale
   else 2 sd(y_train) (model units), margin.
5. **Training.** :func:`fogline.models.training.train_epochs`, the recipe's
   minibatch SVI loop (Adam at ``lr``, batch ``batch``, data size N_train).
6. **Report.** :func:`fogline.models.report.holdout_report` on the holdout with
   ``samples`` posterior draws (seed + 1).

Autoregressive specs (``mode = "autoregressive"``): the table holds the raw
series (``x`` [N, 0], see :func:`fogline.models.tabular.series_view`); step 0
builds each record's inputs from its key's last L values (+ calendar) in file
order (:func:`fogline.models.autoregressive.features_for`; a key's first L
records only fill its buffer), and the series state at the end of the whole
history (training and holdout) is stored in ``state.extra["autoregressive"]``,
so the stream continues from it.

Epochs
------
``FitOptions.epochs = None`` (the default) picks

    epochs = clamp(ceil(max_steps / ceil(N_train / batch)), min_epochs, max_epochs)

i.e. about ``max_steps`` (20,000) optimiser steps whatever the data size,
never fewer than 20 passes over the data nor more than 800 (the recipe's
count).  At 1 torch thread a step of the default (32, 32) net on a 256-row
batch costs about a millisecond or two, so the default fit takes minutes, not hours.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from fogline.models import autoregressive as ar
from fogline.models.fprior import EXTRA_KEY as FPRIOR_KEY
from fogline.models.fprior import LR_SCALE_KEY, FunctionalPrior
from fogline.models.predictive import Ensemble, sample_ensemble
from fogline.models.report import holdout_report, ood_section
from fogline.models.schema import DataSchema
from fogline.models.spec import ModelSpec
from fogline.models.state import PosteriorState
from fogline.models.svi import init_state
from fogline.models.tabular import Table
from fogline.models.training import train_epochs

#: Where a generic warm start records its spec, options and report in ``state.extra``.
EXTRA_KEY = "warmstart"
#: Fewest rows :func:`fit` accepts (at least a few in the holdout).
MIN_ROWS = 10


class FitError(ValueError):
    """The data cannot be fitted (too few rows, non-finite values in model units)."""


@dataclass(frozen=True)
class FitOptions:
    """How to train (the spec says *what* to train); see the module docstring for ``epochs``."""

    epochs: int | None = None
    max_steps: int = 20_000
    min_epochs: int = 20
    max_epochs: int = 800
    lr: float = 5e-3
    batch: int = 256
    seed: int = 0
    held_out: float = 0.2
    samples: int = 100
    particles: int = 1
    cov_factor_lr_scale: float = 0.05

    def __post_init__(self) -> None:
        if not 0.0 < self.held_out < 1.0:
            raise ValueError(f"held_out must lie in (0, 1), got {self.held_out}")
        if self.epochs is not None and self.epochs < 1:
            raise ValueError(f"epochs must be >= 1, got {self.epochs}")
        if self.batch < 1 or self.samples < 2 or self.max_steps < 1:
            raise ValueError("batch >= 1, samples >= 2 and max_steps >= 1 are required")


@dataclass
class FitResult:
    """The warm-started state and its report; the split in model units (float32)."""

    state: PosteriorState
    report: dict[str, Any]
    schema: DataSchema
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_held: torch.Tensor
    y_held: torch.Tensor
    #: Epoch ms of the holdout rows (chronological split), else ``None``.
    held_ts: torch.Tensor | None
    #: The raw-unit holdout target (the report's reference).
    y_held_raw: torch.Tensor
    ensemble: Ensemble
    history: list[dict[str, float]] = field(default_factory=list)


def held_out_count(n: int, held_out: float) -> int:
    """Rows in the holdout: ``max(1, round(held_out * n))``."""
    return max(1, round(held_out * n))


def epochs_for(n_rows: int, options: FitOptions) -> int:
    """The epoch count for ``n_rows`` rows in all (see the module docstring)."""
    if options.epochs is not None:
        return options.epochs
    n_train = max(1, n_rows - held_out_count(n_rows, options.held_out))
    steps_per_epoch = math.ceil(n_train / options.batch)
    epochs = math.ceil(options.max_steps / steps_per_epoch)
    return max(options.min_epochs, min(options.max_epochs, epochs))


def split(table: Table, options: FitOptions) -> tuple[torch.Tensor, torch.Tensor, str]:
    """(train row indices, holdout row indices, ``"chronological"`` | ``"random"``)."""
    n = table.rows
    n_held = held_out_count(n, options.held_out)
    if table.ts is not None:
        order = torch.sort(table.ts, stable=True).indices
        return order[: n - n_held], order[n - n_held :], "chronological"
    gen = torch.Generator().manual_seed(options.seed)
    perm = torch.randperm(n, generator=gen)
    return perm[n_held:], perm[:n_held], "random"


def _to_model(
    schema: DataSchema, x_raw: torch.Tensor, y_raw: torch.Tensor, part: str
) -> tuple[torch.Tensor, torch.Tensor]:
    x = schema.x_to_model(x_raw).float()
    y = schema.y_to_model(y_raw).float()
    for name, t in (("features", x), ("target", y)):
        bad = ~torch.isfinite(t)
        if bool(bad.any()):
            row = int(torch.nonzero(bad.reshape(t.shape[0], -1).any(1))[0])
            raise FitError(f"{part} row {row}: {name} not finite in model units")
    return x, y


def fit(
    spec: ModelSpec,
    table: Table,
    options: FitOptions | None = None,
    on_epoch: Callable[[int, dict[str, float]], None] | None = None,
) -> FitResult:
    """Warm-start the model of ``spec`` on ``table`` (raw units); see the module docstring.

    Raises :class:`FitError` for too few rows or non-finite model-unit values,
    :class:`~fogline.models.schema.SchemaError` where a transform cannot take a value.
    """
    opts = options or FitOptions()
    series: ar.SeriesState | None = None
    if spec.mode == "autoregressive" and table.x.shape[1] == 0:
        spec = season_of(spec, table)
        table, series = series_table(spec, table)
    if table.x.shape[1] != len(spec.features):
        raise FitError(f"the table has {table.x.shape[1]} features, the spec {len(spec.features)}")
    if table.rows < MIN_ROWS:
        raise FitError(f"{table.source}: {table.rows} rows; a warm start needs at least {MIN_ROWS}")
    train_idx, held_idx, how = split(table, opts)
    schema = DataSchema.fit_spec(table.x[train_idx], table.y[train_idx], spec)
    x_train, y_train = _to_model(schema, table.x[train_idx], table.y[train_idx], "training")
    x_held, y_held = _to_model(schema, table.x[held_idx], table.y[held_idx], "holdout")
    y_sd = float(y_train.std()) if y_train.numel() > 1 else 1.0
    y_sd = y_sd if y_sd > 1e-12 else 1.0
    noise_max = spec.noise_max if spec.noise_max is not None else 3.0 * y_sd
    config = spec.to_config(noise_max=noise_max)
    fprior = functional_prior(spec, x_train, y_sd)
    state = init_state(config, seed=opts.seed, lr=opts.lr)
    epochs = epochs_for(table.rows, opts)
    t0 = time.perf_counter()
    state, history = train_epochs(
        state,
        x_train,
        y_train,
        x_held,
        y_held,
        epochs=epochs,
        batch=opts.batch,
        seed=opts.seed,
        functional_prior=fprior,
        particles=opts.particles,
        cov_factor_lr_scale=opts.cov_factor_lr_scale,
        on_epoch=on_epoch,
    )
    seconds = time.perf_counter() - t0
    ens = sample_ensemble(state, opts.samples, seed=opts.seed + 1)
    y_held_raw = table.y[held_idx]
    report: dict[str, Any] = {
        "holdout": holdout_report(ens, schema, x_held, y_held, y_held_raw),
        "train": {"n": int(train_idx.numel()), "split": how},
        "fit": {
            "epochs": epochs,
            "steps": epochs * math.ceil(int(train_idx.numel()) / opts.batch),
            "seconds": seconds,
            "rejected_steps": int(sum(h["rejected"] for h in history)),
            "final_held_out_nlpd_model": history[-1]["held_out_nlpd"] if history else None,
        },
        "model": {
            "features": list(spec.features),
            "season": spec.season,  # autoregressive: the resolved period or "none"
            "target": spec.target,
            "likelihood": spec.likelihood,
            "transforms": schema.transforms(),
            "noise_max_model": noise_max,
            "functional_prior": (
                {
                    "weight": fprior.weight,
                    "scale_model": fprior.scale,
                    "features": [spec.features[j] for j in fprior.active_features],
                    "margin": fprior.margin,
                }
                if fprior is not None
                else None
            ),
        },
        "ood": ood_section(ens, schema, x_train, x_held),
    }
    extra = {
        **state.extra,
        EXTRA_KEY: {
            "spec": spec.model_dump(mode="json"),
            "options": asdict(opts),
            "report": {"holdout": report["holdout"], "fit": report["fit"]},
        },
    }
    if series is not None:  # the stream continues each key's lags from here
        extra[ar.EXTRA_KEY] = ar.series_extra(spec, series)
    if fprior is not None:  # streaming updates keep applying it (models.stream)
        extra[FPRIOR_KEY] = fprior.to_dict()
    if "cov_factor" in state.params and opts.cov_factor_lr_scale != 1.0:
        extra[LR_SCALE_KEY] = opts.cov_factor_lr_scale
    state = state.replace(extra=extra, schema=schema)
    held_ts = table.ts[held_idx] if table.ts is not None else None
    return FitResult(
        state, report, schema, x_train, y_train, x_held, y_held, held_ts, y_held_raw, ens, history
    )


def season_of(spec: ModelSpec, raw: Table) -> ModelSpec:
    """``spec`` with ``season = "auto"`` resolved on the raw series ``raw`` (``x`` [N, 0]).

    The period is detected on the longest key's values in row order (the
    first such key on a tie; no ``key`` in the spec: all rows), by
    :func:`fogline.models.autoregressive.resolve_season`; the resolved spec
    (a period or ``"none"``) is what the warm start stores.
    """
    if spec.mode != "autoregressive" or spec.season != "auto":
        return spec
    values = raw.y.double().numpy()
    if spec.key is not None and raw.keys is not None:
        keys = [k or "" for k in raw.keys]
        counts: dict[str, int] = {}
        for k in keys:
            counts[k] = counts.get(k, 0) + 1
        top = max(counts, key=lambda k: counts[k])  # dicts keep first-seen order
        values = values[[i for i, k in enumerate(keys) if k == top]]
    return ar.resolve_season(spec, values)


def series_table(spec: ModelSpec, raw: Table) -> tuple[Table, ar.SeriesState]:
    """An autoregressive spec's inputs from the raw series ``raw`` (``x`` [N, 0]), in row order.

    Returns the table of the records that have L past values (their inputs,
    value, time and key) and the series state after every row.
    """
    if raw.ts is None:
        raise FitError(f"{raw.source}: autoregressive mode needs a timestamp on every row")
    # no key in the spec: one series, whatever key fields the rows carry
    keys = raw.keys if raw.keys is not None and spec.key is not None else [None] * raw.rows
    records = [
        ar.Record(ar.ts_from_ms(int(t)), float(v), k or "")
        for t, v, k in zip(raw.ts.tolist(), raw.y.tolist(), keys, strict=True)
    ]
    feats = ar.features_for(spec, records, ar.SeriesState.empty(spec))
    rows = feats.rows.tolist()
    if not rows:
        raise FitError(
            f"{raw.source}: no key has more than lags={spec.lags} values; nothing to fit"
        )
    table = Table(
        torch.from_numpy(feats.x),
        torch.from_numpy(feats.y),
        raw.ts[feats.rows],
        [keys[i] for i in rows] if spec.key is not None else None,
        raw.source,
    )
    return table, feats.state


def functional_prior(spec: ModelSpec, x_train: torch.Tensor, y_sd: float) -> FunctionalPrior | None:
    """The spec's functional prior on model-unit ``x_train`` (None when off).

    sigma_0 = ``spec.functional_prior.scale`` else 2 ``y_sd`` (model units).
    """
    fp = spec.functional_prior
    if not fp.active:
        return None
    scale = fp.scale if fp.scale is not None else 2.0 * y_sd
    return FunctionalPrior.from_data(
        x_train,
        weight=fp.weight,
        scale=scale,
        features=spec.fprior_feature_indices(),
        margin=fp.margin,
    )


__all__ = [
    "EXTRA_KEY",
    "MIN_ROWS",
    "FitError",
    "FitOptions",
    "FitResult",
    "epochs_for",
    "fit",
    "functional_prior",
    "held_out_count",
    "season_of",
    "series_table",
    "split",
]
