"""Evaluation: accuracy with intervals, per-class results, cost (params, MACs, size,
latency, throughput), and the human-readable report."""
