"""Driving DVC from transferkit's own commands (check-repro, scenarios, sweeps) and benchmarks:
start dvc and transferkit from this environment, copy the project as a fresh clone has it, and
write and run a generated pipeline of runs in a folder of its own."""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import yaml

from transferkit.errors import TransferkitError, end_with_parent
from transferkit.plain import out_paths

# What a clone of the project holds that `dvc repro` needs (params.yaml and dvc.yaml are made per copy;
# data/ is copied; artifacts/, outputs and caches are left behind: the copy starts clean).
PROJECT_ITEMS = ("conf", "src", ".dvcignore", ".gitignore", "data")


def child_env() -> dict[str, str]:
    env = dict(os.environ)
    # the `transferkit` and `dvc` of this Python's environment, also when it is not activated
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.setdefault("DVC_NO_ANALYTICS", "1")  # no usage reports (and maybe no network)
    return env


def run(cmd: list[str], cwd: Path, tail: int = 25, show: Callable[[str], str | None] | None = None) -> str:
    """Run `cmd` in `cwd`; its output (stdout and stderr together), or an error with the end of it. `show`: what
    to print of each line as it comes (None: nothing)."""
    env = child_env()
    if (Path(cwd) / "src" / "transferkit").is_dir():  # a copy of the project runs its own code, not this install's
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(Path(cwd).resolve() / "src"), env.get("PYTHONPATH")]))
    try:
        # a session of its own: on Ctrl+C or SIGTERM here, the stages dvc started end with it (stop_session); on
        # a SIGKILL, which no handler sees, dvc has a SIGTERM at this process's end, and its stage one at dvc's
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, start_new_session=True, preexec_fn=end_with_parent)
    except OSError as e:  # e.g. git is not installed
        raise TransferkitError(f"`{' '.join(cmd)}` could not start: {e}") from e
    with _exits_on(signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        try:
            lines = []
            with proc.stdout:
                for line in proc.stdout:
                    lines.append(line)
                    if show and (text := show(line)):
                        try:
                            print(text, flush=True)
                        except BrokenPipeError:  # `| head`: the reader has gone, the runs go on
                            show = None
            output = "".join(lines)
            proc.wait()
        except BaseException as e:  # KeyboardInterrupt, or a SIGTERM or SIGHUP turned into SystemExit
            stop_session(proc, signal.SIGINT if isinstance(e, KeyboardInterrupt) else signal.SIGTERM)
            raise
    if proc.returncode:
        end = "\n".join(output.rstrip().splitlines()[-tail:])
        raise TransferkitError(f"`{' '.join(cmd)}` exited with code {proc.returncode} in {cwd}"
                               + (f"; its output ends:\n{end}" if end else ""))
    return output


@contextlib.contextmanager
def _exits_on(*signals: int):
    """`signals` (where they would end this process as they come: Ctrl+C, `kill`, `timeout`, a closed terminal)
    end it by KeyboardInterrupt or SystemExit while the block runs, so that the session dvc runs in is stopped with
    it (run); the first one only: a second (`uv run` passes a Ctrl+C on as one) would cut short the wait for it."""
    import threading

    if threading.current_thread() is not threading.main_thread():  # only the main thread sets handlers
        yield
        return

    def stop(number, _frame):
        for sig in signals:
            signal.signal(sig, signal.SIG_IGN)
        if number == signal.SIGINT:
            raise KeyboardInterrupt
        sys.exit(128 + number)

    previous = {sig: signal.getsignal(sig) for sig in signals}
    for sig, handler in previous.items():
        if handler in (signal.SIG_DFL, signal.default_int_handler):  # not a handler of the caller's own
            signal.signal(sig, stop)
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def stop_session(proc: subprocess.Popen, sig: int, grace_s: float = 15.0) -> None:
    """Send `sig` to every process of `proc`'s session (dvc and the stage it runs), and SIGKILL what is
    left after `grace_s`: a stage outliving its caller would go on writing into a folder being deleted."""
    deadline = time.monotonic() + grace_s
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, sig)
        while time.monotonic() < deadline:
            proc.poll()  # reaps dvc, so the group ends when its last process does
            os.killpg(proc.pid, 0)  # ProcessLookupError once the whole group is gone
            time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def stages_run(output: str) -> list[str]:
    """The stages a `dvc repro` ran, from what it printed."""
    return re.findall(r"Running stage '([^']+)'", output)


def copy_project(root: Path, dest: Path, params_text: str) -> Path:
    """`dest` as a fresh clone of a project composed as `params_text` has it, plus data/: the pipeline's
    code and config, params.yaml, the dvc.yaml `transferkit params` makes for it (its folders and the files
    its settings name, which the project's own dvc.yaml may not share), DVC's tracked config, one git
    commit (dvclive reads HEAD), no artifacts and no DVC cache."""
    from transferkit.config.dvcyaml import dvc_yaml_text

    shutil.copytree(root, dest, ignore=lambda d, names: [n for n in names if n == "__pycache__"
                                                         or Path(d) == root and n not in PROJECT_ITEMS])
    (dest / "data").mkdir(exist_ok=True)
    (dest / "params.yaml").write_text(params_text)
    (dest / "dvc.yaml").write_text(dvc_yaml_text(yaml.safe_load(params_text), dest))
    run(["git", "init", "-q", "--template="], dest)  # no hooks from the user's git templates
    run(["dvc", "init", "-q"], dest)
    if (root / ".dvc" / "config").is_file():  # tracked, so a clone has it: `dvc exp run -S` composes conf/
        shutil.copy(root / ".dvc" / "config", dest / ".dvc" / "config")
    run(["git", "add", "-A"], dest)
    # -c options: independent of the user's git identity, signing setup and hooks (which could fail or edit the copy)
    run(["git", "-c", "user.name=transferkit", "-c", "user.email=transferkit@localhost", "-c", "commit.gpgsign=false",
         "-c", f"core.hooksPath={os.devnull}", "commit", "--no-verify", "-qm", "a fresh clone"], dest)
    return dest


def stage_run(stage: str, params: str, out: str, inputs: dict[str, str], deps: list[str], keys: list[str] | None = None,
              sets: list[str] = ()) -> dict:
    """A DVC stage running `transferkit STAGE --params FILE --in NAME=DIR ... --out DIR [key=value ...]`:
    what it reads in the input folders are deps beside `deps`, and DVC watches `keys` of the params file."""
    cmd = " ".join([f"transferkit {stage} --params {shlex.quote(params)}",
                    *(f"--in {name}={shlex.quote(folder)}" for name, folder in inputs.items()),
                    f"--out {shlex.quote(out)}", *sets])
    from transferkit.stages import input_deps

    return {"cmd": cmd, "deps": [*deps, *input_deps(stage, inputs)], **({"params": [{params: keys}]} if keys else {}),
            "outs": [{out: {"persist": True}}]}


class ReproFailed(TransferkitError):
    """run_pipeline's `dvc repro` failed (a stage, most often): the stages that did not need its outputs ran."""


# a sweep's or the scenarios' lock (stages.common.exclusive) on its runs folder says why it is held
WHY_LOCKED = "two runs into one folder at once would replace each other's dvc.yaml and collect each other's runs"
RUNS_HEADER = "# Generated by transferkit; rerunning the command rewrites it.\n"
MADE_BY = "# made by: transferkit "  # the header's second line: which command's runs the folder holds


def is_runs_file(dvc_file: Path) -> bool:
    """Whether `dvc_file` is the dvc.yaml of a sweep or scenarios run (run_pipeline writes it), not a project's."""
    return dvc_file.is_file() and dvc_file.read_text().startswith(RUNS_HEADER)


def check_runs_folder(folder: Path, by: str | None = None) -> None:
    """`folder` may hold a pipeline of runs: it is new or empty, or an earlier run_pipeline made it (its dvc.yaml,
    or only the params/ a run writes first), by the same command `by` where the file names one. A project's own
    dvc.yaml (`--out .`) would be replaced; any other folder (artifacts/, a Hydra multirun's, docs/) would become
    a DVC repository inside the project's; another command's runs would lose their dvc.yaml."""
    dvc_file = folder / "dvc.yaml"
    if dvc_file.is_file() and not is_runs_file(dvc_file):
        raise TransferkitError(f"{dvc_file} was not written by a sweep or scenarios run (a project's?), and this "
                               f"run's pipeline would replace it. Fix: pass --out a new folder, or one such a run "
                               f"made.")
    header = dvc_file.read_text().splitlines()[:2] if by and dvc_file.is_file() else []
    made = header[1][len(MADE_BY):] if len(header) > 1 and header[1].startswith(MADE_BY) else None  # None: older
    if made not in (None, by):
        raise TransferkitError(f"{dvc_file} lists the runs of `transferkit {made}`, and `transferkit {by}` would "
                               f"replace it: collect would no longer find them. Fix: pass --out a new folder, or "
                               f"one `transferkit {by}` made.")
    if not dvc_file.is_file() and folder.is_dir() and (
            other := sorted((p.name for p in folder.iterdir() if p.name not in ("params", ".dvc", ".dvcignore")),
                            key=lambda name: (name.startswith("."), name))):  # a stage's lock file is no example
        raise TransferkitError(f"{folder} holds {other[0]}{' and more' if other[1:] else ''} and no sweep or scenarios "
                               f"run: a run there would make it a DVC repository of its own. Fix: pass --out a new "
                               f"folder, or one such a run made.")
    if not dvc_file.is_file():  # a new runs folder: as collect's --out, in nothing DVC tracks (data/) nor conf/
        from transferkit.tracked import check_untracked

        check_untracked(folder, "--out")


def dvc_running(root: Path) -> tuple[int, str] | None:
    """The live `dvc repro` or `dvc exp` of the repository in `root`, as (its pid, "`its command` is running in
    ROOT (process PID)"): the dvc process that .dvc/tmp/lock (its repository lock) or .dvc/tmp/rwlock (the outputs
    its stages are writing: DVC lets the repository lock go while a stage runs) names."""
    import json

    tmp, pids = root / ".dvc" / "tmp", set()
    with contextlib.suppress(OSError, ValueError, IndexError):
        pids.add(int((tmp / "lock").read_text().split()[0]))
    with contextlib.suppress(OSError, ValueError, AttributeError, TypeError, KeyError):
        pids.update(int(entry["pid"]) for entry in json.loads((tmp / "rwlock").read_text())["write"].values())
    for pid in sorted(pids):
        try:
            argv = [a.decode(errors="replace") for a in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0") if a]
        except OSError:  # ended (or no /proc): nothing to say
            continue
        if (at := next((i for i, a in enumerate(argv) if Path(a).name == "dvc"), None)) is not None and \
                {"repro", "exp"} & set(argv):
            return pid, f"`{' '.join(['dvc', *argv[at + 1:]])}` is running in {root} (process {pid})"
    return None


def refuse_while_dvc_runs(root: Path) -> None:
    """`transferkit params` while `dvc repro` runs in the project: DVC records the params.yaml it finds as a stage
    ends in dvc.lock, so stages that ran with the earlier one would be called up to date."""
    if running := dvc_running(root):
        raise TransferkitError(f"{running[1]}: a params.yaml written now is what dvc.lock records for the stages it "
                               f"runs with the earlier one. Fix: wait for it to end (or stop it), then write "
                               f"params.yaml.")


def stale_stages(folder: Path) -> list[str]:
    """The stages of folder/dvc.yaml that `dvc repro` would run: never finished, or made with other settings,
    code or inputs than the ones it names now."""
    import json

    if running := dvc_running(folder):  # DVC's own error would offer to delete its lock from under that run
        raise TransferkitError(f"{running[1]}, making its runs. Fix: wait for it to end (or stop it), then collect.")
    proc = subprocess.run(["dvc", "status", "--json"], cwd=folder, env=child_env(), capture_output=True, text=True)
    if proc.returncode:
        raise TransferkitError(f"`dvc status` failed in {folder}: {' '.join(proc.stderr.split())[-300:]}. Fix: run "
                               f"the sweep command again there.")
    return sorted(json.loads(proc.stdout or "{}"))


def run_pipeline(folder: Path, stages: dict, targets: list[str] | None = None, labels: dict | None = None,
                 by: str | None = None, dry: bool = False) -> list[str]:
    """Write `stages` as folder/dvc.yaml (folder becomes a DVC repository of its own if it is
    not one) and `dvc repro` them: DVC runs what is missing or changed, skips the rest and
    resumes nothing by hand; each stage is announced as it starts (by its name in `labels`).
    Returns the stages that ran. Where one fails, the others that do not need its outputs still run (--keep-going:
    a sweep's hours of runs do not stop at its first failed point), and then ReproFailed is raised, naming it.
    `by`: the command whose runs these are (`sweep transfer`), in the file's header for check_runs_folder.
    `dry`: the folder as a run leaves it before `dvc repro`, and no stage run."""
    check_runs_folder(folder, by)
    # a missing dep outside the folder stops `dvc repro` only after it has removed that stage's earlier outputs
    if missing := [(name, dep) for name, stage in stages.items() for dep in stage["deps"]
                   if Path(dep).is_absolute() and not Path(dep).exists()]:
        raise TransferkitError(f"{missing[0][1]} does not exist, and {missing[0][0]} reads it. Fix: make it, or set "
                               f"the setting that names it to a path that exists.")
    if running := dvc_running(folder):  # the sweep's own lock is free: the run of one killed by SIGKILL, say
        raise TransferkitError(f"{running[1]}, left by an earlier run of this folder stopped by force, and would write "
                               f"what this run writes. Fix: wait for it to end, or stop it (`kill {running[0]}`), then "
                               f"run the command again.")
    dvc_file = folder / "dvc.yaml"
    folder.mkdir(parents=True, exist_ok=True)
    if not (folder / ".dvc").is_dir():
        run(["dvc", "init", "--no-scm", "-q"], folder)
    from transferkit.io import save_text  # here: it imports torch, which check-repro (a user of this module) needs not

    header = RUNS_HEADER + (f"{MADE_BY}{by}\n" if by else "")
    save_text(header + yaml.safe_dump({"stages": stages}, sort_keys=False, width=120), dvc_file)
    # persist: true (stage_run) keeps a run's outputs while DVC makes them again, and so keeps them out of DVC's run
    # cache: outputs deleted by hand come back from the cache by checkout (what it cannot restore, repro makes), for
    # the stages dvc.lock records (a checkout of a stage never run makes an empty folder for its output)
    lock = folder / "dvc.lock"
    made = (yaml.safe_load(lock.read_text()) or {}).get("stages", {}) if lock.is_file() else {}
    if gone := [name for name, stage in stages.items()
                if name in made and not all((folder / o).exists() for o in out_paths(stage))]:
        subprocess.run(["dvc", "checkout", "-q", *gone], cwd=folder, env=child_env(), capture_output=True)
    if dry:
        return []
    names = {name: (labels or {}).get(name, name) for name in stages}

    # a sweep runs for hours: each run is announced as DVC starts it, and a stage's error line as it comes (the runs
    # after a failed one can push it out of the end of the output that ReproFailed quotes)
    def started(line: str) -> str | None:
        if (m := re.match(r"Running stage '(.+)':", line)) and m[1] in names:
            return f"running {names[m[1]]}"
        return line.rstrip() if re.match(r"transferkit \S+: error: ", line) else None

    try:
        return stages_run(run(["dvc", "repro", "--keep-going", *(targets or [])], folder, tail=40, show=started))
    except TransferkitError as e:
        failed = [names.get(n, n) for n in re.findall(r"failed to reproduce '([^']+)'", str(e))]
        raise ReproFailed(f"{', '.join(failed) or 'a stage'} failed; {e}") from None
