"""Method registry: ``method.name`` -> class, found by scanning this package.

A new method is one file here (a ``Method`` subclass with its own ``name``) and one YAML in
``conf/method/``; nothing else lists methods. The training loop never imports this module.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import pkgutil

from omegaconf import DictConfig, OmegaConf

from kd_runner.errors import UserError, choices
from kd_runner.methods.base import Method

NOT_METHODS = {"base", "registry"}


@functools.cache
def methods() -> dict[str, type[Method]]:
    """Every concrete method class defined in a module of this package, by its ``name``."""
    import kd_runner.methods as package

    found: dict[str, type[Method]] = {}
    for info in pkgutil.iter_modules(package.__path__):
        if info.name in NOT_METHODS:
            continue
        module = importlib.import_module(f"{package.__name__}.{info.name}")
        for _, cls in inspect.getmembers(module, inspect.isclass):
            if issubclass(cls, Method) and cls.__module__ == module.__name__ and "name" in vars(cls):
                if cls.name in found:
                    raise RuntimeError(f"two methods are named {cls.name!r}: {found[cls.name]} and {cls}")
                found[cls.name] = cls
    return found


def build_method(cfg: DictConfig) -> Method:
    name = str(cfg.name)
    registry = methods()
    if name not in registry:
        raise UserError(f"method.name={name!r} is unknown; valid: {choices(registry)}")
    kwargs = {k: v for k, v in OmegaConf.to_container(cfg, resolve=True).items() if k != "name"}
    try:
        return registry[name](**kwargs)
    except TypeError as err:
        raise UserError(f"method={name}: unknown option ({err})") from None
