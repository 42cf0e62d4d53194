"""Tests of whole commands and processes: the CLI, training runs, install, scripts (see tests/__init__.py)."""
