"""Training: the Lightning module, freezing / discriminative learning rates, and the
Trainer built from the `trainer` config group."""

import os
from collections.abc import Sequence

RESUME_CHECKPOINT = "last.ckpt"  # what an interrupted fit resumes from (trainer.py)
LOGGERS = ("dvclive", "tensorboard", "csv")  # trainer.loggers: any of these (trainer.py builds them)


# What launchers set to a process's rank: Lightning's own (LOCAL_RANK beside the NODE_RANK a user gives each
# node), torchrun (RANK, GROUP_RANK), SLURM (SLURM_PROCID), LSF's jsrun (JSM_NAMESPACE_RANK)
RANK_VARIABLES = ("RANK", "LOCAL_RANK", "NODE_RANK", "GROUP_RANK", "SLURM_PROCID", "JSM_NAMESPACE_RANK")


def first_process() -> bool:
    """Global rank 0 (or a run without DDP), from the environment, before a Trainer exists and without
    importing Lightning: a node's first process is rank 0 only on node 0."""
    return all(os.environ.get(var, "0") == "0" for var in RANK_VARIABLES)


def other_node() -> str | None:
    """The node number of the first process on a node other than node 0 (as NODE_RANK, torchrun's GROUP_RANK or
    srun's SLURM_NODEID give it), else None: what it meets, a path that node lacks, rank 0 may never meet."""
    if any(os.environ.get(var, "0") != "0" for var in ("LOCAL_RANK", "SLURM_LOCALID", "JSM_NAMESPACE_LOCAL_RANK")):
        return None
    return next((n for var in ("NODE_RANK", "GROUP_RANK", "SLURM_NODEID") if (n := os.environ.get(var, "0")) != "0"),
                None)


def multi_process(trainer) -> bool:
    """Whether the `trainer` config runs several processes: a DDP strategy, or several devices or
    nodes, which Lightning runs as DDP under strategy auto too."""
    if str(trainer.strategy) not in ("auto", "single_device", "None"):
        return True
    return int(trainer.get("num_nodes") or 1) > 1 or device_count(trainer) > 1


def device_count(trainer) -> int:
    """The devices per node Lightning trains on: a count, a list or "0,1" of ids, or -1 / auto
    (every visible GPU; one process on a CPU)."""
    devices = trainer.devices
    if isinstance(devices, Sequence) and not isinstance(devices, str):
        return len(devices)
    text = str(devices).strip()
    if text in ("auto", "-1"):
        from transferkit.training.precision import uses_cuda

        if not uses_cuda(str(trainer.get("accelerator", "auto"))):
            return 1
        import torch

        return torch.cuda.device_count()
    return len([i for i in text.split(",") if i.strip()]) if "," in text else int(text)
