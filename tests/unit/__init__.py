"""Tests of one part of the library at a time, in process (see tests/__init__.py)."""
