"""``fogline`` sub-commands of this area (filled in by its owner)."""

from __future__ import annotations

import argparse
from typing import Any


def register(sub: argparse._SubParsersAction[Any]) -> None:
    """Add this area's sub-commands to the fogline parser."""
