"""Write two data sets of other shapes for the generic warm start (docs/model.md).

    python docs/shapes.py OUT_DIR [--rows 6000] [--seed 0]

writes, under OUT_DIR,

* ``latency.csv`` + ``latency.toml``: a heavy-tailed regression.  Features
  ``requests`` (log-normal, heavy-tailed), ``cpu`` (uniform 0..100), ``queue``
  (Poisson 5) and a timestamp ``time`` (ISO-8601, 1 min apart); target
  ``latency_ms`` with log(1 + latency) = 1 + 0.5 log(1 + requests)
  + 0.8 sin(cpu / 20) + 0.03 queue + N(0, 0.4^2), i.e. log-normal given x (sample
  kurtosis of the target about 25).  The spec takes ``log1p`` for ``requests`` and the target.
* ``failures.csv`` + ``failures.toml``: a binary target ``failed`` ~
  Bernoulli(sigmoid(2 temp - 1.5 fan + sin(2 load))) with standard-normal
  ``temp``, ``fan``, ``load`` and an epoch-seconds ``ts`` column.

Both CSVs carry the generating truth in extra columns the specs do not read
(``mean_true`` / ``p_true``); the script prints the oracle's holdout figures
(the last 20 % by time, the warm start's holdout) as one JSON line.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np

LATENCY_TOML = """[model]
features = ["requests", "cpu", "queue"]
target = "latency_ms"
timestamp = "time"
transforms = { requests = "log1p", latency_ms = "log1p" }
likelihood = "gaussian"
"""

FAILURES_TOML = """[model]
features = ["temp", "fan", "load"]
target = "failed"
timestamp = "ts"
likelihood = "bernoulli"
"""


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--rows", type=int, default=6000)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(args.seed)
    n = args.rows
    held = slice(n - max(1, round(0.2 * n)), n)
    oracle: dict[str, dict[str, float]] = {}

    # heavy-tailed regression
    requests = rng.lognormal(3.0, 1.2, n)
    cpu = rng.uniform(0, 100, n)
    queue = rng.poisson(5, n).astype(float)
    m = 1.0 + 0.5 * np.log1p(requests) + 0.8 * np.sin(cpu / 20) + 0.03 * queue
    s = 0.4
    latency = np.expm1(m + s * rng.standard_normal(n))
    mean_true = np.exp(m + 0.5 * s * s) - 1
    t0 = datetime(2024, 1, 1, tzinfo=UTC)
    with (out / "latency.csv").open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["time", "requests", "cpu", "queue", "latency_ms", "mean_true"])
        for i in range(n):
            ts = (t0 + timedelta(minutes=i)).isoformat()
            w.writerow([ts, requests[i], cpu[i], queue[i], latency[i], mean_true[i]])
    (out / "latency.toml").write_text(LATENCY_TOML)
    y, mu = latency[held], mean_true[held]
    z = (np.log1p(y) - m[held]) / s
    nll = float(np.mean(0.5 * z * z + math.log(s * math.sqrt(2 * math.pi)) + np.log1p(y)))
    lo95, hi95 = np.expm1(m[held] - 1.96 * s), np.expm1(m[held] + 1.96 * s)
    oracle["latency"] = {
        "rmse": float(np.sqrt(np.mean((mu - y) ** 2))),
        "nll": nll,
        "coverage_95": float(np.mean((y >= lo95) & (y <= hi95))),
        "y_sd": float(np.std(y, ddof=1)),
        "kurtosis": float(np.mean((latency - latency.mean()) ** 4) / latency.var() ** 2),
    }

    # binary target
    temp, fan, load = rng.standard_normal((3, n))
    p = 1.0 / (1.0 + np.exp(-(2.0 * temp - 1.5 * fan + np.sin(2.0 * load))))
    failed = (rng.uniform(size=n) < p).astype(int)
    with (out / "failures.csv").open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["ts", "temp", "fan", "load", "failed", "p_true"])
        for i in range(n):
            w.writerow([1_700_000_000 + 60 * i, temp[i], fan[i], load[i], failed[i], p[i]])
    (out / "failures.toml").write_text(FAILURES_TOML)
    ph, fh_ = p[held], failed[held]
    py = np.where(fh_ == 1, ph, 1 - ph)
    oracle["failures"] = {
        "nll": float(-np.mean(np.log(py))),
        "accuracy": float(np.mean((ph > 0.5) == (fh_ == 1))),
        "brier": float(np.mean((ph - fh_) ** 2)),
        "base_rate": float(fh_.mean()),
    }
    print(json.dumps({"oracle_holdout": oracle, "rows": n, "out": str(out)}, sort_keys=True))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
