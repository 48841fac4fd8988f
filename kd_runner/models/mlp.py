"""Fully connected nets: Hinton et al.'s MNIST MLPs and the Keras demo's Dense(28) student."""

from __future__ import annotations

import math

import torch
from torch import nn


class MLP(nn.Module):
    """Flatten -> [Linear, ReLU, Dropout] * len(hidden) -> Linear.

    ``features`` is the hidden stack (tap it by name), ``classifier`` the output layer.
    """

    def __init__(
        self,
        input_shape: tuple[int, int, int],
        num_classes: int,
        hidden: list[int],
        dropout: float = 0.0,
        input_dropout: float = 0.0,
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Flatten()]
        if input_dropout > 0:
            layers.append(nn.Dropout(input_dropout))
        width = math.prod(input_shape)
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU()]
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
            width = h
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))
