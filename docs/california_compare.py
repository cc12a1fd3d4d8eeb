"""The recipe vs the California preset, on the same holdout metrics (docs/model.md).

    python docs/california_compare.py CAL_HOUSING_CSV [--epochs 60]

Runs the recipe (:func:`fogline.models.warmstart.run`) and the generic warm
start (:func:`fogline.models.fit.fit` with ``examples/california.toml`` on the
CSV ``fogline warmstart --write-recipe-data`` writes) with the same epochs and
seed, and prints, for each, :func:`fogline.models.report.holdout_report` on its
own holdout (both a seeded random 20 % of the same 19,789 rows, drawn
differently) plus the recipe's :func:`~fogline.models.warmstart.evaluate`
figures for the recipe.  One JSON line.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch

from fogline.daemon.config import Settings
from fogline.models.data import load, recipe_data, write_recipe_csv
from fogline.models.fit import FitOptions, fit
from fogline.models.predictive import sample_ensemble
from fogline.models.report import holdout_report
from fogline.models.schema import DataSchema
from fogline.models.tabular import load_table
from fogline.models.warmstart import WarmstartOptions, run

PRESET = Path(__file__).resolve().parents[1] / "examples" / "california.toml"
KEYS = ("n", "nll", "rmse", "coverage_50", "coverage_90", "coverage_95", "mean_width_95")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("data", help="raw cal_housing.csv")
    ap.add_argument("--epochs", type=int, default=60)
    args = ap.parse_args()
    torch.set_num_threads(1)
    rec = run(WarmstartOptions(data=args.data, epochs=args.epochs))
    data = recipe_data(load(args.data))
    ens = sample_ensemble(rec.state, 100, seed=1)
    ident = DataSchema.identity(rec.state.config.features(), "y")
    rec_h = holdout_report(ens, ident, data.x_held, data.y_held, data.y_held)
    spec = Settings.load(PRESET).model
    assert spec is not None
    with tempfile.TemporaryDirectory() as tmp:
        csv_path = Path(tmp) / "california.csv"
        write_recipe_csv(csv_path, load(args.data))
        table, _ = load_table(csv_path, spec)
    gen = fit(spec, table, FitOptions(epochs=args.epochs))
    doc = {
        "epochs": args.epochs,
        "recipe": {k: rec_h[k] for k in KEYS}
        | {"coverage_95_in": rec.metrics["coverage_95_in"], "seconds": rec.metrics["seconds"]},
        "preset": {k: gen.report["holdout"][k] for k in KEYS}
        | {"seconds": gen.report["fit"]["seconds"]},
    }
    print(json.dumps(doc, sort_keys=True))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
