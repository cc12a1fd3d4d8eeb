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


def main(argv: list[str] | None = None) -> int:
    """Run the comparison (shared with ``fogline compare``); ``--json``: one JSON line last."""
    from daemon.commands.model import compare_main

    return compare_main(argv)
