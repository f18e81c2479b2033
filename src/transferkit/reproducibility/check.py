"""`transferkit check-repro`: the project's reproducibility promise, checked the way a user's
CI runs it.

    transferkit check-repro [--target STAGE] [--keep DIR] [--experiment NAME]

1. params.yaml equals the composition of conf/. `dvc repro` reads params.yaml and never
   composes, so a conf/ edit without `transferkit params` silently runs other settings than
   conf/ says.
2. Twice, each in a fresh copy of the project (git and DVC initialised, data/ tracked, one
   commit, no artifacts, no cache): `dvc repro [STAGE]`; then, in the same copy, a second
   `dvc repro` must run nothing and `dvc status` must be clean. A stage that reruns means
   something it depends on changes under DVC's feet, so DVC's caching cannot be trusted.
3. Every metrics.json and every model.pt under artifacts/ is byte-identical in the two
   copies. metrics.json holds only numbers that must not vary (timings go to timing.json),
   and a checkpoint holds only weights and settings, so any difference is unseeded
   randomness or a nondeterministic operation.

Prints one PASS/FAIL line per check and a summary; exits 0 when all pass, 1 otherwise
(2 for a usage error, as argparse reports it).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import yaml

from transferkit.config.compose import compose, find_conf_dir, params_drift, params_text, to_params
from transferkit.errors import TransferkitError

# What a clone of the project holds that `dvc repro` needs (data/ and params.yaml are made
# per copy; artifacts/, outputs and caches are left behind on purpose: the runs start clean).
PROJECT_ITEMS = ("conf", "src", "dvc.yaml", ".dvcignore")
RUNS = ("run1", "run2")
TAIL_LINES = 25
SHOWN_KEYS = 5


class CommandFailed(Exception):
    """A subprocess failed: `what` says which and how, `output` is the tail of what it printed."""

    def __init__(self, what: str, output: str = "") -> None:
        super().__init__(what)
        self.what, self.output = what, output


class Report:
    """Prints one line per check as it completes (the runs take minutes) and counts them."""

    def __init__(self) -> None:
        self.passed = 0
        self.failed = 0

    def ok(self, what: str) -> None:
        self.passed += 1
        print(f"PASS  {what}", flush=True)

    def fail(self, problem: str, details: str = "") -> None:
        """`problem` is the one-line headline; `details` (indented below) the evidence and the fix."""
        self.failed += 1
        print(f"FAIL  {problem}" + (f"\n{_indent(details)}" if details else ""), flush=True)

    @staticmethod
    def note(what: str) -> None:
        print(f"....  {what}", flush=True)

    def summary(self) -> int:
        total = self.passed + self.failed
        verdict = "FAILED" if self.failed else "reproducible"
        print(f"check-repro: {verdict} ({self.passed}/{total} checks passed)", flush=True)
        return 1 if self.failed else 0


def _indent(text: str) -> str:
    return "\n".join(f"      {line}" for line in text.rstrip().splitlines())


def _tail(text: str, lines: int = TAIL_LINES) -> str:
    return "\n".join(text.rstrip().splitlines()[-lines:])


# ------------------------------------------------------------------------------ subprocesses
def child_env() -> dict[str, str]:
    """The environment of every command this check starts."""
    env = dict(os.environ)
    # The `transferkit` and `dvc` of this Python's venv, also when it is not activated (uv run)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    # The smoke models are tiny: one thread is fastest and keeps busy CI runners responsive
    env.setdefault("OMP_NUM_THREADS", "1")
    # CI needs no usage reports (and may have no network)
    env.setdefault("DVC_NO_ANALYTICS", "1")
    return env


def run(cmd: list[str], cwd: Path) -> str:
    """Run `cmd` in `cwd`; return its output (stdout and stderr interleaved) or raise
    CommandFailed with the tail of it."""
    shown = " ".join(cmd)
    try:
        proc = subprocess.run(cmd, cwd=cwd, env=child_env(), stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
    except OSError as e:  # e.g. git is not installed
        raise CommandFailed(f"`{shown}` could not start: {e}") from e
    if proc.returncode:
        raise CommandFailed(f"`{shown}` exited with code {proc.returncode} in {cwd}; its output ends:",
                            _tail(proc.stdout))
    return proc.stdout


# ------------------------------------------------------------------------------ the project
def find_project_root(start: Path | None = None) -> Path:
    """The folder holding conf/config.yaml and dvc.yaml, at or above `start` (default: cwd)."""
    root = find_conf_dir(start).parent
    if not (root / "dvc.yaml").exists():
        raise TransferkitError(f"{root} has conf/ but no dvc.yaml. Fix: run check-repro in the "
                               f"project folder (the one holding conf/ and dvc.yaml).")
    return root


def _uses_only_synthetic_data(params: dict) -> bool:
    return all(params["data"][role]["dataset"] == "synthetic" for role in ("source", "target"))


def _write_data(root: Path, dest: Path, params: dict, experiment: str) -> None:
    """data/ as a clone has it: a placeholder when the experiment makes its images in-process,
    otherwise a copy of the project's data/ (the copy must not reach back into the project)."""
    if _uses_only_synthetic_data(params):
        (dest / "data").mkdir()
        (dest / "data" / "README").write_text(f"the {experiment} experiment runs on synthetic data\n")
    elif (root / "data").is_dir():
        shutil.copytree(root / "data", dest / "data")
    else:
        raise TransferkitError(f"experiment '{experiment}' reads datasets from data/, but {root} has "
                               f"no data/ folder. Fix: provide data/ (see README) or use --experiment smoke.")


def copy_project(root: Path, dest: Path, experiment: str = "smoke") -> Path:
    """Make `dest` what a user has right after cloning the project: its pipeline code and
    config, params.yaml composed for `experiment`, data/ tracked by DVC, one git commit, and
    no artifacts or DVC cache. Returns `dest`."""
    dest.mkdir(parents=True)
    for item in PROJECT_ITEMS:
        src = root / item
        if src.is_dir():
            shutil.copytree(src, dest / item, ignore=shutil.ignore_patterns("__pycache__"))
        elif src.exists():
            shutil.copy(src, dest / item)
    cfg = compose([f"experiment={experiment}"], root / "conf")
    (dest / "params.yaml").write_text(params_text(cfg))
    _write_data(root, dest, to_params(cfg), experiment)
    run(["git", "init", "-q"], dest)
    run(["dvc", "init", "-q"], dest)
    run(["dvc", "add", "-q", "data"], dest)
    # dvclive reads HEAD, so a commit must exist (every real clone has one); the -c options
    # keep it independent of the CI user's git identity and signing setup
    run(["git", "add", "-A"], dest)
    run(["git", "-c", "user.name=transferkit", "-c", "user.email=transferkit@localhost",
         "-c", "commit.gpgsign=false", "commit", "-qm", "check-repro"], dest)
    return dest


# ------------------------------------------------------------------------------ the checks
def check_params(root: Path, report: Report) -> bool:
    """Check 1: params.yaml is what conf/ composes to."""
    params = root / "params.yaml"
    if not params.exists():
        report.fail(f"{params} not found", "Fix: run `transferkit params` and commit params.yaml.")
        return False
    try:
        drift = params_drift(params, root / "conf")
    except (yaml.YAMLError, AttributeError) as e:  # not YAML, or not a mapping
        report.fail(f"{params} is not a valid params file ({e})", "Fix: regenerate it with `transferkit params`.")
        return False
    if drift:
        report.fail("params.yaml differs from conf/ at:",
                    "\n".join(drift) + "\nFix: run `transferkit params` (add experiment=NAME if you use one) "
                                       "and commit params.yaml.")
        return False
    report.ok("params.yaml matches conf/")
    return True


def _stages_run(output: str) -> list[str]:
    return re.findall(r"Running stage '([^']+)'", output)


def reproduce(proj: Path, target: str | None, label: str, report: Report) -> None:
    """Check 2 in one fresh copy: repro runs the stages, a second repro runs none, status is clean."""
    targets = [target] if target else []
    what = f"dvc repro {target or ''}".rstrip()
    report.note(f"{label}: {what} in {proj}")
    # --no-run-cache: a DVC cache shared through the user's global config must not hand back
    # the other run's outputs, or the comparison below would compare a run with itself
    ran = _stages_run(run(["dvc", "repro", "--no-run-cache", *targets], proj))
    if ran:
        report.ok(f"{label}: {what} ran {', '.join(ran)}")
    else:
        report.fail(f"{label}: {what} ran no stage in a fresh copy, which has no outputs yet")
    rerun = _stages_run(run(["dvc", "repro", *targets], proj))
    if rerun:
        report.fail(f"{label}: a second {what} reran {', '.join(rerun)}",
                    "A dependency or output of these stages changed while the pipeline ran "
                    "(a file written outside its stage's outs?).")
    else:
        report.ok(f"{label}: a second {what} ran nothing")
    status = run(["dvc", "status", *targets], proj)
    if "up to date" in status:
        report.ok(f"{label}: dvc status is up to date")
    else:
        report.fail(f"{label}: dvc status is not up to date after dvc repro", _tail(status))


def flatten(obj, prefix: str = "") -> dict[str, object]:
    """{'models': {'transfer': {'top1': 0.5}}} -> {'models.transfer.top1': 0.5}."""
    if isinstance(obj, dict) and obj:
        items = obj.items()
    elif isinstance(obj, list) and obj:
        items = enumerate(obj)
    else:
        return {prefix: obj}
    flat: dict[str, object] = {}
    for key, value in items:
        flat.update(flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return flat


def describe_difference(a: bytes, b: bytes) -> str:
    """The first keys whose values differ between two metrics.json files, one per line."""
    try:
        fa, fb = flatten(json.loads(a)), flatten(json.loads(b))
    except ValueError:
        return "not valid JSON in both runs, and the bytes differ"
    missing = "<missing>"
    keys = [k for k in dict.fromkeys([*fa, *fb]) if fa.get(k, missing) != fb.get(k, missing)]
    if not keys:
        return "same values, different bytes (key order or number formatting)"
    lines = [f"{k}: {fa.get(k, missing)!r} in run 1, {fb.get(k, missing)!r} in run 2" for k in keys[:SHOWN_KEYS]]
    if len(keys) > SHOWN_KEYS:
        lines.append(f"... and {len(keys) - SHOWN_KEYS} more keys")
    return "\n".join(lines)


def weights_difference(a: Path, b: Path) -> str:
    """Which tensors of two checkpoints differ, and by how much (or why they cannot be read)."""
    import torch

    from transferkit.io import load_plain

    try:
        sa, sb = (load_plain(p, "delete the run folders and run check-repro again.")["state_dict"] for p in (a, b))
    except Exception as e:  # noqa: BLE001 - any unreadable or refused file is reported, not raised
        return f"cannot compare the weights: {e}"
    keys = [k for k in dict.fromkeys([*sa, *sb]) if k not in sa or k not in sb
            or sa[k].shape != sb[k].shape or not torch.equal(sa[k], sb[k])]
    if not keys:
        return "same tensors, different bytes (checkpoint metadata differs)"
    lines = []
    for k in keys[:SHOWN_KEYS]:
        if k in sa and k in sb and sa[k].shape == sb[k].shape:
            lines.append(f"{k}: max |difference| {(sa[k].double() - sb[k].double()).abs().max().item():.3g}")
        else:
            lines.append(f"{k}: missing or another shape in one run")
    if len(keys) > SHOWN_KEYS:
        lines.append(f"... and {len(keys) - SHOWN_KEYS} more tensors")
    return "\n".join(lines)


# What must be byte-identical between the two runs, and how to explain a difference. Models
# too: equal metrics on a small test set can hide weights that drifted in the last bits.
COMPARED = {
    "metrics.json": lambda a, b: describe_difference(a.read_bytes(), b.read_bytes()),
    "model.pt": weights_difference,
}


def compared_files(proj: Path, name: str) -> set[str]:
    return {p.relative_to(proj).as_posix() for p in (proj / "artifacts").rglob(name)}


def compare_outputs(run1: Path, run2: Path, report: Report) -> None:
    """Check 3: every metrics.json and model.pt is byte-identical in the two runs."""
    if not compared_files(run1, "metrics.json") | compared_files(run2, "metrics.json"):
        report.fail("no metrics.json under artifacts/ to compare",
                    "Fix: choose a --target that trains (e.g. pretrain), or none for the whole pipeline.")
        return
    for kind, describe in COMPARED.items():
        files1, files2 = compared_files(run1, kind), compared_files(run2, kind)
        for name in sorted(files1 ^ files2):
            report.fail(f"{name} exists only in run {1 if name in files1 else 2}")
        for name in sorted(files1 & files2):
            a, b = run1 / name, run2 / name
            if a.read_bytes() == b.read_bytes():
                report.ok(f"{name} is identical in both runs")
            else:
                report.fail(f"{name} differs between the two runs",
                            f"{describe(a, b)}\nUnseeded randomness or a nondeterministic operation changed it.")


# ------------------------------------------------------------------------------ the command
@contextmanager
def workspace(keep: str | None) -> Iterator[Path]:
    """Where the two run folders go: `keep` (left in place) or a temporary folder (removed)."""
    if keep is None:
        with tempfile.TemporaryDirectory(prefix="transferkit-repro-", ignore_cleanup_errors=True) as tmp:
            yield Path(tmp)
        return
    folder = Path(keep).resolve()
    taken = [str(folder / name) for name in RUNS if (folder / name).exists()]
    if taken:  # the runs must start clean; deleting a user's folders is not ours to do
        raise TransferkitError(f"{', '.join(taken)} already exist. Fix: delete them or pass another --keep folder.")
    folder.mkdir(parents=True, exist_ok=True)
    try:
        yield folder
    finally:
        Report.note(f"kept the run folders in {folder}")


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="transferkit check-repro",
        description="Check that params.yaml matches conf/ and that two clean `dvc repro` runs "
                    "give byte-identical metrics.json and model.pt files.")
    parser.add_argument("--target", metavar="STAGE", help="run `dvc repro STAGE` (default: the whole pipeline)")
    parser.add_argument("--keep", metavar="DIR", help="keep the two run folders in DIR (default: a temporary folder)")
    parser.add_argument("--experiment", metavar="NAME", default="smoke",
                        help="the experiment the runs compose params.yaml for (default: smoke)")
    return parser.parse_args(argv)


def main(argv: list[str]) -> int:
    try:
        args = parse_args(argv)
    except SystemExit as e:  # --help (0) or a usage error (2, already printed)
        return int(e.code or 0)
    report = Report()
    try:
        root = find_project_root()
        # stale params would make the runs test settings nobody asked for: stop here
        if not check_params(root, report):
            return report.summary()
        with workspace(args.keep) as work:
            runs = [work / name for name in RUNS]
            for i, proj in enumerate(runs, start=1):
                copy_project(root, proj, args.experiment)
                reproduce(proj, args.target, f"run {i}", report)
            compare_outputs(*runs, report)
    except CommandFailed as e:
        report.fail(e.what, e.output)
    except TransferkitError as e:
        report.fail(str(e))
    return report.summary()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
