"""The RepDistiller / mdistiller CIFAR KD recipe (conf/experiment/cifar_kd_recipe.yaml) and one experiment per
published CIFAR-100 pair: every pair composes with the recipe's values, and one runs end to end on tiny
cifar-100-python pickles (CPU, 2 epochs per phase) reporting last and best-on-val accuracy for every model."""

from __future__ import annotations

import helpers
import pytest
from helpers import CONF, assert_ok, read_metrics, run_cli
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from kd_runner.models import ARCHS

RECIPE = "cifar_kd_recipe"
# experiment -> (teacher arch, student arch): RepDistiller's README tables (mdistiller's DKD tables share them)
PAIRS = {
    "cifar_resnet56_resnet20": ("resnet56", "resnet20"),
    "cifar_resnet110_resnet32": ("resnet110", "resnet32"),
    "cifar_resnet110_resnet20": ("resnet110", "resnet20"),
    "cifar_resnet32x4_resnet8x4": ("resnet32x4", "resnet8x4"),
    "cifar_wrn_40_2_wrn_16_2": ("wrn_40_2", "wrn_16_2"),
    "cifar_wrn_40_2_wrn_40_1": ("wrn_40_2", "wrn_40_1"),
    "cifar_vgg13_vgg8": ("vgg13", "vgg8"),
    "cifar_resnet32x4_shufflev2": ("resnet32x4", "shufflev2"),
    "cifar_resnet32x4_shufflev1": ("resnet32x4", "shufflev1"),
    "cifar_vgg13_mobilenetv2": ("vgg13", "mobilenetv2"),
    "cifar_resnet50_mobilenetv2": ("resnet50_cifar", "mobilenetv2"),
    "cifar_wrn_40_2_shufflev1": ("wrn_40_2", "shufflev1"),
}
LOW_LR_STUDENTS = {"mobilenetv2", "shufflev1", "shufflev2"}  # RepDistiller: lr 0.01 for these students


def compose_experiment(name: str, *overrides: str):
    with initialize_config_dir(config_dir=str(CONF), version_base=None):
        return compose(config_name="config", overrides=[f"experiment={name}", *overrides])


def assert_recipe(cfg, lr: float = 0.05) -> None:
    """The recipe's values; ``lr`` is the students' (the teacher always trains at 0.05)."""
    o = cfg.optimizer
    assert (o.name, o.lr, o.momentum, o.weight_decay, o.nesterov) == ("sgd", 0.05, 0.9, 5e-4, False)
    assert OmegaConf.merge(o, cfg.student_optimizer).lr == pytest.approx(lr)
    assert (cfg.scheduler.name, list(cfg.scheduler.milestones), cfg.scheduler.gamma) == (
        "multistep", [150, 180, 210], 0.1)
    t = cfg.trainer
    assert (t.batch_size, t.teacher_epochs, t.student_epochs) == (64, 240, 240)
    a = cfg.augment
    assert (a.crop_padding, a.hflip, sorted(a.phases)) == (4, True, ["baseline", "student", "teacher"])
    m = cfg.method
    assert (m.name, m.T, m.ce_weight, m.soft_weight, m.t_squared, m.kl_reduction) == (
        "kd", 4.0, 0.1, 0.9, True, "batchmean")
    assert cfg.dataset.val_fraction == 0.1  # best-on-val: the papers pick on test, kd-runner never does
    assert cfg.baseline is True


def test_recipe_composes_alone_on_cifar100():
    cfg = compose_experiment(RECIPE)
    assert_recipe(cfg)
    assert cfg.dataset.name == "cifar100"
    assert list(cfg.dataset.mean) == [0.5071, 0.4867, 0.4408] and list(cfg.dataset.std) == [0.2675, 0.2565, 0.2761]


@pytest.mark.parametrize("name", sorted(PAIRS))
def test_pair_composes_with_the_recipe(name):
    teacher, student = PAIRS[name]
    cfg = compose_experiment(name)
    assert_recipe(cfg, lr=0.01 if student in LOW_LR_STUDENTS else 0.05)
    assert cfg.dataset.name == "cifar100"
    assert (cfg.teacher.arch, cfg.student.arch) == (teacher, student)
    assert cfg.teacher.checkpoint is None  # the teacher is trained with the same recipe


@pytest.mark.parametrize("name", sorted(PAIRS))
def test_pair_file_overrides_only_what_changes(name):
    """Models in the defaults list, lr for MobileNetV2/ShuffleNet students: the rest comes from the recipe."""
    teacher, student = PAIRS[name]
    raw = OmegaConf.load(CONF / "experiment" / f"{name}.yaml")
    assert list(raw.defaults) == [f"/experiment/{RECIPE}", {"override /model@teacher": teacher},
                                  {"override /model@student": student}]
    rest = {k: v for k, v in OmegaConf.to_container(raw).items() if k != "defaults"}
    assert rest == ({"student_optimizer": {"lr": 0.01}} if student in LOW_LR_STUDENTS else {})


def test_every_recipe_experiment_is_a_published_pair():
    found = {p.stem for p in (CONF / "experiment").glob("cifar_*.yaml") if f"/experiment/{RECIPE}" in p.read_text()}
    assert found == set(PAIRS)


@pytest.mark.parametrize("name", ["cifar_resnet32x4_resnet8x4", "cifar_vgg13_mobilenetv2"])
def test_command_line_overrides_win(name):
    """dataset=cifar10 and seeds: the recipe stays; the teacher seed stays fixed while the student seed varies."""
    base = compose_experiment(name)
    cfg = compose_experiment(name, "dataset=cifar10", "seed=3", "optimizer.lr=0.1")
    assert cfg.dataset.name == "cifar10" and cfg.dataset.val_fraction == 0.1
    assert cfg.seed == 3 and cfg.teacher_seed == base.teacher_seed
    assert cfg.optimizer.lr == 0.1 and list(cfg.scheduler.milestones) == [150, 180, 210]
    assert (cfg.teacher.arch, cfg.student.arch) == PAIRS[name]


def test_recipe_with_models_on_the_command_line():
    cfg = compose_experiment(RECIPE, "model@teacher=wrn_40_2", "model@student=wrn_16_2")
    assert_recipe(cfg)
    assert (cfg.teacher.arch, cfg.student.arch) == ("wrn_40_2", "wrn_16_2")


def test_pair_models_are_zoo_archs():
    """Each pair's model YAML names a registered builder of the same name (the zoo's own tests build them)."""
    for arch in sorted({a for pair in PAIRS.values() for a in pair}):
        cfg = OmegaConf.load(CONF / "model" / f"{arch}.yaml")
        assert cfg.arch == arch and arch in ARCHS, arch


# --------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def recipe_run(tmp_path_factory):
    """cifar_resnet56_resnet20 (the cheapest pair) with the recipe, 2 epochs per phase, lr x0.1 after epoch 1."""
    data = tmp_path_factory.mktemp("recipe_data")
    helpers.write_cifar100(data, n_train=200, n_test=100)
    proc, run_dir = run_cli(
        ["experiment=cifar_resnet56_resnet20", "dataset.verify_md5=false", "trainer.teacher_epochs=2",
         "trainer.student_epochs=2", "scheduler.milestones=[1]", "trainer.eval_batch_size=100"],
        tmp_path_factory.mktemp("recipe_run"), env={"KD_DATA_DIR": str(data)})
    return proc, run_dir, assert_ok(proc, run_dir)


def test_recipe_run_reports_last_and_best_on_val_for_every_model(recipe_run):
    _, _, rep = recipe_run
    assert rep["status"] == "complete"
    d = rep["dataset"]
    assert (d["name"], d["num_classes"], d["train"], d["val"], d["test"]) == ("cifar100", 100, 180, 20, 100)
    expected_arch = {"teacher": "resnet56", "baseline": "resnet20", "student": "resnet20"}
    for role, arch in expected_arch.items():
        m = rep["models"][role]
        assert m["arch"]["arch"] == arch and m["epochs"] == 2
        assert 0.0 <= m["test_acc"] <= 100.0 and 0.0 <= m["test_acc_best_val"] <= 100.0
        assert 0.0 <= m["best_val_acc"] <= 100.0 and m["best_epoch"] in (1, 2)
    assert rep["kd_gain_points"] is not None and rep["kd_gain_points_best_val"] is not None
    assert rep["method"]["name"] == "kd" and rep["method"]["T"] == 4.0
    assert (rep["method"]["ce_weight"], rep["method"]["soft_weight"]) == (0.1, 0.9)
    c = rep["config"]
    assert (c["optimizer"]["name"], c["optimizer"]["lr"], c["trainer"]["batch_size"]) == ("sgd", 0.05, 64)
    assert (c["augment"]["crop_padding"], c["augment"]["hflip"]) == (4, True)


def test_recipe_run_steps_the_lr_at_the_milestone(recipe_run):
    _, run_dir, _ = recipe_run
    lrs: dict[str, list[float]] = {}
    for row in read_metrics(run_dir):
        lrs.setdefault(row["phase"], []).append(float(row["lr"]))
    assert set(lrs) == {"teacher", "baseline", "student"}
    for phase, values in lrs.items():
        assert values == [pytest.approx(0.05), pytest.approx(0.005)], phase
