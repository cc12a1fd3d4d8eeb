"""Gaussian vs Student-t, mean-field vs low-rank: the warm-start recipe outside the data.

``fogline bench compare [--epochs 60] [--data PATH] [--json]`` runs the recipe
(:mod:`models.warmstart`, all other settings at their defaults) for every
likelihood x guide pair and reports, per variant:

* ``rmse_in``: RMSE of the predictive mean to sin(3 x0) on held-out rows (|x0| <= 2),
* ``width_out``: mean 95 % band width at 3 <= |x0| <= 5,
* ``entropy_out``: mean predictive (mixture) differential entropy there, nats
  (Monte Carlo, see :func:`models.warmstart.predictive_entropy`),
* ``coverage_95_in`` / ``coverage_95_out``,

and the ratio of each to the baseline (Gaussian, mean-field) measured in the
same run.  Epochs are reduced (60 by default, the recipe uses 800); say so
when quoting the figures.
"""

from __future__ import annotations

import argparse
import json
import time

VARIANTS: tuple[tuple[str, str], ...] = (
    ("gaussian", "meanfield"),
    ("student-t", "meanfield"),
    ("gaussian", "lowrank"),
    ("student-t", "lowrank"),
)
KEYS = ("rmse_in", "width_out", "entropy_out", "coverage_95_in", "coverage_95_out")


def main(argv: list[str] | None = None) -> int:
    """Run the comparison; with ``--json`` print one JSON object on the last line."""
    ap = argparse.ArgumentParser(prog="fogline bench compare", description=__doc__)
    ap.add_argument("--data", metavar="PATH", help="raw cal_housing.csv (default: sklearn fetcher)")
    ap.add_argument("--epochs", type=int, default=60)
    ap.add_argument("--lr", type=float, default=5e-3)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--hidden", default="32,32")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args(argv)

    import torch

    from models.data import DataUnavailableError
    from models.warmstart import WarmstartOptions, run

    torch.set_num_threads(args.threads)
    hidden = tuple(int(h) for h in args.hidden.split(",") if h.strip())
    results: dict[str, dict[str, float]] = {}
    for likelihood, guide in VARIANTS:
        name = f"{likelihood}/{guide}"
        opts = WarmstartOptions(
            data=args.data,
            epochs=args.epochs,
            lr=args.lr,
            batch=args.batch,
            hidden=hidden,
            seed=args.seed,
            likelihood=likelihood,  # type: ignore[arg-type]
            guide=guide,  # type: ignore[arg-type]
        )
        t0 = time.perf_counter()
        try:
            m = run(opts).metrics
        except DataUnavailableError as exc:
            print(f"fogline bench compare: {exc}")
            return 2
        results[name] = {k: m[k] for k in KEYS} | {"seconds": time.perf_counter() - t0}
        if not args.quiet:
            r = results[name]
            print(
                f"{name:<20} rmse_in {r['rmse_in']:.3f}  width_out {r['width_out']:.2f}  "
                f"entropy_out {r['entropy_out']:.3f}  cover in/out "
                f"{r['coverage_95_in']:.3f}/{r['coverage_95_out']:.3f}  ({r['seconds']:.0f} s)",
                flush=True,
            )
    base = results["gaussian/meanfield"]
    ratios = {
        name: {f"{k}_ratio": r[k] / base[k] for k in ("rmse_in", "width_out")}
        | {"entropy_out_diff": r["entropy_out"] - base["entropy_out"]}
        for name, r in results.items()
    }
    print(f"(reduced run: {args.epochs} epochs; baseline gaussian/meanfield)")
    for name, r in ratios.items():
        print(
            f"  {name:<20} rmse x{r['rmse_in_ratio']:.2f}  width_out x{r['width_out_ratio']:.2f}  "
            f"entropy_out {r['entropy_out_diff']:+.3f} nats"
        )
    if args.json:
        doc = {
            "benchmark": "compare",
            "epochs": args.epochs,
            "baseline": "gaussian/meanfield",
            "variants": results,
            "ratio": ratios,
        }
        print(json.dumps(doc, sort_keys=True))
    return 0
