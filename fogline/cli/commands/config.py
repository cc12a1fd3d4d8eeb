"""``fogline config show|validate``: inspect the effective settings.

Exit codes: 0 fine, 2 invalid configuration (one line per offending field).
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any


def register(sub: argparse._SubParsersAction[Any]) -> None:
    """Add ``config show`` and ``config validate`` to the fogline parser."""
    parser = sub.add_parser("config", help="show or validate the effective settings")
    parser.set_defaults(func=lambda _args: _usage(parser))
    csub = parser.add_subparsers(dest="config_command", metavar="ACTION")

    show = csub.add_parser(
        "show", help="print the effective settings (file + FOGLINE_* env), secrets masked"
    )
    show.add_argument("--config", metavar="PATH", help="YAML or TOML settings file")
    show.add_argument("--json", action="store_true", help="print JSON instead of YAML")
    show.set_defaults(func=_show)

    validate = csub.add_parser("validate", help="check a settings file (with FOGLINE_* env)")
    validate.add_argument(
        "--config", metavar="PATH", required=True, help="YAML or TOML settings file"
    )
    validate.set_defaults(func=_validate)


def _usage(parser: argparse.ArgumentParser) -> int:
    parser.print_help(sys.stderr)
    return 2


def _show(args: argparse.Namespace) -> int:
    import yaml

    from fogline.daemon.config import load_or_exit

    data = load_or_exit(args.config).masked()
    if args.json:
        print(json.dumps(data, indent=2))
    else:
        print(yaml.safe_dump(data, sort_keys=False), end="")
    return 0


def _validate(args: argparse.Namespace) -> int:
    from fogline.daemon.config import load_or_exit

    settings = load_or_exit(args.config)
    print(f"{args.config}: ok (model {settings.model_name!r})")
    return 0
