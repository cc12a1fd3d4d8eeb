"""``fogline bench compare``: the same run as ``fogline compare`` (see its ``--help``)."""

from __future__ import annotations


def main(argv: list[str] | None = None) -> int:
    """Run the comparison (shared with ``fogline compare``); ``--json``: one JSON line last."""
    from fogline.cli.commands.model import compare_main

    return compare_main(argv)
