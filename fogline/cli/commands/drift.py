"""``fogline experiment`` and ``fogline replay-data generate``: the drift area's commands."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any


def _generate(args: argparse.Namespace) -> int:
    from fogline.replay_data.generator import generate, write_jsonl

    stream = generate(
        args.scenario, seed=args.seed, n_batches=args.batches, batch_size=args.batch_size
    )
    n = write_jsonl(stream, args.out, decimals=args.decimals)
    meta = {**stream.meta(), "file": str(args.out), "records_written": n}
    print(json.dumps(meta), file=sys.stdout)
    return 0


def _experiment(args: argparse.Namespace) -> int:
    from fogline.drift.experiment import main_from_args

    args.spec = None
    if args.config is not None:
        from fogline.daemon.config import load_or_exit

        args.spec = load_or_exit(args.config).model
        if args.spec is None:
            print(f"fogline experiment: {args.config} has no [model] section", file=sys.stderr)
            return 2
    return main_from_args(args)


def register(sub: argparse._SubParsersAction[Any]) -> None:
    """Add ``fogline replay-data generate`` and ``fogline experiment``."""
    from fogline.replay_data.generator import SCENARIOS

    rd = sub.add_parser("replay-data", help="synthetic streams with known change points")
    rd_sub = rd.add_subparsers(dest="replay_data_command", metavar="ACTION")
    gen = rd_sub.add_parser(
        "generate",
        help="write a seeded scenario as fogline JSONL",
        description="\n".join(f"  {k:<10} {v}" for k, v in SCENARIOS.items()),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    gen.add_argument("scenario", choices=sorted(SCENARIOS))
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--batches", type=int, default=300, help="number of batches (default 300)")
    gen.add_argument("--batch-size", type=int, default=64, help="records per batch (default 64)")
    gen.add_argument("--decimals", type=int, default=4, help="decimal places written (default 4)")
    gen.add_argument("--out", required=True, help="output JSONL file")
    gen.set_defaults(func=_generate)
    rd.set_defaults(func=lambda a: (rd.print_help(), 2)[1])

    ex = sub.add_parser(
        "experiment",
        help="offline drift experiment: compare adaptation policies on a scenario or file",
        description="Runs the same step/monitor/policy code as the daemon on a generated "
        "scenario, a fogline JSONL file or a NAB CSV, and prints per-policy metrics.",
    )
    ex.add_argument(
        "source", help=f"scenario ({', '.join(sorted(SCENARIOS))}) or a .jsonl/.csv file"
    )
    ex.add_argument("--policies", default="none,reset,forget,vb")
    ex.add_argument("--seed", type=int, default=0)
    ex.add_argument("--batches", type=int, default=None, help="batches of the generated stream")
    ex.add_argument("--batch-size", type=int, default=None)
    ex.add_argument("--ert", type=float, default=None, help="target ERT in batches (default 1000)")
    ex.add_argument(
        "--restarts",
        type=int,
        default=None,
        help="warm-start restarts (default 1), the best by held-out log predictive density",
    )
    ex.add_argument("--json", action="store_true", help="print one JSON object last")
    ex.add_argument("--out", default=None, help="directory for the PNG timelines")
    ex.add_argument("--nab-out", default=None, help="write NAB results CSVs here (NAB input)")
    ex.add_argument("--no-progress", action="store_true", help="no progress bar")
    ex.add_argument(
        "--config",
        type=Path,
        default=None,
        help="settings whose [model] section names the file's columns (CSV/JSONL/Parquet)",
    )
    ex.set_defaults(func=_experiment)
