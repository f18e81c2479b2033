"""Training: the Lightning module, freezing / discriminative learning rates, and the
Trainer built from the `trainer` config group."""
