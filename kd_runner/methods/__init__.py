"""Method registry: ``method.name`` -> class; a new method is one file here and one YAML."""

from __future__ import annotations

from omegaconf import DictConfig, OmegaConf

from kd_runner.errors import UserError, choices
from kd_runner.methods.base import Method, Outputs
from kd_runner.methods.ce import CE
from kd_runner.methods.cosine import Cosine
from kd_runner.methods.hint import Hint
from kd_runner.methods.kd import KD

METHODS: dict[str, type[Method]] = {m.name: m for m in (CE, KD, Cosine, Hint)}

__all__ = ["METHODS", "Method", "Outputs", "build_method"]


def build_method(cfg: DictConfig) -> Method:
    name = str(cfg.name)
    if name not in METHODS:
        raise UserError(f"method.name={name!r} is unknown; valid: {choices(METHODS)}")
    kwargs = {k: v for k, v in OmegaConf.to_container(cfg, resolve=True).items() if k != "name"}
    try:
        return METHODS[name](**kwargs)
    except TypeError as err:
        raise UserError(f"method={name}: unknown option ({err})") from None
