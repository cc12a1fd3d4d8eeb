"""Offline drift experiments: the daemon's step/monitor/policy code on a replayed stream.

``fogline experiment SOURCE --policies none,reset,forget,vb --json`` where
SOURCE is a scenario of :mod:`fogline.replay_data.generator`, a fogline JSONL file or
a NAB ``timestamp,value`` CSV.  For each policy, starting from the same
warm-start posterior, every batch goes through :class:`fogline.drift.runner.DriftLoop`
(the code the daemon runs); before each update the batch is also scored by the
*current* posterior (prequential evaluation) for the metrics:

``mean_nll``
    mean over batches of the prequential NLL per record, -log p_t(y | x)
    (mixture density of the posterior before absorbing the batch).
``coverage_95``
    share of records inside the current posterior's central 95% interval
    (moment-matched Gaussian of the predictive mixture).
``false_alarms``
    alarms that are not the first alarm within ``detect_window`` batches after
    a true change point.
``detection_delays``
    per true change point: first alarm batch - change batch (``null`` if none
    within ``detect_window``).
``recovery_batches``
    per true change point: batches until the rolling prequential NLL (window
    10, within the new segment) first comes within 10% of the regime's settled
    NLL, ``settled + 0.1 |settled|``; the settled NLL of a segment is the
    lowest, over the policies run, of the mean NLL over the segment's last
    quarter (one target for all policies).  A policy that never gets there is
    reported with the segment's length and listed in ``recovery_censored``.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Literal

import numpy as np
import structlog
import torch
from pydantic import BaseModel, ConfigDict, Field

from fogline.drift.anomaly import (
    LikelihoodConfig,
    anomaly_likelihood,
    effective_noise_floor,
    log_tail_probability,
    mean_normal_score_log_tail,
    normal_scores,
)
from fogline.drift.config import POLICIES, PolicyConfig
from fogline.drift.runner import DriftLoop
from fogline.drift.signals import _moments_and_scores
from fogline.models.autoregressive import (
    Record,
    SeriesState,
    detect_period,
    features_for,
    parse_ts,
    seasonal_lags,
)
from fogline.models.config import ModelConfig
from fogline.models.fit import season_of, series_table
from fogline.models.predictive import Ensemble, sample_ensemble
from fogline.models.priors import default_prior
from fogline.models.restarts import RESTART_STRIDE, best_of, elbo, held_out_lpd
from fogline.models.schema import DataSchema
from fogline.models.spec import ModelSpec
from fogline.models.state import PosteriorState
from fogline.models.svi import fit, init_state
from fogline.models.tabular import load_table
from fogline.replay_data.generator import SCENARIOS, generate, read_jsonl

log = structlog.get_logger()

Z95 = 1.959963984540054


class ExperimentConfig(BaseModel):
    """Settings of one experiment (defaults: the figures in docs/drift.md).

    The stream and warm start are the experiment's own; the drift loop runs
    with ``policy``, the daemon's :class:`~fogline.drift.config.PolicyConfig`
    (its ``policy`` field is replaced by each policy run).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    seed: int = 0
    n_batches: int = 300
    batch_size: int = 64
    hidden: tuple[int, ...] = (32, 32)
    lr: float = 5e-3
    warm_records: int = 20_000
    warm_epochs: int = 25
    warm_batch: int = 256
    warm_steps: int = 2000
    #: Warm-start restarts, the best by ``warm_select`` kept (:mod:`fogline.models.restarts`).
    #: 1 (one fit at ``seed``) by default: on NAB neither choice of restart raised the
    #: score or steadied it across seeds (docs/drift.md).
    warm_restarts: int = Field(default=1, ge=1)
    #: With restarts: the warm-up's last fraction held out to choose between them,
    #: and the chosen fit's final pass over all rows (fraction of the single fit's epochs).
    warm_held_out: float = Field(default=0.2, gt=0, lt=1)
    #: How restarts are compared: the ELBO on all warm-up rows (each restart fitted
    #: on all of them) or the held-out log predictive density (``warm_held_out``).
    warm_select: Literal["elbo", "held_out"] = "held_out"
    warm_finish: float = Field(default=0.25, gt=0)
    #: End of the warm start (:func:`fogline.models.svi.fit`): the fraction of its epochs
    #: over which the step size decays (half cosine) and the fraction whose iterates
    #: are averaged (SWA).  0: the last iterate at the constant step size.
    warm_anneal: float = Field(default=0.0, ge=0, lt=1)
    warm_average: float = Field(default=0.0, ge=0, lt=1)
    #: Members of the anomaly score's reference ensemble: R independent warm starts
    #: (seeds ``seed + r * RESTART_STRIDE``, member 0 the single fit), each run through
    #: its own drift loop; the score's predictive is the equal-weight mixture of
    #: their references (:func:`run_policy`).  1: the single posterior.
    score_members: int = Field(default=1, ge=1)
    #: How the members' references score a record: the tail probability under their
    #: predictive mixture, or the members' mean normal score
    #: (:func:`~fogline.drift.anomaly.mean_normal_score_log_tail`).
    score_combine: Literal["mixture", "normal_mean"] = "mixture"
    detect_window: int = 50
    rolling: int = 10
    policy: PolicyConfig = PolicyConfig()
    anomaly: LikelihoodConfig = LikelihoodConfig()
    #: Univariate telemetry (NAB files): the key's last ``lags`` values, and with
    #: ``calendar`` hour of day / day of week as sin/cos.  Off by default here: NAB's
    #: warm-ups are about 2 days, too short to learn a daily shape (docs/drift.md).
    lags: int = Field(default=8, ge=1)
    calendar: bool = False
    #: Add the values one period ago (lags P - 1, P, P + 1) and the seasonal naive
    #: forecast when the warm-up's autocorrelation shows a period P
    #: (:func:`fogline.models.autoregressive.detect_period`).
    seasonal: bool = True

    @property
    def ert(self) -> float:
        """``policy.ert``."""
        return self.policy.ert

    @property
    def consecutive(self) -> int:
        """``policy.consecutive``."""
        return self.policy.consecutive

    @property
    def ensemble_size(self) -> int:
        """``policy.ensemble_size``."""
        return self.policy.ensemble_size

    @property
    def n_streams(self) -> int:
        """``policy.n_streams``."""
        return self.policy.n_streams


@dataclass
class StreamData:
    """A stream to run: arrays plus what is known about it."""

    name: str
    x: np.ndarray
    y: np.ndarray
    batch_size: int
    change_batches: tuple[int, ...]
    warm_x: np.ndarray
    warm_y: np.ndarray
    timestamps: list[str] | None = None
    raw_values: np.ndarray | None = None
    labels: np.ndarray | None = None
    lag: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def split(
        cls, name: str, x: np.ndarray, y: np.ndarray, n_warm: int, batch_size: int, **known: Any
    ) -> StreamData:
        """Rows ``[:n_warm]`` as the warm-start history, the rest as the stream (no change points)."""
        return cls(name, x[n_warm:], y[n_warm:], batch_size, (), x[:n_warm], y[:n_warm], **known)

    @property
    def n_batches(self) -> int:
        """Batches of the stream, the last one partial when the records do not divide."""
        return int(-(-self.y.shape[0] // self.batch_size))


# ----------------------------------------------------------------------------- sources
def load_spec_source(path: Path, spec: ModelSpec, cfg: ExperimentConfig) -> StreamData:
    """A user's CSV / JSONL / Parquet file read by the model spec's columns, in model units.

    Rows are ordered by the spec's timestamp field when there is one; the first
    fifth (at least one batch) is the warm-start history, the transforms of
    the spec are fitted on it (:meth:`~fogline.models.schema.DataSchema.fit_spec`)
    and applied to the whole file, as the warm start and the daemon do.

    An autoregressive spec (``{timestamp, target, key}`` rows, e.g. a NAB
    ``timestamp,value`` file) gets its inputs from the spec's lags, calendar
    and key, in file order, by the warm start's own
    :func:`~fogline.models.fit.series_table` (each key's first L rows only
    fill its buffer).
    """
    table, _ = load_table(path, spec)
    if spec.mode == "autoregressive":
        # "auto": the period of the warm-start fifth of the file, as the warm start would
        head = max(cfg.batch_size, table.rows // 5)
        ts = table.ts[:head] if table.ts is not None else None
        keys = table.keys[:head] if table.keys is not None else None
        head_table = dataclasses.replace(
            table, x=table.x[:head], y=table.y[:head], ts=ts, keys=keys
        )
        spec = season_of(spec, head_table)
        table, _series = series_table(spec, table)
    order = (
        torch.argsort(table.ts, stable=True) if table.ts is not None else torch.arange(table.rows)
    )
    n_warm = max(cfg.batch_size, table.rows // 5)
    if table.rows <= n_warm:
        raise ValueError(
            f"{path}: {table.rows} rows, need more than {n_warm} (a warm start + stream)"
        )
    x_raw, y_raw = table.x[order], table.y[order]
    schema = DataSchema.fit_spec(x_raw[:n_warm], y_raw[:n_warm], spec)
    x = schema.x_to_model(x_raw).float().numpy()
    y = schema.y_to_model(y_raw).float().numpy()
    return StreamData.split(path.stem, x, y, n_warm, cfg.batch_size)


def load_source(source: str, cfg: ExperimentConfig, spec: ModelSpec | None = None) -> StreamData:
    """A scenario name, a fogline JSONL file or a NAB CSV, as :class:`StreamData`.

    With ``spec`` a file is read by the spec's named columns (:func:`load_spec_source`).
    """
    if spec is not None and source not in SCENARIOS:
        return load_spec_source(Path(source), spec, cfg)
    if source in SCENARIOS:
        s = generate(source, cfg.seed, cfg.n_batches, cfg.batch_size)
        warm = generate(
            "stable", cfg.seed + 1000, max(cfg.warm_records // 256, 4), 256
        )  # regime-0 history
        extra = {k: v for k, v in s.meta().items() if k.endswith("_batches")}
        return StreamData(
            source,
            s.x,
            s.y,
            cfg.batch_size,
            s.change_batches,
            warm.x,
            warm.y,
            extra=extra,
        )
    path = Path(source)
    if path.suffix == ".jsonl":
        x, y = read_jsonl(path)
        n_warm = max(cfg.batch_size, len(y) // 5)
        return StreamData.split(path.stem, x, y, n_warm, cfg.batch_size)
    if path.suffix == ".csv":
        return load_nab(path, cfg)
    raise ValueError(f"{source!r} is neither a scenario ({sorted(SCENARIOS)}) nor a .jsonl/.csv")


def nab_windows_file(path: Path) -> Path | None:
    """NAB's ``combined_windows.json`` for a file at ``<root>/data/<category>/<name>.csv``.

    Looked for at ``<root>/`` and ``<root>/labels/`` (NAB's own layout), i.e.
    only beside the data the caller passed; ``None`` when there is none.
    """
    root = path.resolve().parents[2] if len(path.resolve().parents) > 2 else path.parent
    for candidate in (
        root / "combined_windows.json",
        root / "labels" / "combined_windows.json",
    ):
        if candidate.is_file():
            return candidate
    return None


def nab_labels(path: Path, timestamps: list[str], windows_file: Path | None = None) -> np.ndarray:
    """0/1 label per record from NAB's ``combined_windows.json`` (0 if not listed).

    ``windows_file`` defaults to :func:`nab_windows_file` of ``path``.
    """
    labels = np.zeros(len(timestamps), dtype=np.int64)
    windows_file = windows_file if windows_file is not None else nab_windows_file(path)
    key = f"{path.parent.name}/{path.name}"
    if windows_file is None or not windows_file.exists():
        return labels
    windows = json.loads(windows_file.read_text()).get(key, [])
    ts = [datetime.fromisoformat(t) for t in timestamps]
    for start, end in windows:
        a, b = datetime.fromisoformat(start), datetime.fromisoformat(end)
        for i, t in enumerate(ts):
            if a <= t <= b:
                labels[i] = 1
    return labels


def nab_probation(n: int) -> int:
    """NAB's probationary period of a file of ``n`` rows: min(floor(0.15 n), 750)."""
    return min(math.floor(0.15 * n), 750)


def nab_spec(cfg: ExperimentConfig, period: int | None) -> ModelSpec:
    """The autoregressive :class:`ModelSpec` whose inputs ``bench nab`` streams.

    One key, ``cfg.lags`` lags, ``cfg.calendar``, ``season`` the period found
    (else ``"none"``): :func:`~fogline.models.autoregressive.features_for` of
    this spec builds exactly the inputs the daemon builds for it.
    """
    return ModelSpec(
        mode="autoregressive",
        target="value",
        timestamp="timestamp",
        lags=cfg.lags,
        calendar=cfg.calendar,
        season=period if period is not None else "none",
    )


def load_nab(path: Path, cfg: ExperimentConfig) -> StreamData:
    """NAB ``timestamp,value`` CSV as univariate telemetry: x_t = (v_{t-1..t-L}, calendar), y_t = v_t.

    The inputs are :func:`fogline.models.autoregressive.features_for` (of
    :func:`nab_spec`: the daemon's builder) of the
    file as one key: the last ``cfg.lags`` values; with ``cfg.seasonal`` and a
    period P found in the probationary period
    (:func:`~fogline.models.autoregressive.detect_period`, P >= 2 ``lags``) also
    the values P - 1, P, P + 1 records ago and the seasonal naive forecast
    v_{t-P} + v_{t-1} - v_{t-1-P}; with ``cfg.calendar`` hour of day and day of
    week as sin/cos.

    The warm start is NAB's probationary period, min(floor(0.15 n), 750) rows
    (the first max(lags) rows have no features and are not scored); every
    record after it is streamed, the last partial batch included.  Values are
    standardised with the probationary period's mean and sd; a constant
    probationary period uses max(|mean|, 1) as its scale.
    """
    with path.open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    for i, r in enumerate(rows):
        if r.get("timestamp") is None or r.get("value") is None:
            raise ValueError(f"{path}: row {i + 2} has no timestamp/value column")
    ts = [r["timestamp"] for r in rows]
    try:
        v = np.asarray([float(r["value"]) for r in rows], dtype=np.float64)
    except ValueError as e:
        raise ValueError(f"{path}: column value: {e}") from None
    prob = max(nab_probation(len(v)), cfg.lags + 2)
    if len(v) <= prob:
        raise ValueError(f"{path}: {len(v)} rows, need more than the {prob}-row warm start")
    period = detect_period(v[:prob], min_lag=2 * cfg.lags) if cfg.seasonal else None
    lags = seasonal_lags(cfg.lags, period)
    lag = max(lags)
    mu, sd = float(v[:prob].mean()), float(v[:prob].std())
    scale = sd if sd > 0 else max(abs(mu), 1.0)
    z = (v - mu) / scale
    records = [Record(parse_ts(t), float(val)) for t, val in zip(ts, z, strict=True)]
    # the daemon's builder: the same inputs as a spec with this period (model.season)
    spec = nab_spec(cfg, period)
    feats = features_for(spec, records, SeriesState.empty(spec))
    x, y = feats.x.astype(np.float32), feats.y.astype(np.float32)
    n_warm = prob - lag
    labels = nab_labels(path, ts)
    return StreamData.split(
        path.stem,
        x,
        y,
        n_warm,
        cfg.batch_size,
        timestamps=ts,
        raw_values=v,
        labels=labels,
        lag=lag,
        extra={
            "warm_records": n_warm,
            "probationary": prob,
            "category": path.parent.name,
            "scale": scale,
            "period": period,
        },
    )


# ----------------------------------------------------------------------------- running
def warm_members(data: StreamData, cfg: ExperimentConfig) -> list[PosteriorState]:
    """The ``cfg.score_members`` warm starts of the score's reference ensemble.

    Member 0 is :func:`warm_start` of ``cfg``; member r >= 1 is the same warm
    start from seed ``cfg.seed + r * RESTART_STRIDE`` (its own initialisation
    and shuffling), so the members are independent draws of the fit.
    """
    out = [warm_start(data, cfg)]
    for r in range(1, cfg.score_members):
        member_cfg = cfg.model_copy(update={"seed": cfg.seed + r * RESTART_STRIDE})
        out.append(warm_start(data, member_cfg))
    return out


def warm_start(data: StreamData, cfg: ExperimentConfig) -> PosteriorState:
    """Fit the warm-start posterior on the regime-0 history (seeded).

    One restart (``cfg.warm_restarts``, the default): SVI on all n
    warm-up rows from the initialisation of ``cfg.seed``.  R > 1 restarts with
    ``cfg.warm_select = "held_out"`` (default):

    1. hold out the last ``cfg.warm_held_out`` fraction of the warm-up rows
       (their future, as the stream will be);
    2. fit R restarts on the first rows (the same step budget each) and keep
       the one with the highest held-out log predictive density
       (:func:`fogline.models.restarts.best_of`, :func:`~fogline.models.restarts.held_out_lpd`);
    3. continue it on all n rows for ``cfg.warm_finish`` times the single
       fit's epochs, so the held-out rows are learnt too.

    With ``"elbo"``: R fits on all rows, the highest ELBO on them kept
    (:func:`fogline.models.restarts.elbo`); on NAB that picked overconfident
    fits (docs/drift.md).
    """
    config = ModelConfig.model_validate(
        {"in_features": int(data.x.shape[1]), "hidden": tuple(cfg.hidden)}
    )
    x = torch.from_numpy(np.ascontiguousarray(data.warm_x))
    y = torch.from_numpy(np.ascontiguousarray(data.warm_y))
    n = len(data.warm_y)

    def epochs_for(rows: int) -> int:
        return max(cfg.warm_epochs, math.ceil(cfg.warm_steps * cfg.warm_batch / max(rows, 1)))

    def fit_on(seed: int, xs: torch.Tensor, ys: torch.Tensor) -> PosteriorState:
        state = init_state(config, seed=seed, lr=cfg.lr)
        epochs = epochs_for(len(ys))
        return fit(
            state,
            xs,
            ys,
            epochs=epochs,
            batch_size=cfg.warm_batch,
            seed=seed,
            anneal=cfg.warm_anneal,
            average=cfg.warm_average,
        ).state

    restarts = cfg.warm_restarts
    n_held = max(1, round(cfg.warm_held_out * n))
    if restarts == 1:
        return fit_on(cfg.seed, x, y).replace(extra={})
    if cfg.warm_select == "elbo" or n - n_held < 2:
        res = best_of(
            lambda seed: fit_on(seed, x, y),
            lambda state: elbo(state, x, y, seed=cfg.seed + 1),
            restarts,
            cfg.seed,
        )
        log.debug("warm_start_selected", best=res.best, elbo=res.scores)
        return res.state.replace(extra={})
    x_fit, y_fit, x_held, y_held = (
        x[: n - n_held],
        y[: n - n_held],
        x[n - n_held :],
        y[n - n_held :],
    )
    res = best_of(
        lambda seed: fit_on(seed, x_fit, y_fit),
        lambda state: held_out_lpd(state, x_held, y_held, seed=cfg.seed + 1),
        restarts,
        cfg.seed,
    )
    log.debug("warm_start_selected", best=res.best, held_out_lpd=res.scores)
    finish = max(1, math.ceil(cfg.warm_finish * epochs_for(n)))
    seed = cfg.seed + res.best * RESTART_STRIDE
    state = fit(res.state, x, y, epochs=finish, batch_size=cfg.warm_batch, seed=seed + 1).state
    return state.replace(extra={})


@dataclass
class PolicyRun:
    """Per-batch traces of one policy."""

    name: str
    nll: list[float] = field(default_factory=list)
    covered: list[float] = field(default_factory=list)
    signal: list[float] = field(default_factory=list)
    threshold: list[float] = field(default_factory=list)
    predictive_kl: list[float] = field(default_factory=list)
    step_kl: list[float] = field(default_factory=list)
    kl_threshold: list[float] = field(default_factory=list)
    modes: list[str] = field(default_factory=list)
    alarms: list[int] = field(default_factory=list)
    weights: list[float] = field(default_factory=list)
    anomaly: list[np.ndarray] = field(default_factory=list)
    log_tail: list[np.ndarray] = field(default_factory=list)
    warm_log_tail: np.ndarray | None = None
    live: list[bool] = field(default_factory=list)
    transitions: list[dict[str, Any]] = field(default_factory=list)
    calibration: dict[str, Any] | None = None


def _prequential(ens: Ensemble, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    mean, var, nll, _ = _moments_and_scores(ens, x, y)
    assert nll is not None
    covered = ((y - mean).abs() <= Z95 * var.sqrt()).float().mean()
    return float(nll.mean()), float(covered)


def run_policy(
    name: str,
    warm: PosteriorState,
    data: StreamData,
    cfg: ExperimentConfig,
    progress: Any = None,
    members: Sequence[PosteriorState] = (),
) -> PolicyRun:
    """Run one policy over the stream (deterministic for ``cfg.seed``).

    ``members`` (more warm starts, :func:`warm_members`) each run through a
    drift loop of their own (seed ``cfg.seed + r * RESTART_STRIDE``, r = 1, 2, ...)
    beside ``warm``'s; every record's tail probability is then under the
    equal-weight mixture of the R = 1 + len(members) loops' current references,

        F(y | x) = (1/R) sum_r (1/S) sum_s Phi((y - mu_rs(x)) / s_rs(x)),

    (:func:`~fogline.drift.anomaly.log_tail_probability`), while the drift
    alarms, modes and prequential metrics are ``warm``'s loop's.
    """
    torch.manual_seed(cfg.seed)
    pcfg = cfg.policy.with_policy(name)

    def loop_for(state: PosteriorState, seed: int) -> DriftLoop:
        return DriftLoop(
            reference_state=state,
            base_prior=default_prior(state.config),
            base_lr=cfg.lr,
            data_size=max(len(data.warm_y), 1),
            policy=pcfg,
            seed=seed,
        )

    loop = loop_for(warm, cfg.seed)
    others = [(loop_for(m, cfg.seed + (r + 1) * RESTART_STRIDE), m) for r, m in enumerate(members)]
    state = warm
    run = PolicyRun(name)
    ens = sample_ensemble(state, cfg.ensemble_size, cfg.seed)
    b = data.batch_size
    scored = data.labels is not None
    floor = effective_noise_floor(cfg.anomaly, data.warm_y)

    def references() -> list[Ensemble]:
        return [loop.reference.ensemble] + [o.reference.ensemble for o, _ in others]

    def log_tail(x: torch.Tensor, y: torch.Tensor) -> np.ndarray:
        refs = references()
        if cfg.score_combine == "mixture" or len(refs) == 1:
            return log_tail_probability(refs, x, y, floor)
        parts = [log_tail_probability(e, x, y, floor) for e in refs]
        return mean_normal_score_log_tail(parts, cfg.anomaly.cap)

    if scored:
        run.warm_log_tail = log_tail(torch.from_numpy(data.warm_x), torch.from_numpy(data.warm_y))
    for t in range(data.n_batches):
        x = torch.from_numpy(np.ascontiguousarray(data.x[t * b : (t + 1) * b]))
        y = torch.from_numpy(np.ascontiguousarray(data.y[t * b : (t + 1) * b]))
        nll, cov = _prequential(ens, x, y)
        run.live.append(loop.policy_state.mode == "stable" and loop.policy_state.calibrating == 0)
        if scored:  # under the reference posterior, before the batch (as the alarm signal)
            run.log_tail.append(log_tail(x, y))
        state, _info, sig, action = loop.process(state, x, y)
        others = [(o, o.process(s, x, y)[0]) for o, s in others]
        ens = loop.last_ensemble if loop.last_ensemble is not None else ens
        ps = loop.policy_state
        run.nll.append(nll)
        run.covered.append(cov)
        run.signal.append(sig[pcfg.signal])
        run.threshold.append(ps.threshold)
        run.predictive_kl.append(sig["predictive_kl"])
        run.step_kl.append(sig["step_kl"])
        run.kl_threshold.append(ps.kl_threshold)
        run.modes.append(
            "calibrating" if action.calibrating and action.mode == "stable" else action.mode
        )
        run.weights.append(action.likelihood_weight)
        if action.alarm:
            run.alarms.append(t)
        if progress is not None:
            progress()
    run.transitions = [
        {"batch": t.batch, "from": t.from_mode, "to": t.to_mode, "reason": t.reason}
        for t in loop.policy_state.transitions
    ]
    run.calibration = loop.policy_state.calibration
    return run


# ----------------------------------------------------------------------------- metrics
def _segments(change: Sequence[int], n: int) -> list[tuple[int, int]]:
    cps = [c for c in change if 0 < c < n]
    return [(c, cps[i + 1] if i + 1 < len(cps) else n) for i, c in enumerate(cps)]


def _rolling_in_segment(v: np.ndarray, start: int, end: int, w: int) -> np.ndarray:
    seg = v[start:end]
    c = np.cumsum(np.insert(seg, 0, 0.0))
    idx = np.arange(1, len(seg) + 1)
    lo = np.maximum(idx - w, 0)
    return np.asarray((c[idx] - c[lo]) / (idx - lo))


def metrics(
    runs: dict[str, PolicyRun], data: StreamData, cfg: ExperimentConfig
) -> dict[str, dict[str, Any]]:
    """The per-policy metrics of the module docstring."""
    n = data.n_batches
    segs = _segments(data.change_batches, n)
    settled = []
    for start, end in segs:
        q = start + max(1, (end - start) * 3 // 4)
        settled.append(min(float(np.mean(r.nll[q:end])) for r in runs.values()))
    out: dict[str, dict[str, Any]] = {}
    for name, r in runs.items():
        nll = np.asarray(r.nll)
        delays: list[int | None] = []
        used: set[int] = set()
        for cp in data.change_batches:
            hit = [a for a in r.alarms if cp <= a < cp + cfg.detect_window and a not in used]
            delays.append(hit[0] - cp if hit else None)
            if hit:
                used.add(hit[0])
        recovery, censored = [], []
        for (start, end), target in zip(segs, settled, strict=True):
            roll = _rolling_in_segment(nll, start, end, cfg.rolling)
            ok = np.nonzero(roll <= target + 0.1 * abs(target))[0]
            recovery.append(int(ok[0]) if ok.size else end - start)
            censored.append(not ok.size)
        res: dict[str, Any] = {
            "batches": n,
            "false_alarms": len([a for a in r.alarms if a not in used]),
            "alarms": list(r.alarms),
            "detection_delays": delays,
            "recovery_batches": recovery,
            "recovery_censored": censored,
            "settled_nll": [round(s, 4) for s in settled],
            "mean_nll": float(nll.mean()),
            "coverage_95": float(np.mean(r.covered)),
            "transitions": len(r.transitions),
            "live": [bool(v) for v in r.live],
        }
        for key in ("burst_batches",):
            if key in data.extra:
                end = data.extra[key][1]
                res["post_burst_nll"] = float(nll[end:].mean())
        out[name] = res
    return out


# ----------------------------------------------------------------------------- outputs
def plot_timeline(run: PolicyRun, data: StreamData, cfg: ExperimentConfig, path: Path) -> None:
    """PNG: rolling NLL; alarm signal with threshold; predictive/step KL; policy state."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = np.arange(len(run.nll))
    fig, ax = plt.subplots(4, 1, figsize=(11, 9), sharex=True)
    nll = np.asarray(run.nll)
    roll = np.convolve(nll, np.ones(cfg.rolling) / cfg.rolling, mode="full")[: len(nll)]
    ax[0].plot(t, nll, color="0.75", lw=0.8, label="NLL per batch")
    ax[0].plot(t, roll, color="C0", label=f"rolling NLL ({cfg.rolling})")
    ax[0].set_ylabel("prequential NLL")
    ax[0].set_yscale("symlog", linthresh=1.0)
    ax[1].plot(t, run.signal, color="C1", label="surprisal (inlier mean)")
    ax[1].plot(t, run.threshold, color="k", ls="--", lw=1, label="calibrated threshold")
    ax[1].set_yscale("symlog", linthresh=1.0)
    ax[1].set_ylabel("alarm signal")
    ax[2].plot(t, run.predictive_kl, color="C2", label="predictive KL vs reference")
    ax[2].plot(t, run.step_kl, color="C4", lw=0.8, label="step KL (per batch)")
    ax[2].plot(t, run.kl_threshold, color="k", ls=":", lw=1, label="recovery threshold")
    ax[2].set_yscale("log")
    ax[2].set_ylabel("KL (nats)")
    code = {"calibrating": 0, "stable": 1, "shifted": 3, "recovering": 2}
    ax[3].step(t, [code[m] for m in run.modes], where="post", color="C3")
    ax[3].set_yticks([0, 1, 2, 3], ["calibrating", "stable", "recovering", "shifted"])
    ax[3].set_xlabel("batch")
    for a in ax:
        for cp in data.change_batches:
            a.axvline(cp, color="r", alpha=0.5, lw=1)
        for al in run.alarms:
            a.axvline(al, color="m", ls="--", alpha=0.6, lw=1)
    for a in ax[:3]:
        a.legend(loc="upper left", fontsize=7)
    ax[0].set_title(
        f"{data.name} — policy {run.name} (red: true change, magenta: alarm)",
        fontsize=10,
    )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)


def nab_scores(
    run: PolicyRun, data: StreamData, cfg: ExperimentConfig
) -> tuple[np.ndarray, np.ndarray]:
    """(anomaly score [n], two-sided tail probability [n]) for every row of a NAB file.

    The tail probability is under the reference posterior before the record's
    batch (the warm start, re-anchored after a confirmed change; the warm-start
    rows in-sample); the
    score is :func:`fogline.drift.anomaly.anomaly_likelihood` of their normal
    scores, run over the warm-start rows and then the stream.  The first ``lag``
    rows (no features) get score 0 and tail probability 1.
    """
    n = len(data.y) + len(data.warm_y) + data.lag
    log_p = np.zeros(n)
    warm = run.warm_log_tail if run.warm_log_tail is not None else np.zeros(len(data.warm_y))
    stream = np.concatenate(run.log_tail) if run.log_tail else np.zeros(0)
    log_p[data.lag : data.lag + len(warm)] = warm
    log_p[data.lag + len(warm) : data.lag + len(warm) + len(stream)] = stream
    score = np.zeros(n)
    zeta = normal_scores(log_p[data.lag :], cfg.anomaly.cap)
    score[data.lag :] = anomaly_likelihood(zeta, cfg.anomaly)[0]
    return score, np.exp(log_p)


def write_nab(
    run: PolicyRun, data: StreamData, out_dir: Path, cfg: ExperimentConfig | None = None
) -> Path:
    """NAB results CSV for every record, in NAB's results layout
    ``out_dir/<detector>/<category>/<detector>_<file>.csv`` (detector: the policy).

    Columns ``timestamp,value,anomaly_score,tail_probability,label``, numbers at
    full float precision (:func:`nab_scores`).
    """
    assert data.timestamps is not None and data.raw_values is not None and data.labels is not None
    score, tail = nab_scores(run, data, cfg or ExperimentConfig())
    category = str(data.extra.get("category", "data"))
    path = out_dir / run.name / category / f"{run.name}_{data.name}.csv"
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["timestamp", "value", "anomaly_score", "tail_probability", "label"])
        for i, ts in enumerate(data.timestamps):
            w.writerow(
                [
                    ts,
                    repr(float(data.raw_values[i])),
                    repr(float(score[i])),
                    repr(float(tail[i])),
                    int(data.labels[i]),
                ]
            )
    return path


def run_experiment(
    source: str,
    policies: Sequence[str],
    cfg: ExperimentConfig,
    out_dir: Path | None = None,
    nab_out: Path | None = None,
    show_progress: bool = False,
    spec: ModelSpec | None = None,
) -> dict[str, Any]:
    """Warm-start once, run every policy, compute metrics, write plots/NAB files.

    ``spec`` (the settings' ``model`` section) reads a file by its named columns.
    """
    torch.set_num_threads(1)
    for p in policies:
        if p not in POLICIES:
            raise ValueError(f"unknown policy {p!r}; choose from {POLICIES}")
    data = load_source(source, cfg, spec)
    warm, *members = warm_members(data, cfg)
    runs: dict[str, PolicyRun] = {}
    if show_progress:
        from rich.progress import Progress

        with Progress(transient=True) as prog:
            task = prog.add_task(f"{data.name}", total=data.n_batches * len(policies))
            for p in policies:
                prog.update(task, description=f"{data.name}: {p}")
                runs[p] = run_policy(p, warm, data, cfg, lambda: prog.advance(task), members)
    else:
        for p in policies:
            runs[p] = run_policy(p, warm, data, cfg, members=members)
    result: dict[str, Any] = {
        "source": source,
        "stream": data.name,
        "seed": cfg.seed,
        "batches": data.n_batches,
        "batch_size": data.batch_size,
        "change_batches": list(data.change_batches),
        "ert": cfg.ert,
        "policies": metrics(runs, data, cfg),
        "calibration": next((r.calibration for r in runs.values() if r.calibration), None),
    }
    if out_dir is not None:
        for r in runs.values():
            plot_timeline(r, data, cfg, out_dir / f"{data.name}_{r.name}.png")
    if data.labels is not None:
        result["labels"] = [int(v) for v in data.labels]
        result["stream_start"] = data.lag + len(data.warm_y)
        result["lag"] = data.lag  # the first rows, without inputs, are not scored
    if nab_out is not None and data.labels is not None:
        result["nab_files"] = [str(write_nab(r, data, nab_out, cfg)) for r in runs.values()]
    return result


def main_from_args(args: argparse.Namespace) -> int:
    """Handler of ``fogline experiment``."""
    overrides: dict[str, Any] = {"seed": args.seed}
    if args.batches:
        overrides["n_batches"] = args.batches
    if args.batch_size:
        overrides["batch_size"] = args.batch_size
    if args.ert:
        overrides["policy"] = {"ert": args.ert}
    if getattr(args, "restarts", None):
        overrides["warm_restarts"] = args.restarts
    cfg = ExperimentConfig(**overrides)
    policies = [p.strip() for p in args.policies.split(",") if p.strip()]
    spec: ModelSpec | None = getattr(args, "spec", None)  # the CLI reads --config
    res = run_experiment(
        args.source,
        policies,
        cfg,
        out_dir=Path(args.out) if args.out else None,
        nab_out=Path(args.nab_out) if args.nab_out else None,
        show_progress=not args.no_progress,
        spec=spec,
    )
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{res['stream']} (seed {cfg.seed}, {res['batches']} batches)")
    for col in ("policy", "mean NLL", "cov95", "false alarms", "delays", "recovery"):
        table.add_column(col)
    for p, m in res["policies"].items():
        table.add_row(
            p,
            f"{m['mean_nll']:.4f}",
            f"{m['coverage_95']:.3f}",
            str(m["false_alarms"]),
            str(m["detection_delays"]),
            str(m["recovery_batches"]),
        )
    Console(stderr=args.json).print(table)
    if args.json:
        print(json.dumps(res))
    return 0
