"""Evaluation: accuracy with intervals, per-class results, cost (params, MACs, size,
latency, throughput), and the human-readable report."""

# The settings runs.score scores a run with (collect, the scenarios): what a sweep point's or a strategy's DVC stage
# tracks of evaluate besides its own settings, so that changing evaluate's timings retrains nothing.
SCORED_WITH = ("evaluate.batch_size", "evaluate.tta")
