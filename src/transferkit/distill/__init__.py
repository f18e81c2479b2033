"""Distillation: a small student learns from a frozen teacher's soft targets."""
