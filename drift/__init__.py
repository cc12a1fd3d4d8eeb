"""fogline package."""
