"""Training: the Lightning module, freezing / discriminative learning rates, and the
Trainer built from the `trainer` config group."""

RESUME_CHECKPOINT = "last.ckpt"  # what an interrupted fit resumes from (trainer.py)
LOGGERS = ("dvclive", "tensorboard", "csv")  # trainer.loggers: any of these (trainer.py builds them)
