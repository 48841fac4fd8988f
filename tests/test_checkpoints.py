"""Checkpoint files: what kd-train saves is what it reports, and what it loads."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from kd_runner import checkpoints
from kd_runner.errors import UserError
from kd_runner.models.tutorial import DeepNN, LightNN


def test_save_then_load_round_trip(tmp_path):
    torch.manual_seed(0)
    src, dst = DeepNN((1, 8, 8), 10), DeepNN((1, 8, 8), 10)
    size = checkpoints.save(tmp_path / "t.pt", src, OmegaConf.create({"arch": "deep_nn"}), (1, 8, 8), 10)
    assert size == (tmp_path / "t.pt").stat().st_size
    assert checkpoints.load_weights(tmp_path / "t.pt", dst, "teacher") == str((tmp_path / "t.pt").resolve())
    assert all(torch.equal(a, b) for a, b in zip(src.state_dict().values(), dst.state_dict().values(), strict=True))


def test_bare_state_dict_from_torch_save_is_accepted(tmp_path):
    src, dst = LightNN((1, 8, 8), 10), LightNN((1, 8, 8), 10)
    torch.save(src.state_dict(), tmp_path / "bare.pt")
    checkpoints.load_weights(tmp_path / "bare.pt", dst, "teacher")
    assert all(torch.equal(a, b) for a, b in zip(src.state_dict().values(), dst.state_dict().values(), strict=True))


def test_checkpoint_without_state_dict_is_a_user_error(tmp_path):
    torch.save([1, 2, 3], tmp_path / "list.pt")
    with pytest.raises(UserError, match="no state dict"):
        checkpoints.load_weights(tmp_path / "list.pt", LightNN((1, 8, 8), 10), "teacher")


def test_best_val_checkpoint_holds_the_best_epochs_extra_modules(tmp_path):
    """``student_best.pt`` must pair the best epoch's student with the best epoch's regressor.

    fit() snapshots both (``best_state = {"model": ..., "extra": ...}``); a best checkpoint whose
    ``extra`` is the last epoch's regressor is inconsistent (hint: the regressor belongs to another student).
    """
    from kd_runner.data.tensors import DataBundle, Normalizer, Split
    from kd_runner.engine import Env, PhaseResult
    from kd_runner.pipeline import _evaluate

    torch.manual_seed(0)
    split = Split(torch.randint(0, 256, (8, 1, 8, 8), dtype=torch.uint8), torch.arange(8) % 2)
    data = DataBundle(name="t", train=split, test=split, val=split, classes=["a", "b"], mean=[0.5], std=[0.25],
                      source="test")
    env = Env(torch.device("cpu"), Normalizer([0.5], [0.25]), 4, 4, False)

    best_model, best_extra = LightNN((1, 8, 8), 2), nn.ModuleDict({"regressor": nn.Linear(64, 128)})
    model, extra = LightNN((1, 8, 8), 2), nn.ModuleDict({"regressor": nn.Linear(64, 128)})  # the last epoch's
    res = PhaseResult(history=[{"epoch": 1}, {"epoch": 2}], best_val_acc=50.0, best_epoch=1,
                      best_state={"model": copy.deepcopy(best_model.state_dict()),
                                  "extra": copy.deepcopy(best_extra.state_dict())})
    last_model_state = copy.deepcopy(model.state_dict())

    info = _evaluate("student", model, extra, res, data, env, SimpleNamespace(bench_iters=0),
                     OmegaConf.create({"arch": "light_nn"}), tmp_path)

    assert info["best_epoch"] == 1 and info["best_val_acc"] == 50.0
    last = torch.load(tmp_path / "checkpoints" / "student.pt", map_location="cpu", weights_only=True)
    best = torch.load(tmp_path / "checkpoints" / "student_best.pt", map_location="cpu", weights_only=True)
    assert all(torch.equal(last["model"][k], v) for k, v in last_model_state.items())
    assert all(torch.equal(last["extra"][k], v) for k, v in extra.state_dict().items())
    assert all(torch.equal(best["model"][k], v) for k, v in best_model.state_dict().items())
    assert all(torch.equal(best["extra"][k], v) for k, v in best_extra.state_dict().items()), \
        "student_best.pt holds the last epoch's extra modules, not the best epoch's"
    # the in-memory model is back at its last-epoch weights
    assert all(torch.equal(model.state_dict()[k], v) for k, v in last_model_state.items())
