"""conf/ is the source of truth: params.yaml must equal its composition, every preset must
compose and validate, and bad values fail before any work with a message naming the key."""

from __future__ import annotations


import pytest

from conftest import CONF, ROOT, compose
from transferkit.config.compose import params_text
from transferkit.config.drift import params_drift
from transferkit.config.checks import validate, validate_depths
from transferkit.errors import TransferkitError

EXPERIMENTS = sorted(p.stem for p in (CONF / "experiment").glob("*.yaml"))


def test_params_yaml_matches_conf():
    drift = params_drift(ROOT / "params.yaml", CONF)
    assert drift == [], "params.yaml drifted from conf/; run `transferkit params`:\n" + "\n".join(drift)


def test_drift_is_detected(tmp_path):
    import yaml

    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["transfer"]["freeze_depth"] += 2
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    drift = params_drift(tmp_path / "params.yaml", CONF)
    assert any(d.startswith("transfer.freeze_depth") for d in drift)


def test_overrides_recorded_by_transferkit_params_are_not_drift(tmp_path):
    overrides = ["transfer.freeze_depth=2", "prune.keep=[head,blocks.0]"]
    (tmp_path / "params.yaml").write_text(params_text(compose(*overrides), overrides))
    assert params_drift(tmp_path / "params.yaml", CONF) == []
    (tmp_path / "params.yaml").write_text(params_text(compose(*overrides)))  # not recorded: drift
    assert ({d.split(":")[0] for d in params_drift(tmp_path / "params.yaml", CONF)}
            == {"transfer.freeze_depth", "prune.keep"})


def test_the_fix_for_drift_names_the_command_that_keeps_the_values_params_yaml_has(tmp_path):
    """`dvc exp run -S experiment=smoke -S pretrain.epochs=2` writes params.yaml without the overrides line: the
    fix gives both commands, conf/ as it is and the one that writes params.yaml again as it is; a file no command
    writes (a key edited to a value of the wrong kind, say) gets the first alone. A name of its own is one of the
    values kept."""
    import shlex

    from transferkit.config.drift import regenerate_fix
    from transferkit.config.compose import to_params
    from transferkit.plain import flatten

    file = tmp_path / "params.yaml"
    (tmp_path / "conf").symlink_to(CONF)  # a project: its name is an experiment of its conf/
    file.write_text(params_text(compose("experiment=smoke", "pretrain.epochs=2", "prune.keep=[head,blocks.0]")))
    fix = regenerate_fix(file, CONF)
    assert fix.startswith("Fix: run `transferkit params experiment=smoke` to compose conf/ as it is now, or "
                          "`transferkit params experiment=smoke pretrain.epochs=2 'prune.keep=[head, blocks.0]'` to "
                          "keep the values params.yaml has"), fix
    kept = shlex.split(fix.split(" or `transferkit params ")[1].split("`")[0])
    assert flatten(to_params(compose(*kept))) == flatten(yaml_of(file))  # it writes the same file again
    file.write_text(file.read_text().replace("name: smoke", "name: smoke\nextra: 1"))
    assert " or `" not in regenerate_fix(file, CONF)
    file.write_text(params_text(compose("name=mine", "transfer.lr=0.2")))  # -S name=mine: a name, no experiment
    fix = regenerate_fix(file, CONF)
    assert "or `transferkit params name=mine transfer.lr=0.2` to keep the values params.yaml has" in fix, fix


def yaml_of(path):
    import yaml

    return yaml.safe_load(path.read_text())


def test_params_yaml_is_the_default_experiment():
    assert params_text(compose(), []) == (ROOT / "params.yaml").read_text()  # as `transferkit params` writes it


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_composes_and_validates(experiment):
    cfg = compose(f"experiment={experiment}")
    validate(cfg)
    assert cfg.name == experiment
    assert "hydra" not in cfg


# preset -> (strategy, devices, nodes, deterministic algorithms, warn only, cuDNN autotuning) of its Trainer
TRAINERS = {"cpu": ("SingleDeviceStrategy", 1, 1, True, False, False),
            "gpu": ("SingleDeviceStrategy", 1, 1, False, False, True),
            "ddp": ("DDPStrategy", 2, 1, True, True, False),
            "ddp_multinode": ("DDPStrategy", 4, 2, False, False, True)}


def test_more_calibration_images_than_the_target_trains_on_are_refused_when_params_are_written():
    """quantize's own check came once prune had trained; where train_per_class sets the count, `transferkit params`
    (every stage) and a quantize run refuse it first. A run of another stage is no concern of it."""
    from transferkit.config.checks import validate_run

    cfg = compose("quantize.calibration_images=100000")
    for stage, all_stages in (("quantize", False), (None, True)):
        with pytest.raises(TransferkitError, match=r"quantize.calibration_images=100000 is invalid: the target task "
                                                   r"has 2000 training images to calibrate on \(400 per class\)"):
            validate_run(cfg, stage, {}, all_stages)
    validate_run(cfg, "transfer", {})
    validate_run(compose("quantize.calibration_images=100000", "data.target.train_per_class=null"), None, {}, True)
    validate_run(compose("quantize.calibration_images=2000"), "quantize", {})  # every training image: allowed


def test_a_channel_ratio_that_would_empty_a_layer_is_refused_when_params_are_written():
    """The prune stage refuses it, once pretrain, transfer and distill have trained: `transferkit params` first."""
    from transferkit.config.checks import validate_run

    cfg = compose("experiment=smoke", "prune.target=channels", "prune.ratio=0.9")
    with pytest.raises(TransferkitError, match=r"prune.ratio=0.9 would leave \d+ layer\(s\) no channel"):
        validate_run(cfg, None, {}, all_stages=True)
    validate_run(cfg, "transfer", {})
    validate_run(compose("experiment=smoke", "prune.target=channels", "prune.ratio=0.5"), None, {}, all_stages=True)


def test_a_fixed_random_first_block_is_refused_when_params_are_written():
    """pretrain's or scratch's freeze_depth=1 keeps a first block fixed that only fastnet initialises from the data
    (and published weights, in pretrain): refused by `transferkit params`, not once the earlier stages have run.
    scratch starts at random whatever model.weights names, so published weights do not let it freeze its first block."""
    for stage in ("pretrain", "scratch"):
        with pytest.raises(TransferkitError, match=rf"{stage}.freeze_depth=1 keeps the first block fixed, but model "
                                                   rf"'vgg_mini' starts it at random.*Fix: set {stage}.freeze_depth=0"):
            validate(compose("model=vgg_mini", f"{stage}.freeze_depth=1"))
    with pytest.raises(TransferkitError, match=r"scratch.freeze_depth=1 keeps the first block fixed, but model "
                                               r"'resnet18' starts it at random"):
        validate(compose("model=resnet18", "model.weights=IMAGENET1K_V1", "scratch.freeze_depth=1"))
    validate(compose("model=resnet18", "model.weights=IMAGENET1K_V1", "pretrain.freeze_depth=1"))
    validate(compose("model=fastnet_tiny", "scratch.freeze_depth=1"))


def test_an_experiment_with_a_model_recipe_takes_another_model_whole():
    """experiment=cifar10_full trains fastnet as airbench does (model=fastnet_airbench): model=NAME beside it
    replaces that recipe's keys with the chosen model's, which no override could remove before (~model.KEY)."""
    from transferkit.config.checks import validate_run
    from transferkit.config.compose import to_params

    assert to_params(compose("experiment=cifar10_full").model) == {**to_params(compose("model=fastnet").model),
                                                                   "bn_momentum": 0.4, "dirac_init": True}
    cfg = compose("experiment=cifar10_full", "model=vgg_mini", "pretrain.freeze_depth=0")
    assert to_params(cfg.model) == to_params(compose("model=vgg_mini").model)
    validate_run(cfg, None, {}, all_stages=True)


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="auto is a GPU here, which takes -1")
@pytest.mark.parametrize("devices", [-1])
def test_devices_this_machine_lacks_are_one_error_naming_the_trainer_keys(devices, tmp_path):
    """accelerator auto on a machine without a GPU is a CPU, where Lightning refuses -1 devices (every GPU) with a
    TypeError: one error, not a traceback."""
    from transferkit.config.compose import to_params
    from transferkit.training.trainer import make_trainer

    cfg = compose("trainer.accelerator=auto", f"trainer.devices={devices}")
    validate(cfg)
    with pytest.raises(TransferkitError, match=rf"Lightning cannot set up trainer.{{accelerator, devices, strategy}} "
                                               rf"= auto, {devices}, auto here: .*Fix: set them to what this machine"):
        make_trainer({**to_params(cfg.trainer), "loggers": []}, tmp_path, 1)


@pytest.mark.parametrize("trainer", list(TRAINERS))
def test_every_trainer_preset_reaches_lightning(trainer, tmp_path, monkeypatch):
    """Each preset's Trainer, built on this CPU (accelerator=cpu: the rest as on GPUs or a cluster)."""
    import torch

    from transferkit.config.compose import to_params
    from transferkit.training.trainer import make_trainer

    monkeypatch.setenv("NODE_RANK", "0")  # ddp_multinode's copy on the first node

    cfg = compose(f"trainer={trainer}")
    validate(cfg)
    before = (torch.backends.cudnn.benchmark, torch.are_deterministic_algorithms_enabled(),
              torch.is_deterministic_algorithms_warn_only_enabled())
    try:
        t = make_trainer({**to_params(cfg.trainer), "accelerator": "cpu", "loggers": []}, tmp_path, 1)
        assert (type(t.strategy).__name__, t.num_devices, t.num_nodes, torch.are_deterministic_algorithms_enabled(),
                torch.is_deterministic_algorithms_warn_only_enabled(),
                torch.backends.cudnn.benchmark) == TRAINERS[trainer]
    finally:  # Lightning sets these process-wide
        torch.backends.cudnn.benchmark = before[0]
        torch.use_deterministic_algorithms(before[1], warn_only=before[2])


@pytest.mark.parametrize("overrides", [["trainer=ddp", "trainer.num_nodes=2"], ["trainer=ddp_multinode"]])
def test_several_nodes_with_no_launcher_nor_node_rank_are_refused_before_they_wait_for_ever(overrides, tmp_path,
                                                                                           monkeypatch):
    """`trainer=ddp trainer.num_nodes=2` on one machine, with no Slurm, torchrun or NODE_RANK: every copy took node
    rank 0 and waited for the other node's processes for ever. With NODE_RANK set (a copy per node), it builds."""
    import torch

    from transferkit.config.compose import to_params
    from transferkit.training import RANK_VARIABLES
    from transferkit.training.trainer import make_trainer

    for var in (*RANK_VARIABLES, "SLURM_NTASKS", "TORCHELASTIC_RUN_ID"):
        monkeypatch.delenv(var, raising=False)
    cfg = {**to_params(compose(*overrides).trainer), "accelerator": "cpu", "loggers": []}
    before = (torch.backends.cudnn.benchmark, torch.are_deterministic_algorithms_enabled(),
              torch.is_deterministic_algorithms_warn_only_enabled())
    try:
        with pytest.raises(TransferkitError, match=r"^trainer.num_nodes=2 needs one copy of the command per node, .* "
                                                   r"Fix: on each node run it with MASTER_ADDR=NODE0 "
                                                   r"MASTER_PORT=29500 NODE_RANK=R, or under srun or torchrun"):
            make_trainer(cfg, tmp_path, 1)
        monkeypatch.setenv("NODE_RANK", "1")
        assert make_trainer(cfg, tmp_path, 1).node_rank == 1
    finally:  # Lightning sets these process-wide
        torch.backends.cudnn.benchmark = before[0]
        torch.use_deterministic_algorithms(before[1], warn_only=before[2])


def test_unknown_override_key_is_refused_with_the_key_it_meant():
    # not Hydra's own advice (append it with +), which would add a setting no stage reads
    with pytest.raises(TransferkitError) as e:
        compose("transfer.freez_depth=2")
    message = str(e.value)
    assert message.startswith("conf/ has no setting transfer.freez_depth (did you mean transfer.freeze_depth")
    assert "\n" not in message and "+transfer" not in message
    # a key inside a block given whole: that key is the one named, not the block conf/ has
    with pytest.raises(TransferkitError, match=r"^conf/ has no setting distill.student.width_mult \(did you mean "
                                               r"distill.student.widths"):
        compose("distill.student={name:fastnet,width_mult:0.5}")


def test_a_setting_no_stage_reads_in_a_file_of_conf_is_not_called_missing_from_conf(tmp_path):
    """A typo in conf/config.yaml was "conf/ has no setting transfer.freez_depth ... Fix: override a setting conf/
    has", though conf/ has it and no override gave it."""
    import shutil

    from transferkit.config.compose import compose as compose_in

    shutil.copytree(ROOT / "conf", tmp_path / "conf")
    text = (tmp_path / "conf" / "config.yaml").read_text()
    (tmp_path / "conf" / "config.yaml").write_text(text.replace("\ntransfer:\n", "\ntransfer:\n  freez_depth: 2\n", 1))
    with pytest.raises(TransferkitError, match=r"^no stage reads transfer.freez_depth \(did you mean "
                                               r"transfer.freeze_depth[ ?].*: a file in conf/ \(`grep -rn "
                                               r"'freez_depth:' conf/`\), an override \+transfer.freez_depth=\.\.\. or "
                                               r"a params file sets it\. Fix: rename it, or remove it\.$"):
        validate(compose_in([], tmp_path / "conf"))


@pytest.mark.parametrize("choice, typo, meant", [("model=mobilenet", "model.width_mul=0.3", "model.width_mult"),
                                                  ("model=resnet18", "model.weight=x", "model.weights")])
def test_an_unknown_key_is_likened_to_the_keys_of_what_the_other_overrides_choose(choice, typo, meant):
    """The suggestions came from conf/'s default model (fastnet's widths, stem_width) whatever model= chose."""
    with pytest.raises(TransferkitError, match=rf"no setting {typo.split('=')[0]} \(did you mean {meant}[ ?]"):
        compose(choice, typo)


@pytest.mark.parametrize("override, needle", [
    ("experiment=smok", "experiment=smok: conf/experiment/ has no such option. Fix: use one of "
                        + ", ".join(EXPERIMENTS) + "."),
    ("model@distill.student=mobilnet", "model@distill.student=mobilnet: conf/model/ has no such option. Fix: use "
                                       "one of fastnet, "),
    ("hydra/launcher=local_paralel", "hydra/launcher=local_paralel: conf/hydra/launcher/ has no such option. Fix: "
                                     "use one of local_parallel, slurm or a Hydra plugin's."),
    # no option at all: was "bad override: In 'config': Could not find 'model/'", with no options named
    ("model=", "model=: conf/model/ has no such option. Fix: use one of fastnet, "),
    ("model@distill.student=", "model@distill.student=: conf/model/ has no such option. Fix: use one of fastnet, "),
])
def test_unknown_config_group_option_is_one_line_with_the_options(override, needle):
    with pytest.raises(TransferkitError) as e:
        compose(override)
    assert str(e.value).startswith(needle) and "\n" not in str(e.value) and "provider=" not in str(e.value)


def test_several_values_outside_a_sweep_are_one_line_naming_the_sweep_command():
    with pytest.raises(TransferkitError) as e:
        compose("transfer.freeze_depth=0,1,2")
    assert str(e.value) == ("transfer.freeze_depth=0,1,2 lists several values, and a composition holds one run's. "
                            "Fix: write a list as key=[a,b]; to run each value, `transferkit sweep STAGE "
                            "transfer.freeze_depth=0,1,2`.")


@pytest.mark.parametrize("override", ['hydra.sweeper.params={seed:"0,1"}', "+hydra.sweeper.params.seed='0,1'",
                                      "++hydra.sweeper.params={seed:'0,1'}"])
def test_a_sweep_declared_on_the_command_line_is_one_line_naming_the_two_ways(override):
    """hydra.sweeper.params is null in conf/: Hydra merging a value into it ended in OmegaConf's AttributeError or
    AssertionError traceback."""
    with pytest.raises(TransferkitError) as e:
        compose(override)
    assert str(e.value) == (f"{override}: hydra.sweeper.params is null in conf/, and Hydra cannot add to it from the "
                            f"command line. Fix: give each swept key as an override with -m (seed=0,1), or declare "
                            f"the sweep under hydra.sweeper.params in conf/config.yaml.")


@pytest.mark.parametrize("override", ["+seed=1", "+transfer.lr=0.5"])
def test_adding_a_setting_conf_has_is_one_line_saying_to_drop_the_plus(override):
    """Was Hydra's "Could not append to config. An item is already at 'seed'.." under "bad override", whose fix (write
    key=value with keys from conf/) the key already met."""
    with pytest.raises(TransferkitError) as e:
        compose(override)
    key, value = override[1:].split("=")
    assert str(e.value) == (f"{override}: conf/ has {key} already, and + adds a setting it lacks. Fix: drop the + "
                            f"({key}={value}).")


def test_a_conf_file_that_is_no_yaml_is_one_line_naming_it(tmp_path):
    import shutil

    from transferkit.config.compose import compose as compose_in

    shutil.copytree(CONF, tmp_path / "conf")
    (tmp_path / "conf" / "model" / "fastnet.yaml").write_text("name: fastnet\nwidths: [64, 256\n")  # an edit cut short
    with pytest.raises(TransferkitError) as e:
        compose_in([], tmp_path / "conf")
    assert str(e.value).startswith("conf/ holds a file that is not valid YAML") and "\n" not in str(e.value)
    assert "fastnet.yaml" in str(e.value) and "line 3" in str(e.value) and "Fix:" in str(e.value)


@pytest.mark.parametrize("override, key, value", [
    ("++transfer.freeze_depth=2", "transfer.freeze_depth", 2),
    ("+probe.depth=1", "probe.depth", 1),  # a key conf/ sets to null
    ("model@distill.student=mobilenet", "distill.student.name", "mobilenet"),
])
def test_overrides_hydra_accepts_compose(override, key, value):
    from omegaconf import OmegaConf

    assert OmegaConf.select(compose(override), key) == value


@pytest.mark.parametrize("override, key", [
    ("transfer.lr=-0.1", "transfer.lr"),
    ("pretrain.lr=0", "pretrain.lr"),
    ("scratch.epochs=0", "scratch.epochs"),
    ("transfer.batch_size=2.5", "transfer.batch_size"),
    ("probe.momentum=1.5", "probe.momentum"),
    ("transfer.label_smoothing=-1", "transfer.label_smoothing"),
    # in range for a float, useless for training: uniform targets, no gradient forgotten, BatchNorm statistics frozen
    ("transfer.label_smoothing=1", "transfer.label_smoothing=1 is invalid: must be less than 1"),
    ("pretrain.momentum=1", "pretrain.momentum=1 is invalid: must be less than 1"),
    ("model.bn_momentum=0", "model.bn_momentum=0 is invalid: must be greater than 0"),
    # Lightning refuses -1 devices on a CPU with a TypeError, after prepare and any earlier stage
    ("trainer.devices=-1", "trainer.devices=-1 is invalid: must be a count >= 1, auto, or on a GPU -1"),
    ("seed=-3", "seed"),
    ("data.target.train_per_class=0", "data.target.train_per_class"),
    ("data.target.val_per_class=-1", "data.target.val_per_class"),
    ("evaluate.latency_repeats=0", "evaluate.latency_repeats"),
    ("scratch.freeze_depth=2", "scratch.freeze_depth"),
    ("data.image_size=64", "data.image_size"),
    ("seed=4294967296", "seed"),  # numpy's generator, which every stage seeds, takes 32 bits
    ("transfer.warmup_fraction=1.5", "transfer.warmup_fraction=1.5 is invalid"),  # a share of the steps
    ("trainer.checkpoint_budget=2", "trainer.checkpoint_budget=2 is invalid"),  # a share of the training time
    # Lightning acts on true and "warn" only: any other value turns determinism off without a word
    ("trainer.deterministic=1", "trainer.deterministic"),
    ("trainer.deterministic=warm", "trainer.deterministic"),
    ("trainer.sync_batchnorm=maybe", "trainer.sync_batchnorm='maybe' is invalid"),
    ("trainer.benchmark=yes", "trainer.benchmark"),
    ("trainer.progress_bar=2", "trainer.progress_bar"),
    ("trainer.loggers=csv", "trainer.loggers='csv' is invalid"),  # a string would be read as its letters
    ("data.download=maybe", "data.download"),
    ("data.verify_checksums=no_thanks", "data.verify_checksums"),
    # prepare refuses these too, but `transferkit params` must not write them into params.yaml
    ("data.target.classes=[cat]", "at least 2 classes"),
    ("data.source.classes=[airplane,ship,ship]", "data.source.classes lists"),
])
def test_bad_numbers_name_the_key(override, key):
    with pytest.raises(TransferkitError, match=key.replace(".", r"\.")):
        validate(compose(override))


@pytest.mark.parametrize("override, need", [
    # a key of two types (bool or "warn") fails once per type: both named, whatever the value is
    ("trainer.deterministic={a:1}", "trainer.deterministic={'a': 1} is invalid: must be a valid boolean or must be "
                                    "'warn'. Fix"),
    ("trainer.deterministic={bool:1}", "trainer.deterministic={'bool': 1} is invalid: must be a valid boolean or "
                                       "must be 'warn'. Fix"),  # pydantic's tag of the type tried is no key
    # two bad items of a list: the first one's need alone, under its own index
    ("prune.rates=[-1,abc]", "prune.rates=[-1, 'abc'] is invalid: must be greater than or equal to 0 (item 0: -1). "
                             "Fix"),
    ("model.widths=[8,x]", "model.widths=[8, 'x'] is invalid: must be a valid integer (item 1: 'x'). Fix"),
])
def test_a_schema_error_names_the_key_and_the_one_value_it_is_about(override, need):
    with pytest.raises(TransferkitError) as e:
        validate(compose(override))
    assert str(e.value).startswith(need), str(e.value)


@pytest.mark.parametrize("override", ["trainer.loggers=null", "trainer.deterministic=null", "trainer.benchmark=null",
                                      "trainer.deterministic=warn"])
def test_values_lightning_takes_pass_the_schema(override):
    validate(compose(override))


def test_every_seed_numpys_generator_takes_passes_the_schema():
    """seed is any 32-bit unsigned value (2**32 and above are refused, test_bad_numbers_name_the_key)."""
    for seed in (0, 2**31, 2**32 - 1):
        validate(compose(f"seed={seed}"))


@pytest.mark.parametrize("devices", ["[0,0]", "'1,1'", "'0, 1, 0'"])
def test_a_device_id_listed_twice_is_refused_naming_the_key(devices):
    """trainer.devices on a GPU lists distinct device ids: one given twice is refused before any stage runs."""
    with pytest.raises(TransferkitError, match=r"trainer.devices=.* is invalid: .*distinct device ids"):
        validate(compose("trainer=gpu", f"trainer.devices={devices}"))
    validate(compose("trainer=gpu", "trainer.devices=[0,1]"))


def test_class_in_both_source_and_target_is_refused():
    with pytest.raises(TransferkitError, match=r"\['cat'\].*both"):
        validate(compose("data.source.classes=[airplane,cat]"))


def test_freeze_depth_beyond_the_number_of_blocks():
    cfg = compose("transfer.freeze_depth=5")
    with pytest.raises(TransferkitError, match=r"4 blocks.*0\.\.4"):
        validate_depths(cfg, "transfer", num_blocks=4)
    validate_depths(compose("transfer.freeze_depth=4"), "transfer", num_blocks=4)  # linear probe: allowed


def test_negative_backbone_lr_mult_and_probe_depth():
    with pytest.raises(TransferkitError, match="transfer.backbone_lr_mult"):
        validate(compose("transfer.backbone_lr_mult=-1"))
    with pytest.raises(TransferkitError, match="probe.depth"):
        validate_depths(compose("probe.depth=9"), "probe", num_blocks=4)


@pytest.mark.parametrize("overrides", [["trainer=ddp"], ["trainer.devices=2"], ["trainer.num_nodes=2"],
                                       ["trainer=gpu", "trainer.devices=[0,1]"]])
def test_gradual_unfreezing_in_several_processes_is_refused(overrides):
    with pytest.raises(TransferkitError, match="unfreeze_every_epochs > 0 is not supported in several processes"):
        validate(compose(*overrides, "transfer.unfreeze_every_epochs=2"))


@pytest.mark.parametrize("overrides", [[], ["trainer.devices=auto"], ["trainer.devices=2"], ["trainer=ddp"],
                                       ["trainer.num_nodes=2"], ["trainer=ddp_multinode"]])
def test_multi_process_says_what_lightning_runs(overrides, tmp_path, monkeypatch):
    """strategy auto with two devices or nodes is DDP in Lightning: the checks that depend on
    several processes must see it too."""
    import torch
    from omegaconf import OmegaConf

    from transferkit.config.compose import to_params
    from transferkit.training import multi_process
    from transferkit.training.trainer import make_trainer

    monkeypatch.setenv("NODE_RANK", "0")  # a multi-node run's copy on the first node

    trainer_cfg = OmegaConf.merge(compose(*overrides).trainer, {"accelerator": "cpu", "loggers": []})
    before = (torch.backends.cudnn.benchmark, torch.are_deterministic_algorithms_enabled(),
              torch.is_deterministic_algorithms_warn_only_enabled())
    try:
        t = make_trainer(to_params(trainer_cfg), tmp_path, 1)
        assert multi_process(trainer_cfg) == (t.num_devices * t.num_nodes > 1), type(t.strategy).__name__
    finally:  # Lightning sets these process-wide
        torch.backends.cudnn.benchmark = before[0]
        torch.use_deterministic_algorithms(before[1], warn_only=before[2])


def test_gradual_unfreezing_of_a_frozen_backbone_is_refused():
    with pytest.raises(TransferkitError, match="transfer.backbone_lr_mult=0 keeps frozen"):
        validate(compose("transfer.backbone_lr_mult=0", "transfer.unfreeze_every_epochs=1"))
    validate(compose("transfer.backbone_lr_mult=0"))  # a frozen backbone alone is the linear probe's setting


def test_gradual_unfreezing_that_unfreezes_no_block_within_the_run_is_refused():
    """The first block thaws as epoch `unfreeze_every_epochs` starts: a run of no more epochs is a fixed freeze
    labelled gradual (walk J85). Depth 0 everywhere has nothing to unfreeze, and a sweep over depths keeps it."""
    from omegaconf import OmegaConf

    for depths in (["transfer.freeze_depth=3", "freeze_curve.depths=[]"],
                   ["transfer.freeze_depth=0", "freeze_curve.depths=[0,2]"]):
        with pytest.raises(TransferkitError, match=r"^transfer.unfreeze_every_epochs=6 unfreezes a first block after "
                                                   r"epoch 6, and transfer.epochs=6: .* Fix: set it below"):
            validate(compose("experiment=smoke", *depths, "transfer.unfreeze_every_epochs=6"))
    cfg = compose("experiment=smoke", "transfer.unfreeze_every_epochs=6")  # a config without freeze_curve
    with pytest.raises(TransferkitError, match=r"^transfer.unfreeze_every_epochs=6 unfreezes"):
        validate(OmegaConf.masked_copy(cfg, [k for k in cfg if k != "freeze_curve"]))
    validate(compose("experiment=smoke", "transfer.freeze_depth=3", "transfer.unfreeze_every_epochs=5"))
    validate(compose("experiment=smoke", "transfer.freeze_depth=0", "freeze_curve.depths=[0]",
                     "transfer.unfreeze_every_epochs=6"))  # smoke's transfer depth is 1


def test_a_freeze_curve_of_a_frozen_backbone_is_refused():
    """Every point would train the fully frozen model and be labelled with its own depth."""
    from transferkit.config.checks import validate_run

    with pytest.raises(TransferkitError, match=r"freeze_curve.depths=\[0, 3\] is invalid: transfer.backbone_lr_mult=0 "
                                               r"keeps every block frozen.*freeze_curve.depths=\[\]"):
        validate_run(compose("transfer.backbone_lr_mult=0"), "freeze_curve", {})
    validate_run(compose("transfer.backbone_lr_mult=0", "freeze_curve.depths=[]"), None, {}, all_stages=True)
    validate_run(compose("transfer.backbone_lr_mult=0"), "transfer", {})  # the other stages run as they did


def test_dvc_is_set_up_to_compose_conf_for_experiments():
    # `dvc exp run -S key=value` recomposes conf/ into params.yaml only with this setting
    assert "enabled = True" in (ROOT / ".dvc" / "config").read_text()
    assert (ROOT / "data" / "README.md").exists()  # data/ is prepare's dependency, even before any download


@pytest.mark.parametrize("model", sorted(p.stem for p in (CONF / "model").glob("*.yaml")))
def test_every_model_preset_builds(model):
    from transferkit.models import model_from_config
    from transferkit.stages.common import container

    cfg = compose(f"model={model}")
    net = model_from_config(container(cfg.model), 5)
    assert net.num_blocks >= 4 and net.num_classes == 5


@pytest.mark.parametrize("model", sorted(p.stem for p in (CONF / "model").glob("fastnet*.yaml")))
def test_every_fastnet_preset_takes_every_fastnet_setting(model):
    """The presets hold their differences from fastnet: with experiment=smoke (fastnet_tiny), model.activation=relu
    was 'no setting model.activation', and the suggested model.dirac_init was refused too."""
    base = compose("model=fastnet").model
    cfg = compose(f"model={model}", "model.activation=relu", "model.dirac_init=true")
    assert set(cfg.model) == set(base) and cfg.model.activation == "relu" and cfg.model.dirac_init is True


def test_the_baselines_take_their_recipe_from_the_stage_they_are_compared_with():
    """scratch trains as transfer does and student as distill does, key for key: a change to the
    compared stage's block changes the baseline's with it (an explicit value of the baseline's own stays)."""
    from transferkit.stages.common import OPTIMISER_KEYS

    cfg = compose("experiment=smoke", "transfer.epochs=7", "transfer.lr=0.2", "distill.batch_size=8")
    for baseline, compared in (("scratch", "transfer"), ("student", "distill")):
        assert all(cfg[baseline][k] == cfg[compared][k] for k in (*OPTIMISER_KEYS, "epochs", "batch_size"))
    assert (cfg.scratch.epochs, cfg.scratch.lr, cfg.student.batch_size) == (7, 0.2, 8)
    assert cfg.scratch.freeze_depth == 0 != cfg.transfer.freeze_depth  # from random init: its own depth
    assert compose("scratch.epochs=9").scratch.epochs == 9 != compose().transfer.epochs


@pytest.mark.parametrize("value", [["bird", "deer"], None, 3, 0.001, float("inf"), "a,b", "a=b", "a b",
                                   {"a": [1, None]}, True, [1.5, "x,y"]])
def test_as_override_writes_what_hydra_reads_back(value):
    """A value the scenarios name in a fix, written as an override: Hydra reads the same value back (YAML wrote
    a,b, a sweep of two, and .inf, a word)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from transferkit.config.overrides import as_override

    assert OverridesParser.create().parse_override(f"k={as_override(value)}").value() == value
    assert as_override(["bird", "deer"]) == "[bird, deer]" and as_override(None) == "null"
    nan = OverridesParser.create().parse_override(f"k={as_override(float('nan'))}").value()
    assert nan != nan
