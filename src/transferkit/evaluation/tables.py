"""Markdown tables of many runs: a sweep's (`transferkit collect`) and the four scenarios'."""

from __future__ import annotations

import json
import math
from pathlib import Path

from transferkit.evaluation.formats import busy_note, file_size, interval, measured, millions, names, points


def pct(x) -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.1f}"


def seconds(value) -> str:
    """Training seconds: a smoke run trains for fractions of a second, not 0."""
    return "–" if value is None else f"{value:,.{int(value < 10)}f}"


def sweep_table(summary: dict) -> str:
    lines = ["| run | seeds | val top-1 % (mean ± std) | test top-1 % (mean ± std) "
             "| test − scratch, points (95% interval) | beats scratch? |", "|---|---|---|---|---|---|"]
    scratch_ran = any(r["stage"] == "scratch" for r in summary["rows"])
    scratch_seeds = next((r["seeds"] for r in summary["rows"] if r["stage"] == "scratch"), [])
    for r in summary["rows"]:
        vs = r.get("vs_scratch")
        diff, verdict = "–", "–"
        if vs is None and scratch_ran and r["stage"] != "scratch":  # scratch ran, but with other settings only
            diff = "no scratch run with its settings"
        elif vs and vs["ci95"] is None:  # no seed in common with scratch: nothing to pair
            diff = "no paired seed"
        elif vs:
            lo, hi = vs["ci95"]
            diff = f"{points(vs['difference'])} ({interval(lo, hi)})"
            if vs["seeds"] != r["seeds"] or vs["seeds"] != vs.get("baseline_seeds", scratch_seeds):  # means: others
                diff += f", seed{'s' * (len(vs['seeds']) > 1)} {', '.join(map(str, vs['seeds']))} alone"
            verdict = "yes" if lo > 0 else ("no: worse" if hi < 0 else "not shown (interval includes 0)")
            if len(vs["seeds"]) == 1 and verdict != "not shown (interval includes 0)":  # no training noise in it
                verdict += ", on one seed"
        lines.append(f"| {r['label']}{' ← best on val' * r['chosen_on_val']} | {len(r['seeds'])} | "
                     f"{pct(r['val_mean'])} ± {pct(r['val_std'])} | {pct(r['test_mean'])} ± {pct(r['test_std'])} | "
                     f"{diff} | {verdict} |")
    methods = sorted({r["vs_scratch"]["method"] for r in summary["rows"] if r.get("vs_scratch")})
    tta = f"evaluate.tta={summary['tta']}" if summary.get("tta") else "each row's evaluate.tta"
    views = f"Val top-1: one view of each image, as the stages score it; test top-1: with {tta}."
    notes = [] if scratch_ran else ["No scratch runs among these: the scratch columns need a scratch sweep of the "
                                    "same seeds (`transferkit sweep scratch seed=...`), collected with this one."]
    if best := next((r for r in summary["rows"] if r["chosen_on_val"]), None):
        if tied := [r["label"] for r in summary["rows"] if r is not best and r["stage"] == best["stage"]
                    and r["val_mean"] == best["val_mean"]]:
            notes.append(f"Best on val: tied with {', '.join(tied)} (ties go to the first row).")
        if len({tuple(r["seeds"]) for r in summary["rows"] if r["stage"] == best["stage"]}) > 1:
            notes.append("Best on val compares means over different seeds (the rows ran different ones): run the "
                         "missing seeds for a fair choice.")
    return "\n".join(lines + ["", views] + [f"Intervals: {m}." for m in methods] + notes) + "\n"


def scenario_verdict(q: dict) -> str:
    """Whether the source material's advice won on val, and if not, how far it is on test."""
    if q["agrees"] is None:
        return "– (no validation split)"
    if q["agrees"]:
        tied = [r["label"] for r in q["rows"] if r["tied_on_val"]]
        return "yes" + (f", tied on val with {', '.join(tied)} (ties go to the earlier strategy)" if tied else "")
    lo, hi = q["guided_minus_winner_test"]["ci95"]
    noise = "within noise" if lo <= 0 <= hi else ("guidance better on test" if lo > 0 else "guidance worse")
    tie = ", tied on val (ties go to the earlier strategy)" if q["guided_ties_winner_on_val"] else ""
    guided = next(r for r in q["rows"] if r["strategy"] == q["guidance"]["strategy"])
    winner = next(r for r in q["rows"] if r["chosen_on_val"])
    n = guided["epochs"]
    budgets = (f"; budgets differ: {guided['label']} {n} epoch{'s' * (n != 1)}, {winner['label']} {winner['epochs']}"
               if n != winner["epochs"] else "")
    return (f"no{tie}: {guided['label']} is {100 * q['guided_minus_winner_test']['difference']:+.1f} points on test "
            f"vs the winner ({interval(lo, hi)}; {noise}{budgets})")


def epochs_sentence(results: list[dict]) -> str:
    """Whether the strategies of each quadrant train for as many epochs (an override such as transfer.epochs=3
    changes some of them), and if not, which differ."""
    uneven = [q for q in results if len({r["epochs"] for r in q["rows"]}) > 1]
    if not uneven:
        return "Every strategy of a quadrant trains for the same number of epochs."
    return ("The strategies train for different numbers of epochs, so their budgets differ: " +
            "; ".join(f"{q['title']}: " + ", ".join(f"{r['label']} {r['epochs']}" for r in q["rows"]) for q in uneven)
            + ".")


def scenarios_markdown(results: list[dict], made_by: str = "") -> str:
    """The scenarios' report; `made_by`: the command that made it (a report left by an earlier run with other
    settings then says so itself)."""
    first = results[0]
    lines = ["# The four transfer scenarios, measured", "", *([f"Made by `{made_by}`.", ""] if made_by else []),
             f"Target: {names(first['target_classes'])} in every quadrant, so the quadrants compare; test = "
             f"{first['n_test']:,} images of the dataset's test split. {epochs_sentence(results)} The winner is "
             "chosen on validation accuracy (◀ val, one view of each image); test accuracy (with evaluate.tta) is "
             "reported, never used to choose. Intervals: 95%, Wilson for an accuracy, paired by image for a difference "
             "(agrees?). One seed.",
             "", "## Summary", "",
             "| quadrant | target train | source (pretrain epochs: source test top-1, one view) | "
             "source material says | winner on val | its test top-1 % | best on test | agrees? |",
             "|---|---|---|---|---|---|---|---|"]
    for q in results:
        win = next((r for r in q["rows"] if r["chosen_on_val"]), None)
        best = [r for r in q["rows"] if r["best_on_test"]]  # more than one where they tie
        tops = f"{', '.join(r['label'] for r in best)} ({'tied, ' * (len(best) > 1)}{pct(best[0]['test_acc'])})"
        lines.append(f"| {q['title']} | {q['n_train']:,} | {names(q['source_classes'])} "
                     f"({q['pretrain_epochs']} ep: {pct(q['pretrain_source_test_acc'])}%) | {q['guidance']['text']} | "
                     f"{win['label'] if win else '–'}{' (tied)' * any(r['tied_on_val'] for r in q['rows'])} | "
                     f"{pct(win['test_acc']) if win else '–'} | "
                     f"{tops} | {scenario_verdict(q)} |")
    for q in results:
        lines += ["", f"## {q['title']} (`{q['preset']}`)", "",
                  f"Target train {q['n_train']:,}, val {q['n_val']:,}, test {q['n_test']:,}. Source "
                  f"{names(q['source_classes'])}: {q['n_source_train']:,} images, "
                  f"pretrained {q['pretrain_epochs']} epoch{'s' * (q['pretrain_epochs'] != 1)} "
                  f"({q['pretrain_folder']}/, shared by the quadrants with this source).", "",
                  "| strategy | what is trained | epochs | val top-1 % (95% interval) "
                  "| test top-1 % (95% interval) | train s |",
                  "|---|---|---|---|---|---|"]
        for r in q["rows"]:
            name = f"**{r['label']}** ◀ val" if r["chosen_on_val"] else r["label"] + " (tied)" * r["tied_on_val"]
            val = ("–" if r["val_acc"] is None
                   else f"{pct(r['val_acc'])} ({pct(r['val_ci95'][0])}–{pct(r['val_ci95'][1])})")
            test = f"{pct(r['test_acc'])} ({pct(r['test_ci95'][0])}–{pct(r['test_ci95'][1])})"
            lines.append(f"| {name} | {r['what']} | {r['epochs']} | {val} | "
                         f"{test}{' (best on test)' * r['best_on_test']} | "
                         f"{seconds(r['train_seconds'])} |")
        lines += ["", f"Source material: {q['guidance']['text']}. Agrees with the val winner: {scenario_verdict(q)}."]
    return "\n".join(lines) + "\n"


def results_table(metrics: dict, timing: dict, tta: str | None = None) -> str:
    """The pipeline's results from evaluate's metrics.json and timing.json, naming the machine (`tta`: the
    evaluate.tta its params.yaml records, None where it records none)."""
    m = timing.get("machine", {})
    lines = ["| model | test top-1 % (95% interval) | params | MACs | CPU latency, batch 1 | CPU img/s, batch "
             f"{timing.get('throughput_batch', 256)} |", "|---|---|---|---|---|---|"]
    from transferkit.evaluation.metrics import VIEWS
    from transferkit.evaluation.report import LABELS, deployed_one_view, one_view_note
    from transferkit.stages import TARGET_MODELS

    # in evaluate's order, baselines first and the deployed files last (metrics.json keeps its keys sorted)
    rank = {name: i for i, name in enumerate(TARGET_MODELS)}
    for name in sorted(metrics["models"], key=lambda n: rank.get(n, len(rank))):
        r, t = metrics["models"][name], timing.get(name, {})
        zero = f" ({100 * r['sparsity']:.0f}% zero)" if "sparsity" in r else ""  # unstructured pruning's weights
        lines.append(f"| {LABELS.get(name, name)} | {pct(r['top1'])} "
                     f"({pct(r['top1_ci95'][0])}–{pct(r['top1_ci95'][1])}) | "
                     f"{millions(r['params'], 2)}{zero} | "
                     f"{millions(r['macs'], 1)} | {measured(t, 'latency_ms_bs1', '.2f', ' ms')} | "
                     f"{measured(t, 'throughput_img_s', ',.0f')} |")
    d = metrics["transfer_vs_scratch"]
    fp32, bf16 = m.get("fp32_gflops", "?"), m.get("bf16_gflops", "?")  # evaluate's older files: after only
    peaks = (f"fp32 {m['fp32_gflops_before']} / bf16 {m['bf16_gflops_before']} GFLOP/s before the timings, {fp32} / "
             f"{bf16} after" if "fp32_gflops_before" in m else f"fp32 {fp32} / bf16 {bf16} GFLOP/s after the timings")
    cpu = m.get("cpu", "unknown CPU") + (f" ({m['isa']})" if m.get("isa") else "")
    lines += ["", f"Transfer minus scratch: {100 * d['difference']:+.1f} points (95% paired interval "
                  f"{interval(*d['ci95'])}), {d['n']:,} test images. Latency and "
                  f"throughput: {cpu}, {m.get('threads', '?')} threads (matmul peak {peaks}), "
                  f"torch {m.get('torch', '?')}." + "".join(f" {note}" for note in busy_note(timing))]
    if tta in VIEWS:  # as the report says it: how many views, and the deployed files' one-view top-1
        lines += one_view_note(tta, VIEWS[tta], metrics["models"])
    elif one_view := deployed_one_view(metrics["models"], lambda x: f"{pct(x)}%"):
        lines.append(f"Top-1 is over the test-time views of evaluate.tta; `transferkit predict` runs one, and there "
                     f"the deployed files score {' and '.join(one_view)}.")
    return "\n".join(lines) + "\n"


def quantize_line(result: dict, produced_by: str) -> str:
    """What the quantize stage ends with on the console."""
    size = result["bytes"]
    larger = " (larger: its quantization nodes outweigh a model this small)" * (size["int8"] > size["fp32"])
    return (f"quantize: INT8 top-1 test {pct(result['int8_top1'])}%, fp32 {pct(result['fp32_top1'])}% (the same "
            f"prediction on {pct(result['top1_agreement'])}% of {result['n_test']:,} images); file: fp32 "
            f"{file_size(size['fp32'])} -> INT8 {file_size(size['int8'])}{larger}; by {produced_by}")


def training_table(stages: dict[str, dict]) -> str:
    """Each training stage's timing.json (stage -> its contents): how long it trained, how fast, in what."""
    def cell(value, spec: str = "") -> str:  # pretrain.epochs=0 trains nothing: no images per second
        return "–" if value is None else format(value, spec)

    trained = {name: t for name, t in stages.items() if "train_seconds" in t}
    lines = ["| stage | training s | train img/s | device | processes | precision | resumed at epoch |",
             "|---|---|---|---|---|---|---|"]
    lines += [f"| {name} | {seconds(t['train_seconds'])} | {cell(t.get('train_images_per_second'), ',.0f')} | "
              f"{cell(t.get('device'))} | {cell(t.get('processes'))} | {cell(t.get('precision'))} | "
              f"{cell(t.get('resumed_at_epoch'))} |" for name, t in trained.items()]
    total = sum(t["train_seconds"] or 0 for t in trained.values())
    return "\n".join(lines + ["", f"Training in all: {seconds(total)} s."]) + "\n"


def changed_since(params: Path, ran: Path) -> str | None:
    """The settings DVC tracks for the stages that `params` (the project's params.yaml) holds otherwise than `ran`
    (the one evaluate ran with), as `key: then → now`; None where they agree or either is unreadable."""
    from transferkit.config.dvcyaml import tracked_params
    from transferkit.plain import differing, flatten, plain_yaml, under
    from transferkit.stages import PIPELINE

    try:
        now, then = (plain_yaml(p.read_text(encoding="utf-8")) for p in (params, ran))
        keys = {k for s in PIPELINE for k in tracked_params(s.params, list(now["trainer"]))}
        now, then = ({k: v for k, v in flatten(d).items() if under(k, keys)} for d in (now, then))
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None

    def change(key: str) -> str:  # a long value (a class list) by its key alone
        values = [json.dumps(d.get(key)) for d in (then, now)]
        return key if sum(map(len, values)) > 40 else f"{key}: {values[0]} → {values[1]}"
    other = differing(then, now)
    return ", ".join(map(change, other[:3])) + ", ..." * (len(other) > 3) or None


def main(argv: list[str]) -> int:
    """`transferkit results [DIR]`: the results table of a pipeline run (DIR: evaluate's output folder)."""
    import argparse
    import os

    from transferkit.errors import TransferkitError, one_line_errors
    from transferkit.plain import plain_json
    from transferkit.stages import PIPELINE, STAGES

    parser = one_line_errors(argparse.ArgumentParser(prog="transferkit results", description=main.__doc__))
    parser.add_argument("dir", nargs="?", type=Path,
                        help="evaluate's output folder or its metrics.json (default: the project's artifacts/evaluate)")
    folder = given = parser.parse_args(argv).dir
    if folder is None:  # the project's, from any folder inside it, where its params.yaml puts the stages' outputs
        from transferkit.config.compose import find_conf_dir, read_params

        try:
            project = find_conf_dir().parent
        except TransferkitError:
            project = Path()
        try:
            artifacts = read_params(project / "params.yaml")["paths"].get("artifacts_dir") or "artifacts"
        except TransferkitError:  # no params.yaml yet: the default's
            artifacts = "artifacts"
        folder = Path(os.path.relpath(project / artifacts / "evaluate"))
    elif folder.name == "metrics.json" and folder.is_file():
        folder = folder.parent
    if any((folder / s).is_dir() for s in STAGES):  # the artifacts folder itself
        done = (folder / "evaluate" / "metrics.json").is_file()
        raise TransferkitError(f"{folder} holds the stages' folders; the results are in evaluate's"
                               f"{'' if done else ', which has none yet'}. Fix: "
                               f"{'' if done else 'run the pipeline (`dvc repro`), then '}"
                               f"`transferkit results {folder / 'evaluate'}`.")

    def read(path: Path, fix: str) -> dict:
        try:
            data = plain_json(path.read_text())
        except (OSError, ValueError) as e:
            raise TransferkitError(f"cannot read {path} ({getattr(e, 'strerror', None) or e}). Fix: {fix}.") from e
        return data if isinstance(data, dict) else {}

    rerun = "run evaluate again (`dvc repro evaluate`), which writes metrics.json and timing.json"
    metrics = read(folder / "metrics.json", "run the pipeline first (`dvc repro`)" if given is None else
                   "pass evaluate's output folder (`transferkit results artifacts/evaluate`), after running the "
                   "pipeline (`dvc repro`)")
    runs = Path(os.path.normpath(folder / os.pardir))  # the stages' folders beside evaluate's (of ".": "..")
    beside = runs / "evaluate" if (runs / "evaluate").is_dir() else "artifacts/evaluate"
    if "models" not in metrics or "transfer_vs_scratch" not in metrics:  # another stage's metrics.json
        raise TransferkitError(f"{folder / 'metrics.json'} is not evaluate's: it scores no models. Fix: "
                               + (rerun if folder.resolve().name == "evaluate" else
                                  f"pass evaluate's folder, `transferkit results {beside}`") + ".")
    timing = read(folder / "timing.json", rerun)

    def numbered(path: Path) -> tuple:  # freeze_curve's depth2 before depth11
        return len(path.parent.name), path.parent.name
    timings = {path.parent.relative_to(runs).as_posix(): read(path, f"run {s.name} again (`dvc repro {s.name}`)")
               for s in PIPELINE if s.trains for path in [*(runs / s.name).glob("timing.json"),
                                                          *sorted((runs / s.name).glob("*/timing.json"), key=numbered)]}
    def shaped(make, what: str, fix: str) -> str:  # another version's file, or an edited one: one line, no traceback
        try:
            return make()
        except (KeyError, TypeError, ValueError, IndexError, AttributeError) as e:
            raise TransferkitError(f"{what} is of another shape ({type(e).__name__}: {e}). Fix: {fix}.") from e

    try:  # the views top-1 averages, as evaluate ran (its params.yaml beside its outputs, which may be a stranger's)
        import yaml

        from transferkit.plain import plain_yaml

        tta = plain_yaml((folder / "params.yaml").read_text(encoding="utf-8"))["evaluate"]["tta"]
    except (OSError, ValueError, yaml.YAMLError, KeyError, TypeError):
        tta = None
    tta = tta if isinstance(tta, str) else None  # any other value is no mode: the table names none
    table = shaped(lambda: results_table(metrics, timing, tta), f"{folder}'s metrics.json or timing.json", rerun)
    for name, t in timings.items():
        stage = name.split("/")[0]
        shaped(lambda: training_table({name: t}), str(runs / name / "timing.json"),
               f"run {stage} again (`dvc repro {stage}`)")
    training = training_table(timings) if timings else ""
    print(table, end="")
    if training:
        print(f"\nTraining, from each stage's timing.json:\n\n{training}", end="")
    if given is None and (changed := changed_since(project / "params.yaml", folder / "params.yaml")):
        print(f"\nparams.yaml has changed since evaluate ran ({changed}): these are the last run's results. "
              "Fix: `uv run dvc repro` brings them up to date.")
    return 0
