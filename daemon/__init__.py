"""The daemon: streaming updates (``stream/``), the query service (``query/``) and their shared settings, logs and metrics."""
