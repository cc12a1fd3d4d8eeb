"""fogline over a NAB-layout corpus: the results tree NAB's scorer reads, wall times, scores.

``fogline bench nab --data DIR [--scorer PATH] [--out DIR] [--json]``

``DIR`` is a NAB tree: ``DIR/data/<category>/<name>.csv`` (``timestamp,value``)
and ``DIR/labels/combined_windows.json`` (or ``DIR/combined_windows.json``).
Every file runs through ``fogline experiment`` with one policy (default: the
drift settings' default) and one set of settings for all files: the warm start
on NAB's probationary period, then the daemon's drift loop, every record scored
(:func:`fogline.drift.experiment.nab_scores`).  The results land in NAB's layout,
``OUT/<detector>/<category>/<detector>_<name>.csv`` (detector = the policy).

Printed per file: rows, wall seconds, drift alarms.  Then the drift alarms'
realised mean run length against the configured ERT, pooled (exponential MLE,
batches monitored / alarms) over

* ``no_anomaly``: files without any labelled window (every alarm is false);
* ``before_first_window``: the batches of the other files that end before the
  file's first window starts.

With ``--scorer`` (NAB's scorer, e.g. ``../shared/tools/nab_score.py``) its table
and the standard / low-FP / low-FN scores.  ``--json`` ends with one JSON line.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

#: NAB's profile names, in the scorer's table order, and the short names used here.
PROFILES = {"standard": "standard", "reward_low_FP_rate": "low_fp", "reward_low_FN_rate": "low_fn"}


def windows_file(root: Path) -> Path:
    """``combined_windows.json`` of a NAB tree (``labels/`` first, then the root)."""
    for candidate in (root / "labels" / "combined_windows.json", root / "combined_windows.json"):
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"{root}: no labels/combined_windows.json or combined_windows.json")


def data_files(root: Path, match: str | None = None) -> list[Path]:
    """``root/data/<category>/*.csv``, sorted; only names containing ``match`` if given."""
    data = root / "data"
    if not data.is_dir():
        raise FileNotFoundError(f"{root}: no data/ folder (NAB layout: data/<category>/<name>.csv)")
    files = sorted(data.glob("*/*.csv"))
    if match:
        files = [f for f in files if match in str(f.relative_to(data))]
    if not files:
        raise FileNotFoundError(f"{data}: no <category>/<name>.csv files")
    return files


def run_file(path: Path, policy: str, cfg_json: dict[str, Any], out: Path) -> dict[str, Any]:
    """One NAB file through ``fogline experiment``: its results file and alarm counts."""
    import numpy as np
    import structlog
    import torch

    from fogline.drift.experiment import ExperimentConfig, run_experiment

    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(40))
    torch.set_num_threads(1)
    cfg = ExperimentConfig.model_validate(cfg_json)
    t0 = time.perf_counter()
    res = run_experiment(str(path), [policy], cfg, nab_out=out)
    wall = time.perf_counter() - t0
    m = res["policies"][policy]
    labels = np.asarray(res["labels"])
    live = np.asarray(m["live"], dtype=bool)
    alarms = np.zeros(len(live), dtype=bool)
    alarms[m["alarms"]] = True
    b, start = res["batch_size"], res["stream_start"]
    rates = (
        score_exceedances(Path(res["nab_files"][0]), res["lag"], cfg) if not labels.any() else None
    )
    if labels.any():
        first = int(np.argmax(labels))  # row of the first window's first record
        ends = start + (np.arange(len(live)) + 1) * b  # one past each batch's last row
        quiet = ends <= first
    else:
        quiet = np.ones(len(live), dtype=bool)
    return {
        "file": str(path),
        "name": path.stem,
        "category": path.parent.name,
        "rows": len(labels),
        "windows": int(np.count_nonzero(np.diff(np.r_[0, labels]) == 1)),
        "wall_s": round(wall, 2),
        "batches": len(live),
        "alarms": list(m["alarms"]),
        "monitored_quiet": int(np.count_nonzero(live & quiet)),
        "alarms_quiet": int(np.count_nonzero(alarms & live & quiet)),
        "mean_nll": m["mean_nll"],
        "exceedances": rates,
    }


#: Nominal per-record false-alarm rates q at which the score's realised rate is measured.
RATE_LEVELS = (1e-1, 1e-2, 1e-3, 1e-4)


def score_exceedances(results: Path, lag: int, cfg: Any) -> dict[str, Any]:
    """Counts of records past NAB's probation with score >= 1 - q, for q in :data:`RATE_LEVELS`.

    ``events``: the written (repeat-suppressed) ``anomaly_score`` column;
    ``raw``: the unsuppressed score 1 - 10^(-lambda) recomputed from the file's
    ``tail_probability`` column (:func:`fogline.drift.anomaly.anomaly_likelihood`).
    Meant for files without windows, where every exceedance is a false alarm.
    """
    import csv

    import numpy as np

    from fogline.drift.anomaly import anomaly_likelihood, normal_scores, written_score
    from fogline.drift.experiment import nab_probation

    with results.open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    score = np.asarray([float(r["anomaly_score"]) for r in rows])
    tail = np.asarray([float(r["tail_probability"]) for r in rows])
    with np.errstate(divide="ignore"):
        zeta = normal_scores(np.log(tail[lag:]), cfg.anomaly.cap)
    raw = np.zeros(len(rows))
    raw[lag:] = written_score(anomaly_likelihood(zeta, cfg.anomaly)[1], cfg.anomaly)
    live = slice(nab_probation(len(rows)), None)
    return {
        "records": len(score[live]),
        "raw": [int(np.count_nonzero(raw[live] >= 1 - q)) for q in RATE_LEVELS],
        "events": [int(np.count_nonzero(score[live] >= 1 - q)) for q in RATE_LEVELS],
    }


def _rates(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Pooled realised / nominal rate of score >= 1 - q over the files without windows."""
    parts = [r["exceedances"] for r in rows if r.get("exceedances")]
    n = sum(p["records"] for p in parts)
    out: dict[str, Any] = {"files": len(parts), "records": n, "levels": list(RATE_LEVELS)}
    for kind in ("raw", "events"):
        counts = [sum(p[kind][i] for p in parts) for i in range(len(RATE_LEVELS))]
        out[kind] = {
            "counts": counts,
            "ratio": [
                round(c / (q * n), 3) if n else None
                for c, q in zip(counts, RATE_LEVELS, strict=True)
            ],
        }
    return out


def _pooled(rows: list[dict[str, Any]], ert: float) -> dict[str, Any]:
    monitored = sum(r["monitored_quiet"] for r in rows)
    alarms = sum(r["alarms_quiet"] for r in rows)
    mrl = monitored / alarms if alarms else math.inf
    half = 1.96 / math.sqrt(alarms) if alarms else math.nan
    return {
        "files": len(rows),
        "monitored_batches": monitored,
        "false_alarms": alarms,
        "mean_run_length": round(mrl, 1) if alarms else None,
        "ci95_run_length": (
            [round(mrl * math.exp(-half), 1), round(mrl * math.exp(half), 1)] if alarms else None
        ),
        "ratio": round(mrl / ert, 3) if alarms else None,
    }


_ROW = re.compile(
    r"^(\S+)\s+(-?[\d.]+)\s+(-?[\d.]+)\s+(\d+)\s+(\d+)\s+(\d+)\s+(-?[\d.]+)\s+(-?[\d.]+)\s+(-?[\d.]+)$"
)


def score(scorer: Path, root: Path, results: Path) -> dict[str, Any]:
    """Run NAB's scorer on ``results`` (one detector's tree); its table as a dict."""
    cmd = [
        sys.executable,
        str(scorer),
        "--data",
        str(root / "data"),
        "--windows",
        str(windows_file(root)),
        "--results",
        str(results),
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"scorer failed ({out.returncode}): {out.stderr.strip()}")
    table: dict[str, Any] = {}
    for line in out.stdout.splitlines():
        m = _ROW.match(line.strip())
        if m and m.group(1) in PROFILES:
            table[PROFILES[m.group(1)]] = {
                "score": float(m.group(2)),
                "threshold": float(m.group(3)),
                "tp": int(m.group(4)),
                "fp": int(m.group(5)),
                "fn": int(m.group(6)),
            }
    if set(table) != set(PROFILES.values()):
        raise RuntimeError(f"unreadable scorer output:\n{out.stdout}")
    return {"profiles": table, "text": out.stdout.strip()}


def add_screen_option(p: argparse.ArgumentParser) -> None:
    """``--screen R``: ``drift.recalibration_screen`` of the run (``bench nab``, ``bench false_alarms``)."""
    p.add_argument(
        "--screen",
        type=int,
        default=None,
        metavar="R",
        help="drift.recalibration_screen: keep runs of R batches above the threshold in force "
        "out of re-calibration windows (0: off; default: the configured default)",
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point (``fogline bench nab``)."""
    from fogline.drift.config import PolicyConfig

    p = argparse.ArgumentParser(
        prog="fogline bench nab", description=__doc__.split("\n\n")[0], allow_abbrev=False
    )
    p.add_argument("--data", required=True, type=Path, help="NAB tree (data/, labels/)")
    p.add_argument("--out", type=Path, default=None, help="results tree (default: a temp dir)")
    p.add_argument("--scorer", type=Path, default=None, help="NAB scorer script (nab_score.py)")
    p.add_argument("--policy", default=PolicyConfig().policy, help="drift policy (the detector)")
    p.add_argument("--ert", type=float, default=None, help="drift alarms' ERT in batches")
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--warm-steps", type=int, default=None, help="warm-start SVI steps (min)")
    p.add_argument(
        "--restarts",
        type=int,
        default=None,
        help="warm-start restarts (default 1), the best by --select kept",
    )
    p.add_argument(
        "--select",
        choices=("elbo", "held_out"),
        default=None,
        help="how restarts are compared (default held_out)",
    )
    p.add_argument(
        "--members",
        type=int,
        default=None,
        help="warm starts whose references' mixture scores the records (default 1)",
    )
    p.add_argument(
        "--combine",
        choices=("mixture", "normal_mean"),
        default=None,
        help="how the members score a record (default mixture: their predictive mixture)",
    )
    p.add_argument(
        "--anneal",
        type=float,
        default=None,
        help="fraction of the warm start's epochs with a decaying step size (default 0)",
    )
    p.add_argument(
        "--average",
        type=float,
        default=None,
        help="fraction of the warm start's last epochs averaged, SWA (default 0)",
    )
    p.add_argument(
        "--noise-floor",
        type=float,
        default=None,
        help="anomaly score's noise floor (model units: fraction of the warm-up sd)",
    )
    p.add_argument(
        "--noise-floor-relative",
        type=float,
        default=None,
        help="noise floor as a multiple c of the warm-up's one-step residual scale, max'd "
        "with --noise-floor (default 0.2; 0: the fixed floor alone)",
    )
    p.add_argument(
        "--recurrence",
        type=float,
        default=None,
        help="weight m of the anomaly score's recurrence floor, q >= m c / n for a window "
        "mean reached c times in its n-record history (default 0.02; 0: off)",
    )
    p.add_argument(
        "--cap",
        type=float,
        default=None,
        help="clip of the normal scores |zeta| <= C (default 12: a tail of 1.8e-33; 6 until "
        "2026-12-07)",
    )
    p.add_argument(
        "--calibrate",
        action="store_true",
        help="write the per-stream calibrated score (peaks over threshold, drift/pot.py)",
    )
    p.add_argument("--match", default=None, help="only files whose <category>/<name> has this")
    p.add_argument("--jobs", type=int, default=1, help="files run in parallel (processes)")
    add_screen_option(p)
    p.add_argument("--json", action="store_true", help="end with one JSON line")
    args = p.parse_args(list(argv) if argv is not None else None)
    root: Path = args.data
    files = data_files(root)
    if args.match:
        files = data_files(root, args.match)
    windows_file(root)  # fail early, naming the tree
    if args.scorer is not None and not args.scorer.is_file():
        raise FileNotFoundError(f"--scorer: no file {args.scorer}")
    overrides: dict[str, Any] = {"seed": args.seed}
    if args.batch_size:
        overrides["batch_size"] = args.batch_size
    if args.ert:
        overrides["policy"] = {"ert": args.ert}
    if args.screen is not None:
        overrides["policy"] = {**overrides.get("policy", {}), "recalibration_screen": args.screen}
    if args.restarts:
        overrides["warm_restarts"] = args.restarts
    if args.select:
        overrides["warm_select"] = args.select
    if args.anneal is not None:
        overrides["warm_anneal"] = args.anneal
    if args.average is not None:
        overrides["warm_average"] = args.average
    if args.combine:
        overrides["score_combine"] = args.combine
    if args.members:
        overrides["score_members"] = args.members
    anomaly: dict[str, Any] = {}
    if args.noise_floor is not None:
        anomaly["noise_floor"] = args.noise_floor
    if args.noise_floor_relative is not None:
        anomaly["noise_floor_relative"] = args.noise_floor_relative
    if args.recurrence is not None:
        anomaly["recurrence"] = args.recurrence
    if args.cap is not None:
        anomaly["cap"] = args.cap
    if args.calibrate:
        anomaly["calibration"] = {}
    if anomaly:
        overrides["anomaly"] = anomaly
    if args.warm_steps:
        overrides["warm_steps"] = args.warm_steps
        overrides["warm_epochs"] = 1
    from fogline.drift.experiment import ExperimentConfig

    cfg = ExperimentConfig.model_validate(overrides)
    out = args.out or Path(tempfile.mkdtemp(prefix="fogline-nab-"))
    t0 = time.perf_counter()
    cfg_json = cfg.model_dump(mode="json")
    rows: list[dict[str, Any]] = []
    if args.jobs > 1:
        with ProcessPoolExecutor(max_workers=args.jobs) as pool:
            futures = [pool.submit(run_file, f, args.policy, cfg_json, out) for f in files]
            for fut in futures:
                rows.append(fut.result())
                _print_row(rows[-1])
    else:
        for f in files:
            rows.append(run_file(f, args.policy, cfg_json, out))
            _print_row(rows[-1])
    wall = time.perf_counter() - t0
    no_anomaly = [r for r in rows if r["windows"] == 0]
    others = [r for r in rows if r["windows"] > 0]
    result: dict[str, Any] = {
        "benchmark": "nab",
        "data": str(root),
        "results": str(out / args.policy),
        "detector": args.policy,
        "files": len(rows),
        "rows": sum(r["rows"] for r in rows),
        "wall_s": round(wall, 1),
        "jobs": args.jobs,
        "cpus": os.cpu_count(),
        "batch_size": cfg.batch_size,
        "ert": cfg.ert,
        "false_alarms": {
            "no_anomaly": _pooled(no_anomaly, cfg.ert),
            "before_first_window": _pooled(others, cfg.ert),
        },
        "score_rates": _rates(rows),
        "per_file": [
            {k: r[k] for k in ("name", "category", "rows", "wall_s", "alarms")} for r in rows
        ],
    }
    print(
        f"{len(rows)} files, {result['rows']} rows in {wall:.0f} s ({args.jobs} job(s)); "
        f"results in {out / args.policy}"
    )
    for part, v in result["false_alarms"].items():
        print(
            f"drift alarms, {part}: {v['false_alarms']} in {v['monitored_batches']} monitored "
            f"batches, mean run length {v['mean_run_length']} vs ERT {cfg.ert:g}"
        )
    sr = result["score_rates"]
    if sr["records"]:
        print(
            f"anomaly score >= 1 - q on the {sr['files']} files without windows "
            f"({sr['records']} records past probation), realised / nominal rate:"
        )
        for kind in ("raw", "events"):
            cells = ", ".join(
                f"q={q:g}: {r}" for q, r in zip(RATE_LEVELS, sr[kind]["ratio"], strict=True)
            )
            print(f"  {kind}: {cells}")
    if args.scorer is not None:
        scored = score(args.scorer, root, out / args.policy)
        print(scored["text"])
        result["scores"] = scored["profiles"]
    if args.json:
        print(json.dumps(result))
    return 0


def _print_row(r: dict[str, Any]) -> None:
    print(
        f"{r['category']}/{r['name']}: {r['rows']} rows, {r['wall_s']:.1f} s, "
        f"{len(r['alarms'])} drift alarm(s)",
        flush=True,
    )


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
