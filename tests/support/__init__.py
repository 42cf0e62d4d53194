"""Helpers shared by the tests and scripts/gpu_check.py: the float64 loop reference, data-file writers,
CLI helpers and the GPU check cases. Not tests (no ``test_`` prefix); see tests/__init__.py."""
