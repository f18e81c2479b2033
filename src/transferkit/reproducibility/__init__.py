"""`transferkit check-repro`: prove in CI that the pipeline gives the same numbers every time
(check.py; docs/pipeline.md). Nothing is imported here, so `python -m transferkit.reproducibility.check`
loads check.py once, as __main__."""
