"""The four scenarios of the source material: presets that promise one target task and two
sources of the same size, and `transferkit scenarios` end to end on a tiny image folder."""

from __future__ import annotations

import json

import pytest
import yaml

from conftest import CIFAR10_CLASSES, compose, write_image_folder
from transferkit.config.checks import validate
from transferkit.errors import TransferkitError
from transferkit.scenarios.report import QUADRANTS, main, parse, run

TARGET = ["cat", "dog", "horse"]
ANIMALS = ["bird", "deer", "frog"]
VEHICLES = ["airplane", "automobile", "truck"]
STRATEGIES = ["linear_probe", "early_probe", "partial_freeze", "fine_tune", "scratch"]


@pytest.mark.parametrize("preset", list(QUADRANTS))
def test_preset_promises_its_quadrant(preset):
    size, similarity = QUADRANTS[preset]
    cfg = compose(f"experiment={preset}")
    validate(cfg)
    d = cfg.data
    assert cfg.name == preset and d.source.dataset == d.target.dataset == "cifar10"
    assert list(d.target.classes) == TARGET
    assert list(d.source.classes) == (ANIMALS if similarity == "similar" else VEHICLES)
    assert not set(d.source.classes) & set(d.target.classes)
    # the whole train split of each source class (5,000 x 3 = 15,000 images), nothing held out
    assert d.source.train_per_class is None and d.source.val_per_class == 0
    assert d.target.train_per_class == (400 if size == "small" else None)  # None: 5,000 - 100 val
    assert d.target.val_per_class == 100 and d.target.test_per_class is None
    # a fair budget: the five strategies of a quadrant train for the same number of epochs
    assert cfg.transfer.epochs == cfg.probe.epochs == cfg.scratch.epochs
    assert cfg.pretrain.epochs < compose().pretrain.epochs


def test_quadrants_differ_only_in_their_axis():
    cfgs = {p: compose(f"experiment={p}") for p in QUADRANTS}
    small, large = cfgs["scenario_small_similar"], cfgs["scenario_large_similar"]
    assert small.data.source == large.data.source and small.pretrain == large.pretrain
    similar, different = cfgs["scenario_small_similar"], cfgs["scenario_small_different"]
    assert similar.data.target == different.data.target and similar.transfer == different.transfer


@pytest.mark.parametrize("argv, needle", [
    (["--only", "medium_similar"], "unknown scenario 'medium_similar'"),
    (["experiment=smoke"], "--only NAME"),
    # a depth out of the model's range names the option that set it, not the config key it sets
    (["--early-depth", "9"], r"--early-depth 9 is out of range: model 'fastnet' has 4 blocks .*"
                             r"Fix: --early-depth K with K in 1\.\.3\.$"),
    (["--partial-depth", "-1"], r"Fix: --partial-depth K with K in 1\.\.3\.$"),
    # depths that make the strategy another one: the report would compare a strategy with its own copy
    (["--partial-depth", "0"], r"--partial-depth 0 is out of range: .* depths 0 and 4 are other strategies' "
                               r"\(full fine-tune, linear probe\)\. Fix: --partial-depth K with K in 1\.\.3\.$"),
    (["--early-depth", "4"], r"--early-depth 4 is out of range: .* Fix: --early-depth K with K in 1\.\.3\.$"),
    # the strategies' own keys: an override would be replaced by each strategy's value
    (["transfer.freeze_depth=3"], r"override 'transfer.freeze_depth=3' .* Fix: use --partial-depth K\.$"),
    (["+probe.depth=1"], r"Fix: use --early-depth K\.$"),
    # what sets the quadrants apart: all four would be one experiment, reported under the quadrants' names
    (["data.target.train_per_class=100"], r"data.target.train_per_class=100 sets data.target.train_per_class, which "
                                          r"sets the quadrants apart \(scenario_small_similar has "
                                          r"data.target.train_per_class=400\).* Fix: leave it out"),
    # the values as an override writes them, not as Python prints them (None, ['bird', 'deer', 'frog'])
    (["data.source.classes=[airplane,automobile,truck]"], r"sets data.source.classes, which sets the quadrants apart "
                                                          r"\(scenario_small_similar has "
                                                          r"data.source.classes=\[bird, deer, frog\]\)"),
    (["data.target.train_per_class=400"], r"\(scenario_large_similar has data.target.train_per_class=null\)"),
    (["seed=range(1,1)"], r"seed=range\(1,1\) lists no values\. Fix:"),
    # run from another folder: data/ is not there, and the params files were written before DVC said so
    (["paths.data_dir=/no/such/dir"], r"^/no/such/dir does not exist, and prepare reads the datasets there "
                                      r"\(paths.data_dir\)\. Fix: run from the project's folder"),
    # DVC's own error came after the params files: a stage's output inside another's dependency
    (["paths.data_dir=OUT_PARENT"], r"--out .*/out is inside the data folder .* \(paths.data_dir\), which each "
                                    r"quadrant's prepare reads whole\. Fix: pass --out a folder outside it\.$"),
])
def test_bad_requests_fail_before_any_work(tmp_path, argv, needle):
    argv = [a.replace("OUT_PARENT", str(tmp_path)) for a in argv]
    with pytest.raises(TransferkitError, match=needle):
        main(["--out", str(tmp_path / "out"), *argv])
    assert not (tmp_path / "out").exists()


def test_a_missing_dataset_fails_before_any_file_is_written(tmp_path):
    """Without CIFAR-10 in data/, the run wrote its params files and dvc.yaml, ran `dvc init`, and then each
    quadrant's prepare printed the same error amid DVC's warnings (walk P88): prepare's one error comes first."""
    (tmp_path / "data").mkdir()
    with pytest.raises(TransferkitError, match=r"^CIFAR10 not found in .*/data/ and not downloadable "
                                               r"\(data.download=false\)\. Fix: provide it one of three ways"):
        main(["--out", str(tmp_path / "out"), f"paths.data_dir={tmp_path / 'data'}", "data.download=false"])
    assert not (tmp_path / "out").exists()


def test_a_dataset_outside_data_dir_is_a_dep_of_each_quadrants_prepare(tmp_path):
    """As in dvc.yaml: under DVC, prepare refuses a dataset file its stage does not depend on."""
    from transferkit.scenarios.report import pipeline, strategies

    archive = tmp_path / "elsewhere.tar.gz"
    archive.write_bytes(b"an archive")
    stages = pipeline(tmp_path / "out", [f"data.source.dataset={archive}", f"data.target.dataset={archive}"],
                      strategies())
    prepares = [stage for name, stage in stages.items() if name.endswith("-prepare")]
    assert len(prepares) == 4 and all(stage["deps"].count(str(archive)) == 1 for stage in prepares)
    # each strategy reruns when a setting it is scored with changes (evaluate.tta), not when evaluate's timings do
    for name, stage in stages.items():
        if not name.endswith(("-prepare", "-pretrain")):
            tracked = next(iter(stage["params"][0].values()))
            assert "evaluate.tta" in tracked and not any(k.startswith("evaluate.latency") for k in tracked), name


def test_turning_the_progress_bar_on_reruns_no_scenario_stage(tmp_path):
    """DVC watched the whole trainer block of each quadrant's params file: rerunning a finished scenarios run
    with trainer.progress_bar=true (to watch it) or another trainer.checkpoint_budget retrained everything."""
    from transferkit.config.dvcyaml import TRAINER_DISPLAY
    from transferkit.scenarios.report import pipeline, strategies

    stages = pipeline(tmp_path / "out", ["trainer.progress_bar=true"], strategies())
    trainers = [stage for stage in stages.values() if any(k.startswith("trainer.")
                                                           for k in next(iter(stage["params"][0].values())))]
    assert trainers, stages  # the trainer settings that change a result are watched, key by key
    for stage in trainers:
        tracked = next(iter(stage["params"][0].values()))
        assert "trainer" not in tracked
        assert "trainer.precision" in tracked and not {f"trainer.{k}" for k in TRAINER_DISPLAY} & set(tracked)


def test_a_dry_run_names_the_stages_a_run_would_run_and_runs_none(tmp_path, capsys):
    """--dry: the stages DVC would run, the other quadrant's prepare among them where the chosen quadrant's
    pretraining reads it (both similar-source quadrants share one pretraining, made from small_similar's prepared
    source); none runs, and no report is written."""
    import re

    write_image_folder(tmp_path / "data", CIFAR10_CLASSES, train_per_class=1, test_per_class=1, archive=False)
    out = tmp_path / "out"
    assert main(["--out", str(out), "--only", "large_similar", "--dry", f"paths.data_dir={tmp_path / 'data'}"]) == 0
    shown = capsys.readouterr().out
    would = re.findall(r"^would run (\S+)$", shown, re.M)
    assert sorted(would) == sorted(["scenario_small_similar-prepare", "similar-pretrain", "scenario_large_similar-"
                                    "prepare", *(f"scenario_large_similar-{s}" for s in STRATEGIES)]), shown
    assert f"transferkit scenarios --dry: 8 stages of {out} would run, and none ran (without --dry" in shown
    assert sorted(p.name for p in out.iterdir()) == [".dvc", ".dvcignore", "dvc.yaml", "params"]  # no run's folder


def _quadrant(epochs: dict) -> dict:
    rows = [{"strategy": name, "label": name.replace("_", " "), "what": "", "epochs": n, "val_acc": 0.5,
             "val_ci95": [0.4, 0.6], "test_acc": 0.5, "test_ci95": [0.4, 0.6], "train_seconds": 1.0,
             "chosen_on_val": name == "linear_probe", "best_on_test": name == "linear_probe", "tied_on_val": False}
            for name, n in epochs.items()]
    return {"preset": "scenario_small_similar", "title": "small target + similar source", "target_classes": TARGET,
            "source_classes": ANIMALS, "n_train": 1200, "n_val": 300, "n_test": 3000, "n_source_train": 15000,
            "pretrain_epochs": 1, "pretrain_folder": "pretrain-similar", "pretrain_source_test_acc": 0.5,
            "rows": rows, "agrees": True, "guidance": {"strategy": "linear_probe", "text": "linear classifier"}}


def test_the_progress_bar_is_off_in_every_quadrant_unless_asked_for(tmp_path):
    """Each quadrant's params file turns the progress bar off; trainer.progress_bar=true, given to watch the runs,
    is kept."""
    from transferkit.scenarios.report import pipeline, strategies

    for overrides, shown in (([], False), (["trainer.progress_bar=true"], True)):
        out = tmp_path / str(shown)
        stages = pipeline(out, overrides, strategies())
        for preset in QUADRANTS:
            assert yaml.safe_load((out / "params" / f"{preset}.yaml").read_text())["trainer"]["progress_bar"] is shown
        # each run's one output kept while DVC runs it again, as in the project's dvc.yaml: a Ctrl+C leaves it
        assert all([list(o.values()) for o in stage["outs"]] == [[{"persist": True}]] for stage in stages.values())


def test_quadrants_of_one_source_whose_pretraining_would_differ_are_refused(tmp_path):
    """The two quadrants of a source share one pretraining: an override that composes differently in each (it
    follows a setting the quadrants set apart) would train the second quadrant's strategies on the first one's."""
    from transferkit.scenarios.report import pipeline, strategies

    with pytest.raises(TransferkitError, match=r"^scenario_large_similar and scenario_small_similar have the same "
                                               r"source but other pretraining settings: they cannot share one "
                                               r"pretraining\. Fix: override only what both may share\.$"):
        pipeline(tmp_path / "out", ["pretrain.epochs=${transfer.epochs}"], strategies())
    assert not (tmp_path / "out" / "params").exists()


def test_the_report_says_whether_the_strategies_train_equally_long():
    from transferkit.evaluation.tables import scenarios_markdown

    even = scenarios_markdown([_quadrant(dict.fromkeys(STRATEGIES, 4))])
    assert "Every strategy of a quadrant trains for the same number of epochs." in even
    assert "| 1.0 |" in even and "| 1 |" not in even  # a smoke run's seconds keep a decimal: not 0
    uneven = scenarios_markdown([_quadrant({**dict.fromkeys(STRATEGIES, 4), "partial_freeze": 3, "fine_tune": 3})])
    assert "same number of epochs" not in uneven
    assert ("The strategies train for different numbers of epochs, so their budgets differ: small target + similar "
            "source: linear probe 4, early probe 4, partial freeze 3, fine tune 3, scratch 4.") in uneven


def test_a_frozen_backbone_is_refused_before_it_makes_two_strategies_the_linear_probe(tmp_path):
    """partial_freeze and fine_tune differ only in their depth, which a backbone without a learning rate ignores."""
    from transferkit.scenarios.report import pipeline, strategies

    with pytest.raises(TransferkitError, match=r"^transfer.backbone_lr_mult=0 keeps every block frozen whatever "
                       r"transfer.freeze_depth, so the runs with depths \[0, 2\] would train one model, the linear "
                       r"probe, under 2 labels. Fix: "):
        pipeline(tmp_path / "out", ["transfer.backbone_lr_mult=0"], strategies())
    assert not (tmp_path / "out" / "params").exists()


def test_overrides_are_told_apart_from_options():
    args, overrides = parse(["--out", "runs/seed=1", "seed=1", "--only", "small_similar,large_different",
                             "model=vgg_mini", "--early-depth", "3", "--only", "small_different", "seed=2"])
    assert overrides == ["seed=1", "model=vgg_mini", "seed=2"]  # argv's order (pipeline() refuses the second seed)
    assert (str(args.out), args.only, args.early_depth) == (
        "runs/seed=1", ["small_similar", "large_different", "small_different"], 3)
    for argv in (["--only", "seed=1"], ["--only", "small_similar", "large_different"], ["--uot=runs"]):
        with pytest.raises(TransferkitError, match="unrecognized arguments.*Fix: see `transferkit scenarios --help`"):
            parse(argv)  # an override or a second name where --only takes NAME,NAME; a typo'd option
    for argv in (["--only", "small_similar,,large_different"], ["--only", ""]):  # no name between two commas
        with pytest.raises(TransferkitError, match=r"^--only '.*' lists an empty name \(it takes NAME,NAME of "
                                                   r"small_similar, small_different, large_similar, large_different\)"):
            parse(argv)


# ------------------------------------------------------------------ end to end, tiny
ONE_PER_SOURCE = ["small_similar", "large_different"]  # each stage is a process: two quadrants keep it short
TINY = ["model=fastnet_tiny", "trainer.progress_bar=false", "data.target.val_per_class=4",
        "pretrain.epochs=1", "transfer.epochs=1", "probe.epochs=1", "scratch.epochs=1",
        "pretrain.batch_size=64", "transfer.batch_size=64", "probe.batch_size=64", "scratch.batch_size=64",
        "evaluate.batch_size=256"]


@pytest.mark.slow
def test_scenarios_end_to_end(tmp_path, server_dir, one_thread, monkeypatch):
    """An image folder with the CIFAR-10 class names: enough target images for the small
    quadrants' 400 per class, a handful of source images; one full run, then a rerun (one test:
    the rerun changes the folder that the checks before it read).
    The stages run warm (TRANSFERKIT_WARM=1, as a user may): each of the 16 processes would
    otherwise spend most of its time importing torch and Lightning, and test_warm finds the
    outputs of warm and fresh stages identical."""
    monkeypatch.setenv("TRANSFERKIT_WARM", "1")
    tiny = _tiny(tmp_path)
    _fills_its_quadrants_by_five_strategies(tiny)
    _same_source_quadrants_share_one_pretraining(tiny)
    _rerun_skips_finished_work_and_reruns_what_a_change_touches(tiny)


@pytest.mark.parametrize("preset", ["scenario_small_different", "scenario_large_similar"])
def test_the_quadrants_the_end_to_end_run_leaves_out_prepare_pretrain_and_transfer(tmp_path, preset):
    """The end-to-end run trains one quadrant per source; the other two presets were only composed."""
    from conftest import run as run_stage

    others = [c for c in CIFAR10_CLASSES if c not in TARGET]
    write_image_folder(tmp_path / "data", TARGET, train_per_class=410, test_per_class=6, archive=False)
    write_image_folder(tmp_path / "data", others, train_per_class=10, test_per_class=2, archive=False)
    cfg = compose(f"experiment={preset}", *TINY, tmp=tmp_path)
    results = {stage: run_stage(stage, cfg) for stage in ("prepare", "pretrain", "transfer")}
    source, target = results["prepare"]["source"], results["prepare"]["target"]
    assert source["classes"] == sorted(cfg.data.source.classes) and target["classes"] == TARGET
    assert target["n_train"] == 3 * (400 if "small" in preset else 406) and target["n_test"] == 18
    assert 0.0 <= results["transfer"]["val_acc"] <= 1.0


def test_a_failed_quadrant_leaves_the_report_of_those_that_finished_and_ends_in_its_failure(tmp_path, monkeypatch,
                                                                                            capsys):
    """Four quadrants run for hours: one failed stage (DVC went on past it) leaves its quadrant out of the report,
    the others are reported, and the run ends in the failure; no timing of a run whose stages DVC did not list."""
    import transferkit.scenarios.report as report
    from transferkit.project import RUNS_HEADER, ReproFailed

    out, failed = tmp_path / "out", "scenario_small_different-fine_tune"

    def run_pipeline(folder, stages, targets, by):
        raise ReproFailed(f"{failed} failed; `dvc repro --keep-going` exited with code 1")

    monkeypatch.setattr(report, "pipeline", lambda *args, **kwargs: {f"{p}-fine_tune": {} for p in QUADRANTS})
    monkeypatch.setattr(report, "run_pipeline", run_pipeline)
    monkeypatch.setattr(report, "stale_stages", lambda folder: [failed])
    monkeypatch.setattr(report, "score_quadrant", lambda out, preset, *args: {"preset": preset})
    monkeypatch.setattr(report, "scenarios_markdown", lambda results, made_by: f"{len(results)} quadrants: {made_by}")
    out.mkdir()
    (out / "dvc.yaml").write_text(f"{RUNS_HEADER}stages: {{}}\n")  # an earlier run's folder, and its timing
    (out / "scenarios_timing.json").write_text("{}")
    with pytest.raises(ReproFailed, match=f"^{failed} failed"):
        run(out)
    reported = [q["preset"] for q in json.loads((out / "scenarios.json").read_text())["quadrants"]]
    assert reported == [p for p in QUADRANTS if p != "scenario_small_different"]
    assert (out / "scenarios.md").read_text() == (f"3 quadrants: transferkit scenarios --out {out} --only "
                                                  f"small_similar,large_similar,large_different --early-depth 2 "
                                                  f"--partial-depth 2")
    assert not (out / "scenarios_timing.json").exists()
    assert capsys.readouterr().out.endswith(f"wrote {out / 'scenarios.md'}, {out / 'scenarios.json'} of the "
                                            f"quadrants that finished\n")
    # --only: the quadrants an earlier run finished stay, as on success; a failed pretraining takes its two out
    monkeypatch.setattr(report, "stale_stages", lambda folder: [failed, "similar-pretrain"])
    with pytest.raises(ReproFailed):
        run(out, only=["small_different"])
    assert [q["preset"] for q in json.loads((out / "scenarios.json").read_text())["quadrants"]] == [
        "scenario_large_different"]
    # none finished: the earlier report stays as it was; a report that cannot be made leaves the failure the error
    before = (out / "scenarios.md").read_text()
    monkeypatch.setattr(report, "stale_stages", lambda folder: [failed, "similar-pretrain", "different-pretrain"])
    with pytest.raises(ReproFailed):
        run(out)
    assert (out / "scenarios.md").read_text() == before

    def broken(folder):
        raise TransferkitError("`dvc status` failed")

    monkeypatch.setattr(report, "stale_stages", broken)
    with pytest.raises(ReproFailed, match=f"^{failed} failed"):
        run(out)
    assert capsys.readouterr().err.endswith("no report of the quadrants that finished: `dvc status` failed\n")


def _tiny(tmp):
    others = [c for c in CIFAR10_CLASSES if c not in TARGET]
    write_image_folder(tmp / "data", TARGET, train_per_class=410, test_per_class=6, archive=False)
    write_image_folder(tmp / "data", others, train_per_class=10, test_per_class=2, archive=False)
    overrides = [*TINY, f"paths.data_dir={tmp / 'data'}"]
    summary = run(tmp / "out", only=ONE_PER_SOURCE, overrides=overrides)
    return tmp, overrides, summary


def _fills_its_quadrants_by_five_strategies(tiny):
    tmp, overrides, summary = tiny
    quadrants = summary["quadrants"]
    assert [q["preset"] for q in quadrants] == [f"scenario_{q}" for q in ONE_PER_SOURCE]
    stages = yaml.safe_load((tmp / "out" / "dvc.yaml").read_text())["stages"]  # all four are declared
    assert len(stages) == 4 + 2 + 4 * 5
    code = [d for stage in stages.values() for d in stage["deps"] if "/src/transferkit" in d]
    assert code and all(d.endswith(".py") for d in code)  # files, not the package folder bytecode is written into
    for q in quadrants:
        assert [r["strategy"] for r in q["rows"]] == STRATEGIES
        assert q["n_train"] == 3 * (400 if q["size"] == "small" else 406) and q["n_val"] == 12
        assert q["n_test"] == 18 and q["target_classes"] == TARGET
        chosen = [r for r in q["rows"] if r["chosen_on_val"]]
        assert len(chosen) == 1 and chosen[0]["strategy"] == q["winner_on_val"]
        assert chosen[0]["val_acc"] == max(r["val_acc"] for r in q["rows"])
        assert q["agrees"] == (q["winner_on_val"] == q["guidance"]["strategy"])
        for r in q["rows"]:
            lo, hi = r["test_ci95"]
            assert lo <= r["test_acc"] <= hi
    # collect takes a quadrant as a runs folder, scored on the quadrant's own prepare (not the project's artifacts/)
    from transferkit.evaluation.runs import score
    from transferkit.sweep.collect import find_runs

    runs = find_runs([tmp / "out" / quadrants[0]["preset"]])
    score(runs)
    assert {r.folder.name: r.test_acc for r in runs} == {r["strategy"]: r["test_acc"] for r in quadrants[0]["rows"]}
    table = (tmp / "out" / "scenarios.md").read_text()
    assert table.count("** ◀ val") == 2 and "linear classifier on the features" in table
    # what made it, so a report an earlier run with other settings left says so itself (--out: the same folder)
    made_by = (f"Made by `transferkit scenarios --out {tmp / 'out'} --only {','.join(ONE_PER_SOURCE)} --early-depth 2 "
               f"--partial-depth 2 {' '.join(overrides)}`.")
    assert made_by in table, table[:600]
    assert "fine-tune all from the pretrained init" in table


def _same_source_quadrants_share_one_pretraining(tiny):
    tmp, _, summary = tiny
    out = tmp / "out"
    assert {q["preset"]: q["pretrain_folder"] for q in summary["quadrants"]} == {
        "scenario_small_similar": "pretrain-similar", "scenario_large_different": "pretrain-different"}
    assert sorted(p.name for p in out.glob("pretrain-*")) == ["pretrain-different", "pretrain-similar"]
    stages = yaml.safe_load((out / "dvc.yaml").read_text())["stages"]
    # one pretraining per source: the large quadrant's strategies read the small quadrant's
    assert ("--in pretrain=pretrain-similar --out scenario_large_similar/fine_tune"
            in stages["scenario_large_similar-fine_tune"]["cmd"])
    assert "similar-pretrain" in stages and "large_similar-pretrain" not in " ".join(stages)
    # scratch reads no pretraining: a change to pretraining does not train it again
    scratch = stages["scenario_large_similar-scratch"]
    assert "--in pretrain" not in scratch["cmd"] and not [d for d in scratch["deps"] if "pretrain-" in d]
    # different sources, different backbones
    assert ((out / "pretrain-similar" / "model.pt").read_bytes()
            != (out / "pretrain-different" / "model.pt").read_bytes())
    from transferkit.models import load_checkpoint

    probe, ckpt = load_checkpoint(out / "scenario_small_similar" / "early_probe" / "model.pt", "probe")
    assert probe.num_blocks == 2 and ckpt["arch"]["depth"] == 2


def _rerun_skips_finished_work_and_reruns_what_a_change_touches(tiny):
    tmp, overrides, summary = tiny
    out = tmp / "out"
    models = sorted(out.rglob("model.pt"))
    assert len(models) == 2 + 2 * 5  # two pretrainings, five strategies per quadrant
    stamps = {p: p.stat().st_mtime_ns for p in models}
    assert main(["--out", str(out), "--only", ",".join(ONE_PER_SOURCE), *overrides]) == 0
    assert json.loads((out / "scenarios_timing.json").read_text())["stages_run"] == []  # DVC: all up to date
    assert {p: p.stat().st_mtime_ns for p in models} == stamps
    assert json.loads((out / "scenarios.json").read_text()) == json.loads(json.dumps(summary))
    # one quadrant asked for: the other, finished with these settings and code, stays in the report (it was
    # rewritten with the one quadrant asked for)
    run(out, only=["small_similar"], overrides=overrides)
    assert json.loads((out / "scenarios.json").read_text()) == json.loads(json.dumps(summary))
    assert f"--only {','.join(ONE_PER_SOURCE)} " in (out / "scenarios.md").read_text()
    # another setting: DVC reruns the stages whose settings changed, nothing else (scratch trains
    # with transfer's block: its baseline follows it)
    would = run(out, only=["small_similar"], overrides=[*overrides, "transfer.lr=0.5"], dry=True)["would_run"]
    run(out, only=["small_similar"], overrides=[*overrides, "transfer.lr=0.5"])
    ran = json.loads((out / "scenarios_timing.json").read_text())["stages_run"]
    assert sorted(ran) == [f"scenario_small_similar-{s}" for s in ("fine_tune", "partial_freeze", "scratch")], ran
    assert sorted(would) == sorted(ran)  # what --dry said the run would run
    # the other quadrant was made with the old setting: it leaves the report until it is run with the new one
    assert [q["preset"] for q in json.loads((out / "scenarios.json").read_text())["quadrants"]] == [
        "scenario_small_similar"]
    assert (out / "scenario_large_different" / "scratch" / "model.pt").stat().st_mtime_ns == \
        stamps[out / "scenario_large_different" / "scratch" / "model.pt"]


def _scored_quadrant(tmp_path, monkeypatch, scores: dict, size: str = "small", similarity: str = "similar") -> dict:
    """score_quadrant of a quadrant whose strategies score `scores` (strategy -> (val top-1 or None where the run
    has no val split, test top-1)) on 120 synthetic test images; the scoring itself is stubbed."""
    import torch

    from transferkit.data.synthetic import make_synthetic
    from transferkit.data.tasks import select_task
    from transferkit.evaluation import scenarios
    from transferkit.io import save_torch
    from transferkit.scenarios.report import strategies

    preset = f"scenario_{size}_{similarity}"
    task = select_task(make_synthetic(TARGET, 4, 40, seed=0), TARGET, train_per_class=2, val_per_class=1,
                       test_per_class=None, seed=0, role="target")
    save_torch(task, tmp_path / preset / "prepare" / "target.pt")
    n = len(task["test_y"])
    (tmp_path / preset / "prepare" / "summary.json").write_text(json.dumps(
        {"source": {"classes": ANIMALS, "n_train": 30}}))
    (tmp_path / f"pretrain-{similarity}").mkdir()
    (tmp_path / f"pretrain-{similarity}" / "metrics.json").write_text(json.dumps({"test_acc": 0.5}))
    plan = strategies()
    for s in plan:
        folder = tmp_path / preset / s.name
        folder.mkdir()
        (folder / "params.yaml").write_text(yaml.safe_dump({"seed": 0, s.stage: {"epochs": 1},
                                                            "pretrain": {"epochs": 1}}))
        val = scores[s.name][0]
        (folder / "metrics.json").write_text(json.dumps({} if val is None else {"val_acc": val}))

    def score(runs, task=None, cache_file=None):
        for r in runs:
            r.correct = torch.arange(n) < round(scores[r.folder.name][1] * n)
            r.test_acc = float(r.correct.float().mean())

    monkeypatch.setattr(scenarios, "score", score)
    return scenarios.score_quadrant(tmp_path, preset, size, similarity, plan)


def test_a_quadrant_names_its_winner_on_val_its_best_on_test_and_the_guidance_against_the_winner(tmp_path,
                                                                                                monkeypatch):
    """score_quadrant on made-up scores: the winner is the best on val, the best on test is chosen on test (not
    on val), and guided_minus_winner_test is the guided strategy's test accuracy minus the winner's."""
    from transferkit.evaluation.tables import scenario_verdict

    # val: fine_tune wins; test: linear_probe (the guidance) is best, 10 points over fine_tune
    scores = {"linear_probe": (0.5, 0.80), "early_probe": (0.4, 0.60), "partial_freeze": (0.6, 0.65),
              "fine_tune": (0.7, 0.70), "scratch": (0.3, 0.50)}
    q = _scored_quadrant(tmp_path, monkeypatch, scores)
    n = q["n_test"]
    assert q["winner_on_val"] == "fine_tune" and q["best_on_test"] == "linear_probe"
    assert [r["strategy"] for r in q["rows"] if r["best_on_test"]] == ["linear_probe"]
    assert q["agrees"] is False and q["guidance"]["strategy"] == "linear_probe"
    assert q["guided_minus_winner_test"]["difference"] == pytest.approx(0.10)
    lo, hi = q["guided_minus_winner_test"]["ci95"]
    assert 0 < lo < hi
    assert scenario_verdict(q).startswith("no: linear probe is +10.0 points on test vs the winner (")
    assert scenario_verdict(q).endswith("; guidance better on test)")
    labels = {r["strategy"]: r["label"] for r in q["rows"]}
    for r in q["rows"]:  # the winner given more epochs than the guidance: the verdict says what it compares
        r["epochs"] = 2 if r["strategy"] == "fine_tune" else 1
    assert scenario_verdict(q).endswith(f"; guidance better on test; budgets differ: {labels['linear_probe']} 1 epoch, "
                                        f"{labels['fine_tune']} 2)")
    from transferkit.evaluation.metrics import wilson_interval

    probe = q["rows"][0]  # each interval over its own split's images: val 3, test 120
    assert probe["val_ci95"] == list(wilson_interval(round(0.5 * 3), 3)) and q["n_val"] == 3
    assert probe["test_ci95"] == list(wilson_interval(96, 120)) and q["n_test"] == n == 120


def test_a_tie_on_val_goes_to_the_earlier_strategy_and_the_verdict_says_the_guidance_tied(tmp_path, monkeypatch):
    """small target + different source advises early_probe: tied on val with linear_probe, the earlier (cheaper)
    linear_probe wins, and the verdict says the guidance lost a tie, not that it was worse on val."""
    from transferkit.evaluation.tables import scenario_verdict

    scores = {"linear_probe": (0.6, 0.50), "early_probe": (0.6, 0.50), "partial_freeze": (0.5, 0.80),
              "fine_tune": (0.4, 0.80), "scratch": (0.3, 0.50)}
    q = _scored_quadrant(tmp_path, monkeypatch, scores, similarity="different")
    assert q["winner_on_val"] == "linear_probe" and q["guidance"]["strategy"] == "early_probe"
    assert [r["strategy"] for r in q["rows"] if r["chosen_on_val"]] == ["linear_probe"]
    assert q["agrees"] is False and q["guided_ties_winner_on_val"] is True
    label = next(r["label"] for r in q["rows"] if r["strategy"] == "early_probe")
    assert scenario_verdict(q).startswith(f"no, tied on val (ties go to the earlier strategy): {label} is +0.0 "
                                          "points on test vs the winner (")
    assert scenario_verdict(q).endswith("; within noise)")


def test_strategies_tied_with_the_winner_on_val_are_marked_in_the_report(tmp_path, monkeypatch):
    """A winner chosen from a tie on val (the earlier strategy) is not better on val than the strategies it tied
    with: the report marks them, in its summary, the quadrant's table and the verdict on the advice."""
    from transferkit.evaluation.tables import scenario_verdict, scenarios_markdown

    scores = {"linear_probe": (0.6, 0.50), "early_probe": (0.5, 0.50), "partial_freeze": (0.5, 0.80),
              "fine_tune": (0.6, 0.80), "scratch": (0.3, 0.50)}
    q = _scored_quadrant(tmp_path, monkeypatch, scores)  # small target + similar source advises linear_probe
    assert q["winner_on_val"] == "linear_probe" and q["agrees"] is True
    assert [r["strategy"] for r in q["rows"] if r["tied_on_val"]] == ["fine_tune"]
    fine_tune = next(r["label"] for r in q["rows"] if r["strategy"] == "fine_tune")
    assert scenario_verdict(q) == f"yes, tied on val with {fine_tune} (ties go to the earlier strategy)"
    report = scenarios_markdown([q])
    assert f"| {fine_tune} (tied) | " in report and "(tied) | 50.0 |" in report  # the summary's winner column
    for tie in ({}, {"fine_tune": (0.5, 0.80)}):  # the guidance wins alone, or loses a tie between two others
        q = _scored_quadrant(tmp_path / str(len(tie)), monkeypatch, {**scores, **tie, "linear_probe": (0.4, 0.5),
                                                                     "partial_freeze": (0.6, 0.80)})
        assert q["agrees"] is False and q["winner_on_val"] == "partial_freeze"
        assert [r["strategy"] for r in q["rows"] if r["tied_on_val"]] == (["fine_tune"] if not tie else [])
        assert (f"| {fine_tune} (tied) | " in scenarios_markdown([q])) is not bool(tie)  # (a tie on test: its own)


def test_strategies_tied_on_test_are_all_best_on_test_in_the_report(tmp_path, monkeypatch):
    """Four strategies level on test: the summary named the first as best on test, so the val winner read as worse
    on test than it is (walk I84). Each tied strategy is marked, and the summary lists them as tied."""
    from transferkit.evaluation.tables import scenarios_markdown

    scores = {"linear_probe": (0.5, 0.50), "early_probe": (0.4, 0.50), "partial_freeze": (0.6, 0.50),
              "fine_tune": (0.3, 0.40), "scratch": (0.2, 0.50)}
    q = _scored_quadrant(tmp_path, monkeypatch, scores)
    assert [r["strategy"] for r in q["rows"] if r["best_on_test"]] == ["linear_probe", "early_probe",
                                                                       "partial_freeze", "scratch"]
    assert q["best_on_test"] == "linear_probe" and q["tied_on_test"] == ["early_probe", "partial_freeze", "scratch"]
    labels = [r["label"] for r in q["rows"] if r["best_on_test"]]
    report = scenarios_markdown([q])
    assert f"| {', '.join(labels)} (tied, 50.0) | " in report, report
    assert report.count("(best on test)") == 4


def test_a_quadrant_without_val_splits_chooses_no_winner(tmp_path, monkeypatch):
    """Runs without a val split have no val accuracy: no winner and no verdict on the advice (not a TypeError from
    comparing None), the best on test still named."""
    from transferkit.evaluation.tables import scenario_verdict, scenarios_markdown

    scores = {"linear_probe": (None, 0.80), "early_probe": (None, 0.60), "partial_freeze": (None, 0.65),
              "fine_tune": (None, 0.70), "scratch": (None, 0.50)}
    q = _scored_quadrant(tmp_path, monkeypatch, scores)
    assert q["winner_on_val"] is None and q["agrees"] is None and q["guided_minus_winner_test"] is None
    assert not any(r["chosen_on_val"] for r in q["rows"]) and q["best_on_test"] == "linear_probe"
    assert scenario_verdict(q) == "– (no validation split)"
    assert "| linear probe (80.0) | – (no validation split) |" in scenarios_markdown([q])
    q["pretrain_epochs"] = 1
    assert ", pretrained 1 epoch (" in scenarios_markdown([q])
