"""Scaling out through existing engines, no code change: Hydra launchers (joblib for parallel
points on one machine, submitit for SLURM clusters; conf/hydra/launcher/) and a multi-node DDP
trainer (conf/trainer/ddp_multinode.yaml).

What runs here for real: a sweep through the joblib launcher in parallel processes, a sweep
through submitit's local executor (the same pickling and job machinery as on SLURM, minus
sbatch), and a 2-node DDP run with the ranks set the way srun and torchrun set them. What
cannot run here (no SLURM): submission; the sbatch script the slurm preset produces is checked
instead."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from omegaconf import OmegaConf

from conftest import CONF, cli, compose, made_once, one_error_line, outside, run
from transferkit.config.compose import params_text, to_params
from transferkit.config.checks import validate


def hydra_compose(*overrides: str):
    """conf/ composed with the `hydra` node kept (where hydra/launcher=... lands)."""
    from hydra import compose as _compose
    from hydra import initialize_config_dir

    with initialize_config_dir(str(CONF.resolve()), version_base="1.3"):
        return _compose("config", overrides=list(overrides), return_hydra_config=True)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """prepare + pretrain of the smoke experiment: the inputs every point reads."""
    def make(tmp):
        cfg = compose("experiment=smoke", "trainer.progress_bar=false", tmp=tmp)
        run("prepare", cfg)
        run("pretrain", cfg)

    return made_once(tmp_path_factory, "launchers", make)


# ------------------------------------------------------------------ configs compose
def test_local_parallel_preset_is_joblib_with_our_settings():
    launcher = hydra_compose("hydra/launcher=local_parallel").hydra.launcher
    assert launcher._target_.endswith("JoblibLauncher")
    assert launcher.n_jobs == 2 and launcher.prefer == "processes"
    # everything else of Hydra's preset is still there and can be overridden
    assert hydra_compose("hydra/launcher=local_parallel", "hydra.launcher.n_jobs=4").hydra.launcher.n_jobs == 4


@pytest.mark.parametrize("trainer, nodes, tasks", [("cpu", 1, 1), ("gpu", 1, 1), ("ddp", 1, 2),
                                                   ("ddp_multinode", 2, 4)])
def test_slurm_preset_follows_the_trainer(trainer, nodes, tasks):
    cfg = hydra_compose("hydra/launcher=slurm", f"trainer={trainer}")
    launcher = OmegaConf.to_container(cfg.hydra.launcher, resolve=True)
    assert launcher["_target_"].endswith("SlurmLauncher")
    # one SLURM task per device: Lightning refuses to start when the two differ
    assert (launcher["nodes"], launcher["tasks_per_node"], launcher["gpus_per_node"]) == (nodes, tasks, tasks)
    assert launcher["timeout_min"] == 60 and launcher["array_parallelism"] == 16
    assert launcher["partition"] is None and launcher["max_num_timeout"] == 0


def test_launchers_do_not_change_what_a_stage_computes():
    # the launcher lives under hydra.*: params.yaml and a point's saved params are the same
    plain = to_params(compose())
    for launcher in ("local_parallel", "slurm", "submitit_local"):
        assert to_params(compose(f"hydra/launcher={launcher}")) == plain


def test_slurm_preset_makes_the_expected_sbatch_script(monkeypatch, tmp_path):
    """What hydra-submitit-launcher hands to sbatch for a 2-node DDP sweep of 5 points,
    built by submitit itself (its 'srun' probe is faked: there is no SLURM here)."""
    import submitit
    from hydra.utils import instantiate
    from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf

    cfg = hydra_compose("hydra/launcher=slurm", "trainer=ddp_multinode", "hydra.launcher.partition=gpu",
                        f"hydra.sweep.dir={tmp_path}", "hydra.launcher.setup=[module load cuda]")
    launcher = instantiate(cfg.hydra.launcher)
    # the same translation SlurmLauncher.launch does (params -> AutoExecutor), without submitting
    monkeypatch.setattr(submitit.slurm.slurm.SlurmExecutor, "affinity", classmethod(lambda cls: 2))
    params = dict(launcher.params)
    executor = submitit.AutoExecutor(folder=params.pop("submitit_folder"), cluster="slurm",
                                     slurm_max_num_timeout=params.pop("max_num_timeout"))
    shared = set(OmegaConf.structured(BaseQueueConf).keys())
    executor.update_parameters(**{k if k in shared else f"slurm_{k}": v for k, v in params.items()})
    slurm = executor._executor
    slurm.parameters["map_count"] = 5  # what map_array sets for a 5-point sweep
    script = slurm._make_submission_file_text("python -u -m submitit.core._submit FOLDER", "uid")
    sbatch = dict(re.findall(r"#SBATCH --([\w-]+)=(\S+)", script))
    assert sbatch["nodes"] == "2" and sbatch["ntasks-per-node"] == "4" and sbatch["gpus-per-node"] == "4"
    assert sbatch["partition"] == "gpu" and sbatch["time"] == "60" and sbatch["cpus-per-task"] == "8"
    assert sbatch["array"] == "0-4%5" and sbatch["mem"] == "32GB"
    assert "module load cuda" in script and "srun" in script


def test_a_launcher_that_cannot_run_the_sweep_is_one_line_before_any_folder(tmp_path):
    """Without Slurm's tools, submitit's "Could not detect srun" came as a traceback once the sweep started; so
    did joblib's "n_jobs == 0 in Parallel has no meaning"."""
    bin_dir = tmp_path / "bin"  # srun alone on PATH, whatever this machine has
    bin_dir.mkdir()
    (bin_dir / "srun").write_text("#!/bin/sh\n")
    (bin_dir / "srun").chmod(0o755)
    sweep = [*outside(tmp_path), f"hydra.sweep.dir={tmp_path / 'sweep'}", "seed=0,1"]
    line = one_error_line(cli("transfer", "-m", "experiment=smoke", "hydra/launcher=slurm", *sweep,
                              env={"PATH": str(bin_dir)}))
    assert "hydra/launcher=slurm submits each point with Slurm's sbatch and srun, and this machine has no " \
           "sbatch. Fix: run it on a Slurm cluster's login node" in line, line
    line = one_error_line(cli("transfer", "-m", "experiment=smoke", "hydra/launcher=local_parallel",
                              "hydra.launcher.n_jobs=0", *sweep))
    assert "hydra.launcher.n_jobs=0 runs no point at a time. Fix: set it to a count >= 1" in line, line
    assert not (tmp_path / "sweep").exists() and not (tmp_path / "artifacts").exists()


def test_multinode_trainer_composes_and_validates():
    cfg = compose("trainer=ddp_multinode")
    validate(cfg)
    t = cfg.trainer
    assert (t.accelerator, t.devices, t.num_nodes, t.strategy) == ("gpu", 4, 2, "ddp")
    # the same keys as every other trainer preset: params.yaml and overrides work the same
    assert set(t) == set(compose("trainer=ddp").trainer)
    # a sweep through SLURM with it is checked up front like any other
    from transferkit.sweep.points import check_points

    assert len(check_points("transfer", ["hydra/launcher=slurm", "trainer=ddp_multinode",
                                          "transfer.freeze_depth=0,1"])) == 2


# ------------------------------------------------------------------ launchers run
def _sweep(base, sweep, *overrides, env=None):
    proc = cli("transfer", "-m", "experiment=smoke", f"paths.artifacts_dir={base / 'artifacts'}",
               f"hydra.sweep.dir={sweep}", "trainer.progress_bar=false", "transfer.freeze_depth=0,1",
               *overrides, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for depth in (0, 1):
        out = sweep / f"transfer.freeze_depth={depth}" / "transfer"
        assert (out / "model.pt").exists() and (out / "metrics.json").exists()
        assert yaml.safe_load((out / "params.yaml").read_text())["transfer"]["freeze_depth"] == depth
    assert not (base / "artifacts" / "transfer").exists()  # inputs, never overwritten by a sweep
    return proc


@pytest.mark.slow
def test_joblib_launcher_runs_the_points_in_parallel_processes(base, tmp_path):
    """The task function is a closure inside cli._hydra_mode; loky pickles it with cloudpickle.
    Each point waits at its start for the other (tests/rendezvous.py): the sweep finishes only
    if the two ran at the same time."""
    sweep, met = tmp_path / "sweep", tmp_path / "rendezvous"
    proc = _sweep(base, sweep, "hydra/launcher=local_parallel", "hydra.launcher.n_jobs=2",
                  "+hydra.callbacks.rendezvous._target_=rendezvous.Rendezvous",
                  f"+hydra.callbacks.rendezvous.folder={met}",
                  env={"PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")])})
    assert "Joblib.Parallel(n_jobs=2" in proc.stdout + proc.stderr
    # two processes (a thread pool would share one pid), each of which saw the other start
    notes = {f.name: f.read_text() for f in met.iterdir()}
    assert len(notes) == 2 and set(notes.values()) == {"met"}, notes


@pytest.mark.slow
def test_submitit_launcher_runs_the_points_as_jobs(base, tmp_path):
    """submitit's local executor: the jobs are pickled, submitted and run in their own
    processes exactly as on SLURM (same launcher class, same pickles), only without sbatch."""
    sweep = tmp_path / "sweep"
    _sweep(base, sweep, "hydra/launcher=submitit_local", "hydra.launcher.timeout_min=10")
    jobs = [p for p in (sweep / ".submitit").iterdir() if p.name.isdigit()]
    assert len(jobs) == 2
    for job in jobs:
        assert list(job.glob("*_result.pkl")) and list(job.glob("*_log.out"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.parametrize("launch", ["slurm", "torchrun"])
def test_multinode_ddp_two_nodes(base, tmp_path, launch):
    """trainer=ddp_multinode across 2 "nodes" of 1 CPU process each, started the way a
    cluster starts them: with srun's environment (Lightning's SLURMEnvironment) or with
    torchrun --nnodes=2 (TorchElasticEnvironment). Only the device type is changed."""
    cfg = compose("experiment=smoke", "trainer=ddp_multinode", "trainer.accelerator=cpu", "trainer.devices=1",
                  "trainer.num_threads=1", tmp=base)
    validate(cfg)
    params = tmp_path / "params.yaml"
    params.write_text(params_text(cfg))
    out = tmp_path / "out" / "transfer"
    stage = ["-m", "transferkit.cli", "transfer", "--params", str(params), "--out", str(out)]
    port = _free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    for var in [v for v in env if v.startswith(("SLURM_", "TORCHELASTIC_"))] + ["RANK", "LOCAL_RANK", "WORLD_SIZE"]:
        env.pop(var, None)
    procs = []
    for node in (0, 1):
        if launch == "slurm":  # what srun sets in each task of `sbatch --nodes=2 --ntasks-per-node=1`
            node_env = {**env, "SLURM_NTASKS": "2", "SLURM_NTASKS_PER_NODE": "1", "SLURM_PROCID": str(node),
                        "SLURM_LOCALID": "0", "SLURM_NODEID": str(node), "SLURM_NODELIST": "localhost",
                        "SLURM_JOB_ID": "4242", "SLURM_JOB_NAME": "transferkit", "MASTER_PORT": str(port)}
            cmd = [sys.executable, *stage]
        else:
            node_env = env
            cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc-per-node=1",
                   f"--node-rank={node}", "--master-addr=127.0.0.1", f"--master-port={port}", *stage]
        procs.append(subprocess.Popen(cmd, cwd=tmp_path, env=node_env, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True))
    logs = []
    try:
        for p in procs:
            logs.append(p.communicate(timeout=300)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, log in zip(procs, logs):
        assert p.returncode == 0, log[-3000:]
    assert "GLOBAL_RANK: 0, MEMBER: 1/2" in logs[0] and "GLOBAL_RANK: 1, MEMBER: 2/2" in logs[1]
    if launch == "slurm":
        assert "SLURM auto-requeueing enabled" in logs[0]  # Lightning took the SLURM path
    assert (out / "model.pt").exists() and (out / "metrics.json").exists()
    assert yaml.safe_load((out / "params.yaml").read_text())["trainer"]["num_nodes"] == 2
    assert not (out.parent / ".transfer.incomplete").exists()


@pytest.mark.parametrize("rank", [{"RANK": "1"}, {"SLURM_PROCID": "1"}])
def test_a_stage_that_trains_nothing_runs_once_under_a_launcher(tmp_path, rank):
    """srun or torchrun starts the command on every rank: prepare (or export, quantize, evaluate) runs on rank 0
    alone, not once more in each other rank, into rank 0's work folder."""
    params = tmp_path / "params.yaml"
    params.write_text(params_text(compose("experiment=smoke", tmp=tmp_path)))
    proc = cli("prepare", "--params", str(params), "--out", str(tmp_path / "other"), cwd=tmp_path, env=rank)
    assert proc.returncode == 0 and proc.stderr == "" and list(tmp_path.iterdir()) == [params]
    assert cli("prepare", "--params", str(params), "--out", str(tmp_path / "first"), cwd=tmp_path).returncode == 0
    assert (tmp_path / "first" / "target.pt").exists()


@pytest.mark.parametrize("env, line", [({"NODE_RANK": "1"}, "transferkit transfer (node 1): error: prepared"),
                                       ({"SLURM_PROCID": "3", "SLURM_LOCALID": "0", "SLURM_NODEID": "1"},
                                        "(node 1): error:"),
                                       ({"LOCAL_RANK": "1"}, None), ({"GROUP_RANK": "1", "LOCAL_RANK": "1"}, None)])
def test_an_error_on_another_node_is_printed_there(tmp_path, env, line):
    """A node that lacks an input fails alone while node 0 waits for it: its first process says why, in one line
    naming the node; the other processes of a node leave it to that node's first."""
    params = tmp_path / "params.yaml"
    params.write_text(params_text(compose("experiment=smoke", tmp=tmp_path)))
    proc = cli("transfer", "--params", str(params), cwd=tmp_path, env=env)
    if line:
        assert line in one_error_line(proc)
    else:
        assert proc.returncode == 2 and proc.stderr == ""
