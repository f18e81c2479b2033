"""The four scenarios of the source material (target data small or large x source similar or
different), each an experiment preset, run strategy by strategy and compared in one report
(`transferkit scenarios`, see runner.py)."""
