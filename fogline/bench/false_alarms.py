"""Run length to a false alarm on stable streams vs the ERT the threshold was fitted for.

For each seed: warm-start a (32, 32) BNN on regime-0 history, then stream a
*stable* scenario of ``--batches`` batches through :class:`fogline.drift.runner.DriftLoop`
with policy ``none`` (so the model is never reset) and a two-in-a-row
:class:`~fogline.drift.monitors.ThresholdMonitor` whose threshold is fitted by record
bootstrap on the first ``--calibration-batches`` batches (and refitted after
every re-anchoring) for the target ERT.  The window matters: the threshold's
sampling error grows as 1/sqrt(window), and because the run length is convex
in the threshold a short window biases the mean run length upwards (measured:
40-batch windows scatter 1,000..4,500 batches for a 1,000 target).  Every alarm on a stable stream is
false.  The measured ERT is the exponential MLE pooled over seeds,

    mean run length = (batches monitored) / (false alarms),

where "monitored" counts the batches in which the monitor was live (stable and
calibrated).  ``ratio`` = measured / target; the issue asks for 0.7..1.3.

``python -m fogline.bench.false_alarms --json`` or ``fogline bench false_alarms --json``.

With ``--nab DIR`` the same measurement runs on real telemetry instead: every file of
a NAB-layout corpus, the no-anomaly files and the stable parts of the others, at
one or more ERTs and batch sizes (``--ert 20,50 --batch-size 16,32``; see
:mod:`fogline.bench.false_alarms_nab`).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch


@dataclass
class SeedResult:
    """Outcome of one stable stream."""

    seed: int
    monitored_batches: int
    alarms: list[int]
    thresholds: list[float]


def run_seed(
    seed: int,
    batches: int,
    batch_size: int,
    ert: float,
    calibration_batches: int = 200,
    drift: dict[str, Any] | None = None,
) -> SeedResult:
    """One stable stream; returns monitored batches, alarms and the fitted thresholds.

    ``drift``: further :class:`~fogline.drift.config.PolicyConfig` settings of the loop
    (e.g. ``{"recalibration_screen": True}``).
    """
    from fogline.drift.experiment import ExperimentConfig, load_source, warm_start
    from fogline.drift.monitors import ThresholdMonitor
    from fogline.drift.policy import PolicyConfig
    from fogline.drift.runner import DriftLoop
    from fogline.models.priors import default_prior

    cfg = ExperimentConfig(
        seed=seed, n_batches=batches, batch_size=batch_size, policy=PolicyConfig(ert=ert)
    )
    data = load_source("stable", cfg)
    warm = warm_start(data, cfg)
    loop = DriftLoop(
        reference_state=warm,
        base_prior=default_prior(warm.config),
        base_lr=cfg.lr,
        data_size=len(data.warm_y),
        policy=PolicyConfig.model_validate(
            {**(drift or {}), "policy": "none", "calibration_batches": calibration_batches}
        ),
        monitor=ThresholdMonitor(consecutive=cfg.consecutive),
        ert=ert,
        ensemble_size=cfg.ensemble_size,
        seed=seed,
        n_streams=cfg.n_streams,
    )
    state = warm
    monitored = 0
    alarms: list[int] = []
    thresholds: list[float] = []
    b = batch_size
    for t in range(data.n_batches):
        live = loop.policy_state.mode == "stable" and loop.policy_state.calibrating == 0
        x = torch.from_numpy(np.ascontiguousarray(data.x[t * b : (t + 1) * b]))
        y = torch.from_numpy(np.ascontiguousarray(data.y[t * b : (t + 1) * b]))
        state, _, _, action = loop.process(state, x, y)
        monitored += int(live)
        if action.alarm:
            alarms.append(t)
        if loop.calibration is not None and (
            not thresholds or thresholds[-1] != loop.calibration.threshold
        ):
            thresholds.append(loop.calibration.threshold)
    return SeedResult(seed, monitored, alarms, [round(v, 4) for v in thresholds])


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point (``fogline bench false_alarms``)."""
    p = argparse.ArgumentParser(prog="false_alarms", description=__doc__)
    p.add_argument("--seeds", type=int, default=10)
    p.add_argument("--first-seed", type=int, default=0)
    p.add_argument("--batches", type=int, default=5000)
    p.add_argument(
        "--batch-size",
        type=_ints,
        default=None,
        help="records per batch (default 64; with --nab a comma list, default 16)",
    )
    p.add_argument(
        "--ert",
        type=_floats,
        default=None,
        help="target ERT in batches (default 1000; with --nab a comma list, default 20,50)",
    )
    p.add_argument("--nab", type=Path, default=None, help="NAB tree (data/, labels/): real files")
    p.add_argument(
        "--match", default=None, help="--nab: only files whose <category>/<name> has this"
    )
    p.add_argument("--policy", default="forget", help="--nab: the drift policy (default forget)")
    p.add_argument(
        "--after-windows",
        type=float,
        default=1.0,
        help="--nab: batches starting within this many window lengths after a window are "
        "not stable (default 1)",
    )
    p.add_argument("--seed", type=int, default=0, help="--nab: the warm start's seed")
    p.add_argument("--jobs", type=int, default=1, help="--nab: files run in parallel")
    p.add_argument(
        "--fixed-block",
        action="store_true",
        help="--nab: drift.calibration_block_auto = false (the fixed 2-batch block bootstrap, "
        "a baseline for the same run's figures)",
    )
    from fogline.bench.nab import add_screen_option

    add_screen_option(p)
    p.add_argument(
        "--calibration-batches",
        type=int,
        default=200,
        help="no-drift reference window (batches) the threshold is fitted on (default 200)",
    )
    p.add_argument("--json", action="store_true")
    args = p.parse_args(list(argv) if argv is not None else None)
    torch.set_num_threads(1)
    import structlog

    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(40))  # errors only
    if args.nab is not None:
        return _main_nab(args)
    if len(args.ert or [0]) > 1 or len(args.batch_size or [0]) > 1:
        p.error("--ert / --batch-size lists need --nab")
    args.ert = args.ert[0] if args.ert else 1000.0
    args.batch_size = args.batch_size[0] if args.batch_size else 64
    drift = _drift_settings(args)
    t0 = time.perf_counter()
    per_seed = []
    for s in range(args.first_seed, args.first_seed + args.seeds):
        r = run_seed(s, args.batches, args.batch_size, args.ert, args.calibration_batches, drift)
        per_seed.append(r)
        print(
            f"seed {s}: {len(r.alarms)} false alarms in {r.monitored_batches} monitored "
            f"batches, thresholds {r.thresholds}",
            flush=True,
        )
    monitored = sum(r.monitored_batches for r in per_seed)
    n_alarms = sum(len(r.alarms) for r in per_seed)
    mrl = monitored / n_alarms if n_alarms else math.inf
    # approximate 95% interval of the exponential MLE: log(mrl) +- 1.96 / sqrt(alarms)
    half = 1.96 / math.sqrt(n_alarms) if n_alarms else math.nan
    lo, hi = mrl * math.exp(-half), mrl * math.exp(half)
    ratio = mrl / args.ert
    result = {
        "benchmark": "false_alarms",
        "ert_target": args.ert,
        "mean_run_length": round(mrl, 1) if n_alarms else None,
        "ratio": round(ratio, 3) if n_alarms else None,
        "within_30pct": bool(0.7 <= ratio <= 1.3),
        "ci95_run_length": [round(lo, 1), round(hi, 1)] if n_alarms else None,
        "false_alarms": n_alarms,
        "monitored_batches": monitored,
        "seeds": args.seeds,
        "batches_per_seed": args.batches,
        "batch_size": args.batch_size,
        "calibration_batches": args.calibration_batches,
        "alarms_per_seed": [len(r.alarms) for r in per_seed],
        "drift": drift or {},
        "wall_s": round(time.perf_counter() - t0, 1),
    }
    print(
        f"mean run length to a false alarm {mrl:.0f} batches vs target {args.ert:.0f} "
        f"(ratio {ratio:.2f}, 95% CI {lo:.0f}..{hi:.0f}; {n_alarms} alarms in {monitored} batches)"
    )
    if args.json:
        print(json.dumps(result))
    return 0


def _floats(text: str) -> list[float]:
    try:
        out = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: numbers separated by commas") from None
    if not out or any(not v > 1 for v in out):
        raise argparse.ArgumentTypeError(f"{text!r}: every ERT must be > 1")
    return out


def _ints(text: str) -> list[int]:
    try:
        out = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: integers separated by commas") from None
    if not out or any(v < 1 for v in out):
        raise argparse.ArgumentTypeError(f"{text!r}: every batch size must be >= 1")
    return out


def _drift_settings(args: argparse.Namespace) -> dict[str, Any] | None:
    """The ``--nab`` run's drift settings from ``--fixed-block`` and ``--screen``."""
    drift: dict[str, Any] = {}
    if args.fixed_block:
        drift["calibration_block_auto"] = False
    if args.screen is not None:
        drift["recalibration_screen"] = args.screen
    return drift or None


def _main_nab(args: argparse.Namespace) -> int:
    from fogline.bench import false_alarms_nab

    result = false_alarms_nab.run(
        args.nab,
        erts=args.ert or [20.0, 50.0],
        batch_sizes=args.batch_size or [16],
        policy=args.policy,
        match=args.match,
        after=args.after_windows,
        seed=args.seed,
        jobs=args.jobs,
        drift=_drift_settings(args),
    )
    print(false_alarms_nab.report(result), flush=True)
    if args.json:
        print(json.dumps(result))
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
