"""Method registry: ``method.name`` -> class, found by scanning this package.

A new method is one file here (a ``Method`` subclass with its own ``name``) and one YAML in
``conf/method/``; nothing else lists methods. The training loop never imports this module.
``method.add`` (one entry per added method, each its own YAML's options) composes methods.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import pkgutil

from omegaconf import DictConfig, OmegaConf

from kd_runner.errors import UserError, choices
from kd_runner.methods.base import Method

NOT_METHODS = {"base", "registry", "compose"}
ADD_KEY = "add"


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


def _build_one(options: dict, where: str) -> Method:
    registry = methods()
    name = str(options.get("name"))
    if name not in registry:
        raise UserError(f"{where}.name={name!r} is unknown; valid: {choices(registry)}")
    kwargs = {k: v for k, v in options.items() if k not in ("name", ADD_KEY)}
    try:
        return registry[name](**kwargs)
    except TypeError as err:
        raise UserError(f"method={name}: unknown option ({err})") from None


def build_method(cfg: DictConfig) -> Method:
    options = OmegaConf.to_container(cfg, resolve=True)
    primary = _build_one(options, "method")
    added_cfg = options.get(ADD_KEY) or {}
    if not isinstance(added_cfg, dict):
        raise UserError(f"method.{ADD_KEY}={added_cfg!r} is invalid; compose methods as method=kd+crd "
                        f"(or +method@method.{ADD_KEY}.<name>=<name>)")
    if not added_cfg:
        return primary
    added: dict[str, Method] = {}
    for label, part in added_cfg.items():
        if not isinstance(part, dict) or "name" not in part:
            raise UserError(f"method.{ADD_KEY}.{label} is not a method config; valid: {choices(methods())} "
                            f"(add one as +method@method.{ADD_KEY}.<name>=<name>)")
        if part.get(ADD_KEY):
            raise UserError(f"method.{ADD_KEY}.{label}.{ADD_KEY}: an added method cannot add methods itself")
        if part["name"] == primary.name or part["name"] in [p.name for p in added.values()]:
            raise UserError(f"method {part['name']!r} appears twice in the composition; each method once")
        added[str(label)] = _build_one(part, f"method.{ADD_KEY}.{label}")
    from kd_runner.methods.compose import Composite

    return Composite(primary, added)
