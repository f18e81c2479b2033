"""The four scenarios of the source material (target data small or large x source similar or
different): experiment presets run as one DVC pipeline of stages and compared in one report
(`transferkit scenarios`, report.py)."""
