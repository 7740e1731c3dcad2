"""Benchmarks of attribution methods on a finished run: ``pbrf evaluate``, ``pbrf estimators``."""
