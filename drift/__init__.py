"""Drift: signals of how far new data moves from the posterior, monitors, policies and experiments."""
