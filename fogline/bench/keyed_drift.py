"""``fogline bench keyed_drift``: 1 key of 50 shifts; its detection delay, the others' false alarms.

The experiment is :mod:`fogline.drift.keyed_experiment` (see its docstring for
the setup and the figures); ``--json`` prints one JSON object on the last
line.  Exit status 1 when the shifted key is not detected within 5 of its
own batches or the other keys raise more false alarms than the ERT allows.
"""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``fogline bench keyed_drift``."""
    from fogline.drift.keyed_experiment import main as experiment_main

    return experiment_main(argv)


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
