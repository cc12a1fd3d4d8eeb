"""The ``fogline`` command line: one entry point, one sub-command per job.

Each area of fogline registers its own sub-commands in a module under
:mod:`fogline.cli.commands`; this file only assembles them, so that the CLI is
wiring and nothing else.  Heavy imports (torch, pyro, kafka) happen inside the
command handlers, which keeps ``fogline --help`` fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

#: Modules that contribute sub-commands.  Each defines ``register(subparsers)``
#: and sets ``func`` (taking the parsed ``argparse.Namespace`` and returning an
#: exit code) as the default of every parser it adds.
COMMAND_MODULES: tuple[str, ...] = (
    "fogline.cli.commands.model",
    "fogline.cli.commands.stream",
    "fogline.cli.commands.replay",
    "fogline.cli.commands.config",
    "fogline.cli.commands.snapshot",
    "fogline.cli.commands.drift",
    "fogline.cli.commands.query",
    "fogline.cli.commands.bench",
)


def build_parser() -> argparse.ArgumentParser:
    """Build the full parser from every registered command module."""
    parser = argparse.ArgumentParser(
        prog="fogline",
        description="Streaming posterior-update daemon: a Bayesian neural network kept "
        "current from a Kafka topic, with drift detection and a query service.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Parse ``argv`` and run the chosen sub-command; return its exit code."""
    parser = build_parser()
    args = parser.parse_args(list(argv) if argv is not None else None)
    func = getattr(args, "func", None)
    if func is None:
        parser.print_help()
        return 2
    from fogline.daemon.config import ConfigError

    try:
        return int(func(args) or 0)
    except ConfigError as exc:
        # Any entry point: a settings problem (bad value, broken JSON in a
        # FOGLINE_* variable, a CLI override out of range) is a usage error.
        print(f"fogline: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
