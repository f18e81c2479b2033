"""Training: the Lightning module, freezing / discriminative learning rates, and the
Trainer built from the `trainer` config group."""

RESUME_CHECKPOINT = "last.ckpt"  # what an interrupted fit resumes from (trainer.py)
LOGGERS = ("dvclive", "tensorboard", "csv")  # trainer.loggers: any of these (trainer.py builds them)


def multi_process(trainer) -> bool:
    """Whether the `trainer` config runs several processes (DDP and its kin)."""
    return str(trainer.strategy) not in ("auto", "single_device", "None")
