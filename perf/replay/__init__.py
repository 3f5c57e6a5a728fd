"""Offline replay of request traces against a running server: `tessera replay`.

trace.py reads and prepares a trace (timing, lengths, shared prefixes), client.py sends it
on time, metrics.py computes vLLM's serving-benchmark figures, report.py writes JSON,
Markdown and PNG, compare.py decides whether a run regressed against a baseline.
"""
