"""Distillation methods, one file each behind the interface in ``base``.

Importing this package loads only the interface; ``registry`` finds the methods. ``METHODS``,
``build_method`` and the method classes are still reachable from here, loaded on first use.
"""

from __future__ import annotations

from kd_runner.methods.base import Method, Outputs

__all__ = ["METHODS", "Method", "Outputs", "build_method"]


def __getattr__(name: str):
    import importlib

    if name.startswith("__"):
        raise AttributeError(name)
    registry = importlib.import_module("kd_runner.methods.registry")

    if name == "METHODS":
        return registry.methods()
    if name == "build_method":
        return registry.build_method
    for cls in registry.methods().values():
        if cls.__name__ == name:
            return cls
    raise AttributeError(f"module 'kd_runner.methods' has no attribute {name!r}")
