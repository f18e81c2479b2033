"""Pipeline stages. Each module has `run(cfg, out_dir)`; the logic lives in the library
packages (data, models, training, evaluation) so tests can call it directly."""

STAGES = ("prepare", "pretrain", "transfer", "probe", "scratch", "freeze_curve", "distill", "student", "prune", "evaluate")
