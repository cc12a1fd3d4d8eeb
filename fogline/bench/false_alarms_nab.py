"""Drift alarms on real telemetry: realised mean run length vs the ERT on a NAB-layout corpus.

``fogline bench false_alarms --nab DIR [--match S] [--ert 20,50] [--batch-size 16,32]
[--policy forget] [--after-windows 1] [--jobs 2] [--json]``

Every file of ``DIR/data/<category>/<name>.csv`` runs as ``fogline bench nab`` runs it
(:func:`fogline.drift.experiment.load_nab`: warm start on NAB's probationary period,
then the daemon's drift loop with one policy), once per batch size and ERT; the warm
start is shared by the ERTs of one batch size.  A batch is *monitored* when the
alarm was armed on it (mode ``stable``, thresholds calibrated), and an alarm on a
*stable* batch is false.  Which batches are stable:

* a file without labelled windows: every batch (``no_anomaly``);
* a file with windows [s_j, e_j] (rows): a batch of rows [a, b) is stable when,
  for every window, it ends before the window starts (b <= s_j) or starts more
  than g window lengths after the window ends (a > e_j + g (e_j - s_j + 1)),
  g = ``--after-windows`` (default 1): the probation of a change that was missed,
  or detected and recovered from, is not "stable" (``stable_parts``);
  ``before_first_window`` is the stricter b <= s_1.

Per file, batch size and ERT: monitored stable batches M, false alarms A and the
mean run length M / A; pooled over files (the exponential maximum-likelihood
estimate with censored tails, ``sum M / sum A``, 95 % interval
``exp(log(MRL) +- 1.96 / sqrt(A))``) for ``no_anomaly``, ``stable_parts``,
``before_first_window`` and ``all`` (``no_anomaly`` + ``stable_parts``), with the
ratio to the ERT and whether it lies within +-50 %.  ``all_not_deterministic``
pools ``all`` without the files whose last threshold fit found the signal
deterministic (:func:`deterministic`; listed as ``deterministic_files``): a
noise-free series, where the calibrated detector rightly never alarms and no
run length can match a finite ERT.  ``clean_calibration`` pools the batches of
``all_not_deterministic`` whose threshold was fitted on a window of stable
batches only (:func:`clean_calibration`): a window that overlapped an anomaly
fits a threshold partly on it.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

#: The pooled groups, in print order.
GROUPS = (
    "no_anomaly",
    "stable_parts",
    "before_first_window",
    "all",
    "all_not_deterministic",
    "clean_calibration",
)


def windows_of(labels: np.ndarray) -> list[tuple[int, int]]:
    """The labelled windows of a 0/1 row label array as inclusive row ranges ``(s, e)``."""
    lab = np.asarray(labels, dtype=np.int64).reshape(-1)
    edges = np.diff(np.r_[0, lab, 0])
    starts = np.nonzero(edges == 1)[0]
    ends = np.nonzero(edges == -1)[0] - 1
    return [(int(s), int(e)) for s, e in zip(starts, ends, strict=True)]


def stable_batches(
    n_rows: int, start: int, batch_size: int, n_batches: int, labels: np.ndarray, after: float
) -> tuple[np.ndarray, np.ndarray]:
    """``(stable, before_first)`` bool masks over the stream's batches (module docstring).

    Batch t holds rows [start + t B, min(start + (t + 1) B, n_rows)).
    """
    if after < 0:
        raise ValueError(f"after: {after}, need >= 0 window lengths")
    a = start + np.arange(n_batches) * batch_size
    b = np.minimum(a + batch_size, n_rows)
    stable = np.ones(n_batches, dtype=bool)
    wins = windows_of(labels)
    for s, e in wins:
        stable &= (b <= s) | (a > e + after * (e - s + 1))
    before = b <= wins[0][0] if wins else np.ones(n_batches, dtype=bool)
    return stable, before


def clean_calibration(modes: Sequence[str], live: np.ndarray, stable: np.ndarray) -> np.ndarray:
    """Per batch: was the last calibration window before it made of stable batches only?

    A calibration window is a maximal run of batches in mode ``calibrating``
    (:class:`fogline.drift.experiment.PolicyRun` ``modes``) or ``stable`` but not
    yet live (the batch on which a window was extended); the stream-calibrated
    threshold assumes its window is free of drift, and one that overlapped a labelled
    window (or its aftermath) was fitted partly on the anomaly.
    """
    out = np.zeros(len(modes), dtype=bool)
    clean, in_window, last = False, False, False
    for t, m in enumerate(modes):
        if m == "calibrating" or (m == "stable" and not live[t]):
            clean = clean and bool(stable[t]) if in_window else bool(stable[t])
            in_window = True
        else:
            if in_window:
                last = clean
            in_window = False
        out[t] = last and not in_window
    return out


def run_file(
    path: str,
    batch_size: int,
    erts: Sequence[float],
    policy: str,
    after: float,
    seed: int,
    drift: dict[str, Any] | None = None,
) -> list[dict[str, Any]]:
    """One file at one batch size, every ERT: the per-file counts (module docstring).

    ``drift``: settings of the drift loop (:class:`~fogline.drift.config.PolicyConfig`
    fields) other than the ERT, e.g. ``{"calibration_block_auto": False}``.
    """
    import structlog
    import torch

    from fogline.drift.experiment import ExperimentConfig, load_source, run_policy, warm_start

    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(40))
    torch.set_num_threads(1)
    settings: dict[str, Any] = {"seed": seed, "batch_size": batch_size}
    base = ExperimentConfig.model_validate(settings)
    data = load_source(path, base)
    if data.labels is None:
        raise ValueError(f"{path}: not a NAB timestamp,value file")
    warm = warm_start(data, base)
    start = data.lag + len(data.warm_y)
    stable, before = stable_batches(
        len(data.labels), start, batch_size, data.n_batches, data.labels, after
    )
    out = []
    for ert in erts:
        t0 = time.perf_counter()
        cfg = ExperimentConfig.model_validate({**settings, "policy": {**(drift or {}), "ert": ert}})
        run = run_policy(policy, warm, data, cfg)
        live = np.asarray(run.live, dtype=bool)
        alarm = np.zeros(data.n_batches, dtype=bool)
        alarm[run.alarms] = True
        n_win = len(windows_of(data.labels))
        clean = clean_calibration(run.modes, live, stable) & live & stable
        group = "no_anomaly" if n_win == 0 else "stable_parts"
        out.append(
            {
                "name": Path(path).stem,
                "category": Path(path).parent.name,
                "group": group,
                "batch_size": batch_size,
                "ert": float(ert),
                "batches": data.n_batches,
                "windows": n_win,
                "monitored": int(np.count_nonzero(live & stable)),
                "alarms": int(np.count_nonzero(alarm & live & stable)),
                "alarm_batches": [int(t) for t in np.nonzero(alarm & live & stable)[0]],
                "deterministic": deterministic(run.calibration),
                "monitored_clean": int(np.count_nonzero(clean)),
                "alarms_clean": int(np.count_nonzero(alarm & clean)),
                "monitored_before_first": int(np.count_nonzero(live & before)),
                "alarms_before_first": int(np.count_nonzero(alarm & live & before)),
                "wall_s": round(time.perf_counter() - t0, 2),
            }
        )
    return out


def deterministic(calibration: dict[str, Any] | None) -> bool:
    """Did the file's last threshold fit find its window's signal deterministic?

    True when every bootstrap stream of the fit had the same maximum
    (:attr:`fogline.drift.calibration.Calibration.deterministic`): the window's
    batch signal repeats exactly (a noise-free series), no threshold gives any
    finite ERT, and no false alarm is expected (docs/drift.md).
    """
    return calibration is not None and bool(calibration.get("deterministic", False))


def pooled(monitored: int, alarms: int, ert: float) -> dict[str, Any]:
    """Exponential MLE of the run length from pooled counts, its 95 % interval and ratio."""
    if not alarms:
        return {
            "monitored_batches": monitored,
            "false_alarms": 0,
            "mean_run_length": None,
            "ci95_run_length": None,
            "ratio": None,
            "within_50pct": False,
        }
    mrl = monitored / alarms
    half = 1.96 / math.sqrt(alarms)
    ratio = mrl / ert
    return {
        "monitored_batches": monitored,
        "false_alarms": alarms,
        "mean_run_length": round(mrl, 1),
        "ci95_run_length": [round(mrl * math.exp(-half), 1), round(mrl * math.exp(half), 1)],
        "ratio": round(ratio, 3),
        "within_50pct": bool(0.5 <= ratio <= 1.5),
    }


def summarise(rows: list[dict[str, Any]], ert: float) -> dict[str, Any]:
    """The four pooled groups of the module docstring over one (batch size, ERT)'s rows."""
    na = [r for r in rows if r["group"] == "no_anomaly"]
    sp = [r for r in rows if r["group"] == "stable_parts"]

    def tot(rs: list[dict[str, Any]], m: str, a: str) -> dict[str, Any]:
        return {"files": len(rs), **pooled(sum(r[m] for r in rs), sum(r[a] for r in rs), ert)}

    noisy = [r for r in na + sp if not r["deterministic"]]
    return {
        "no_anomaly": tot(na, "monitored", "alarms"),
        "stable_parts": tot(sp, "monitored", "alarms"),
        "before_first_window": tot(sp, "monitored_before_first", "alarms_before_first"),
        "all": tot(na + sp, "monitored", "alarms"),
        "all_not_deterministic": tot(noisy, "monitored", "alarms"),
        "clean_calibration": tot(noisy, "monitored_clean", "alarms_clean"),
        "deterministic_files": sorted(
            f"{r['category']}/{r['name']}" for r in na + sp if r["deterministic"]
        ),
    }


def run(
    root: Path,
    *,
    erts: Sequence[float],
    batch_sizes: Sequence[int],
    policy: str = "forget",
    match: str | None = None,
    after: float = 1.0,
    seed: int = 0,
    jobs: int = 1,
    drift: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The benchmark's JSON result (module docstring)."""
    from fogline.bench.nab import data_files, windows_file

    files = data_files(root, match)
    windows_file(root)  # fail early, naming the tree
    tasks = [(str(f), b) for b in batch_sizes for f in files]
    t0 = time.perf_counter()
    rows: list[dict[str, Any]] = []
    if jobs > 1:
        with ProcessPoolExecutor(max_workers=jobs) as pool:
            futs = [pool.submit(run_file, f, b, erts, policy, after, seed, drift) for f, b in tasks]
            for fut in futs:
                rows.extend(fut.result())
    else:
        for f, b in tasks:
            rows.extend(run_file(f, b, erts, policy, after, seed, drift))
    settings = []
    for b in batch_sizes:
        for ert in erts:
            sel = [r for r in rows if r["batch_size"] == b and r["ert"] == float(ert)]
            settings.append({"batch_size": b, "ert": float(ert), **summarise(sel, float(ert))})
    return {
        "benchmark": "false_alarms_nab",
        "data": str(root),
        "policy": policy,
        "seed": seed,
        "drift": drift or {},
        "after_windows": after,
        "files": len(files),
        "settings": settings,
        "per_file": rows,
        "wall_s": round(time.perf_counter() - t0, 1),
        "jobs": jobs,
    }


def report(result: dict[str, Any]) -> str:
    """A person's summary: per-file lines and the pooled groups per setting."""
    lines = []
    for s in result["settings"]:
        b, ert = s["batch_size"], s["ert"]
        lines.append(f"batch size {b}, ERT {ert:g}:")
        for r in result["per_file"]:
            if r["batch_size"] != b or r["ert"] != ert:
                continue
            mrl = f"{r['monitored'] / r['alarms']:.1f}" if r["alarms"] else "inf"
            lines.append(
                f"  {r['category']}/{r['name']}: {r['alarms']} false alarm(s) in "
                f"{r['monitored']} monitored stable batches (MRL {mrl})"
                + (" [deterministic signal]" if r["deterministic"] else "")
            )
        for g in GROUPS:
            v = s[g]
            ci = v["ci95_run_length"]
            lines.append(
                f"  {g}: {v['false_alarms']} in {v['monitored_batches']} "
                f"({v['files']} files), MRL {v['mean_run_length']} vs ERT {ert:g}"
                + (f" (95% CI {ci[0]}..{ci[1]}, ratio {v['ratio']})" if ci else "")
            )
    return "\n".join(lines)


__all__ = [
    "GROUPS",
    "deterministic",
    "pooled",
    "report",
    "run",
    "run_file",
    "stable_batches",
    "windows_of",
]
