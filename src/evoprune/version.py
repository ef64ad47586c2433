"""The package version (read by ``pyproject.toml`` and written into exports and run records)."""
__version__ = "0.1.0"
