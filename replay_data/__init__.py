"""Shipped replay streams with known change points, and the generator that makes them."""
