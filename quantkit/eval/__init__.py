"""Benchmarks, result tables and side-by-side comparisons with peer tools (llama.cpp, the anchors'
protocol).  Each module runs as ``python -m quantkit.eval.NAME`` and writes its results into the
repository's top-level ``eval/`` folder; the text they evaluate on ships in :mod:`quantkit.data`."""
