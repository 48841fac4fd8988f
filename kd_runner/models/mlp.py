"""Fully connected nets: Hinton et al.'s MNIST MLPs, the Hinton MNIST project's BatchNorm MLPs and the
Keras demo's Dense(28) student."""

from __future__ import annotations

import math

import torch
from torch import nn

from kd_runner.errors import UserError, choices

ACTIVATIONS = ("relu", "none")


class MLP(nn.Module):
    """Flatten -> [Linear, (BatchNorm1d), activation, (Dropout)] * len(hidden) -> Linear.

    ``activation: none`` stacks the hidden Linear layers with nothing between them (a Keras ``Dense``
    with its default linear activation). ``batch_norm`` puts a BatchNorm1d after each hidden Linear.
    ``features`` is the hidden stack (tap it by name), ``classifier`` the output layer.
    """

    def __init__(
        self,
        input_shape: tuple[int, int, int],
        num_classes: int,
        hidden: list[int],
        dropout: float = 0.0,
        input_dropout: float = 0.0,
        activation: str = "relu",
        batch_norm: bool = False,
    ) -> None:
        super().__init__()
        if activation not in ACTIVATIONS:
            raise UserError(f"arch=mlp: activation={activation!r} is invalid; valid: {choices(ACTIVATIONS)}")
        if not isinstance(batch_norm, bool):
            raise UserError(f"arch=mlp: batch_norm={batch_norm!r} is invalid; valid: false, true")
        layers: list[nn.Module] = [nn.Flatten()]
        if input_dropout > 0:
            layers.append(nn.Dropout(input_dropout))
        width = math.prod(input_shape)
        for h in hidden:
            layers.append(nn.Linear(width, h))
            if batch_norm:
                layers.append(nn.BatchNorm1d(h))
            if activation == "relu":
                layers.append(nn.ReLU())
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
            width = h
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))
