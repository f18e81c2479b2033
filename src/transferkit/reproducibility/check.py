"""`transferkit check-repro [--target STAGE] [--keep DIR] [--experiment NAME]`: the project's
reproducibility promise, checked the way a user's CI runs it (docs/pipeline.md, Reproducibility):
params.yaml and dvc.yaml are what they are made from; twice, in a fresh copy of the project,
`dvc repro` runs, a second one runs nothing and `dvc status` is clean; every metrics.json, summary.json and
quantize.json, prepared task, checkpoint and exported model is byte-identical in the two copies. One PASS/FAIL line per
check; exits 0 when all pass, 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import tempfile
from pathlib import Path

from transferkit.config.compose import compose, find_conf_dir, params_text
from transferkit.config.drift import generated_drift, regenerate_fix
from transferkit.errors import TransferkitError, error_line, one_line_errors
from transferkit.plain import flatten
from transferkit.project import PROJECT_ITEMS, copy_project, run, stages_run
from transferkit.stages import STAGES
from transferkit.tracked import check_untracked

SHOWN = 5  # differing keys or tensors listed per file


class Report:
    def __init__(self) -> None:
        self.passed = self.failed = 0

    def check(self, ok: bool, what: str, details: str = "") -> bool:
        """One PASS or FAIL line as the check completes (the runs take minutes)."""
        self.passed += ok
        self.failed += not ok
        indented = "".join(f"\n      {line}" for line in details.rstrip().splitlines()) if not ok else ""
        print(f"{'PASS' if ok else 'FAIL'}  {what}{indented}", flush=True)
        return ok

    def summary(self) -> int:
        print(f"check-repro: {'FAILED' if self.failed else 'reproducible'} "
              f"({self.passed}/{self.passed + self.failed} checks passed)", flush=True)
        return 1 if self.failed else 0


def _differing(a: dict, b: dict, line) -> str:
    """`line(key)` for the first SHOWN keys whose values differ between `a` and `b`, or ''."""
    keys = [k for k in dict.fromkeys([*a, *b]) if k not in a or k not in b or not _same(a[k], b[k])]
    more = [f"... and {len(keys) - SHOWN} more"] if len(keys) > SHOWN else []
    return "\n".join([line(k) for k in keys[:SHOWN]] + more)


def _same(x, y) -> bool:
    return x.shape == y.shape and x.equal(y) if hasattr(x, "equal") else x == y


def describe_difference(a: bytes, b: bytes) -> str:
    """The first keys whose values differ between two metrics.json files, one per line."""
    try:
        fa, fb = flatten(json.loads(a), lists=True), flatten(json.loads(b), lists=True)
    except ValueError:
        return "not valid JSON in both runs, and the bytes differ"
    def line(k: str) -> str:
        return f"{k}: {fa.get(k, '<missing>')!r} in run 1, {fb.get(k, '<missing>')!r} in run 2"

    return _differing(fa, fb, line) or "same values, different bytes (key order or number formatting)"


def json_difference(a: Path, b: Path) -> str:
    return describe_difference(a.read_bytes(), b.read_bytes())


def _tensor_line(sa: dict, sb: dict):
    def line(k: str) -> str:
        if k in sa and k in sb and hasattr(sa[k], "shape") and getattr(sb[k], "shape", None) == sa[k].shape:
            return f"{k}: max |difference| {(sa[k].double() - sb[k].double()).abs().max().item():.3g}"
        return f"{k}: missing, another shape or another value in one run"
    return line


def weights_difference(a: Path, b: Path) -> str:
    """Which tensors of two checkpoints (or prepared tasks) differ, and by how much (or why they cannot be read)."""
    from transferkit.io import load_plain

    try:
        sa, sb = (load_plain(p, "delete the run folders and run check-repro again.") for p in (a, b))
        sa, sb = (s.get("state_dict", s) for s in (sa, sb))  # a checkpoint's weights; a task's splits
    except Exception as e:  # noqa: BLE001 - any unreadable or refused file is reported, not raised
        return f"cannot compare the weights: {e}"
    return _differing(sa, sb, _tensor_line(sa, sb)) or "same tensors, different bytes (checkpoint metadata differs)"


def onnx_difference(a: Path, b: Path) -> str:
    """Which weights of two ONNX files differ, and by how much: files of one graph have one size."""
    import onnx
    import torch
    from onnx.numpy_helper import to_array

    try:
        sa, sb = ({t.name: torch.from_numpy(to_array(t).copy()) for t in onnx.load(str(p)).graph.initializer}
                  for p in (a, b))
    except Exception as e:  # noqa: BLE001 - any unreadable file is reported, not raised
        return f"cannot compare the graphs: {e}"
    return _differing(sa, sb, _tensor_line(sa, sb)) or "same weights, another graph or metadata"


def zip_difference(a: Path, b: Path) -> str:
    """Which members of two TorchScript archives differ: loading them, which runs their code, is not needed."""
    import zipfile

    try:
        with zipfile.ZipFile(a) as za, zipfile.ZipFile(b) as zb:
            ma, mb = ({i.filename: z.read(i) for i in z.infolist()} for z in (za, zb))
    except Exception as e:  # noqa: BLE001 - any unreadable archive or member is reported, not raised
        return f"cannot compare the archives: {e}"

    def line(k: str) -> str:
        if k not in ma or k not in mb:
            return f"{k}: missing in run {1 if k not in ma else 2}"
        return f"{k}: differs ({len(ma[k]):,} bytes in run 1, {len(mb[k]):,} in run 2)"
    return _differing(ma, mb, line) or "same members, another archive layout"


# Equal metrics on a small test set can hide weights that drifted in the last bits: both compared,
# and the deployed files, which must not depend on where the project lives either.
# prepare's outputs too: every later stage reads them, and `--target prepare` has nothing else.
# quantize.json: the INT8 file's checks (export.json holds timings, which differ from run to run).
COMPARED = {"metrics.json": json_difference, "model.pt": weights_difference, "model.onnx": onnx_difference,
            "model.torchscript.pt": zip_difference, "source.pt": weights_difference, "target.pt": weights_difference,
            "summary.json": json_difference, "quantize.json": json_difference}


def reproduce(proj: Path, target: str | None, label: str, report: Report) -> None:
    """In one fresh copy: repro runs stages, a second repro runs none, status is clean."""
    targets = [target] if target else []
    what = " ".join(["dvc repro", *targets])
    print(f"....  {label}: {what} in {proj}", flush=True)
    # --no-run-cache: a cache shared through the user's global config must not hand back the
    # other run's outputs, or the comparison would compare a run with itself
    ran = stages_run(run(["dvc", "repro", "--no-run-cache", *targets], proj))
    report.check(bool(ran), f"{label}: {what} ran {', '.join(ran) or 'no stage in a fresh copy'}")
    rerun = stages_run(run(["dvc", "repro", *targets], proj))
    report.check(not rerun, f"{label}: a second {what} ran {', '.join(rerun) or 'nothing'}",
                 "A dependency or output of these stages changed while the pipeline ran.")
    status = run(["dvc", "status", *targets], proj)
    clean = "up to date" in status
    report.check(clean, f"{label}: dvc status is {'' if clean else 'not '}up to date", status)


def compare_outputs(run1: Path, run2: Path, report: Report, artifacts: str = "artifacts") -> None:
    """Every file of a COMPARED name under each run's `artifacts` folder (paths.artifacts_dir) is byte-identical."""
    def files(proj: Path, name: str) -> set[str]:
        return {p.relative_to(proj).as_posix() for p in (proj / artifacts).rglob(name)}

    if not report.check(any(files(r, name) for r in (run1, run2) for name in COMPARED),
                        f"outputs under {artifacts}/ to compare ({', '.join(COMPARED)})",
                        "Fix: choose a --target that makes some (e.g. pretrain), or none for the whole pipeline."):
        return
    for kind, describe in COMPARED.items():
        one, two = files(run1, kind), files(run2, kind)
        for name in sorted(one ^ two):
            report.check(False, f"{name} exists only in run {1 if name in one else 2}")
        for name in sorted(one & two):
            same = (run1 / name).read_bytes() == (run2 / name).read_bytes()
            report.check(same, f"{name} {'is identical in both runs' if same else 'differs between the two runs'}",
                         "" if same else f"{describe(run1 / name, run2 / name)}\n"
                                         f"Unseeded randomness or a nondeterministic operation changed it.")


def check_keep(keep: Path, root: Path) -> None:
    """--keep names a folder, new or without run1/ and run2/, outside what each run copies of the project."""
    blocker = next((p for p in (keep, *keep.parents) if p.exists()), keep)
    if blocker.exists() and not blocker.is_dir():
        raise TransferkitError(f"--keep {keep}: {blocker} is a file, not a folder. Fix: pass a folder for the two "
                               f"runs (new, or one without run1/ and run2/).")
    if any((keep / name).exists() for name in ("run1", "run2")):
        raise TransferkitError(f"{keep}/run1 or run2 already exists. Fix: delete them or pass another --keep folder.")
    copied = next((root / item for item in PROJECT_ITEMS if keep.resolve().is_relative_to((root / item).resolve())),
                  None)
    if copied:
        raise TransferkitError(f"--keep {keep} is inside {copied}, which each run copies: the copy would copy itself "
                               f"without end. Fix: pass a folder outside {copied.name}/ (e.g. outside the project).")
    check_untracked(keep, "--keep")  # two copies of the project inside a stage's outputs, which DVC replaces


def main(argv: list[str]) -> int:
    parser = one_line_errors(argparse.ArgumentParser(prog="transferkit check-repro",
                                                     description=__doc__.split("\n\n")[0]))
    parser.add_argument("--target", metavar="STAGE", choices=STAGES,
                        help=f"run `dvc repro STAGE` (default: the whole pipeline), one of {', '.join(STAGES)}")
    parser.add_argument("--keep", metavar="DIR", type=Path, help="keep the two run folders in DIR (default: temporary)")
    parser.add_argument("--experiment", metavar="NAME", default="smoke", help="what the runs compose (default: smoke)")
    args = parser.parse_args(argv)  # --help exits 0; a bad option is one TransferkitError (one_line_errors)
    # bad input is one error line and exit code 2 (cli.main), before anything is copied or run
    root = find_conf_dir().parent
    cfg = compose([f"experiment={args.experiment}"], root / "conf")
    artifacts = Path(cfg.paths.artifacts_dir)
    outside = artifacts.is_absolute() or ".." in artifacts.parts
    if outside:  # both runs would write one folder, which DVC cannot track from either copy
        cfg = compose([f"experiment={args.experiment}", "paths.artifacts_dir=artifacts"], root / "conf")
    text = params_text(cfg)
    if args.keep:
        check_keep(args.keep, root)
    report = Report()
    # a CI timeout's SIGTERM: leave through `with`, so the temporary copies (data/ included) go
    previous = signal.signal(signal.SIGTERM, lambda sig, frame: sys.exit(128 + sig))
    try:
        drift = generated_drift(root / "params.yaml", root / "conf")
        if not report.check(not drift, "params.yaml and dvc.yaml " + ("differ from what they are made from:" if drift
                                                                      else "match conf/ and the stage table"),
                            "\n".join([*drift, regenerate_fix(root / "params.yaml", root / "conf")]) if drift else ""):
            return report.summary()
        print(f"....  both runs compose experiment={args.experiment} from conf/ (--experiment NAME for another)",
              flush=True)
        if outside:
            print(f"....  paths.artifacts_dir={artifacts} lies outside the project: each run writes its outputs "
                  f"to artifacts/ in its own copy instead", flush=True)
        with tempfile.TemporaryDirectory(prefix="transferkit-repro-", ignore_cleanup_errors=True) as tmp:
            work = (args.keep or Path(tmp)).resolve()
            runs = [copy_project(root, work / name, text) for name in ("run1", "run2")]
            for i, proj in enumerate(runs, start=1):
                reproduce(proj, args.target, f"run {i}", report)
            compare_outputs(*runs, report, "artifacts" if outside else artifacts.as_posix())
    except TransferkitError as e:
        report.check(False, str(e))
    except OSError as e:  # copying the project: a full disk, a --keep that cannot be a folder
        report.check(False, f"cannot copy the project into {e.filename or 'the run folders'}: {e.strerror or e}",
                     "Fix: free space there, or pass --keep a folder that can hold two copies of the project.")
    finally:
        signal.signal(signal.SIGTERM, previous)
    return report.summary()


if __name__ == "__main__":
    try:
        sys.exit(main(sys.argv[1:]))
    except TransferkitError as e:  # one line and exit code 2, as `transferkit check-repro` (cli.main) ends
        print(error_line("check-repro", e), file=sys.stderr)
        sys.exit(2)
