"""Benchmarks and side-by-side comparisons (installed as ``quantkit.eval``), plus the small
evaluation/calibration texts quantkit ships in ``data/`` (see data/README.md)."""
