"""Sweeps: Hydra multiruns checked before they launch, resumable point by point, and
collected into one table and plot (`transferkit collect`)."""
