"""kd-runner: a Hydra-configured runner for knowledge-distillation experiments."""

__version__ = "0.1.0"
