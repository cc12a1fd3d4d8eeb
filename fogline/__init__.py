"""fogline: a streaming posterior-update daemon.

One import name for the whole distribution.  The folders the product's design
fixes at the repository root are mapped into it by ``pyproject.toml``
(``[tool.setuptools.package-dir]``):

=====================  =================  =========================================
import name            folder             owns
=====================  =================  =========================================
``fogline.models``     ``models/``        the BNN, its posterior state and the SVI step
``fogline.drift``      ``drift/``         drift signals, monitors, policies, experiments
``fogline.daemon``     ``daemon/``        streaming (``stream/``) and query (``query/``)
``fogline.replay_data`` ``replay_data/``  shipped replay streams and their generator
``fogline.bench``      ``fogline/bench/`` benchmarks behind ``fogline bench``
``fogline.cli``        ``fogline/cli/``   the ``fogline`` command line
=====================  =================  =========================================

Imports point one way: models <- drift <- daemon <- bench <- cli.
"""

__version__ = "0.1.0"
