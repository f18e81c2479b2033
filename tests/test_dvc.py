"""The DVC pipeline as users run it: `dvc repro` on the smoke experiment in a fresh copy of
the project, then a second `dvc repro` that does nothing, a clean `dvc status`, and
`dvc metrics show` / `dvc plots show` reading what the stages declared."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from conftest import ROOT
from transferkit.reproducibility.check import child_env, copy_project


def _sh(cmd: list[str], cwd: Path, timeout=600) -> str:
    # the environment check-repro gives its commands: this venv's transferkit and dvc first on PATH
    proc = subprocess.run(cmd, cwd=cwd, env=child_env(), capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout + proc.stderr


@pytest.mark.slow
def test_dvc_repro_twice_is_a_no_op_and_status_is_clean(tmp_path):
    # a fresh clone: code and conf/, params.yaml for the smoke experiment, data/ tracked, one commit
    proj = copy_project(ROOT, tmp_path / "proj", "smoke")

    first = _sh(["dvc", "repro"], proj)
    from transferkit.stages import STAGES

    for stage in STAGES:
        assert f"Running stage '{stage}'" in first
    second = _sh(["dvc", "repro"], proj)
    assert "Running stage" not in second
    assert "up to date" in _sh(["dvc", "status"], proj)

    metrics = _sh(["dvc", "metrics", "show"], proj)
    assert "artifacts/evaluate/metrics.json" in metrics and "models.transfer.top1" in metrics
    _sh(["dvc", "plots", "show", "--out", str(tmp_path / "plots")], proj)
    assert (tmp_path / "plots" / "index.html").exists()

    # a changed parameter reruns only the stages that depend on it
    text = (proj / "params.yaml").read_text().replace("tta: flip", "tta: none")
    (proj / "params.yaml").write_text(text)
    third = _sh(["dvc", "repro"], proj)
    assert "Running stage 'evaluate'" in third and "Running stage 'pretrain'" not in third


# Imported by stages but unable to change what a stage writes: error messages, progress bars,
# value checks that only refuse, package docstrings, and the command line that reads
# params.yaml (itself tracked through `params:`). Anything else a stage imports must be a dep,
# or editing it would leave `dvc repro` reusing stale outputs.
OUTPUT_NEUTRAL = {"__init__.py", "errors.py", "progress.py", "cli.py", "config/__init__.py", "config/compose.py",
                  "config/validate.py", "data/__init__.py", "evaluation/__init__.py", "stages/__init__.py",
                  "training/__init__.py", "deploy/__init__.py", "prune/__init__.py"}
STAGE_MODULES = {"export": "transferkit/deploy/export.py"}  # the rest: transferkit/stages/<stage>.py


def _imported_files(start: Path, src: Path) -> set[str]:
    """Every transferkit source file `start` imports, directly or not, top-level or inside
    functions (read from the source, so lazy imports count too)."""
    import ast

    seen, todo = set(), [start]
    while todo:
        path = todo.pop()
        rel = path.relative_to(src / "transferkit").as_posix()
        if rel in seen:
            continue
        seen.add(rel)
        if rel in OUTPUT_NEUTRAL:  # what a neutral module imports serves its messages and checks
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("transferkit"):
                names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names if a.name.startswith("transferkit")]
            for name in names:
                base = src / Path(*name.split("."))
                parts = base.relative_to(src).parts
                for i in range(1, len(parts) + 1):  # a package import runs every __init__ on the way
                    init = src.joinpath(*parts[:i]) / "__init__.py"
                    if init.exists():
                        todo.append(init)
                if base.with_suffix(".py").exists():
                    todo.append(base.with_suffix(".py"))
    return seen


def test_every_stage_depends_on_the_code_it_imports():
    import yaml

    src = ROOT / "src"
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    gaps = {}
    for name, stage in stages.items():
        module = src / STAGE_MODULES.get(name, f"transferkit/stages/{name}.py")
        deps = [d.removeprefix("src/transferkit/").rstrip("/") for d in stage["deps"] if d.startswith("src/")]
        missing = sorted(f for f in _imported_files(module, src) - OUTPUT_NEUTRAL
                         if not any(f == d or f.startswith(d + "/") for d in deps))
        if missing:
            gaps[name] = missing
    assert not gaps, f"dvc.yaml: stages import code they do not list as deps: {gaps}"
