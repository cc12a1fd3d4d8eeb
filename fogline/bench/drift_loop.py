"""Where the drift loop's time goes, per batch, against the plain SVI update of the same run.

``fogline bench drift_loop --json`` replays ``--batches`` regime-0 batches (no Kafka, no
Redis) through the daemon's update rule for ``--policy`` (``make_update_rule``: the drift
loop's ``process`` plus its metrics) and, as the baseline, through the ``off`` rule (plain
``stream_step``), from the same fresh prior, 1 torch thread.  Time is *process CPU time*
(``time.process_time``), which other processes on a shared machine disturb less than wall
time.  The parts are timed by wrapping the functions the loop calls
(:mod:`fogline.drift.runner`'s ``pre_update_signals``, ``policy_step``, ``stream_step``,
``post_update_signals``, ``store_drift``, the threshold fit, and the post-update ensemble
of :class:`fogline.drift.signals.NoiseCache`) for the duration of the run; "other" is the
rest of the rule (prepare/apply glue, metrics).

Batches are split into ``calibrating`` (the first ``calibration_batches``, which also compute
the step KL; the last of them fits the threshold) and ``steady`` (stable and calibrated); the
first 5 are left out (JIT warm-up).  The last line is ``{"plain_ms", "drift_steady_ms",
"drift_calibrating_ms", "steady_ratio"}`` (``steady_ratio`` = plain_ms / drift_steady_ms,
the drift rule's throughput relative to the plain one).
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

PARTS = {
    "pre_update_signals": "reference scores (surprisal, anomaly)",
    "policy_step": "policy step",
    "stream_step": "SVI step",
    "post_update_signals": "post-update pass (predictive KL, step KL)",
    "store_drift": "store the drift state (snapshot layout)",
}


@contextmanager
def _timed(acc: dict[str, float]) -> Iterator[None]:
    """Wrap the parts of :mod:`fogline.drift.runner` with CPU-time accumulators."""
    from fogline.drift import runner, signals

    def wrap(label: str, f: Callable[..., Any]) -> Callable[..., Any]:
        def g(*a: Any, **k: Any) -> Any:
            t0 = time.process_time()
            try:
                return f(*a, **k)
            finally:
                acc[label] += time.process_time() - t0

        return g

    saved: list[tuple[Any, str, Any]] = []
    targets: list[tuple[Any, str, str]] = [(runner, name, label) for name, label in PARTS.items()]
    targets.append((runner.DriftLoop, "_fit_thresholds", "threshold fit (bootstrap)"))
    targets.append((signals.NoiseCache, "ensemble", "post-update ensemble (weights)"))
    for owner, name, label in targets:
        saved.append((owner, name, getattr(owner, name)))
        setattr(owner, name, wrap(label, getattr(owner, name)))
    try:
        yield
    finally:
        for owner, name, f in saved:
            setattr(owner, name, f)


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``fogline bench drift_loop``."""
    p = argparse.ArgumentParser(prog="bench drift_loop", description=__doc__.split("\n\n")[0])
    p.add_argument("--batches", type=int, default=240)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--policy", default="forget", choices=("none", "reset", "forget", "vb"))
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)

    import numpy as np
    import structlog
    import torch

    from fogline.bench.crash_replay import regime0
    from fogline.daemon.config import Settings
    from fogline.daemon.stream.update import DriftUpdate, make_update_rule, warm_up
    from fogline.models.config import ModelConfig
    from fogline.models.svi import init_state

    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(30))
    torch.set_num_threads(1)
    b, n = args.batch_size, args.batches
    x_np, y_np = regime0(b * n, np.random.default_rng(0))
    x = torch.from_numpy(x_np.astype(np.float32))
    y = torch.from_numpy(y_np.astype(np.float32))
    fresh = init_state(ModelConfig.model_validate({}), seed=0, lr=1e-3, device=torch.device("cpu"))
    warm_up(fresh, b, 1, None)

    def replay(policy: str) -> tuple[dict[str, dict[str, float]], dict[str, int]]:
        s = Settings.load(None, metrics_port=0, drift={"policy": policy}, stream={"device": "cpu"})
        rule = make_update_rule(s, fresh)
        state = fresh
        acc: dict[str, float] = collections.defaultdict(float)
        sums: dict[str, dict[str, float]] = {
            "calibrating": collections.defaultdict(float),
            "steady": collections.defaultdict(float),
        }
        counts: collections.Counter[str] = collections.Counter()
        with _timed(acc):
            for t in range(n):
                loop = rule.loop if isinstance(rule, DriftUpdate) else None
                phase = "steady"
                if loop is not None and loop.policy_state.calibrating > 0:
                    phase = "calibrating"
                acc.clear()
                t0 = time.process_time()
                state, _info, _sig = rule(state, x[t * b : (t + 1) * b], y[t * b : (t + 1) * b])
                total = time.process_time() - t0
                if t < 5:
                    continue
                counts[phase] += 1
                parts = sums[phase]
                for k, v in acc.items():
                    parts[k] += v
                parts["other"] += total - sum(acc.values())
                parts["total"] += total
        out = {
            ph: {k: round(v / counts[ph] * 1e3, 3) for k, v in d.items()}
            for ph, d in sums.items()
            if counts[ph]
        }
        return out, dict(counts)

    plain, _ = replay("off")
    drift, counts = replay(args.policy)
    plain_ms = plain["steady"]["total"]
    result = {
        "plain_ms": plain_ms,
        "drift_steady_ms": drift["steady"]["total"],
        "drift_calibrating_ms": drift.get("calibrating", {}).get("total"),
        "steady_ratio": round(plain_ms / drift["steady"]["total"], 3),
    }
    detail = {
        "policy": args.policy,
        "batch_size": b,
        "batches": counts,
        "parts_ms": drift,
        "threads": 1,
        "loadavg_1m": round(os.getloadavg()[0], 2),
        "script": os.path.basename(__file__),
    }
    print(json.dumps(detail, indent=None if args.json else 1))
    print(json.dumps(result) if args.json else result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
