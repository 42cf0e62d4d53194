"""The package version, in one place: the package, ``hdkd-fast info`` and pyproject.toml (dynamic) read it."""

__version__ = "0.1.0"
