"""Sub-command modules of the ``fogline`` CLI (see :mod:`fogline.cli`)."""
