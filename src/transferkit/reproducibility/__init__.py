"""`transferkit check-repro`: prove in CI that the pipeline gives the same numbers every time
(see check.py). Nothing is imported here, so `python -m transferkit.reproducibility.check`
loads check.py once, as __main__."""
