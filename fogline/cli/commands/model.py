"""``fogline warmstart`` and ``fogline compare``: the model's warm-start recipe and its variants."""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from fogline.models.warmstart import WarmstartOptions, WarmstartResult


def _hidden(text: str) -> tuple[int, ...]:
    try:
        widths = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"--hidden: {text!r} is not a list like 32,32") from exc
    if not widths or any(w < 1 for w in widths):
        raise argparse.ArgumentTypeError(f"--hidden: {text!r} needs positive widths")
    return widths


def _names(text: str) -> tuple[str, ...]:
    from fogline.models.data import FEATURE_NAMES

    if text.strip().lower() == "none":
        return ()
    names = tuple(v.strip() for v in text.split(",") if v.strip())
    unknown = [n for n in names if n not in FEATURE_NAMES]
    if unknown:
        raise argparse.ArgumentTypeError(
            f"unknown columns {unknown}; known {','.join(FEATURE_NAMES)}"
        )
    return names


def _add_recipe_args(
    p: argparse.ArgumentParser,
    epochs: int,
    data_help: str = "raw cal_housing.csv (default: scikit-learn's fetcher)",
    epochs_help: str | None = None,
) -> None:
    p.add_argument("--data", metavar="PATH", help=data_help)
    p.add_argument(
        "--epochs",
        type=int,
        default=None if epochs_help else epochs,
        help=epochs_help or f"passes over the data (default {epochs})",
    )
    p.add_argument("--lr", type=float, default=5e-3, help="Adam learning rate (default 0.005)")
    p.add_argument("--batch", type=int, default=256, help="minibatch size (default 256)")
    p.add_argument("--hidden", type=_hidden, default=(32, 32), help="hidden widths (default 32,32)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print one JSON object on the last line")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1: fastest here)")


def register(sub: argparse._SubParsersAction[Any]) -> None:
    """Add ``fogline warmstart`` and ``fogline compare``."""
    p = sub.add_parser(
        "warmstart",
        help="warm start: the California recipe, or your own data with --config/--data",
        description="Without --config: the warm-start recipe (standardised California features, "
        "y = sin(3 x0) + (0.1 + 0.4|x0|) eps, train on |x0| <= 2, 95%% bands on x0 in [-5, 5]). "
        "With --config CFG --data PATH: fit the model of CFG's [model] section on a CSV, JSONL "
        "or Parquet history (docs/model.md, 'Warm start on your own data').",
    )
    _add_recipe_args(
        p,
        800,
        data_help="with --config: your history (.csv, .jsonl, .parquet); without: the raw "
        "cal_housing.csv (default: scikit-learn's fetcher)",
        epochs_help="passes over the data (recipe: 800; with --config: about 20,000 steps, "
        "20 to 800 epochs)",
    )
    p.add_argument(
        "--config",
        metavar="CFG",
        help="settings file whose [model] section is the model spec (YAML or TOML)",
    )
    p.add_argument(
        "--drop-invalid",
        action="store_true",
        help="with --config: skip bad rows (counted per reason) instead of exiting 2",
    )
    p.add_argument(
        "--report-dir",
        metavar="DIR",
        help="with --config: where report.json and the PNGs go (default: beside --out)",
    )
    p.add_argument(
        "--topic",
        metavar="T",
        help="with --config, instead of --data: learn from topic T's retained history",
    )
    p.add_argument(
        "--until",
        metavar="TS|OFFSET",
        help="with --topic: stop at this time (ISO-8601, or epoch s/ms >= 1e9) or before "
        "this offset in every partition (an integer < 1e9)",
    )
    p.add_argument(
        "--bootstrap",
        metavar="HOST:PORT",
        help="with --topic: the broker (default: the settings' kafka.bootstrap_servers)",
    )
    p.add_argument(
        "--write-recipe-data",
        metavar="FILE",
        help="write the recipe's derived CSV (8 raw features + synthetic y) and exit",
    )
    p.add_argument("--likelihood", choices=("gaussian", "student-t"), default="gaussian")
    p.add_argument("--guide", choices=("meanfield", "lowrank"), default="meanfield")
    p.add_argument("--rank", type=int, default=10, help="low-rank guide rank (default 10)")
    p.add_argument("--prior", choices=("fan_in", "standard"), default="fan_in")
    p.add_argument("--prior-scale", type=float, default=1.0, help="c in N(0, c^2/fan_in)")
    p.add_argument("--init-scale", type=float, default=1e-3, help="initial posterior sd (1e-3)")
    p.add_argument("--noise-head", choices=("bounded", "softplus", "exp"), default="bounded")
    p.add_argument("--noise-max", type=float, default=None, help="bounded head's max (3 std(y))")
    p.add_argument("--df", type=float, default=None, help="fixed Student-t df (default: learned)")
    p.add_argument(
        "--fprior-weight",
        type=float,
        default=0.05,
        help="functional prior weight gamma (0: plain ELBO via models.svi.step)",
    )
    p.add_argument(
        "--fprior-scale", type=float, default=None, help="functional prior sd (2 std(y))"
    )
    p.add_argument("--samples", type=int, default=100, help="posterior samples for the bands")
    p.add_argument("--particles", type=int, default=1, help="likelihood samples per step (1)")
    p.add_argument(
        "--cov-factor-lr-scale",
        type=float,
        default=0.05,
        help="low-rank factor's step size relative to --lr (0.05)",
    )
    p.add_argument(
        "--from-net",
        metavar="PATH",
        help="start from a trained torch MLP (state_dict of an nn.Sequential, 8 inputs)",
    )
    p.add_argument(
        "--net-prior-scale", type=float, default=0.1, help="prior sd around the net's weights"
    )
    p.add_argument(
        "--log1p",
        type=_names,
        default=None,
        metavar="NAMES",
        help="recipe: raw columns to log(1 + x) before standardising (default "
        "AveRooms,AveBedrms,Population,AveOccup; 'none' for none)",
    )
    p.add_argument(
        "--out",
        default=None,
        help="recipe: directory for state, plot, metrics (fogline-out/warmstart); with "
        "--config: the state file (fogline-out/warmstart/state.safetensors)",
    )
    p.add_argument(
        "--alarm-batch-size",
        type=int,
        default=256,
        help="stream batch size the stored alarm reference is fitted for (default 256, "
        "stream.batch_size's default; a daemon with another one refits at start-up)",
    )
    p.add_argument(
        "--no-alarm-reference",
        action="store_true",
        help="do not store the holdout as the drift alarm's reference (the daemon then "
        "calibrates on its first drift.calibration_batches batches)",
    )
    p.set_defaults(func=_warmstart, spec_flag_defaults={d: p.get_default(d) for d in SPEC_FLAGS})

    c = sub.add_parser(
        "compare",
        help="Gaussian vs Student-t, mean-field vs low-rank outside the data",
        description="Runs the warm-start recipe for each likelihood x guide (reduced epochs) and "
        "prints RMSE in range, mean band width and predictive entropy outside it.",
    )
    _add_recipe_args(c, 60)
    c.set_defaults(func=_compare)


#: Recipe flags that a --config's [model] section owns (dest names).
SPEC_FLAGS: tuple[str, ...] = (
    "likelihood",
    "guide",
    "rank",
    "prior",
    "prior_scale",
    "init_scale",
    "noise_head",
    "noise_max",
    "df",
    "fprior_weight",
    "fprior_scale",
    "hidden",
    "from_net",
)


def _warmstart(args: argparse.Namespace) -> int:
    from fogline.cli.commands import fit as fit_cmd

    if args.write_recipe_data:
        return fit_cmd.write_recipe_data(args)
    if args.config:
        return fit_cmd.warmstart_config(args)
    if args.drop_invalid or args.report_dir or args.topic or args.until or args.bootstrap:
        print(
            "fogline warmstart: --drop-invalid, --report-dir, --topic, --until and --bootstrap "
            "need --config",
            file=sys.stderr,
        )
        return 2
    if args.epochs is None:
        args.epochs = 800
    if args.out is None:
        args.out = "fogline-out/warmstart"
    import torch

    from fogline.models.data import DataUnavailableError
    from fogline.models.warmstart import HEAVY_TAILED, WarmstartOptions, run, summary_lines

    torch.set_num_threads(args.threads)
    opts = WarmstartOptions(
        data=args.data,
        epochs=args.epochs,
        lr=args.lr,
        batch=args.batch,
        likelihood=args.likelihood,
        guide=args.guide,
        rank=args.rank,
        prior=args.prior,
        prior_scale=args.prior_scale,
        hidden=args.hidden,
        seed=args.seed,
        init_scale=args.init_scale,
        noise_head=args.noise_head,
        noise_max=args.noise_max,
        df=args.df,
        fprior_weight=args.fprior_weight,
        fprior_scale=args.fprior_scale,
        samples=args.samples,
        particles=args.particles,
        cov_factor_lr_scale=args.cov_factor_lr_scale,
        out=args.out,
        from_net=args.from_net,
        net_prior_scale=args.net_prior_scale,
        log1p_features=HEAVY_TAILED if args.log1p is None else args.log1p,
    )
    try:
        with _progress(args.epochs, args.quiet) as on_epoch:
            result = run(opts, on_epoch)
    except DataUnavailableError as exc:
        print(f"fogline warmstart: {exc}", file=sys.stderr)
        return 2
    m = result.metrics
    alarm = None if args.no_alarm_reference else _alarm_reference(result, opts, args)
    print(
        f"warm start ({opts.likelihood}, {opts.guide}, prior {opts.prior}) in {m['seconds']:.1f} s"
    )
    print("\n".join(summary_lines(m)))
    if alarm is not None:
        print(
            f"  alarm reference        {alarm['rows']} holdout records, threshold "
            f"{alarm['threshold']:.4f} for batches of {alarm['batch_size']}, ERT {alarm['ert']:g}"
        )
    if result.ood is not None:
        print("  epistemic sd outside the data, per feature (models/ood.py):")
        print("\n".join(f"  {row}" for row in result.ood.table()))
    for kind, path in result.files.items():
        print(f"  {kind:<8} {path}")
    if args.json:
        doc = {**m, "files": result.files}
        if result.ood is not None:
            doc["ood"] = result.ood.to_json()
        if alarm is not None:
            doc["alarm_reference"] = alarm
        print(json.dumps(doc, sort_keys=True))
    return 0


def _alarm_reference(
    result: WarmstartResult, opts: WarmstartOptions, args: argparse.Namespace
) -> dict[str, Any]:
    """Store the recipe's holdout as the drift alarm's reference window (docs/drift.md).

    The holdout is the recipe's own (same data, seed and split as the fit); the fit
    uses the drift settings' defaults and ``--alarm-batch-size``.  The state file is
    rewritten with it.
    """
    from fogline.drift.config import PolicyConfig
    from fogline.drift.history import alarm_summary, calibrate_from_history
    from fogline.models.data import load, recipe_data
    from fogline.models.serialize import save
    from fogline.models.warmstart import log1p_columns

    # the recipe's own holdout, in the inputs it was trained on (log1p columns included)
    table = log1p_columns(load(opts.data), opts.log1p_features)
    data = recipe_data(table, seed=opts.seed, held_out=opts.held_out)
    config = PolicyConfig()
    result.state = calibrate_from_history(
        result.state,
        data.x_held,
        data.y_held,
        config,
        batch_size=args.alarm_batch_size,
        seed=0,  # stream.seed's default: the daemon's reference ensemble
        source="recipe holdout",
    )
    if "state" in result.files:
        save(result.state, result.files["state"])
    return alarm_summary(result.state)


def _compare(args: argparse.Namespace) -> int:
    argv = [
        "--epochs",
        str(args.epochs),
        "--lr",
        str(args.lr),
        "--batch",
        str(args.batch),
        "--hidden",
        ",".join(str(h) for h in args.hidden),
        "--seed",
        str(args.seed),
        "--threads",
        str(args.threads),
    ]
    if args.data:
        argv += ["--data", args.data]
    if args.json:
        argv.append("--json")
    if args.quiet:
        argv.append("--quiet")
    return compare_main(argv)


class _progress:
    """A rich progress bar on stderr that shows the held-out loss; a no-op when quiet."""

    def __init__(self, epochs: int, quiet: bool) -> None:
        self.epochs = epochs
        self.quiet = quiet
        self._bar: Any = None
        self._task: Any = None

    def __enter__(self) -> Any:
        if self.quiet:
            return None
        from rich.console import Console
        from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

        self._bar = Progress(
            TextColumn("[bold]warm start"),
            BarColumn(),
            TextColumn("epoch {task.completed}/{task.total}"),
            TextColumn("{task.fields[status]}"),
            TimeRemainingColumn(),
            console=Console(stderr=True),
            transient=False,
        )
        self._bar.__enter__()
        self._task = self._bar.add_task("fit", total=self.epochs, status="")

        def on_epoch(epoch: int, record: dict[str, float]) -> None:
            self._bar.update(
                self._task,
                completed=epoch + 1,
                status=f"loss {record['loss']:.4f}  held-out NLPD {record['held_out_nlpd']:.4f}",
            )

        return on_epoch

    def __exit__(self, *exc: object) -> None:
        if self._bar is not None:
            self._bar.__exit__(None, None, None)


_COMPARE_DOC = """Gaussian vs Student-t, mean-field vs low-rank: the warm-start recipe outside the data.

``fogline bench compare [--epochs 60] [--data PATH] [--json]`` runs the recipe
(:mod:`fogline.models.warmstart`, all other settings at their defaults) for every
likelihood x guide pair and reports, per variant:

* ``rmse_in``: RMSE of the predictive mean to sin(3 x0) on held-out rows (|x0| <= 2),
* ``width_out``: mean 95 % band width at 3 <= |x0| <= 5,
* ``entropy_out``: mean predictive (mixture) differential entropy there, nats
  (Monte Carlo, see :func:`fogline.models.warmstart.predictive_entropy`),
* ``coverage_95_in`` / ``coverage_95_out``,

and the ratio of each to the baseline (Gaussian, mean-field) measured in the
same run.  Epochs are reduced (60 by default, the recipe uses 800); say so
when quoting the figures.
"""

VARIANTS: tuple[tuple[str, str], ...] = (
    ("gaussian", "meanfield"),
    ("student-t", "meanfield"),
    ("gaussian", "lowrank"),
    ("student-t", "lowrank"),
)
KEYS = ("rmse_in", "width_out", "entropy_out", "coverage_95_in", "coverage_95_out")


def compare_main(argv: list[str] | None = None) -> int:
    """``fogline compare`` / ``fogline bench compare``: see :mod:`fogline.bench.compare`."""
    ap = argparse.ArgumentParser(prog="fogline compare", description=_COMPARE_DOC)
    ap.add_argument("--data", metavar="PATH", help="raw cal_housing.csv (default: sklearn fetcher)")
    ap.add_argument("--epochs", type=int, default=60)
    ap.add_argument("--lr", type=float, default=5e-3)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--hidden", default="32,32")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--samples", type=int, default=100, help="posterior samples per variant")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args(argv)

    import torch

    from fogline.models.data import DataUnavailableError
    from fogline.models.warmstart import WarmstartOptions, run

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
            samples=args.samples,
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
